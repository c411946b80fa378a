"""The Node.js client (clients/node) against a real broker started here."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import re
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from broker.config import QuotaSettings, TlsSettings
from tests.support import POLICY, TOKENS

NODE = shutil.which("node")
CLIENT = Path(__file__).resolve().parent.parent / "clients" / "node"
TEST_FILES = ("test/unit.test.mjs", "test/interop.test.mjs")  # test/mtls.test.mjs: its own test

pytestmark = pytest.mark.skipif(NODE is None, reason="node is not installed")


def _tap_count(out: str, name: str) -> int:
    match = re.search(rf"^# {name} (\d+)$", out, re.M)
    assert match, f"no '# {name}' line in the node test output:\n{out}"
    return int(match.group(1))


async def _node_test(files: tuple[str, ...], env: dict[str, str]) -> str:
    """Run `node --test` on files in clients/node; returns its TAP output after it passed."""
    assert (CLIENT / "node_modules" / "@grpc" / "grpc-js").is_dir(), (
        "clients/node has no node_modules: run `make setup` (npm ci in clients/node)")
    assert NODE is not None
    # The broker serves on this event loop, so node runs as an asyncio subprocess.
    proc = await asyncio.create_subprocess_exec(
        NODE, "--test", "--test-reporter=tap", *files, cwd=CLIENT,
        env={**os.environ, "NODE_OPTIONS": "", **env}, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        raw, _ = await asyncio.wait_for(proc.communicate(), timeout=90)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    out = raw.decode(errors="replace")
    assert proc.returncode == 0, out
    assert _tap_count(out, "fail") == 0, out
    assert _tap_count(out, "skipped") == 0, out
    return out


def _cert(cn: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name,
          issuer_key: ec.EllipticCurvePrivateKey, kind: str) -> bytes:
    now = datetime.now(UTC)
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
               .issuer_name(issuer).public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + timedelta(hours=1))
               .add_extension(x509.BasicConstraints(ca=kind == "ca", path_length=None), critical=True))
    if kind == "server":
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    if kind != "ca":
        usage = ExtendedKeyUsageOID.SERVER_AUTH if kind == "server" else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def _write_pki(out: Path, client_cn: str) -> dict[str, Path]:
    """A throwaway CA with a server certificate for 127.0.0.1 and one client certificate."""
    def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())

    ca_key, server_key, client_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "node interop CA")])
    files = {"ca": _cert("node interop CA", ca_key, ca_name, ca_key, "ca"),
             "server": _cert("keybroker", server_key, ca_name, ca_key, "server"),
             "server_key": key_pem(server_key),
             "client": _cert(client_cn, client_key, ca_name, ca_key, "client"),
             "client_key": key_pem(client_key)}
    paths = {}
    for name, data in files.items():
        paths[name] = out / f"{name}.pem"
        paths[name].write_bytes(data)
    return paths


async def test_node_client_interop_with_a_real_broker(start_broker, put_keys):
    """The Node.js client leases, reports, completes, refunds and gets QuotaExhausted (with
    retryAfter), PermissionDenied and Unauthenticated from a real broker; lease() completes
    every lease it takes."""
    put_keys("free", [("k1", "acct-a")])
    put_keys("paid", [("p1", "acct-p")])
    broker = await start_broker(quota=QuotaSettings(daily_limit=2, minute_limit=100))
    out = await _node_test(TEST_FILES, {
        "KEYBROKER_TARGET": f"127.0.0.1:{broker.port}", "KEYBROKER_TOKEN_ALICE": TOKENS["alice"],
        "KEYBROKER_TOKEN_CAROL": TOKENS["carol"], "KEYBROKER_TOKEN_ADMIN": TOKENS["admin"]})
    assert _tap_count(out, "pass") >= 16, out
    for name in ("exhaustion throws QuotaExhausted with retryAfter from RetryInfo",
                 "lease() refunds when the callback throws before the call went out",
                 "carol may not lease from pool paid: PermissionDenied",
                 "a bad token is Unauthenticated",
                 "lease() refuses a callback that is not a function before taking a lease",
                 "lease() refunds when the callback throws synchronously or rejects with a non-Error",
                 "lease() lets a report the callback did not await reach the broker, then "
                 "completes as used",
                 "listKeys, iterKeys and usage follow every page; a bad page token is "
                 "InvalidArgument"):
        assert re.search(rf"^\s*ok \d+ - {re.escape(name)}$", out, re.M), f"{name!r} did not pass:\n{out}"


async def test_node_client_authenticates_with_a_client_certificate(start_broker, put_keys, tmp_path):
    """Over mTLS the Node.js client's certificate (as paths or Buffers) names the principal, and
    a client without one is refused."""
    put_keys("free", [("k1", "acct-a")])
    put_keys("paid", [("p1", "acct-p")])
    pki = _write_pki(tmp_path, "svc-mtls")
    policy = tmp_path / "mtls-policy.toml"
    policy.write_text(POLICY + '\n[[principals]]\nname = "svc-mtls"\nmtls_cn = "svc-mtls"\n'
                      'roles = ["free_consumer"]\n')
    broker = await start_broker(policy_file=str(policy), tls=TlsSettings(
        cert_file=str(pki["server"]), key_file=str(pki["server_key"]),
        client_ca_file=str(pki["ca"]), require_client_cert=True))
    out = await _node_test(("test/mtls.test.mjs",), {
        "KEYBROKER_TLS_TARGET": f"127.0.0.1:{broker.port}", "KEYBROKER_CA_FILE": str(pki["ca"]),
        "KEYBROKER_CLIENT_CERT_FILE": str(pki["client"]),
        "KEYBROKER_CLIENT_KEY_FILE": str(pki["client_key"])})
    assert _tap_count(out, "pass") == 3, out
