"""Rotation strategies behind one interface."""

from __future__ import annotations

import random

import pytest

from broker.config import PoolSettings, QuotaSettings, StrategyName
from broker.engine.strategies import (
    SAMPLE,
    Intelligent,
    LeastUsed,
    PerformanceBased,
    RoundRobin,
    StrategyContext,
    make_strategy,
)
from broker.models import Key, KeyStats, Secret

QUOTA = QuotaSettings(daily_limit=50, minute_limit=100)


def keys(*names: str) -> list[Key]:
    return [Key(pool="p", name=n, account=f"acct-{n}", secret=Secret("s")) for n in names]


def ctx(usage=None, stats=None, day_left: float = 0.5, seed: int = 1) -> StrategyContext:
    return StrategyContext(now=0.0, usage=usage or (lambda k: (0, 50, 50)),
                           stats=stats or (lambda k: KeyStats()), day_fraction_left=day_left,
                           rng=random.Random(seed))


def test_round_robin_starts_one_further_each_time():
    """Round robin rotates the start of the candidate list by one per call, per pool."""
    rr, ks = RoundRobin(), keys("a", "b", "c")
    firsts = [rr.pick("p", ks, lambda k: True, ctx(), 8)[0].name for _ in range(6)]
    assert firsts == ["a", "b", "c", "a", "b", "c"]
    assert [k.name for k in rr.pick("q", ks, lambda k: True, ctx(), 2)] == ["a", "b"]
    assert [k.name for k in rr.pick("q", ks, lambda k: k.name != "c", ctx(), 8)] == ["b", "a"]


def test_least_used_prefers_fewest_units_then_most_account_left():
    """least_used orders by units used today, ties broken by the account's remaining quota."""
    usage = {"a": (5, 10, 50), "b": (1, 3, 50), "c": (1, 40, 50)}
    order = LeastUsed().pick("p", keys("a", "b", "c"), lambda k: True,
                             ctx(usage=lambda k: usage[k.name]), 8)
    assert [k.name for k in order] == ["c", "b", "a"]


def test_performance_based_ranks_fast_reliable_keys_first_and_fast_failures_last():
    """A key that fails fast (429/503 in milliseconds) ranks below a slower key that succeeds."""
    stats = {"fast-ok": KeyStats(50, 1, 200), "slow-ok": KeyStats(50, 1, 2000),
             "fast-fail": KeyStats(2, 50, 20)}
    order = PerformanceBased().pick("p", keys("fast-fail", "fast-ok", "slow-ok"), lambda k: True,
                                    ctx(stats=lambda k: stats[k.name]), 8)
    assert [k.name for k in order] == ["fast-ok", "slow-ok", "fast-fail"]


def test_intelligent_exploits_the_best_key_and_still_explores_unknown_ones():
    """Thompson sampling picks the proven key most of the time but tries an unknown key too."""
    stats = {"good": KeyStats(200, 2, 300), "bad": KeyStats(5, 60, 300), "new": KeyStats()}
    strategy, firsts = Intelligent(), []
    c = ctx(stats=lambda k: stats[k.name], seed=7)
    for _ in range(500):
        firsts.append(strategy.pick("p", keys("bad", "good", "new"), lambda k: True, c, 1)[0].name)
    assert firsts.count("good") > 350
    assert firsts.count("bad") < 10
    assert firsts.count("new") > 0


def test_intelligent_paces_an_account_that_ran_ahead_of_the_day():
    """Of two equal keys, the one whose account spent more than the day has passed ranks lower."""
    usage = {"ahead": (45, 5, 50), "even": (25, 25, 50)}
    stats = KeyStats(100, 1, 300)
    strategy = Intelligent()
    c = ctx(usage=lambda k: usage[k.name], stats=lambda k: stats, day_left=0.5, seed=3)
    firsts = [strategy.pick("p", keys("ahead", "even"), lambda k: True, c, 1)[0].name
              for _ in range(200)]
    assert firsts.count("even") > 150


@pytest.mark.parametrize("name", list(StrategyName))
def test_selection_inspects_a_bounded_number_of_keys(name):
    """Choosing among 10,000 keys inspects about as many keys as choosing among 100."""
    strategy = make_strategy(name)
    inspected = 0

    def accept(key: Key) -> bool:
        nonlocal inspected
        inspected += 1
        return True

    strategy.pick("p", keys(*(f"k{i:05d}" for i in range(10_000))), accept, ctx(), 8)
    assert inspected <= SAMPLE


@pytest.mark.parametrize("name", list(StrategyName))
def test_every_strategy_returns_only_accepted_keys(name):
    """No strategy offers a key the engine ruled out."""
    picked = make_strategy(name).pick("p", keys(*"abcdef"), lambda k: k.name in "bd", ctx(), 8)
    assert sorted(k.name for k in picked) == ["b", "d"]


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
