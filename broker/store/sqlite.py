"""SQLite state store: one broker, WAL mode, every reservation one transaction.

Calls run on the event loop thread: with WAL and ``synchronous=NORMAL`` a
commit is a write to the WAL file without fsync, tens of microseconds, so
handing it to a thread pool would cost more than it saves. Durability: a
committed transaction survives ``kill -9`` of the broker (the WAL is in the
OS page cache); set ``synchronous=FULL`` via ``durable=True`` to also survive
power loss.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sqlite3
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from ..clock import day_window
from ..errors import BackendUnavailable, LeaseNotFound
from ..models import (
    LATENCY_BUCKETS_MS,
    Health,
    HealthState,
    KeyStats,
    LeaseRecord,
    LeaseStatus,
    UsageReport,
    UsageRow,
    latency_bucket,
)
from .base import (
    IN_FLIGHT_REASON,
    Rejection,
    ReportState,
    ReportWrite,
    Reservation,
    ReserveRequest,
    blocked,
    gate_blocks,
    health_from_json,
    health_json,
    in_flight_capped,
    lease_id_in,
    not_renewable,
)

__all__ = ["SQLiteStore"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS counters (
    name TEXT PRIMARY KEY,
    used INTEGER NOT NULL,
    expires_at REAL NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS leases (
    lease_id TEXT PRIMARY KEY,
    principal TEXT NOT NULL,
    request_id TEXT NOT NULL,
    pool TEXT NOT NULL,
    key_id TEXT NOT NULL,
    account TEXT NOT NULL,
    model TEXT NOT NULL,
    units INTEGER NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    status TEXT NOT NULL,
    refunded INTEGER NOT NULL DEFAULT 0,
    windows TEXT NOT NULL,
    finished_at REAL,
    key_version INTEGER NOT NULL DEFAULT 0
);
CREATE UNIQUE INDEX IF NOT EXISTS leases_by_request
    ON leases(principal, request_id) WHERE request_id != '';
CREATE INDEX IF NOT EXISTS leases_by_status ON leases(status, expires_at);
CREATE TABLE IF NOT EXISTS health (
    subject TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    reason TEXT NOT NULL,
    until REAL NOT NULL,
    failures INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS key_stats (
    key_id TEXT PRIMARY KEY,
    successes REAL NOT NULL,
    failures REAL NOT NULL,
    latency_ms REAL NOT NULL,
    updated_at REAL NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS usage (
    day TEXT NOT NULL,
    key_id TEXT NOT NULL,
    account TEXT NOT NULL,
    model TEXT NOT NULL,
    principal TEXT NOT NULL,
    requests INTEGER NOT NULL,
    failures INTEGER NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    cost REAL NOT NULL,
    latency_ms_sum INTEGER NOT NULL,
    latency_buckets TEXT NOT NULL,
    PRIMARY KEY (day, key_id, account, model, principal)
) WITHOUT ROWID;
"""

_LEASE_COLUMNS = ("lease_id, principal, request_id, pool, key_id, account, model, units, "
                  "created_at, expires_at, status, refunded, windows, key_version, finished_at")


@contextlib.contextmanager
def _translate_errors(path: str = "") -> Iterator[None]:
    """The one place sqlite3's errors (every ``sqlite3.Error``, and ``sqlite3.Warning``) become
    BackendUnavailable."""
    try:
        yield
    except (sqlite3.Error, sqlite3.Warning) as exc:
        where = f"sqlite store {path}" if path else "sqlite store"
        raise BackendUnavailable(f"{where}: {type(exc).__name__}: {exc}", backend="store") from None


def _lease(row: Any) -> LeaseRecord:
    (lease_id, principal, request_id, pool, key_id, account, model, units,
     created_at, expires_at, status, refunded, windows, key_version, finished_at) = row
    return LeaseRecord(
        lease_id=lease_id, principal=principal, request_id=request_id, pool=pool,
        key_id=key_id, account=account, model=model, units=int(units),
        created_at=float(created_at), expires_at=float(expires_at), status=LeaseStatus(status),
        refunded=bool(refunded), windows=tuple(json.loads(windows)),
        key_version=int(key_version or 0), finished_at=float(finished_at or 0.0),
    )


T = TypeVar("T")


def _counts(rows: list[Any]) -> dict[str, int]:
    return {str(name): int(n) for name, n in rows}


class SQLiteStore:
    """StateStore on one SQLite file."""

    def __init__(self, path: str | Path, *, durable: bool = False) -> None:
        """Touches no file: the database opens at `open` or on first use."""
        self._path = str(path)
        self._durable = durable
        self._db: sqlite3.Connection | None = None
        # Reads whose cost grows with the data (usage history, every counter, health and stats
        # of every key) run on their own connection in one thread, so a large GetUsage never
        # holds up a lease. The short per-lease transactions stay on the event loop: a thread
        # hop would cost more than they do. WAL lets the reader run beside the writer.
        self._reader: sqlite3.Connection | None = None
        self._reads: ThreadPoolExecutor | None = None

    def open(self) -> sqlite3.Connection:
        """Open the file and bring its schema up to date, once (the runtime calls this at
        start, so a bad path fails there). Raises BackendUnavailable."""
        if self._db is None:
            if self._path != ":memory:":
                # Created 0600 (SQLite gives its -wal and -shm files the same mode): the
                # state names keys, accounts and principals. A bad path: sqlite3 says so below.
                with contextlib.suppress(OSError):
                    os.close(os.open(self._path, os.O_CREAT | os.O_WRONLY, 0o600))
            with _translate_errors(self._path):
                db = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
                try:
                    db.execute("PRAGMA journal_mode=WAL")
                    db.execute(f"PRAGMA synchronous={'FULL' if self._durable else 'NORMAL'}")
                    db.execute("PRAGMA busy_timeout=5000")
                    db.executescript(_SCHEMA)
                    self._migrate(db)
                except BaseException:
                    db.close()
                    raise
            self._db = db
        return self._db

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One IMMEDIATE transaction, rolled back on any error; every sqlite3 error becomes
        BackendUnavailable."""
        db = self._db or self.open()
        with _translate_errors():
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
                db.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
                raise

    @staticmethod
    def _migrate(db: sqlite3.Connection) -> None:
        """Columns added since the first schema."""
        columns = {row[1] for row in db.execute("PRAGMA table_info(leases)")}
        if "reported" not in columns:  # the answer of the lease's first report (JSON)
            db.execute("ALTER TABLE leases ADD COLUMN reported TEXT")
        if "key_version" not in columns:  # the key's KV version when the lease was granted
            db.execute(
                "ALTER TABLE leases ADD COLUMN key_version INTEGER NOT NULL DEFAULT 0")

    def _read(self, sql: str, params: Sequence[object] = ()) -> list[Any]:
        db = self._db or self.open()
        with _translate_errors():
            return list(db.execute(sql, params))

    async def _read_aside(self, convert: Callable[[list[Any]], T], sql: str,
                          params: Sequence[object] = ()) -> T:
        """Run a read (and turn its rows into values) on the reader thread."""
        self._db or self.open()  # the schema exists before the reader looks
        if self._path == ":memory:":  # another connection would see another database
            return convert(self._read(sql, params))
        if self._reads is None:
            self._reads = ThreadPoolExecutor(1, thread_name_prefix="sqlite-read")
        return await asyncio.get_running_loop().run_in_executor(
            self._reads, self._read_on_reader, convert, sql, params)

    def _read_on_reader(self, convert: Callable[[list[Any]], T], sql: str,
                        params: Sequence[object]) -> T:
        with _translate_errors(self._path):
            if self._reader is None:
                self._reader = sqlite3.connect(self._path, check_same_thread=False)
                self._reader.execute("PRAGMA query_only=1")
                self._reader.execute("PRAGMA busy_timeout=5000")
            return convert(list(self._reader.execute(sql, params)))

    @staticmethod
    def _health_of(db: sqlite3.Connection, subject: str) -> Health | None:
        if not subject:
            return None
        row = db.execute("SELECT state, reason, until, failures FROM health WHERE subject=?",
                         (subject,)).fetchone()
        return None if row is None else Health(HealthState(row[0]), str(row[1]), float(row[2]),
                                                int(row[3]))

    @staticmethod
    def _healths_of(db: sqlite3.Connection, first: str,
                    second: str) -> tuple[Health | None, Health | None]:
        """The health records of two subjects (None: none), in one statement."""
        found = {str(row[0]): Health(HealthState(row[1]), str(row[2]), float(row[3]),
                                     int(row[4]))
                 for row in db.execute("SELECT subject, state, reason, until, failures FROM "
                                       "health WHERE subject IN (?, ?)", (first, second))}
        return (found.get(first) if first else None), (found.get(second) if second else None)

    @staticmethod
    def _put_health(db: sqlite3.Connection, subject: str, health: Health) -> None:
        if health == Health():
            db.execute("DELETE FROM health WHERE subject=?", (subject,))
        else:
            db.execute(
                "INSERT OR REPLACE INTO health(subject, state, reason, until, failures) "
                "VALUES (?, ?, ?, ?, ?)",
                (subject, health.state.value, health.reason, health.until, health.failures))

    async def reserve(self, request: ReserveRequest) -> Reservation | Rejection:
        seen: dict[str, int] = {}
        health: dict[str, Health] = {}
        now = request.created_at
        with self._tx() as db:
            if request.request_id:
                row = db.execute(
                    f"SELECT {_LEASE_COLUMNS} FROM leases WHERE principal=? AND request_id=?",
                    (request.principal, request.request_id),
                ).fetchone()
                if row is not None:
                    return Reservation(lease=_lease(row), used={}, replay=True)
            budget = request.budget
            if budget is not None and request.candidates:
                counts = dict(db.execute(
                    f"SELECT name, used FROM counters WHERE name IN "
                    f"({','.join('?' * len(budget.windows))})",
                    [name for _, name, _ in budget.windows])) if budget.windows else {}
                spent = sum(min(int(counts.get(name, 0)), cap) for _, name, cap in budget.windows)
                if spent + request.units > budget.allowed:
                    return Rejection(used={}, budget_spent=spent)
            for scope_subject in request.gates:
                gate = self._health_of(db, scope_subject[1])
                if gate is not None and gate_blocks(gate, now):
                    return Rejection(used={}, health={scope_subject[1]: gate})
            for cand in request.candidates:
                names = [w.name for w in cand.windows]
                marks = ",".join("?" * len(names))
                used = dict.fromkeys(names, 0)
                used.update(db.execute(
                    f"SELECT name, used FROM counters WHERE name IN ({marks})", names))
                seen.update(used)
                own, acct = self._healths_of(db, cand.key_subject, cand.account_subject)
                health.update((s, h) for s, h in ((cand.key_subject, own),
                                                  (cand.account_subject, acct)) if h is not None)
                stop, probe = blocked(own, acct, now)
                if cand.paid_subject:
                    paid = self._health_of(db, cand.paid_subject)
                    if paid is not None:
                        health[cand.paid_subject] = paid
                        stop = stop or gate_blocks(paid, now)
                        if not stop and paid.reason == IN_FLIGHT_REASON:
                            active = db.execute(
                                "SELECT COUNT(*) FROM leases WHERE account=? AND "
                                "status='active' AND expires_at>?",
                                (cand.account, now)).fetchone()[0]
                            stop = in_flight_capped(paid, int(active), now)
                if stop or any(used[w.name] + request.units > w.limit for w in cand.windows):
                    continue
                if probe and own is not None:
                    self._put_health(db, cand.key_subject, Health(
                        HealthState.CIRCUIT_OPEN, "probe", request.probe_until, own.failures))
                db.executemany(
                    "INSERT INTO counters(name, used, expires_at) VALUES (?, ?, ?) "
                    "ON CONFLICT(name) DO UPDATE SET used = used + excluded.used",
                    [(w.name, request.units, w.ends_at) for w in cand.windows],
                )
                lease = LeaseRecord(
                    lease_id=lease_id_in(request.lease_id, cand.account),
                    principal=request.principal,
                    request_id=request.request_id, pool=request.pool, key_id=cand.key_id,
                    account=cand.account, model=request.model, units=request.units,
                    created_at=request.created_at, expires_at=request.expires_at,
                    status=LeaseStatus.ACTIVE, refunded=False, windows=tuple(names),
                    key_version=cand.key_version,
                )
                db.execute(
                    f"INSERT INTO leases({_LEASE_COLUMNS}) "
                    "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,NULL)",
                    (lease.lease_id, lease.principal, lease.request_id, lease.pool, lease.key_id,
                     lease.account, lease.model, lease.units, lease.created_at, lease.expires_at,
                     lease.status.value, 0, json.dumps(names), lease.key_version),
                )
                return Reservation(
                    lease=lease, used={n: used[n] + request.units for n in names})
        return Rejection(used=seen, health=health)

    async def get_lease(self, lease_id: str) -> LeaseRecord | None:
        rows = self._read(f"SELECT {_LEASE_COLUMNS} FROM leases WHERE lease_id=?", (lease_id,))
        return _lease(rows[0]) if rows else None

    async def renew(self, lease_id: str, expires_at: float, now: float) -> LeaseRecord:
        with self._tx() as db:
            cur = db.execute(
                "UPDATE leases SET expires_at=? WHERE lease_id=? AND status='active' "
                "AND expires_at > ?", (expires_at, lease_id, now))
            row = db.execute(
                f"SELECT {_LEASE_COLUMNS} FROM leases WHERE lease_id=?", (lease_id,)).fetchone()
        if row is None:
            raise LeaseNotFound(f"lease {lease_id} not found")
        if cur.rowcount == 0:
            raise not_renewable(_lease(row))
        return _lease(row)

    async def complete(self, lease_id: str, used: bool, now: float) -> tuple[LeaseRecord, bool]:
        with self._tx() as db:
            row = db.execute(
                f"SELECT {_LEASE_COLUMNS} FROM leases WHERE lease_id=?", (lease_id,)).fetchone()
            if row is None:
                raise LeaseNotFound(f"lease {lease_id} not found")
            lease = _lease(row)
            if lease.status is not LeaseStatus.ACTIVE:
                return lease, False
            if lease.expires_at <= now:
                status, refund = LeaseStatus.EXPIRED, False
            else:
                status, refund = LeaseStatus.COMPLETED, not used
            if refund:
                marks = ",".join("?" * len(lease.windows))
                db.execute(
                    f"UPDATE counters SET used = MAX(used - ?, 0) WHERE name IN ({marks})",
                    (lease.units, *lease.windows))
            db.execute(
                "UPDATE leases SET status=?, refunded=?, finished_at=? WHERE lease_id=?",
                (status.value, int(refund), now, lease_id))
        return LeaseRecord(**{**lease.__dict__, "status": status, "refunded": refund,
                              "finished_at": now}), True

    async def end_leases(self, account: str, key_id: str, now: float) -> list[LeaseRecord]:
        with self._tx() as db:
            rows = db.execute(
                f"UPDATE leases SET status='revoked', finished_at=? WHERE status='active' "
                f"AND expires_at > ? AND key_id=? AND account=? RETURNING {_LEASE_COLUMNS}",
                (now, now, key_id, account)).fetchall()
        return [_lease(r) for r in rows]

    async def expire_due(self, now: float, limit: int = 500) -> list[LeaseRecord]:
        with self._tx() as db:
            rows = db.execute(
                f"UPDATE leases SET status='expired', finished_at=? WHERE lease_id IN ("
                f"SELECT lease_id FROM leases WHERE status='active' AND expires_at <= ? LIMIT ?) "
                f"RETURNING {_LEASE_COLUMNS}", (now, now, limit)).fetchall()
        return [_lease(r) for r in rows]

    async def counters(self, windows: Sequence[tuple[str, str]]) -> dict[str, int]:
        names = [name for _, name in windows]  # names are unique across accounts here
        out = dict.fromkeys(names, 0)
        for i in range(0, len(names), 500):
            chunk = list(names[i:i + 500])
            marks = ",".join("?" * len(chunk))
            out.update(await self._read_aside(
                _counts, f"SELECT name, used FROM counters WHERE name IN ({marks})", chunk))
        return out

    async def live_counters(self, now: float) -> dict[str, int]:
        return await self._read_aside(
            _counts, "SELECT name, used FROM counters WHERE expires_at > ?", (now,))

    async def set_counter(self, account: str, name: str, used: int, expires_at: float,
                          now: float) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO counters(name, used, expires_at) VALUES (?, ?, ?) "
                "ON CONFLICT(name) DO UPDATE SET used = excluded.used", (name, used, expires_at))

    async def health(self) -> dict[str, Health]:
        return await self._read_aside(
            lambda rows: {str(s): Health(HealthState(st), str(r), float(u), int(f))
                          for s, st, r, u, f in rows},
            "SELECT subject, state, reason, until, failures FROM health")

    async def put_health(self, account: str, subject: str, health: Health) -> None:
        with self._tx() as db:
            self._put_health(db, subject, health)

    async def report_state(self, lease: LeaseRecord, key_subject: str,
                           account_subject: str, paid_subject: str = "") -> ReportState:
        with self._tx() as db:
            row = db.execute("SELECT reported FROM leases WHERE lease_id=?",
                             (lease.lease_id,)).fetchone()
            if row is None:
                raise LeaseNotFound(f"lease {lease.lease_id} not found")
            health = {s: h for s in (key_subject, account_subject, paid_subject)
                      if s and (h := self._health_of(db, s)) is not None}
            stats = self._stats_of(db, lease.key_id)
        return ReportState(answer=health_from_json(row[0]) if row[0] else None, health=health,
                           stats=stats, token=(dict(health), stats))

    @staticmethod
    def _stats_of(db: sqlite3.Connection, key_id: str) -> KeyStats | None:
        row = db.execute("SELECT successes, failures, latency_ms, updated_at FROM key_stats "
                         "WHERE key_id=?", (key_id,)).fetchone()
        return None if row is None else KeyStats(*(float(x) for x in row))

    async def apply_report(self, write: ReportWrite) -> tuple[Health, bool] | None:
        lease, report, now = write.lease, write.report, write.now
        read_health: dict[str, Health]
        read_stats: KeyStats | None
        read_health, read_stats = write.token  # type: ignore[misc]  # report_state's token
        with self._tx() as db:
            row = db.execute("SELECT reported FROM leases WHERE lease_id=?",
                             (lease.lease_id,)).fetchone()
            if row is None:
                raise LeaseNotFound(f"lease {lease.lease_id} not found")
            if row[0]:
                return health_from_json(row[0]), False
            for subject in write.health:
                if self._health_of(db, subject) != read_health.get(subject):
                    return None
            if self._stats_of(db, lease.key_id) != read_stats:
                return None
            for subject, health in write.health.items():
                self._put_health(db, subject, health)
            if write.stats is not None:
                s = write.stats
                db.execute(
                    "INSERT OR REPLACE INTO key_stats(key_id, successes, failures, latency_ms, "
                    "updated_at) VALUES (?, ?, ?, ?, ?)",
                    (lease.key_id, s.successes, s.failures, s.latency_ms, s.updated_at))
            if write.counter is not None:
                name, used, ends_at = write.counter
                db.execute(
                    "INSERT INTO counters(name, used, expires_at) VALUES (?, ?, ?) "
                    "ON CONFLICT(name) DO UPDATE SET used = excluded.used", (name, used, ends_at))
            self._add_usage(db, lease, report, now)
            db.execute("UPDATE leases SET reported=? WHERE lease_id=?",
                       (health_json(write.answer), lease.lease_id))
        return write.answer, True

    @staticmethod
    def _add_usage(db: sqlite3.Connection, lease: LeaseRecord, report: UsageReport,
                   now: float) -> None:
        day = day_window(now)[0]  # memoised: no strftime per report
        failed = int(not 200 <= report.http_status < 300)
        ident = (day, lease.key_id, lease.account, report.model or lease.model, lease.principal)
        row = db.execute(
            "SELECT latency_buckets FROM usage WHERE day=? AND key_id=? AND account=? "
            "AND model=? AND principal=?", ident).fetchone()
        buckets = json.loads(row[0]) if row else [0] * (len(LATENCY_BUCKETS_MS) + 1)
        buckets[latency_bucket(report.latency_ms)] += 1
        db.execute(
            "INSERT INTO usage(day, key_id, account, model, principal, requests, failures, "
            "prompt_tokens, completion_tokens, cost, latency_ms_sum, latency_buckets) "
            "VALUES (?, ?, ?, ?, ?, 1, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT(day, key_id, account, model, principal) DO UPDATE SET "
            "requests = requests + 1, failures = failures + excluded.failures, "
            "prompt_tokens = prompt_tokens + excluded.prompt_tokens, "
            "completion_tokens = completion_tokens + excluded.completion_tokens, "
            "cost = cost + excluded.cost, "
            "latency_ms_sum = latency_ms_sum + excluded.latency_ms_sum, "
            "latency_buckets = excluded.latency_buckets",
            (*ident, failed, report.prompt_tokens, report.completion_tokens, report.cost,
             report.latency_ms, json.dumps(buckets)))

    async def usage(self, since_day: str, until_day: str) -> list[UsageRow]:
        return await self._read_aside(
            lambda rows: [UsageRow(day=r[0], key_id=r[1], account=r[2], model=r[3],
                                   principal=r[4], requests=r[5], failures=r[6],
                                   prompt_tokens=r[7], completion_tokens=r[8], cost=r[9],
                                   latency_ms_sum=r[10],
                                   latency_buckets=tuple(json.loads(r[11]))) for r in rows],
            "SELECT day, key_id, account, model, principal, requests, failures, prompt_tokens, "
            "completion_tokens, cost, latency_ms_sum, latency_buckets FROM usage "
            "WHERE day >= ? AND day <= ? ORDER BY day, key_id, account, model, principal",
            (since_day, until_day))

    async def key_stats(self) -> dict[str, KeyStats]:
        return await self._read_aside(
            lambda rows: {str(k): KeyStats(float(s), float(f), float(lat), float(u))
                          for k, s, f, lat, u in rows},
            "SELECT key_id, successes, failures, latency_ms, updated_at FROM key_stats")

    async def active_leases(self, now: float) -> Mapping[str, int]:
        return await self._read_aside(
            _counts,
            "SELECT key_id, COUNT(*) FROM leases WHERE status='active' AND expires_at > ? "
            "GROUP BY key_id", (now,))

    async def prune(self, now: float, retention_seconds: float,
                    usage_retention_seconds: float = 30 * 86400.0) -> int:
        oldest = datetime.fromtimestamp(now - usage_retention_seconds, UTC).strftime("%Y-%m-%d")
        with self._tx() as db:
            a = db.execute("DELETE FROM counters WHERE expires_at <= ?", (now,)).rowcount
            b = db.execute(
                "DELETE FROM leases WHERE status != 'active' AND finished_at <= ?",
                (now - retention_seconds,)).rowcount
            c = db.execute("DELETE FROM usage WHERE day < ?", (oldest,)).rowcount
        return a + b + c

    async def close(self) -> None:
        if self._reads is not None:
            self._reads.shutdown(wait=True)
            self._reads = None
        if self._reader is not None:
            with contextlib.suppress(sqlite3.Error):
                self._reader.close()
            self._reader = None
        if self._db is not None:
            with contextlib.suppress(sqlite3.Error):
                self._db.close()
            self._db = None
