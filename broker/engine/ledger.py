"""The quota ledger: cached window counts, capacity, reconciliation with the provider."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

from ..audit import Audit, AuditEvent
from ..clock import Clock, day_window, minute_window
from ..errors import InvalidArgument
from ..models import Health, Key, LeaseRecord, UsageReport, Window
from ..store import StateStore
from .config import EngineConfig
from .types import KeySnapshot
from .windows import UNLIMITED, account_day, account_minute, key_day, key_minute, windows_for

__all__ = ["Ledger"]


class Ledger:
    """Units used per window. ``used`` is a cache (the store is the truth): reservations
    are judged by the store atomically; the cache only picks candidates and explains."""

    def __init__(self, store: StateStore, clock: Clock, config: EngineConfig,
                 audit: Audit) -> None:
        self._store = store
        self._clock = clock
        self._config = config
        self._audit = audit
        self.used: dict[str, int] = {}  # window name -> units
        self._window_cache: dict[str, tuple[int, Key, tuple[Window, ...]]] = {}
        self._best_capacity: dict[tuple[str, str], tuple[int, bool]] = {}

    async def refresh(self, now: float) -> None:
        """Reload the cache from the store's live counters (in place: the lease path holds it)."""
        live = await self._store.live_counters(now)
        self.used.clear()
        self.used.update(live)

    def keys_changed(self) -> None:
        self._best_capacity = {}

    # -- windows and capacity ------------------------------------------------------------

    def windows(self, key: Key, now: float) -> tuple[Window, ...]:
        """The windows a lease on ``key`` is charged to, memoised per key and minute (this
        runs for every candidate the strategy looks at)."""
        minute_index = int(now // 60)
        cached = self._window_cache.get(key.key_id)
        if cached is not None and cached[0] == minute_index and cached[1] is key:
            return cached[2]
        windows = windows_for(key, self._config.limits(key.pool, key.account), now)
        self._window_cache[key.key_id] = (minute_index, key, windows)
        return windows

    def capacity(self, key: Key) -> int:
        """The most units one lease on ``key`` could ever take."""
        daily, minute = self._config.limits(key.pool, key.account)
        return min(daily, minute, key.daily_limit or UNLIMITED, key.minute_limit or UNLIMITED)

    def check_units_fit(self, pool: str, model: str, keys: Sequence[Key], units: int) -> None:
        """A request no window could ever hold is a bad request, not a quota wait.

        Remembers per (pool, model) the largest capacity seen, and whether every key was
        seen: a fitting request scans keys only until one fits (the first, for one unit),
        so the first lease after a reload of 100,000 keys does not look at all of them."""
        if not keys:
            return
        best, complete = self._best_capacity.get((pool, model), (0, False))
        if units <= best:
            return
        if not complete:
            for key in keys:
                best = max(best, self.capacity(key))
                if best >= units:
                    self._best_capacity[(pool, model)] = (best, False)
                    return
            self._best_capacity[(pool, model)] = (best, True)
        raise InvalidArgument("units", f"exceeds every key's quota window (largest {best})")

    def account_left(self, pool: str, account: str, now: float) -> int:
        daily, _ = self._config.limits(pool, account)
        day, _ = day_window(now)
        return max(0, daily - self.used.get(account_day(account, day), 0))

    def key_left(self, key: Key, account_left: int, now: float) -> int:
        """Units left today through ``key``: its own limit's, else its account's."""
        if not key.daily_limit:
            return account_left
        day, _ = day_window(now)
        return max(0, key.daily_limit - self.used.get(key_day(key.key_id, key.account, day), 0))

    def pool_budget(self, pool: str, accounts: Iterable[str], now: float) -> tuple[int, int]:
        """(capacity, used) of a pool today: its accounts' daily limits and cached counts."""
        day, _ = day_window(now)
        capacity = used = 0
        for account in accounts:
            daily, _ = self._config.limits(pool, account)
            capacity += daily
            used += min(self.used.get(account_day(account, day), 0), daily)
        return capacity, used

    def budget_windows(self, pool: str, accounts: Iterable[str],
                       now: float) -> tuple[tuple[str, str, int], ...]:
        """The pool's day budget as the store counts it: each account's day window and cap."""
        day, _ = day_window(now)
        return tuple((account, account_day(account, day), self._config.limits(pool, account)[0])
                     for account in accounts)

    def refunded(self, windows: Iterable[str], units: int) -> None:
        for name in windows:
            if name in self.used:
                self.used[name] = max(0, self.used[name] - units)

    # -- the provider's word -------------------------------------------------------------

    async def carry_key_windows(self, old: Key, new: Key) -> None:
        """A key moved to another account keeps what it used today of its own limits: its
        current day and minute counts are raised to at least the old account's (max, so
        every replica making the same move gives the same result; not atomic with leases
        granted at that instant). The old account keeps the units it was charged."""
        now = self._clock.now()
        (day, day_end), (mins, min_end) = day_window(now), minute_window(now)
        periods = [(key_day, day, day_end), (key_minute, mins, min_end)]
        before = await self._store.counters([(old.account, name(old.key_id, old.account, p))
                                             for name, p, _ in periods])
        after = await self._store.counters([(new.account, name(new.key_id, new.account, p))
                                            for name, p, _ in periods])
        for name_of, period, end in periods:
            carried = before[name_of(old.key_id, old.account, period)]
            name = name_of(new.key_id, new.account, period)
            if carried > after[name]:
                await self._store.set_counter(new.account, name, carried, end, now)
                self.used[name] = carried

    def reconcile_target(self, lease: LeaseRecord, report: UsageReport,
                         now: float) -> tuple[tuple[str, int, float], str] | None:
        """The window a 429 with ``X-RateLimit-Remaining`` speaks of, as ``((name, count,
        ends_at), "day" or "minute")`` set to what the provider says is left, or None.

        The window is told by the reset time: 00:00 UTC (+-60 s) means the day, the end of
        the current minute (+-1 s) means the minute, any other reset names no window we
        track (a reset mid-minute is a cooldown until that reset, nothing more). Without a
        reset, the limit matching ours tells it.
        """
        if report.ratelimit_remaining is None:
            return None
        daily, minute = self._config.limits(lease.pool, lease.account)
        day, day_end = day_window(now)
        mins, min_end = minute_window(now)
        limit = report.ratelimit_limit
        reset = (report.ratelimit_reset_ms or 0) / 1000.0
        if reset and abs(reset - day_end) <= 60:
            is_day = True
        elif reset and now < reset and abs(reset - min_end) <= 1:
            is_day = False
        elif not reset and limit is not None and limit in (daily, minute) and daily != minute:
            is_day = limit == daily
        else:
            return None  # a window we do not track (e.g. a per-model cap): the cooldown is enough
        remaining = report.ratelimit_remaining or 0
        if is_day:
            return (account_day(lease.account, day), max(0, daily - remaining), day_end), "day"
        return (account_minute(lease.account, mins), max(0, minute - remaining), min_end), "minute"

    def reconciled(self, lease: LeaseRecord, counter: tuple[str, int, float], window: str,
                   remaining: int) -> None:
        """A reconciled window was written with its report: the cache follows; audited."""
        name, used, _ = counter
        self.used[name] = used
        self._audit.record(AuditEvent.QUOTA_RECONCILED, decision="reconciled", pool=lease.pool,
                           key_id=lease.key_id, account=lease.account,
                           window=window, used=used,
                           provider_remaining=remaining)

    async def apply_probe(self, key: Key, daily_limit: int | None, daily_remaining: int,
                          keys: Mapping[str, Key], now: float) -> None:
        """Set the account's day counter from a probe's free-model ``daily_remaining``.

        The broker never believes more is left than the provider says, nor forgets
        requests the provider counted, and keeps the units of leases still in flight on
        the account's ``keys`` (their calls may not have reached the provider yet).
        """
        day, day_end = day_window(now)
        daily, _ = self._config.limits(key.pool, key.account)
        provider_used = daily_limit - daily_remaining if daily_limit is not None else 0
        in_flight = sum(n for kid, n in (await self._store.active_leases(now)).items()
                        if kid in keys and keys[kid].account == key.account)
        used = max(0, daily - daily_remaining, provider_used) + in_flight
        name = account_day(key.account, day)
        if self.used.get(name, 0) == used:
            return
        await self._store.set_counter(key.account, name, used, day_end, now)
        self.used[name] = used
        self._audit.record(AuditEvent.QUOTA_RECONCILED, decision="reconciled", pool=key.pool,
                           key_id=key.key_id, account=key.account, window="day", used=used,
                           provider_remaining=daily_remaining, source="probe")

    # -- reading -------------------------------------------------------------------------

    def snapshot(self, keys: Iterable[Key], health: Callable[[Key, float], Health],
                 now: float) -> list[KeySnapshot]:
        """Every key's health and today's quota from the cache (no store I/O)."""
        day, _ = day_window(now)
        rows = []
        for key in keys:
            daily, _ = self._config.limits(key.pool, key.account)
            account_used = self.used.get(account_day(key.account, day), 0)
            account_left = max(0, daily - account_used)
            key_left = min(account_left, self.key_left(key, account_left, now))
            rows.append(KeySnapshot(pool=key.pool, key_id=key.key_id, account=key.account,
                                    health=health(key, now).state, key_left=key_left,
                                    account_left=account_left, account_used=account_used,
                                    daily_limit=daily))
        return rows
