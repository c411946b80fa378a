"""The composition root: `build` wires store, key source, engine, policy, metrics, alerts
and the gRPC handlers from Settings, and does no I/O (no file opened, no port bound, no
thread started, no database connected). `broker.runtime.Broker` starts what it wires.

Backends are chosen here and nowhere else.
"""

from __future__ import annotations

import contextlib
import os
import tomllib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import cast

import grpc
import structlog
from opentelemetry.instrumentation.grpc import aio_server_interceptor
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import Tracer

from .alerts import AlertManager
from .api.interceptor import BrokerInterceptor
from .api.servicers import KeyAdminServicer, KeyBrokerServicer
from .audit import Audit
from .auth import Policy
from .clock import Clock, SystemClock
from .config import ConfigError, Settings, StoreBackend, validate_settings
from .engine import KeySource, LeaseEngine
from .errors import BrokerError, InvalidArgument
from .lifecycle import KeyLifecycle, OpenRouterKeys
from .logging import Throttle
from .metrics import Metrics
from .models import Key
from .openrouter.catalog import ModelCatalog
from .openrouter.probes import KeyProber
from .rpcs import Rpc
from .store import StateStore
from .store.sqlite import SQLiteStore
from .telemetry import SpanSink, TracedStore, build_tracer_provider
from .vault import VaultAdmin, VaultKeySource, VaultSession

__all__ = ["KEY_SOURCE_HEALTH", "PolicyFile", "SourceHealth", "Wiring", "build",
           "build_store"]

log = structlog.get_logger("keybroker")
KEY_SOURCE_HEALTH = "keybroker.v1.KeySource"


def build_store(settings: Settings) -> StateStore:
    """The configured store, not yet connected (SQLite opens its file at ``open``, Redis
    connects on first use)."""
    if settings.store.backend is StoreBackend.SQLITE:
        return SQLiteStore(settings.store.sqlite_path)
    if settings.store.backend is StoreBackend.REDIS:
        from .store.redis import RedisStore  # redis-py is imported only when chosen

        return RedisStore(settings.store.redis_url, timeout=settings.store.redis_timeout,
                          prefix=settings.store.redis_prefix,
                          retention=settings.lease.retention_days * 86400.0,
                          cluster=settings.store.redis_cluster)
    raise ValueError(f"unknown store backend {settings.store.backend}")


class PolicyFile:
    """The current access policy; `load` reads the file (at start), `refresh` re-reads it when
    it changes. A bad file at start is a ConfigError naming the file and what is wrong.
    Later, a missing or broken file keeps the old policy in force, and says so: one
    ``policy.reload_failed`` error log and one ``on_failure`` call per broken version, and
    `error` (which the ``policy_reload_failed`` alert reads) until a good file is read.
    Revoke access by editing the file, not deleting it.
    """

    def __init__(self, path: str, on_failure: Callable[[], None] | None = None, *,
                 limits_allowed: bool = True) -> None:
        self._path = path
        self._limits_allowed = limits_allowed  # False on Redis Cluster (see auth.Policy)
        self._mtime: int | None = None
        self._on_failure = on_failure
        self.current = Policy.deny_all()
        self.error: str | None = None
        """Why the last reload failed (None while the file in force is the file on disk)."""

    def load(self) -> None:
        if self._path:
            self.refresh(strict=True)
        else:
            log.warning("policy.missing", detail="no policy_file: every RPC is denied")

    def refresh(self, strict: bool = False) -> None:
        if not self._path:
            return
        mtime: int | None = None
        try:
            mtime = os.stat(self._path).st_mtime_ns
            if mtime == self._mtime:
                return  # the file in force, or the same broken file (already reported)
            policy = Policy.from_file(self._path)
            if policy.has_limits and not self._limits_allowed:
                raise InvalidArgument(
                    "principals.limits", "principal limits need SQLite or a single Redis: on "
                    "Redis Cluster a limit spanning accounts cannot be charged atomically")
        except (OSError, ValueError, BrokerError) as exc:
            why = _policy_problem(exc)
            if strict:
                raise ConfigError(f"policy_file {self._path}", why) from None
            if self.error is None or mtime != self._mtime:
                log.error("policy.reload_failed", path=self._path, error=why,
                          detail="the previous policy stays in force")
                if self._on_failure is not None:
                    self._on_failure()
            self.error, self._mtime = why, mtime
            return
        self.current, self._mtime, self.error = policy, mtime, None
        log.info("policy.loaded", path=self._path)


def _policy_problem(exc: BaseException) -> str:
    """One line saying what is wrong with a policy file."""
    if isinstance(exc, FileNotFoundError):
        return "no such file"
    if isinstance(exc, tomllib.TOMLDecodeError):
        return f"not valid TOML: {exc}"
    if isinstance(exc, OSError):
        return f"cannot read: {exc.strerror or exc}"
    if isinstance(exc, BrokerError):
        return exc.message
    return str(exc)


class SourceHealth:
    """What the last key load said. The key source reports to it (`ok` / `failed`); the
    runtime reads `error` and listens for changes to set the gRPC health of the key source.

    Attributes:
        error: the last load's error message, None after a good load (``"not loaded yet"``
            until the first).
    """

    def __init__(self, serving_cached: Callable[[], bool] = lambda: False) -> None:
        self.error: str | None = "not loaded yet"
        self._serving_cached = serving_cached
        self._failed = Throttle(log, "keys.reload_failed")
        self._listeners: list[Callable[[bool], Awaitable[None]]] = []

    def listen(self, listener: Callable[[bool], Awaitable[None]]) -> None:
        """Call ``listener(loaded)`` after every load, good (True) or failed (False)."""
        self._listeners.append(listener)

    async def ok(self, total: int) -> None:
        if self.error is not None:
            log.info("keys.loaded", total=total)
            self._failed.clear()
        self.error = None
        for listener in self._listeners:
            await listener(True)

    async def failed(self, exc: BrokerError) -> None:
        """Say so in the log: a new error at once, the same one again at most once a minute
        with how often it repeated (the health listeners hear every one)."""
        if exc.message != self.error:
            self._failed.clear()
        self._failed(error=exc.message, serving_cached=self._serving_cached())
        self.error = exc.message
        for listener in self._listeners:
            await listener(False)


class _WatchedSource:
    """Reports every load (periodic or ReloadKeys) to a SourceHealth, in a span of its own.
    It counts nothing: whoever handles the error counts it."""

    def __init__(self, inner: KeySource, health: SourceHealth, tracer: Tracer | None) -> None:
        self._inner = inner
        self._health = health
        self._tracer = tracer
        self.keys: list[Key] = []  # the last successful load (what the key probes probe)

    async def load(self) -> list[Key]:
        span = (self._tracer.start_as_current_span("vault.load_keys")
                if self._tracer is not None else contextlib.nullcontext())
        try:
            with span:
                keys = await self._inner.load()
        except BrokerError as exc:
            await self._health.failed(exc)
            raise
        await self._health.ok(len(keys))
        self.keys = keys
        return keys


class _Lifecycle:
    """The lifecycle's principal inside the broker: it stops leasing on a key it rotates
    (the operator who asked for the rotation was checked by the lifecycle itself)."""

    principal = "keybroker-lifecycle"

    def require(self, rpc: Rpc, pool: str) -> None:
        return None

    def may(self, rpc: Rpc, pool: str) -> bool:
        return True

    def may_any(self, rpc: Rpc) -> bool:
        return True

    def may_priority(self, priority: object) -> bool:
        return True

    def limits_for(self, pool: str) -> None:
        return None  # it leases nothing


class _EngineSide:
    """The lifecycle's ``BrokerSide`` over the lease engine and its store."""

    def __init__(self, engine: LeaseEngine, store: StateStore, clock: Clock) -> None:
        self._engine, self._store, self._clock = engine, store, clock

    async def stop_leasing(self, key_id: str, reason: str) -> None:
        await self._engine.set_enabled(_Lifecycle(), key_id, False, reason)

    async def end_leases(self, key_id: str, account: str) -> int:
        return len(await self._engine.end_leases(key_id, account))

    async def active_leases(self, key_id: str) -> int:
        return int((await self._store.active_leases(self._clock.now())).get(key_id, 0))

    async def reload(self) -> None:
        await self._engine.reload_keys()


@dataclass(frozen=True)
class Wiring:
    """Everything `build` wired, nothing started. `broker.runtime.Broker` runs it."""

    settings: Settings
    clock: Clock
    audit: Audit
    metrics: Metrics
    store: StateStore
    engine: LeaseEngine
    catalog: ModelCatalog
    prober: KeyProber
    alerts: AlertManager
    policy: PolicyFile
    source_health: SourceHealth
    interceptors: tuple[grpc.aio.ServerInterceptor, ...]
    servicers: tuple[KeyBrokerServicer, KeyAdminServicer]
    tracer_provider: TracerProvider | None
    export_spans: bool
    """True when the runtime must start the OTLP exporter (a provider built from OTEL_*)."""
    session: VaultSession | None
    """The Vault session to keep alive, when keys come from Vault."""
    open_store: Callable[[], object] | None
    """Opens the configured SQLite file (None otherwise: Redis connects on first use, an
    injected store is open already): the runtime's first step, so a bad path fails start."""
    lifecycle: KeyLifecycle | None = None
    """Provision, rotate and revoke through the provider's management API (None when keys
    do not come from Vault)."""


def build(settings: Settings, *, clock: Clock | None = None, key_source: KeySource | None = None,
          store: StateStore | None = None, audit: Audit | None = None,
          tracer_provider: TracerProvider | bool | None = True) -> Wiring:
    """Validate ``settings`` and wire the broker's parts, without any I/O.

    ``tracer_provider=True`` builds one from the OTEL_* environment (none when no OTLP
    endpoint is configured); pass a provider to inject one, None for no tracing. An
    injected ``store`` is used as is; otherwise the configured one is opened at start.
    """
    validate_settings(settings)
    clock = clock or SystemClock(settings.clock_offset)
    audit = audit or Audit()
    export_spans = tracer_provider is True
    provider = (build_tracer_provider(export=False) if tracer_provider is True
                else tracer_provider or None)
    open_store = None
    if store is None:
        store = build_store(settings)  # no I/O: SQLite opens its file at `open`
        if isinstance(store, SQLiteStore):
            open_store = store.open
    interceptors: list[grpc.aio.ServerInterceptor] = []
    tracer = None
    if provider is not None:
        tracer = provider.get_tracer("keybroker")
        audit.add_sink(SpanSink())
        store = cast(StateStore, TracedStore(store, tracer, settings.store.backend.value))
        interceptors.append(aio_server_interceptor(  # type: ignore[no-untyped-call]
            tracer_provider=provider))
    engine: LeaseEngine  # assigned below; the callbacks read it only once the broker runs
    metrics = Metrics(snapshot=lambda: engine.snapshot())
    session = None
    if key_source is None:
        session = VaultSession(settings.vault)
        key_source = VaultKeySource(
            session, allowed_base_urls=settings.openrouter.allowed_base_urls,
            on_skip=lambda reason: metrics.keys_skipped.labels(reason).inc())
    audit.add_sink(metrics)
    count = metrics.count_backend_error  # background refreshes and probe rounds count here
    catalog = ModelCatalog(settings, clock, on_error=count)  # model="auto": GET <base>/models
    source_health = SourceHealth(serving_cached=lambda: engine.ready)
    watched = _WatchedSource(key_source, source_health, tracer)
    engine = LeaseEngine(store=store, keys=watched, clock=clock, settings=settings, audit=audit,
                         models=catalog)
    prober = KeyProber(engine, lambda: watched.keys, settings.openrouter, clock,
                       ready=lambda: engine.ready, on_error=count)
    policy = PolicyFile(settings.policy_file, on_failure=metrics.policy_reload_failures.inc,
                        limits_allowed=not (settings.store.backend is StoreBackend.REDIS
                                            and settings.store.redis_cluster))
    alerts = AlertManager(settings.alerts, clock, engine.snapshot,
                          lambda: source_health.error if engine.ready else None,
                          on_fire=lambda rule: metrics.alerts.labels(rule).inc(),
                          policy_error=lambda: policy.error)
    audit.add_sink(alerts)
    lifecycle = None
    if session is not None:
        lifecycle = KeyLifecycle(settings, clock, audit, vault=VaultAdmin(session),
                                 provider=OpenRouterKeys(settings.rotation.management_timeout),
                                 broker=_EngineSide(engine, store, clock), tracer=tracer)
    interceptors.append(BrokerInterceptor(lambda: policy.current, audit, metrics, clock))
    return Wiring(settings=settings, clock=clock, audit=audit, metrics=metrics, store=store,
                  engine=engine, catalog=catalog, prober=prober, alerts=alerts, policy=policy,
                  source_health=source_health, interceptors=tuple(interceptors),
                  servicers=(KeyBrokerServicer(engine), KeyAdminServicer(engine, lifecycle)),
                  tracer_provider=provider, export_spans=export_spans and provider is not None,
                  session=session, open_store=open_store, lifecycle=lifecycle)

