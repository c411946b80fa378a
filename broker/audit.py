"""The audit trail: one structured record per decision, fanned out to sinks.

Every record goes to structlog (event name ``<subject>.<decision>``, ``audit=true``)
and to each sink: the current span (telemetry), the metrics, and optionally an
append-only JSON-lines file that ``keybroker audit`` filters.
"""

from __future__ import annotations

import enum
import json
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TextIO

import structlog

from .telemetry import trace_ids

__all__ = ["LEASE_DECISIONS", "Audit", "AuditEvent", "AuditFile", "Sink"]


class AuditEvent(enum.StrEnum):
    """Every audited event; the value is the event name written to logs and audit files."""

    LEASE_GRANTED = "lease.granted"
    LEASE_INTERNAL = "lease.internal"  # no key: routed to the caller's own model
    LEASE_EXHAUSTED = "lease.exhausted"
    LEASE_RENEWED = "lease.renewed"
    LEASE_REPORTED = "lease.reported"
    LEASE_COMPLETED = "lease.completed"
    LEASE_EXPIRED = "lease.expired"
    KEY_HEALTH = "key.health"
    KEY_ENABLED = "key.enabled"
    KEY_DISABLED = "key.disabled"
    KEY_COOLDOWN_CLEARED = "key.cooldown_cleared"
    KEY_PROVISIONED = "key.provisioned"
    KEY_ROTATION_STEP = "key.rotation_step"
    KEY_ROTATED = "key.rotated"
    KEY_ROTATION_FAILED = "key.rotation_failed"
    KEY_REVOKED = "key.revoked"
    KEY_ORPHAN_DELETED = "key.orphan_deleted"
    KEYS_RELOADED = "keys.reloaded"
    KEYS_MASS_REMOVAL = "keys.mass_removal"
    QUOTA_RECONCILED = "quota.reconciled"
    RPC_DENIED = "rpc.denied"

    @property
    def is_lease(self) -> bool:
        """An event about one lease (``lease.*``)."""
        return self.value.startswith("lease.")

    @property
    def is_call_outcome(self) -> bool:
        """The outcome of one call (a lease decision or a denial): its fields describe it."""
        return self.is_lease or self is AuditEvent.RPC_DENIED


LEASE_DECISIONS = frozenset(e for e in AuditEvent if e.is_lease) - {AuditEvent.LEASE_REPORTED}
"""Events that decide a lease's fate (counted by ``keybroker_leases``)."""

Sink = Callable[[AuditEvent, Mapping[str, Any]], None]


class Audit:
    """Records who (principal), which RPC, pool, key_id (never the secret), decision,
    reason and remaining quota, plus whatever the caller adds."""

    def __init__(self, logger: Any = None, sinks: Iterable[Sink] = ()) -> None:
        self._log = logger if logger is not None else structlog.get_logger("keybroker.audit")
        self._sinks = list(sinks)

    def add_sink(self, sink: Sink) -> None:
        self._sinks.append(sink)

    def record(self, event: AuditEvent, *, decision: str, principal: str = "", rpc: str = "",
               pool: str = "", key_id: str = "", reason: str = "",
               **fields: Any) -> None:
        record = {"decision": decision, "principal": principal, "rpc": rpc, "pool": pool,
                  "key_id": key_id, "reason": reason, **fields}
        self._log.info(event, audit=True, **record)
        for sink in self._sinks:
            sink(event, record)


class AuditFile:
    """An audit sink appending one JSON object per line (flushed per record)."""

    def __init__(self, path: str | Path) -> None:
        self._fh: TextIO = Path(path).open("a", encoding="utf-8")  # noqa: SIM115 - held open
        self._lock = threading.Lock()

    def __call__(self, event: AuditEvent, fields: Mapping[str, Any]) -> None:
        line = json.dumps({"ts": time.time(), "event": event, **trace_ids(), **fields},
                          default=str, sort_keys=True)
        with self._lock:
            self._fh.write(line + "\n")
            self._fh.flush()

    def close(self) -> None:
        with self._lock:
            self._fh.close()
