"""Key and account health, and keys' performance statistics, written through to the store."""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping

from ..audit import Audit, AuditEvent
from ..models import Health, HealthState, Key, KeyStats, LeaseRecord, UsageReport
from ..store import ReportState, StateStore
from . import health as hsm
from .config import EngineConfig
from .windows import (
    account_paid_subject,
    account_subject,
    is_paid_model,
    key_subject,
    model_subject,
)

__all__ = ["HealthBook", "shown"]

_HEALTHY = Health()
_NO_STATS = KeyStats()


class HealthBook:
    """Health records by subject (``windows.key_subject``, ``windows.account_subject``) and
    decayed success/failure/latency statistics by key id.

    The store is the truth: every record lives there (with its account), each reservation
    checks the records of its candidates inside the store's atomic call, and a report writes
    the records it changes in the same store call as the rest of the report. What this book
    holds is a cache, refreshed from what the store answers (reservations, reports, each
    sweep, admin reads): it orders candidates and explains refusals, never vetoes a lease.
    """

    def __init__(self, store: StateStore, config: EngineConfig, audit: Audit,
                 rng: random.Random) -> None:
        self._store = store
        self._config = config
        self._audit = audit
        self._rng = rng
        self._health: dict[str, Health] = {}
        self._stats: dict[str, KeyStats] = {}
        self._subjects: dict[str, tuple[str, str, str]] = {}  # key id -> account, subjects

    async def load(self) -> None:
        """Reload every record and statistic from the store."""
        self._health = await self._store.health()
        self._stats = await self._store.key_stats()

    async def load_health(self) -> None:
        """Reload every health record from the store (admin reads, each sweep)."""
        self._health = await self._store.health()

    def get(self, subject: str) -> Health:
        return self._health.get(subject, _HEALTHY)

    def stats(self, key: Key) -> KeyStats:
        return self._stats.get(key.key_id, _NO_STATS)

    def absorb(self, subjects: Iterable[str], found: Mapping[str, Health]) -> None:
        """The store's current records of ``subjects`` (absent from ``found``: healthy)."""
        for subject in subjects:
            health = found.get(subject)
            if health is None or health == _HEALTHY:
                self._health.pop(subject, None)
            else:
                self._health[subject] = health

    def _audit_change(self, subject: str, before: Health, after: Health, key_id: str) -> None:
        # A credit stop is audited each time it is set (a re-check that finds no credit
        # again keeps its state): the alert on it follows these records.
        if after.state is not before.state or after.reason in hsm.CREDIT_STOPS:
            self._audit.record(AuditEvent.KEY_HEALTH, decision=after.state.value,
                               key_id=key_id, subject=subject, reason=after.reason,
                               previous=before.state.value, until=after.until or None)

    async def set(self, account: str, subject: str, health: Health, key_id: str = "") -> None:
        """Write one record to the store (always: another replica may hold another value);
        a change of state is an audit record."""
        before = self._health.get(subject, _HEALTHY)
        await self._store.put_health(account, subject, health)
        self.absorb((subject,), {subject: health})
        self._audit_change(subject, before, health, key_id)

    def key_health(self, key: Key | None, key_id: str, account: str, now: float) -> Health:
        """The health a key shows: Vault flag, then its own record, then its account's cooldown.

        A circuit whose backoff has passed shows as circuit_open with ``until`` in the
        past (half-open): it is usable, for one probe lease.
        """
        if key is not None and not key.enabled:
            return Health(HealthState.DISABLED, "vault")
        if not self._health:  # the usual case, on the lease path for every candidate
            return _HEALTHY
        # Subjects memoised per key: this runs for every candidate of every lease.
        names = self._subjects.get(key_id)
        if names is None or names[0] != account:
            names = self._subjects[key_id] = (account, key_subject(key_id),
                                              account_subject(account))
        return shown(self._health.get(names[1], _HEALTHY), self._health.get(names[2], _HEALTHY),
                     now)

    def usable(self, key: Key, now: float) -> bool:
        h = self.key_health(key, key.key_id, key.account, now)
        return h.state is HealthState.HEALTHY or hsm.is_probe_slot(h, now)

    def cooldowns(self, pools: Mapping[str, Iterable[str]],
                  now: float) -> list[tuple[str, str, str, Health]]:
        """``(scope, pool, name, record)`` of every model cooling pool-wide (scope ``model``)
        and every account's paid-use record still in force (``account_paid``) of ``pools``
        (pool -> its accounts), from this book (``load_health`` first)."""
        out: list[tuple[str, str, str, Health]] = []
        for pool, accounts in sorted(pools.items()):
            prefix = model_subject(pool, "")
            out += [("model", pool, s[len(prefix):], h) for s, h in sorted(self._health.items())
                    if s.startswith(prefix) and h.until > now]
            for account in sorted(set(accounts)):
                h = self._health.get(account_paid_subject(account))
                if h is not None and (h.until > now or h.state is HealthState.DISABLED
                                      or h.reason == hsm.Condition.IN_FLIGHT_BUDGET):
                    out.append(("account_paid", pool, account, h))
        return out

    def cooling_models(self, pool: str, now: float) -> frozenset[str]:
        """Models of ``pool`` cooling pool-wide now (upstream 429), as this replica knows."""
        prefix = model_subject(pool, "")
        return frozenset(s[len(prefix):] for s, h in self._health.items()
                         if s.startswith(prefix) and h.until > now)

    def paid_block(self, account: str, now: float) -> Health | None:
        """The account's paid-use record when it blocks paid leases now (in-flight budget
        cooldown, credit stop), else None."""
        if not self._health:
            return None
        rec = self._health.get(account_paid_subject(account))
        return rec if rec is not None and rec.state is not HealthState.HEALTHY and (
            rec.state is HealthState.DISABLED or rec.until > now) else None

    def granted(self, key: Key, now: float) -> None:
        """A lease on ``key`` went out: if the key was half-open the store made this lease its
        one probe (inside the reservation); the cache follows."""
        subject = key_subject(key.key_id)
        own = self._health.get(subject, _HEALTHY)
        if hsm.is_probe_slot(own, now):
            self._health[subject] = hsm.probe_started(own, now, self._config.health)

    def after_report(self, lease: LeaseRecord, report: UsageReport, state: ReportState,
                     now: float, in_flight: int = 0) -> tuple[dict[str, Health], KeyStats | None]:
        """What one provider answer changes, from the records the store holds (``state``):
        the key's, account's and account's paid-use records (only those that change) and
        the key's new statistics (None when the answer says nothing of the key's
        performance). A model cooldown (upstream 429) is pool-wide: ``model_after_report``.
        ``in_flight``: the account's other leases in flight (for an in-flight budget 402)."""
        status = report.http_status
        ksub, asub = key_subject(lease.key_id), account_subject(lease.account)
        psub = account_paid_subject(lease.account)
        own = state.health.get(ksub, _HEALTHY)
        acct = state.health.get(asub, _HEALTHY)
        paid_rec = state.health.get(psub, _HEALTHY)
        paid = is_paid_model(report.model or lease.model)
        condition = hsm.classify(report, paid)
        cfg = self._config
        changes: dict[str, Health] = {}
        C = hsm.Condition
        if condition is C.RATE_LIMIT:
            changes[asub] = hsm.after_rate_limit(acct, report, now, cfg.quota, cfg.health,
                                                 self._rng)
        elif condition is C.IN_FLIGHT_BUDGET:
            changes[psub] = hsm.in_flight_cooldown(paid_rec, report, in_flight, now)
        elif condition is C.NO_CREDITS:
            changes[psub] = hsm.credit_stop(paid_rec, condition, now, cfg.health, self._rng)
        elif condition is C.NEGATIVE_BALANCE:
            changes[asub] = hsm.credit_stop(acct, condition, now, cfg.health, self._rng)
        elif condition in (C.KEY_LIMIT, C.BUDGET) and own.state is not HealthState.DISABLED:
            changes[ksub] = hsm.cooldown_until_reset(condition, report.resets_at, now)
        elif 200 <= status < 300:
            # A success after a cooldown forgets it (past 429s, a credit stop re-checked); a
            # learned in-flight cap stays until it lapses.
            if acct != _HEALTHY and acct.until <= now:
                changes[asub] = _HEALTHY
            if (paid and paid_rec != _HEALTHY and paid_rec.until <= now
                    and paid_rec.reason != hsm.Condition.IN_FLIGHT_BUDGET):
                changes[psub] = _HEALTHY
            elif paid and (raised := hsm.in_flight_success(paid_rec, now)) is not None:
                changes[psub] = raised
        reason = f"http_{status}" if status else (report.error_type or "no_response")
        new_own = (own if condition in (C.KEY_LIMIT, C.BUDGET) else
                   hsm.after_key_report(own, status, reason, now, cfg.health, self._rng))
        if ksub not in changes and new_own != own:
            changes[ksub] = new_own
        learned = (None if condition is C.UPSTREAM_RATE_LIMIT else
                   self._learned(state.stats or _NO_STATS, status, report.latency_ms, now))
        return changes, learned

    @staticmethod
    def is_in_flight_402(report: UsageReport) -> bool:
        """A paid call refused because too many paid calls were in flight."""
        return hsm.classify(report, True) is hsm.Condition.IN_FLIGHT_BUDGET

    @staticmethod
    def is_upstream_429(report: UsageReport) -> bool:
        """An upstream provider's 429: the model's limit, not the account's."""
        return hsm.classify(report, False) is hsm.Condition.UPSTREAM_RATE_LIMIT

    def model_after_report(self, report: UsageReport, current: Health,
                           now: float) -> Health | None:
        """The model's new pool-wide record after an upstream provider's 429 (else None)."""
        if hsm.classify(report, False) is not hsm.Condition.UPSTREAM_RATE_LIMIT:
            return None
        return hsm.model_cooldown(current, report, now, self._config.quota, self._config.health,
                                  self._rng)

    def _learned(self, old: KeyStats, status: int, latency_ms: int, now: float) -> KeyStats | None:
        """The key's decayed success/failure counts and latency after one answer."""
        fault = hsm.key_fault(status)
        if fault is None:
            return None
        decay = (0.5 ** ((now - old.updated_at) / self._config.health.stats_half_life)
                 if old.updated_at else 1.0)
        latency = old.latency_ms
        if not fault:
            latency = float(latency_ms) if old.successes <= 0 else 0.8 * latency + 0.2 * latency_ms
        return KeyStats(successes=old.successes * decay + (0.0 if fault else 1.0),
                        failures=old.failures * decay + (1.0 if fault else 0.0),
                        latency_ms=latency, updated_at=now)

    def reported(self, lease: LeaseRecord, state: ReportState, changes: Mapping[str, Health],
                 stats: KeyStats | None) -> None:
        """A report was applied in the store: the cache follows; state changes are audited."""
        for subject, after in changes.items():
            self._audit_change(subject, state.health.get(subject, _HEALTHY), after, lease.key_id)
        self.absorb((key_subject(lease.key_id), account_subject(lease.account),
                     account_paid_subject(lease.account)), {**state.health, **changes})
        if stats is not None:
            self._stats[lease.key_id] = stats

    async def reset(self, key: Key) -> None:
        """A fresh start (a rotated secret: an old 401 said nothing of the new key)."""
        await self.set(key.account, key_subject(key.key_id), _HEALTHY)

    async def moved(self, old: Key, new: Key) -> None:
        """A key moved to another account: its own record moves with it (records live with
        their account, where reservations read them)."""
        subject = key_subject(old.key_id)
        own = self._health.get(subject)
        if own is not None:
            await self._store.put_health(old.account, subject, _HEALTHY)
            await self._store.put_health(new.account, subject, own)

    async def set_enabled(self, key: Key, enabled: bool) -> None:
        """An operator's decision, written to the store whatever this replica believed."""
        await self.set(key.account, key_subject(key.key_id),
                       _HEALTHY if enabled else Health(HealthState.DISABLED, "operator"),
                       key.key_id)

    async def credit_probed(self, key: Key, limit: float | None, remaining: float | None,
                            reset: str | None, now: float) -> None:
        """A probe read the key's own credit limit: a key cooling because that limit was
        spent is released when credit is left (or the limit is gone), else cooled until the
        limit's next reset - disabled (reason ``key_limit``) when it never resets."""
        subject = key_subject(key.key_id)
        own = self.get(subject)
        if own.reason != hsm.Condition.KEY_LIMIT:
            return
        if limit is None or (remaining is not None and remaining > 0):
            after = _HEALTHY
        else:
            resets_at = hsm.limit_resets_at(reset, now)
            after = (Health(HealthState.DISABLED, hsm.Condition.KEY_LIMIT.value)
                     if resets_at is None else
                     Health(HealthState.COOLING_DOWN, hsm.Condition.KEY_LIMIT.value, resets_at, 1))
        if after != own:
            await self.set(key.account, subject, after, key.key_id)

    async def probe_unauthorized(self, key: Key) -> None:
        """A probe answered 401: disable the key before any caller is handed it."""
        subject = key_subject(key.key_id)
        if self.get(subject).state is not HealthState.DISABLED:
            await self.set(key.account, subject, Health(HealthState.DISABLED, "probe_401"),
                           key.key_id)


def shown(own: Health, account: Health, now: float) -> Health:
    """The health a key enabled in Vault shows, from its own record and its account's."""
    if own.state is HealthState.DISABLED or (own.state is not HealthState.HEALTHY
                                             and own.until > now):
        return own
    if account.state is HealthState.COOLING_DOWN and account.until > now:
        return account
    if own.state is HealthState.CIRCUIT_OPEN:
        return Health(HealthState.CIRCUIT_OPEN, "half_open", own.until, own.failures)
    return _HEALTHY if own is _HEALTHY or own == _HEALTHY else Health(failures=own.failures)
