"""The composition root: builds store, key source, engine and gRPC server from Settings.

Backends are chosen here and nowhere else.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, cast

import grpc
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection
from keybroker_client.v1 import keybroker_pb2, keybroker_pb2_grpc
from opentelemetry.instrumentation.grpc import aio_server_interceptor
from opentelemetry.sdk.trace import TracerProvider

from .alerts import AlertManager
from .api.interceptor import BrokerInterceptor
from .api.servicers import KeyAdminServicer, KeyBrokerServicer
from .audit import Audit, AuditFile
from .auth import Policy
from .clock import Clock, SystemClock
from .config import Settings, StoreBackend, validate_settings
from .engine import KeySource, LeaseEngine
from .errors import BrokerError
from .metrics import Metrics
from .models import Key
from .openrouter.catalog import ModelCatalog
from .openrouter.probes import KeyProber
from .store import StateStore
from .store.sqlite import SQLiteStore
from .telemetry import SpanSink, TracedStore, build_tracer_provider
from .vault import VaultKeySource, VaultSession

__all__ = ["KEY_SOURCE_HEALTH", "Broker"]

log = structlog.get_logger("keybroker")
KEY_SOURCE_HEALTH = "keybroker.v1.KeySource"
_SERVICES = (keybroker_pb2.DESCRIPTOR.services_by_name["KeyBroker"].full_name,
             keybroker_pb2.DESCRIPTOR.services_by_name["KeyAdmin"].full_name)
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def build_store(settings: Settings) -> StateStore:
    if settings.store.backend is StoreBackend.SQLITE:
        return SQLiteStore(settings.store.sqlite_path)
    if settings.store.backend is StoreBackend.REDIS:
        from .store.redis import RedisStore  # redis-py is imported only when chosen

        return RedisStore(settings.store.redis_url, timeout=settings.store.redis_timeout,
                          prefix=settings.store.redis_prefix,
                          retention=settings.lease.retention_days * 86400.0,
                          cluster=settings.store.redis_cluster)
    raise ValueError(f"unknown store backend {settings.store.backend}")


class _PolicyFile:
    """The current policy; reloaded when the file changes. A bad file keeps the old one."""

    def __init__(self, path: str) -> None:
        self._path = path
        self._mtime: float | None = None
        self.current = Policy.deny_all()
        if path:
            self.refresh(strict=True)
        else:
            log.warning("policy.missing", detail="no policy_file: every RPC is denied")

    def refresh(self, strict: bool = False) -> None:
        if not self._path:
            return
        try:
            mtime = os.stat(self._path).st_mtime_ns
            if mtime == self._mtime:
                return
            policy = Policy.from_file(self._path)
        except (OSError, ValueError, BrokerError) as exc:
            if strict:
                raise
            log.error("policy.reload_failed", path=self._path, error=str(exc))
            return
        self.current, self._mtime = policy, mtime
        log.info("policy.loaded", path=self._path)


class _WatchedSource:
    """Reports every load (periodic or ReloadKeys) to the broker's health and log."""

    def __init__(self, inner: KeySource, broker: Broker) -> None:
        self._inner = inner
        self._broker = broker
        self.keys: list[Key] = []  # the last successful load (what the key probes probe)

    async def load(self) -> list[Key]:
        tracer = self._broker._tracer
        span = (tracer.start_as_current_span("vault.load_keys") if tracer is not None
                else contextlib.nullcontext())
        try:
            with span:
                keys = await self._inner.load()
        except BrokerError as exc:
            self._broker.metrics.backend_errors.labels("vault").inc()
            await self._broker.source_failed(exc)
            raise
        await self._broker.source_ok(len(keys))
        self.keys = keys
        return keys


class Broker:
    """One running broker: gRPC server plus its background loops."""

    def __init__(self, settings: Settings, *, clock: Clock | None = None,
                 key_source: KeySource | None = None, store: StateStore | None = None,
                 audit: Audit | None = None,
                 tracer_provider: TracerProvider | bool | None = True) -> None:
        """``tracer_provider=True`` builds one from the OTEL_* environment (none when no
        OTLP endpoint is configured); pass a provider to inject one, None for no tracing."""
        validate_settings(settings)
        self.settings = settings
        self.clock = clock or SystemClock()
        self.audit = audit or Audit()
        self.tracer_provider = (build_tracer_provider() if tracer_provider is True
                                else tracer_provider or None)
        self.metrics = Metrics(snapshot=lambda: self.engine.snapshot())
        self.audit.add_sink(self.metrics)
        self._audit_file = AuditFile(settings.audit_file) if settings.audit_file else None
        if self._audit_file is not None:
            self.audit.add_sink(self._audit_file)
        store = store or build_store(settings)
        interceptors: list[grpc.aio.ServerInterceptor] = []
        self._tracer = None
        if self.tracer_provider is not None:
            self._tracer = self.tracer_provider.get_tracer("keybroker")
            self.audit.add_sink(SpanSink())
            store = cast(StateStore, TracedStore(store, self._tracer,
                                                 settings.store.backend.value))
            interceptors.append(aio_server_interceptor(  # type: ignore[no-untyped-call]
                tracer_provider=self.tracer_provider))
        self.store = store
        self._session: VaultSession | None = None
        if key_source is None:
            self._session = VaultSession(settings.vault)
            key_source = VaultKeySource(self._session)
        self.catalog = ModelCatalog(settings, self.clock)  # model="auto" (GET <base_url>/models)
        watched = _WatchedSource(key_source, self)
        self.engine = LeaseEngine(store=self.store, keys=watched,
                                  clock=self.clock, settings=settings, audit=self.audit,
                                  models=self.catalog)
        self.prober = KeyProber(self.engine, lambda: watched.keys, settings.openrouter,
                                self.clock, ready=lambda: self.engine.ready)
        self.alerts = AlertManager(settings.alerts, self.clock, self.engine.snapshot,
                                   lambda: self.source_error if self.engine.ready else None,
                                   on_fire=lambda rule: self.metrics.alerts.labels(rule).inc())
        self.audit.add_sink(self.alerts)
        self.policy = _PolicyFile(settings.policy_file)
        self.health = HealthServicer()
        interceptors.append(BrokerInterceptor(lambda: self.policy.current, self.audit,
                                              self.metrics))
        self.server = grpc.aio.server(interceptors=interceptors)
        keybroker_pb2_grpc.add_KeyBrokerServicer_to_server(KeyBrokerServicer(self.engine),
                                                           self.server)
        keybroker_pb2_grpc.add_KeyAdminServicer_to_server(KeyAdminServicer(self.engine),
                                                          self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (*_SERVICES, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME), self.server)
        self.port = self._bind()
        self.metrics_port = (self.metrics.serve(settings.metrics_listen)
                             if settings.metrics_listen else None)
        self._tasks: list[asyncio.Task[None]] = []
        self._stopped = False
        self.source_error: str | None = "not loaded yet"

    def _bind(self) -> int:
        tls = self.settings.tls
        if not tls.cert_file:
            return int(self.server.add_insecure_port(self.settings.listen))
        ca = Path(tls.client_ca_file).read_bytes() if tls.client_ca_file else None
        creds = grpc.ssl_server_credentials(
            [(Path(tls.key_file).read_bytes(), Path(tls.cert_file).read_bytes())],
            root_certificates=ca, require_client_auth=tls.require_client_cert)
        return int(self.server.add_secure_port(self.settings.listen, creds))

    async def start(self) -> None:
        """Serve at once (health NOT_SERVING); keys load in the background with retries."""
        for name in ("", *_SERVICES, KEY_SOURCE_HEALTH):
            await self.health.set(name, NOT_SERVING)
        await self.server.start()
        log.info("broker.listening", port=self.port, store=self.settings.store.backend.value)
        self._spawn(self._load_keys_loop)
        self._spawn(self._sweep_loop)
        self._spawn(self._policy_loop)
        self._spawn(self._alert_loop)
        if self.settings.openrouter.probe_interval > 0:
            self._spawn(self.prober.run)
        if self._session is not None:
            self._spawn(self._vault_session_loop)

    def _spawn(self, fn: Callable[[], Coroutine[Any, Any, None]]) -> None:
        self._tasks.append(asyncio.create_task(fn()))

    async def reload_now(self) -> None:
        """One key reload; once keys are loaded the broker (and each service) is SERVING."""
        try:
            await self.engine.reload_keys()
        except BrokerError:
            return  # _WatchedSource has logged it and set the KeySource health
        for name in ("", *_SERVICES):
            await self.health.set(name, SERVING)

    async def source_failed(self, exc: BrokerError) -> None:
        """A key load failed: say so in health and (once per distinct error) in the log."""
        if exc.message != self.source_error:
            log.warning("keys.reload_failed", error=exc.message, serving_cached=self.engine.ready)
        self.source_error = exc.message
        await self.health.set(KEY_SOURCE_HEALTH, NOT_SERVING)

    async def source_ok(self, total: int) -> None:
        if self.source_error is not None:
            log.info("keys.loaded", total=total)
        self.source_error = None
        await self.health.set(KEY_SOURCE_HEALTH, SERVING)

    async def _start_engine(self) -> None:
        """Read state from the store, retrying while it is unreachable (NOT_SERVING meanwhile),
        so a replica started during a Redis restart waits instead of crash-looping."""
        delay = 0.2
        while True:
            try:
                await self.engine.start()
                return
            except BrokerError as exc:
                log.warning("store.unavailable_at_start", error=exc.message, retry_in=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _load_keys_loop(self) -> None:
        await self._start_engine()
        delay = 0.2
        while True:
            await self.reload_now()
            if self.engine.ready and self.source_error is None:
                delay = self.settings.vault.reload_interval
            else:
                delay = min(delay * 2, max(self.settings.vault.reload_interval, 0.2))
            await asyncio.sleep(delay)

    async def _sweep_loop(self) -> None:
        tick = 0
        while True:
            await asyncio.sleep(self.settings.lease.sweep_interval)
            tick += 1
            try:
                await self.engine.sweep(refresh=tick % 10 == 0)
            except BrokerError as exc:
                log.error("sweep.failed", error=exc.message)
            except Exception:  # the sweeper must outlive any one bad round
                log.exception("sweep.failed")

    async def _alert_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.alerts.interval)
            try:
                await self.alerts.evaluate()
            except Exception:  # an alert must never take the broker down
                log.exception("alert.evaluation_failed")

    async def _policy_loop(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            self.policy.refresh()

    async def _vault_session_loop(self) -> None:
        assert self._session is not None
        while True:
            try:
                wait = await asyncio.to_thread(self._session.maintain)
            except BrokerError as exc:
                log.warning("vault.session_failed", error=exc.message)
                wait = 5.0
            await asyncio.sleep(min(wait, 300.0))

    async def stop(self, grace: float = 5.0) -> None:
        """NOT_SERVING, drain in-flight RPCs for up to ``grace`` seconds, then close."""
        if self._stopped:
            return
        self._stopped = True
        await self.health.enter_graceful_shutdown()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.server.stop(grace)
        await self.catalog.aclose()
        await self.prober.aclose()
        await self.store.close()
        self.metrics.close()
        await self.alerts.close()
        if self._audit_file is not None:
            self._audit_file.close()
        if self.tracer_provider is not None:
            # Export what is buffered: a SIGTERM must not lose the last spans.
            await asyncio.to_thread(self.tracer_provider.shutdown)
