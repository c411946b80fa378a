"""Quotas per account: day and minute windows, exhaustion details, concurrency, midnight."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import grpc
import pytest
from keybroker_client import QuotaExhausted

from broker.config import AccountSettings, PoolSettings, QuotaSettings


async def test_daily_quota_is_per_account_not_per_key(start_broker, put_keys, connect):
    """Two keys on one account share its 50 a day; the 51st lease is refused."""
    put_keys("free", [("k1", "acct-a"), ("k2", "acct-a")])
    broker = await start_broker(quota=QuotaSettings(daily_limit=50, minute_limit=1000))
    client = connect(broker)
    leases = [await client.lease_key("free") for _ in range(50)]
    assert {lease.key_id for lease in leases} == {"free/k1", "free/k2"}
    assert leases[-1].remaining_account_today == 0
    with pytest.raises(QuotaExhausted) as info:
        await client.lease_key("free")
    assert info.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_a_key_without_account_is_its_own_account(start_broker, put_keys, connect):
    """Keys with no account each get the full daily quota."""
    put_keys("free", [("solo1", ""), ("solo2", "")])
    broker = await start_broker(quota=QuotaSettings(daily_limit=3, minute_limit=100))
    client = connect(broker)
    leases = [await client.lease_key("free") for _ in range(6)]
    assert sorted(lease.account for lease in leases) == ["key:free/solo1"] * 3 + ["key:free/solo2"] * 3
    with pytest.raises(QuotaExhausted):
        await client.lease_key("free")


async def test_exhaustion_carries_retry_info_until_midnight(start_broker, put_keys, connect,
                                                            clock):
    """When the day is used up, RetryInfo points at 00:00 UTC and QuotaFailure names the window."""
    put_keys("free", [("k1", "acct-a")])
    broker = await start_broker(quota=QuotaSettings(daily_limit=2, minute_limit=100))
    client = connect(broker)
    for _ in range(2):
        await client.lease_key("free")
    with pytest.raises(QuotaExhausted) as info:
        await client.lease_key("free")
    midnight = datetime(2026, 3, 11, tzinfo=UTC).timestamp()
    assert info.value.retry_after == pytest.approx(midnight - clock.now(), abs=0.01)
    assert any(v.subject == "account:acct-a/day" for v in info.value.violations)
    assert info.value.reason == "QUOTA_EXHAUSTED"


async def test_minute_window_refuses_then_frees_at_the_next_minute(start_broker, put_keys,
                                                                   connect, clock):
    """The per-minute limit holds within a calendar minute and RetryInfo points at its end."""
    put_keys("free", [("k1", "acct-a")])
    broker = await start_broker(quota=QuotaSettings(daily_limit=50, minute_limit=20))
    client = connect(broker)
    clock.advance(30)  # 12:00:30
    for _ in range(20):
        await client.lease_key("free")
    with pytest.raises(QuotaExhausted) as info:
        await client.lease_key("free")
    assert info.value.retry_after == pytest.approx(30.0, abs=0.01)
    assert any(v.subject == "account:acct-a/minute" for v in info.value.violations)
    clock.advance(30)  # 12:01:00, a new window
    lease = await client.lease_key("free")
    assert lease.remaining_account_today == 29


async def test_midnight_restores_the_daily_quota(start_broker, put_keys, connect, clock):
    """Crossing 00:00 UTC on the injected clock gives the account its full day again."""
    put_keys("free", [("k1", "acct-a")])
    broker = await start_broker(quota=QuotaSettings(daily_limit=5, minute_limit=100))
    client = connect(broker)
    clock.set(datetime(2026, 3, 10, 23, 59, 58, tzinfo=UTC))
    for _ in range(5):
        await client.lease_key("free")
    with pytest.raises(QuotaExhausted) as info:
        await client.lease_key("free")
    assert info.value.retry_after == pytest.approx(2.0, abs=0.01)
    clock.set(datetime(2026, 3, 11, 0, 0, 0, tzinfo=UTC))
    lease = await client.lease_key("free")
    assert lease.remaining_account_today == 4
    assert lease.expires_at is not None


async def test_pool_and_account_limits_are_configurable(start_broker, put_keys, connect):
    """A pool default and an account override (e.g. 1000/day after credits) both apply."""
    put_keys("paid", [("big", "rich"), ("small", "poor")])
    broker = await start_broker(
        quota=QuotaSettings(daily_limit=50, minute_limit=1000),
        pools={"paid": PoolSettings(daily_limit=3)},
        accounts={"rich": AccountSettings(daily_limit=1000)})
    client = connect(broker)
    views = {k.key_id: k for k in await connect(broker, "admin").list_keys("paid")}
    assert views["paid/big"].account_daily_limit == 1000
    assert views["paid/small"].account_daily_limit == 3
    granted = {"rich": 0, "poor": 0}
    for _ in range(10):
        granted[(await client.lease_key("paid")).account] += 1
    assert granted["poor"] == 3 and granted["rich"] == 7


@pytest.mark.slow
async def test_64_concurrent_callers_get_exactly_150(start_broker, put_keys, connect):
    """64 concurrent callers on 3 accounts of 50 get exactly 150 leases, never more."""
    put_keys("free", [("a1", "acct-a"), ("a2", "acct-a"), ("b1", "acct-b"), ("c1", "acct-c")])
    broker = await start_broker(quota=QuotaSettings(daily_limit=50, minute_limit=1000))
    clients = [connect(broker, who) for who in ("alice", "bob")]
    granted: list[str] = []
    refused = 0

    async def caller(i: int) -> None:
        nonlocal refused
        client = clients[i % 2]
        for _ in range(5):
            try:
                granted.append((await client.lease_key("free")).account)
            except QuotaExhausted:
                refused += 1

    await asyncio.gather(*(caller(i) for i in range(64)))
    assert len(granted) == 150
    assert refused == 64 * 5 - 150
    assert {a: granted.count(a) for a in set(granted)} == {"acct-a": 50, "acct-b": 50,
                                                           "acct-c": 50}


async def test_two_brokers_on_one_store_never_over_or_under_grant(start_broker, put_keys,
                                                                  connect):
    """A broker whose cached counts are stale still grants exactly what the store has left."""
    put_keys("free", [("k1", "acct-a")])
    quota = QuotaSettings(daily_limit=5, minute_limit=100)
    one, two = await start_broker(quota=quota), await start_broker(quota=quota)
    a, b = connect(one), connect(two)
    leases = [await b.lease_key("free") for _ in range(5)]
    with pytest.raises(QuotaExhausted):
        await a.lease_key("free")  # `one` learns the account is full
    await b.complete(leases[0].lease_id, used=False)  # refunded through `two`
    assert (await a.lease_key("free")).remaining_account_today == 0
    with pytest.raises(QuotaExhausted):
        await b.lease_key("free")


async def test_a_key_moved_to_another_account_is_charged_there(start_broker, put_keys, connect):
    """A key re-assigned to another account charges the new account from then on and keeps
    what it used today of its own limit; the old account keeps what it spent."""
    put_keys("free", [("k1", "acct-a"), ("k2", "acct-a")], daily_limit=2)
    broker = await start_broker(quota=QuotaSettings(daily_limit=5, minute_limit=100))
    client, admin = connect(broker), connect(broker, "admin")
    assert {(await client.lease_key("free")).key_id for _ in range(4)} == {"free/k1", "free/k2"}
    with pytest.raises(QuotaExhausted):
        await client.lease_key("free")  # each key's own limit of 2 is spent
    put_keys("free", [("k1", "acct-b")], daily_limit=3)
    await admin.reload_keys()
    moved = await client.lease_key("free")
    assert (moved.key_id, moved.account) == ("free/k1", "acct-b")
    with pytest.raises(QuotaExhausted):
        await client.lease_key("free")  # k1 used 3 of its 3 today, in either account
    views = {v.key_id: v for v in await admin.list_keys("free")}
    assert (views["free/k1"].used_today, views["free/k1"].account_used_today) == (3, 1)
    assert (views["free/k2"].used_today, views["free/k2"].account_used_today) == (2, 4)


async def test_list_keys_shows_a_keys_own_daily_and_minute_limits(start_broker, put_keys,
                                                                  connect):
    """ListKeys reports a key's own minute limit beside its daily one (0 when only the
    account's limits apply)."""
    put_keys("free", [("k1", "acct-a")], daily_limit=30, minute_limit=4)
    put_keys("free", [("k2", "acct-b")])
    broker = await start_broker(quota=QuotaSettings(daily_limit=50, minute_limit=20))
    views = {v.key_id: v for v in await connect(broker, "admin").list_keys("free")}
    assert (views["free/k1"].key_daily_limit, views["free/k1"].key_minute_limit) == (30, 4)
    assert (views["free/k2"].key_daily_limit, views["free/k2"].key_minute_limit) == (0, 0)
    assert views["free/k1"].account_minute_limit == 20
