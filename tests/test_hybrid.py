"""The internal-vs-external decision: a reserve for high priority, pacing for low priority."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest
from keybroker_client import QuotaExhausted

from broker.config import PoolSettings, QuotaSettings


async def test_reserve_is_kept_for_high_priority(start_broker, put_keys, connect):
    """Normal priority stops at the reserve (routed internally); high priority gets the rest.

    At 12:00 half the day is left, so a 40% reserve of 10 keeps 2 units.
    """
    put_keys("free", [("k1", "acct-a")])
    broker = await start_broker(quota=QuotaSettings(daily_limit=10, minute_limit=100),
                                pools={"free": PoolSettings(reserve_high_fraction=0.4)})
    client = connect(broker)
    normal = [await client.lease_key("free", allow_internal=True) for _ in range(10)]
    assert [lease.route for lease in normal] == ["external"] * 8 + ["internal"] * 2
    assert normal[-1].internal_reason == "reserved_for_higher_priority"
    high = [await client.lease_key("free", priority="high", allow_internal=True)
            for _ in range(3)]
    assert [lease.route for lease in high] == ["external", "external", "internal"]
    assert high[-1].internal_reason == "quota_exhausted"


async def test_reserve_refusal_without_allow_internal_is_resource_exhausted(
        start_broker, put_keys, connect, clock):
    """Without allow_internal the reserve answers RESOURCE_EXHAUSTED with RetryInfo to 00:00."""
    put_keys("free", [("k1", "acct-a")])
    broker = await start_broker(quota=QuotaSettings(daily_limit=10, minute_limit=100),
                                pools={"free": PoolSettings(reserve_high_fraction=0.5)})
    client = connect(broker)
    for _ in range(7):  # the reserve at 12:00 is 0.5 * 10 * 1/2 = 2.5 units
        await client.lease_key("free", priority="low")
    with pytest.raises(QuotaExhausted) as info:
        await client.lease_key("free", priority="low")
    assert info.value.retry_after == pytest.approx(12 * 3600, abs=1)
    assert info.value.violations[0].description == "reserved_for_higher_priority"


async def test_low_priority_is_paced_across_the_day(start_broker, put_keys, connect, clock):
    """At 06:00 low priority may have used a quarter of the day plus the burst, no more."""
    put_keys("free", [("k1", "acct-a"), ("k2", "acct-b")])
    broker = await start_broker(quota=QuotaSettings(daily_limit=50, minute_limit=1000),
                                pools={"free": PoolSettings(pace_low=True,
                                                            pace_burst_fraction=0.05)})
    clock.set(datetime(2026, 3, 10, 6, 0, tzinfo=UTC))
    client = connect(broker)
    routes = [(await client.lease_key("free", priority="low", allow_internal=True))
              for _ in range(35)]
    external = [r for r in routes if r.route == "external"]
    assert len(external) == 30  # 100 * 6/24 + 5
    assert routes[-1].internal_reason == "pacing"
    assert 0 < routes[-1].retry_after <= 900
    assert (await client.lease_key("free")).route == "external", "normal priority is not paced"
    clock.set(datetime(2026, 3, 10, 12, 0, tzinfo=UTC))
    assert (await client.lease_key("free", priority="low")).route == "external"


async def test_a_refused_priority_still_replays_its_earlier_lease(start_broker, put_keys,
                                                                  connect):
    """A retried request_id gets its lease back even when the reserve now refuses new ones."""
    put_keys("free", [("k1", "acct-a")])
    broker = await start_broker(quota=QuotaSettings(daily_limit=10, minute_limit=100),
                                pools={"free": PoolSettings(reserve_high_fraction=0.4)})
    client = connect(broker)
    first = await client.lease_key("free", request_id="job-1")
    for _ in range(7):
        await client.lease_key("free")
    with pytest.raises(QuotaExhausted):
        await client.lease_key("free")
    assert (await client.lease_key("free", request_id="job-1")).lease_id == first.lease_id


async def test_the_reserve_shrinks_towards_midnight(start_broker, put_keys, connect, clock):
    """At 23:00 only a twenty-fourth of the reserve is held back from normal priority."""
    put_keys("free", [("k1", "acct-a")])
    broker = await start_broker(quota=QuotaSettings(daily_limit=24, minute_limit=100),
                                pools={"free": PoolSettings(reserve_high_fraction=0.5)})
    clock.set(datetime(2026, 3, 10, 23, 0, tzinfo=UTC))
    client = connect(broker)
    routes = [(await client.lease_key("free", allow_internal=True)).route for _ in range(24)]
    assert routes.count("external") == 23  # 24 - 0.5 * 24 / 24 = 23.5 -> 23 whole units


async def test_a_concurrent_burst_on_one_sqlite_broker_leaves_exactly_the_reserve(
        start_broker, put_keys, connect):
    """240 concurrent normal-priority leases on one broker get exactly the units above the
    reserve (at 12:00 a 40% reserve of 150 keeps 30), and high priority exactly the 30."""
    put_keys("free", [("a1", "acct-a"), ("b1", "acct-b"), ("c1", "acct-c")])
    broker = await start_broker(quota=QuotaSettings(daily_limit=50, minute_limit=1000),
                                pools={"free": PoolSettings(reserve_high_fraction=0.4)})
    client = connect(broker)

    async def burst(priority: str) -> int:
        async def one() -> int:
            try:
                await client.lease_key("free", priority=priority)
                return 1
            except QuotaExhausted:
                return 0

        return sum(await asyncio.gather(*(one() for _ in range(240))))

    assert await burst("normal") == 120
    assert await burst("high") == 30
