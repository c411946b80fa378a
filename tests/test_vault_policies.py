"""The Vault policies `keybroker vault bootstrap` writes (deploy/vault/*.hcl), tried on a real
OpenBao with exactly the commands each is meant for, and with the commands it is not."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import hvac
import hvac.exceptions
import pytest
from keybroker_client import AsyncKeyBrokerClient

from broker.config import VaultAuth, VaultSettings
from broker.testing import BaoDevServer
from broker.vault import VaultAdmin, VaultSession
from tests.support import TOKENS

KEYBROKER = Path(sys.executable).parent / "keybroker"
DEPLOY_VAULT = Path(__file__).resolve().parent.parent / "deploy" / "vault"


@dataclass
class Vault:
    """A fresh OpenBao configured by `keybroker vault bootstrap`, with a token per policy."""

    server: BaoDevServer
    operator_token: str
    role_id: str
    secret_id: str

    def run(self, token: str, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("KEYBROKER_", "VAULT_", "BAO_"))}
        env.update(VAULT_ADDR=self.server.addr, VAULT_TOKEN=token)
        return subprocess.run([str(KEYBROKER), *args], input=stdin, env=env, capture_output=True,
                              text=True, timeout=60, check=False)

    def root(self) -> hvac.Client:
        return hvac.Client(url=self.server.addr, token=self.server.root_token)

    def broker_session(self) -> VaultSession:
        return VaultSession(VaultSettings(addr=self.server.addr, auth=VaultAuth.APPROLE,
                                          role_id=self.role_id, secret_id=self.secret_id,
                                          reload_interval=3600.0))


@pytest.fixture(scope="module")
def vault(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Vault]:
    with BaoDevServer() as server:
        out = tmp_path_factory.mktemp("approle") / "approle.json"
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("KEYBROKER_", "VAULT_", "BAO_"))}
        env.update(VAULT_ADDR=server.addr, VAULT_TOKEN=server.root_token)
        done = subprocess.run([str(KEYBROKER), "vault", "bootstrap", "--approle-out", str(out)],
                              env=env, capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 0, done.stderr
        creds = json.loads(out.read_text())
        root = hvac.Client(url=server.addr, token=server.root_token)
        operator = root.auth.token.create(policies=[VaultAdmin.OPERATOR_POLICY], ttl="1h")
        yield Vault(server, operator["auth"]["client_token"], creds["role_id"], creds["secret_id"])


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, f"rc={result.returncode}\n{result.stdout}\n{result.stderr}"
    return result.stdout


def denied(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 1, f"rc={result.returncode}\n{result.stdout}\n{result.stderr}"
    assert "permission denied" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr, result.stderr


def new_secret() -> str:
    return f"sk-or-v1-test-{secrets.token_hex(20)}"


def test_bootstrap_applies_the_policy_files_of_deploy(vault):
    """The policies the tests below exercise are exactly deploy/vault/*.hcl."""
    root = vault.root()
    for name in (VaultAdmin.BROKER_POLICY, VaultAdmin.OPERATOR_POLICY):
        assert root.sys.read_policy(name=name)["data"]["rules"] == (
            DEPLOY_VAULT / f"{name}.hcl").read_text()


def test_operator_policy_runs_every_key_command_including_rewrap(vault):
    """An operator token puts, lists, disables, enables, rewraps (after a Transit rotation) and
    removes keys with the keybroker CLI."""
    op = vault.operator_token
    assert "stored free/op-1" in ok(vault.run(op, "keys", "put", "--pool", "free", "--name", "op-1",
                                              "--account", "acct-op", stdin=new_secret() + "\n"))
    listing = json.loads(ok(vault.run(op, "keys", "list", "--pool", "free", "--json")))
    assert [r["name"] for r in listing] == ["op-1"]
    ok(vault.run(op, "keys", "disable", "free/op-1"))
    ok(vault.run(op, "keys", "enable", "free/op-1"))
    vault.root().secrets.transit.rotate_key(name="keybroker")
    assert "rewrapped 1 key(s)" in ok(vault.run(op, "vault", "rewrap"))
    (record,) = json.loads(ok(vault.run(op, "keys", "list", "--pool", "free", "--json")))
    latest = vault.root().secrets.transit.read_key(name="keybroker")["data"]["latest_version"]
    assert record["ciphertext_version"] == f"vault:v{latest}"
    ok(vault.run(op, "keys", "rm", "free/op-1"))
    assert json.loads(ok(vault.run(op, "keys", "list", "--pool", "free", "--json"))) == []


def test_operator_policy_cannot_decrypt_bootstrap_or_rotate(vault):
    """An operator token cannot decrypt a key, read the broker's key load, change policies or
    auth (bootstrap), nor rotate the Transit key."""
    op = vault.operator_token
    ok(vault.run(op, "keys", "put", "--pool", "free", "--name", "op-2", stdin=new_secret() + "\n"))
    client = hvac.Client(url=vault.server.addr, token=op)
    ciphertext = client.secrets.kv.v2.read_secret_version(
        path="keys/free/op-2", mount_point="keybroker",
        raise_on_deleted_version=True)["data"]["data"]["ciphertext"]
    with pytest.raises(hvac.exceptions.Forbidden):
        client.secrets.transit.decrypt_data(name="keybroker", ciphertext=ciphertext)
    with pytest.raises(hvac.exceptions.Forbidden):
        client.secrets.transit.rotate_key(name="keybroker")
    denied(vault.run(op, "vault", "bootstrap"))
    ok(vault.run(op, "keys", "rm", "free/op-2"))


async def test_broker_policy_serves_reloads_and_renews_its_own_token(vault, start_broker):
    """With the AppRole token bootstrap issues, a broker loads and leases keys, ReloadKeys picks
    up a new key, and the token renews itself."""
    admin = VaultAdmin(VaultSession(VaultSettings(addr=vault.server.addr,
                                                  token=vault.operator_token)))
    first, second = new_secret(), new_secret()
    admin.put_key("free", "b-1", first)
    session = vault.broker_session()
    broker = await start_broker(vault=session.settings)
    async with AsyncKeyBrokerClient(f"127.0.0.1:{broker.port}", token=TOKENS["alice"]) as alice, \
            AsyncKeyBrokerClient(f"127.0.0.1:{broker.port}", token=TOKENS["admin"]) as root:
        lease = await alice.lease_key("free")
        assert lease.api_key == first
        await alice.complete(lease.lease_id, used=False)
        admin.put_key("free", "b-2", second)
        await root.reload_keys()
        assert sorted(k.key_id for k in await root.list_keys("free")) == ["free/b-1", "free/b-2"]
    client = session.client()
    before = client.auth.token.lookup_self()["data"]["expire_time"]
    client.auth.token.renew_self()
    assert client.auth.token.lookup_self()["data"]["expire_time"] >= before
    for name in ("b-1", "b-2"):
        admin.remove_key("free", name)


def test_broker_policy_cannot_write_rewrap_or_bootstrap(vault):
    """The broker's token is refused by every operator command that changes keys, by rewrap and
    by bootstrap; it cannot encrypt or rotate either."""
    admin = VaultAdmin(VaultSession(VaultSettings(addr=vault.server.addr,
                                                  token=vault.operator_token)))
    admin.put_key("free", "b-3", new_secret())
    client = vault.broker_session().client()
    token = client.token
    denied(vault.run(token, "keys", "put", "--pool", "free", "--name", "b-4",
                     stdin=new_secret() + "\n"))
    for command in (("keys", "disable", "free/b-3"), ("keys", "enable", "free/b-3"),
                    ("keys", "rm", "free/b-3"), ("vault", "rewrap"), ("vault", "bootstrap")):
        denied(vault.run(token, *command))
    with pytest.raises(hvac.exceptions.Forbidden):
        client.secrets.transit.encrypt_data(name="keybroker", plaintext="c2VjcmV0")
    with pytest.raises(hvac.exceptions.Forbidden):
        client.secrets.transit.rotate_key(name="keybroker")
    assert [r.name for r in admin.list_keys("free")] == ["b-3"]
    admin.remove_key("free", "b-3")
