"""Time, injected. Quota windows, TTLs and cooldowns read time only from a Clock."""

from __future__ import annotations

import functools
import time
from datetime import UTC, datetime
from typing import Protocol

__all__ = ["Clock", "ManualClock", "SystemClock", "day_window", "minute_window", "next_midnight"]


class Clock(Protocol):
    """A source of wall-clock time in seconds since the epoch (UTC)."""

    def now(self) -> float: ...


class SystemClock:
    """The real clock, plus a fixed ``offset`` in seconds (0 but in tests: the ``clock_offset``
    setting lets a ``keybroker serve`` subprocess live near 00:00 UTC, or skewed from its peers)."""

    def __init__(self, offset: float = 0.0) -> None:
        self.offset = offset

    def now(self) -> float:
        return time.time() + self.offset


class ManualClock:
    """A clock that only moves when told to; tests step it across 00:00 UTC."""

    def __init__(self, start: float | datetime) -> None:
        self._now = start.timestamp() if isinstance(start, datetime) else float(start)

    def now(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        self._now += seconds

    def set(self, when: float | datetime) -> None:
        self._now = when.timestamp() if isinstance(when, datetime) else float(when)


def day_window(now: float) -> tuple[str, float]:
    """The UTC day containing ``now``: its id (``YYYY-MM-DD``) and when it ends."""
    return _day(int(now // 86400))


def minute_window(now: float) -> tuple[str, float]:
    """The calendar minute containing ``now``: its id and when it ends."""
    return _minute(int(now // 60))


def next_midnight(now: float) -> float:
    """The next 00:00 UTC strictly after ``now`` (POSIX days are exactly 86400 s)."""
    return float((int(now // 86400) + 1) * 86400)


# Window ids are computed for every candidate key on every lease: memoise the formatting.
@functools.lru_cache(maxsize=4)
def _day(index: int) -> tuple[str, float]:
    start = datetime.fromtimestamp(index * 86400, UTC)
    return start.strftime("%Y-%m-%d"), float((index + 1) * 86400)


@functools.lru_cache(maxsize=4)
def _minute(index: int) -> tuple[str, float]:
    start = datetime.fromtimestamp(index * 60, UTC)
    return start.strftime("%Y-%m-%dT%H:%M"), float((index + 1) * 60)
