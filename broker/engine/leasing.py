"""The lease flow: LeaseKey, RenewLease, ReportUsage, Complete."""

from __future__ import annotations

import dataclasses
import math
import random
from collections import ChainMap, OrderedDict
from collections.abc import Callable, Mapping, Sequence

from ..audit import Audit, AuditEvent
from ..clock import Clock, day_window, next_midnight
from ..config import PoolSettings
from ..errors import (
    BackendUnavailable,
    InvalidArgument,
    LeaseNotActive,
    LeaseNotFound,
    LeaseRevoked,
    NotFound,
    PermissionDenied,
    QuotaExhausted,
    QuotaViolation,
)
from ..models import Health, HealthState, Key, LeaseRecord, LeaseStatus, UsageReport, Window
from ..rpcs import Rpc
from ..store import (
    Budget,
    Candidate,
    Rejection,
    ReportWrite,
    Reservation,
    ReserveRequest,
    StateStore,
)
from ..store.base import IN_FLIGHT_CAP_SECONDS, IN_FLIGHT_REASON, blocked, gate_blocks
from ..validate import check_lease_id, check_name, check_request_id, check_text
from . import admission
from .config import EngineConfig
from .healthbook import HealthBook, shown
from .keys import KeyRegistry, Pool
from .ledger import Ledger
from .strategies import Strategy, StrategyContext, make_strategy
from .types import Caller, InternalRoute, LeaseGrant, LeaseRequest, ModelChooser
from .windows import (
    account_paid_subject,
    account_subject,
    is_paid_model,
    key_subject,
    model_scope,
    model_subject,
    principal_windows,
)

__all__ = ["AUTO_MODEL", "Leasing"]

CANDIDATES_PER_ATTEMPT = 2  # keys offered to the store per atomic reservation (more cost Redis arguments)
MAX_ATTEMPTS = 4  # reservations over the cache's best candidates before the last pass
LAST_PASS_BATCH = 64  # keys per reservation when the store judges every remaining key
REPORT_TRIES = 16  # a report re-reads the records it changes at most this often
AUTO_MODEL = "auto"  # LeaseKey(model="auto"): the pool's ModelChooser picks the model
MAX_RESETS_AHEAD = 32 * 86400.0  # a reported resets_at beyond a month from now is cut to it
IN_FLIGHT_RETRY = 0.1  # RetryInfo while an account is held at its in-flight cap
GRANTED_MEMORY = 4096  # leases granted here whose owner Complete knows without a store read
_FINISHED = {LeaseStatus.COMPLETED: AuditEvent.LEASE_COMPLETED,
             LeaseStatus.EXPIRED: AuditEvent.LEASE_EXPIRED}


class Leasing:
    """Grants, renews, reports on and completes leases."""

    def __init__(self, *, store: StateStore, clock: Clock, config: EngineConfig, audit: Audit,
                 registry: KeyRegistry, ledger: Ledger, health: HealthBook,
                 models: ModelChooser | None, new_lease_id: Callable[[], str],
                 rng: random.Random) -> None:
        self._store = store
        self._clock = clock
        self._config = config
        self._audit = audit
        self._registry = registry
        self._ledger = ledger
        self._health = health
        self._models = models
        self._new_lease_id = new_lease_id
        self._rng = rng
        self._strategies: dict[str, Strategy] = {}
        # Leases granted by this broker: lease_id -> (principal, pool), which never change, so
        # Complete checks ownership without a store read (the store's complete decides the
        # rest, atomically). The newest GRANTED_MEMORY; others are read as before.
        self._granted_here: OrderedDict[str, tuple[str, str]] = OrderedDict()

    # -- LeaseKey ------------------------------------------------------------------------

    async def lease(self, caller: Caller, req: LeaseRequest) -> LeaseGrant | InternalRoute:
        """Reserve ``units`` on one key of the pool, atomically, or explain why not."""
        ttl = self._validate_lease(req)
        caller.require(Rpc.LEASE_KEY, req.pool)
        if not caller.may_priority(req.priority):
            raise PermissionDenied(
                f"{caller.principal} may not lease at {req.priority.name.lower()} priority "
                "(a role of the policy must list it in `priorities`)")
        pool = self._registry.pool(req.pool)
        units = req.units
        now = self._clock.now()
        if req.model == AUTO_MODEL and self._models is not None:
            req = await self._auto_model(req, pool, now)
        serving = pool.for_model(req.model)
        if req.model and not serving and pool.keys:
            raise InvalidArgument("model", f"no key of pool {req.pool!r} serves {req.model!r}")
        ledger = self._ledger
        ledger.check_units_fit(req.pool, req.model, serving, units)

        settings = self._config.pool(req.pool)
        budget = None
        if admission.applies(settings, req.priority):
            # The reserve and the pacing are judged by the store, inside the reservation.
            capacity, _ = ledger.pool_budget(req.pool, pool.accounts, now)
            limit = admission.allowed(settings, req.priority, capacity, now, day_window(now)[1])
            if limit is not None:
                budget = Budget(ledger.budget_windows(req.pool, pool.accounts, now), limit)

        strategy = self._strategy(req.pool)
        ctx = self._context(now)
        # The principal's own limits ride on every candidate: the same atomic charge.
        own = self._principal_windows(caller, req.pool, pool, now)
        key_windows = ledger.windows
        windows_of = ((lambda k, t: key_windows(k, t) + own) if own
                      else key_windows)
        health = self._health
        paid = is_paid_model(req.model)
        paid_block = health.paid_block

        def usable(key: Key, at: float) -> bool:
            return health.usable(key, at) and not (paid and paid_block(key.account, at))

        msub = model_subject(req.pool, req.model) if req.model else ""
        gates = ((model_scope(req.pool), msub),) if msub else ()
        model_block: list[Health] = []
        used = ledger.used  # refreshed in place, so this stays the cache
        # What the store answered in this request: RetryInfo and the last pass read these,
        # never the shared cache another request may have overwritten meanwhile.
        fresh_used: dict[str, int] = {}
        fresh_health: dict[str, Health] = {}
        probe_until = now + self._config.health.probe_timeout

        def windows(key: Key) -> tuple[Window, ...]:
            return windows_of(key, now)

        def fits(key: Key) -> bool:
            if key.key_id in tried or not usable(key, now):
                return False
            for w in windows_of(key, now):  # noqa: SIM110 - a loop is cheaper than all(genexpr)
                if used.get(w.name, 0) + units > w.limit:
                    return False
            return True

        def known_out(key: Key) -> bool:
            """The store said so in this request: a full window, or a cooling account."""
            if key.key_id in tried or not key.enabled:
                return True
            for w in windows_of(key, now):
                if fresh_used.get(w.name, 0) + units > w.limit:
                    return True
            acct = fresh_health.get(account_subject(key.account))
            if paid and gate_blocks(fresh_health.get(account_paid_subject(key.account)), now):
                return True
            return acct is not None and blocked(None, acct, now)[0]

        lease_id = self._new_lease_id()
        tried: set[str] = set()

        async def offer(order: Sequence[Key]) -> Reservation | Rejection:
            result = await self._store.reserve(ReserveRequest(
                lease_id=lease_id, principal=caller.principal, request_id=req.request_id,
                pool=req.pool, model=req.model, units=units, created_at=now,
                expires_at=now + ttl, probe_until=probe_until, budget=budget, gates=gates,
                candidates=[Candidate(k.key_id, k.account, windows(k), key_subject(k.key_id),
                                      account_subject(k.account), k.version,
                                      account_paid_subject(k.account) if paid else "")
                            for k in order]))
            if isinstance(result, Rejection) and result.budget_spent is None:
                if msub:
                    health.absorb((msub,), result.health)
                    gate = result.health.get(msub)
                    if gate is not None and gate_blocks(gate, now):
                        model_block.append(gate)
                        return result
                used.update(result.used)
                fresh_used.update(result.used)
                fresh_health.update(result.health)
                subjects = {s for k in order
                            for s in (key_subject(k.key_id), account_subject(k.account),
                                      account_paid_subject(k.account))}
                health.absorb(subjects, result.health)
                tried.update(k.key_id for k in order)
            return result

        result: Reservation | Rejection | None = None
        for attempt in range(MAX_ATTEMPTS):
            order = strategy.pick(req.pool, serving, fits, ctx, CANDIDATES_PER_ATTEMPT)
            if not order and not (req.request_id and attempt == 0):  # the store answers replays
                break
            result = await offer(order)
            if (not isinstance(result, Rejection) or result.budget_spent is not None
                    or model_block):
                break
        if model_block:
            return await self._model_cooling(caller, req, msub, model_block[0], now)
        if not isinstance(result, Reservation) and (result is None
                                                    or result.budget_spent is None):
            # The cache may be stale (another replica refunded, re-enabled a key, a lease
            # expired, the day turned): before saying no, the store judges every key of the
            # pool not ruled out by what it answered in this request, in bounded batches.
            rest = [k for k in serving if not known_out(k)]
            for i in range(0, len(rest), LAST_PASS_BATCH):
                batch = [k for k in rest[i:i + LAST_PASS_BATCH] if not known_out(k)]
                if batch:
                    result = await offer(batch)
                    if (not isinstance(result, Rejection) or result.budget_spent is not None
                            or model_block):
                        break
        if model_block:
            return await self._model_cooling(caller, req, msub, model_block[0], now)
        if isinstance(result, Reservation):
            return await self._granted(caller, req, result, now)
        if result is not None and result.budget_spent is not None:
            return await self._over_budget(caller, req, settings, pool, result.budget_spent, now)
        return self._exhausted(caller, req, serving, fresh_used, now, own,
                               fresh_health if paid else None)

    def _principal_windows(self, caller: Caller, pool_name: str, pool: Pool,
                           now: float) -> tuple[Window, ...]:
        limits = caller.limits_for(pool_name)
        if limits is None:
            return ()
        capacity = (self._ledger.pool_budget(pool_name, pool.accounts, now)[0]
                    if limits.daily_share is not None else 0)
        return principal_windows(caller.principal, pool_name, limits, capacity, now)

    async def _model_cooling(self, caller: Caller, req: LeaseRequest, subject: str,
                             gate: Health, now: float) -> LeaseGrant | InternalRoute:
        """The model is cooling pool-wide (its upstream provider answered 429): no account
        of the pool can help until it ends."""
        replay = await self._replay(caller, req, now)
        return replay or self._refuse(
            caller, req, "model_cooling_down", gate.until - now,
            f"model {req.model!r} of pool {req.pool!r} is cooling down ({gate.reason}): its "
            "upstream provider is rate-limited for everyone", "unhealthy",
            (QuotaViolation(subject, f"{gate.state.value} ({gate.reason})"),))

    async def _over_budget(self, caller: Caller, req: LeaseRequest, settings: PoolSettings,
                           pool: Pool, spent: int, now: float) -> LeaseGrant | InternalRoute:
        """The store found no room in the pool's day budget for this priority."""
        capacity, _ = self._ledger.pool_budget(req.pool, pool.accounts, now)
        day_end = day_window(now)[1]
        refusal = admission.admission(settings, req.priority, req.units, capacity, spent, now,
                                      day_end) or admission.Refusal(
            "reserved_for_higher_priority", day_end - now)
        replay = await self._replay(caller, req, now)
        return replay or self._refuse(
            caller, req, refusal.reason, refusal.retry_after,
            f"pool {req.pool!r}: {refusal.reason.replace('_', ' ')}", refusal.reason,
            (QuotaViolation(f"pool:{req.pool}", refusal.reason),))

    async def _auto_model(self, req: LeaseRequest, pool: Pool, now: float) -> LeaseRequest:
        """``model="auto"``: the chooser picks among models the pool's usable keys serve."""
        assert self._models is not None
        usable = [k for k in pool.keys if self._health.usable(k, now)] or pool.keys
        avoid = self._health.cooling_models(req.pool, now)
        return dataclasses.replace(req, model=await self._models.choose(req.pool, usable, avoid))

    async def _granted(self, caller: Caller, req: LeaseRequest, res: Reservation,
                       now: float) -> LeaseGrant:
        lease = res.lease
        if res.replay and lease.pool != req.pool:
            raise InvalidArgument("request_id", "was used before for a different request")
        if res.replay and lease.status is LeaseStatus.REVOKED:  # its key may be gone already
            raise LeaseRevoked(f"lease {lease.lease_id} of this request_id was ended because "
                               f"its key {lease.key_id} was revoked; lease again with a new "
                               "request_id")
        key = self._registry.keys.get(lease.key_id)
        if key is None:
            raise NotFound(f"key {lease.key_id!r} of this request_id is no longer in the pool")
        if res.replay:
            self._check_replayable(lease, key, now)
        ledger = self._ledger
        ledger.used.update(res.used)
        account_left = ledger.account_left(lease.pool, lease.account, now)
        grant = LeaseGrant(lease=lease, key=key,
                           remaining_key_today=ledger.key_left(key, account_left, now),
                           remaining_account_today=account_left, resets_at=next_midnight(now))
        if not res.replay:
            granted = self._granted_here
            granted[lease.lease_id] = (lease.principal, lease.pool)
            if len(granted) > GRANTED_MEMORY:
                granted.popitem(last=False)
            self._health.granted(key, now)
        # Every answer that hands out the secret is audited, a replay too: the grant's own
        # record may be missing (a broker killed between its reservation and its audit line).
        event, decision = ((AuditEvent.LEASE_REPLAYED, "replayed") if res.replay
                           else (AuditEvent.LEASE_GRANTED, "granted"))
        self._audit.record(event, decision=decision,
                           principal=caller.principal, rpc=Rpc.LEASE_KEY, pool=lease.pool,
                           key_id=lease.key_id, lease_id=lease.lease_id,
                           account=lease.account, units=lease.units,
                           remaining=account_left, request_id=lease.request_id,
                           priority=req.priority.name.lower(), route="external",
                           strategy=self._config.pool(lease.pool).strategy.value)
        return grant

    def _check_replayable(self, lease: LeaseRecord, key: Key, now: float) -> None:
        """A replay hands out the secret only while it is the one granted and still usable:
        the lease active, the key enabled and not disabled, and its version the granted one."""
        why = ""
        if not lease.active_at(now):
            why = f"the lease is {'expired' if now >= lease.expires_at else lease.status.value}"
        elif (not key.enabled or self._health.key_health(
                key, key.key_id, key.account, now).state is HealthState.DISABLED):
            why = "its key was disabled"
        elif key.version != lease.key_version:
            why = "its key was rewritten since"
        if why:
            raise LeaseNotActive(f"lease {lease.lease_id} of this request_id is no longer active "
                                 f"({why}); lease again with a new request_id")

    async def _replay(self, caller: Caller, req: LeaseRequest, now: float) -> LeaseGrant | None:
        """The earlier lease of this request_id, if any (a refusal must not hide a grant)."""
        if not req.request_id:
            return None
        result = await self._store.reserve(ReserveRequest(
            lease_id=self._new_lease_id(), principal=caller.principal,
            request_id=req.request_id, pool=req.pool, model=req.model, units=req.units,
            created_at=now, expires_at=now, candidates=()))
        return await self._granted(caller, req, result, now) if isinstance(
            result, Reservation) else None

    def _exhausted(self, caller: Caller, req: LeaseRequest, keys: Sequence[Key],
                   fresh: Mapping[str, int], now: float,
                   own: tuple[Window, ...] = (),
                   paid_records: Mapping[str, Health] | None = None) -> InternalRoute:
        """Work out when the earliest key frees up, then route internally or raise.

        Counts come from what the store answered in this request (``fresh``; every usable
        key's windows were judged by it), the cache only for windows it did not look at.
        """
        health, ledger = self._health, self._ledger

        def candidate(k: Key) -> admission.Candidate:
            shown_health = health.key_health(k, k.key_id, k.account, now)
            usable = health.usable(k, now)
            if paid_records is not None and usable:
                # A paid lease: the account's paid use may be cooling or stopped.
                rec = paid_records.get(account_paid_subject(k.account)) or health.paid_block(
                    k.account, now)
                if rec is not None and gate_blocks(rec, now):
                    shown_health, usable = rec, False
                elif (rec is not None and rec.reason == IN_FLIGHT_REASON
                      and now < rec.until + IN_FLIGHT_CAP_SECONDS):
                    # Held at the learned in-flight cap: a slot frees when a lease ends.
                    shown_health = Health(HealthState.COOLING_DOWN, rec.reason,
                                          now + IN_FLIGHT_RETRY, rec.failures)
                    usable = False
            return admission.Candidate(k.key_id, shown_health, usable,
                                       ledger.windows(k, now) + own)

        found = admission.exhaustion(
            (candidate(k) for k in keys),
            ChainMap(dict(fresh), ledger.used), req.units, now, self._config.retry_when_stuck)
        return self._refuse(caller, req, found.reason, found.retry_after,
                            f"no key of pool {req.pool!r} can take {req.units} unit(s) now "
                            f"({found.reason})", found.cause, found.violations)

    def _refuse(self, caller: Caller, req: LeaseRequest, reason: str, retry_after: float,
                message: str, cause: str,
                violations: tuple[QuotaViolation, ...]) -> InternalRoute:
        """Route internally (when allowed) or raise QuotaExhausted; audited either way."""
        retry_after = max(retry_after, 0.001)
        internal = req.allow_internal
        self._audit.record(
            AuditEvent.LEASE_INTERNAL if internal else AuditEvent.LEASE_EXHAUSTED,
            decision="internal" if internal else "exhausted",
            principal=caller.principal, rpc=Rpc.LEASE_KEY, pool=req.pool, reason=reason,
            priority=req.priority.name.lower(), retry_after=round(retry_after, 3), remaining=0,
            route="internal" if internal else "none")
        if internal:
            return InternalRoute(reason=reason, retry_after=retry_after)
        raise QuotaExhausted(message, retry_after=retry_after, cause=cause,
                             violations=violations)

    def _strategy(self, pool: str) -> Strategy:
        strategy = self._strategies.get(pool)
        if strategy is None:
            strategy = make_strategy(self._config.pool(pool).strategy)
            self._strategies[pool] = strategy
        return strategy

    def _context(self, now: float) -> StrategyContext:
        day_end = day_window(now)[1]
        used = self._ledger.used
        windows_of = self._ledger.windows

        def usage(key: Key) -> tuple[int, int, int]:
            """(the key's units today, its account's units left today, the account's daily
            limit), read off the key's memoised windows (this runs for every candidate)."""
            account, _, own = windows_of(key, now)[:3]  # windows_for's order: account day first
            return (used.get(own.name, 0), max(0, account.limit - used.get(account.name, 0)),
                    account.limit)

        return StrategyContext(now=now, usage=usage, stats=self._health.stats,
                               day_fraction_left=(day_end - now) / 86400.0, rng=self._rng)

    def _validate_lease(self, req: LeaseRequest) -> float:
        """Check the request; returns its TTL."""
        check_name("pool", req.pool)
        check_text("model", req.model, 256)
        check_request_id(req.request_id)
        max_units = self._config.lease.max_units
        if not 1 <= req.units <= max_units:
            raise InvalidArgument("units", f"must be 1 to {max_units}")
        return self.ttl(req.ttl)

    def ttl(self, ttl: float | None) -> float:
        lease = self._config.lease
        if ttl is None:
            return lease.default_ttl
        if not 1.0 <= ttl <= lease.max_ttl:
            raise InvalidArgument("ttl", f"must be 1s to {lease.max_ttl:g}s")
        return ttl

    # -- RenewLease, ReportUsage, Complete -----------------------------------------------

    async def renew(self, caller: Caller, lease_id: str, ttl: float | None) -> LeaseRecord:
        lease = await self._owned_lease(caller, lease_id, Rpc.RENEW_LEASE)
        now = self._clock.now()
        renewed = await self._store.renew(lease.lease_id, now + self.ttl(ttl), now)
        self._audit.record(AuditEvent.LEASE_RENEWED, decision="renewed",
                           principal=caller.principal, rpc=Rpc.RENEW_LEASE, pool=lease.pool,
                           key_id=lease.key_id, lease_id=lease.lease_id,
                           expires_at=renewed.expires_at)
        return renewed

    async def report(self, caller: Caller, lease_id: str, report: UsageReport) -> Health:
        """Record a provider answer; update key/account health and reconcile counters.

        One store operation, first report per lease wins: the health records, the key's
        statistics, a reconciled window and the usage row are applied together, and a
        retried report gets the first answer back and changes nothing.
        """
        _validate_report(report)
        lease = await self._owned_lease(caller, lease_id, Rpc.REPORT_USAGE)
        now = self._clock.now()
        grace = self._config.lease.report_grace
        # A lease ended by its key's revocation may have had its call in flight: its report
        # counts up to the grace after the expiry it had.
        ended = (lease.expires_at if lease.status is LeaseStatus.REVOKED
                 else lease.ended_at())
        if not lease.active_at(now) and now > ended + grace:
            raise LeaseNotActive(
                f"lease {lease.lease_id} ended {now - ended:.0f}s ago; a report is "
                f"accepted up to {grace:g}s (lease.report_grace) after its lease ends")
        self._check_model(lease, report)
        report = self._bounded(report, now)
        answer, applied = await self._apply_report(lease, report, now)
        self._audit.record(AuditEvent.LEASE_REPORTED,
                           decision="reported" if applied else "duplicate",
                           principal=caller.principal, rpc=Rpc.REPORT_USAGE, pool=lease.pool,
                           key_id=lease.key_id, lease_id=lease.lease_id,
                           http_status=report.http_status, reason=report.error_type,
                           health=answer.state.value,
                           remaining=self._ledger.account_left(lease.pool, lease.account, now))
        return answer

    async def _apply_report(self, lease: LeaseRecord, report: UsageReport,
                            now: float) -> tuple[Health, bool]:
        """Read the records the report starts from, work out what it changes, and apply it
        in one store call that checks nothing changed meanwhile (else read again)."""
        ksub, asub = key_subject(lease.key_id), account_subject(lease.account)
        psub = account_paid_subject(lease.account)
        upstream = self._health.is_upstream_429(report)
        target = (self._ledger.reconcile_target(lease, report, now)
                  if report.http_status == 429 and not upstream else None)
        key = self._registry.keys.get(lease.key_id)
        in_flight = 0
        if self._health.is_in_flight_402(report):
            # The account's other leases in flight: what the provider's budget admitted.
            keys = self._registry.keys
            in_flight = sum(n for kid, n in (await self._store.active_leases(now)).items()
                            if kid in keys and keys[kid].account == lease.account)
            in_flight -= 1 if lease.active_at(now) else 0
        for _ in range(REPORT_TRIES):
            state = await self._store.report_state(lease, ksub, asub, psub)
            if state.answer is not None:
                return state.answer, False
            changes, stats = self._health.after_report(lease, report, state, now, in_flight)
            after = {**state.health, **changes}
            answer = (Health(HealthState.DISABLED, "vault") if key is not None and not key.enabled
                      else shown(after.get(ksub, Health()), after.get(asub, Health()), now))
            done = await self._store.apply_report(ReportWrite(
                lease=lease, report=report, now=now, answer=answer, health=changes,
                stats=stats, counter=target[0] if target else None, token=state.token))
            if done is None:
                continue  # another report on this key or account came first: read again
            if done[1]:
                self._health.reported(lease, state, changes, stats)
                if target is not None:
                    self._ledger.reconciled(lease, target[0], target[1],
                                            report.ratelimit_remaining or 0)
                await self._model_reported(lease, report, now)
            return done
        raise BackendUnavailable("store: the key's health kept changing under this report",
                                 backend="store")

    async def _model_reported(self, lease: LeaseRecord, report: UsageReport,
                              now: float) -> None:
        """An upstream 429 cools the model for the whole pool (its record is pool-wide, kept
        apart from the account's); a success after the cooldown forgets it."""
        model = report.model or lease.model
        if not model:
            return
        subject = model_subject(lease.pool, model)
        current = self._health.get(subject)
        after = self._health.model_after_report(report, current, now)
        if (after is None and 200 <= report.http_status < 300 and current != Health()
                and current.until <= now):
            after = Health()
        if after is not None:
            await self._health.set(model_scope(lease.pool), subject, after)

    def _check_model(self, lease: LeaseRecord, report: UsageReport) -> None:
        """The reported model must be the leased one, or one the key serves (any model, for
        a lease that named none on a key without a model list)."""
        model = report.model
        if not model or model == lease.model:
            return
        key = self._registry.keys.get(lease.key_id)
        if key is not None and (model in key.models or (not lease.model and not key.models)):
            return
        raise InvalidArgument("model", f"must be the leased model {lease.model!r}"
                              + (" or one its key serves" if key and key.models else ""))

    def _bounded(self, report: UsageReport, now: float) -> UsageReport:
        """The report with its rate-limit times cut to what the provider can mean: a reset
        no later than the next 00:00 UTC (plus health.reset_margin), a Retry-After no longer
        than health.max_retry_after. A caller's value never outlives the window it names."""
        h = self._config.health
        reset_ms, retry_after = report.ratelimit_reset_ms, report.retry_after
        latest_ms = math.floor((next_midnight(now) + h.reset_margin) * 1000.0)
        if reset_ms is not None and reset_ms > latest_ms:
            reset_ms = latest_ms
        if retry_after is not None and retry_after > h.max_retry_after:
            retry_after = h.max_retry_after
        resets_at = report.resets_at
        if resets_at is not None and resets_at > now + MAX_RESETS_AHEAD:
            resets_at = now + MAX_RESETS_AHEAD
        if (reset_ms, retry_after, resets_at) == (report.ratelimit_reset_ms, report.retry_after,
                                                  report.resets_at):
            return report
        return dataclasses.replace(report, ratelimit_reset_ms=reset_ms, retry_after=retry_after,
                                   resets_at=resets_at)

    async def complete(self, caller: Caller, lease_id: str, used: bool) -> LeaseRecord:
        owner = self._granted_here.get(lease_id)
        if owner is not None:  # granted here: who and which pool, without reading it again
            self._check_owner(caller, lease_id, Rpc.COMPLETE)
            self._check_owner(caller, lease_id, Rpc.COMPLETE, *owner)
        else:
            await self._owned_lease(caller, lease_id, Rpc.COMPLETE)
        now = self._clock.now()
        done, changed = await self._store.complete(lease_id, used, now)
        self._granted_here.pop(lease_id, None)
        if changed:
            if done.refunded:
                self._ledger.refunded(done.windows, done.units)
            self._audit.record(
                _FINISHED[done.status], decision=done.status.value,
                principal=caller.principal, rpc=Rpc.COMPLETE, pool=done.pool, key_id=done.key_id,
                lease_id=done.lease_id, used=used, refunded=done.refunded, units=done.units,
                held_seconds=round(max(0.0, min(now, done.expires_at) - done.created_at), 3),
                remaining=self._ledger.account_left(done.pool, done.account, now))
        return done

    async def _owned_lease(self, caller: Caller, lease_id: str, rpc: Rpc) -> LeaseRecord:
        self._check_owner(caller, lease_id, rpc)
        lease = await self._store.get_lease(lease_id)
        if lease is None:
            raise LeaseNotFound(f"lease {lease_id} not found")
        self._check_owner(caller, lease_id, rpc, lease.principal, lease.pool)
        return lease

    @staticmethod
    def _check_owner(caller: Caller, lease_id: str, rpc: Rpc, principal: str | None = None,
                     pool: str = "") -> None:
        """The lease id is well formed and ``caller`` may call ``rpc`` at all (deny by
        default before revealing whether the lease exists); with the lease's principal and
        pool, that it is the caller's and the caller may call ``rpc`` on that pool."""
        if principal is None:
            check_lease_id(lease_id)
            if not caller.may_any(rpc):
                raise PermissionDenied(f"{caller.principal} may not call {rpc}")
            return
        if principal != caller.principal:
            raise PermissionDenied("the lease belongs to another principal")
        caller.require(rpc, pool)


def _validate_report(r: UsageReport) -> None:
    if r.http_status != 0 and not 100 <= r.http_status <= 599:
        raise InvalidArgument("http_status", "must be 0 or 100-599")
    check_text("error_type", r.error_type, 128)
    for name in ("error_reason", "limit_source", "upstream_provider"):
        check_text(name, getattr(r, name), 128)
    if r.resets_at is not None and not 0.0 <= r.resets_at <= 1e11:  # also rejects NaN
        raise InvalidArgument("resets_at", "must be a time after 1970")
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

