"""Rotation strategies behind one interface: round_robin and least_used."""

from __future__ import annotations

from broker.config import PoolSettings, QuotaSettings, StrategyName
from broker.models import Key, Secret
from broker.strategies import LeastUsed, RoundRobin, make_strategy

QUOTA = QuotaSettings(daily_limit=50, minute_limit=100)


def keys(*names: str) -> list[Key]:
    return [Key(pool="p", name=n, account=f"acct-{n}", secret=Secret("s")) for n in names]


def test_round_robin_starts_one_further_each_time():
    """Round robin rotates the start of the candidate list by one per call, per pool."""
    rr, ks = RoundRobin(), keys("a", "b", "c")
    firsts = [rr.order("p", ks, lambda k: (0, 0), 8)[0].name for _ in range(6)]
    assert firsts == ["a", "b", "c", "a", "b", "c"]
    assert [k.name for k in rr.order("q", ks, lambda k: (0, 0), 2)] == ["a", "b"]


def test_least_used_prefers_fewest_units_then_most_account_left():
    """least_used orders by units used today, ties broken by the account's remaining quota."""
    usage = {"a": (5, 10), "b": (1, 3), "c": (1, 40)}
    order = LeastUsed().order("p", keys("a", "b", "c"), lambda k: usage[k.name], 8)
    assert [k.name for k in order] == ["c", "b", "a"]


def test_make_strategy_builds_each_named_strategy():
    """Every configured strategy name maps to a strategy reporting that name."""
    for name in StrategyName:
        assert make_strategy(name).name is name


async def test_round_robin_pool_spreads_leases_evenly(start_broker, put_keys, connect):
    """A round_robin pool hands out its keys in turn."""
    put_keys("free", [("k1", "a"), ("k2", "b"), ("k3", "c")])
    broker = await start_broker(quota=QUOTA)
    client = connect(broker)
    ids = [(await client.lease_key("free")).key_id for _ in range(9)]
    assert ids == ["free/k1", "free/k2", "free/k3"] * 3


async def test_least_used_pool_levels_usage(start_broker, put_keys, connect):
    """A least_used pool leases the key with the fewest units used today."""
    put_keys("free", [("k1", "a"), ("k2", "b"), ("k3", "c")])
    broker = await start_broker(quota=QUOTA,
                                pools={"free": PoolSettings(strategy=StrategyName.LEAST_USED)})
    client = connect(broker)
    lease = await client.lease_key("free", units=5)
    assert lease.key_id == "free/k1"
    ids = [(await client.lease_key("free")).key_id for _ in range(6)]
    assert ids[:2] == ["free/k2", "free/k3"] and ids.count("free/k1") == 0
    info = {k.key_id: k for k in await connect(broker, "admin").list_keys("free")}
    assert info["free/k1"].strategy == "least_used"
    assert (info["free/k1"].used_today, info["free/k2"].used_today,
            info["free/k3"].used_today) == (5, 3, 3)


async def test_rotation_skips_an_exhausted_account(start_broker, put_keys, connect):
    """A key whose account is out of quota is passed over; the others keep serving."""
    put_keys("free", [("k1", "a"), ("k2", "b")])
    broker = await start_broker(quota=QuotaSettings(daily_limit=2, minute_limit=100))
    client = connect(broker)
    ids = [(await client.lease_key("free")).key_id for _ in range(4)]
    assert sorted(ids) == ["free/k1", "free/k1", "free/k2", "free/k2"]
