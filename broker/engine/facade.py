"""``LeaseEngine``: one object for the API layer, the probes and the broker's loops.

It wires the rooms of the engine (key registry, quota ledger, health book, leasing,
admin) and forwards to them; it holds no logic of its own beyond the key lifecycle
(start, sweep) and provider probes, which touch several rooms.
"""

from __future__ import annotations

import random
import secrets
from collections.abc import Callable, Sequence

from ..audit import Audit, AuditEvent
from ..clock import Clock, day_window
from ..config import Settings
from ..models import Health, Key, LeaseRecord, UsageReport
from ..paging import Page
from ..store import StateStore
from ..usage import Dimension, UsageSummary
from .admin import Admin
from .config import EngineConfig
from .healthbook import HealthBook
from .keys import KeyRegistry
from .leasing import Leasing
from .ledger import Ledger
from .types import (
    Caller,
    CreditLimitView,
    InternalRoute,
    KeySnapshot,
    KeySource,
    KeyView,
    LeaseGrant,
    LeaseRequest,
    ModelChooser,
    ReloadResult,
)

__all__ = ["PRUNE_GRACE", "LeaseEngine"]

PRUNE_GRACE = 300.0
"""Seconds an ended quota window is kept (by the pruning replica's clock) before it is
deleted: replicas whose clocks lag behind by up to this much still find its count."""


class LeaseEngine:
    """Leases keys under per-account and per-key day/minute quotas.

    It knows nothing of gRPC, Vault, SQLite or Redis: keys come from a KeySource,
    state lives in a StateStore, time comes from a Clock, permissions from the
    Caller the API layer hands in.
    """

    def __init__(
        self,
        *,
        store: StateStore,
        keys: KeySource,
        clock: Clock,
        settings: Settings,
        audit: Audit | None = None,
        new_lease_id: Callable[[], str] = lambda: "ls_" + secrets.token_hex(16),
        rng: random.Random | None = None,
        models: ModelChooser | None = None,
    ) -> None:
        config = EngineConfig.from_settings(settings)
        audit = audit or Audit()
        rng = rng or random.Random()
        self._store = store
        self._clock = clock
        self._config = config
        self._audit = audit
        self._ledger = Ledger(store, clock, config, audit)
        self._health = HealthBook(store, config, audit, rng)
        self._registry = KeyRegistry(keys, config.pool_names, audit, self._ledger, self._health)
        self._leasing = Leasing(store=store, clock=clock, config=config, audit=audit,
                                registry=self._registry, ledger=self._ledger,
                                health=self._health, models=models, new_lease_id=new_lease_id,
                                rng=rng)
        self._admin = Admin(store=store, clock=clock, config=config, audit=audit,
                            registry=self._registry, health=self._health)

    # -- lifecycle -----------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """True once keys have been loaded at least once."""
        return self._registry.loaded

    async def start(self) -> None:
        """Load health and live counters from the store (keys come with reload_keys)."""
        await self._health.load()
        await self._ledger.refresh(self._clock.now())

    async def reload_keys(self) -> ReloadResult:
        """Re-read every key from the source. On failure the current keys stay in use."""
        return await self._registry.reload()

    async def sweep(self, *, refresh: bool = True) -> list[LeaseRecord]:
        """Expire overdue leases (audited), prune old state, refresh the counter cache."""
        now = self._clock.now()
        expired = await self._store.expire_due(now)
        for lease in expired:
            self._audit.record(AuditEvent.LEASE_EXPIRED, decision="expired",
                               principal=lease.principal, rpc="", pool=lease.pool,
                               key_id=lease.key_id, lease_id=lease.lease_id, units=lease.units,
                               held_seconds=round(lease.expires_at - lease.created_at, 3),
                               reason="ttl elapsed; units stay spent")
        if refresh:
            keep = self._config.lease
            # windows are dropped only PRUNE_GRACE after they end by this replica's clock: a
            # peer whose clock lags still charges them, and must find their counts
            await self._store.prune(now - PRUNE_GRACE, keep.retention_days * 86400.0,
                                    keep.usage_retention_days * 86400.0)
            await self._ledger.refresh(now)
            await self._health.load_health()
        return expired

    async def end_leases(self, key_id: str, account: str) -> list[LeaseRecord]:
        """End the active leases of a revoked key (stop new ones first: ``set_enabled``):
        each becomes REVOKED, its units stay spent, ReportUsage and Complete on it are still
        accepted. The leases are sought in the loaded key's account, else in ``account``."""
        key = self._registry.keys.get(key_id)
        return await self._store.end_leases(key.account if key is not None else account,
                                            key_id, self._clock.now())

    # -- KeyBroker -----------------------------------------------------------------------

    async def lease(self, caller: Caller, req: LeaseRequest) -> LeaseGrant | InternalRoute:
        """Reserve ``units`` on one key of the pool, atomically, or explain why not."""
        return await self._leasing.lease(caller, req)

    async def renew(self, caller: Caller, lease_id: str, ttl: float | None) -> LeaseRecord:
        return await self._leasing.renew(caller, lease_id, ttl)

    async def report(self, caller: Caller, lease_id: str, report: UsageReport) -> Health:
        """Record a provider answer; update key/account health and reconcile counters."""
        return await self._leasing.report(caller, lease_id, report)

    async def complete(self, caller: Caller, lease_id: str, used: bool) -> LeaseRecord:
        return await self._leasing.complete(caller, lease_id, used)

    # -- provider probes -----------------------------------------------------------------

    async def apply_probe(self, key_id: str, status: int, daily_limit: int | None,
                          daily_remaining: int | None, *,
                          observed_at: float | None = None,
                          credit_limit: CreditLimitView | None = None) -> None:
        """Fold one key probe (the provider's ``GET /key``, which costs no quota) into state.

        A 401 disables the key (reason ``probe_401``) before any caller is handed it. A
        200 with the provider's free-model ``daily_remaining`` sets the account's day
        counter: the broker never believes more is left than the provider says, nor
        forgets requests the provider counted, and keeps the units of leases still in
        flight (their calls may not have reached the provider yet). Other answers say
        nothing of the key's serving health and are ignored.
        """
        keys = self._registry.keys
        key = keys.get(key_id)
        if key is None:
            return
        if status == 401:
            await self._health.probe_unauthorized(key)
            return
        now = self._clock.now()
        if status == 200 and credit_limit is not None:
            await self._health.credit_probed(key, credit_limit.limit, credit_limit.remaining,
                                             credit_limit.reset, now)
        if status != 200 or daily_remaining is None or (
                observed_at is not None and day_window(observed_at)[0] != day_window(now)[0]):
            return  # nothing to believe, or an answer about a day that has ended
        await self._ledger.apply_probe(key, daily_limit, daily_remaining, keys, now)

    # -- KeyAdmin ------------------------------------------------------------------------

    async def list_keys(self, caller: Caller, pool: str, page_size: int = 0,
                        page_token: str = "") -> Page[KeyView]:
        """One page of the keys the caller may list (``Admin.list_keys``)."""
        return await self._admin.list_keys(caller, pool, page_size, page_token)

    async def cooldowns(self, caller: Caller, pool: str) -> list[tuple[str, str, str, Health]]:
        """Model (pool-wide) and account paid-use cooldowns the caller may see."""
        return await self._admin.cooldowns(caller, pool)

    async def get_key(self, caller: Caller, key_id: str) -> KeyView:
        return await self._admin.get_key(caller, key_id)

    async def set_enabled(self, caller: Caller, key_id: str, enabled: bool,
                          reason: str) -> KeyView:
        return await self._admin.set_enabled(caller, key_id, enabled, reason)

    async def clear_cooldown(self, caller: Caller, account: str, key_id: str,
                             reason: str) -> list[KeyView]:
        """End an account's (or one key's) cooldown; an operator's decision, audited."""
        return await self._admin.clear_cooldown(caller, account, key_id, reason)

    async def usage(self, caller: Caller, days: int, by: Sequence[Dimension], pool: str,
                    page_size: int = 0, page_token: str = "") -> Page[UsageSummary]:
        """One page of what ReportUsage recorded over the last ``days`` UTC days (today
        included), grouped by ``by``; only pools the caller may read usage of."""
        return await self._admin.usage(caller, days, by, pool, page_size, page_token)

    async def reload(self, caller: Caller) -> ReloadResult:
        """ReloadKeys: reload now, audited with the operator's name."""
        return await self._admin.reload(caller)

    def snapshot(self) -> list[KeySnapshot]:
        """Every key's health and today's quota from the engine's cache (for metrics and
        alerts: no store I/O, so it may trail other replicas by a sweep)."""
        health = self._health

        def shown(key: Key, now: float) -> Health:
            return health.key_health(key, key.key_id, key.account, now)

        return self._ledger.snapshot(self._registry.keys.values(), shown, self._clock.now())
