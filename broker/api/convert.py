"""Proto <-> domain conversions."""

from __future__ import annotations

from collections.abc import Iterable

from google.protobuf import duration_pb2, timestamp_pb2
from keybroker_client.v1 import keybroker_pb2 as pb

from ..engine import InternalRoute, KeyView, LeaseGrant, LeaseRequest
from ..engine.health import describe_reason
from ..errors import InvalidArgument
from ..models import Health, HealthState, LeaseStatus, Priority, UsageReport
from ..usage import Dimension, UsageSummary

__all__ = ["duration", "grant_to_pb", "health_to_pb", "key_view_to_pb", "lease_request",
           "lease_state_to_pb", "seconds", "timestamp", "usage_report"]

_HEALTH = {
    HealthState.HEALTHY: pb.KEY_HEALTH_HEALTHY,
    HealthState.COOLING_DOWN: pb.KEY_HEALTH_COOLING_DOWN,
    HealthState.CIRCUIT_OPEN: pb.KEY_HEALTH_CIRCUIT_OPEN,
    HealthState.DISABLED: pb.KEY_HEALTH_DISABLED,
}
_LEASE_STATE = {
    LeaseStatus.ACTIVE: pb.LEASE_STATE_ACTIVE,
    LeaseStatus.COMPLETED: pb.LEASE_STATE_COMPLETED,
    LeaseStatus.EXPIRED: pb.LEASE_STATE_EXPIRED,
    LeaseStatus.REVOKED: pb.LEASE_STATE_REVOKED,
}
_PRIORITY = {pb.PRIORITY_UNSPECIFIED: Priority.NORMAL, pb.PRIORITY_HIGH: Priority.HIGH,
             pb.PRIORITY_NORMAL: Priority.NORMAL, pb.PRIORITY_LOW: Priority.LOW}
_INTERNAL_REASON = {"quota_exhausted": pb.INTERNAL_REASON_QUOTA_EXHAUSTED,
                    "all_keys_unhealthy": pb.INTERNAL_REASON_ALL_KEYS_UNHEALTHY,
                    "reserved_for_higher_priority":
                        pb.INTERNAL_REASON_RESERVED_FOR_HIGHER_PRIORITY,
                    "pacing": pb.INTERNAL_REASON_PACING,
                    "model_cooling_down": pb.INTERNAL_REASON_MODEL_COOLING_DOWN}


def timestamp(t: float) -> timestamp_pb2.Timestamp:
    """``Timestamp.FromNanoseconds(int(t * 1e9))``, without its per-call validation."""
    seconds_, nanos = divmod(int(t * 1e9), 1_000_000_000)
    return timestamp_pb2.Timestamp(seconds=seconds_, nanos=nanos)


def duration(seconds_: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(int(seconds_ * 1e9))
    return d


def seconds(d: duration_pb2.Duration) -> float:
    return d.seconds + d.nanos / 1e9


def lease_request(req: pb.LeaseKeyRequest) -> LeaseRequest:
    if req.priority not in _PRIORITY:
        raise InvalidArgument("priority", "unknown priority")
    return LeaseRequest(
        pool=req.pool, model=req.model, units=req.units or 1, priority=_PRIORITY[req.priority],
        request_id=req.request_id, ttl=seconds(req.ttl) if req.HasField("ttl") else None,
        allow_internal=req.allow_internal)


def grant_to_pb(result: LeaseGrant | InternalRoute) -> pb.LeaseKeyResponse:
    if isinstance(result, InternalRoute):
        return pb.LeaseKeyResponse(route=pb.ROUTE_INTERNAL,
                                   internal_reason=_INTERNAL_REASON[result.reason],
                                   retry_after=duration(result.retry_after))
    lease = result.lease
    return pb.LeaseKeyResponse(
        lease_id=lease.lease_id, key_id=lease.key_id, api_key=result.key.secret.reveal(),
        base_url=result.key.base_url, model=lease.model, expires_at=timestamp(lease.expires_at),
        remaining_key_today=result.remaining_key_today,
        remaining_account_today=result.remaining_account_today,
        resets_at=timestamp(result.resets_at), route=pb.ROUTE_EXTERNAL, account=lease.account,
        units=lease.units)


def usage_report(req: pb.ReportUsageRequest) -> UsageReport:
    return UsageReport(
        http_status=req.http_status, error_type=req.error_type, prompt_tokens=req.prompt_tokens,
        completion_tokens=req.completion_tokens, cost=req.cost, latency_ms=req.latency_ms,
        ratelimit_limit=req.ratelimit_limit if req.HasField("ratelimit_limit") else None,
        ratelimit_remaining=(req.ratelimit_remaining if req.HasField("ratelimit_remaining")
                             else None),
        ratelimit_reset_ms=req.ratelimit_reset_ms if req.HasField("ratelimit_reset_ms") else None,
        retry_after=seconds(req.retry_after) if req.HasField("retry_after") else None,
        model=req.model, error_reason=req.error_reason, limit_source=req.limit_source,
        upstream_provider=req.upstream_provider,
        resets_at=(req.resets_at.seconds + req.resets_at.nanos / 1e9
                   if req.HasField("resets_at") else None))


def cooldown_to_pb(scope: str, pool: str, name: str, h: Health) -> pb.Cooldown:
    return pb.Cooldown(scope=scope, pool=pool, name=name, reason=h.reason,
                       description=describe_reason(h.reason), until=timestamp(h.until))


def health_to_pb(h: Health) -> pb.ReportUsageResponse:
    out = pb.ReportUsageResponse(health=_HEALTH[h.state])
    if h.state is HealthState.COOLING_DOWN:
        out.cooldown_until.CopyFrom(timestamp(h.until))
    return out


def lease_state_to_pb(status: LeaseStatus) -> int:
    return int(_LEASE_STATE[status])


_DIMENSIONS = {pb.USAGE_DIMENSION_DAY: Dimension.DAY, pb.USAGE_DIMENSION_KEY: Dimension.KEY,
               pb.USAGE_DIMENSION_ACCOUNT: Dimension.ACCOUNT,
               pb.USAGE_DIMENSION_MODEL: Dimension.MODEL,
               pb.USAGE_DIMENSION_PRINCIPAL: Dimension.PRINCIPAL}


def usage_dimensions(values: Iterable[int]) -> list[Dimension]:
    out = []
    for v in values:
        if v not in _DIMENSIONS:
            raise InvalidArgument("group_by", f"unknown dimension {v}")
        out.append(_DIMENSIONS[v])
    return out


def usage_row_to_pb(s: UsageSummary) -> pb.UsageRow:
    return pb.UsageRow(group=list(s.group), requests=s.requests, failures=s.failures,
                       prompt_tokens=s.prompt_tokens, completion_tokens=s.completion_tokens,
                       cost=s.cost, latency_ms_avg=s.latency_ms_avg,
                       latency_ms_p50=s.latency_ms_p50, latency_ms_p95=s.latency_ms_p95,
                       latency_ms_p99=s.latency_ms_p99)


def key_view_to_pb(v: KeyView) -> pb.KeyInfo:
    info = pb.KeyInfo(
        key_id=v.key.key_id, pool=v.key.pool, name=v.key.name, account=v.key.account,
        base_url=v.key.base_url, models=list(v.key.models), enabled=v.enabled,
        health=_HEALTH[v.health], health_reason=v.health_reason, used_today=v.used_today,
        account_daily_limit=v.account_daily_limit, account_minute_limit=v.account_minute_limit,
        account_used_today=v.account_used_today,
        account_remaining_today=max(0, v.account_daily_limit - v.account_used_today),
        key_daily_limit=v.key_daily_limit, key_minute_limit=v.key_minute_limit,
        active_leases=v.active_leases,
        strategy=v.strategy.value)
    if v.cooldown_until:
        info.cooldown_until.CopyFrom(timestamp(v.cooldown_until))
    return info
