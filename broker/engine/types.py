"""What goes in and out of the lease engine: its ports and its values."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from ..config import StrategyName
from ..models import HealthState, Key, LeaseRecord, PrincipalLimits, Priority
from ..rpcs import Rpc

__all__ = ["Caller", "CreditLimitView", "InternalRoute", "KeySnapshot", "KeySource", "KeyView", "LeaseGrant",
           "LeaseRequest", "ModelChooser", "ReloadResult"]


class KeySource(Protocol):
    """Where keys come from (Vault in production)."""

    async def load(self) -> list[Key]:
        """Every key, decrypted. Raises BackendUnavailable when the source is unreachable."""
        ...


class CreditLimitView(Protocol):
    """A key's own credit limit as a probe read it (``broker.openrouter.CreditLimit``)."""

    @property
    def limit(self) -> float | None: ...

    @property
    def remaining(self) -> float | None: ...

    @property
    def reset(self) -> str | None: ...


class ModelChooser(Protocol):
    """Picks the model of a ``model="auto"`` lease (the provider's catalog in production)."""

    async def choose(self, pool: str, keys: Sequence[Key],
                     avoid: frozenset[str] = frozenset()) -> str:
        """A model some of ``keys`` serve, by the pool's policy, other than those in
        ``avoid`` (models cooling pool-wide) unless only those fit. Raises InvalidArgument
        when no model fits, BackendUnavailable when the catalog cannot be read."""
        ...


class Caller(Protocol):
    """The authenticated principal of one call and what it may do."""

    @property
    def principal(self) -> str: ...

    def require(self, rpc: Rpc, pool: str) -> None:
        """Raise PermissionDenied unless the principal may call ``rpc`` on ``pool``."""
        ...

    def may(self, rpc: Rpc, pool: str) -> bool: ...

    def may_any(self, rpc: Rpc) -> bool:
        """Whether any grant names ``rpc`` (on whatever pools)."""
        ...

    def may_priority(self, priority: Priority) -> bool:
        """Whether the principal may ask for leases at ``priority`` (high is a grant)."""
        ...

    def limits_for(self, pool: str) -> PrincipalLimits | None:
        """The principal's own limits on ``pool`` (None: only the keys' quotas apply)."""
        ...


@dataclass(frozen=True)
class LeaseRequest:
    pool: str
    model: str = ""
    units: int = 1
    priority: Priority = Priority.NORMAL
    request_id: str = ""
    ttl: float | None = None
    allow_internal: bool = False


@dataclass(frozen=True)
class LeaseGrant:
    """A leased key. ``key`` holds the secret; the API layer copies it into the reply."""

    lease: LeaseRecord
    key: Key
    remaining_key_today: int
    remaining_account_today: int
    resets_at: float


@dataclass(frozen=True)
class InternalRoute:
    """No key: the caller should use its own model."""

    reason: str  # quota_exhausted | all_keys_unhealthy | reserved_for_higher_priority | pacing
    retry_after: float


@dataclass(frozen=True)
class KeyView:
    """What admins see of a key. No secret."""

    key: Key
    enabled: bool
    health: HealthState
    health_reason: str
    cooldown_until: float
    used_today: int
    account_daily_limit: int
    account_minute_limit: int
    account_used_today: int
    key_daily_limit: int
    active_leases: int
    strategy: StrategyName
    key_minute_limit: int = 0


@dataclass(frozen=True)
class KeySnapshot:
    """One key's health and today's quota from the engine's cache (metrics, alerts)."""

    pool: str
    key_id: str
    account: str
    health: HealthState
    key_left: int
    """Units left today through this key: its own limit or its account's, the lower."""
    account_left: int
    account_used: int
    daily_limit: int
    """The account's daily limit."""


@dataclass(frozen=True)
class ReloadResult:
    added: int
    removed: int
    updated: int
    total: int
