"""KeyAdmin: list and inspect keys, enable or disable them, clear cooldowns, usage, reload."""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence

from .. import paging
from ..audit import Audit, AuditEvent
from ..clock import Clock, day_window
from ..errors import InvalidArgument, NotFound, PermissionDenied
from ..models import Health, HealthState, Key
from ..paging import Page
from ..rpcs import Rpc
from ..store import StateStore
from ..usage import Dimension, UsageSummary, summarize
from ..validate import check_key_id, check_name, check_text
from .config import EngineConfig
from .healthbook import HealthBook
from .keys import KeyRegistry
from .types import Caller, KeyView, ReloadResult
from .windows import account_day, account_subject, key_day, key_subject

__all__ = ["LIST_KEYS_MAX_PAGE_BYTES", "LIST_KEYS_MAX_PAGE_SIZE", "LIST_KEYS_PAGE_SIZE",
           "USAGE_PAGE_SIZE", "Admin"]

LIST_KEYS_PAGE_SIZE = 1000
"""Keys in a ListKeys page when the request's page_size is 0."""
LIST_KEYS_MAX_PAGE_SIZE = 10000
"""Most keys in a ListKeys page (a larger page_size is lowered to it): about 1 MB for keys
without model lists (measured), a quarter of gRPC's default 4 MB message limit."""
USAGE_PAGE_SIZE = 1000
"""Rows in a GetUsage page when the request's page_size is 0 (at most lease.usage_max_rows)."""
LIST_KEYS_MAX_PAGE_BYTES = 3 * 1024 * 1024
"""A ListKeys page ends early once its keys' estimated wire size reaches this."""


def _key_info_bytes(key: Key) -> int:
    """An upper estimate of a key's ``KeyInfo`` on the wire: its strings (key_id, pool and
    name hold the names twice) plus 240 bytes for the numbers, timestamps, health reason and
    field tags (a typical key with no models measures about 100)."""
    return (240 + 2 * (len(key.pool) + len(key.name)) + len(key.account.encode())
            + len(key.base_url.encode()) + sum(len(m.encode()) + 3 for m in key.models))


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

    async def list_keys(self, caller: Caller, pool: str, page_size: int = 0,
                        page_token: str = "") -> Page[KeyView]:
        """One page of the keys the caller may list, ordered by pool, then key name (key_id
        order within a pool); ``page_token`` continues after the last key of a page."""
        check_name("pool", pool, required=False)
        size = paging.page_size(page_size, default=LIST_KEYS_PAGE_SIZE,
                                maximum=LIST_KEYS_MAX_PAGE_SIZE)
        scope = (Rpc.LIST_KEYS.value, pool)
        after = paging.decode_token(page_token, scope, width=2)
        if pool:
            caller.require(Rpc.LIST_KEYS, pool)
            pools = [(pool, self._registry.pool(pool))]
        else:
            if not caller.may_any(Rpc.LIST_KEYS):
                raise PermissionDenied(f"{caller.principal} may not call {Rpc.LIST_KEYS}")
            self._registry.require_ready()
            pools = [(name, p) for name, p in sorted(self._registry.pools.items())
                     if caller.may(Rpc.LIST_KEYS, name)]
        keys: list[Key] = []
        for name, p in pools:  # a pool's keys are sorted by key_id, i.e. by name
            if after is not None and name < after[0]:
                continue
            start = (bisect.bisect_right(p.keys, after[1], key=lambda k: k.name)
                     if after is not None and name == after[0] else 0)
            keys += p.keys[start:start + size + 1 - len(keys)]
            if len(keys) > size:
                break
        # Fewer keys than asked when they are large (a key may list many models): a page
        # stays within LIST_KEYS_MAX_PAGE_BYTES, far from gRPC's 4 MB message limit.
        budget, fit = LIST_KEYS_MAX_PAGE_BYTES, 0
        while fit < min(size, len(keys)) and (fit == 0 or budget > 0):
            budget -= _key_info_bytes(keys[fit])
            fit += 1
        token = ""
        if len(keys) > fit:  # more keys than this page holds: there is a next page
            keys = keys[:fit]
            token = paging.encode_token(scope, (keys[-1].pool, keys[-1].name))
        return Page(await self._views(keys), token)

    async def cooldowns(self, caller: Caller, pool: str) -> list[tuple[str, str, str, Health]]:
        """Model and account paid-use cooldowns of the pools the caller may list keys of
        (``HealthBook.cooldowns``); after ``list_keys`` the records are fresh."""
        pools = {name: [k.account for k in p.keys]
                 for name, p in sorted(self._registry.pools.items())
                 if (not pool or name == pool) and caller.may(Rpc.LIST_KEYS, name)}
        return self._health.cooldowns(pools, self._clock.now())

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

    async def clear_cooldown(self, caller: Caller, account: str, key_id: str,
                             reason: str) -> list[KeyView]:
        """End an account's 429 cooldown, or a key's (its account's cooldown and its own open
        circuit); a disabled key stays disabled. Returns the keys it applied to."""
        check_text("reason", reason, 256)
        check_text("account", account, 256)
        if bool(account) == bool(key_id):
            raise InvalidArgument("account", "give exactly one of account or key_id")
        if key_id:
            key = self._known_key(caller, key_id, Rpc.CLEAR_COOLDOWN)
            keys, account = [key], key.account
            own = self._health.get(key_subject(key.key_id))
            if own.state is HealthState.CIRCUIT_OPEN:
                await self._health.set(key.account, key_subject(key.key_id), Health(), key.key_id)
        else:
            if not caller.may_any(Rpc.CLEAR_COOLDOWN):
                raise PermissionDenied(f"{caller.principal} may not call {Rpc.CLEAR_COOLDOWN}")
            self._registry.require_ready()
            keys = sorted((k for k in self._registry.keys.values() if k.account == account),
                          key=lambda k: k.key_id)
            if not keys:
                raise NotFound(f"no loaded key belongs to account {account!r}")
            for pool in sorted({k.pool for k in keys}):
                caller.require(Rpc.CLEAR_COOLDOWN, pool)
        # Written whatever this replica's copy says: another replica may have heard the 429.
        await self._health.set(account, account_subject(account), Health(), keys[0].key_id)
        self._audit.record(AuditEvent.KEY_COOLDOWN_CLEARED, decision="cleared",
                           principal=caller.principal, rpc=Rpc.CLEAR_COOLDOWN,
                           pool=keys[0].pool if key_id else "", key_id=key_id,
                           account=account, reason=reason or "operator")
        return await self._views(keys)

    async def usage(self, caller: Caller, days: int, by: Sequence[Dimension], pool: str,
                    page_size: int = 0, page_token: str = "") -> Page[UsageSummary]:
        """One page of what ReportUsage recorded over the last ``days`` UTC days (today
        included), grouped by ``by`` and ordered by group; only pools the caller may read
        usage of. A page holds at most lease.usage_max_rows rows; ``page_token`` continues
        after the last group of a page (each page counts its days from the day it is read)."""
        check_name("pool", pool, required=False)
        keep = self._config.lease
        if not 1 <= days <= keep.usage_retention_days:
            raise InvalidArgument("days", f"must be 1 to {keep.usage_retention_days} "
                                          "(lease.usage_retention_days: older usage is not kept)")
        if len(set(by)) != len(by):
            raise InvalidArgument("group_by", "repeats a dimension")
        size = paging.page_size(page_size, default=min(USAGE_PAGE_SIZE, keep.usage_max_rows),
                                maximum=keep.usage_max_rows)
        scope = (Rpc.GET_USAGE.value, days, [d.value for d in by], pool)
        after = paging.decode_token(page_token, scope, width=len(by))
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
        summaries = summarize(rows, by)  # sorted by group
        start = (bisect.bisect_right(summaries, after, key=lambda s: s.group)
                 if after is not None else 0)
        page = summaries[start:start + size]
        more = start + size < len(summaries)
        return Page(page, paging.encode_token(scope, page[-1].group) if more else "")

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
                key_daily_limit=k.daily_limit or 0, key_minute_limit=k.minute_limit or 0,
                active_leases=active.get(k.key_id, 0),
                strategy=self._config.pool(k.pool).strategy,
            ))
        return views
