"""The StateStore protocol every backend implements, and the values it trades in."""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from ..errors import LeaseNotActive, LeaseRevoked
from ..models import (
    Health,
    HealthState,
    KeyStats,
    LeaseRecord,
    LeaseStatus,
    UsageReport,
    UsageRow,
    Window,
)

__all__ = [
    "SHARED_WINDOW",
    "Budget",
    "Candidate",
    "Rejection",
    "ReportState",
    "ReportWrite",
    "Reservation",
    "ReserveRequest",
    "StateStore",
    "account_tag",
    "blocked",
    "gate_blocks",
    "health_from_json",
    "health_json",
    "in_flight_capped",
    "lease_id_in",
    "not_renewable",
    "stats_from_json",
    "stats_json",
]

TAG_HEX = 12  # hex digits of an account's tag; a lease id ends in its account's tag
SHARED_WINDOW = "principal:"
"""A window whose name starts with this spans accounts (a principal's own limit, named in
``engine.windows``): a store keeps it apart from every account's windows. Every other window
belongs to the account of the candidate it is charged with."""
IN_FLIGHT_REASON = "in_flight_budget"
"""The reason of an account's paid-use record after ``in_flight_budget_exhausted``: its
``failures`` field holds the learned cap on the account's leases in flight."""
IN_FLIGHT_CAP_SECONDS = 60.0
"""After such a cooldown ends, the account's leases in flight stay capped this long
(reserve.lua holds the same number)."""


@functools.lru_cache(maxsize=4096)  # a handful of accounts, hashed on every reservation
def account_tag(account: str) -> str:
    """An account's tag: 12 hex digits of the BLAKE2b hash of its name (the Redis store's
    hash tag, so every key of one account lives in one Redis Cluster slot)."""
    return hashlib.blake2b(account.encode(), digest_size=TAG_HEX // 2).hexdigest()


def lease_id_in(lease_id: str, account: str) -> str:
    """The id a lease proposed as ``lease_id`` gets when granted in ``account``: its last 12
    hex digits become the account's tag, so the lease's account (and Redis Cluster slot)
    is known from its id alone. Every store does this, so ids do not depend on the store."""
    return lease_id[:-TAG_HEX] + account_tag(account)


def not_renewable(lease: LeaseRecord) -> LeaseNotActive:
    """What a store raises when ``lease`` is no longer active to renew: LeaseRevoked when its
    key was revoked (``end_leases``), else LeaseNotActive."""
    if lease.status is LeaseStatus.REVOKED:
        return LeaseRevoked(f"lease {lease.lease_id} was ended because its key {lease.key_id} "
                            "was revoked; lease again (ReportUsage and Complete on it are "
                            "still accepted)")
    return LeaseNotActive(f"lease {lease.lease_id} is no longer active")


def health_json(health: Health) -> str:
    """A health record as the stores keep it (JSON; Redis scripts read its fields)."""
    return json.dumps({"state": health.state.value, "reason": health.reason,
                       "until": health.until, "failures": health.failures})


def health_from_json(raw: str) -> Health:
    d = json.loads(raw)
    return Health(HealthState(d["state"]), str(d["reason"]), float(d["until"]), int(d["failures"]))


def stats_json(stats: KeyStats) -> str:
    return json.dumps([stats.successes, stats.failures, stats.latency_ms, stats.updated_at])


def stats_from_json(raw: str) -> KeyStats:
    return KeyStats(*(float(x) for x in json.loads(raw)))


def blocked(own: Health | None, account: Health | None, now: float) -> tuple[bool, bool]:
    """The reservation's health rule, ``(blocked, probe)``: a disabled key, a key whose circuit
    is open (or whose probe is out) or a cooling account blocks; a circuit whose backoff has
    passed (half-open) lets this one lease through as its probe. reserve.lua holds the same
    rule."""
    probe = False
    if own is not None:
        if own.state is HealthState.DISABLED or (own.state is not HealthState.HEALTHY
                                                 and own.until > now):
            return True, False
        probe = own.state is HealthState.CIRCUIT_OPEN
    if account is not None and account.state is HealthState.COOLING_DOWN and account.until > now:
        return True, False
    return False, probe


def in_flight_capped(paid: Health | None, active: int, now: float) -> bool:
    """Whether an account's paid use is held at its learned in-flight cap: the cooldown after
    ``in_flight_budget_exhausted`` has ended, the cap still holds, and ``active`` leases of
    the account are in flight already. reserve.lua holds the same rule."""
    return (paid is not None and paid.reason == IN_FLIGHT_REASON and paid.failures > 0
            and paid.until <= now < paid.until + IN_FLIGHT_CAP_SECONDS
            and active >= paid.failures)


def gate_blocks(health: Health | None, now: float) -> bool:
    """Whether a paid-use or model record blocks a lease now: disabled, or any other
    non-healthy state whose ``until`` lies ahead. reserve.lua holds the same rule."""
    return health is not None and health.state is not HealthState.HEALTHY and (
        health.state is HealthState.DISABLED or health.until > now)


@dataclass(frozen=True)
class Candidate:
    """A key the engine would lease, with every window a lease on it is charged to and the
    names of its health records (the key's own, its account's): the store skips a candidate
    those records block."""

    key_id: str
    account: str
    windows: tuple[Window, ...]
    key_subject: str = ""
    account_subject: str = ""
    key_version: int = 0
    """The key's KV version (kept in the lease: a replay hands out only the secret granted)."""
    paid_subject: str = ""
    """The account's paid-use record, for a lease of a paid model ('' = not checked): a
    record that ``gate_blocks`` skips the candidate, and so does ``in_flight_capped`` with
    the account's active leases."""


@dataclass(frozen=True)
class Budget:
    """The pool's day budget for this request (priority reserve, low-priority pacing):
    refused unless the units counted in ``windows`` (each ``(account, name, cap)``, counted
    at most up to its cap) plus the request's stay within ``allowed``."""

    windows: tuple[tuple[str, str, int], ...]
    allowed: float


@dataclass(frozen=True)
class ReserveRequest:
    """One atomic reservation attempt over candidates, tried in the given order.

    ``lease_id`` is ``ls_`` and 32 hex digits; the granted lease's id is
    ``lease_id_in(lease_id, account)`` of the account charged: callers use
    ``Reservation.lease.lease_id``.
    """

    lease_id: str
    principal: str
    request_id: str
    pool: str
    model: str
    units: int
    created_at: float
    expires_at: float
    candidates: Sequence[Candidate]
    probe_until: float = 0.0  # a half-open key granted now holds its probe until then
    budget: Budget | None = None
    gates: tuple[tuple[str, str], ...] = ()
    """Pool-wide records, ``(scope, subject)`` (a model's upstream cooldown, kept with the
    scope as ``put_health`` keeps it): one that ``gate_blocks`` refuses the whole request
    (a Rejection whose ``health`` holds it). SQLite checks them inside the reservation;
    Redis reads them just before it (they live in their own slot)."""


@dataclass(frozen=True)
class Reservation:
    """A granted lease. ``used`` holds each charged window's count after the charge.

    ``replay`` is true when the request_id matched an earlier lease: nothing new
    was charged and ``lease`` is that earlier lease.
    """

    lease: LeaseRecord
    used: Mapping[str, int]
    replay: bool = False


@dataclass(frozen=True)
class Rejection:
    """No candidate fitted. ``used`` holds the current count of every window looked at and
    ``health`` every health record found; ``budget_spent`` is set (the units the budget
    counted) when the budget refused, before any candidate was looked at."""

    used: Mapping[str, int]
    health: Mapping[str, Health] = field(default_factory=dict)
    budget_spent: int | None = None


@dataclass(frozen=True)
class ReportState:
    """What a report starts from: the answer of an earlier report on the lease (None: none
    yet), the records of the key and account present, and the key's statistics. ``token``
    is what was read, handed back in ``ReportWrite`` for the store to compare."""

    answer: Health | None
    health: Mapping[str, Health]
    stats: KeyStats | None
    token: object


@dataclass(frozen=True)
class ReportWrite:
    """Everything one report changes, applied at once (``StateStore.apply_report``).

    ``health``: subject -> new record (``Health()`` deletes it); ``stats``: the key's new
    statistics (None: unchanged); ``counter``: a window reconciled with the provider,
    ``(name, count, ends_at)``.
    """

    lease: LeaseRecord
    report: UsageReport
    now: float
    answer: Health
    health: Mapping[str, Health]
    stats: KeyStats | None
    counter: tuple[str, int, float] | None
    token: object


class StateStore(Protocol):
    """Everything the broker must not lose. Implementations are atomic per call."""

    async def reserve(self, request: ReserveRequest) -> Reservation | Rejection:
        """Charge the first candidate whose windows all have room and record the lease.

        Checks the idempotency record (principal, request_id) first. All of it is
        one transaction: either the lease exists and every window is charged, or
        nothing changed.
        """
        ...

    async def get_lease(self, lease_id: str) -> LeaseRecord | None: ...

    async def renew(self, lease_id: str, expires_at: float, now: float) -> LeaseRecord:
        """Move an active lease's expiry. Raises LeaseNotActive when it is not active
        (LeaseRevoked when ``end_leases`` ended it)."""
        ...

    async def complete(self, lease_id: str, used: bool, now: float) -> tuple[LeaseRecord, bool]:
        """End a lease; refund its windows when ``used`` is false and it was still active.

        Returns the lease after the call and whether this call changed it.
        Raises LeaseNotFound.
        """
        ...

    async def end_leases(self, account: str, key_id: str, now: float) -> list[LeaseRecord]:
        """End every active, unexpired lease of ``key_id`` (a key of ``account``) as REVOKED,
        at once, and return them: they leave the active count (in flight), cannot be renewed,
        and keep their units charged (the call may have been made). Lapsed ones are left to
        ``expire_due``. For a revoked key, after new leases on it were stopped."""
        ...

    async def expire_due(self, now: float, limit: int = 500) -> list[LeaseRecord]:
        """Mark active leases past their expiry as expired and return them. A call may stop
        after ``limit`` of them (SQLite: in all; Redis: per account); the next call goes on."""
        ...

    async def counters(self, windows: Sequence[tuple[str, str]]) -> dict[str, int]:
        """Current counts of the given ``(account, window name)`` windows, by name (absent
        ones are 0). The account says where a window lives (its Redis Cluster slot)."""
        ...

    async def live_counters(self, now: float) -> dict[str, int]:
        """Every window that has not ended yet."""
        ...

    async def set_counter(self, account: str, name: str, used: int, expires_at: float,
                          now: float) -> None:
        """Overwrite one window of ``account`` (reconciling with the provider)."""
        ...

    async def health(self) -> dict[str, Health]:
        """Every recorded health, by subject (``key:<key_id>``, ``account:<name>``, the
        account's paid use, a pool's models)."""
        ...

    async def put_health(self, account: str, subject: str, health: Health) -> None:
        """Set one record kept with ``account`` (a key's own record lives with its account);
        ``Health()`` deletes it."""
        ...

    async def report_state(self, lease: LeaseRecord, key_subject: str,
                           account_subject: str, paid_subject: str = "") -> ReportState:
        """What a report on ``lease`` starts from (the records of the key, the account and,
        when named, the account's paid use). Raises LeaseNotFound."""
        ...

    async def apply_report(self, write: ReportWrite) -> tuple[Health, bool] | None:
        """Apply one report at once, first report per lease wins: ``(answer, True)`` when
        applied; ``(the first answer, False)`` when the lease was reported before (nothing
        changed); None when a record changed since ``report_state`` read it (nothing changed:
        read again). Adds the answer to the per-day usage statistics. Raises LeaseNotFound."""
        ...

    async def usage(self, since_day: str, until_day: str) -> list[UsageRow]:
        """Recorded usage rows with ``since_day <= day <= until_day`` (``YYYY-MM-DD``)."""
        ...

    async def key_stats(self) -> dict[str, KeyStats]:
        """Every key's learned performance, by key_id."""
        ...

    async def active_leases(self, now: float) -> Mapping[str, int]:
        """Count of active leases per key_id."""
        ...

    async def prune(self, now: float, retention_seconds: float,
                    usage_retention_seconds: float = 30 * 86400.0) -> int:
        """Delete ended windows, leases finished longer ago than the retention, and usage
        rows older than the usage retention."""
        ...

    async def close(self) -> None: ...
