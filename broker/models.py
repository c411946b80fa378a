"""Domain types shared by the engine, the stores and the key source."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import NoReturn

__all__ = [
    "Health",
    "HealthState",
    "Key",
    "KeyStats",
    "LeaseRecord",
    "LeaseStatus",
    "Priority",
    "Secret",
    "UsageReport",
    "UsageRow",
    "Window",
]


class Secret:
    """A provider key held in memory only. ``repr``/``str`` never show it."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('**********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __reduce__(self) -> NoReturn:  # never pickled into a file or a queue
        raise TypeError("Secret cannot be pickled")


@dataclass(frozen=True)
class Key:
    """One provider key as loaded from Vault.

    Attributes:
        pool: the pool the key belongs to.
        name: its name within the pool.
        account: quota group; ``key:<key_id>`` when the key names none.
        secret: the decrypted provider key.
        base_url: provider base URL.
        models: models the key may serve; empty means any.
        enabled: the ``enabled`` flag in Vault.
        daily_limit: the key's own daily limit, or None for the account's only.
        minute_limit: the key's own per-minute limit, or None.
        version: KV version the key was read at (changes when it is rewritten).
    """

    pool: str
    name: str
    account: str
    secret: Secret = field(repr=False, compare=True)
    base_url: str = "https://openrouter.ai/api/v1"
    models: tuple[str, ...] = ()
    enabled: bool = True
    daily_limit: int | None = None
    minute_limit: int | None = None
    version: int = 0

    @property
    def key_id(self) -> str:
        return f"{self.pool}/{self.name}"

    def serves(self, model: str) -> bool:
        return not model or not self.models or model in self.models


class Priority(enum.IntEnum):
    HIGH = 1
    NORMAL = 2
    LOW = 3


class LeaseStatus(enum.StrEnum):
    ACTIVE = "active"
    COMPLETED = "completed"
    EXPIRED = "expired"
    REVOKED = "revoked"
    """Ended by the revocation of its key (``end_leases``): no renewal, units stay spent;
    reports and Complete are still accepted."""


@dataclass(frozen=True)
class Window:
    """One quota window a reservation is charged against.

    ``name`` is the counter's storage name (it carries the window id, e.g. the
    UTC date), ``limit`` the most units it may hold, ``ends_at`` when it resets.
    """

    name: str
    limit: int
    ends_at: float
    label: str  # human-readable subject for QuotaFailure, e.g. "account:acme/day"


@dataclass(frozen=True)
class PrincipalLimits:
    """What one principal may lease from one pool, beside the keys' and accounts' quotas:
    units per UTC day and per minute, and a share of the pool's daily capacity (None: no
    such limit). Charged in the same atomic reservation as the account windows."""

    daily: int | None = None
    minute: int | None = None
    daily_share: float | None = None


@dataclass(frozen=True)
class LeaseRecord:
    """A lease as the store keeps it. Holds no secret."""

    lease_id: str
    principal: str
    request_id: str
    pool: str
    key_id: str
    account: str
    model: str
    units: int
    created_at: float
    expires_at: float
    status: LeaseStatus
    refunded: bool
    windows: tuple[str, ...]  # counter names charged, to refund exactly those
    key_version: int = 0
    """The key's KV version when it was granted (its secret then); 0: not known."""
    finished_at: float = 0.0
    """When the lease was completed or expired; 0 while active."""

    def ended_at(self) -> float:
        """When the lease ended (or will end: its expiry while still active)."""
        if self.status is not LeaseStatus.ACTIVE and self.finished_at:
            return min(self.finished_at, self.expires_at)
        return self.expires_at

    def active_at(self, now: float) -> bool:
        return self.status is LeaseStatus.ACTIVE and now < self.expires_at


class HealthState(enum.StrEnum):
    HEALTHY = "healthy"
    COOLING_DOWN = "cooling_down"
    CIRCUIT_OPEN = "circuit_open"
    DISABLED = "disabled"


@dataclass(frozen=True)
class Health:
    """Broker-side health of a key (disable, circuit) or account (cooldown)."""

    state: HealthState = HealthState.HEALTHY
    reason: str = ""
    until: float = 0.0  # cooldown / circuit end; 0 when not applicable
    failures: int = 0  # consecutive failures, for backoff


@dataclass(frozen=True)
class KeyStats:
    """Decayed performance of a key, learned from ReportUsage (for the smarter strategies).

    ``successes`` and ``failures`` are exponentially decayed counts; ``latency_ms``
    is an exponentially weighted mean of successful calls; ``updated_at`` is when
    the last report arrived.
    """

    successes: float = 0.0
    failures: float = 0.0
    latency_ms: float = 0.0
    updated_at: float = 0.0


LATENCY_BUCKETS_MS = (100, 250, 500, 1000, 2000, 4000, 8000, 16000, 32000)
"""Upper bounds of the latency histogram kept per usage row (one more bucket: above)."""


def latency_bucket(latency_ms: int) -> int:
    for i, bound in enumerate(LATENCY_BUCKETS_MS):
        if latency_ms <= bound:
            return i
    return len(LATENCY_BUCKETS_MS)


@dataclass(frozen=True)
class UsageRow:
    """What ReportUsage recorded for one (day, key, account, model, principal)."""

    day: str
    key_id: str
    account: str
    model: str
    principal: str
    requests: int
    failures: int
    prompt_tokens: int
    completion_tokens: int
    cost: float
    latency_ms_sum: int
    latency_buckets: tuple[int, ...]  # counts per LATENCY_BUCKETS_MS bucket, plus one above


@dataclass(frozen=True)
class UsageReport:
    """What the provider answered for a leased call."""

    http_status: int
    error_type: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float = 0.0
    latency_ms: int = 0
    ratelimit_limit: int | None = None
    ratelimit_remaining: int | None = None
    ratelimit_reset_ms: int | None = None
    retry_after: float | None = None
    model: str = ""
    error_reason: str = ""
    """The provider's error reason/code string (``in_flight_budget_exhausted``, ...)."""
    limit_source: str = ""
    """The error body's ``metadata.limit_source`` (``openrouter_key_limit``, ...)."""
    upstream_provider: str = ""
    """The upstream provider's name when the error came from it, not from OpenRouter."""
    resets_at: float | None = None
    """When a spent budget or credit limit resets (epoch seconds), when the provider said."""
