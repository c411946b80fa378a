"""Shared fixtures: a real OpenBao dev server, real SQLite files, real gRPC brokers on port 0."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import secrets
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import structlog
from keybroker_client import AsyncKeyBrokerClient

from broker.app import Broker
from broker.auth import hash_token
from broker.clock import ManualClock
from broker.config import (
    LeaseSettings,
    QuotaSettings,
    Settings,
    StoreSettings,
    VaultSettings,
)
from broker.devserver import BaoDevServer
from broker.logging import configure_logging
from broker.vault import VaultAdmin, VaultSession

T0 = datetime(2026, 3, 10, 12, 0, 0, tzinfo=UTC)

# Bearer tokens of the test principals (test-only values).
TOKENS = {name: f"kbt_test_{name}_{'x' * 24}" for name in
          ("alice", "bob", "carol", "reader", "admin", "nobody")}

POLICY = f"""
[roles.consumer]
rpcs = ["KeyBroker/*"]
pools = ["free", "paid"]

[roles.free_consumer]
rpcs = ["LeaseKey", "RenewLease", "ReportUsage", "Complete"]
pools = ["free"]

[roles.reader]
rpcs = ["ListKeys", "GetKey"]
pools = ["*"]

[roles.admin]
rpcs = ["*"]
pools = ["*"]

[[principals]]
name = "alice"
token_sha256 = "{hash_token(TOKENS['alice'])}"
roles = ["consumer"]

[[principals]]
name = "bob"
token_sha256 = "{hash_token(TOKENS['bob'])}"
roles = ["consumer"]

[[principals]]
name = "carol"
token_sha256 = "{hash_token(TOKENS['carol'])}"
roles = ["free_consumer"]

[[principals]]
name = "reader"
token_sha256 = "{hash_token(TOKENS['reader'])}"
roles = ["reader"]

[[principals]]
name = "admin"
token_sha256 = "{hash_token(TOKENS['admin'])}"
roles = ["admin"]

[[principals]]
name = "nobody"
token_sha256 = "{hash_token(TOKENS['nobody'])}"
roles = []
"""


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test inherits OTEL_* or KEYBROKER_* settings from the machine it runs on."""
    import os

    for name in list(os.environ):
        if name.startswith(("OTEL_", "KEYBROKER_")):
            monkeypatch.delenv(name)


@pytest.fixture(scope="session")
def bao() -> Iterator[BaoDevServer]:
    """One OpenBao dev server for the session, bootstrapped like `keybroker vault bootstrap`."""
    with BaoDevServer() as server:
        VaultAdmin(VaultSession(VaultSettings(addr=server.addr, token=server.root_token))
                   ).bootstrap()
        yield server


@pytest.fixture
def vault_settings(bao: BaoDevServer) -> VaultSettings:
    """Vault settings with a key prefix of this test's own, so tests never see each other's keys."""
    return VaultSettings(addr=bao.addr, token=bao.root_token,
                         key_prefix=f"t-{uuid.uuid4().hex[:12]}", reload_interval=3600.0)


@pytest.fixture
def vault_admin(vault_settings: VaultSettings) -> VaultAdmin:
    return VaultAdmin(VaultSession(vault_settings))


KeySpec = tuple[str, str]  # (name, account); account "" means the key is its own account


@pytest.fixture
def put_keys(vault_admin: VaultAdmin) -> Callable[..., dict[str, str]]:
    """Write keys to Vault; returns {key_id: secret}. Secrets are random per test."""

    def put(pool: str, specs: list[KeySpec], **fields: Any) -> dict[str, str]:
        out = {}
        for name, account in specs:
            secret = f"sk-or-v1-test-{secrets.token_hex(20)}"
            vault_admin.put_key(pool, name, secret, account=account, **fields)
            out[f"{pool}/{name}"] = secret
        return out

    return put


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(T0)


@pytest.fixture
def policy_file(tmp_path: Path) -> Path:
    path = tmp_path / "policy.toml"
    path.write_text(POLICY)
    return path


@pytest.fixture
def log_lines() -> Iterator[Callable[[], list[dict[str, Any]]]]:
    """Capture structlog output as parsed JSON lines (and reset structlog afterwards)."""
    buf = io.StringIO()
    configure_logging("debug", "json", stream=buf)

    def lines() -> list[dict[str, Any]]:
        return [json.loads(line) for line in buf.getvalue().splitlines() if line.strip()]

    lines.raw = buf  # type: ignore[attr-defined]
    yield lines
    structlog.reset_defaults()


def make_settings(tmp_path: Path, vault: VaultSettings, policy: Path, **overrides: Any) -> Settings:
    """Settings for a test broker on 127.0.0.1:0; keyword overrides replace fields."""
    base = Settings(
        listen="127.0.0.1:0", policy_file=str(policy),
        store=StoreSettings(sqlite_path=str(tmp_path / "state.db")),
        vault=vault, lease=LeaseSettings(sweep_interval=0.05), quota=QuotaSettings())
    return dataclasses.replace(base, **overrides)


async def wait_until(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError("condition not met in time")
        await asyncio.sleep(0.02)


@pytest.fixture
async def start_broker(tmp_path: Path, vault_settings: VaultSettings, policy_file: Path,
                       clock: ManualClock) -> AsyncIterator[Callable[..., Awaitable[Broker]]]:
    """Start a real broker (gRPC on port 0, SQLite in tmp_path) and wait for its keys."""
    brokers: list[Broker] = []

    async def start(*, wait_ready: bool = True, **overrides: Any) -> Broker:
        vault = overrides.pop("vault", vault_settings)
        settings = make_settings(tmp_path, vault, policy_file, **overrides)
        b = Broker(settings, clock=clock)
        brokers.append(b)
        await b.start()
        if wait_ready:
            await wait_until(lambda: b.engine.ready)
        return b

    yield start
    for b in brokers:
        await b.stop(0)


@pytest.fixture
async def connect() -> AsyncIterator[Callable[..., AsyncKeyBrokerClient]]:
    """connect(broker, "alice") -> an AsyncKeyBrokerClient with that principal's token."""
    clients: list[AsyncKeyBrokerClient] = []

    def make(broker: Broker, who: str | None = "alice", **kw: Any) -> AsyncKeyBrokerClient:
        token = TOKENS[who] if who else None
        c = AsyncKeyBrokerClient(f"127.0.0.1:{broker.port}", token=token, **kw)
        clients.append(c)
        return c

    yield make
    for c in clients:
        await c.close()
