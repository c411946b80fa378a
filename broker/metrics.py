"""Prometheus metrics on their own registry, served on ``metrics.listen``.

Counters and histograms are fed by the audit trail (one sink) and the RPC
interceptor; quota and health gauges are computed from the engine at scrape time,
so they are never stale and cost nothing on the lease path.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .audit import LEASE_DECISIONS, AuditEvent
from .engine import KeySnapshot
from .errors import BackendUnavailable, BrokerError
from .models import HealthState

__all__ = ["Metrics", "child"]


class _EngineCollector(Collector):
    def __init__(self, snapshot: Callable[[], Iterable[KeySnapshot]]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterable[Metric]:
        key_left = GaugeMetricFamily("keybroker_key_quota_remaining",
                                     "Units left today through this key (its own or its account's)",
                                     labels=["pool", "key_id", "account"])
        acct_left = GaugeMetricFamily("keybroker_account_quota_remaining",
                                      "Units left today on the account", labels=["account"])
        acct_used = GaugeMetricFamily("keybroker_account_quota_used",
                                      "Units used today on the account", labels=["account"])
        health = GaugeMetricFamily("keybroker_key_health",
                                   "1 for the key's current health state, 0 for the others",
                                   labels=["pool", "key_id", "state"])
        seen: set[str] = set()
        for row in self._snapshot():
            key_left.add_metric([row.pool, row.key_id, row.account], row.key_left)
            if row.account not in seen:
                seen.add(row.account)
                acct_left.add_metric([row.account], row.account_left)
                acct_used.add_metric([row.account], row.account_used)
            for state in HealthState:
                health.add_metric([row.pool, row.key_id, state.value],
                                  1.0 if row.health is state else 0.0)
        yield from (key_left, acct_left, acct_used, health)


def child(cache: dict[tuple[str, ...], Any], metric: Any, *values: str) -> Any:
    """``metric.labels(*values)``, kept in ``cache``: labels() takes a lock and builds a
    tuple per call, and the hot path asks for the same few children again and again (label
    values come from the broker's own decisions, so the cache stays small)."""
    found = cache.get(values)
    if found is None:
        found = cache[values] = metric.labels(*values)
    return found


class Metrics:
    """The broker's metrics. Pass ``snapshot`` (engine state) to export gauges."""

    def __init__(self, snapshot: Callable[[], Iterable[KeySnapshot]] | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        r = self.registry
        self.leases = Counter("keybroker_leases", "Lease decisions",
                              ["pool", "decision", "reason"], registry=r)
        self.decisions = Counter("keybroker_decisions", "Every audited decision",
                                 ["event", "decision"], registry=r)
        self.rpc_latency = Histogram("keybroker_rpc_duration_seconds", "Server-side RPC latency",
                                     ["rpc", "code"], registry=r,
                                     buckets=(.0005, .001, .0025, .005, .01, .025, .05, .1, .25,
                                              .5, 1.0, 2.5))
        self.lease_duration = Histogram("keybroker_lease_duration_seconds",
                                        "Time from grant to completion or expiry", ["pool"],
                                        registry=r, buckets=(.1, .5, 1, 2.5, 5, 10, 30, 60, 300,
                                                             900, 3600))
        self.backend_errors = Counter("keybroker_backend_errors",
                                      "Errors reaching a backend (store, vault, catalog)",
                                      ["backend"], registry=r)
        self.alerts = Counter("keybroker_alerts_fired", "Alerts fired", ["rule"], registry=r)
        self.rpc_denied = Counter("keybroker_rpc_denied",
                                  "Calls refused UNAUTHENTICATED or PERMISSION_DENIED (every one; "
                                  "the audit trail holds a sample)", ["rpc", "code"], registry=r)
        self.policy_reload_failures = Counter(
            "keybroker_policy_reload_failures",
            "Policy reloads that failed (file missing or broken); the old policy stays",
            registry=r)
        self.keys_skipped = Counter(
            "keybroker_keys_skipped",
            "Keys not loaded from Vault at a reload, by reason (base_url not allowed, "
            "ciphertext not bound to the key, bad fields)", ["reason"], registry=r)
        if snapshot is not None:
            r.register(_EngineCollector(snapshot))
        self._server: Any = None
        self._decision_children: dict[tuple[str, ...], Any] = {}
        self._lease_children: dict[tuple[str, ...], Any] = {}
        self._backend_children: dict[tuple[str, ...], Any] = {}
        self._duration_children: dict[tuple[str, ...], Any] = {}

    def __call__(self, event: AuditEvent, fields: Mapping[str, Any]) -> None:
        """The audit sink."""
        decision = str(fields.get("decision", ""))
        child(self._decision_children, self.decisions, event, decision).inc()
        if event in LEASE_DECISIONS:
            child(self._lease_children, self.leases, str(fields.get("pool", "")), decision,
                  str(fields.get("reason", ""))).inc()
        held = fields.get("held_seconds")
        if held is not None:
            child(self._duration_children, self.lease_duration,
                  str(fields.get("pool", ""))).observe(float(held))

    def count_backend_error(self, exc: BrokerError) -> None:
        """Count ``exc`` in ``keybroker_backend_errors`` by the backend it came from, if it
        is a BackendUnavailable. Call it once per error, where the error is finally handled:
        the interceptor for RPCs, each background loop for its own rounds."""
        if isinstance(exc, BackendUnavailable):
            child(self._backend_children, self.backend_errors, exc.backend).inc()

    def serve(self, listen: str) -> int:
        """Serve /metrics on ``host:port`` (port 0 picks one); returns the port."""
        host, _, port = listen.rpartition(":")
        server, _thread = start_http_server(int(port), addr=host or "127.0.0.1",
                                            registry=self.registry)
        self._server = server
        return int(server.server_port)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
