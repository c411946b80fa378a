"""structlog configuration, done once by the CLI (never on import)."""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable, MutableMapping
from typing import Any, TextIO

import orjson
import structlog

__all__ = ["Throttle", "configure_logging"]


def _add_trace_ids(logger: Any, method: str,
                   event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """trace_id/span_id of the current span, so logs and Jaeger traces join up."""
    # While OpenTelemetry is not even imported (CLI commands) no span can be current: do not
    # import it (and gRPC with it) just to find that out.
    if "opentelemetry.trace" in sys.modules:
        from .telemetry import trace_ids

        event.update(trace_ids())
    return event


class Throttle:
    """One log event for a recurring failure: the first occurrence at once, then at most one
    summary line per ``every`` seconds with how often it repeated (``repeated``); `clear`
    after a success so the next failure is logged at once again."""

    def __init__(self, logger: Any, event: str, *, level: str = "warning", every: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._log = logger
        self._event = event
        self._level = level
        self._every = every
        self._clock = clock
        self._next: float | None = None
        self._repeated = 0

    def __call__(self, **fields: Any) -> None:
        now = self._clock()
        if self._next is not None and now < self._next:
            self._repeated += 1
            return
        if self._next is not None:
            fields = {**fields, "repeated": self._repeated, "summary_seconds": self._every}
        getattr(self._log, self._level)(self._event, **fields)
        self._next, self._repeated = now + self._every, 0

    def clear(self) -> None:
        self._next, self._repeated = None, 0


# Dataclasses and datetimes go to ``default`` (their repr or str), never field by field: a
# dataclass's repr may hide a secret field (``field(repr=False)``) orjson would show.
_PASSTHROUGH = orjson.OPT_PASSTHROUGH_DATACLASS | orjson.OPT_PASSTHROUGH_DATETIME


def json_line(obj: Any, default: Callable[[Any], Any] | None = None, *,
              sort_keys: bool = False) -> bytes:
    """``obj`` as one compact ASCII JSON line: orjson, and json.dumps for what orjson refuses
    (an integer beyond 64 bits, a non-str key) and for non-ASCII text (escaped to ASCII, as
    json.dumps does). Used for every audit line and JSON log line."""
    try:
        option = _PASSTHROUGH | (orjson.OPT_SORT_KEYS if sort_keys else 0)
        line = orjson.dumps(obj, default=default, option=option)
        if line.isascii():  # orjson writes UTF-8; lines stay ASCII (\uXXXX), as they were
            return line
    except TypeError:  # orjson.JSONEncodeError
        pass
    return json.dumps(obj, default=default, sort_keys=sort_keys,
                      separators=(",", ":")).encode()


def _json_line(event: Any, **kw: Any) -> str:
    """structlog's JSONRenderer serializer (keys in the order bound)."""
    return json_line(event, kw.get("default")).decode()


class _ToStructlog(logging.Handler):
    """Standard-library log records (the OTLP exporter's, grpc's) as structlog events, so the
    JSON log holds nothing but JSON."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:  # a library's bad format string must not break logging
            message = str(record.msg)
        level = record.levelname.lower()
        logger = structlog.get_logger(record.name)
        getattr(logger, level if level in ("debug", "info", "warning", "error", "critical")
                else "warning")("library.log", message=message, logger=record.name)


def configure_logging(level: str = "info", fmt: str = "json", stream: TextIO | None = None,
                      *, worker: int = 0) -> None:
    """JSON (or console) lines with ISO timestamps and the bound per-RPC context; with
    ``worker`` (a worker of ``serve --workers``) every line says ``worker``."""
    renderer: Any = (structlog.processors.JSONRenderer(serializer=_json_line) if fmt == "json"
                     else structlog.dev.ConsoleRenderer(colors=False))

    def add_worker(_logger: Any, _name: str, event: dict[str, Any]) -> dict[str, Any]:
        event.setdefault("worker", worker)
        return event

    structlog.configure(
        processors=[
            *((add_worker,) if worker else ()),
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
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, _ToStructlog):
            root.removeHandler(handler)
    root.addHandler(_ToStructlog())
    # Libraries speak at warning and worse only: their info is noise in the broker's log.
    root.setLevel(max(logging.WARNING, logging.getLevelNamesMapping()[level.upper()]))
