"""The SQLite store's atomic operations, tested directly."""

from __future__ import annotations

from broker.models import Health, HealthState, LeaseStatus, UsageReport, Window
from broker.store import Candidate, Rejection, Reservation, ReserveRequest
from broker.store.sqlite import SQLiteStore


def request(lease_id: str, candidates, units=1, request_id="", principal="p") -> ReserveRequest:
    return ReserveRequest(lease_id=lease_id, principal=principal, request_id=request_id,
                          pool="pool", model="", units=units, created_at=100.0, expires_at=160.0,
                          candidates=candidates)


def cand(key: str, *limits: tuple[str, int]) -> Candidate:
    return Candidate(key_id=key, account="acct",
                     windows=tuple(Window(n, lim, 1000.0, n) for n, lim in limits))


async def test_reservation_is_all_or_nothing(tmp_path):
    """A candidate with one full window charges none of its windows; the next one is taken."""
    store = SQLiteStore(tmp_path / "s.db")
    full = cand("k1", ("day", 10), ("minute", 0))
    ok = cand("k2", ("day", 10), ("other", 5))
    result = await store.reserve(request("ls_1", [full, ok], units=2))
    assert isinstance(result, Reservation) and result.lease.key_id == "k2"
    assert await store.counters(["day", "minute", "other"]) == {"day": 2, "minute": 0, "other": 2}
    await store.close()


async def test_rejection_reports_the_counts_it_saw(tmp_path):
    """When nothing fits, the store returns the counts of every window it looked at."""
    store = SQLiteStore(tmp_path / "s.db")
    await store.set_counter("day", 10, 1000.0)
    result = await store.reserve(request("ls_1", [cand("k1", ("day", 10))]))
    assert isinstance(result, Rejection) and result.used == {"day": 10}
    assert await store.get_lease("ls_1") is None
    await store.close()


async def test_idempotent_replay_and_refund_and_expiry(tmp_path):
    """Replays return the first lease; refunds are exact and once; expiry marks leases expired."""
    store = SQLiteStore(tmp_path / "s.db")
    c = [cand("k1", ("day", 10))]
    first = await store.reserve(request("ls_1", c, units=3, request_id="r"))
    replay = await store.reserve(request("ls_2", c, units=3, request_id="r"))
    assert isinstance(replay, Reservation) and replay.replay and replay.lease.lease_id == "ls_1"
    assert isinstance(first, Reservation)
    lease, changed = await store.complete("ls_1", used=False, now=120.0)
    assert changed and lease.refunded and lease.status is LeaseStatus.COMPLETED
    assert (await store.complete("ls_1", used=False, now=121.0))[1] is False
    assert await store.counters(["day"]) == {"day": 0}
    await store.reserve(request("ls_3", c))
    expired = await store.expire_due(now=200.0)
    assert [x.lease_id for x in expired] == ["ls_3"]
    assert (await store.get_lease("ls_3")).status is LeaseStatus.EXPIRED
    await store.close()


async def test_state_survives_reopening(tmp_path):
    """Counters, leases, health and usage are on disk after the store is reopened."""
    path = tmp_path / "s.db"
    store = SQLiteStore(path)
    res = await store.reserve(request("ls_1", [cand("k1", ("day", 10))], units=4))
    assert isinstance(res, Reservation)
    await store.put_health("key:k1", Health(HealthState.DISABLED, "http_401"))
    await store.record_usage(res.lease, UsageReport(http_status=200, prompt_tokens=7), now=100.0)
    await store.close()
    again = SQLiteStore(path)
    assert await again.counters(["day"]) == {"day": 4}
    assert (await again.get_lease("ls_1")).units == 4
    assert (await again.health())["key:k1"].state is HealthState.DISABLED
    assert await again.active_leases(now=120.0) == {"k1": 1}
    assert await again.prune(now=2000.0, retention_seconds=10) == 1  # the ended window
    await again.close()
