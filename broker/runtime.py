"""The running broker: binds the gRPC (and metrics) ports, opens the store and the audit
file, serves, and owns the background loops (key loading, lease sweep, policy reload,
alerts, key probes, Vault session) until `Broker.stop`.

What runs is wired by `broker.app.build`, which does no I/O; everything that touches the
outside world happens in `Broker.start`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import grpc
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection
from keybroker_client.v1 import keybroker_pb2, keybroker_pb2_grpc
from opentelemetry.sdk.trace import TracerProvider

from .app import KEY_SOURCE_HEALTH, Wiring, build
from .audit import Audit, AuditFile
from .clock import Clock
from .config import Settings
from .engine import KeySource
from .errors import BrokerError
from .store import StateStore
from .telemetry import export_otlp

__all__ = ["KEY_SOURCE_HEALTH", "Broker"]

log = structlog.get_logger("keybroker")
_SERVICES = (keybroker_pb2.DESCRIPTOR.services_by_name["KeyBroker"].full_name,
             keybroker_pb2.DESCRIPTOR.services_by_name["KeyAdmin"].full_name)
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class Broker:
    """One broker: `build`'s parts plus the gRPC server and the loops that `start` runs.

    Constructing it does no I/O (see `broker.app.build` for the arguments); `start` binds
    and serves, `stop` drains and closes.
    """

    def __init__(self, settings: Settings, *, clock: Clock | None = None,
                 key_source: KeySource | None = None, store: StateStore | None = None,
                 audit: Audit | None = None,
                 tracer_provider: TracerProvider | bool | None = True) -> None:
        self.wiring: Wiring = build(settings, clock=clock, key_source=key_source, store=store,
                                    audit=audit, tracer_provider=tracer_provider)
        w = self.wiring
        self.settings = w.settings
        self.clock = w.clock
        self.audit = w.audit
        self.metrics = w.metrics
        self.store = w.store
        self.engine = w.engine
        self.catalog = w.catalog
        self.prober = w.prober
        self.alerts = w.alerts
        self.policy = w.policy
        self.source_health = w.source_health
        self.tracer_provider = w.tracer_provider
        self.health = HealthServicer()
        self.server: grpc.aio.Server | None = None
        self.port = 0
        """The bound gRPC port (0 until `start`)."""
        self.metrics_port: int | None = None
        """The bound /metrics port (None until `start`, or when metrics are off)."""
        self._audit_file: AuditFile | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._started = self._stopped = False
        w.source_health.listen(self._source_loaded)

    @property
    def source_error(self) -> str | None:
        """Why the last key load failed (None after a good one)."""
        return self.source_health.error

    async def start(self) -> None:
        """Open, bind and serve at once (health NOT_SERVING); keys load in the background
        with retries. A bad policy file, an unusable store path or audit file, a taken port
        or unreadable TLS files raise here, and whatever was already opened is closed."""
        if self._started:
            return
        self._started = True
        try:
            await self._open()
        except BaseException:
            await self.stop(0)
            raise
        log.info("broker.listening", port=self.port, store=self.settings.store.backend.value)
        self._spawn(self._load_keys_loop)
        self._spawn(self._sweep_loop)
        self._spawn(self._policy_loop)
        self._spawn(self._alert_loop)
        if self.settings.openrouter.probe_interval > 0:
            self._spawn(self.prober.run)
        if self.wiring.session is not None:
            self._spawn(self._vault_session_loop)
        if self.wiring.lifecycle is not None and self.settings.rotation.interval > 0:
            self._spawn(self._rotation_loop)

    async def _open(self) -> None:
        w, settings = self.wiring, self.settings
        w.policy.load()
        if w.open_store is not None:
            w.open_store()
        if settings.audit_file:
            self._audit_file = AuditFile(settings.audit_file)
            self.audit.add_sink(self._audit_file)
        if w.export_spans and self.tracer_provider is not None:
            export_otlp(self.tracer_provider)
        self.server = server = grpc.aio.server(interceptors=w.interceptors)
        keybroker_pb2_grpc.add_KeyBrokerServicer_to_server(w.servicers[0], server)
        keybroker_pb2_grpc.add_KeyAdminServicer_to_server(w.servicers[1], server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (*_SERVICES, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME), server)
        self.port = self._bind(server)
        if settings.metrics_listen:
            self.metrics_port = self.metrics.serve(settings.metrics_listen)
        for name in ("", *_SERVICES, KEY_SOURCE_HEALTH):
            await self.health.set(name, NOT_SERVING)
        await server.start()

    def _bind(self, server: grpc.aio.Server) -> int:
        tls = self.settings.tls
        if not tls.cert_file:
            return int(server.add_insecure_port(self.settings.listen))
        ca = Path(tls.client_ca_file).read_bytes() if tls.client_ca_file else None
        creds = grpc.ssl_server_credentials(
            [(Path(tls.key_file).read_bytes(), Path(tls.cert_file).read_bytes())],
            root_certificates=ca, require_client_auth=tls.require_client_cert)
        return int(server.add_secure_port(self.settings.listen, creds))

    def _spawn(self, fn: Callable[[], Coroutine[Any, Any, None]]) -> None:
        self._tasks.append(asyncio.create_task(fn()))

    async def _source_loaded(self, loaded: bool) -> None:
        await self.health.set(KEY_SOURCE_HEALTH, SERVING if loaded else NOT_SERVING)

    async def reload_now(self) -> None:
        """One key reload; once keys are loaded the broker (and each service) is SERVING."""
        try:
            await self.engine.reload_keys()
        except BrokerError as exc:
            self.metrics.count_backend_error(exc)  # SourceHealth has logged it
            return
        for name in ("", *_SERVICES):
            await self.health.set(name, SERVING)

    async def _start_engine(self) -> None:
        """Read state from the store, retrying while it is unreachable (NOT_SERVING meanwhile),
        so a replica started during a Redis restart waits instead of crash-looping."""
        delay = 0.2
        while True:
            try:
                await self.engine.start()
                return
            except BrokerError as exc:
                self.metrics.count_backend_error(exc)
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
                self.metrics.count_backend_error(exc)
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

    async def _rotation_loop(self) -> None:
        """Once keys are loaded, and then every ``rotation.interval``: resume rotations a
        killed or failed run left, rotate keys that are too old or near expiry. In the
        broker rather than cron so that a killed rotation resumes when the broker does,
        and draining sees the broker's own leases."""
        lifecycle = self.wiring.lifecycle
        assert lifecycle is not None
        while not self.engine.ready:
            await asyncio.sleep(0.2)
        while True:
            try:
                await lifecycle.run_schedule()
            except BrokerError as exc:
                self.metrics.count_backend_error(exc)
                log.warning("rotation.round_failed", error=exc.message)
            except Exception:  # the loop must outlive any one bad round
                log.exception("rotation.round_failed")
            await asyncio.sleep(self.settings.rotation.interval)

    async def _vault_session_loop(self) -> None:
        session = self.wiring.session
        assert session is not None
        while True:
            try:
                wait = await asyncio.to_thread(session.maintain)
            except BrokerError as exc:
                self.metrics.count_backend_error(exc)
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
        if self.server is not None:
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
