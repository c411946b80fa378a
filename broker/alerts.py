"""Alert rules over the engine's state, fired once per episode to the log and webhooks.

Rules: a pool below ``pool_below_fraction`` of today's quota; a key disabled or
with its circuit open; an account stopped for credit (out of credits for paid models,
or a negative balance) until a call shows credit again; every key of a pool exhausted
or unusable; a pool's error rate above ``error_rate`` over ``error_window``; Vault
unreachable for longer than ``vault_down_seconds``; the policy file missing or broken at a
reload (the old policy stays in force); a key rotation that failed (until a rotation of that
key succeeds). An alert fires when its condition starts and resolves
when it ends; while it lasts nothing more is sent.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import httpx
import structlog

from .audit import AuditEvent
from .clock import Clock
from .config import AlertSettings
from .engine import KeySnapshot
from .engine.health import CALLER_FAULTS, CREDIT_STOPS, describe_reason
from .models import HealthState

__all__ = ["Alert", "AlertManager"]

log = structlog.get_logger("keybroker.alerts")


@dataclass(frozen=True)
class Alert:
    rule: str
    subject: str
    summary: str

    @property
    def key(self) -> tuple[str, str]:
        return self.rule, self.subject


class AlertManager:
    """Evaluates the rules (``evaluate``) and is an audit sink for ReportUsage outcomes."""

    def __init__(self, settings: AlertSettings, clock: Clock,
                 snapshot: Callable[[], Iterable[KeySnapshot]],
                 source_error: Callable[[], str | None],
                 on_fire: Callable[[str], None] | None = None,
                 policy_error: Callable[[], str | None] = lambda: None) -> None:
        """``policy_error`` says why the last policy reload failed (None when it did not)."""
        self._s = settings
        self._policy_error = policy_error
        self._clock = clock
        self._snapshot = snapshot
        self._source_error = source_error
        self._on_fire = on_fire
        self._active: dict[tuple[str, str], Alert] = {}
        self._reports: collections.deque[tuple[float, str, bool]] = collections.deque()
        self._vault_down_since: float | None = None
        self._credit_stops: dict[str, str] = {}  # health subject -> reason
        self._rotation_failures: dict[str, str] = {}  # key id -> why its rotation failed
        self._webhooks = [u.strip() for u in settings.webhooks.split(",") if u.strip()]
        self._http: httpx.AsyncClient | None = None

    @property
    def active(self) -> list[Alert]:
        return list(self._active.values())

    def __call__(self, event: AuditEvent, fields: Mapping[str, Any]) -> None:
        """Audit sink: remember report outcomes for the error-rate rule."""
        if event is AuditEvent.KEY_HEALTH:
            subject, reason = str(fields.get("subject", "")), str(fields.get("reason", ""))
            if reason in CREDIT_STOPS:
                self._credit_stops[subject] = reason
            else:
                self._credit_stops.pop(subject, None)
        elif event is AuditEvent.KEY_ROTATION_FAILED:
            self._rotation_failures[str(fields.get("key_id", ""))] = str(fields.get("reason", ""))
        elif event in (AuditEvent.KEY_ROTATED, AuditEvent.KEY_REVOKED):
            self._rotation_failures.pop(str(fields.get("key_id", "")), None)
        if event is AuditEvent.LEASE_REPORTED:
            status = int(fields.get("http_status") or 0)
            failed = not 200 <= status < 300 and status not in CALLER_FAULTS
            self._reports.append((self._clock.now(), str(fields.get("pool", "")), failed))

    def _conditions(self) -> list[Alert]:
        now, s = self._clock.now(), self._s
        found: list[Alert] = []
        pools: dict[str, dict[str, Any]] = {}
        for row in self._snapshot():
            pool = pools.setdefault(row.pool, {"accounts": {}, "usable": 0})
            pool["accounts"][row.account] = (row.account_left, row.daily_limit)
            if row.health in (HealthState.DISABLED, HealthState.CIRCUIT_OPEN):
                found.append(Alert("key_unhealthy", row.key_id,
                                   f"key {row.key_id} is {row.health.value}"))
            elif row.health is HealthState.HEALTHY and row.key_left > 0:
                pool["usable"] += 1
        for subject, reason in sorted(self._credit_stops.items()):
            found.append(Alert("account_out_of_credits", subject,
                               f"{subject}: {describe_reason(reason)}"))
        for name, pool in sorted(pools.items()):
            left = sum(v[0] for v in pool["accounts"].values())
            total = sum(v[1] for v in pool["accounts"].values())
            if not pool["usable"]:
                found.append(Alert("pool_exhausted", name,
                                   f"pool {name}: no key can be leased ({left} units left)"))
            elif total and left / total < s.pool_below_fraction:
                found.append(Alert("pool_low", name,
                                   f"pool {name}: {left} of {total} units left today "
                                   f"(< {s.pool_below_fraction:.0%})"))
        while self._reports and self._reports[0][0] < now - s.error_window:
            self._reports.popleft()
        by_pool: dict[str, list[bool]] = {}
        for _, pool_name, failed in self._reports:
            by_pool.setdefault(pool_name, []).append(failed)
        for name, outcomes in sorted(by_pool.items()):
            rate = sum(outcomes) / len(outcomes)
            if len(outcomes) >= s.error_min_reports and rate > s.error_rate:
                found.append(Alert("error_rate", name,
                                   f"pool {name}: {rate:.0%} of {len(outcomes)} calls failed in "
                                   f"the last {s.error_window:.0f}s"))
        for key_id, why in sorted(self._rotation_failures.items()):
            found.append(Alert("rotation_failed", key_id,
                               f"rotation of {key_id} failed: {why}; the next round resumes it"))
        error = self._source_error()
        if error is None:
            self._vault_down_since = None
        else:
            self._vault_down_since = self._vault_down_since or now
            if now - self._vault_down_since >= s.vault_down_seconds:
                found.append(Alert("vault_unreachable", "vault",
                                   f"Vault unreachable for {now - self._vault_down_since:.0f}s: "
                                   f"{error}"))
        policy_error = self._policy_error()
        if policy_error is not None:
            found.append(Alert("policy_reload_failed", "policy",
                               f"policy reload failed, the previous policy stays in force: "
                               f"{policy_error}"))
        return found

    async def evaluate(self) -> tuple[list[Alert], list[Alert]]:
        """One evaluation; returns (fired, resolved) and delivers them."""
        current = {a.key: a for a in self._conditions()}
        fired = [a for k, a in current.items() if k not in self._active]
        resolved = [a for k, a in self._active.items() if k not in current]
        self._active = current
        for alert in fired:
            log.warning("alert.firing", rule=alert.rule, subject=alert.subject,
                        summary=alert.summary)
            if self._on_fire is not None:
                self._on_fire(alert.rule)
        for alert in resolved:
            log.info("alert.resolved", rule=alert.rule, subject=alert.subject)
        # One at a time, firing before resolved: receivers see a stable order.
        for alert, state in [*((a, "firing") for a in fired), *((a, "resolved") for a in resolved)]:
            await self._deliver(alert, state)
        return fired, resolved

    async def _deliver(self, alert: Alert, state: str) -> None:
        if not self._webhooks:
            return
        if self._http is None:
            self._http = httpx.AsyncClient(timeout=self._s.webhook_timeout)
        mark = ":rotating_light:" if state == "firing" else ":white_check_mark:"
        body = {"text": f"{mark} [{state.upper()}] {alert.summary}",
                "alert": {"rule": alert.rule, "subject": alert.subject, "state": state,
                          "summary": alert.summary, "at": self._clock.now()}}
        for url in self._webhooks:
            for attempt in range(self._s.webhook_retries):
                try:
                    resp = await self._http.post(url, json=body)
                    if resp.status_code < 500 and resp.status_code != 429:
                        break
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(min(0.2 * 2 ** attempt, 5.0))
            else:
                log.error("alert.webhook_failed", rule=alert.rule, subject=alert.subject,
                          attempts=self._s.webhook_retries)

    async def close(self) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None
