"""One truth across replicas: health, refunds, the priority reserve and RetryInfo are decided
in the store, so every `keybroker serve` replica on one Redis (or Redis Cluster) behaves alike.

Every test runs real replicas (broker.testing.BrokerProcess) on a real redis-server; the
numbers they measure are printed (run with ``-s``).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from keybroker_client import AsyncKeyBrokerClient, QuotaExhausted
from keybroker_client.v1 import keybroker_pb2 as pb

from broker.clock import day_window
from broker.testing import RedisClusterNodes
from tests import test_faults as faults
from tests.support import TOKENS
from tests.test_faults import POOL, Fleet, clear_of_midnight, start

# The fleet of `keybroker serve` replicas and its fixtures, shared with the fault tests.
redis_aof = faults.redis_aof
fleet = faults.fleet
put_accounts = faults.put_accounts

pytestmark = [pytest.mark.fault, pytest.mark.timeout(120)]


def admin(f: Fleet, i: int) -> AsyncKeyBrokerClient:
    return AsyncKeyBrokerClient(f.brokers[i].target, token=TOKENS["admin"])


def alice(f: Fleet, i: int) -> AsyncKeyBrokerClient:
    return AsyncKeyBrokerClient(f.brokers[i].target, token=TOKENS["alice"])


async def lease_on(client: AsyncKeyBrokerClient, account: str, tries: int = 40):
    """Lease through ``client`` until a key of ``account`` comes (the others are refunded)."""
    for _ in range(tries):
        lease = await client.lease_key(POOL, ttl=60)
        if lease.account == account:
            return lease
        await client.complete(lease.lease_id, used=False)
    raise AssertionError(f"no lease on {account} in {tries} tries")


async def leased_accounts(client: AsyncKeyBrokerClient, n: int) -> Counter[str]:
    """``n`` sequential leases through ``client``, each refunded: the keys they got."""
    seen: Counter[str] = Counter()
    for _ in range(n):
        lease = await client.lease_key(POOL, ttl=60)
        seen[lease.key_id] += 1
        await client.complete(lease.lease_id, used=False)
    return seen


async def health_of(client: AsyncKeyBrokerClient, key_id: str) -> int:
    return (await client.get_key(key_id)).health


@pytest.mark.parametrize("cluster", [False, True], ids=["redis", "cluster"])
async def test_a_429_through_one_replica_cools_the_account_on_every_replica(
        fleet, put_accounts, cluster):
    """A 429 reported through replica A keeps B and C off the account at once and their
    ListKeys show it cooling down (propagation 0: checked inside the reservation)."""
    clear_of_midnight()
    with RedisClusterNodes() if cluster else _null() as nodes:
        f = fleet(3, server=nodes)
        await start(f)
        a, b, c = (alice(f, i) for i in range(3))
        lease = await lease_on(a, "acct-a")
        await a.report_usage(lease.lease_id, 429, retry_after=30)
        reported = time.monotonic()
        on_b = await leased_accounts(b, 12)
        on_c = await leased_accounts(c, 12)
        seen_at = time.monotonic()
        shown = [await health_of(admin(f, i), "free/a2") for i in range(3)]
        print(f"\n[truth 1] 429 via A; B and C leased {dict(on_b)} / {dict(on_c)} "
              f"({seen_at - reported:.3f}s of leases after the report); a2 shown {shown}")
        assert not {"free/a1", "free/a2"} & (set(on_b) | set(on_c))
        assert shown == [pb.KEY_HEALTH_COOLING_DOWN] * 3


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


@pytest.mark.parametrize("cluster", [False, True], ids=["redis", "cluster"])
async def test_a_401_through_one_replica_disables_the_key_on_every_replica_and_any_re_enables(
        fleet, put_accounts, cluster):
    """A 401 through A: B and C never lease the key and show it disabled; SetKeyEnabled(true)
    through B makes A lease it again; a restarted replica loads the same state."""
    clear_of_midnight()
    with RedisClusterNodes() if cluster else _null() as nodes:
        f = fleet(3, server=nodes)
        await start(f)
        a, b, c = (alice(f, i) for i in range(3))
        lease = await lease_on(a, "acct-b")
        await a.report_usage(lease.lease_id, 401)
        await a.complete(lease.lease_id)
        on_b = await leased_accounts(b, 10)
        on_c = await leased_accounts(c, 10)
        shown = [await health_of(admin(f, i), "free/b1") for i in range(3)]
        assert "free/b1" not in on_b and "free/b1" not in on_c
        assert shown == [pb.KEY_HEALTH_DISABLED] * 3

        f.brokers[2].stop()  # a restart loads the shared record
        f.brokers[2].start()
        await f.brokers[2].wait_serving()
        assert await health_of(admin(f, 2), "free/b1") == pb.KEY_HEALTH_DISABLED

        info = await admin(f, 1).set_key_enabled("free/b1", True)
        assert info.health == pb.KEY_HEALTH_HEALTHY
        shown = [await health_of(admin(f, i), "free/b1") for i in range(3)]
        on_a = await leased_accounts(a, 16)
        print(f"\n[truth 2] 401 via A: B/C leased {dict(on_b)} / {dict(on_c)}; after "
              f"SetKeyEnabled via B every replica shows {shown}, A leased {dict(on_a)}")
        assert shown == [pb.KEY_HEALTH_HEALTHY] * 3
        assert on_a["free/b1"] > 0


def _reserve_config(tmp_path: Path, fraction: float) -> str:
    path = tmp_path / "hybrid.toml"
    path.write_text(f"[pools.free]\nreserve_high_fraction = {fraction}\n")
    return str(path)


def _normal_share(capacity: int, fraction: float) -> int:
    """How many single units normal priority gets before the reserve (as of now)."""
    now = time.time()
    reserve = fraction * capacity * (day_window(now)[1] - now) / 86400.0
    n = 0
    while capacity - n - 1 >= reserve:
        n += 1
    return n


@pytest.mark.parametrize("replicas", [1, 3])
async def test_a_concurrent_burst_leaves_exactly_the_reserve_to_high_priority(
        fleet, put_accounts, tmp_path, replicas):
    """240 concurrent normal-priority leases over the replicas get exactly the non-reserved
    units, and a high-priority burst then gets exactly the reserve."""
    clear_of_midnight(120)
    fraction, capacity = 0.5, 150
    expected = _normal_share(capacity, fraction)
    f = fleet(replicas, KEYBROKER_CONFIG=_reserve_config(tmp_path, fraction))
    await start(f)
    cs = [alice(f, i) for i in range(replicas)]

    async def burst(priority: str, n: int) -> int:
        async def one(i: int) -> int:
            try:
                await cs[i % replicas].lease_key(POOL, priority=priority, ttl=60)
                return 1
            except QuotaExhausted:
                return 0

        return sum(await asyncio.gather(*(one(i) for i in range(n))))

    normal = await burst("normal", 240)
    high = await burst("high", 240)
    assert expected == _normal_share(capacity, fraction), "the reserve moved during the test"
    counts = await f.day_counts()
    print(f"\n[truth 4] {replicas} replica(s): normal burst granted {normal} (expected "
          f"{expected}), high burst {high} (expected {capacity - expected}); store {counts}")
    assert normal == expected
    assert high == capacity - expected
    assert sum(counts.values()) == capacity


@pytest.fixture
def ten_accounts(put_keys: Callable[..., dict[str, str]]) -> list[str]:
    """Ten accounts of one key each."""
    accounts = [f"acct-{i}" for i in range(10)]
    put_keys(POOL, [(f"k{i}", a) for i, a in enumerate(accounts)])
    return accounts


async def test_refunds_through_one_replica_are_leased_through_the_others(fleet, ten_accounts):
    """3 replicas, 10 accounts of 5/day: fill 50, refund 25 through A, then 25 sequential leases
    through B and C are all granted."""
    clear_of_midnight(120)
    f = fleet(3, KEYBROKER_QUOTA_DAILY_LIMIT="5")
    await start(f)
    a, b, c = (alice(f, i) for i in range(3))
    leases = []
    for i in range(50):
        leases.append(await (a, b, c)[i % 3].lease_key(POOL, ttl=300))
    with pytest.raises(QuotaExhausted):
        await b.lease_key(POOL)
    with pytest.raises(QuotaExhausted):
        await c.lease_key(POOL)
    for lease in leases[:25]:
        await a.complete(lease.lease_id, used=False)
    granted, refused = 0, 0
    for i in range(25):
        try:
            await (b, c)[i % 2].lease_key(POOL, ttl=300)
            granted += 1
        except QuotaExhausted:
            refused += 1
    print(f"\n[truth 12.1] after 25 refunds via A: {granted} granted via B/C, {refused} refused")
    assert granted == 25 and refused == 0


async def test_concurrent_refusals_over_replicas_carry_the_true_retry_info(fleet, ten_accounts):
    """With every account out until 00:00 UTC, 300 concurrent refusals over 3 replicas (after
    refunds and re-fills) all carry RetryInfo equal to the time to midnight during the call (+-1 s)."""
    clear_of_midnight(120)
    f = fleet(3, KEYBROKER_QUOTA_DAILY_LIMIT="5")
    await start(f)
    cs = [alice(f, i) for i in range(3)]
    leases = [await cs[i % 3].lease_key(POOL, ttl=300) for i in range(50)]
    for lease in leases[:20]:
        await cs[0].complete(lease.lease_id, used=False)
    retry: list[float] = []
    midnight = day_window(time.time())[1]

    async def one(i: int) -> None:
        sent = time.time()
        try:
            await cs[i % 3].lease_key(POOL, ttl=300)
        except QuotaExhausted as exc:
            # The broker answered somewhere between sending and receiving: the true time to
            # midnight then lies between these two (so a slow machine is no false alarm).
            late, early = midnight - sent, midnight - time.time()
            retry.append(max(0.0, early - exc.retry_after, exc.retry_after - late))

    await asyncio.gather(*(one(i) for i in range(320)))
    print(f"\n[truth 12.2] {len(retry)} refusals; RetryInfo outside the call's span by at most "
          f"{max(retry):.3f}s")
    assert len(retry) == 300
    assert max(retry) <= 1.0
