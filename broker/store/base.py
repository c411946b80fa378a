"""The StateStore protocol every backend implements, and the values it trades in."""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from ..models import Health, KeyStats, LeaseRecord, UsageReport, UsageRow, Window

__all__ = ["Candidate", "Rejection", "Reservation", "ReserveRequest", "StateStore", "account_tag",
           "lease_id_in"]

TAG_HEX = 12  # hex digits of an account's tag; a lease id ends in its account's tag


@functools.lru_cache(maxsize=4096)  # a handful of accounts, hashed on every reservation
def account_tag(account: str) -> str:
    """An account's tag: 12 hex digits of the BLAKE2b hash of its name (the Redis store's
    hash tag, so every key of one account lives in one Redis Cluster slot)."""
    return hashlib.blake2b(account.encode(), digest_size=TAG_HEX // 2).hexdigest()


def lease_id_in(lease_id: str, account: str) -> str:
    """The id a lease proposed as ``lease_id`` gets when granted in ``account``: its last 12
    hex digits become the account's tag, so the lease's account (and Redis Cluster slot)
    is known from its id alone. Every store does this, so ids do not depend on the store."""
    return lease_id[:-TAG_HEX] + account_tag(account)


@dataclass(frozen=True)
class Candidate:
    """A key the engine would lease, with every window a lease on it is charged to."""

    key_id: str
    account: str
    windows: tuple[Window, ...]
    key_version: int = 0
    """The key's KV version (kept in the lease: a replay hands out only the secret granted)."""


@dataclass(frozen=True)
class ReserveRequest:
    """One atomic reservation attempt over candidates, tried in the given order.

    ``lease_id`` is ``ls_`` and 32 hex digits; the granted lease's id is
    ``lease_id_in(lease_id, account)`` of the account charged: callers use
    ``Reservation.lease.lease_id``.
    """

    lease_id: str
    principal: str
    request_id: str
    pool: str
    model: str
    units: int
    created_at: float
    expires_at: float
    candidates: Sequence[Candidate]


@dataclass(frozen=True)
class Reservation:
    """A granted lease. ``used`` holds each charged window's count after the charge.

    ``replay`` is true when the request_id matched an earlier lease: nothing new
    was charged and ``lease`` is that earlier lease.
    """

    lease: LeaseRecord
    used: Mapping[str, int]
    replay: bool = False


@dataclass(frozen=True)
class Rejection:
    """No candidate fitted. ``used`` holds the current count of every window looked at."""

    used: Mapping[str, int]


class StateStore(Protocol):
    """Everything the broker must not lose. Implementations are atomic per call."""

    async def reserve(self, request: ReserveRequest) -> Reservation | Rejection:
        """Charge the first candidate whose windows all have room and record the lease.

        Checks the idempotency record (principal, request_id) first. All of it is
        one transaction: either the lease exists and every window is charged, or
        nothing changed.
        """
        ...

    async def get_lease(self, lease_id: str) -> LeaseRecord | None: ...

    async def renew(self, lease_id: str, expires_at: float, now: float) -> LeaseRecord:
        """Move an active lease's expiry. Raises LeaseNotActive when it is not active."""
        ...

    async def complete(self, lease_id: str, used: bool, now: float) -> tuple[LeaseRecord, bool]:
        """End a lease; refund its windows when ``used`` is false and it was still active.

        Returns the lease after the call and whether this call changed it.
        Raises LeaseNotFound.
        """
        ...

    async def expire_due(self, now: float, limit: int = 500) -> list[LeaseRecord]:
        """Mark active leases past their expiry as expired and return them. A call may stop
        after ``limit`` of them (SQLite: in all; Redis: per account); the next call goes on."""
        ...

    async def counters(self, windows: Sequence[tuple[str, str]]) -> dict[str, int]:
        """Current counts of the given ``(account, window name)`` windows, by name (absent
        ones are 0). The account says where a window lives (its Redis Cluster slot)."""
        ...

    async def live_counters(self, now: float) -> dict[str, int]:
        """Every window that has not ended yet."""
        ...

    async def set_counter(self, account: str, name: str, used: int, expires_at: float,
                          now: float) -> None:
        """Overwrite one window of ``account`` (reconciling with the provider)."""
        ...

    async def health(self) -> dict[str, Health]:
        """Every recorded health, by subject (``key:<key_id>`` or ``account:<name>``)."""
        ...

    async def put_health(self, subject: str, health: Health) -> None: ...

    async def record_usage(self, lease: LeaseRecord, report: UsageReport, now: float) -> None:
        """Add one provider answer to the per-day usage statistics."""
        ...

    async def usage(self, since_day: str, until_day: str) -> list[UsageRow]:
        """Recorded usage rows with ``since_day <= day <= until_day`` (``YYYY-MM-DD``)."""
        ...

    async def key_stats(self) -> dict[str, KeyStats]:
        """Every key's learned performance, by key_id."""
        ...

    async def put_key_stats(self, key_id: str, stats: KeyStats) -> None: ...

    async def active_leases(self, now: float) -> Mapping[str, int]:
        """Count of active leases per key_id."""
        ...

    async def prune(self, now: float, retention_seconds: float,
                    usage_retention_seconds: float = 30 * 86400.0) -> int:
        """Delete ended windows, leases finished longer ago than the retention, and usage
        rows older than the usage retention."""
        ...

    async def close(self) -> None: ...
