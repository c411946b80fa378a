"""The running broker: binds the gRPC (and metrics) ports, opens the store and the audit
file, serves, and owns the background loops (key loading, lease sweep, policy reload,
alerts, key probes, Vault session) until `Broker.stop`.

What runs is wired by `broker.app.build`, which does no I/O; everything that touches the
outside world happens in `Broker.start`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import os
import resource
import socket
import ssl
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
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
from .config import ConfigError, Settings, is_loopback_host
from .engine import KeySource
from .errors import BrokerError, StartError
from .logging import Throttle
from .store import StateStore
from .telemetry import export_otlp
from .vault import TransitHmac

__all__ = ["KEY_SOURCE_HEALTH", "MAX_RECEIVE_MESSAGE_BYTES", "BindError", "Broker",
           "harden_process", "reflection_enabled"]

MAX_RECEIVE_MESSAGE_BYTES = 64 * 1024
"""Largest request the server accepts; gRPC itself answers RESOURCE_EXHAUSTED above it.
The largest legitimate request (ReportUsage or ClearCooldown with every string field at
its validated maximum) is a few kilobytes, so 64 KiB leaves room without letting a caller
send (and the broker buffer) megabytes."""

log = structlog.get_logger("keybroker")
_SERVICES = (keybroker_pb2.DESCRIPTOR.services_by_name["KeyBroker"].full_name,
             keybroker_pb2.DESCRIPTOR.services_by_name["KeyAdmin"].full_name)
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
STOP_STEP_SECONDS = 5.0  # the most one step of stopping may take (a hung close is logged)


# Exclusive ports: grpc binds with SO_REUSEPORT by default, so a second broker on a taken
# port would start and the kernel would split callers between two brokers (and their quotas).
_SERVER_OPTIONS = (("grpc.so_reuseport", 0),
                   ("grpc.max_receive_message_length", MAX_RECEIVE_MESSAGE_BYTES))
# A worker of `serve --workers N` shares the port with its siblings (SO_REUSEPORT): its
# supervisor proved the port free and holds it for them (see broker.workers).
_WORKER_OPTIONS = (("grpc.so_reuseport", 1),
                   ("grpc.max_receive_message_length", MAX_RECEIVE_MESSAGE_BYTES))
SPAN_FLUSH_SECONDS = 1.5
"""Longest a stop waits for buffered spans to reach the OTLP collector."""


class BindError(StartError, RuntimeError):
    """The gRPC or /metrics address cannot be bound; the message names it and why."""


def _bind_problem(address: str) -> str | None:
    """Why ``host:port`` cannot be bound, asked of the kernel before gRPC tries (gRPC would
    say it in a log line of its own, without the cause); None when it can."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]") or "0.0.0.0"
    try:
        infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
    except (OSError, ValueError) as exc:
        return f"cannot resolve it ({exc})"
    family, kind, proto, _, sockaddr = infos[0]
    with socket.socket(family, kind, proto) as sock:
        # As gRPC does: a port left in TIME_WAIT by a broker that just stopped is free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(sockaddr)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return "address already in use (another process listens there)"
            return os.strerror(exc.errno) if exc.errno else str(exc)
    return None


def _why_not(address: str) -> str:
    return _bind_problem(address) or "gRPC could not bind it"


def reflection_enabled(settings: Settings) -> bool:
    """``settings.reflection``, or when unset: on only when listening on loopback."""
    if settings.reflection is not None:
        return settings.reflection
    return is_loopback_host(settings.listen.rpartition(":")[0])


def harden_process() -> dict[str, int]:
    """No core dumps: RLIMIT_CORE 0 and PR_SET_DUMPABLE 0 (Linux), since a dump of this
    process would hold decrypted keys. Returns what is in force: ``core_limit`` and
    ``dumpable`` (-1 where the platform cannot say)."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    dumpable = -1
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_dumpable, pr_get_dumpable = 4, 3
        if libc.prctl(pr_set_dumpable, 0, 0, 0, 0) != 0:
            log.warning("process.not_hardened", errno=ctypes.get_errno())
        dumpable = int(libc.prctl(pr_get_dumpable, 0, 0, 0, 0))
    return {"core_limit": resource.getrlimit(resource.RLIMIT_CORE)[1], "dumpable": dumpable}


def _read(setting: str, path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(setting, f"cannot read {path}: {exc.strerror or type(exc).__name__}"
                              ) from None


def _tls_pair(cert_file: str, key_file: str) -> tuple[bytes, bytes]:
    """(key PEM, certificate chain PEM), checked to parse and to belong together (grpc would
    only say that it failed to bind)."""
    key, cert = _read("tls.key_file", key_file), _read("tls.cert_file", cert_file)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert_file, key_file, password=b"")  # never a prompt
    except ssl.SSLError as exc:
        if "KEY_VALUES_MISMATCH" in str(exc) or "key values mismatch" in str(exc):
            raise ConfigError("tls.key_file", f"{key_file} is not the key of the certificate "
                                                  f"in {cert_file}") from None
        raise ConfigError("tls.cert_file", f"{cert_file} and {key_file} must be a PEM "
                                               "certificate (chain) and its PEM private key"
                              ) from None
    return key, cert


def _tls_ca(ca_file: str) -> bytes:
    data = _read("tls.client_ca_file", ca_file)
    try:
        ssl.create_default_context(cafile=ca_file)
    except ssl.SSLError:
        raise ConfigError("tls.client_ca_file", f"{ca_file} holds no PEM CA certificate"
                              ) from None
    return data


class Broker:
    """One broker: `build`'s parts plus the gRPC server and the loops that `start` runs.

    Constructing it does no I/O (see `broker.app.build` for the arguments); `start` binds
    and serves, `stop` drains and closes.
    """

    def __init__(self, settings: Settings, *, clock: Clock | None = None,
                 key_source: KeySource | None = None, store: StateStore | None = None,
                 audit: Audit | None = None,
                 tracer_provider: TracerProvider | bool | None = True,
                 shared_port: bool = False) -> None:
        self._shared_port = shared_port
        """A worker of ``serve --workers``: bind ``listen`` with SO_REUSEPORT and no pre-bind
        check (the supervisor made that check and holds the port for its workers)."""
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
        self._exporter: Any = None  # the OTLP exporter, once started
        self._tasks: list[asyncio.Task[None]] = []
        self._started = self._stopped = False
        # Recurring failures: the first at once, then one summary a minute.
        self._sweep_failed = Throttle(log, "sweep.failed", level="error")
        self._vault_failed = Throttle(log, "vault.session_failed")
        self._store_down = Throttle(log, "store.unavailable_at_start")
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
            if self._audit_file is not None and self.settings.audit_checkpoint_seconds > 0:
                self._spawn(self._audit_checkpoint_loop)
        if self.wiring.lifecycle is not None and self.settings.rotation.interval > 0:
            self._spawn(self._rotation_loop)

    async def _open(self) -> None:
        w, settings = self.wiring, self.settings
        if w.session is not None:
            problem = w.session.credentials_problem()
            if problem is not None:
                field, _, why = problem.partition(": ")
                raise ConfigError(field, why)
        w.policy.load()
        if w.open_store is not None:
            w.open_store()
        if settings.audit_file:
            try:
                self._audit_file = AuditFile(settings.audit_file, settings.audit_rotate_bytes)
            except OSError as exc:
                raise ConfigError(f"audit_file {settings.audit_file}",
                                  f"cannot open: {exc.strerror or exc}") from None
            self.audit.add_sink(self._audit_file)
        if w.export_spans and self.tracer_provider is not None:
            self._exporter = export_otlp(self.tracer_provider)
        self.server = server = grpc.aio.server(
            interceptors=w.interceptors,
            options=_WORKER_OPTIONS if self._shared_port else _SERVER_OPTIONS)
        keybroker_pb2_grpc.add_KeyBrokerServicer_to_server(w.servicers[0], server)
        keybroker_pb2_grpc.add_KeyAdminServicer_to_server(w.servicers[1], server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        if reflection_enabled(settings):
            reflection.enable_server_reflection(
                (*_SERVICES, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                 reflection.SERVICE_NAME), server)
        self.port = self._bind(server)
        if settings.metrics_listen:
            try:
                self.metrics_port = self.metrics.serve(settings.metrics_listen)
            except OSError:
                raise BindError(f"metrics_listen: cannot listen on {settings.metrics_listen}: "
                                f"{_why_not(settings.metrics_listen)}") from None
        for name in ("", *_SERVICES, KEY_SOURCE_HEALTH):
            await self.health.set(name, NOT_SERVING)
        await server.start()

    def _bind(self, server: grpc.aio.Server) -> int:
        """Bind ``listen`` (TLS when a certificate is set). Unreadable or mismatched TLS files
        raise ConfigError naming the setting; an address that cannot be bound, BindError."""
        tls, listen = self.settings.tls, self.settings.listen
        problem = None if self._shared_port else _bind_problem(listen)
        if problem is not None:
            raise BindError(f"listen: cannot listen on {listen}: {problem}")
        try:
            if not tls.cert_file:
                return int(server.add_insecure_port(listen))
            creds = grpc.ssl_server_credentials(
                [_tls_pair(tls.cert_file, tls.key_file)],
                root_certificates=_tls_ca(tls.client_ca_file) if tls.client_ca_file else None,
                require_client_auth=tls.require_client_cert)
            return int(server.add_secure_port(listen, creds))
        except RuntimeError:  # grpc: "Failed to bind to address ..."
            raise BindError(f"listen: cannot listen on {listen}: {_why_not(listen)}") from None

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
                self._store_down(error=exc.message, retry_in=delay)
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
                self._sweep_failed.clear()
            except BrokerError as exc:
                self.metrics.count_backend_error(exc)
                self._sweep_failed(error=exc.message)
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
                self._vault_failed.clear()
            except BrokerError as exc:
                self.metrics.count_backend_error(exc)
                self._vault_failed(error=exc.message, addr=self.settings.vault.addr)
                wait = 5.0
            await asyncio.sleep(min(wait, 300.0))

    async def _audit_checkpoint_loop(self) -> None:
        """Off the request path: HMAC the audit chain's head in Vault now and then."""
        assert self.wiring.session is not None and self._audit_file is not None
        hmac, trail = TransitHmac(self.wiring.session), self._audit_file
        while True:
            await asyncio.sleep(self.settings.audit_checkpoint_seconds)
            await self.audit_checkpoint(hmac, trail)

    async def audit_checkpoint(self, hmac: TransitHmac | None = None,
                               trail: AuditFile | None = None) -> bool:
        """Append a checkpoint now if records came since the last; whether one was written."""
        trail = trail or self._audit_file
        if trail is None or self.wiring.session is None or not trail.pending:
            return False
        head = trail.head
        try:
            mac = await asyncio.to_thread((hmac or TransitHmac(self.wiring.session)).hmac,
                                          bytes.fromhex(head))
        except BrokerError as exc:
            self.metrics.count_backend_error(exc)
            log.warning("audit.checkpoint_failed", error=exc.message)
            return False
        return trail.checkpoint(head, mac)

    @staticmethod
    async def _bounded(step: str, work: Awaitable[object],
                       seconds: float = STOP_STEP_SECONDS) -> None:
        """One step of stopping, given at most ``seconds``: a stop must end, even when a
        backend or a connection hangs (logged, with the step's name)."""
        try:
            await asyncio.wait_for(work, seconds)
        except TimeoutError:
            log.error("broker.stop_step_timed_out", step=step, seconds=seconds)
        except Exception as exc:  # closing must go on with the next step
            log.warning("broker.stop_step_failed", step=step, error=type(exc).__name__)

    async def _flush_spans(self, provider: TracerProvider) -> None:
        """Export what is buffered (a SIGTERM must not lose the last spans), but give an
        unreachable collector at most SPAN_FLUSH_SECONDS: then cut the exporter's retries."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()

        def finished() -> None:
            if not done.done():
                done.set_result(None)

        def shutdown() -> None:
            try:
                provider.shutdown()
            finally:
                with contextlib.suppress(RuntimeError):  # the loop may be gone
                    loop.call_soon_threadsafe(finished)

        # A daemon thread: an exporter stuck in a retry must not keep the process alive.
        threading.Thread(target=shutdown, name="keybroker-span-flush", daemon=True).start()
        try:
            await asyncio.wait_for(asyncio.shield(done), SPAN_FLUSH_SECONDS)
            return
        except TimeoutError:
            pass
        log.warning("telemetry.flush_abandoned", seconds=SPAN_FLUSH_SECONDS,
                    detail="the OTLP collector did not take the last spans in time")
        if self._exporter is not None:
            with contextlib.suppress(Exception):
                self._exporter.shutdown(timeout_millis=0)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(done), 0.5)

    async def stop(self, grace: float = 5.0) -> None:
        """NOT_SERVING, drain in-flight RPCs for up to ``grace`` seconds, then close."""
        if self._stopped:
            return
        self._stopped = True
        began = time.monotonic()
        await self.health.enter_graceful_shutdown()
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await self._bounded("loops", asyncio.wait(self._tasks))
        if self.server is not None:
            await self._bounded("grpc", self.server.stop(grace), grace + STOP_STEP_SECONDS)
        await self._bounded("catalog", self.catalog.aclose())
        await self._bounded("probes", self.prober.aclose())
        await self._bounded("store", self.store.close())
        self.metrics.close()
        await self._bounded("alerts", self.alerts.close())
        if self._audit_file is not None:
            self._audit_file.close()
        if self.tracer_provider is not None:
            await self._flush_spans(self.tracer_provider)
        if self.port:
            log.info("broker.stopped", port=self.port,
                     seconds=round(time.monotonic() - began, 3))
