"""Wiring apart from running, and backend errors counted once by their origin."""

from __future__ import annotations

import dataclasses
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from broker.app import build
from broker.config import ConfigError, Settings, StoreBackend, StoreSettings, VaultSettings
from broker.errors import BackendUnavailable
from broker.runtime import BindError, Broker
from broker.testing import BaoDevServer, RedisServer
from broker.vault import VaultAdmin, VaultSession
from tests.support import make_settings, wait_until


def backend_errors(broker: Broker, backend: str) -> float:
    """keybroker_backend_errors{backend=...} as /metrics would show it."""
    value = broker.metrics.registry.get_sample_value("keybroker_backend_errors_total",
                                                     {"backend": backend})
    return value or 0.0


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A loopback port some other socket is listening on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def bad_settings(tmp_path: Path, vault: VaultSettings, policy: Path, port: int) -> Settings:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    return make_settings(
        tmp_path, vault, policy, listen=f"127.0.0.1:{port}", metrics_listen=f"127.0.0.1:{port}",
        store=StoreSettings(sqlite_path=str(blocker / "state.db")),
        audit_file=str(tmp_path / "no-such-dir" / "audit.jsonl"),
        policy_file=str(tmp_path / "no-such-policy.toml"))


async def test_build_does_no_io(tmp_path, vault_settings, policy_file, taken_port):
    """build() and Broker() open no file, bind no port and start no thread, however unusable
    the store path, audit directory, policy file and ports are."""
    settings = bad_settings(tmp_path, vault_settings, policy_file, taken_port)
    threads = threading.active_count()
    wiring = build(make_settings(tmp_path, vault_settings, policy_file), tracer_provider=None)
    broker = Broker(settings, tracer_provider=None)
    assert threading.active_count() == threads
    assert wiring.engine is not None and broker.port == 0 and broker.metrics_port is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "policy.toml"]  # no state.db
    await broker.stop(0)  # stopping what never started closes nothing it did not open


@pytest.mark.parametrize("broken", ["policy", "store", "audit", "port"])
async def test_start_is_where_io_fails(tmp_path, vault_settings, policy_file, taken_port, broken):
    """Each unusable resource raises at start, which leaves nothing bound or running."""
    good = make_settings(tmp_path, vault_settings, policy_file)
    bad = bad_settings(tmp_path, vault_settings, policy_file, taken_port)
    field = {"policy": "policy_file", "store": "store", "audit": "audit_file",
             "port": "listen"}[broken]
    settings = dataclasses.replace(good, **{field: getattr(bad, field)})
    broker = Broker(settings, tracer_provider=None)
    errors = {"policy": ConfigError, "store": BackendUnavailable,
              "audit": ConfigError, "port": BindError}
    with pytest.raises(errors[broken]):
        await broker.start()
    assert broker.engine.ready is False
    await broker.stop(0)


async def test_vault_down_during_reload_keys_counts_vault_once(start_broker, vault_settings,
                                                               connect):
    """A Vault stopped before a ReloadKeys RPC counts one vault error and no store error."""
    bao = BaoDevServer().start()
    try:
        own = dataclasses.replace(vault_settings, addr=bao.addr, token=bao.root_token,
                                  timeout=1.0)
        VaultAdmin(VaultSession(own)).bootstrap()
        VaultAdmin(VaultSession(own)).put_key("free", "k1", "sk-or-v1-count-0001",
                                              account="acct-a")
        broker = await start_broker(vault=own)
    finally:
        bao.close()
    with pytest.raises(Exception) as info:
        await connect(broker, "admin").reload_keys()
    assert info.value.code is grpc.StatusCode.UNAVAILABLE
    assert (backend_errors(broker, "vault"), backend_errors(broker, "store")) == (1.0, 0.0)
    assert broker.source_error is not None


async def test_store_error_in_sweep_loop_counts_store(tmp_path, vault_settings, policy_file,
                                                      put_keys, clock, log_lines):
    """Redis going away under the lease sweeper counts store errors, with no RPC involved."""
    put_keys("free", [("k1", "acct-a")])
    with RedisServer() as redis:
        settings = make_settings(tmp_path, vault_settings, policy_file, store=StoreSettings(
            backend=StoreBackend.REDIS, redis_url=redis.url, redis_timeout=0.3))
        broker = Broker(settings, clock=clock, tracer_provider=None)
        try:
            await broker.start()
            await wait_until(lambda: broker.engine.ready)
            assert backend_errors(broker, "store") == 0
            redis.stop()
            await wait_until(lambda: backend_errors(broker, "store") >= 1)
            assert any(e["event"] == "sweep.failed" for e in log_lines())
            assert backend_errors(broker, "vault") == 0
        finally:
            await broker.stop(0)


async def test_catalog_outage_during_model_auto_counts_catalog(start_broker, put_keys, connect):
    """A model="auto" LeaseKey whose model catalog is unreachable counts one catalog error."""
    put_keys("free", [("k1", "acct-a")], base_url="http://127.0.0.1:9/api/v1")
    broker = await start_broker()
    with pytest.raises(Exception) as info:
        await connect(broker).lease_key("free", "auto")
    assert info.value.code is grpc.StatusCode.UNAVAILABLE
    assert [backend_errors(broker, b) for b in ("catalog", "store", "vault")] == [1.0, 0.0, 0.0]


def test_clock_offset_setting_shifts_the_broker_clock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """KEYBROKER_CLOCK_OFFSET (a test-only setting) moves the wired SystemClock by that many seconds."""
    import time

    from broker.config import load_settings
    from broker.errors import InvalidArgument

    monkeypatch.setenv("KEYBROKER_CLOCK_OFFSET", "-3600.5")
    settings = load_settings(None)
    assert settings.clock_offset == -3600.5
    before = time.time()
    now = build(settings, tracer_provider=None).clock.now()
    assert before - 3600.5 <= now <= time.time() - 3600.5
    with pytest.raises(InvalidArgument):
        build(dataclasses.replace(settings, clock_offset=float("inf")), tracer_provider=None)
