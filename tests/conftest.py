"""Shared fixtures: a real OpenBao dev server, real SQLite files, real gRPC brokers on port 0."""

from __future__ import annotations

import dataclasses
import io
import json
import secrets
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from keybroker_client import AsyncKeyBrokerClient

from broker.clock import ManualClock
from broker.config import OpenRouterSettings, VaultSettings
from broker.logging import configure_logging
from broker.runtime import Broker
from broker.testing import BaoDevServer
from broker.vault import VaultAdmin, VaultSession
from tests.support import POLICY, T0, TOKENS, KeySpec, make_settings, wait_until


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


@pytest.fixture
def key_base_urls() -> set[str]:
    """The base_urls this test's put_keys wrote: start_broker allows them (a test of the
    allowlist itself passes its own openrouter.allowed_base_urls)."""
    return set()


@pytest.fixture
def put_keys(vault_admin: VaultAdmin, key_base_urls: set[str]) -> Callable[..., dict[str, str]]:
    """Write keys to Vault; returns {key_id: secret}. Secrets are random per test."""

    def put(pool: str, specs: list[KeySpec], **fields: Any) -> dict[str, str]:
        if fields.get("base_url"):
            key_base_urls.add(fields["base_url"])
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


@pytest.fixture
async def start_broker(tmp_path: Path, vault_settings: VaultSettings, policy_file: Path,
                       clock: ManualClock, key_base_urls: set[str]
                       ) -> AsyncIterator[Callable[..., Awaitable[Broker]]]:
    """Start a real broker (gRPC on port 0, SQLite in tmp_path) and wait for its keys."""
    brokers: list[Broker] = []

    async def start(*, wait_ready: bool = True, **overrides: Any) -> Broker:
        vault = overrides.pop("vault", vault_settings)
        settings = make_settings(tmp_path, vault, policy_file, **overrides)
        o = settings.openrouter
        if key_base_urls and o.allowed_base_urls == OpenRouterSettings().allowed_base_urls:
            settings = dataclasses.replace(settings, openrouter=dataclasses.replace(
                o, allowed_base_urls=(*o.allowed_base_urls, *sorted(key_base_urls)),
                allow_http_loopback=True))
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
