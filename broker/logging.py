"""structlog configuration, done once by the CLI (never on import)."""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog

__all__ = ["configure_logging"]


def _add_trace_ids(logger: Any, method: str,
                   event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """trace_id/span_id of the current span, so logs and Jaeger traces join up."""
    # While OpenTelemetry is not even imported (CLI commands) no span can be current: do not
    # import it (and gRPC with it) just to find that out.
    if "opentelemetry.trace" in sys.modules:
        from .telemetry import trace_ids

        event.update(trace_ids())
    return event


def configure_logging(level: str = "info", fmt: str = "json", stream: TextIO | None = None) -> None:
    """JSON (or console) lines with ISO timestamps and the bound per-RPC context."""
    renderer: Any = (structlog.processors.JSONRenderer() if fmt == "json"
                     else structlog.dev.ConsoleRenderer(colors=False))
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            _add_trace_ids,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=structlog.PrintLoggerFactory(stream or sys.stdout),
        cache_logger_on_first_use=False,
    )
