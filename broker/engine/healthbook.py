"""Key and account health, and keys' performance statistics, written through to the store."""

from __future__ import annotations

import random

from ..audit import Audit, AuditEvent
from ..models import Health, HealthState, Key, KeyStats, UsageReport
from ..store import StateStore
from . import health as hsm
from .config import EngineConfig
from .windows import account_subject, key_subject

__all__ = ["HealthBook"]

_HEALTHY = Health()
_NO_STATS = KeyStats()


class HealthBook:
    """Health records by subject (``windows.key_subject``, ``windows.account_subject``) and
    decayed success/failure/latency statistics by key id; the store is the truth."""

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
        self._health = await self._store.health()
        self._stats = await self._store.key_stats()

    def get(self, subject: str) -> Health:
        return self._health.get(subject, _HEALTHY)

    def stats(self, key: Key) -> KeyStats:
        return self._stats.get(key.key_id, _NO_STATS)

    async def set(self, subject: str, health: Health, key_id: str = "") -> None:
        """Write-through health; a change of state is an audit record."""
        before = self._health.get(subject, _HEALTHY)
        if health == before:
            return
        await self._store.put_health(subject, health)
        if health == _HEALTHY:
            self._health.pop(subject, None)
        else:
            self._health[subject] = health
        if health.state is not before.state:
            self._audit.record(AuditEvent.KEY_HEALTH, decision=health.state.value,
                               key_id=key_id, subject=subject, reason=health.reason,
                               previous=before.state.value, until=health.until or None)

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
        own = self._health.get(names[1], _HEALTHY)
        if own.state is HealthState.DISABLED or (own.state is not HealthState.HEALTHY
                                                  and own.until > now):
            return own
        acct = self._health.get(names[2], _HEALTHY)
        if acct.state is HealthState.COOLING_DOWN and acct.until > now:
            return acct
        if own.state is HealthState.CIRCUIT_OPEN:
            return Health(HealthState.CIRCUIT_OPEN, "half_open", own.until, own.failures)
        return _HEALTHY if own is _HEALTHY else Health(failures=own.failures)

    def usable(self, key: Key, now: float) -> bool:
        h = self.key_health(key, key.key_id, key.account, now)
        return h.state is HealthState.HEALTHY or hsm.is_probe_slot(h, now)

    async def granted(self, key: Key, now: float) -> None:
        """A lease on ``key`` went out: if the key is half-open, this lease is its one probe."""
        subject = key_subject(key.key_id)
        own = self._health.get(subject, _HEALTHY)
        if hsm.is_probe_slot(own, now):
            await self.set(subject, hsm.probe_started(own, now, self._config.health), key.key_id)

    async def account_reported(self, account: str, key_id: str, report: UsageReport,
                               now: float) -> None:
        """Fold one provider answer through ``key_id`` into its account's health (a 429
        cools the whole account down; a success after the cooldown forgets past 429s)."""
        status = report.http_status
        acct = account_subject(account)
        if status == 429:
            await self.set(acct, hsm.after_rate_limit(
                self.get(acct), report, now, self._config.quota, self._config.health,
                self._rng), key_id)
        elif 200 <= status < 300:
            cooling = self._health.get(acct)
            if cooling is not None and cooling.until <= now:
                await self.set(acct, _HEALTHY, key_id)

    async def key_reported(self, key_id: str, report: UsageReport, now: float) -> None:
        """Fold one provider answer into the key's own health (disable, circuit)."""
        status = report.http_status
        reason = f"http_{status}" if status else (report.error_type or "no_response")
        subject = key_subject(key_id)
        await self.set(subject, hsm.after_key_report(self.get(subject), status, reason, now,
                                                     self._config.health, self._rng), key_id)

    async def learn(self, key_id: str, status: int, latency_ms: int, now: float) -> None:
        """Fold one answer into the key's decayed success/failure counts and latency."""
        fault = hsm.key_fault(status)
        if fault is None:
            return
        old = self._stats.get(key_id, _NO_STATS)
        decay = (0.5 ** ((now - old.updated_at) / self._config.health.stats_half_life)
                 if old.updated_at else 1.0)
        latency = old.latency_ms
        if not fault:
            latency = float(latency_ms) if old.successes <= 0 else 0.8 * latency + 0.2 * latency_ms
        stats = KeyStats(successes=old.successes * decay + (0.0 if fault else 1.0),
                         failures=old.failures * decay + (1.0 if fault else 0.0),
                         latency_ms=latency, updated_at=now)
        self._stats[key_id] = stats
        await self._store.put_key_stats(key_id, stats)

    async def reset(self, key_id: str) -> None:
        """A fresh start (a rotated secret: an old 401 said nothing of the new key)."""
        await self.set(key_subject(key_id), _HEALTHY)

    async def set_enabled(self, key_id: str, enabled: bool) -> None:
        """An operator's decision."""
        await self.set(key_subject(key_id),
                       _HEALTHY if enabled else Health(HealthState.DISABLED, "operator"))

    async def probe_unauthorized(self, key_id: str) -> None:
        """A probe answered 401: disable the key before any caller is handed it."""
        subject = key_subject(key_id)
        if self.get(subject).state is not HealthState.DISABLED:
            await self.set(subject, Health(HealthState.DISABLED, "probe_401"), key_id)
