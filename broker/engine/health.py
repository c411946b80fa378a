"""The key health state machine, as pure functions of (state, event, time).

    healthy --429--> cooling_down (account-wide) --reset time passes--> healthy
    healthy --N x 5xx/408/timeout--> circuit_open --backoff passes--> half-open
    half-open --one probe lease--> probing --success--> healthy
                                           --failure--> circuit_open (longer)
                                           --no report within probe_timeout--> half-open
    any --401/402 or operator--> disabled --operator re-enables or Vault secret changes--> healthy

Half-open is ``circuit_open`` whose ``until`` has passed; a probe in flight is
``circuit_open`` with reason ``probe``.
"""

from __future__ import annotations

import random

from ..config import HealthSettings, QuotaSettings
from ..models import Health, HealthState, UsageReport

__all__ = ["CALLER_FAULTS", "after_key_report", "after_rate_limit", "is_probe_slot", "key_fault",
           "probe_started"]


CALLER_FAULTS = frozenset({400, 403, 404, 413, 422})
"""Provider statuses that blame the caller's request, not the key."""


def key_fault(status: int) -> bool | None:
    """True when the answer counts against the key, False for success, None for caller faults."""
    if 200 <= status < 300:
        return False
    if status in CALLER_FAULTS:
        return None
    return status == 0 or status >= 402 or status in (401, 408)


def _jitter(seconds: float, h: HealthSettings, rng: random.Random) -> float:
    return seconds * (1.0 + rng.uniform(-h.jitter, h.jitter))


def after_key_report(current: Health, status: int, reason: str, now: float,
                     h: HealthSettings, rng: random.Random) -> Health:
    """A key's own health after the provider answered ``status`` (429 is account-wide: see
    ``after_rate_limit``)."""
    if current.state is HealthState.DISABLED:
        return current  # only an operator or a new secret brings it back
    if status in (401, 402):
        return Health(HealthState.DISABLED, f"http_{status}")
    if 200 <= status < 300:
        return Health()
    if status == 0 or status == 408 or status >= 500:
        failures = current.failures + 1
        if failures >= h.failure_threshold or current.reason == "probe":
            backoff = min(h.circuit_seconds * 2 ** max(failures - h.failure_threshold, 0),
                          h.max_circuit_seconds)
            return Health(HealthState.CIRCUIT_OPEN, reason, now + _jitter(backoff, h, rng),
                          failures)
        return Health(HealthState.HEALTHY, reason, 0.0, failures)
    return current  # 4xx caller faults and 429 leave the key's own record alone


def after_rate_limit(current: Health, report: UsageReport, now: float, q: QuotaSettings,
                     h: HealthSettings, rng: random.Random) -> Health:
    """The account's cooldown after a 429: until the provider's reset, else Retry-After, else
    exponential backoff with jitter."""
    failures = current.failures + 1
    reset = (report.ratelimit_reset_ms or 0) / 1000.0
    if reset > now:
        until = reset
    elif report.retry_after is not None and report.retry_after > 0:
        until = now + report.retry_after
    else:
        backoff = min(q.cooldown_seconds * 2 ** (failures - 1), q.max_cooldown_seconds)
        until = now + _jitter(backoff, h, rng)
    return Health(HealthState.COOLING_DOWN, "http_429", until, failures)


def is_probe_slot(current: Health, now: float) -> bool:
    """A circuit whose backoff has passed (half-open): the next lease is its probe."""
    return current.state is HealthState.CIRCUIT_OPEN and current.until <= now


def probe_started(current: Health, now: float, h: HealthSettings) -> Health:
    """Hold other leases off a half-open key while its probe is out."""
    return Health(HealthState.CIRCUIT_OPEN, "probe", now + h.probe_timeout, current.failures)
