"""The lease engine: quota-safe leases over a key pool.

It knows nothing of gRPC, Vault, SQLite or Redis: keys come from a KeySource,
state lives in a StateStore, time comes from a Clock, permissions from the
Caller the API layer hands in.
"""

from __future__ import annotations

import dataclasses
import random
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from . import health as hsm
from .audit import Audit
from .clock import Clock, day_window, minute_window, next_midnight
from .config import Settings, StrategyName
from .errors import (
    InvalidArgument,
    LeaseNotFound,
    NotFound,
    NotReady,
    PermissionDenied,
    QuotaExhausted,
    QuotaViolation,
)
from .models import Health, HealthState, Key, KeyStats, LeaseRecord, Priority, UsageReport, Window
from .store import Candidate, Reservation, ReserveRequest, StateStore
from .strategies import Strategy, StrategyContext, make_strategy
from .usage import Dimension, UsageSummary, summarize
from .validate import check_key_id, check_lease_id, check_name, check_request_id, check_text

__all__ = [
    "Caller",
    "Grant",
    "InternalRoute",
    "KeySource",
    "KeyView",
    "LeaseEngine",
    "LeaseRequest",
    "ModelChooser",
    "ReloadResult",
]

UNLIMITED = 1 << 62  # a key with no limit of its own still gets a per-day counter
CANDIDATES_PER_ATTEMPT = 2  # keys offered to the store per atomic reservation (more cost Redis arguments)
MAX_ATTEMPTS = 4
_HEALTHY = Health()
AUTO_MODEL = "auto"  # LeaseKey(model="auto"): the pool's ModelChooser picks the model


def key_window(key: Key, kind: str, period: str) -> str:
    """A per-key window's name: ``d`` (day) or ``m`` (minute) of ``key`` under its account.

    It names the account too, so the window lives with the account's windows (one Redis
    Cluster slot); a key moved to another account has its counts carried over on reload
    (``_carry_key_windows``).
    """
    return f"key:{key.key_id}@{key.account}:{kind}:{period}"


class KeySource(Protocol):
    """Where keys come from (Vault in production)."""

    async def load(self) -> list[Key]:
        """Every key, decrypted. Raises BackendUnavailable when the source is unreachable."""
        ...


class ModelChooser(Protocol):
    """Picks the model of a ``model="auto"`` lease (the provider's catalog in production)."""

    async def choose(self, pool: str, keys: Sequence[Key]) -> str:
        """A model some of ``keys`` serve, by the pool's policy. Raises InvalidArgument when
        no model fits, BackendUnavailable when the catalog cannot be read."""
        ...


class Caller(Protocol):
    """The authenticated principal of one call and what it may do."""

    @property
    def principal(self) -> str: ...

    def require(self, rpc: str, pool: str) -> None:
        """Raise PermissionDenied unless the principal may call ``rpc`` on ``pool``."""
        ...

    def may(self, rpc: str, pool: str) -> bool: ...

    def may_any(self, rpc: str) -> bool:
        """Whether any grant names ``rpc`` (on whatever pools)."""
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
class Grant:
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


@dataclass(frozen=True)
class ReloadResult:
    added: int
    removed: int
    updated: int
    total: int


@dataclass
class _Pool:
    keys: list[Key] = field(default_factory=list)  # sorted by key_id
    accounts: dict[str, None] = field(default_factory=dict)  # distinct accounts, in key order
    serving: dict[str, list[Key]] = field(default_factory=dict)  # model -> keys, filled lazily

    def for_model(self, model: str) -> list[Key]:
        keys = self.serving.get(model)
        if keys is None:
            keys = self.keys if not model else [k for k in self.keys if k.serves(model)]
            if len(self.serving) < 1024:  # callers choose model strings: bound the cache
                self.serving[model] = keys
        return keys


class LeaseEngine:
    """Leases keys under per-account and per-key day/minute quotas."""

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
        self._store = store
        self._models = models
        self._source = keys
        self._clock = clock
        self._settings = settings
        self._audit = audit or Audit()
        self._new_lease_id = new_lease_id
        self._keys: dict[str, Key] = {}
        self._pools: dict[str, _Pool] = {}
        self._strategies: dict[str, Strategy] = {}
        self._used: dict[str, int] = {}  # window name -> units; a cache, the store is the truth
        self._health: dict[str, Health] = {}
        self._stats: dict[str, KeyStats] = {}
        self._best_capacity: dict[tuple[str, str], int] = {}
        self._window_cache: dict[str, tuple[int, Key, tuple[Window, ...]]] = {}
        self._rng = rng or random.Random()
        self._loaded = False

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """True once keys have been loaded at least once."""
        return self._loaded

    async def start(self) -> None:
        """Load health and live counters from the store (keys come with reload_keys)."""
        self._health = await self._store.health()
        self._stats = await self._store.key_stats()
        self._used = await self._store.live_counters(self._clock.now())

    async def reload_keys(self) -> ReloadResult:
        """Re-read every key from the source. On failure the current keys stay in use."""
        loaded = await self._source.load()
        new = {k.key_id: k for k in loaded}
        added = len(new.keys() - self._keys.keys())
        removed = len(self._keys.keys() - new.keys())
        updated = sum(1 for kid in new.keys() & self._keys.keys() if new[kid] != self._keys[kid])
        # Pools once seen stay known: a Vault answering with fewer keys (restored empty, an
        # operator mid-rewrite) makes them exhausted, not "not found".
        pools: dict[str, _Pool] = {name: _Pool() for name in (*self._settings.pools,
                                                               *self._pools)}
        for key in sorted(new.values(), key=lambda k: k.key_id):
            pool = pools.setdefault(key.pool, _Pool())
            pool.keys.append(key)
            pool.accounts[key.account] = None
        for kid in new.keys() & self._keys.keys():
            if new[kid].secret != self._keys[kid].secret:
                # A rotated secret gets a fresh start: an old 401 said nothing of the new key.
                await self._set_health(f"key:{kid}", Health())
            if new[kid].account != self._keys[kid].account:
                await self._carry_key_windows(self._keys[kid], new[kid])
        if self._keys and removed > len(self._keys) // 2:
            self._audit.record("keys.mass_removal", decision="warning", removed=removed,
                               total=len(new), reason="a reload dropped most keys")
        self._keys, self._pools, self._loaded = new, pools, True
        self._best_capacity = {}
        result = ReloadResult(added, removed, updated, len(new))
        if added or removed or updated:
            self._audit.record("keys.reloaded", decision="reloaded", added=added,
                               removed=removed, updated=updated, total=len(new))
        return result

    async def _carry_key_windows(self, old: Key, new: Key) -> None:
        """A key moved to another account keeps what it used today of its own limits: its
        current day and minute counts are raised to at least the old account's (max, so
        every replica making the same move gives the same result; not atomic with leases
        granted at that instant). The old account keeps the units it was charged."""
        now = self._clock.now()
        (day, day_end), (mins, min_end) = day_window(now), minute_window(now)
        periods = [("d", day, day_end), ("m", mins, min_end)]
        before = await self._store.counters([(old.account, key_window(old, k, p))
                                             for k, p, _ in periods])
        after = await self._store.counters([(new.account, key_window(new, k, p))
                                            for k, p, _ in periods])
        for kind, period, end in periods:
            carried = before[key_window(old, kind, period)]
            name = key_window(new, kind, period)
            if carried > after[name]:
                await self._store.set_counter(new.account, name, carried, end, now)
                self._used[name] = carried

    async def sweep(self, *, refresh: bool = True) -> list[LeaseRecord]:
        """Expire overdue leases (audited), prune old state, refresh the counter cache."""
        now = self._clock.now()
        expired = await self._store.expire_due(now)
        for lease in expired:
            self._audit.record("lease.expired", decision="expired", principal=lease.principal,
                               rpc="", pool=lease.pool, key_id=lease.key_id,
                               lease_id=lease.lease_id, units=lease.units,
                               held_seconds=round(lease.expires_at - lease.created_at, 3),
                               reason="ttl elapsed; units stay spent")
        if refresh:
            await self._store.prune(now, self._settings.lease.retention_days * 86400.0,
                                    self._settings.lease.usage_retention_days * 86400.0)
            self._used = await self._store.live_counters(now)
        return expired

    # -- KeyBroker ---------------------------------------------------------------------------

    async def lease(self, caller: Caller, req: LeaseRequest) -> Grant | InternalRoute:
        """Reserve ``units`` on one key of the pool, atomically, or explain why not."""
        self._validate_lease(req)
        caller.require("LeaseKey", req.pool)
        self._require_ready()
        pool = self._pools.get(req.pool)
        if pool is None:
            raise NotFound(f"pool {req.pool!r} not found")
        units = req.units
        now = self._clock.now()
        ttl = self._ttl(req.ttl)
        if req.model == AUTO_MODEL and self._models is not None:
            req = await self._auto_model(req, pool, now)
        serving = pool.for_model(req.model)
        if req.model and not serving and pool.keys:
            raise InvalidArgument("model", f"no key of pool {req.pool!r} serves {req.model!r}")
        self._check_units_fit(req.pool, req.model, serving, units)

        refusal = self._admission(req, pool, now)
        if refusal is not None:
            replay = await self._replay(caller, req, now)
            return replay or self._refuse(caller, req, refusal[0], refusal[1])

        strategy = self._strategy(req.pool)
        ctx = self._context(now)

        def windows(key: Key) -> tuple[Window, ...]:
            return self._windows(key, now)

        def usable(key: Key) -> bool:
            return self._usable(key, now)

        def fits(key: Key) -> bool:
            if key.key_id in tried or not self._usable(key, now):
                return False
            for w in self._windows(key, now):  # noqa: SIM110 - a loop is cheaper than all(genexpr)
                if self._used.get(w.name, 0) + units > w.limit:
                    return False
            return True

        lease_id = self._new_lease_id()
        tried: set[str] = set()
        for attempt in range(MAX_ATTEMPTS + 1):
            order = strategy.pick(req.pool, serving, fits, ctx, CANDIDATES_PER_ATTEMPT)
            last = attempt == MAX_ATTEMPTS or not order
            if last:
                # The cache may be stale (another replica refunded, a count was reconciled):
                # before saying no, let the store judge the usable keys not tried yet.
                order = strategy.pick(req.pool, serving,
                                      lambda k: k.key_id not in tried and usable(k), ctx,
                                      CANDIDATES_PER_ATTEMPT)
            if order or (req.request_id and attempt == 0):  # the store also answers replays
                result = await self._store.reserve(ReserveRequest(
                    lease_id=lease_id, principal=caller.principal, request_id=req.request_id,
                    pool=req.pool, model=req.model, units=units, created_at=now,
                    expires_at=now + ttl,
                    candidates=[Candidate(k.key_id, k.account, windows(k)) for k in order]))
                if isinstance(result, Reservation):
                    return await self._granted(caller, req, result, now)
                self._used.update(result.used)
                tried.update(k.key_id for k in order)
            if last:
                break
        return self._exhausted(caller, req, serving, now)

    async def renew(self, caller: Caller, lease_id: str, ttl: float | None) -> LeaseRecord:
        lease = await self._owned_lease(caller, lease_id, "RenewLease")
        now = self._clock.now()
        renewed = await self._store.renew(lease.lease_id, now + self._ttl(ttl), now)
        self._audit.record("lease.renewed", decision="renewed", principal=caller.principal,
                           rpc="RenewLease", pool=lease.pool, key_id=lease.key_id,
                           lease_id=lease.lease_id, expires_at=renewed.expires_at)
        return renewed

    async def report(self, caller: Caller, lease_id: str, report: UsageReport) -> Health:
        """Record a provider answer; update key/account health and reconcile counters."""
        self._validate_report(report)
        lease = await self._owned_lease(caller, lease_id, "ReportUsage")
        now = self._clock.now()
        key_subject = f"key:{lease.key_id}"
        status = report.http_status
        h = self._settings.health
        if status == 429:
            subject = f"account:{lease.account}"
            await self._set_health(subject, hsm.after_rate_limit(
                self._health.get(subject, Health()), report, now, self._settings.quota, h,
                self._rng), lease.key_id)
            if report.ratelimit_remaining is not None:
                await self._reconcile(lease, report, (report.ratelimit_reset_ms or 0) / 1000.0,
                                      now)
        elif 200 <= status < 300:
            subject = f"account:{lease.account}"
            acct = self._health.get(subject)
            if acct is not None and acct.until <= now:  # served again: forget past 429s
                await self._set_health(subject, Health(), lease.key_id)
        reason = f"http_{status}" if status else (report.error_type or "no_response")
        await self._set_health(key_subject, hsm.after_key_report(
            self._health.get(key_subject, Health()), status, reason, now, h, self._rng),
            lease.key_id)
        await self._learn(lease.key_id, status, report.latency_ms, now)
        await self._store.record_usage(lease, report, now)
        health = self._key_health(self._keys.get(lease.key_id), lease.key_id, lease.account, now)
        self._audit.record("lease.reported", decision="reported", principal=caller.principal,
                           rpc="ReportUsage", pool=lease.pool, key_id=lease.key_id,
                           lease_id=lease.lease_id, http_status=status,
                           reason=report.error_type, health=health.state.value,
                           remaining=self._account_left(lease.pool, lease.account, now))
        return health

    async def complete(self, caller: Caller, lease_id: str, used: bool) -> LeaseRecord:
        lease = await self._owned_lease(caller, lease_id, "Complete")
        now = self._clock.now()
        done, changed = await self._store.complete(lease.lease_id, used, now)
        if changed:
            if done.refunded:
                for name in done.windows:
                    if name in self._used:
                        self._used[name] = max(0, self._used[name] - done.units)
            self._audit.record(
                f"lease.{done.status.value}", decision=done.status.value,
                principal=caller.principal, rpc="Complete", pool=done.pool, key_id=done.key_id,
                lease_id=done.lease_id, used=used, refunded=done.refunded, units=done.units,
                held_seconds=round(max(0.0, min(now, done.expires_at) - done.created_at), 3),
                remaining=self._account_left(done.pool, done.account, now))
        return done

    # -- provider probes ---------------------------------------------------------------------

    async def apply_probe(self, key_id: str, status: int, daily_limit: int | None,
                          daily_remaining: int | None, *,
                          observed_at: float | None = None) -> None:
        """Fold one key probe (the provider's ``GET /key``, which costs no quota) into state.

        A 401 disables the key (reason ``probe_401``) before any caller is handed it. A
        200 with the provider's free-model ``daily_remaining`` sets the account's day
        counter: the broker never believes more is left than the provider says, nor
        forgets requests the provider counted, and keeps the units of leases still in
        flight (their calls may not have reached the provider yet). Other answers say
        nothing of the key's serving health and are ignored.
        """
        key = self._keys.get(key_id)
        if key is None:
            return
        now = self._clock.now()
        subject = f"key:{key_id}"
        if status == 401:
            if self._health.get(subject, Health()).state is not HealthState.DISABLED:
                await self._set_health(subject, Health(HealthState.DISABLED, "probe_401"), key_id)
            return
        day, day_end = day_window(now)
        if status != 200 or daily_remaining is None or (
                observed_at is not None and day_window(observed_at)[0] != day):
            return  # nothing to believe, or an answer about a day that has ended
        daily, _ = self._settings.limits(key.pool, key.account)
        provider_used = daily_limit - daily_remaining if daily_limit is not None else 0
        in_flight = sum(n for kid, n in (await self._store.active_leases(now)).items()
                        if kid in self._keys and self._keys[kid].account == key.account)
        used = max(0, daily - daily_remaining, provider_used) + in_flight
        name = f"acct:{key.account}:d:{day}"
        if self._used.get(name, 0) == used:
            return
        await self._store.set_counter(key.account, name, used, day_end, now)
        self._used[name] = used
        self._audit.record("quota.reconciled", decision="reconciled", pool=key.pool,
                           key_id=key_id, account=key.account, window="day", used=used,
                           provider_remaining=daily_remaining, source="probe")

    # -- KeyAdmin ----------------------------------------------------------------------------

    async def list_keys(self, caller: Caller, pool: str) -> list[KeyView]:
        check_name("pool", pool, required=False)
        if pool:
            caller.require("ListKeys", pool)
            self._require_ready()
            if pool not in self._pools:
                raise NotFound(f"pool {pool!r} not found")
            return await self._views(self._pools[pool].keys)
        if not caller.may_any("ListKeys"):
            raise PermissionDenied(f"{caller.principal} may not call ListKeys")
        self._require_ready()
        return await self._views([k for name, p in sorted(self._pools.items())
                                  if caller.may("ListKeys", name) for k in p.keys])

    async def get_key(self, caller: Caller, key_id: str) -> KeyView:
        key = self._known_key(caller, key_id, "GetKey")
        return (await self._views([key]))[0]

    async def set_enabled(self, caller: Caller, key_id: str, enabled: bool,
                          reason: str) -> KeyView:
        check_text("reason", reason, 256)
        key = self._known_key(caller, key_id, "SetKeyEnabled")
        subject = f"key:{key.key_id}"
        if enabled:
            await self._set_health(subject, Health())
        else:
            await self._set_health(subject, Health(HealthState.DISABLED, "operator"))
        self._audit.record("key.enabled" if enabled else "key.disabled",
                           decision="enabled" if enabled else "disabled",
                           principal=caller.principal, rpc="SetKeyEnabled", pool=key.pool,
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
            caller.require("GetUsage", pool)
        elif not caller.may_any("GetUsage"):
            raise PermissionDenied(f"{caller.principal} may not call GetUsage")
        now = self._clock.now()
        until, _ = day_window(now)
        since, _ = day_window(now - (days - 1) * 86400.0)
        rows = [r for r in await self._store.usage(since, until)
                if (not pool or r.key_id.startswith(pool + "/"))
                and caller.may("GetUsage", r.key_id.partition("/")[0])]
        return summarize(rows, by)

    async def reload(self, caller: Caller) -> ReloadResult:
        caller.require("ReloadKeys", "*")
        result = await self.reload_keys()
        self._audit.record("keys.reload", decision="reloaded", principal=caller.principal,
                           rpc="ReloadKeys", added=result.added, removed=result.removed,
                           updated=result.updated, total=result.total)
        return result

    def snapshot(self) -> list[dict[str, Any]]:
        """Every key's health and today's quota from the engine's cache (for metrics and
        alerts: no store I/O, so it may trail other replicas by a sweep)."""
        now = self._clock.now()
        day, _ = day_window(now)
        rows = []
        for key in self._keys.values():
            daily, _ = self._settings.limits(key.pool, key.account)
            account_used = self._used.get(f"acct:{key.account}:d:{day}", 0)
            account_left = max(0, daily - account_used)
            key_left = account_left
            if key.daily_limit:
                key_left = min(key_left, max(0, key.daily_limit - self._used.get(
                    key_window(key, "d", day), 0)))
            rows.append({"pool": key.pool, "key_id": key.key_id, "account": key.account,
                         "health": self._key_health(key, key.key_id, key.account, now).state.value,
                         "key_left": key_left, "account_left": account_left,
                         "account_used": account_used, "daily_limit": daily})
        return rows

    # -- internals: validation ---------------------------------------------------------------

    def _validate_lease(self, req: LeaseRequest) -> None:
        check_name("pool", req.pool)
        check_text("model", req.model, 256)
        check_request_id(req.request_id)
        if not 1 <= req.units <= self._settings.lease.max_units:
            raise InvalidArgument("units", f"must be 1 to {self._settings.lease.max_units}")
        self._ttl(req.ttl)

    def _ttl(self, ttl: float | None) -> float:
        lease = self._settings.lease
        if ttl is None:
            return lease.default_ttl
        if not 1.0 <= ttl <= lease.max_ttl:
            raise InvalidArgument("ttl", f"must be 1s to {lease.max_ttl:g}s")
        return ttl

    @staticmethod
    def _validate_report(r: UsageReport) -> None:
        if r.http_status != 0 and not 100 <= r.http_status <= 599:
            raise InvalidArgument("http_status", "must be 0 or 100-599")
        check_text("error_type", r.error_type, 128)
        check_text("model", r.model, 256)
        for name in ("prompt_tokens", "completion_tokens", "latency_ms"):
            if not 0 <= getattr(r, name) <= 1 << 40:
                raise InvalidArgument(name, "must be >= 0")
        if not 0.0 <= r.cost <= 1e9:  # also rejects NaN
            raise InvalidArgument("cost", "must be >= 0")
        for name in ("ratelimit_limit", "ratelimit_remaining", "ratelimit_reset_ms"):
            v = getattr(r, name)
            if v is not None and not 0 <= v <= 1 << 53:
                raise InvalidArgument(name, "must be >= 0")
        if r.retry_after is not None and not 0.0 <= r.retry_after <= 86400 * 7:
            raise InvalidArgument("retry_after", "must be 0 to 7 days")

    def _check_units_fit(self, pool: str, model: str, keys: Sequence[Key], units: int) -> None:
        """A request no window could ever hold is a bad request, not a quota wait."""
        if not keys:
            return
        best = self._best_capacity.get((pool, model))
        if best is None:
            best = self._best_capacity[(pool, model)] = max(self._capacity(k) for k in keys)
        if units > best:
            raise InvalidArgument("units", f"exceeds every key's quota window (largest {best})")

    def _capacity(self, key: Key) -> int:
        daily, minute = self._settings.limits(key.pool, key.account)
        return min(daily, minute, key.daily_limit or UNLIMITED, key.minute_limit or UNLIMITED)

    def _require_ready(self) -> None:
        if not self._loaded:
            raise NotReady("keys are not loaded yet")

    async def _owned_lease(self, caller: Caller, lease_id: str, rpc: str) -> LeaseRecord:
        check_lease_id(lease_id)
        if not caller.may_any(rpc):  # deny by default before revealing whether the lease exists
            raise PermissionDenied(f"{caller.principal} may not call {rpc}")
        lease = await self._store.get_lease(lease_id)
        if lease is None:
            raise LeaseNotFound(f"lease {lease_id} not found")
        if lease.principal != caller.principal:
            raise PermissionDenied("the lease belongs to another principal")
        caller.require(rpc, lease.pool)
        return lease

    def _known_key(self, caller: Caller, key_id: str, rpc: str) -> Key:
        pool, _ = check_key_id(key_id)
        caller.require(rpc, pool)
        self._require_ready()
        key = self._keys.get(key_id)
        if key is None:
            raise NotFound(f"key {key_id!r} not found")
        return key

    # -- internals: windows and health -------------------------------------------------------

    def _windows(self, key: Key, now: float) -> tuple[Window, ...]:
        """The windows a lease on ``key`` is charged to, memoised per key and minute (this
        runs for every candidate the strategy looks at)."""
        minute_index = int(now // 60)
        cached = self._window_cache.get(key.key_id)
        if cached is not None and cached[0] == minute_index and cached[1] is key:
            return cached[2]
        windows = self._build_windows(key, now)
        self._window_cache[key.key_id] = (minute_index, key, windows)
        return windows

    def _build_windows(self, key: Key, now: float) -> tuple[Window, ...]:
        daily, minute = self._settings.limits(key.pool, key.account)
        day, day_end = day_window(now)
        mins, min_end = minute_window(now)
        acct = key.account
        windows = [
            Window(f"acct:{acct}:d:{day}", daily, day_end, f"account:{acct}/day"),
            Window(f"acct:{acct}:m:{mins}", minute, min_end, f"account:{acct}/minute"),
            Window(key_window(key, "d", day), key.daily_limit or UNLIMITED, day_end,
                   f"key:{key.key_id}/day"),
        ]
        if key.minute_limit:
            windows.append(Window(key_window(key, "m", mins), key.minute_limit, min_end,
                                  f"key:{key.key_id}/minute"))
        return tuple(windows)

    def _key_health(self, key: Key | None, key_id: str, account: str, now: float) -> Health:
        """The health a key shows: Vault flag, then its own record, then its account's cooldown.

        A circuit whose backoff has passed shows as circuit_open with ``until`` in the
        past (half-open): it is usable, for one probe lease.
        """
        if key is not None and not key.enabled:
            return Health(HealthState.DISABLED, "vault")
        own = self._health.get(f"key:{key_id}", _HEALTHY)
        if own.state is HealthState.DISABLED or (own.state is not HealthState.HEALTHY
                                                  and own.until > now):
            return own
        acct = self._health.get(f"account:{account}", _HEALTHY)
        if acct.state is HealthState.COOLING_DOWN and acct.until > now:
            return acct
        if own.state is HealthState.CIRCUIT_OPEN:
            return Health(HealthState.CIRCUIT_OPEN, "half_open", own.until, own.failures)
        return _HEALTHY if own is _HEALTHY else Health(failures=own.failures)

    def _usable(self, key: Key, now: float) -> bool:
        h = self._key_health(key, key.key_id, key.account, now)
        return h.state is HealthState.HEALTHY or hsm.is_probe_slot(h, now)

    def _context(self, now: float) -> StrategyContext:
        day, day_end = day_window(now)

        def usage(key: Key) -> tuple[int, int, int]:
            daily, _ = self._settings.limits(key.pool, key.account)
            used = self._used.get(f"acct:{key.account}:d:{day}", 0)
            return self._used.get(key_window(key, "d", day), 0), max(0, daily - used), daily

        return StrategyContext(now=now, usage=usage,
                               stats=lambda k: self._stats.get(k.key_id, KeyStats()),
                               day_fraction_left=(day_end - now) / 86400.0, rng=self._rng)

    def _account_left(self, pool: str, account: str, now: float) -> int:
        daily, _ = self._settings.limits(pool, account)
        day, _ = day_window(now)
        return max(0, daily - self._used.get(f"acct:{account}:d:{day}", 0))

    async def _set_health(self, subject: str, health: Health, key_id: str = "") -> None:
        """Write-through health; a change of state is an audit record."""
        before = self._health.get(subject, Health())
        if health == before:
            return
        await self._store.put_health(subject, health)
        if health == Health():
            self._health.pop(subject, None)
        else:
            self._health[subject] = health
        if health.state is not before.state:
            self._audit.record("key.health", decision=health.state.value, key_id=key_id,
                               subject=subject, reason=health.reason, previous=before.state.value,
                               until=health.until or None)

    async def _learn(self, key_id: str, status: int, latency_ms: int, now: float) -> None:
        """Fold one answer into the key's decayed success/failure counts and latency."""
        fault = hsm.key_fault(status)
        if fault is None:
            return
        old = self._stats.get(key_id, KeyStats())
        decay = (0.5 ** ((now - old.updated_at) / self._settings.health.stats_half_life)
                 if old.updated_at else 1.0)
        latency = old.latency_ms
        if not fault:
            latency = float(latency_ms) if old.successes <= 0 else 0.8 * latency + 0.2 * latency_ms
        stats = KeyStats(successes=old.successes * decay + (0.0 if fault else 1.0),
                         failures=old.failures * decay + (1.0 if fault else 0.0),
                         latency_ms=latency, updated_at=now)
        self._stats[key_id] = stats
        await self._store.put_key_stats(key_id, stats)

    async def _reconcile(self, lease: LeaseRecord, report: UsageReport, reset: float,
                         now: float) -> None:
        """Set the window the provider spoke of to what it says is left.

        The window is told by the reset time (00:00 UTC means the day, the end of
        the current minute means the minute), else by the limit matching ours.
        """
        daily, minute = self._settings.limits(lease.pool, lease.account)
        day, day_end = day_window(now)
        mins, min_end = minute_window(now)
        limit = report.ratelimit_limit
        if reset and abs(reset - day_end) <= 60:
            is_day = True
        elif reset and now < reset <= min_end + 1:
            is_day = False
        elif limit is not None and limit in (daily, minute) and daily != minute:
            is_day = limit == daily
        else:
            return  # a window we do not track (e.g. a per-model cap): the cooldown is enough
        remaining = report.ratelimit_remaining or 0
        if is_day:
            name, cap, end = f"acct:{lease.account}:d:{day}", daily, day_end
        else:
            name, cap, end = f"acct:{lease.account}:m:{mins}", minute, min_end
        used = max(0, cap - remaining)
        await self._store.set_counter(lease.account, name, used, end, now)
        self._used[name] = used
        self._audit.record("quota.reconciled", decision="reconciled", pool=lease.pool,
                           key_id=lease.key_id, account=lease.account,
                           window="day" if is_day else "minute", used=used,
                           provider_remaining=remaining)

    # -- internals: outcomes -----------------------------------------------------------------

    async def _auto_model(self, req: LeaseRequest, pool: _Pool, now: float) -> LeaseRequest:
        """``model="auto"``: the chooser picks among models the pool's usable keys serve."""
        assert self._models is not None
        usable = [k for k in pool.keys if self._usable(k, now)] or pool.keys
        return dataclasses.replace(req, model=await self._models.choose(req.pool, usable))

    async def _granted(self, caller: Caller, req: LeaseRequest, res: Reservation,
                       now: float) -> Grant:
        lease = res.lease
        if res.replay and lease.pool != req.pool:
            raise InvalidArgument("request_id", "was used before for a different request")
        key = self._keys.get(lease.key_id)
        if key is None:
            raise NotFound(f"key {lease.key_id!r} of this request_id is no longer in the pool")
        self._used.update(res.used)
        account_left = self._account_left(lease.pool, lease.account, now)
        if key.daily_limit:
            day, _ = day_window(now)
            key_left = max(0, key.daily_limit - self._used.get(key_window(key, "d", day), 0))
        else:
            key_left = account_left
        grant = Grant(lease=lease, key=key, remaining_key_today=key_left,
                      remaining_account_today=account_left, resets_at=next_midnight(now))
        if not res.replay:
            own = self._health.get(f"key:{key.key_id}", Health())
            if hsm.is_probe_slot(own, now):  # this lease is the half-open key's one probe
                await self._set_health(f"key:{key.key_id}",
                                       hsm.probe_started(own, now, self._settings.health),
                                       key.key_id)
            self._audit.record("lease.granted", decision="granted", principal=caller.principal,
                               rpc="LeaseKey", pool=lease.pool, key_id=lease.key_id,
                               lease_id=lease.lease_id, account=lease.account, units=lease.units,
                               remaining=account_left, request_id=lease.request_id,
                               priority=req.priority.name.lower(), route="external",
                               strategy=self._settings.pool(lease.pool).strategy.value)
        return grant

    def _admission(self, req: LeaseRequest, pool: _Pool, now: float) -> tuple[str, float] | None:
        """Hybrid routing: keep a reserve for high priority and pace low priority.

        Returns (reason, seconds until it may pass) when the request must not use a key.
        The pool's budget is the sum of its accounts' daily limits; its use, their
        cached counts (so across replicas the reserve is approximate, the quota is not).
        The reserve is ``reserve_high_fraction`` of the budget times the share of the
        day still ahead; low priority may spend the rest no faster than an even pace
        over the day plus ``pace_burst_fraction``.
        """
        ps = self._settings.pool(req.pool)
        if req.priority is Priority.HIGH or not (ps.reserve_high_fraction or ps.pace_low):
            return None
        day, day_end = day_window(now)
        capacity = used = 0
        for account in pool.accounts:
            daily, _ = self._settings.limits(req.pool, account)
            capacity += daily
            used += min(self._used.get(f"acct:{account}:d:{day}", 0), daily)
        if capacity <= 0:
            return None
        # The reserve shrinks with the day: what high priority has not needed by 00:00 UTC
        # is better spent by the others than left unused.
        reserve = ps.reserve_high_fraction * capacity * (day_end - now) / 86400.0
        if capacity - used - req.units < reserve:
            return "reserved_for_higher_priority", day_end - now
        if req.priority is Priority.LOW and ps.pace_low:
            spendable = capacity - reserve
            allowed = spendable * (1.0 - (day_end - now) / 86400.0) + ps.pace_burst_fraction * capacity
            if used + req.units > allowed:
                wait = (used + req.units - allowed) / (spendable / 86400.0)
                return "pacing", min(wait, day_end - now)
        return None

    async def _replay(self, caller: Caller, req: LeaseRequest, now: float) -> Grant | None:
        """The earlier lease of this request_id, if any (a refusal must not hide a grant)."""
        if not req.request_id:
            return None
        result = await self._store.reserve(ReserveRequest(
            lease_id=self._new_lease_id(), principal=caller.principal,
            request_id=req.request_id, pool=req.pool, model=req.model, units=req.units,
            created_at=now, expires_at=now, candidates=()))
        return await self._granted(caller, req, result, now) if isinstance(
            result, Reservation) else None

    def _refuse(self, caller: Caller, req: LeaseRequest, reason: str,
                retry_after: float) -> InternalRoute:
        """Route internally (when allowed) or raise; audited either way."""
        retry_after = max(retry_after, 0.001)
        self._audit.record(
            "lease.internal" if req.allow_internal else "lease.exhausted",
            decision="internal" if req.allow_internal else "exhausted",
            principal=caller.principal, rpc="LeaseKey", pool=req.pool, reason=reason,
            priority=req.priority.name.lower(), retry_after=round(retry_after, 3), remaining=0,
            route="internal" if req.allow_internal else "none")
        if req.allow_internal:
            return InternalRoute(reason=reason, retry_after=retry_after)
        raise QuotaExhausted(f"pool {req.pool!r}: {reason.replace('_', ' ')}",
                             retry_after=retry_after, cause=reason,
                             violations=(QuotaViolation(f"pool:{req.pool}", reason),))

    def _exhausted(self, caller: Caller, req: LeaseRequest, keys: Sequence[Key],
                   now: float) -> InternalRoute:
        """Work out when the earliest key frees up, then route internally or raise."""
        waits: list[float] = []
        violations: list[QuotaViolation] = []
        healthy = 0
        for key in keys:
            health = self._key_health(key, key.key_id, key.account, now)
            if health.state is HealthState.DISABLED:
                violations.append(QuotaViolation(f"key:{key.key_id}", f"disabled ({health.reason})"))
                continue
            ready_at = now
            if self._usable(key, now):
                healthy += 1
            else:
                ready_at = max(ready_at, health.until)
                violations.append(QuotaViolation(
                    f"key:{key.key_id}", f"{health.state.value} ({health.reason})"))
            for w in self._windows(key, now):
                if self._used.get(w.name, 0) + req.units > w.limit:
                    ready_at = max(ready_at, w.ends_at)
                    violations.append(QuotaViolation(
                        w.label, f"{self._used.get(w.name, 0)} of {w.limit} used"))
            waits.append(ready_at - now)
        # With no waits, nothing frees up by itself: an operator or a key reload must act.
        retry_after = max(min(waits), 0.001) if waits else self._settings.vault.reload_interval
        reason = "quota_exhausted" if healthy else "all_keys_unhealthy"
        if req.allow_internal:
            return self._refuse(caller, req, reason, retry_after)
        self._audit.record("lease.exhausted", decision="exhausted", principal=caller.principal,
                           rpc="LeaseKey", pool=req.pool, reason=reason,
                           priority=req.priority.name.lower(), retry_after=round(retry_after, 3),
                           remaining=0, route="none")
        raise QuotaExhausted(f"no key of pool {req.pool!r} can take {req.units} unit(s) now "
                             f"({reason})", retry_after=retry_after,
                             violations=tuple(dict.fromkeys(violations)),
                             cause="quota" if healthy else "unhealthy")

    def _strategy(self, pool: str) -> Strategy:
        strategy = self._strategies.get(pool)
        if strategy is None:
            strategy = make_strategy(self._settings.pool(pool).strategy)
            self._strategies[pool] = strategy
        return strategy

    async def _views(self, keys: Sequence[Key]) -> list[KeyView]:
        now = self._clock.now()
        day, _ = day_window(now)
        names: list[tuple[str, str]] = []
        for k in keys:
            names += [(k.account, key_window(k, "d", day)), (k.account, f"acct:{k.account}:d:{day}")]
        used = await self._store.counters(names)
        active: Mapping[str, int] = await self._store.active_leases(now)
        views = []
        for k in keys:
            daily, minute = self._settings.limits(k.pool, k.account)
            health = self._key_health(k, k.key_id, k.account, now)
            views.append(KeyView(
                key=k, enabled=health.state is not HealthState.DISABLED, health=health.state,
                health_reason=health.reason, cooldown_until=health.until,
                used_today=used[key_window(k, "d", day)], account_daily_limit=daily,
                account_minute_limit=minute, account_used_today=used[f"acct:{k.account}:d:{day}"],
                key_daily_limit=k.daily_limit or 0, active_leases=active.get(k.key_id, 0),
                strategy=self._settings.pool(k.pool).strategy,
            ))
        return views
