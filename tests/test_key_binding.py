"""An operator who may write keys but not decrypt them cannot exfiltrate a secret: base_url
is checked against the broker's allowlist, and each ciphertext is bound (Transit derived
key, encryption context) to its key id and provider host. Real OpenBao, real sockets."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import hvac
import pytest
from keybroker_client import BrokerError as ClientError

from broker.config import OpenRouterSettings
from broker.testing import Emulator

KEYBROKER = Path(sys.executable).parent / "keybroker"


class Listener:
    """A TCP listener on 127.0.0.1 that records every byte anyone sends it."""

    def __init__(self) -> None:
        self.connections = 0
        self.received = b""
        self._server: asyncio.base_events.Server | None = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        with contextlib.suppress(TimeoutError):
            self.received += await asyncio.wait_for(reader.read(65536), 2.0)
        writer.close()

    async def __aenter__(self) -> Listener:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}/api/v1"


@pytest.fixture
async def listener() -> AsyncIterator[Listener]:
    async with Listener() as server:
        yield server


@pytest.fixture
async def emu(clock) -> AsyncIterator[Emulator]:  # type: ignore[no-untyped-def]
    async with Emulator(clock=clock, seed=5) as emulator:
        yield emulator


def _root(vault_settings) -> hvac.Client:  # type: ignore[no-untyped-def]
    return hvac.Client(url=vault_settings.addr, token=vault_settings.token)


def _patch(vault_settings, key_id: str, **changes: object) -> None:  # type: ignore[no-untyped-def]
    """What an operator with the operator policy may do: rewrite a key's fields."""
    c = _root(vault_settings)
    path = f"{vault_settings.key_prefix}/{key_id}"
    data = c.secrets.kv.v2.read_secret_version(path=path, mount_point=vault_settings.kv_mount,
                                               raise_on_deleted_version=True)["data"]["data"]
    c.secrets.kv.v2.create_or_update_secret(path=path, secret={**data, **changes},
                                            mount_point=vault_settings.kv_mount)


def _field(vault_settings, key_id: str, name: str) -> str:  # type: ignore[no-untyped-def]
    c = _root(vault_settings)
    return str(c.secrets.kv.v2.read_secret_version(
        path=f"{vault_settings.key_prefix}/{key_id}", mount_point=vault_settings.kv_mount,
        raise_on_deleted_version=True)["data"]["data"][name])


async def test_a_key_whose_base_url_is_rewritten_sends_nothing_to_the_new_host(
        start_broker, put_keys, emu, listener, vault_settings, connect, log_lines):
    """An operator points a key's base_url at a local listener: no probe and no lease sends
    the secret there; the key is skipped with a log line and a metric."""
    (secret,) = put_keys("free", [("k1", "acct-a")], base_url=emu.base_url).values()
    emu.add_key("acct-a", secret, name="k1")
    broker = await start_broker(openrouter=OpenRouterSettings(
        probe_interval=0.05, allowed_base_urls=(emu.base_url,), allow_http_loopback=True))
    assert (await connect(broker).lease_key("free")).base_url == emu.base_url
    _patch(vault_settings, "free/k1", base_url=listener.url)
    await connect(broker, "admin").reload_keys()
    await asyncio.sleep(0.5)  # ten probe rounds
    with pytest.raises(ClientError):
        await connect(broker).lease_key("free")
    await broker.prober.probe_all()
    assert listener.connections == 0 and listener.received == b""
    skipped = [e for e in log_lines() if e["event"] == "vault.key_skipped"]
    assert skipped and skipped[-1]["key_id"] == "free/k1"
    assert skipped[-1]["reason"] == "base_url not allowed"
    assert secret not in log_lines.raw.getvalue()
    assert broker.metrics.registry.get_sample_value(
        "keybroker_keys_skipped_total", {"reason": "base_url not allowed"}) >= 1


async def test_a_ciphertext_copied_to_another_key_id_does_not_decrypt(
        start_broker, put_keys, vault_settings, connect, log_lines):
    """Copying k1's ciphertext into k2's entry does not give k2 k1's secret: k2 is not
    loaded, the log says why and holds no secret."""
    secrets = put_keys("free", [("k1", "acct-a"), ("k2", "acct-b")])
    _patch(vault_settings, "free/k2", ciphertext=_field(vault_settings, "free/k1", "ciphertext"))
    broker = await start_broker()
    keys = await connect(broker, "admin").list_keys("free")
    assert [k.key_id for k in keys] == ["free/k1"]
    lease = await connect(broker).lease_key("free")
    assert lease.key_id == "free/k1" and lease.api_key == secrets["free/k1"]
    skipped = [e for e in log_lines() if e["event"] == "vault.key_skipped"]
    assert [(e["key_id"], e["reason"]) for e in skipped] == [("free/k2", "decrypt failed")]
    assert all(s not in log_lines.raw.getvalue() for s in secrets.values())


async def test_a_base_url_moved_to_another_allowed_host_does_not_decrypt(
        start_broker, put_keys, vault_settings, connect):
    """Moving a key to another allowed provider host breaks its binding: it is not loaded."""
    put_keys("free", [("k1", "acct-a"), ("k2", "acct-b")])
    _patch(vault_settings, "free/k2", base_url="https://other.example/api/v1")
    broker = await start_broker(openrouter=OpenRouterSettings(
        allowed_base_urls=("https://openrouter.ai/api/v1", "https://other.example/api/v1")))
    assert [k.key_id for k in await connect(broker, "admin").list_keys("free")] == ["free/k1"]


def test_bootstrap_creates_a_derived_transit_key(vault_settings, bao):
    """The Transit key `vault bootstrap` creates is derived (so contexts bind ciphertexts)."""
    import dataclasses

    from broker.vault import VaultAdmin, VaultSession

    settings = dataclasses.replace(vault_settings, transit_key=f"k-{os.urandom(4).hex()}")
    VaultAdmin(VaultSession(settings)).bootstrap()
    info = _root(settings).secrets.transit.read_key(name=settings.transit_key)["data"]
    assert info["derived"] is True


def _cli(bao, *args: str, **env: str) -> subprocess.CompletedProcess[str]:  # type: ignore[no-untyped-def]
    full = {k: v for k, v in os.environ.items()
            if not k.startswith(("KEYBROKER_", "VAULT_", "BAO_"))}
    full.update(VAULT_ADDR=bao.addr, VAULT_TOKEN=bao.root_token, **env)
    return subprocess.run([str(KEYBROKER), *args], env=full, capture_output=True, text=True,
                          timeout=60, check=False)


def test_rewrap_with_a_transit_key_that_is_not_derived_says_how_to_migrate(bao, vault_settings):
    """`vault rewrap` on a pre-binding (not derived) Transit key exits 1 with one line naming
    the setting and the migration, no traceback."""
    name = f"old-{os.urandom(4).hex()}"
    _root(vault_settings).secrets.transit.create_key(name=name, key_type="aes256-gcm96")
    result = _cli(bao, "vault", "rewrap", KEYBROKER_VAULT_TRANSIT_KEY=name,
                  KEYBROKER_VAULT_KEY_PREFIX=vault_settings.key_prefix)
    assert result.returncode == 1, result.stderr
    assert "vault.transit_key" in result.stderr and "not derived" in result.stderr
    assert "keys put" in result.stderr and "Traceback" not in result.stderr


def test_bootstrap_approle_has_expiring_bounded_secret_ids(bao, vault_settings):
    """The AppRole `vault bootstrap` creates limits its secret_ids in time and uses and binds
    logins and tokens to CIDRs; the flags change them."""
    prefix = dict(KEYBROKER_VAULT_KEY_PREFIX=vault_settings.key_prefix)
    assert _cli(bao, "vault", "bootstrap", **prefix).returncode == 0
    role = _root(vault_settings).auth.approle.read_role(role_name="keybroker")["data"]
    assert role["secret_id_ttl"] == 720 * 3600 and role["secret_id_num_uses"] == 1000
    assert "127.0.0.0/8" in role["token_bound_cidrs"]
    assert "10.0.0.0/8" in role["secret_id_bound_cidrs"]
    done = _cli(bao, "vault", "bootstrap", "--secret-id-ttl", "1h", "--secret-id-num-uses", "5",
                "--bound-cidrs", "127.0.0.1/32", **prefix)
    assert done.returncode == 0, done.stderr
    role = _root(vault_settings).auth.approle.read_role(role_name="keybroker")["data"]
    assert (role["secret_id_ttl"], role["secret_id_num_uses"]) == (3600, 5)
    assert role["token_bound_cidrs"] in (["127.0.0.1/32"], ["127.0.0.1"])
    assert _cli(bao, "vault", "bootstrap", **prefix).returncode == 0  # back to the defaults


def test_approle_out_never_follows_a_symlink_or_overwrites(bao, vault_settings, tmp_path):
    """`--approle-out` onto a symlink or an existing file is refused (exit 2, one line) and
    the link's target is not written."""
    target = tmp_path / "target"
    target.write_text("unchanged")
    link = tmp_path / "approle.json"
    link.symlink_to(target)
    prefix = dict(KEYBROKER_VAULT_KEY_PREFIX=vault_settings.key_prefix)
    result = _cli(bao, "vault", "bootstrap", "--approle-out", str(link), **prefix)
    assert result.returncode == 2 and "--approle-out" in result.stderr
    assert "Traceback" not in result.stderr
    assert target.read_text() == "unchanged"
    fresh = tmp_path / "fresh.json"
    assert _cli(bao, "vault", "bootstrap", "--approle-out", str(fresh), **prefix).returncode == 0
    assert set(json.loads(fresh.read_text())) == {"role_id", "secret_id"}
    assert oct(fresh.stat().st_mode & 0o777) == "0o600"


def test_key_context_names_key_id_and_host():
    """The encryption context binds the key id and the provider host[:port]."""
    from broker.vault import key_context

    text = base64.b64decode(key_context("free", "k1", "https://OpenRouter.ai/api/v1")).decode()
    assert text == "keybroker:v1|free/k1|openrouter.ai"
    assert key_context("free", "k1", "") == key_context("free", "k1",
                                                        "https://openrouter.ai/api/v1")
