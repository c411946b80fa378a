"""One server interceptor for every keybroker RPC: authenticate, bind log context,
translate domain errors to status (``errors.STATUS_TABLE``), audit denials.

Every ``keybroker.v1`` method is authenticated whatever its kind (unary or streaming).
Denials are counted one by one (``keybroker_rpc_denied``) but audited as a sample: at
most ``DENIAL_RECORDS_PER_SECOND`` records per second per (rpc, status), the next
record carrying how many were left out (``suppressed``), so callers without a token
cannot fill the disk. Request fields are validated before they are written: an
invalid ``pool`` is recorded as ``<invalid>``.
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import structlog

from ..audit import Audit, AuditEvent
from ..auth import Policy, Principal, parse_bearer
from ..clock import Clock, SystemClock
from ..errors import BrokerError, InvalidArgument, PermissionDenied, Unauthenticated
from ..metrics import Metrics, child
from ..telemetry import record_status
from ..validate import check_name
from .errors import internal_status, to_status

__all__ = ["DENIAL_RECORDS_PER_SECOND", "BrokerInterceptor", "DenialSampler",
           "current_caller"]

DENIAL_RECORDS_PER_SECOND = 10
"""Most denial audit records (and log lines) per second per (rpc, status code)."""

_CALLER: contextvars.ContextVar[Principal] = contextvars.ContextVar("keybroker_caller")
_bind = structlog.contextvars.bind_contextvars
_PREFIX = "/keybroker.v1."
log = structlog.get_logger("keybroker.api")


class _Undecodable:
    """What a request body that does not parse as the request message becomes: the
    interceptor answers it (after authenticating) with INVALID_ARGUMENT, never UNKNOWN."""

    __slots__ = ("message",)

    def __init__(self, message: str) -> None:
        self.message = message


def _lenient(deserializer: Callable[[bytes], Any] | None, method: str
             ) -> Callable[[bytes], Any] | None:
    """``deserializer`` that returns an `_Undecodable` instead of raising (grpc.aio decodes
    before any handler runs, and would answer a decode error with UNKNOWN)."""
    if deserializer is None:
        return None
    message = method.rsplit("/", 1)[-1] + "Request"

    def decode(body: bytes) -> Any:
        try:
            return deserializer(body)
        except Exception:  # DecodeError, bad UTF-8, anything the parser throws
            return _Undecodable(f"the request body is not a valid {message} message")

    return decode


def current_caller() -> Principal:
    """The principal of the RPC being served (set by the interceptor)."""
    return _CALLER.get()


def _safe_pool(request: Any) -> str:
    """The request's pool when it is a valid name, else ``<invalid>`` (never raw bytes)."""
    pool = getattr(request, "pool", "")
    if not isinstance(pool, str):
        return ""
    try:
        return check_name("pool", pool, required=False)
    except InvalidArgument:
        return "<invalid>"


class DenialSampler:
    """At most ``per_second`` records per second for each reason; counts the rest.

    ``admit(reason)`` returns None when this denial is not to be recorded, else the
    number of denials of that reason left out since the last record.
    """

    def __init__(self, clock: Clock, per_second: int = DENIAL_RECORDS_PER_SECOND) -> None:
        self._clock = clock
        self._per_second = per_second
        self._windows: dict[tuple[str, ...], list[int]] = {}  # reason -> [second, used, skipped]

    def admit(self, *reason: str) -> int | None:
        second = int(self._clock.now())
        window = self._windows.get(reason)
        if window is None:
            if len(self._windows) > 1024:  # reasons are (rpc, code): few; never grow unbounded
                self._windows.clear()
            window = self._windows[reason] = [second, 0, 0]
        if window[0] != second:
            window[0], window[1] = second, 0
        if window[1] >= self._per_second:
            window[2] += 1
            return None
        window[1] += 1
        skipped, window[2] = window[2], 0
        return skipped


def _authenticate(policy: Policy, context: grpc.aio.ServicerContext,
                  now: float | None) -> Principal:
    header = None
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":
            header = value if isinstance(value, str) else value.decode("latin-1")
            break
    token = parse_bearer(header)
    if token is not None:
        return policy.by_token(token, now)
    auth = context.auth_context() or {}
    names = auth.get("x509_common_name") or []
    if names:
        return policy.by_certificate(names[0].decode("utf-8", "replace"))
    raise Unauthenticated("no credentials: send 'authorization: Bearer <token>' or a client "
                          "certificate")


class BrokerInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Wraps every keybroker.v1 handler (unary or streaming); other services (health,
    reflection) pass through."""

    def __init__(self, policy: Callable[[], Policy], audit: Audit,
                 metrics: Metrics | None = None, clock: Clock | None = None) -> None:
        self._policy = policy
        self._clock = clock or SystemClock()  # tokens' not_before/not_after are judged by it
        self._audit = audit
        self._metrics = metrics
        self._denials = DenialSampler(self._clock)
        self._denied: dict[tuple[str, ...], Any] = {}  # rpc_denied children
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}
        self._latency: dict[tuple[str, ...], Any] = {}  # rpc_latency children

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = details.method
        if not method.startswith(_PREFIX):
            return await continuation(details)
        cached = self._wrapped.get(method)
        if cached is not None:
            return cached
        handler = await continuation(details)
        if handler is None:
            return handler
        rpc = method.rsplit("/", 1)[1]
        codec = {"request_deserializer": _lenient(handler.request_deserializer, method),
                 "response_serializer": handler.response_serializer}
        if handler.unary_unary is not None:
            wrapped = grpc.unary_unary_rpc_method_handler(
                self._wrap(rpc, handler.unary_unary), **codec)
        elif handler.unary_stream is not None:
            wrapped = grpc.unary_stream_rpc_method_handler(
                self._wrap_stream(rpc, handler.unary_stream), **codec)
        elif handler.stream_unary is not None:
            wrapped = grpc.stream_unary_rpc_method_handler(
                self._wrap(rpc, handler.stream_unary), **codec)
        else:
            wrapped = grpc.stream_stream_rpc_method_handler(
                self._wrap_stream(rpc, handler.stream_stream), **codec)
        self._wrapped[method] = wrapped
        return wrapped

    def _deny(self, rpc: str, exc: BrokerError, code: grpc.StatusCode, principal: str,
              request: Any) -> None:
        """Count every denial; audit (and so log) a sample of them."""
        if self._metrics is not None:
            child(self._denied, self._metrics.rpc_denied, rpc, code.name).inc()
        skipped = self._denials.admit(rpc, code.name)
        if skipped is None:
            return
        extra: dict[str, Any] = {"suppressed": skipped} if skipped else {}
        self._audit.record(AuditEvent.RPC_DENIED, decision="denied", principal=principal,
                           rpc=rpc, reason=exc.message, pool=_safe_pool(request),
                           code=code.name, **extra)

    def _wrap_stream(self, rpc: str, inner: Callable[[Any, Any], Any]
                     ) -> Callable[[Any, grpc.aio.ServicerContext], Any]:
        """A streaming handler: authenticate before the first message is produced."""
        async def handle(request: Any, context: grpc.aio.ServicerContext) -> Any:
            structlog.contextvars.clear_contextvars()
            structlog.contextvars.bind_contextvars(rpc=rpc)
            try:
                caller = _authenticate(self._policy(), context, self._clock.now())
            except BrokerError as exc:
                status = to_status(exc)
                self._deny(rpc, exc, status.code, "", request)
                record_status(status.code, exc.message)
                await context.abort_with_status(status)
                return
            structlog.contextvars.bind_contextvars(principal=caller.name)
            _CALLER.set(caller)
            async for item in inner(request, context):
                yield item

        return handle

    def _wrap(self, rpc: str, inner: Callable[[Any, Any], Awaitable[Any]]
              ) -> Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]:
        async def handle(request: Any, context: grpc.aio.ServicerContext) -> Any:
            # grpc.aio runs each RPC in a task of its own, so what is bound here ends with it;
            # ``...`` is structlog's "unbound" (a principal left from elsewhere is not shown).
            _bind(rpc=rpc, principal=...)
            principal = ""
            code = grpc.StatusCode.OK
            started = time.perf_counter()
            try:
                caller = _authenticate(self._policy(), context, self._clock.now())
                principal = caller.name
                _bind(principal=principal)
                _CALLER.set(caller)
                if isinstance(request, _Undecodable):
                    raise InvalidArgument("request", request.message)
                return await inner(request, context)
            except BrokerError as exc:
                status = to_status(exc)
                code = status.code
                if isinstance(exc, Unauthenticated | PermissionDenied):
                    self._deny(rpc, exc, code, principal, request)
                if self._metrics is not None:
                    self._metrics.count_backend_error(exc)
                record_status(code, exc.message)
                await context.abort_with_status(status)
            except Exception:
                log.exception("rpc.failed")
                code = grpc.StatusCode.INTERNAL
                record_status(code, "internal error")
                await context.abort_with_status(internal_status())
            finally:
                if self._metrics is not None:
                    child(self._latency, self._metrics.rpc_latency, rpc, code.name).observe(
                        time.perf_counter() - started)

        return handle
