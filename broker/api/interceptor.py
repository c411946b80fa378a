"""One server interceptor for every keybroker RPC: authenticate, bind log context,
translate domain errors to status (``errors.STATUS_TABLE``), audit denials."""

from __future__ import annotations

import contextvars
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import structlog

from ..audit import Audit, AuditEvent
from ..auth import Policy, Principal, parse_bearer
from ..errors import BrokerError, InvalidArgument, PermissionDenied, Unauthenticated
from ..metrics import Metrics, child
from ..telemetry import record_status
from .errors import internal_status, to_status

__all__ = ["BrokerInterceptor", "current_caller"]

_CALLER: contextvars.ContextVar[Principal] = contextvars.ContextVar("keybroker_caller")
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
    """Wraps keybroker.v1 unary handlers; other services (health, reflection) pass through."""

    def __init__(self, policy: Callable[[], Policy], audit: Audit,
                 metrics: Metrics | None = None, now: Callable[[], float] | None = None) -> None:
        self._policy = policy
        self._now = now  # tokens' not_before/not_after are judged by the broker's clock
        self._audit = audit
        self._metrics = metrics
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
        if handler is None or handler.unary_unary is None:
            return handler
        wrapped = grpc.unary_unary_rpc_method_handler(
            self._wrap(method.rsplit("/", 1)[1], handler.unary_unary),
            request_deserializer=_lenient(handler.request_deserializer, method),
            response_serializer=handler.response_serializer,
        )
        self._wrapped[method] = wrapped
        return wrapped

    def _wrap(self, rpc: str, inner: Callable[[Any, Any], Awaitable[Any]]
              ) -> Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]:
        async def handle(request: Any, context: grpc.aio.ServicerContext) -> Any:
            structlog.contextvars.clear_contextvars()
            structlog.contextvars.bind_contextvars(rpc=rpc)
            principal = ""
            code = grpc.StatusCode.OK
            started = time.perf_counter()
            try:
                caller = _authenticate(self._policy(), context,
                                       self._now() if self._now is not None else None)
                principal = caller.name
                structlog.contextvars.bind_contextvars(principal=principal)
                _CALLER.set(caller)
                if isinstance(request, _Undecodable):
                    raise InvalidArgument("request", request.message)
                return await inner(request, context)
            except BrokerError as exc:
                status = to_status(exc)
                code = status.code
                if isinstance(exc, Unauthenticated | PermissionDenied):
                    self._audit.record(AuditEvent.RPC_DENIED, decision="denied",
                                       principal=principal, rpc=rpc, reason=exc.message,
                                       pool=getattr(request, "pool", ""), code=code.name)
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
                structlog.contextvars.clear_contextvars()

        return handle
