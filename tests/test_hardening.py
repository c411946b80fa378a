"""Attacks from the adversarial review on the gRPC edge, the audit trail, files, the policy
reload, reflection and the process itself: each test plays one against a real broker."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import stat
import time
from pathlib import Path

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from keybroker_client import Unauthenticated
from keybroker_client.v1 import keybroker_pb2
from keybroker_client.v1.keybroker_pb2 import LeaseKeyRequest

from broker.api.interceptor import DENIAL_RECORDS_PER_SECOND, BrokerInterceptor
from broker.audit import MAX_FIELD_CHARS, Audit, AuditEvent, AuditFile
from broker.auth import Policy
from broker.config import TlsSettings
from broker.runtime import MAX_RECEIVE_MESSAGE_BYTES
from broker.testing import BrokerProcess
from broker.testing.process import clean_environ
from tests.support import POLICY, TOKENS, wait_until

LEASE_KEY = "/keybroker.v1.KeyBroker/LeaseKey"


async def _raw_lease(port: int, pool: str, token: str | None = None) -> grpc.StatusCode:
    """LeaseKey with whatever pool, through a bare channel (no client-side checks)."""
    metadata = (("authorization", f"Bearer {token}"),) if token else None
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_unary(LEASE_KEY, request_serializer=LeaseKeyRequest.SerializeToString,
                                   response_deserializer=keybroker_pb2.LeaseKeyResponse.FromString)
        try:
            await call(LeaseKeyRequest(pool=pool), metadata=metadata, timeout=10)
        except grpc.aio.AioRpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


# -- Medium 2: unauthenticated disk filling --------------------------------------------------


async def test_unauthenticated_calls_with_a_large_pool_write_only_a_few_kb(start_broker, put_keys,
                                                                           tmp_path, log_lines):
    """Five calls without a token carrying a pool at the size limit grow the audit file and
    the log by at most a few KB (the pool is not written raw)."""
    put_keys("free", [("k1", "acct-a")])
    audit = tmp_path / "audit.jsonl"
    broker = await start_broker(audit_file=str(audit))
    audit_before, log_before = _size(audit), len(log_lines.raw.getvalue())
    pool = "p" * (MAX_RECEIVE_MESSAGE_BYTES - 64)
    codes = [await _raw_lease(broker.port, pool) for _ in range(5)]
    assert codes == [grpc.StatusCode.UNAUTHENTICATED] * 5
    await wait_until(lambda: _size(audit) > audit_before)
    assert _size(audit) - audit_before < 4096
    assert len(log_lines.raw.getvalue()) - log_before < 4096
    denied = [json.loads(line) for line in audit.read_text().splitlines()][-1]
    assert denied["event"] == "rpc.denied" and denied["pool"] == "<invalid>"


async def test_a_request_above_the_receive_limit_is_refused_by_grpc(start_broker, put_keys,
                                                                    tmp_path, log_lines):
    """A 4 MB request gets RESOURCE_EXHAUSTED from gRPC itself, before any audit or log."""
    put_keys("free", [("k1", "acct-a")])
    audit = tmp_path / "audit.jsonl"
    broker = await start_broker(audit_file=str(audit))
    assert MAX_RECEIVE_MESSAGE_BYTES <= 64 * 1024
    audit_before, log_before = _size(audit), len(log_lines.raw.getvalue())
    codes = [await _raw_lease(broker.port, "p" * 4_000_000) for _ in range(5)]
    assert codes == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 5
    assert _size(audit) == audit_before
    assert len(log_lines.raw.getvalue()) - log_before < 4096


async def test_denials_are_counted_every_time_but_audited_as_a_sample(start_broker, put_keys,
                                                                      tmp_path, clock):
    """Within one second at most DENIAL_RECORDS_PER_SECOND denials of a kind are audited, all
    are counted, and the next record says how many were left out."""
    put_keys("free", [("k1", "acct-a")])
    audit = tmp_path / "audit.jsonl"
    broker = await start_broker(audit_file=str(audit))
    for _ in range(50):
        assert await _raw_lease(broker.port, "free") == grpc.StatusCode.UNAUTHENTICATED

    def denials() -> list[dict[str, object]]:
        rows = [json.loads(line) for line in audit.read_text().splitlines()]
        return [r for r in rows if r["event"] == "rpc.denied"]

    assert len(denials()) == DENIAL_RECORDS_PER_SECOND
    counted = broker.metrics.registry.get_sample_value(
        "keybroker_rpc_denied_total", {"rpc": "LeaseKey", "code": "UNAUTHENTICATED"})
    assert counted == 50
    clock.advance(1.0)
    assert await _raw_lease(broker.port, "free") == grpc.StatusCode.UNAUTHENTICATED
    last = denials()[-1]
    assert last["suppressed"] == 50 - DENIAL_RECORDS_PER_SECOND and last["pool"] == "free"


def test_audit_records_clip_every_long_field(tmp_path):
    """However long a field given to the audit trail, each written value is clipped."""
    path = tmp_path / "audit.jsonl"
    sink = AuditFile(path)
    Audit(sinks=[sink]).record(AuditEvent.LEASE_REPORTED, decision="reported", pool="x" * 10**6,
                               reason="y" * 10**6, model="z" * 10**6)
    sink.close()
    assert path.stat().st_size < 4 * MAX_FIELD_CHARS + 1024
    row = json.loads(path.read_text())
    assert row["model"].startswith("z" * MAX_FIELD_CHARS) and "chars)" in row["model"]


# -- all methods authenticated -----------------------------------------------------------------


async def test_every_keybroker_method_without_a_token_is_unauthenticated(start_broker, put_keys):
    """Each method of every keybroker.v1 service descriptor, called without a token, answers
    UNAUTHENTICATED, whatever its kind."""
    put_keys("free", [("k1", "acct-a")])
    broker = await start_broker()
    seen = 0
    async with grpc.aio.insecure_channel(f"127.0.0.1:{broker.port}") as channel:
        for service in keybroker_pb2.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                path = f"/{service.full_name}/{method.name}"
                kind = ("stream" if method.client_streaming else "unary") + "_" + (
                    "stream" if method.server_streaming else "unary")
                call = getattr(channel, kind)(path, request_serializer=lambda m: b"",
                                              response_deserializer=lambda b: b)
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    if method.client_streaming:
                        request: object = iter(())
                    else:
                        request = object()
                    result = call(request, timeout=10)
                    if method.server_streaming:
                        async for _ in result:
                            pass
                    else:
                        await result
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, path
                seen += 1
    assert seen >= 10


async def test_a_streaming_keybroker_method_is_authenticated_too(tmp_path):
    """A server-streaming handler under keybroker.v1 (none exists yet) is refused without a
    token and served with one: the interceptor does not pass streams through."""
    policy = Policy.from_mapping(__import__("tomllib").loads(POLICY))
    served: list[str] = []

    async def stream(request: bytes, context: grpc.aio.ServicerContext):  # type: ignore[no-untyped-def]
        served.append("called")
        yield b"one"

    handler = grpc.method_handlers_generic_handler("keybroker.v1.KeyBroker", {
        "Watch": grpc.unary_stream_rpc_method_handler(stream)})
    server = grpc.aio.server(interceptors=[BrokerInterceptor(lambda: policy, Audit())])
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_stream("/keybroker.v1.KeyBroker/Watch")
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for _ in call(b"", timeout=10):
                    pass
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert served == []
            got = [m async for m in call(b"", timeout=10, metadata=(
                ("authorization", f"Bearer {TOKENS['alice']}"),))]
            assert got == [b"one"] and served == ["called"]
    finally:
        await server.stop(0)


# -- files created 0600 ------------------------------------------------------------------------


async def test_audit_file_and_sqlite_database_are_created_private(start_broker, put_keys,
                                                                  tmp_path, connect):
    """The audit file and the SQLite database (and its WAL) are created 0600 under umask 022."""
    put_keys("free", [("k1", "acct-a")])
    old = os.umask(0o022)
    try:
        broker = await start_broker(audit_file=str(tmp_path / "audit.jsonl"))
        lease = await connect(broker).lease_key("free")
        await connect(broker).complete(lease.lease_id)
    finally:
        os.umask(old)
    files = [tmp_path / "audit.jsonl", tmp_path / "state.db", tmp_path / "state.db-wal"]
    assert {f.name: stat.S_IMODE(f.stat().st_mode) for f in files if f.exists()} == {
        f.name: 0o600 for f in files}


# -- policy reload -----------------------------------------------------------------------------


async def test_editing_the_policy_revokes_a_principal_within_the_reload_interval(
        start_broker, put_keys, connect, policy_file):
    """Removing a principal from the policy file revokes its token within seconds, without a
    restart."""
    put_keys("free", [("k1", "acct-a")])
    broker = await start_broker()
    client = connect(broker, "bob")
    await client.complete((await client.lease_key("free")).lease_id)
    blocks = policy_file.read_text().split("[[principals]]")
    policy_file.write_text("[[principals]]".join(b for b in blocks if 'name = "bob"' not in b))

    async def refused() -> None:
        while True:
            try:
                lease = await client.lease_key("free")
            except Unauthenticated:
                return
            with contextlib.suppress(Unauthenticated):  # revoked between the two calls
                await client.complete(lease.lease_id)
            await asyncio.sleep(0.1)

    await asyncio.wait_for(refused(), timeout=5.0)
    lease = await connect(broker, "alice").lease_key("free")  # the others keep their access
    assert lease.key_id == "free/k1"


async def test_a_deleted_or_broken_policy_is_logged_counted_and_alerted(start_broker, put_keys,
                                                                        connect, policy_file,
                                                                        log_lines):
    """Deleting the policy file keeps the old policy but logs an error, counts it once and
    raises the policy_reload_failed alert; a good file clears the alert."""
    put_keys("free", [("k1", "acct-a")])
    broker = await start_broker()
    text = policy_file.read_text()
    policy_file.unlink()
    failures = lambda: broker.metrics.registry.get_sample_value(  # noqa: E731
        "keybroker_policy_reload_failures_total")
    await wait_until(lambda: failures() == 1)
    assert any(e["event"] == "policy.reload_failed" and e["level"] == "error"
               for e in log_lines())
    lease = await connect(broker).lease_key("free")  # the old policy is still in force
    await connect(broker).complete(lease.lease_id)
    fired, _ = await broker.alerts.evaluate()
    assert [a.rule for a in fired] == ["policy_reload_failed"]
    await asyncio.sleep(1.5)
    assert failures() == 1  # one episode, one count
    policy_file.write_text(text)
    await wait_until(lambda: broker.policy.error is None)
    _, resolved = await broker.alerts.evaluate()
    assert [a.rule for a in resolved] == ["policy_reload_failed"]


# -- reflection --------------------------------------------------------------------------------


async def _reflection_code(port: int) -> grpc.StatusCode:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        call = reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(timeout=10)
        try:  # an unknown method may fail the write already, or only the read
            await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
            await call.done_writing()
            async for _ in call:
                pass
        except grpc.aio.AioRpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


async def test_reflection_is_off_by_default_when_listening_beyond_loopback(start_broker,
                                                                           put_keys):
    """Listening on 0.0.0.0 without a reflection setting serves no reflection; reflection =
    true turns it on."""
    put_keys("free", [("k1", "acct-a")])
    plaintext = TlsSettings(insecure_plaintext=True)  # beyond loopback needs TLS or this
    hidden = await start_broker(listen="0.0.0.0:0", tls=plaintext)
    assert await _reflection_code(hidden.port) == grpc.StatusCode.UNIMPLEMENTED
    shown = await start_broker(listen="0.0.0.0:0", tls=plaintext, reflection=True)
    assert await _reflection_code(shown.port) == grpc.StatusCode.OK
    loopback_off = await start_broker(reflection=False)
    assert await _reflection_code(loopback_off.port) == grpc.StatusCode.UNIMPLEMENTED


# -- core dumps --------------------------------------------------------------------------------


def test_serve_disables_core_dumps(tmp_path, bao, vault_settings):
    """A running `keybroker serve` has RLIMIT_CORE 0 (its /proc limits) and is not dumpable."""
    policy = tmp_path / "policy.toml"
    policy.write_text(POLICY)
    env = {**clean_environ(), "KEYBROKER_POLICY_FILE": str(policy),
           "KEYBROKER_STORE_SQLITE_PATH": str(tmp_path / "state.db"),
           "KEYBROKER_VAULT_ADDR": bao.addr, "KEYBROKER_VAULT_TOKEN": bao.root_token,
           "KEYBROKER_VAULT_KEY_PREFIX": vault_settings.key_prefix,
           "KEYBROKER_LOG_FORMAT": "json"}
    with BrokerProcess(env, log_path=tmp_path / "serve.log") as proc:
        deadline = time.monotonic() + 30
        while not any(e.get("event") == "broker.listening" for e in proc.log_events()):
            assert time.monotonic() < deadline, proc.output()
            time.sleep(0.1)
        limits = Path(f"/proc/{proc.pid}/limits").read_text()
        (core,) = [line for line in limits.splitlines() if line.startswith("Max core file size")]
        assert core.split()[4:6] == ["0", "0"], core
        (hardened,) = [e for e in proc.log_events() if e.get("event") == "process.hardened"]
        assert hardened["dumpable"] == 0 and hardened["core_limit"] == 0
        if os.geteuid() != 0:  # a non-dumpable process's /proc files belong to root
            assert Path(f"/proc/{proc.pid}/environ").stat().st_uid == 0


def test_config_rejects_insecure_allowed_base_urls(tmp_path):
    """allowed_base_urls must be https, or http on loopback with allow_http_loopback."""
    from broker.config import load_settings
    from broker.errors import InvalidArgument

    cases = {"https://openrouter.ai/api/v1": None,
             "http://evil.example/api/v1": "must be https",
             "http://127.0.0.1:9/api/v1": "allow_http_loopback"}
    for url, problem in cases.items():
        env = {"KEYBROKER_OPENROUTER_ALLOWED_BASE_URLS": url}
        if problem is None:
            assert load_settings(env=env).openrouter.allowed_base_urls == (url,)
            continue
        with pytest.raises(InvalidArgument, match=problem):
            load_settings(env=env)
    ok = load_settings(env={"KEYBROKER_OPENROUTER_ALLOWED_BASE_URLS": "http://[::1]:9/v1",
                            "KEYBROKER_OPENROUTER_ALLOW_HTTP_LOOPBACK": "true"})
    assert dataclasses.asdict(ok.openrouter)["allow_http_loopback"] is True


# -- the image ---------------------------------------------------------------------------------


def test_dockerfile_pins_the_base_image_and_installs_from_constraints():
    """Every FROM is pinned by sha256 digest and pip installs with -c deploy/constraints.txt,
    which pins each runtime dependency of pyproject.toml to one exact version."""
    import re
    import tomllib

    root = Path(__file__).resolve().parent.parent
    text = (root / "deploy" / "Dockerfile").read_text().replace("\\\n", "")
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", text, re.M))
    bases = [args.get(m.strip("${}"), m) for m in re.findall(r"^FROM (\S+)", text, re.M)]
    assert bases and all(re.fullmatch(r"python:3\.11-slim@sha256:[0-9a-f]{64}", b) for b in bases)
    installs = [line for line in text.splitlines() if "pip install" in line]
    assert installs and all("-c deploy/constraints.txt" in line for line in installs)
    pins = {}
    for line in (root / "deploy" / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version and re.fullmatch(r"[\w.+-]+", version), line
            pins[re.sub(r"[-_.]+", "-", name.lower())] = version
    deps = tomllib.loads((root / "pyproject.toml").read_text())["project"]["dependencies"]
    for dep in deps:
        name = re.sub(r"[-_.]+", "-", re.split(r"[<>=!~\[; ]", dep, maxsplit=1)[0].lower())
        assert name.startswith("keybroker") or name in pins, dep
    assert "deploy/constraints.txt" in (root / "deploy" / "Dockerfile.dockerignore").read_text()
