"""The key health state machine, as pure functions of (state, event, time).

    healthy --429--> cooling_down (account-wide) --reset time passes--> healthy
    healthy --N x 5xx/408/timeout--> circuit_open --backoff passes--> half-open
    half-open --one probe lease--> probing --success--> healthy
                                           --failure--> circuit_open (longer)
                                           --no report within probe_timeout--> half-open
    any --401 or operator--> disabled --operator re-enables or Vault secret changes--> healthy

Provider budget and credit errors (``classify``) are cooldowns that end by themselves,
never a disable (but for a key credit limit that never resets):

    402 in_flight_budget_exhausted --> the account's paid use cools for Retry-After
    402 weight_exceeds_budget      --> nothing (the request was too big; the caller shrinks it)
    402 openrouter_key_limit       --> the key cools until its limit resets (the probe of
                                       /key refines it; a limit with no reset disables it)
    402 credits (paid model)       --> the account's paid use stops; re-checked after a backoff
                                       (a probe or a paid success shows credit)
    402 on a free model            --> the balance is negative: the whole account stops likewise
    403 budget (resets_at)         --> the key cools until resets_at
    429 from an upstream provider  --> the model cools pool-wide (not the account)

Half-open is ``circuit_open`` whose ``until`` has passed; a probe in flight is
``circuit_open`` with reason ``probe``.
"""

from __future__ import annotations

import enum
import random
from datetime import UTC, datetime, timedelta

from ..config import HealthSettings, QuotaSettings
from ..models import Health, HealthState, UsageReport
from ..store.base import IN_FLIGHT_CAP_SECONDS

__all__ = [
    "BUDGET_SOURCES",
    "CALLER_FAULTS",
    "CREDIT_STOPS",
    "REASONS",
    "Condition",
    "after_key_report",
    "after_rate_limit",
    "classify",
    "cooldown_until_reset",
    "credit_stop",
    "describe_reason",
    "in_flight_cooldown",
    "is_probe_slot",
    "key_fault",
    "limit_resets_at",
    "model_cooldown",
    "probe_started",
]


CALLER_FAULTS = frozenset({400, 403, 404, 413, 422})
"""Provider statuses that blame the caller's request, not the key."""


CREDIT_STOPS = frozenset({"no_credits", "negative_balance"})
"""Reasons of an account stopped for credit (an alert fires while one holds)."""

BUDGET_SOURCES = frozenset({"openrouter_guardrail_budget", "openrouter_workspace_budget",
                            "openrouter_key_limit"})
"""``limit_source`` values of a 403 that says a budget is spent until ``resets_at``."""


class Condition(enum.StrEnum):
    """What a provider error means for the pool (the value is the reason recorded)."""

    OTHER = ""
    RATE_LIMIT = "http_429"  # the account's free-model minute or day limit
    UPSTREAM_RATE_LIMIT = "upstream_429"  # the model's upstream provider, for everyone
    IN_FLIGHT_BUDGET = "in_flight_budget"  # too many paid requests in flight for the balance
    OVERSIZED = "weight_exceeds_budget"  # this one request costs more than the whole budget
    KEY_LIMIT = "key_limit"  # the key's own credit limit is spent
    NO_CREDITS = "no_credits"  # the balance cannot cover paid requests
    NEGATIVE_BALANCE = "negative_balance"  # even free models fail
    BUDGET = "budget_exceeded"  # a 403 guardrail / workspace / key budget until resets_at


REASONS = {
    "http_429": "rate limited (free-model minute or day limit)",
    "upstream_429": "upstream provider rate-limited this model",
    "in_flight_budget": "paid requests in flight exceed the balance's budget",
    "key_limit": "the key's credit limit is spent until it resets",
    "no_credits": "out of credits for paid models (re-checked)",
    "negative_balance": "negative balance: every model stopped (re-checked)",
    "budget_exceeded": "a guardrail/workspace/key budget is spent until it resets",
    "operator": "disabled by an operator",
    "vault": "disabled in Vault",
    "http_401": "the provider rejected the key (401)",
    "probe_401": "a probe found the key rejected (401)",
    "probe": "circuit half-open: one probe lease is out",
    "half_open": "circuit half-open: the next lease probes it",
}
"""Cooldown and disable reasons in words (``keybroker status``, admin views)."""


def describe_reason(reason: str) -> str:
    """A health record's reason in words (``upstream_429:<provider>`` names the provider)."""
    code, _, detail = reason.partition(":")
    words = REASONS.get(code)
    if words is None:
        return reason.replace("_", " ")
    return f"{words} ({detail})" if detail else words


def classify(report: UsageReport, paid: bool) -> Condition:
    """What one provider answer means, from its status, reason, ``limit_source`` and
    upstream provider (``paid``: the call was for a paid model)."""
    status, reason, source = report.http_status, report.error_reason, report.limit_source
    if status == 402:
        if "in_flight_budget" in reason or source == "openrouter_in_flight_budget":
            return Condition.IN_FLIGHT_BUDGET
        if reason == "weight_exceeds_budget":
            return Condition.OVERSIZED
        if source == "openrouter_key_limit":
            return Condition.KEY_LIMIT
        # A free model refused for credits means the balance is below zero.
        return Condition.NO_CREDITS if paid else Condition.NEGATIVE_BALANCE
    if status == 403 and source in BUDGET_SOURCES:
        return Condition.BUDGET
    if status == 429:
        if report.ratelimit_reset_ms is None and (
                report.upstream_provider or source == "upstream_provider_shared_pool"):
            return Condition.UPSTREAM_RATE_LIMIT
        return Condition.RATE_LIMIT
    return Condition.OTHER


def key_fault(status: int) -> bool | None:
    """True when the answer counts against the key, False for success, None for caller faults
    and budget/credit answers (they say nothing of how the key serves)."""
    if 200 <= status < 300:
        return False
    if status in CALLER_FAULTS or status == 402:
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
    if status == 401:
        return Health(HealthState.DISABLED, "http_401")
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
    return current  # 4xx caller faults, 402 and 429 leave the key's own record alone (or
    # are cooldowns of their own: ``cooldown_until_reset``, ``credit_stop``, ...)


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


def _backoff(first: float, most: float, failures: int, h: HealthSettings,
             rng: random.Random) -> float:
    return _jitter(min(first * 2 ** max(failures - 1, 0), most), h, rng)


def in_flight_cooldown(current: Health, report: UsageReport, in_flight: int,
                       now: float) -> Health:
    """The account's paid use after ``in_flight_budget_exhausted``: held at a cap of leases in
    flight (kept in ``failures``) for ``IN_FLIGHT_CAP_SECONDS``: the fewest other leases the
    account had in flight when one of this episode's refusals was reported (the provider's
    budget admitted those). When none of its leases were in flight (the budget is filled by
    calls the broker does not see, or by recently finished ones) paid use cools for
    Retry-After (else 1 s) and the cap is 1. Each paid success under the cap raises it by one
    (``in_flight_success``), so a cap learned too low recovers in a few rounds. So callers
    refused together come back a cap at a time, as leases end, instead of all at once."""
    same = current.reason == Condition.IN_FLIGHT_BUDGET and now < current.until + \
        IN_FLIGHT_CAP_SECONDS
    until = current.until if same else now
    if same and current.failures > 0:
        # A refusal reported late sees fewer leases in flight than the provider counted:
        # it lowers the cap, but never below 1 and never into a cooldown.
        return Health(HealthState.COOLING_DOWN, Condition.IN_FLIGHT_BUDGET.value, until,
                      max(1, min(in_flight, current.failures)))
    cap = in_flight
    if cap <= 0:
        wait = (report.retry_after if report.retry_after is not None and report.retry_after > 0
                else 1.0)
        until, cap = max(until, now + wait), 1
    return Health(HealthState.COOLING_DOWN, Condition.IN_FLIGHT_BUDGET.value, until, cap)


def in_flight_success(current: Health, now: float) -> Health | None:
    """A paid success while the account is held at an in-flight cap raises the cap by one
    (None: no cap holds)."""
    if (current.reason != Condition.IN_FLIGHT_BUDGET or current.until > now
            or now >= current.until + IN_FLIGHT_CAP_SECONDS):
        return None
    return Health(HealthState.COOLING_DOWN, current.reason, current.until, current.failures + 1)


def credit_stop(current: Health, condition: Condition, now: float, h: HealthSettings,
                rng: random.Random) -> Health:
    """An account out of credits (paid use) or below zero (all use): stopped until a later
    call shows credit; the next call is let through after a backoff (``circuit_seconds``
    doubling to ``max_circuit_seconds``), and a success or an operator ends the stop."""
    failures = current.failures + 1 if current.reason == condition else 1
    until = now + _backoff(h.circuit_seconds, h.max_circuit_seconds, failures, h, rng)
    return Health(HealthState.COOLING_DOWN, condition.value, until, failures)


def cooldown_until_reset(condition: Condition, resets_at: float | None, now: float) -> Health:
    """A key whose credit limit or budget is spent: cooled until ``resets_at``, else until
    the next 00:00 UTC (the earliest any such limit resets; a key probe refines it)."""
    until = resets_at if resets_at is not None and resets_at > now else _next_midnight(now)
    return Health(HealthState.COOLING_DOWN, condition.value, until, 1)


def model_cooldown(current: Health, report: UsageReport, now: float, q: QuotaSettings,
                   h: HealthSettings, rng: random.Random) -> Health:
    """A model whose upstream provider answered 429: cooled pool-wide for the provider's
    Retry-After, else an exponential backoff from 1 s (at most ``quota.cooldown_seconds``)."""
    failures = current.failures + 1
    if report.retry_after is not None and report.retry_after > 0:
        until = now + report.retry_after
    else:
        until = now + _backoff(1.0, q.cooldown_seconds, failures, h, rng)
    provider = report.upstream_provider[:64] or "upstream"
    return Health(HealthState.COOLING_DOWN, f"{Condition.UPSTREAM_RATE_LIMIT.value}:{provider}",
                  until, failures)


def limit_resets_at(limit_reset: str | None, now: float) -> float | None:
    """When a key credit limit with OpenRouter's ``limit_reset`` (daily, weekly - Mondays -,
    monthly) next resets, at 00:00 UTC; None when it never does."""
    if limit_reset is None:
        return None
    midnight = _next_midnight(now)
    if limit_reset == "daily":
        return midnight
    day = datetime.fromtimestamp(midnight, UTC)
    if limit_reset == "weekly":
        return (day + timedelta(days=(7 - day.weekday()) % 7)).timestamp()
    if limit_reset == "monthly":
        first = day.replace(day=1)
        if first < day:
            first = (first + timedelta(days=32)).replace(day=1)
        return first.timestamp()
    return midnight  # an unknown period: look again tomorrow


def _next_midnight(now: float) -> float:
    return (now // 86400 + 1) * 86400.0
