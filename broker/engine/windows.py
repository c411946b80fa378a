"""The one place that names quota windows and health subjects.

Every counter and health record the engine keeps in the store is named here (the
shape of envoy ratelimit's ``cache_key.go``). Per-key windows name the account too,
so they live with the account's windows (one Redis Cluster slot); a key moved to
another account has its counts carried over on reload. A principal's windows span the
pool's accounts (their names start with ``store.base.SHARED_WINDOW``, so a store keeps them
apart): they are charged with every candidate of the principal's reservation.
"""

from __future__ import annotations

import math

from ..clock import day_window, minute_window
from ..models import Key, PrincipalLimits, Window
from ..store.base import SHARED_WINDOW

__all__ = ["UNLIMITED", "account_day", "account_minute", "account_paid_subject",
           "account_subject", "is_paid_model", "key_day", "key_minute", "key_subject",
           "model_scope", "model_subject", "principal_day", "principal_minute",
           "principal_subject", "principal_windows", "windows_for"]

UNLIMITED = 1 << 62  # a key with no limit of its own still gets a per-day counter


def account_day(account: str, day: str) -> str:
    """The account's counter for the UTC ``day`` (``YYYY-MM-DD``)."""
    return f"acct:{account}:d:{day}"


def account_minute(account: str, minute: str) -> str:
    """The account's counter for one UTC minute (as ``minute_window`` names it)."""
    return f"acct:{account}:m:{minute}"


def key_day(key_id: str, account: str, day: str) -> str:
    """The key's own counter for the UTC ``day``, under the account it is in."""
    return f"key:{key_id}@{account}:d:{day}"


def key_minute(key_id: str, account: str, minute: str) -> str:
    """The key's own counter for one UTC minute, under the account it is in."""
    return f"key:{key_id}@{account}:m:{minute}"


def key_subject(key_id: str) -> str:
    """The health record of one key (disabled, circuit)."""
    return f"key:{key_id}"


def account_subject(account: str) -> str:
    """The health record of an account (429 cooldown, shared by its keys)."""
    return f"account:{account}"


def account_paid_subject(account: str) -> str:
    """The record of an account's paid use (in-flight budget cooldown, credit stop): it
    blocks leases for paid models only, and lives with the account's other records."""
    return f"{account_subject(account)}/paid"


def model_subject(pool: str, model: str) -> str:
    """The pool-wide record of one model (an upstream provider's 429 cools the model for
    every account of the pool)."""
    return f"model:{pool}/{model}"


def model_scope(pool: str) -> str:
    """Where a pool's model records are kept: the store keeps them with this name as if it
    were an account (on Redis: their own hash, read before the reservation)."""
    return f"models@{pool}"


def is_paid_model(model: str) -> bool:
    """Whether a lease for ``model`` spends credits: a named model without OpenRouter's
    ``:free`` suffix (a lease naming no model is not judged paid)."""
    return bool(model) and not model.endswith(":free")


def windows_for(key: Key, limits: tuple[int, int], now: float) -> tuple[Window, ...]:
    """The windows a lease on ``key`` at ``now`` is charged to, given the account's
    ``(daily, minute)`` limits: the account's day and minute, the key's day (unlimited
    unless the key has a limit of its own) and, when it has one, the key's minute."""
    daily, minute = limits
    day, day_end = day_window(now)
    mins, min_end = minute_window(now)
    acct, kid = key.account, key.key_id
    windows = [
        Window(account_day(acct, day), daily, day_end, f"{account_subject(acct)}/day"),
        Window(account_minute(acct, mins), minute, min_end, f"{account_subject(acct)}/minute"),
        Window(key_day(kid, acct, day), key.daily_limit or UNLIMITED, day_end,
               f"{key_subject(kid)}/day"),
    ]
    if key.minute_limit:
        windows.append(Window(key_minute(kid, acct, mins), key.minute_limit, min_end,
                              f"{key_subject(kid)}/minute"))
    return tuple(windows)


def principal_subject(principal: str, pool: str) -> str:
    """A principal's own limits on a pool (the QuotaFailure subject names whose)."""
    return f"{SHARED_WINDOW}{principal}@{pool}"


def principal_day(principal: str, pool: str, day: str) -> str:
    """The principal's counter on ``pool`` for the UTC ``day``, across the pool's accounts."""
    return f"{principal_subject(principal, pool)}:d:{day}"


def principal_minute(principal: str, pool: str, minute: str) -> str:
    """The principal's counter on ``pool`` for one UTC minute, across the pool's accounts."""
    return f"{principal_subject(principal, pool)}:m:{minute}"


def principal_windows(principal: str, pool: str, limits: PrincipalLimits | None,
                      capacity: int, now: float) -> tuple[Window, ...]:
    """The windows a principal's lease on ``pool`` is charged to besides the key's: its day
    (the smaller of ``daily`` and ``daily_share`` of the pool's daily ``capacity``) and its
    minute, each only when the policy sets it."""
    if limits is None:
        return ()
    subject = principal_subject(principal, pool)
    out = []
    day_limits = [limits.daily] if limits.daily is not None else []
    if limits.daily_share is not None:
        day_limits.append(math.floor(limits.daily_share * capacity))
    if day_limits:
        day, day_end = day_window(now)
        out.append(Window(principal_day(principal, pool, day), min(day_limits), day_end,
                          f"{subject}/day"))
    if limits.minute is not None:
        mins, min_end = minute_window(now)
        out.append(Window(principal_minute(principal, pool, mins), limits.minute, min_end,
                          f"{subject}/minute"))
    return tuple(out)
