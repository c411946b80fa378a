"""The lease path's pure decisions: hybrid admission and the exhaustion explanation."""

from __future__ import annotations

import pytest

from broker.config import PoolSettings
from broker.engine.admission import Candidate, Refusal, admission, exhaustion
from broker.errors import QuotaViolation
from broker.models import Health, HealthState, Priority, Window

DAY = 86400.0
NOON = 12 * 3600.0  # half the day ahead
HYBRID = PoolSettings(reserve_high_fraction=0.2, pace_low=True, pace_burst_fraction=0.05)


@pytest.mark.parametrize(("pool", "priority", "units", "capacity", "used", "expected"), [
    # Without a reserve or pacing nothing is refused, however full.
    (PoolSettings(), Priority.LOW, 1, 100, 100, None),
    # High priority is never held back by admission.
    (HYBRID, Priority.HIGH, 1, 100, 99, None),
    # No budget (no accounts): admission has nothing to say.
    (HYBRID, Priority.NORMAL, 1, 0, 0, None),
    # At noon the reserve is 20% of 100 x 1/2 = 10: normal may spend down to it ...
    (HYBRID, Priority.NORMAL, 1, 100, 89, None),
    # ... but not into it; retry when the day (and the reserve) ends.
    (HYBRID, Priority.NORMAL, 1, 100, 90, Refusal("reserved_for_higher_priority", DAY - NOON)),
    # Low may spend (100 - 10) x 1/2 + 5 = 50 by noon ...
    (HYBRID, Priority.LOW, 1, 100, 49, None),
    # ... and waits for the pace to allow one more unit: 1 unit at 90/day.
    (HYBRID, Priority.LOW, 1, 100, 50, Refusal("pacing", DAY / 90)),
    # Normal priority is not paced.
    (HYBRID, Priority.NORMAL, 1, 100, 50, None),
])
def test_admission_table(pool, priority, units, capacity, used, expected):
    """Admission refuses exactly the requests that would eat the reserve or outrun the pace."""
    got = admission(pool, priority, units, capacity, used, NOON, DAY)
    if expected is None or got is None:
        assert got == expected
    else:
        assert got.reason == expected.reason
        assert got.retry_after == pytest.approx(expected.retry_after)


def _window(name: str, limit: int, ends_at: float) -> Window:
    return Window(name, limit, ends_at, name)


HEALTHY = Health()
NOW = 1000.0


@pytest.mark.parametrize(("candidates", "used", "expected"), [
    # No key at all: nothing frees up by itself.
    ((), {}, ("all_keys_unhealthy", 30.0, ())),
    # A full minute window: retry when it ends.
    ((Candidate("p/a", HEALTHY, True, (_window("m", 5, NOW + 20),)),), {"m": 5},
     ("quota_exhausted", 20.0, (QuotaViolation("m", "5 of 5 used"),))),
    # The earliest of two keys to free up sets the wait.
    ((Candidate("p/a", HEALTHY, True, (_window("d", 5, NOW + 900),)),
      Candidate("p/b", HEALTHY, True, (_window("m", 5, NOW + 40),))), {"d": 5, "m": 9},
     ("quota_exhausted", 40.0, (QuotaViolation("d", "5 of 5 used"),
                                QuotaViolation("m", "9 of 5 used")))),
    # A cooling key waits for its cooldown; none usable means unhealthy.
    ((Candidate("p/a", Health(HealthState.COOLING_DOWN, "http_429", NOW + 60), False, ()),),
     {}, ("all_keys_unhealthy", 60.0,
          (QuotaViolation("key:p/a", "cooling_down (http_429)"),))),
    # A disabled key never frees up by itself; the same violation is listed once.
    ((Candidate("p/a", Health(HealthState.DISABLED, "operator"), False, ()),
      Candidate("p/a", Health(HealthState.DISABLED, "operator"), False, ())), {},
     ("all_keys_unhealthy", 30.0, (QuotaViolation("key:p/a", "disabled (operator)"),))),
    # Room left (the cache was stale): retry at once, not in zero seconds.
    ((Candidate("p/a", HEALTHY, True, (_window("m", 5, NOW + 20),)),), {"m": 1},
     ("quota_exhausted", 0.001, ())),
])
def test_exhaustion_table(candidates, used, expected):
    """The explanation names every blocking window or health and the earliest retry."""
    got = exhaustion(candidates, used, 1, NOW, retry_when_stuck=30.0)
    assert (got.reason, got.retry_after, got.violations) == expected
    assert got.cause == ("quota" if expected[0] == "quota_exhausted" else "unhealthy")
