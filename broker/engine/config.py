"""The engine's own, narrow view of the broker's settings."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..config import HealthSettings, LeaseSettings, PoolSettings, QuotaSettings, Settings

__all__ = ["EngineConfig"]


@dataclass(frozen=True)
class EngineConfig:
    """What the lease engine reads of the settings, built in one place (``from_settings``)."""

    pool_names: tuple[str, ...]
    """Pools named in the settings: known (and exhausted) even before a key is loaded."""
    pool: Callable[[str], PoolSettings]
    """A pool's settings (defaults for a pool the settings do not name)."""
    limits: Callable[[str, str], tuple[int, int]]
    """(daily, minute) limits of an account when leased through a pool."""
    lease: LeaseSettings
    """Lease TTLs, unit bounds and retention."""
    health: HealthSettings
    """Circuit breaker and performance statistics."""
    quota: QuotaSettings
    """429 cooldown backoff."""
    retry_when_stuck: float
    """RetryInfo of a refusal no key frees up from by itself (an operator or a key reload
    must act): the key reload interval."""

    @classmethod
    def from_settings(cls, settings: Settings) -> EngineConfig:
        return cls(pool_names=tuple(settings.pools), pool=settings.pool,
                   limits=settings.limits, lease=settings.lease, health=settings.health,
                   quota=settings.quota, retry_when_stuck=settings.vault.reload_interval)
