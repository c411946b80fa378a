"""The audit trail: one structured record per decision, fanned out to sinks.

Every record goes to structlog (event name ``<subject>.<decision>``, ``audit=true``)
and to each sink: the current span (telemetry), the metrics, and optionally an
append-only JSON-lines file that ``keybroker audit`` filters.

The file is a hash chain: each line carries ``seq`` (1, 2, ... over the whole trail) and
``prev``, the SHA-256 (hex) of the line before it as written (bytes, without the newline), so
altering, removing or reordering a line breaks the chain at that place (``keybroker audit
verify`` tells which from ``seq``). The first line of a new trail has ``seq`` 1 and ``prev``
= 64 zeros. Rotation continues the chain: when the file grows past
``audit_rotate_bytes`` the broker renames it ``FILE.N`` (the next free N from 1) and starts a
new ``FILE`` whose first ``prev`` is the hash of the old file's last line; a broker that starts
on an existing trail continues from its last line. Every ``audit_checkpoint_seconds`` the
broker appends an ``audit.checkpoint`` record whose ``hmac`` is Vault Transit's HMAC of the
chain head (the ``prev`` it carries): without Vault's key nobody can rewrite the chain up to
a checkpoint and make it verify.
"""

from __future__ import annotations

import enum
import hashlib
import json
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

import structlog

from .logging import json_line
from .telemetry import trace_ids

__all__ = ["GENESIS", "LEASE_DECISIONS", "MAX_FIELD_CHARS", "Audit", "AuditEvent", "AuditFile",
           "ChainBreak", "Checkpoint", "Sink", "clip", "line_hash", "rfc3339", "rotated_files",
           "verify_chain"]

GENESIS = "0" * 64
"""The ``prev`` of the first line of a trail."""

MAX_FIELD_CHARS = 256
"""Longest string an audit field keeps; longer ones are cut and say by how much."""


def clip(value: Any) -> Any:
    """``value``, with a string longer than MAX_FIELD_CHARS cut to it (and marked)."""
    if isinstance(value, str) and len(value) > MAX_FIELD_CHARS:
        return f"{value[:MAX_FIELD_CHARS]}...(+{len(value) - MAX_FIELD_CHARS} chars)"
    if isinstance(value, bytes):
        return clip(value.decode("utf-8", "replace"))
    return value


class AuditEvent(enum.StrEnum):
    """Every audited event; the value is the event name written to logs and audit files."""

    LEASE_GRANTED = "lease.granted"
    LEASE_REPLAYED = "lease.replayed"  # a request_id retry answered with its granted lease
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
    KEY_LEASES_ENDED = "key.leases_ended"  # a revoked key's active leases, ended (count)
    KEY_ORPHAN_DELETED = "key.orphan_deleted"
    KEYS_RELOADED = "keys.reloaded"
    KEYS_MASS_REMOVAL = "keys.mass_removal"
    QUOTA_RECONCILED = "quota.reconciled"
    RPC_DENIED = "rpc.denied"
    AUDIT_CHECKPOINT = "audit.checkpoint"  # the chain head, HMAC'd by Vault Transit

    @property
    def is_lease(self) -> bool:
        """An event about one lease (``lease.*``)."""
        return self.value.startswith("lease.")

    @property
    def is_call_outcome(self) -> bool:
        """The outcome of one call (a lease decision or a denial): its fields describe it."""
        return self.is_lease or self is AuditEvent.RPC_DENIED


LEASE_DECISIONS = frozenset(e for e in AuditEvent if e.is_lease) - {
    AuditEvent.LEASE_REPORTED, AuditEvent.LEASE_REPLAYED}
"""Events that decide a lease's fate (counted by ``keybroker_leases``; a replay hands out a
lease already counted)."""

Sink = Callable[[AuditEvent, Mapping[str, Any]], None]
_PLAIN = frozenset({int, float, bool, type(None)})  # field types clip() leaves alone


class Audit:
    """Records who (principal), which RPC, pool, key_id (never the secret), decision,
    reason and remaining quota, plus whatever the caller adds."""

    def __init__(self, logger: Any = None, sinks: Iterable[Sink] = ()) -> None:
        self._logger = logger
        self._bound: Any = None  # structlog's logger bound once per configuration
        self._bound_for: tuple[Any, ...] = ()
        self._sinks = list(sinks)

    def _log(self) -> Any:
        """The logger to write records to: ``logger`` if given, else structlog's
        ``keybroker.audit`` bound once and bound again whenever structlog is configured anew
        (a lazy logger would build a new bound logger on every record)."""
        if self._logger is not None:
            return self._logger
        config = structlog.get_config()
        key = (config["processors"], config["logger_factory"], config["wrapper_class"],
               config["context_class"])
        if self._bound is None or any(a is not b for a, b in zip(key, self._bound_for,
                                                                  strict=True)):
            self._bound = structlog.get_logger("keybroker.audit").bind()
            self._bound_for = key
        return self._bound

    def add_sink(self, sink: Sink) -> None:
        self._sinks.append(sink)

    def record(self, event: AuditEvent, *, decision: str, principal: str = "", rpc: str = "",
               pool: str = "", key_id: str = "", reason: str = "",
               **fields: Any) -> None:
        if not pool and "/" in key_id:  # a key id is <pool>/<name>: say the pool too
            pool = key_id.partition("/")[0]
        # Every field is clipped before any sink sees it: a caller-chosen string (a pool, a
        # model, an error type) cannot make one record large.
        record = {"decision": decision, "principal": principal, "rpc": rpc, "pool": pool,
                  "key_id": key_id, "reason": reason, **fields}
        for k, v in record.items():
            if (type(v) is str and len(v) <= MAX_FIELD_CHARS) or type(v) in _PLAIN:
                continue  # nothing to clip (most fields): no copy
            record = {k: clip(v) for k, v in record.items()}
            break
        self._log().info(event, audit=True, **record)
        for sink in self._sinks:
            sink(event, record)


_SECOND: list[Any] = [None, ""]  # [a whole second (int), its "YYYY-MM-DDTHH:MM:SS"]


def rfc3339(when: datetime | None = None) -> str:
    """``when`` (default: now) as RFC 3339 UTC with milliseconds: 2026-11-27T10:00:00.000Z."""
    if when is None:  # every audit line: format the second once, then only the milliseconds
        ms = int(time.time() * 1000)
        second, frac = divmod(ms, 1000)
        cached = _SECOND
        if cached[0] != second:
            cached[1], cached[0] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)), second
        return f"{cached[1]}.{frac:03d}Z"
    when = when.astimezone(UTC)
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def dumps(record: Mapping[str, Any]) -> bytes:
    """``record`` as one compact ASCII JSON line, keys sorted, what is not JSON as its str."""
    return json_line(record, str, sort_keys=True)


def line_hash(line: bytes) -> str:
    """The chain hash of one audit line as written (without its newline)."""
    return hashlib.sha256(line).hexdigest()


def rotated_files(path: str | Path) -> list[Path]:
    """The rotated files of ``path`` (``path.1``, ``path.2``, ...), oldest first."""
    path = Path(path)
    found = []
    for p in path.parent.glob(path.name + ".*"):
        suffix = p.name[len(path.name) + 1:]
        if suffix.isdigit():
            found.append((int(suffix), p))
    return [p for _, p in sorted(found)]


def _last_line(path: Path) -> bytes | None:
    """The last non-empty line of a file (None: no file or no line), read from the end."""
    try:
        fh = path.open("rb")
    except FileNotFoundError:
        return None
    with fh:
        end = fh.seek(0, os.SEEK_END)
        block, data = 4096, b""
        while end > 0:
            start = max(0, end - block)
            fh.seek(start)
            data = fh.read(end - start) + data
            end = start
            lines = data.rstrip(b"\n").split(b"\n")
            if len(lines) > 1 or start == 0:
                return lines[-1] if lines[-1] else None
    return None


def _seq_of(line: bytes) -> int:
    """The ``seq`` of a trail's last line (0 when it has none: a trail from before chaining,
    whose records the chain then follows)."""
    try:
        seq = json.loads(line).get("seq", 0)
    except (ValueError, AttributeError):
        return 0
    return seq if isinstance(seq, int) else 0


def _open_private(path: Path) -> BinaryIO:
    """``path`` for appending, created 0600: audit records name principals, keys and pools."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    return os.fdopen(fd, "ab")


class AuditFile:
    """An audit sink appending one hash-chained JSON object per line (flushed per record).

    Args:
        path: the trail's file.
        rotate_bytes: rename the file ``path.N`` and start a new one once it is this large
            (0: never).
    """

    def __init__(self, path: str | Path, rotate_bytes: int = 0) -> None:
        self._path = Path(path)
        self._rotate = rotate_bytes
        self._lock = threading.Lock()
        last = _last_line(self._path)
        if last is None:
            earlier = rotated_files(self._path)
            last = _last_line(earlier[-1]) if earlier else None
        self._head = GENESIS if last is None else line_hash(last)
        self._seq = _seq_of(last) if last is not None else 0
        self._fh: BinaryIO = _open_private(self._path)
        self._size = self._fh.tell()
        self._written = 0  # records since the last checkpoint

    @property
    def head(self) -> str:
        """The hash of the last line written: what the next line's ``prev`` will be."""
        return self._head

    @property
    def pending(self) -> int:
        """Records written since the last checkpoint."""
        return self._written

    def __call__(self, event: AuditEvent, fields: Mapping[str, Any]) -> None:
        self._append({"ts": rfc3339(), "event": event, **trace_ids(), **fields})

    def checkpoint(self, head: str, hmac: str) -> bool:
        """Append a checkpoint: ``hmac`` is the key holder's HMAC of ``head``, which must be
        the chain head still (else a record came between; the next checkpoint covers it).
        Returns whether it was written."""
        with self._lock:
            if head != self._head:
                return False
            self._append_locked({"ts": rfc3339(), "event": AuditEvent.AUDIT_CHECKPOINT,
                                 "hmac": hmac, "records": self._written}, checkpoint=True)
            return True

    def _append(self, record: dict[str, Any]) -> None:
        with self._lock:
            self._append_locked(record)

    def _append_locked(self, record: dict[str, Any], checkpoint: bool = False) -> None:
        record["prev"], record["seq"] = self._head, self._seq + 1
        line = dumps(record)
        if self._rotate and self._size and self._size + len(line) + 1 > self._rotate:
            self._rotate_locked()
        self._fh.write(line + b"\n")
        self._fh.flush()
        self._head = line_hash(line)
        self._seq += 1
        self._size += len(line) + 1
        self._written = 0 if checkpoint else self._written + 1

    def _rotate_locked(self) -> None:
        self._fh.close()
        done = rotated_files(self._path)
        n = int(done[-1].name.rsplit(".", 1)[1]) + 1 if done else 1
        self._path.rename(self._path.with_name(f"{self._path.name}.{n}"))
        self._fh = _open_private(self._path)
        self._size = 0

    def close(self) -> None:
        with self._lock:
            self._fh.close()


@dataclass(frozen=True)
class ChainBreak:
    """The first place a trail does not verify: file, 1-based line, and why."""

    file: str
    line: int
    problem: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.problem}"


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint record met while verifying: where, the head it covers, its HMAC."""

    file: str
    line: int
    head: str
    hmac: str


def _lines(files: Sequence[str | Path]) -> Iterator[tuple[str, int, bytes]]:
    for f in files:
        with Path(f).open("rb") as fh:
            for n, raw in enumerate(fh, 1):
                yield str(f), n, raw.rstrip(b"\n")


def _find_seq(lines: Iterator[tuple[str, int, bytes]], seq: int) -> str:
    """Where the record numbered ``seq`` is among the rest of ``lines`` ("": nowhere)."""
    for name, n, line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("seq") == seq:
            return f"{name}:{n}"
    return ""


def _check(line: bytes, expected: str | None, last_seq: int | None, before: str) -> str | None:
    """What is wrong with one line given the line before (None: it follows); a problem
    starting with ``^`` is the line before's."""
    try:
        record = json.loads(line)
    except ValueError:
        return "not a JSON record: altered"
    if (not isinstance(record, dict) or not isinstance(record.get("prev"), str)
            or not isinstance(record.get("seq"), int)):
        return "no `prev` and `seq`: not a chained record, or altered"
    prev, seq = record["prev"], record["seq"]
    if last_seq is not None and seq != last_seq + 1:
        if not before and last_seq == 0:
            return (f"does not begin the trail (its first record is {seq}): older files were "
                    "left out, or its first records removed (list the files oldest first, or "
                    "verify with --partial)")
        if seq > last_seq + 1:
            gone = (f"record {last_seq + 1}" if seq == last_seq + 2
                    else f"records {last_seq + 1} to {seq - 1}")
            return f"{gone} removed between {before or 'the trail start'} and here (record {seq})"
        return (f"record {seq} is out of order: it comes after record {last_seq} "
                f"({before or 'the trail start'}); records were reordered")
    if expected is not None and prev != expected:
        if not before:
            return ("does not begin the trail: older files were left out, or its first records "
                    "removed (list the files oldest first, or verify with --partial)")
        return f"^record {seq - 1} was altered: record {seq}, next, names another line before it"
    return None


def verify_chain(files: Sequence[str | Path], *, from_start: bool = True,
                 ) -> tuple[int, list[Checkpoint], ChainBreak | None]:
    """Walk the trail (``files`` oldest first, as rotated) and check every ``prev``.

    With ``from_start`` the first record must begin a trail (``prev`` = GENESIS), so removing
    the first records shows too; without it the files may start mid-trail (older files
    deleted by retention).

    Returns the number of records that verified, the checkpoints met (for their HMACs to be
    checked by whoever holds the key), and the first break (None: the chain is whole).
    A line that is not a JSON object, lacks ``prev``, or whose ``prev`` is not the hash of
    the line before (altered, removed or reordered records) is a break.
    """
    expected: str | None = GENESIS if from_start else None
    last_seq: int | None = 0 if from_start else None
    count, checkpoints = 0, list[Checkpoint]()
    before = ""  # where the previous line is, for messages
    lines = _lines(files)
    for name, n, line in lines:
        problem, at = _check(line, expected, last_seq, before), (name, n)
        if problem is not None:
            if " removed " in problem and last_seq is not None:
                later = _find_seq(lines, last_seq + 1)
                if later:
                    problem = (f"records are out of order: record {last_seq + 1} should be "
                               f"here but is at {later}")
            if problem.startswith("^"):  # the line before is the one altered
                file, _, num = before.rpartition(":")
                at, problem = (file, int(num)), problem[1:]
            return count, checkpoints, ChainBreak(at[0], at[1], problem)
        record = json.loads(line)
        if record.get("event") == AuditEvent.AUDIT_CHECKPOINT:
            checkpoints.append(Checkpoint(name, n, record["prev"], str(record.get("hmac", ""))))
        expected, last_seq, before = line_hash(line), record["seq"], f"{name}:{n}"
        count += 1
    return count, checkpoints, None
