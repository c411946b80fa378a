"""Proof of the key lifecycle under load and across a crash: real OpenBao, the OpenRouter
emulator, real brokers (in process, and ``keybroker serve`` subprocesses driven by the CLI)."""

from __future__ import annotations

import asyncio
import glob
import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
from keybroker_client import AsyncKeyBrokerClient, Lease, LeaseNotActive
from keybroker_client.v1 import keybroker_pb2 as pb
from keybroker_client.v1 import keybroker_pb2_grpc as pb_grpc
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from broker.config import OpenRouterSettings, QuotaSettings, RotationSettings, VaultSettings
from broker.lifecycle import provider_name
from broker.runtime import Broker
from broker.testing import BaoDevServer, BrokerProcess, Emulator, free_port
from broker.testing.process import clean_environ, keybroker_argv
from broker.vault import VaultAdmin
from tests.support import POLICY, TOKENS, make_settings, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

PAID = "openai/gpt-4o-mini"
ACCOUNT = "acct-a"
CALLERS = 32
LOAD_SECONDS = 12.0


def as_(who: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {TOKENS[who]}"),)


def agree(emu: Emulator, vault: VaultAdmin) -> None:
    """Vault and the provider hold exactly the same keys (by provider name and hash)."""
    at_provider = {k.name: k.hash for k in emu._keys.values()
                   if k.account == ACCOUNT and not k.management and not k.deleted}
    in_vault = {provider_name(p, n): str(f.get("provider_hash"))
                for p, n, f in vault.all_key_fields()}
    assert at_provider == in_vault


async def test_rotating_every_key_twice_and_revoking_one_under_load(
        vault_settings, policy_file, vault_admin, clock, connect, tmp_path, log_lines):
    """32 callers lease and call the provider continuously while every key of 5 is rotated
    twice and one is revoked: no call fails but those on the revoked key, every lease is served
    by a key live at the provider, the revoked key's active leases end (no renewal; their
    reports and completions are accepted) and no lease asked for after the revocation is on
    it, no secret reaches a log, span, metric, audit record or the SQLite file, and Vault and
    the provider agree at the end."""
    async with Emulator(clock=clock) as emu:
        emu.add_account(ACCOUNT, credits=10, balance=1e6)
        management = emu.add_management_key(ACCOUNT)
        vault_admin.put_management_key(ACCOUNT, management)
        spans = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(spans))
        broker = Broker(make_settings(
            tmp_path, vault_settings, policy_file,
            quota=QuotaSettings(daily_limit=10**8, minute_limit=10**8),
            rotation=RotationSettings(interval=0, drain_poll=0.02),
            openrouter=OpenRouterSettings(allowed_base_urls=(emu.base_url,),
                                          allow_http_loopback=True),
            metrics_listen="127.0.0.1:0", audit_file=str(tmp_path / "audit.jsonl")),
            clock=clock, tracer_provider=provider)
        await broker.start()
        await wait_until(lambda: broker.engine.ready)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{broker.port}")
        admin = pb_grpc.KeyAdminStub(channel)
        made = await admin.ProvisionKeys(pb.ProvisionKeysRequest(
            account=ACCOUNT, pool="free", count=5, base_url=emu.base_url), metadata=as_("admin"))
        assert len(made.key_ids) == 5

        alice: AsyncKeyBrokerClient = connect(broker, "alice")
        seen: set[str] = set()
        calls: list[tuple[str, int]] = []
        after_revoke: list[str] = []  # key ids of leases asked for once RevokeKey had returned
        completed: list[int] = []  # the state each Complete answered
        stop, revoke_done = asyncio.Event(), asyncio.Event()

        async def caller(http: httpx.AsyncClient) -> None:
            while not stop.is_set():
                asked_after = revoke_done.is_set()
                lease = await alice.lease_key("free")
                if asked_after:
                    after_revoke.append(lease.key_id)
                seen.add(lease.api_key)
                r = await http.post(f"{emu.base_url}/chat/completions",
                                    headers={"Authorization": f"Bearer {lease.api_key}"},
                                    json={"model": PAID, "messages": [
                                        {"role": "user", "content": "hi"}]})
                calls.append((lease.key_id, r.status_code))
                await alice.report_usage(lease.lease_id, r.status_code)
                completed.append((await alice.complete(lease.lease_id)).state)

        async def hold(key_id: str) -> Lease:
            """A lease on ``key_id``, held (others found on the way are completed unused)."""
            for _ in range(500):
                lease = await alice.lease_key("free", ttl=600)
                if lease.key_id == key_id:
                    return lease
                await alice.complete(lease.lease_id, used=False)
            raise AssertionError(f"no lease on {key_id}")

        revoked = ""
        started = time.monotonic()
        async with httpx.AsyncClient(limits=httpx.Limits(max_connections=CALLERS)) as http:
            workers = [asyncio.create_task(caller(http)) for _ in range(CALLERS)]
            current = list(made.key_ids)
            for round_ in range(2):
                for i, key_id in enumerate(list(current)):
                    await asyncio.sleep(0.3)
                    reply = await admin.RotateKey(pb.RotateKeyRequest(key_id=key_id),
                                                  metadata=as_("admin"))
                    current[i] = reply.new_key_id
                if round_ == 0:
                    revoked = current.pop(2)
                    held = await hold(revoked)
                    revocation = await admin.RevokeKey(
                        pb.RevokeKeyRequest(key_id=revoked, reason="leaked"),
                        metadata=as_("admin"))
                    revoke_done.set()
                    assert revocation.leases_ended >= 1, "at least the held lease"
                    assert revoked not in await broker.wiring.store.active_leases(clock.now())
                    with pytest.raises(LeaseNotActive, match="was revoked"):
                        await alice.renew(held.lease_id)
                    await alice.report_usage(held.lease_id, 200)
                    completed.append((await alice.complete(held.lease_id)).state)
            while time.monotonic() - started < LOAD_SECONDS:
                await asyncio.sleep(0.2)
            stop.set()
            await asyncio.gather(*workers)
        metrics = httpx.get(f"http://127.0.0.1:{broker.metrics_port}/metrics").text
        listing = str(await admin.ListKeys(pb.ListKeysRequest(), metadata=as_("admin")))
        await channel.close()
        await broker.stop(0)

        failed = [(k, status) for k, status in calls if status != 200]
        assert len(calls) > 100, "the callers really ran"
        assert after_revoke and revoked not in after_revoke
        # every lease the revocation ended was then completed (accepted) exactly once
        assert completed.count(pb.LEASE_STATE_REVOKED) == revocation.leases_ended
        assert all(k == revoked and status == 401 for k, status in failed), failed[:5]
        assert sorted(k.name for k in emu._keys.values() if not k.deleted
                      and not k.management) == sorted(provider_name(*k.split("/"))
                                                      for k in current)
        agree(emu, vault_admin)
        assert vault_admin.rotation_records() == []

        exported = "\n".join(s.to_json() for s in spans.get_finished_spans())
        assert "key.rotation.drain" in exported and "key.revoke" in exported
        [revoke_span] = [x for x in spans.get_finished_spans() if x.name == "key.revoke"]
        assert revoke_span.attributes["keybroker.leases_ended"] == revocation.leases_ended
        written = [log_lines.raw.getvalue(), (tmp_path / "audit.jsonl").read_text(), metrics,
                   listing, exported]
        written += [Path(p).read_bytes().decode("latin-1")
                    for p in glob.glob(str(tmp_path / "state.db*"))]
        assert "key.rotated" in written[0] and "key.revoked" in written[1]
        ended = [r for r in map(json.loads, written[1].splitlines())
                 if r["event"] == "key.leases_ended"]
        assert [r["leases_ended"] for r in ended] == [revocation.leases_ended]
        assert len(seen) >= 10, "leases came from old and new keys"
        for secret in [*seen, management]:
            for blob in written:
                assert secret not in blob


@pytest.fixture
def spawn(tmp_path: Path, bao: BaoDevServer, vault_settings: VaultSettings
          ) -> Iterator[tuple[object, dict[str, str]]]:
    """spawn(name) -> a ``keybroker serve`` subprocess on one SQLite file, resuming rotations
    every 0.3 s with a 1 s claim; and the environment a CLI run needs."""
    policy = tmp_path / "policy.toml"
    policy.write_text(POLICY)
    env = {**clean_environ(), "KEYBROKER_POLICY_FILE": str(policy),
           "KEYBROKER_STORE_SQLITE_PATH": str(tmp_path / "state.db"),
           "KEYBROKER_VAULT_ADDR": bao.addr, "KEYBROKER_VAULT_TOKEN": bao.root_token,
           "KEYBROKER_VAULT_KEY_PREFIX": vault_settings.key_prefix,
           "KEYBROKER_ROTATION_INTERVAL": "0.3", "KEYBROKER_ROTATION_CLAIM_SECONDS": "1",
           "KEYBROKER_ROTATION_DRAIN_POLL": "0.05", "KEYBROKER_LOG_FORMAT": "json"}
    started: list[BrokerProcess] = []

    def start(name: str, provider: str) -> BrokerProcess:
        """A broker that may send keys (and management keys) to ``provider`` only."""
        proc = BrokerProcess({**env, "KEYBROKER_OPENROUTER_ALLOWED_BASE_URLS": provider,
                              "KEYBROKER_OPENROUTER_ALLOW_HTTP_LOOPBACK": "true"},
                             name=name, port=free_port(),
                             log_path=tmp_path / f"{name}.log").start()
        started.append(proc)
        return proc

    yield start, {**clean_environ(), "KEYBROKER_TOKEN": TOKENS["admin"]}
    for proc in started:
        proc.stop()


async def test_a_broker_killed_mid_rotation_is_finished_by_the_next_one(
        spawn, vault_admin, tmp_path):
    """`keybroker keys rotate` against a broker killed (SIGKILL) while the old key drains
    fails; the restarted broker's rotation round finishes the rotation: the old key is deleted
    at the provider and from Vault, the replacement serves, and nothing is left half done."""
    start, cli_env = spawn
    async with Emulator() as emu:
        emu.add_account(ACCOUNT, credits=10, balance=1e6)
        vault_admin.put_management_key(ACCOUNT, emu.add_management_key(ACCOUNT))
        first = start("first", emu.base_url)
        await first.wait_serving()
        # The CLI runs while this event loop serves the emulator: an asyncio subprocess.
        provision = await asyncio.create_subprocess_exec(
            *keybroker_argv(), "keys", "provision", "--target", first.target, "--account",
            ACCOUNT, "--pool", "free", "--count", "2", "--base-url", emu.base_url,
            env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = (b.decode() for b in await provision.communicate())
        assert provision.returncode == 0, err
        key_ids = [line.split()[-1] for line in out.splitlines()]
        assert len(key_ids) == 2 and "sk-or-" not in out + err
        async with AsyncKeyBrokerClient(first.target, token=TOKENS["alice"]) as alice:
            held = await alice.lease_key("free", ttl=600)
        old = held.key_id
        rotate = await asyncio.create_subprocess_exec(
            *keybroker_argv(), "keys", "rotate", "--target", first.target, old,
            env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

        def step() -> str:
            records = vault_admin.rotation_records()
            return str(records[0]["step"]) if records else ""

        await wait_until(lambda: step() == "draining", timeout=30)
        first.kill9()
        err = (await asyncio.wait_for(rotate.communicate(), 30))[1].decode()
        assert rotate.returncode == 1 and "UNAVAILABLE" in err and "Traceback" not in err
        assert set(key_ids) <= {f"{p}/{n}" for p, n, _ in vault_admin.all_key_fields()}
        assert emu.is_live(held.api_key), "the old key serves its lease meanwhile"

        second = start("second", emu.base_url)
        await second.wait_serving()
        await asyncio.sleep(1.5)  # the killed run's claim lapses; the old key still drains
        assert step() == "draining"
        async with AsyncKeyBrokerClient(second.target, token=TOKENS["alice"]) as alice:
            await alice.report_usage(held.lease_id, 200)
            await alice.complete(held.lease_id)
            await wait_until(lambda: not vault_admin.rotation_records(), timeout=30)
            assert not emu.is_live(held.api_key)
            kept = {f"{p}/{n}" for p, n, _ in vault_admin.all_key_fields()}
            assert old not in kept and len(kept) == 2
            agree(emu, vault_admin)
            for _ in range(4):
                lease = await alice.lease_key("free")
                assert lease.key_id != old and emu.is_live(lease.api_key)
                await alice.complete(lease.lease_id, used=False)
        second.stop()
        written = [*glob.glob(str(tmp_path / "state.db*")), str(tmp_path / "first.log"),
                   str(tmp_path / "second.log")]
        assert all(os.path.exists(path) for path in written)
        for path in written:
            assert held.api_key.encode() not in Path(path).read_bytes()
