"""Async and sync clients with a lease context manager."""

from __future__ import annotations

import asyncio
import datetime as _dt
from collections.abc import AsyncIterator, Awaitable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
from google.protobuf import duration_pb2

from ._errors import from_rpc_error
from .v1 import keybroker_pb2 as pb
from .v1 import keybroker_pb2_grpc as pb_grpc

__all__ = ["AsyncKeyBrokerClient", "KeyBrokerClient", "Lease"]

_T = TypeVar("_T")

_PRIORITY = {"high": pb.PRIORITY_HIGH, "normal": pb.PRIORITY_NORMAL, "low": pb.PRIORITY_LOW}
_INTERNAL_REASON = {
    pb.INTERNAL_REASON_QUOTA_EXHAUSTED: "quota_exhausted",
    pb.INTERNAL_REASON_RESERVED_FOR_HIGHER_PRIORITY: "reserved_for_higher_priority",
    pb.INTERNAL_REASON_ALL_KEYS_UNHEALTHY: "all_keys_unhealthy",
    pb.INTERNAL_REASON_PACING: "pacing",
    pb.INTERNAL_REASON_MODEL_COOLING_DOWN: "model_cooling_down",
}


@dataclass
class Lease:
    """One leased key (``route == "external"``) or an internal-route answer.

    ``api_key`` is the provider secret: keep it in memory, never log it. Calling
    ``report`` (or ``mark_used``) records that the provider call went out, so
    leaving the ``lease()`` block with an exception no longer refunds it.
    """

    lease_id: str
    key_id: str
    api_key: str = field(repr=False)
    base_url: str
    model: str
    account: str
    expires_at: _dt.datetime | None
    remaining_key_today: int
    remaining_account_today: int
    route: str
    internal_reason: str = ""
    retry_after: float = 0.0
    used: bool = False
    _client: Any = field(default=None, repr=False)

    @classmethod
    def _from_pb(cls, r: pb.LeaseKeyResponse, client: Any) -> Lease:
        internal = r.route == pb.ROUTE_INTERNAL
        return cls(
            lease_id=r.lease_id, key_id=r.key_id, api_key=r.api_key, base_url=r.base_url,
            model=r.model, account=r.account,
            expires_at=r.expires_at.ToDatetime(_dt.UTC) if r.HasField("expires_at") else None,
            remaining_key_today=r.remaining_key_today,
            remaining_account_today=r.remaining_account_today,
            route="internal" if internal else "external",
            internal_reason=_INTERNAL_REASON.get(r.internal_reason, ""),
            retry_after=r.retry_after.seconds + r.retry_after.nanos / 1e9, _client=client)

    @property
    def external(self) -> bool:
        return self.route == "external"

    def mark_used(self) -> None:
        self.used = True

    def report(self, **fields: Any) -> Any:
        """Report the provider's answer (see ``ReportUsageRequest`` for the fields)."""
        self.used = True
        return self._client.report_usage(self.lease_id, **fields)


def _duration(seconds: float | None) -> duration_pb2.Duration | None:
    if seconds is None:
        return None
    d = duration_pb2.Duration()
    d.FromNanoseconds(int(seconds * 1e9))
    return d


def _lease_request(pool: str, model: str, units: int, priority: str, request_id: str,
                   ttl: float | None, allow_internal: bool) -> pb.LeaseKeyRequest:
    return pb.LeaseKeyRequest(pool=pool, model=model, units=units,
                              priority=_PRIORITY[priority], request_id=request_id,
                              ttl=_duration(ttl), allow_internal=allow_internal)


_DIMENSIONS = {"day": pb.USAGE_DIMENSION_DAY, "key": pb.USAGE_DIMENSION_KEY,
               "account": pb.USAGE_DIMENSION_ACCOUNT, "model": pb.USAGE_DIMENSION_MODEL,
               "principal": pb.USAGE_DIMENSION_PRINCIPAL}


def _usage_request(days: int, group_by: Sequence[str], pool: str, page_size: int = 0,
                   page_token: str = "") -> pb.GetUsageRequest:
    try:
        dims = [_DIMENSIONS[g] for g in group_by]
    except KeyError as exc:
        raise ValueError(f"unknown dimension {exc.args[0]!r}; use {sorted(_DIMENSIONS)}") from None
    return pb.GetUsageRequest(days=days, group_by=dims, pool=pool, page_size=page_size,
                              page_token=page_token)


def _report_request(lease_id: str, http_status: int, *, retry_after: float | None = None,
                    resets_at: float | None = None, **fields: Any) -> pb.ReportUsageRequest:
    req = pb.ReportUsageRequest(lease_id=lease_id, http_status=http_status,
                                retry_after=_duration(retry_after), **fields)
    if resets_at is not None:  # epoch seconds: when a spent budget or credit limit resets
        req.resets_at.FromNanoseconds(int(resets_at * 1e9))
    return req


def _credentials(target: str, *, root_certificates: bytes | str | Path | None,
                 client_cert: bytes | str | Path | None, client_key: bytes | str | Path | None,
                 ) -> grpc.ChannelCredentials | None:
    def read(v: bytes | str | Path | None) -> bytes | None:
        if v is None or isinstance(v, bytes):
            return v
        return Path(v).read_bytes()

    if root_certificates is None and client_cert is None:
        return None
    return grpc.ssl_channel_credentials(read(root_certificates), read(client_key),
                                        read(client_cert))


async def _shielded(aw: Awaitable[_T]) -> _T:
    """Await ``aw`` to its end even when the caller is cancelled meanwhile (the lease
    bookkeeping must not be skipped); a cancellation is re-raised once it is done."""
    task = asyncio.ensure_future(aw)
    cancelled: asyncio.CancelledError | None = None
    while True:
        try:
            result = await asyncio.shield(task)
        except asyncio.CancelledError as exc:
            if task.done():  # the work itself was cancelled (the loop is closing)
                raise
            cancelled = exc
            continue
        except BaseException:
            if cancelled is not None:
                raise cancelled from None
            raise
        if cancelled is not None:
            raise cancelled
        return result


try:  # trace context propagation when the caller uses OpenTelemetry
    from opentelemetry.propagate import inject as _inject
except ImportError:  # pragma: no cover - opentelemetry is optional for the client
    _inject = None


class _Base:
    def __init__(self, token: str | None) -> None:
        self._auth: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {token}"),) if token else ())

    @property
    def _metadata(self) -> tuple[tuple[str, str], ...]:
        """Credentials plus the caller's current trace context (W3C traceparent)."""
        if _inject is None:
            return self._auth
        carrier: dict[str, str] = {}
        _inject(carrier)
        return self._auth + tuple(carrier.items())


class AsyncKeyBrokerClient(_Base):
    """asyncio client.

    Args:
        target: ``host:port`` of the broker.
        token: bearer token; omit when a client certificate names the principal.
        root_certificates, client_cert, client_key: PEM bytes or paths for TLS/mTLS;
            without them the channel is plaintext.
    """

    def __init__(self, target: str, *, token: str | None = None,
                 root_certificates: bytes | str | Path | None = None,
                 client_cert: bytes | str | Path | None = None,
                 client_key: bytes | str | Path | None = None,
                 options: Sequence[tuple[str, Any]] = ()) -> None:
        super().__init__(token)
        creds = _credentials(target, root_certificates=root_certificates,
                             client_cert=client_cert, client_key=client_key)
        self._channel = (grpc.aio.secure_channel(target, creds, options=options) if creds
                         else grpc.aio.insecure_channel(target, options=options))
        self.broker = pb_grpc.KeyBrokerStub(self._channel)
        self.admin = pb_grpc.KeyAdminStub(self._channel)

    async def __aenter__(self) -> AsyncKeyBrokerClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def _call(self, method: Any, request: Any) -> Any:
        try:
            return await method(request, metadata=self._metadata)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None

    async def lease_key(self, pool: str, model: str = "", *, units: int = 1,
                        priority: str = "normal", request_id: str = "",
                        ttl: float | None = None, allow_internal: bool = False) -> Lease:
        r = await self._call(self.broker.LeaseKey, _lease_request(
            pool, model, units, priority, request_id, ttl, allow_internal))
        return Lease._from_pb(r, self)

    async def renew(self, lease_id: str, ttl: float | None = None) -> _dt.datetime:
        r = await self._call(self.broker.RenewLease,
                             pb.RenewLeaseRequest(lease_id=lease_id, ttl=_duration(ttl)))
        return r.expires_at.ToDatetime(_dt.UTC)  # type: ignore[no-any-return]

    async def report_usage(self, lease_id: str, http_status: int, **fields: Any) -> Any:
        return await self._call(self.broker.ReportUsage,
                                _report_request(lease_id, http_status, **fields))

    async def complete(self, lease_id: str, used: bool = True) -> pb.CompleteResponse:
        return await self._call(self.broker.Complete,  # type: ignore[no-any-return]
                                pb.CompleteRequest(lease_id=lease_id, used=used))

    async def list_keys_page(self, pool: str = "", *, page_size: int = 0,
                             page_token: str = "") -> pb.ListKeysResponse:
        """One page of KeyAdmin.ListKeys: ``keys``, ``next_page_token`` (empty on the last
        page) and, on the first page, ``cooldowns``. ``page_size`` 0 lets the broker choose
        (1,000; at most 10,000)."""
        return await self._call(self.admin.ListKeys, pb.ListKeysRequest(  # type: ignore[no-any-return]
            pool=pool, page_size=page_size, page_token=page_token))

    async def iter_keys(self, pool: str = "", *, page_size: int = 0) -> AsyncIterator[pb.KeyInfo]:
        """Every key of KeyAdmin.ListKeys (never secrets), reading page after page."""
        token = ""
        while True:
            r = await self.list_keys_page(pool, page_size=page_size, page_token=token)
            for key in r.keys:
                yield key
            token = r.next_page_token
            if not token:
                return

    async def list_keys(self, pool: str = "") -> list[pb.KeyInfo]:
        """KeyAdmin.ListKeys: every key with usage and health (never secrets), all pages."""
        return [key async for key in self.iter_keys(pool)]

    async def cooldowns(self, pool: str = "") -> list[pb.Cooldown]:
        """KeyAdmin.ListKeys' cooldowns that are no one key's: models cooling pool-wide and
        accounts' paid-use cooldowns."""
        return list((await self.list_keys_page(pool, page_size=1)).cooldowns)

    async def get_key(self, key_id: str) -> pb.KeyInfo:
        r = await self._call(self.admin.GetKey, pb.GetKeyRequest(key_id=key_id))
        return r.key  # type: ignore[no-any-return]

    async def set_key_enabled(self, key_id: str, enabled: bool, reason: str = "") -> pb.KeyInfo:
        r = await self._call(self.admin.SetKeyEnabled, pb.SetKeyEnabledRequest(
            key_id=key_id, enabled=enabled, reason=reason))
        return r.key  # type: ignore[no-any-return]

    async def usage_page(self, days: int = 7, group_by: Sequence[str] = ("day",),
                         pool: str = "", *, page_size: int = 0,
                         page_token: str = "") -> pb.GetUsageResponse:
        """One page of KeyAdmin.GetUsage: ``rows`` and ``next_page_token`` (empty on the last
        page). ``page_size`` 0 lets the broker choose (1,000; at most lease.usage_max_rows)."""
        return await self._call(self.admin.GetUsage,  # type: ignore[no-any-return]
                                _usage_request(days, group_by, pool, page_size, page_token))

    async def iter_usage(self, days: int = 7, group_by: Sequence[str] = ("day",),
                         pool: str = "", *, page_size: int = 0) -> AsyncIterator[pb.UsageRow]:
        """Every row of KeyAdmin.GetUsage, reading page after page."""
        token = ""
        while True:
            r = await self.usage_page(days, group_by, pool, page_size=page_size,
                                      page_token=token)
            for row in r.rows:
                yield row
            token = r.next_page_token
            if not token:
                return

    async def usage(self, days: int = 7, group_by: Sequence[str] = ("day",),
                    pool: str = "") -> list[pb.UsageRow]:
        """KeyAdmin.GetUsage, all pages; ``group_by`` names: day, key, account, model,
        principal."""
        return [row async for row in self.iter_usage(days, group_by, pool)]

    async def reload_keys(self) -> pb.ReloadKeysResponse:
        return await self._call(self.admin.ReloadKeys,  # type: ignore[no-any-return]
                                pb.ReloadKeysRequest())

    @asynccontextmanager
    async def lease(self, pool: str, model: str = "", **kwargs: Any) -> AsyncIterator[Lease]:
        """Lease a key for the block; complete it on exit.

        Leaving normally completes with used=True. Leaving with an exception
        before ``lease.report()``/``mark_used()`` completes with used=False, which
        refunds the units; a cancellation cannot skip that completion, and a failure
        to complete never hides the block's own exception. An internal-route answer
        needs no completion.
        """
        lease = await self.lease_key(pool, model, **kwargs)
        if not lease.external:
            yield lease
            return
        try:
            yield lease
        except BaseException:
            with suppress(Exception):
                await _shielded(self.complete(lease.lease_id, used=lease.used))
            raise
        await _shielded(self.complete(lease.lease_id, used=True))


class KeyBrokerClient(_Base):
    """Blocking client; the same calls as AsyncKeyBrokerClient without ``await``."""

    def __init__(self, target: str, *, token: str | None = None,
                 root_certificates: bytes | str | Path | None = None,
                 client_cert: bytes | str | Path | None = None,
                 client_key: bytes | str | Path | None = None,
                 options: Sequence[tuple[str, Any]] = ()) -> None:
        super().__init__(token)
        creds = _credentials(target, root_certificates=root_certificates,
                             client_cert=client_cert, client_key=client_key)
        self._channel = (grpc.secure_channel(target, creds, options=options) if creds
                         else grpc.insecure_channel(target, options=options))
        self.broker = pb_grpc.KeyBrokerStub(self._channel)
        self.admin = pb_grpc.KeyAdminStub(self._channel)

    def __enter__(self) -> KeyBrokerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _call(self, method: Any, request: Any) -> Any:
        try:
            return method(request, metadata=self._metadata)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None

    def lease_key(self, pool: str, model: str = "", *, units: int = 1,
                  priority: str = "normal", request_id: str = "", ttl: float | None = None,
                  allow_internal: bool = False) -> Lease:
        r = self._call(self.broker.LeaseKey, _lease_request(
            pool, model, units, priority, request_id, ttl, allow_internal))
        return Lease._from_pb(r, self)

    def renew(self, lease_id: str, ttl: float | None = None) -> _dt.datetime:
        r = self._call(self.broker.RenewLease,
                       pb.RenewLeaseRequest(lease_id=lease_id, ttl=_duration(ttl)))
        return r.expires_at.ToDatetime(_dt.UTC)  # type: ignore[no-any-return]

    def report_usage(self, lease_id: str, http_status: int, **fields: Any) -> Any:
        return self._call(self.broker.ReportUsage,
                          _report_request(lease_id, http_status, **fields))

    def complete(self, lease_id: str, used: bool = True) -> pb.CompleteResponse:
        return self._call(self.broker.Complete,  # type: ignore[no-any-return]
                          pb.CompleteRequest(lease_id=lease_id, used=used))

    def list_keys_page(self, pool: str = "", *, page_size: int = 0,
                       page_token: str = "") -> pb.ListKeysResponse:
        """Like ``AsyncKeyBrokerClient.list_keys_page``, blocking."""
        return self._call(self.admin.ListKeys, pb.ListKeysRequest(  # type: ignore[no-any-return]
            pool=pool, page_size=page_size, page_token=page_token))

    def iter_keys(self, pool: str = "", *, page_size: int = 0) -> Iterator[pb.KeyInfo]:
        """Like ``AsyncKeyBrokerClient.iter_keys``, blocking."""
        token = ""
        while True:
            r = self.list_keys_page(pool, page_size=page_size, page_token=token)
            yield from r.keys
            token = r.next_page_token
            if not token:
                return

    def list_keys(self, pool: str = "") -> list[pb.KeyInfo]:
        """Like ``AsyncKeyBrokerClient.list_keys`` (all pages), blocking."""
        return list(self.iter_keys(pool))

    def cooldowns(self, pool: str = "") -> list[pb.Cooldown]:
        """Like ``AsyncKeyBrokerClient.cooldowns``, blocking."""
        return list(self.list_keys_page(pool, page_size=1).cooldowns)

    def get_key(self, key_id: str) -> pb.KeyInfo:
        return self._call(self.admin.GetKey, pb.GetKeyRequest(key_id=key_id)).key  # type: ignore[no-any-return]

    def set_key_enabled(self, key_id: str, enabled: bool, reason: str = "") -> pb.KeyInfo:
        return self._call(self.admin.SetKeyEnabled, pb.SetKeyEnabledRequest(  # type: ignore[no-any-return]
            key_id=key_id, enabled=enabled, reason=reason)).key

    def usage_page(self, days: int = 7, group_by: Sequence[str] = ("day",), pool: str = "",
                   *, page_size: int = 0, page_token: str = "") -> pb.GetUsageResponse:
        """Like ``AsyncKeyBrokerClient.usage_page``, blocking."""
        return self._call(self.admin.GetUsage,  # type: ignore[no-any-return]
                          _usage_request(days, group_by, pool, page_size, page_token))

    def iter_usage(self, days: int = 7, group_by: Sequence[str] = ("day",), pool: str = "",
                   *, page_size: int = 0) -> Iterator[pb.UsageRow]:
        """Like ``AsyncKeyBrokerClient.iter_usage``, blocking."""
        token = ""
        while True:
            r = self.usage_page(days, group_by, pool, page_size=page_size, page_token=token)
            yield from r.rows
            token = r.next_page_token
            if not token:
                return

    def usage(self, days: int = 7, group_by: Sequence[str] = ("day",),
              pool: str = "") -> list[pb.UsageRow]:
        """Like ``AsyncKeyBrokerClient.usage`` (all pages), blocking."""
        return list(self.iter_usage(days, group_by, pool))

    def reload_keys(self) -> pb.ReloadKeysResponse:
        return self._call(self.admin.ReloadKeys, pb.ReloadKeysRequest())  # type: ignore[no-any-return]

    @contextmanager
    def lease(self, pool: str, model: str = "", **kwargs: Any) -> Iterator[Lease]:
        """Like ``AsyncKeyBrokerClient.lease``, blocking."""
        lease = self.lease_key(pool, model, **kwargs)
        if not lease.external:
            yield lease
            return
        try:
            yield lease
        except BaseException:
            with suppress(Exception):
                self.complete(lease.lease_id, used=lease.used)
            raise
        self.complete(lease.lease_id, used=True)
