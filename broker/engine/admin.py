"""KeyAdmin: list and inspect keys, enable or disable them, usage, reload."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from ..audit import Audit, AuditEvent
from ..clock import Clock, day_window
from ..errors import InvalidArgument, PermissionDenied
from ..models import HealthState, Key
from ..rpcs import Rpc
from ..store import StateStore
from ..usage import Dimension, UsageSummary, summarize
from ..validate import check_key_id, check_name, check_text
from .config import EngineConfig
from .healthbook import HealthBook
from .keys import KeyRegistry
from .types import Caller, KeyView, ReloadResult
from .windows import account_day, key_day

__all__ = ["Admin"]


class Admin:
    """The operator's view of the key pool."""

    def __init__(self, *, store: StateStore, clock: Clock, config: EngineConfig, audit: Audit,
                 registry: KeyRegistry, health: HealthBook) -> None:
        self._store = store
        self._clock = clock
        self._config = config
        self._audit = audit
        self._registry = registry
        self._health = health

    async def list_keys(self, caller: Caller, pool: str) -> list[KeyView]:
        check_name("pool", pool, required=False)
        if pool:
            caller.require(Rpc.LIST_KEYS, pool)
            return await self._views(self._registry.pool(pool).keys)
        if not caller.may_any(Rpc.LIST_KEYS):
            raise PermissionDenied(f"{caller.principal} may not call {Rpc.LIST_KEYS}")
        self._registry.require_ready()
        return await self._views([k for name, p in sorted(self._registry.pools.items())
                                  if caller.may(Rpc.LIST_KEYS, name) for k in p.keys])

    async def get_key(self, caller: Caller, key_id: str) -> KeyView:
        key = self._known_key(caller, key_id, Rpc.GET_KEY)
        return (await self._views([key]))[0]

    async def set_enabled(self, caller: Caller, key_id: str, enabled: bool,
                          reason: str) -> KeyView:
        check_text("reason", reason, 256)
        key = self._known_key(caller, key_id, Rpc.SET_KEY_ENABLED)
        await self._health.set_enabled(key, enabled)
        self._audit.record(AuditEvent.KEY_ENABLED if enabled else AuditEvent.KEY_DISABLED,
                           decision="enabled" if enabled else "disabled",
                           principal=caller.principal, rpc=Rpc.SET_KEY_ENABLED, pool=key.pool,
                           key_id=key.key_id, reason=reason or "operator")
        return (await self._views([key]))[0]

    async def usage(self, caller: Caller, days: int, by: Sequence[Dimension],
                    pool: str) -> list[UsageSummary]:
        """What ReportUsage recorded over the last ``days`` UTC days (today included),
        grouped by ``by``; only pools the caller may read usage of."""
        check_name("pool", pool, required=False)
        if not 1 <= days <= 366:
            raise InvalidArgument("days", "must be 1 to 366")
        if len(set(by)) != len(by):
            raise InvalidArgument("group_by", "repeats a dimension")
        if pool:
            caller.require(Rpc.GET_USAGE, pool)
        elif not caller.may_any(Rpc.GET_USAGE):
            raise PermissionDenied(f"{caller.principal} may not call {Rpc.GET_USAGE}")
        now = self._clock.now()
        until, _ = day_window(now)
        since, _ = day_window(now - (days - 1) * 86400.0)
        rows = [r for r in await self._store.usage(since, until)
                if (not pool or r.key_id.startswith(pool + "/"))
                and caller.may(Rpc.GET_USAGE, r.key_id.partition("/")[0])]
        return summarize(rows, by)

    async def reload(self, caller: Caller) -> ReloadResult:
        caller.require(Rpc.RELOAD_KEYS, "*")
        return await self._registry.reload(caller.principal, Rpc.RELOAD_KEYS)

    def _known_key(self, caller: Caller, key_id: str, rpc: Rpc) -> Key:
        pool, _ = check_key_id(key_id)
        caller.require(rpc, pool)
        return self._registry.key(key_id)

    async def _views(self, keys: Sequence[Key]) -> list[KeyView]:
        await self._health.load_health()  # the store's records, whichever replica wrote them
        now = self._clock.now()
        day, _ = day_window(now)
        names: list[tuple[str, str]] = []
        for k in keys:
            names += [(k.account, key_day(k.key_id, k.account, day)),
                      (k.account, account_day(k.account, day))]
        used = await self._store.counters(names)
        active: Mapping[str, int] = await self._store.active_leases(now)
        views = []
        for k in keys:
            daily, minute = self._config.limits(k.pool, k.account)
            health = self._health.key_health(k, k.key_id, k.account, now)
            views.append(KeyView(
                key=k, enabled=health.state is not HealthState.DISABLED, health=health.state,
                health_reason=health.reason, cooldown_until=health.until,
                used_today=used[key_day(k.key_id, k.account, day)], account_daily_limit=daily,
                account_minute_limit=minute,
                account_used_today=used[account_day(k.account, day)],
                key_daily_limit=k.daily_limit or 0, active_leases=active.get(k.key_id, 0),
                strategy=self._config.pool(k.pool).strategy,
            ))
        return views
