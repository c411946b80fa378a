"""Rotation strategies: which keys of a pool to offer the store, best first.

A strategy inspects as few keys as it can: round robin walks from its cursor,
the others score a bounded random sample (``SAMPLE`` keys) of a large pool, so
choosing among 10,000 keys costs about what choosing among 64 does. The engine
passes ``accept`` (healthy, quota left by its cached counts); a strategy returns
only keys it accepted, at most ``limit`` of them.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from ..config import StrategyName
from ..models import Key, KeyStats

__all__ = ["SAMPLE", "Intelligent", "LeastUsed", "PerformanceBased", "RoundRobin", "Strategy",
           "StrategyContext", "make_strategy"]

SAMPLE = 64
LATENCY_PRIOR_MS = 1000.0  # what an unmeasured key is assumed to take
LATENCY_FLOOR_MS = 50.0


@dataclass(frozen=True)
class StrategyContext:
    """What a strategy may know about keys at one decision.

    Attributes:
        now: the engine clock's time.
        usage: (units used today through the key, units left today on its account,
            the account's daily limit).
        stats: the key's decayed success/failure counts and latency.
        day_fraction_left: share of the UTC day still ahead (1.0 at 00:00).
        rng: the engine's random source (seeded in simulations).
    """

    now: float
    usage: Callable[[Key], tuple[int, int, int]]
    stats: Callable[[Key], KeyStats]
    day_fraction_left: float
    rng: random.Random


class Strategy(Protocol):
    """Orders candidates; the engine offers them to the store, which charges the first that fits."""

    name: StrategyName

    def pick(self, pool: str, keys: Sequence[Key], accept: Callable[[Key], bool],
             ctx: StrategyContext, limit: int) -> list[Key]:
        """Up to ``limit`` accepted keys, best first. ``keys`` are sorted by key_id."""
        ...


def _sample(keys: Sequence[Key], accept: Callable[[Key], bool], rng: random.Random) -> list[Key]:
    """Accepted keys among a random sample of at most SAMPLE; all keys when the sample has none."""
    if len(keys) <= SAMPLE:
        return [k for k in keys if accept(k)]
    picked = [keys[i] for i in rng.sample(range(len(keys)), SAMPLE)]
    found = [k for k in picked if accept(k)]
    return found or [k for k in keys if accept(k)]


class RoundRobin:
    """Each lease starts one key further along the pool than the last one did."""

    name = StrategyName.ROUND_ROBIN

    def __init__(self) -> None:
        self._cursor: dict[str, int] = {}

    def pick(self, pool: str, keys: Sequence[Key], accept: Callable[[Key], bool],
             ctx: StrategyContext, limit: int) -> list[Key]:
        n = len(keys)
        if not n:
            return []
        start = self._cursor.get(pool, 0) % n
        self._cursor[pool] = start + 1
        out: list[Key] = []
        for i in range(n):
            key = keys[(start + i) % n]
            if accept(key):
                out.append(key)
                if len(out) == limit:
                    break
        return out


class LeastUsed:
    """The key with the fewest units today first; ties go to the account with most left."""

    name = StrategyName.LEAST_USED

    def pick(self, pool: str, keys: Sequence[Key], accept: Callable[[Key], bool],
             ctx: StrategyContext, limit: int) -> list[Key]:
        def rank(key: Key) -> tuple[int, int, str]:
            used, account_left, _ = ctx.usage(key)
            return used, -account_left, key.key_id

        return sorted(_sample(keys, accept, ctx.rng), key=rank)[:limit]


def success_rate(s: KeyStats) -> float:
    """Laplace-smoothed share of calls the key served (unknown keys start at 1/2... of 2 priors)."""
    return (s.successes + 1.0) / (s.successes + s.failures + 2.0)


def latency_of(s: KeyStats) -> float:
    return max(s.latency_ms if s.successes > 0 else LATENCY_PRIOR_MS, LATENCY_FLOOR_MS)


class PerformanceBased:
    """Best expected successes per second first: success rate over latency.

    Failures count fully against a key however fast they came back, so keys that
    answer 429 or 503 in milliseconds never look good.
    """

    name = StrategyName.PERFORMANCE_BASED

    def pick(self, pool: str, keys: Sequence[Key], accept: Callable[[Key], bool],
             ctx: StrategyContext, limit: int) -> list[Key]:
        def score(key: Key) -> tuple[float, str]:
            s = ctx.stats(key)
            return -(success_rate(s) ** 2) / latency_of(s), key.key_id

        return sorted(_sample(keys, accept, ctx.rng), key=score)[:limit]


class Intelligent:
    """Thompson sampling over success and latency, with quota pacing across accounts.

    For each candidate it draws a success probability from Beta(successes + 1,
    failures + 1) and a latency from a log-normal around the key's mean whose
    spread shrinks as evidence grows; the score is the drawn success rate squared
    over the drawn latency. Well-known keys are rarely explored; decay of the
    counts (done by the engine) lets it notice a key that degrades or recovers.
    Pacing: an account that has spent more of its day than the day has passed is
    discounted, so all accounts last until 00:00 UTC instead of the best one
    running dry by noon.
    """

    name = StrategyName.INTELLIGENT

    def pick(self, pool: str, keys: Sequence[Key], accept: Callable[[Key], bool],
             ctx: StrategyContext, limit: int) -> list[Key]:
        rng = ctx.rng

        def score(key: Key) -> tuple[float, str]:
            s = ctx.stats(key)
            p = rng.betavariate(s.successes + 1.0, s.failures + 1.0)
            spread = 1.0 / math.sqrt(1.0 + s.successes)
            latency = latency_of(s) * math.exp(rng.gauss(0.0, spread))
            _, left, daily = ctx.usage(key)
            pace = 1.0
            if daily > 0:
                share_left = left / daily
                pace = min(1.0, (share_left + 0.05) / (ctx.day_fraction_left + 0.05))
            return -(p * p) * pace / latency, key.key_id

        return sorted(_sample(keys, accept, rng), key=score)[:limit]


def make_strategy(name: StrategyName) -> Strategy:
    """A fresh strategy instance (strategies may keep per-pool state)."""
    factories: dict[StrategyName, Callable[[], Strategy]] = {
        StrategyName.ROUND_ROBIN: RoundRobin,
        StrategyName.LEAST_USED: LeastUsed,
        StrategyName.PERFORMANCE_BASED: PerformanceBased,
        StrategyName.INTELLIGENT: Intelligent,
    }
    return factories[name]()
