"""TLS by default: a non-loopback plaintext listen is refused, and a broker configured as deploy/
configures it (certificates from deploy/tls/gen-certs.sh) serves the Python and Node.js clients
over TLS and mTLS, refusing plaintext callers and callers without a client certificate."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from keybroker_client import AsyncKeyBrokerClient, Unavailable

from broker.config import TlsSettings, VaultSettings, is_loopback, load_settings
from broker.errors import BackendUnavailable, InvalidArgument
from broker.testing import free_port
from broker.testing.openbao import bao_binary
from broker.vault import VaultAdmin, VaultSession
from tests.support import POLICY, TOKENS

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
KEYBROKER = Path(sys.executable).parent / "keybroker"
NODE = shutil.which("node")
NODE_CLIENT = ROOT / "clients" / "node"
COMPOSE_TLS_DIR = "/var/lib/keybroker/tls"  # the `tls` volume in docker-compose.yml
K8S_TLS_DIR = "/etc/keybroker/tls"  # the keybroker-tls Secret's mount in deployment.yaml


def test_non_loopback_listen_without_tls_is_refused_with_one_line():
    """listen on 0.0.0.0 (or any non-loopback address) without TLS is a configuration error
    naming the fix, unless tls.insecure_plaintext says so; loopback and TLS listens pass."""
    for listen in ("0.0.0.0:50051", "[::]:50051", "10.1.2.3:50051", "broker:50051", ":50051"):
        with pytest.raises(InvalidArgument, match=r"^listen: .*tls\.cert_file.*insecure_plaintext"):
            load_settings(None, {"KEYBROKER_LISTEN": listen})
        load_settings(None, {"KEYBROKER_LISTEN": listen, "KEYBROKER_TLS_INSECURE_PLAINTEXT": "true"})
        load_settings(None, {"KEYBROKER_LISTEN": listen, "KEYBROKER_TLS_CERT_FILE": "c.pem",
                             "KEYBROKER_TLS_KEY_FILE": "k.pem"})
    for listen in ("127.0.0.1:0", "127.0.0.2:50051", "localhost:50051", "[::1]:50051",
                   "unix:/run/keybroker.sock"):
        assert is_loopback(listen), listen
        load_settings(None, {"KEYBROKER_LISTEN": listen})


def test_serve_refuses_a_plaintext_public_listen_before_binding(tmp_path):
    """`keybroker serve` on 0.0.0.0 without TLS exits 2 with one line, and binds nothing."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KEYBROKER_", "VAULT_"))}
    env.update(KEYBROKER_LISTEN="0.0.0.0:0", KEYBROKER_STORE_SQLITE_PATH=str(tmp_path / "s.db"))
    done = subprocess.run([str(KEYBROKER), "serve"], env=env, capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert any("insecure_plaintext" in line and "listen" in line for line in lines), lines
    assert not (tmp_path / "s.db").exists()


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The certificates deploy/tls/gen-certs.sh writes (the compose `certs` service)."""
    out = tmp_path_factory.mktemp("tls")
    done = subprocess.run(["sh", str(DEPLOY / "tls" / "gen-certs.sh"), str(out)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    return out


def _env_of(service_env: dict[str, Any], mount: str, certs: Path) -> dict[str, str]:
    """The TLS variables of a deploy/ service, with its certificate mount mapped to ``certs``."""
    return {k: str(v).replace(mount, str(certs)) for k, v in service_env.items()
            if k.startswith("KEYBROKER_TLS_")}


def _compose_tls(certs: Path) -> TlsSettings:
    env = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())["services"]["broker"][
        "environment"]
    return load_settings(None, _env_of(env, COMPOSE_TLS_DIR, certs)).tls


def _k8s_mtls_tls(certs: Path) -> TlsSettings:
    """deploy/k8s with the mtls overlay's patch, files as cert-manager names them."""
    (container,) = next(d for d in yaml.safe_load_all((DEPLOY / "k8s" / "deployment.yaml").read_text())
                        )["spec"]["template"]["spec"]["containers"]
    patch = yaml.safe_load((DEPLOY / "k8s" / "mtls" / "require-client-certs.yaml").read_text())
    (patched,) = patch["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e["value"] for e in [*container["env"], *patched["env"]] if "value" in e}
    for cert_manager, ours in (("tls.crt", "broker.crt"), ("tls.key", "broker.key")):
        (certs / cert_manager).write_bytes((certs / ours).read_bytes())
    return load_settings(None, _env_of(env, K8S_TLS_DIR, certs)).tls


async def _healthcheck(broker: Any, tls: TlsSettings) -> int:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEYBROKER_")}
    env.update(KEYBROKER_LISTEN=f"127.0.0.1:{broker.port}", KEYBROKER_TLS_CERT_FILE=tls.cert_file,
               KEYBROKER_TLS_KEY_FILE=tls.key_file,
               KEYBROKER_TLS_CLIENT_CA_FILE=tls.client_ca_file,
               KEYBROKER_TLS_REQUIRE_CLIENT_CERT=str(tls.require_client_cert).lower())
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(DEPLOY / "healthcheck.py"), "keybroker.v1.KeyBroker", env=env,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    return await asyncio.wait_for(proc.wait(), 60)


async def _node(script: str, env: dict[str, str]) -> str:
    assert NODE is not None
    proc = await asyncio.create_subprocess_exec(
        NODE, "--input-type=module", "-e", script, cwd=NODE_CLIENT,
        env={**os.environ, "NODE_OPTIONS": "", **env}, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), 90)
    assert proc.returncode == 0, out.decode(errors="replace")
    return out.decode()


NODE_TLS_LEASE = """
import { KeyBrokerClient } from '@keybroker/client';
const c = new KeyBrokerClient(process.env.TARGET, { rootCerts: process.env.CA_FILE,
                                                   token: process.env.TOKEN, timeoutMs: 10000 });
const lease = await c.leaseKey({ pool: 'free' });
await c.complete(lease.leaseId, false);
console.log(JSON.stringify({ keyId: lease.keyId }));
c.close();
"""


async def test_compose_tls_serves_python_and_node_clients_and_refuses_plaintext(
        certs, start_broker, put_keys):
    """With the compose broker's TLS settings and gen-certs.sh certificates, the Python and
    Node.js clients lease over TLS, the image's health check passes over TLS, and a plaintext
    client is refused."""
    put_keys("free", [("k1", "acct-a")])
    tls = _compose_tls(certs)
    assert tls.cert_file == str(certs / "broker.crt") and not tls.require_client_cert
    broker = await start_broker(tls=tls)
    target = f"127.0.0.1:{broker.port}"
    async with AsyncKeyBrokerClient(target, token=TOKENS["alice"],
                                    root_certificates=certs / "ca.crt") as alice:
        lease = await alice.lease_key("free")
        assert lease.key_id == "free/k1"
        await alice.complete(lease.lease_id, used=False)
    async with AsyncKeyBrokerClient(target, token=TOKENS["alice"]) as plaintext:
        with pytest.raises(Unavailable):
            await plaintext.lease_key("free")
    assert await _healthcheck(broker, tls) == 0
    if NODE is None:
        pytest.skip("node is not installed")
    out = await _node(NODE_TLS_LEASE, {"TARGET": target, "CA_FILE": str(certs / "ca.crt"),
                                       "TOKEN": TOKENS["alice"]})
    assert json.loads(out.strip().splitlines()[-1]) == {"keyId": "free/k1"}


async def test_k8s_mtls_variant_refuses_a_client_without_a_certificate(
        certs, start_broker, put_keys, tmp_path):
    """deploy/k8s/mtls's settings with gen-certs.sh certificates: a client certificate names the
    principal (Python and Node.js clients), the health check passes presenting the broker's
    certificate, and a client without a certificate, even with a valid token, is refused."""
    put_keys("free", [("k1", "acct-a")])
    put_keys("paid", [("p1", "acct-p")])
    tls = _k8s_mtls_tls(certs)
    assert tls.require_client_cert and tls.client_ca_file == str(certs / "ca.crt")
    policy = tmp_path / "mtls-policy.toml"
    policy.write_text(POLICY + '\n[[principals]]\nname = "demo-client"\nmtls_cn = "demo-client"\n'
                      'roles = ["free_consumer"]\n')
    broker = await start_broker(policy_file=str(policy), tls=tls)
    target = f"127.0.0.1:{broker.port}"
    async with AsyncKeyBrokerClient(target, root_certificates=certs / "ca.crt",
                                    client_cert=certs / "client.crt",
                                    client_key=certs / "client.key") as svc:
        lease = await svc.lease_key("free")
        assert lease.key_id == "free/k1"
        await svc.complete(lease.lease_id, used=False)
    async with AsyncKeyBrokerClient(target, token=TOKENS["alice"],
                                    root_certificates=certs / "ca.crt") as anonymous:
        with pytest.raises(Unavailable):
            await anonymous.lease_key("free")
    async with AsyncKeyBrokerClient(target, token=TOKENS["alice"]) as plaintext:
        with pytest.raises(Unavailable):
            await plaintext.lease_key("free")
    assert await _healthcheck(broker, tls) == 0
    if NODE is None:
        pytest.skip("node is not installed")
    await _node_mtls(target, certs)


async def _node_mtls(target: str, certs: Path) -> None:
    """clients/node/test/mtls.test.mjs (file and Buffer certificates, refusal without one)."""
    assert NODE is not None
    proc = await asyncio.create_subprocess_exec(
        NODE, "--test", "--test-reporter=tap", "test/mtls.test.mjs", cwd=NODE_CLIENT,
        env={**os.environ, "NODE_OPTIONS": "", "KEYBROKER_TLS_TARGET": target,
             "KEYBROKER_CA_FILE": str(certs / "ca.crt"),
             "KEYBROKER_CLIENT_CERT_FILE": str(certs / "client.crt"),
             "KEYBROKER_CLIENT_KEY_FILE": str(certs / "client.key")},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    raw, _ = await asyncio.wait_for(proc.communicate(), 90)
    out = raw.decode(errors="replace")
    assert proc.returncode == 0, out
    assert "# pass 3" in out and "# fail 0" in out, out


def _serve(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith(("KEYBROKER_", "VAULT_"))}
    full.update(KEYBROKER_STORE_SQLITE_PATH=str(tmp_path / "s.db"),
                KEYBROKER_VAULT_TOKEN="unused-here", **env)  # credentials are checked first
    return subprocess.run([str(KEYBROKER), "serve"], env=full, capture_output=True, text=True,
                          timeout=60, check=False)


def test_serve_with_unusable_tls_files_or_a_taken_port_says_which_in_one_line(certs, tmp_path):
    """A missing or non-PEM certificate/key, a key of another certificate, a non-PEM client CA
    or a taken port stop `keybroker serve` with exit 2 (1 for the port) and one line naming
    the setting and the file (or address), never a traceback."""
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    good = {"KEYBROKER_LISTEN": "127.0.0.1:0",
            "KEYBROKER_TLS_CERT_FILE": str(certs / "broker.crt"),
            "KEYBROKER_TLS_KEY_FILE": str(certs / "broker.key")}
    cases = [
        ({"KEYBROKER_TLS_KEY_FILE": str(tmp_path / "missing.key")}, "tls.key_file",
         "missing.key"),
        ({"KEYBROKER_TLS_CERT_FILE": str(garbage)}, "tls.cert_file", "garbage.pem"),
        ({"KEYBROKER_TLS_KEY_FILE": str(certs / "client.key")}, "tls.key_file", "client.key"),
        ({"KEYBROKER_TLS_CLIENT_CA_FILE": str(garbage),
          "KEYBROKER_TLS_REQUIRE_CLIENT_CERT": "true"}, "tls.client_ca_file", "garbage.pem"),
    ]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cases.append(({"KEYBROKER_LISTEN": f"127.0.0.1:{port}"}, "listen", f"127.0.0.1:{port}"))
        for env, setting, named in cases:
            done = _serve(tmp_path, **{**good, **env})
            # A file to fix is configuration (2); a port another program holds, runtime (1).
            assert done.returncode == (1 if setting == "listen" else 2), (env, done.stderr)
            assert "Traceback" not in done.stderr, done.stderr
            (line,) = [x for x in done.stderr.splitlines() if x.startswith("Error:")]
            assert setting in line and named in line, (env, line)


@pytest.fixture
def tls_bao(certs: Path, tmp_path: Path) -> Iterator[tuple[str, str]]:
    """OpenBao as docker-compose.yml runs it: dev mode on loopback plus the TLS listener of
    deploy/tls/openbao-tls.hcl with gen-certs.sh's certificate. Yields the root token."""
    port = free_port()
    hcl = (DEPLOY / "tls" / "openbao-tls.hcl").read_text().replace(COMPOSE_TLS_DIR, str(certs))
    assert "0.0.0.0:8201" in hcl
    config = tmp_path / "openbao-tls.hcl"
    config.write_text(hcl.replace("0.0.0.0:8201", f"127.0.0.1:{port}"))
    token = f"root-{uuid.uuid4().hex}"
    env = {**os.environ, "BAO_DEV_ROOT_TOKEN_ID": token, "HOME": str(tmp_path)}
    proc = subprocess.Popen([bao_binary(), "server", "-dev", "-dev-no-store-token",
                             f"-dev-listen-address=127.0.0.1:{free_port()}", f"-config={config}"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        addr = f"https://localhost:{port}"
        for _ in range(300):
            try:
                if httpx.get(f"{addr}/v1/sys/health", verify=ssl.create_default_context(
                        cafile=str(certs / "ca.crt"))).is_success:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        yield addr, token
    finally:
        proc.terminate()
        proc.wait(timeout=30)


async def test_broker_verifies_the_compose_openbao_tls_listener(certs, tls_bao, start_broker):
    """With the compose broker's KEYBROKER_VAULT_VERIFY (the local CA), the broker loads keys from
    OpenBao over TLS and leases them; with verification against the system CAs it is refused."""
    addr, root_token = tls_bao
    env = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())["services"]["broker"][
        "environment"]
    assert env["KEYBROKER_VAULT_ADDR"].startswith("https://")
    verify = env["KEYBROKER_VAULT_VERIFY"].replace(COMPOSE_TLS_DIR, str(certs))
    vault = VaultSettings(addr=addr, token=root_token, verify=verify, reload_interval=3600.0)
    admin = VaultAdmin(VaultSession(vault))
    admin.bootstrap()
    admin.put_key("free", "k1", "sk-or-v1-test-over-tls")
    broker = await start_broker(vault=vault)
    async with AsyncKeyBrokerClient(f"127.0.0.1:{broker.port}", token=TOKENS["alice"]) as alice:
        lease = await alice.lease_key("free")
        assert lease.api_key == "sk-or-v1-test-over-tls"
        await alice.complete(lease.lease_id, used=False)
    unverified = VaultAdmin(VaultSession(dataclasses.replace(vault, verify="true")))
    with pytest.raises(BackendUnavailable, match="SSLError"):
        unverified.list_keys()
