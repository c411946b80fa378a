"""Pure decisions of the lease path: hybrid admission and why no key could be leased.

No store, no clock, no I/O: everything comes in as arguments, so these are tested by
tables (tests/test_admission.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from ..config import PoolSettings
from ..errors import QuotaViolation
from ..models import Health, HealthState, Priority, Window
from .windows import key_subject

__all__ = ["Candidate", "Exhaustion", "Refusal", "admission", "allowed", "applies", "exhaustion"]

DAY = 86400.0


@dataclass(frozen=True)
class Refusal:
    """Hybrid routing kept the request off the keys, for ``retry_after`` seconds."""

    reason: str  # reserved_for_higher_priority | pacing
    retry_after: float


def applies(pool: PoolSettings, priority: Priority) -> bool:
    """Whether admission can refuse this request at all (cheap: checked on every lease)."""
    return priority is not Priority.HIGH and bool(pool.reserve_high_fraction or pool.pace_low)


def admission(pool: PoolSettings, priority: Priority, units: int, capacity: int, used: int,
              now: float, day_end: float) -> Refusal | None:
    """Hybrid routing: keep a reserve for high priority and pace low priority.

    ``capacity`` is the pool's budget (the sum of its accounts' daily limits) and
    ``used`` what they have spent today, as the store counted it inside the reservation
    (``allowed`` is the same rule as one number the store compares with, so the reserve
    and the pacing are exact under any concurrency). The reserve is
    ``reserve_high_fraction`` of the budget times the share of the day still ahead; low
    priority may spend the rest no faster than an even pace over the day plus
    ``pace_burst_fraction``.
    """
    if not applies(pool, priority) or capacity <= 0:
        return None
    # The reserve shrinks with the day: what high priority has not needed by 00:00 UTC
    # is better spent by the others than left unused.
    ahead = day_end - now
    reserve = pool.reserve_high_fraction * capacity * ahead / DAY
    if capacity - used - units < reserve:
        return Refusal("reserved_for_higher_priority", ahead)
    if priority is Priority.LOW and pool.pace_low:
        spendable = capacity - reserve
        allowed = spendable * (1.0 - ahead / DAY) + pool.pace_burst_fraction * capacity
        if used + units > allowed:
            wait = (used + units - allowed) / (spendable / DAY)
            return Refusal("pacing", min(wait, ahead))
    return None


def allowed(pool: PoolSettings, priority: Priority, capacity: int, now: float,
            day_end: float) -> float | None:
    """The units of the pool's day budget this request may bring the pool's count to (its
    own included): ``admission`` refuses exactly when ``used + units`` exceeds it. None when
    nothing limits this priority."""
    if not applies(pool, priority) or capacity <= 0:
        return None
    ahead = day_end - now
    reserve = pool.reserve_high_fraction * capacity * ahead / DAY
    limit = capacity - reserve
    if priority is Priority.LOW and pool.pace_low:
        limit = min(limit, (capacity - reserve) * (1.0 - ahead / DAY)
                    + pool.pace_burst_fraction * capacity)
    return limit


@dataclass(frozen=True)
class Candidate:
    """One key as the exhaustion explanation sees it."""

    key_id: str
    health: Health  # what the key shows (Vault flag, own record, account cooldown)
    usable: bool  # healthy, or half-open with its probe slot free
    windows: tuple[Window, ...]


@dataclass(frozen=True)
class Exhaustion:
    """Why no key of a pool can take a request now, and when to try again."""

    reason: str  # quota_exhausted | all_keys_unhealthy
    retry_after: float
    violations: tuple[QuotaViolation, ...]

    @property
    def cause(self) -> str:
        return "quota" if self.reason == "quota_exhausted" else "unhealthy"


def exhaustion(candidates: Iterable[Candidate], used: Mapping[str, int], units: int,
               now: float, retry_when_stuck: float) -> Exhaustion:
    """Work out when the earliest key frees up (its health's end, its full windows' ends).

    With no key that frees up by itself (none at all, or all disabled) an operator or a
    key reload must act: ``retry_when_stuck``.
    """
    waits: list[float] = []
    violations: list[QuotaViolation] = []
    healthy = 0
    for c in candidates:
        health = c.health
        if health.state is HealthState.DISABLED:
            violations.append(QuotaViolation(key_subject(c.key_id), f"disabled ({health.reason})"))
            continue
        ready_at = now
        if c.usable:
            healthy += 1
        else:
            ready_at = max(ready_at, health.until)
            violations.append(QuotaViolation(
                key_subject(c.key_id), f"{health.state.value} ({health.reason})"))
        for w in c.windows:
            count = used.get(w.name, 0)
            if count + units > w.limit:
                ready_at = max(ready_at, w.ends_at)
                violations.append(QuotaViolation(w.label, f"{count} of {w.limit} used"))
        waits.append(ready_at - now)
    retry_after = max(min(waits), 0.001) if waits else retry_when_stuck
    return Exhaustion("quota_exhausted" if healthy else "all_keys_unhealthy", retry_after,
                      tuple(dict.fromkeys(violations)))
