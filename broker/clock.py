"""Time, injected. Quota windows, TTLs and cooldowns read time only from a Clock."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Protocol

__all__ = ["Clock", "ManualClock", "SystemClock", "day_window", "minute_window", "next_midnight"]


class Clock(Protocol):
    """A source of wall-clock time in seconds since the epoch (UTC)."""

    def now(self) -> float: ...


class SystemClock:
    """The real clock."""

    def now(self) -> float:
        return time.time()


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
    dt = datetime.fromtimestamp(now, UTC)
    return dt.strftime("%Y-%m-%d"), next_midnight(now)


def minute_window(now: float) -> tuple[str, float]:
    """The calendar minute containing ``now``: its id and when it ends."""
    start = int(now // 60) * 60
    return datetime.fromtimestamp(start, UTC).strftime("%Y-%m-%dT%H:%M"), float(start + 60)


def next_midnight(now: float) -> float:
    """The next 00:00 UTC strictly after ``now``."""
    dt = datetime.fromtimestamp(now, UTC)
    midnight = datetime(dt.year, dt.month, dt.day, tzinfo=UTC) + timedelta(days=1)
    return midnight.timestamp()
