"""OpenTelemetry: tracer provider from the standard OTEL_* variables, a span per RPC,
decision attributes on it, child spans around store and Vault calls.

Nothing here touches global state on import. ``build_tracer_provider`` returns a
provider for the composition root to inject; tests and ``Broker.stop`` shut it
down so buffered spans are exported before the process exits.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import grpc
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import Status, StatusCode

if TYPE_CHECKING:
    from .audit import AuditEvent  # audit imports this module

__all__ = ["SpanSink", "TracedStore", "build_tracer_provider", "export_otlp",
           "record_status", "trace_ids"]

# Server-side codes that mean the broker failed (OTel semantic conventions for gRPC servers);
# others (RESOURCE_EXHAUSTED, PERMISSION_DENIED, ...) are expected outcomes, not span errors.
_SERVER_ERRORS = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.DEADLINE_EXCEEDED,
                  grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.INTERNAL,
                  grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DATA_LOSS}
_SENSITIVE = ("api_key", "secret", "token", "authorization")


def build_tracer_provider(env: Mapping[str, str] | None = None, *,
                          export: bool = True) -> TracerProvider | None:
    """A provider exporting over OTLP/gRPC when OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT is set.

    Service name, sampler, headers and timeouts come from the standard OTEL_*
    variables, read by the SDK and the exporter themselves. OTEL_SDK_DISABLED=true
    turns tracing off. ``export=False`` leaves the exporter out (its batch thread starts
    with it): the broker's wiring builds the provider and its runtime calls
    `export_otlp` when it starts.
    """
    env = os.environ if env is None else env
    if env.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return None
    if not (env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")):
        return None
    resource = Resource.create({"service.name": env.get("OTEL_SERVICE_NAME", "keybroker")})
    provider = TracerProvider(resource=resource)
    if export:
        export_otlp(provider)
    return provider


def export_otlp(provider: TracerProvider) -> Any:
    """Export ``provider``'s spans over OTLP/gRPC in batches (starts the batch thread);
    returns the exporter (whose ``shutdown`` cuts short retries to an unreachable collector).

    The exporter reports failures through the standard ``logging`` module, which
    `broker.logging.configure_logging` routes into the structured log."""
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    exporter = OTLPSpanExporter()
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return exporter


def trace_ids() -> dict[str, str]:
    """trace_id and span_id of the current span (empty when there is none)."""
    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return {}
    return {"trace_id": format(ctx.trace_id, "032x"), "span_id": format(ctx.span_id, "016x")}


def record_status(code: grpc.StatusCode, message: str) -> None:
    """Put the status code sent with abort_with_status on the RPC's span (the grpc
    instrumentation only sees abort() and set_code())."""
    span = trace.get_current_span()
    span.set_attribute("rpc.grpc.status_code", code.value[0])
    if code in _SERVER_ERRORS:
        span.set_status(Status(StatusCode.ERROR, f"{code.name}: {message}"))


def _attribute(value: Any) -> Any:
    if isinstance(value, bool | int | float | str):
        return value
    return str(value)


class SpanSink:
    """An audit sink: each decision becomes an event on the current span, and the lease
    decision's fields become ``keybroker.*`` attributes of it."""

    def __call__(self, event: AuditEvent, fields: Mapping[str, Any]) -> None:
        span = trace.get_current_span()
        if not span.is_recording():
            return
        attrs = {f"keybroker.{k}": _attribute(v) for k, v in fields.items()
                 if v not in (None, "") and not any(s in k for s in _SENSITIVE)}
        span.add_event(event, attrs)
        if event.is_call_outcome:
            span.set_attributes(attrs)


class TracedStore:
    """Wraps a StateStore: every call is a child span ``store.<method>``."""

    def __init__(self, inner: Any, tracer: trace.Tracer, backend: str,
                 on_error: Callable[[str], None] | None = None) -> None:
        self._inner = inner
        self._tracer = tracer
        self._backend = backend
        self._on_error = on_error

    def __getattr__(self, name: str) -> Any:
        target = getattr(self._inner, name)
        if not callable(target) or name.startswith("_"):
            return target

        async def call(*args: Any, **kwargs: Any) -> Any:
            with self._tracer.start_as_current_span(
                    f"store.{name}", attributes={"db.system": self._backend}):
                try:
                    return await target(*args, **kwargs)
                except Exception:
                    if self._on_error is not None:
                        self._on_error(self._backend)
                    raise

        return call
