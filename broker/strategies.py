"""Rotation strategies: given the eligible keys of a pool, the order to try them in."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Protocol

from .config import StrategyName
from .models import Key

__all__ = ["LeastUsed", "RoundRobin", "Strategy", "UsageView", "make_strategy"]

UsageView = Callable[[Key], tuple[int, int]]
"""(units used today through the key, units left today on its account)."""


class Strategy(Protocol):
    """Orders candidates; the engine tries them in that order, atomically, until one fits."""

    name: StrategyName

    def order(self, pool: str, keys: Sequence[Key], usage: UsageView, limit: int) -> list[Key]:
        """The first ``limit`` keys to try, best first. ``keys`` are sorted by key_id."""
        ...


class RoundRobin:
    """Each lease starts one key further along the pool than the last one did."""

    name = StrategyName.ROUND_ROBIN

    def __init__(self) -> None:
        self._cursor: dict[str, int] = {}

    def order(self, pool: str, keys: Sequence[Key], usage: UsageView, limit: int) -> list[Key]:
        if not keys:
            return []
        start = self._cursor.get(pool, 0) % len(keys)
        self._cursor[pool] = start + 1
        n = min(limit, len(keys))
        return list(itertools.islice(itertools.chain(keys[start:], keys[:start]), n))


class LeastUsed:
    """The key with the fewest units today first; ties go to the account with most left."""

    name = StrategyName.LEAST_USED

    def order(self, pool: str, keys: Sequence[Key], usage: UsageView, limit: int) -> list[Key]:
        def rank(key: Key) -> tuple[int, int, str]:
            used, account_left = usage(key)
            return used, -account_left, key.key_id

        return sorted(keys, key=rank)[:limit]


def make_strategy(name: StrategyName) -> Strategy:
    """A fresh strategy instance (strategies may keep per-pool state)."""
    factories: dict[StrategyName, Callable[[], Strategy]] = {
        StrategyName.ROUND_ROBIN: RoundRobin,
        StrategyName.LEAST_USED: LeastUsed,
    }
    return factories[name]()
