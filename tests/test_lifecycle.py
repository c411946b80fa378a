"""Provision, rotate and revoke provider keys through the management API (real OpenBao, the
OpenRouter emulator, a real broker over gRPC)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import httpx
import pytest
from keybroker_client import AsyncKeyBrokerClient, Lease, LeaseNotActive
from keybroker_client.v1 import keybroker_pb2 as pb

from broker.clock import ManualClock
from broker.config import OpenRouterSettings, PoolSettings, QuotaSettings, RotationSettings
from broker.lifecycle import provider_name
from broker.runtime import Broker
from broker.testing import Emulator
from broker.vault import VaultAdmin
from tests.support import TOKENS, wait_until

PAID = "openai/gpt-4o-mini"
ACCOUNT = "acct-a"


def as_(who: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {TOKENS[who]}"),)


@dataclass
class Stack:
    emu: Emulator
    broker: Broker
    vault: VaultAdmin
    admin: Any  # KeyAdminStub
    alice: AsyncKeyBrokerClient
    clock: ManualClock

    async def provision(self, count: int, **fields: Any) -> list[str]:
        reply = await self.admin.ProvisionKeys(pb.ProvisionKeysRequest(
            account=ACCOUNT, pool="free", count=count, base_url=self.emu.base_url, **fields),
            metadata=as_("admin"))
        return list(reply.key_ids)

    async def rotate(self, key_id: str) -> str:
        reply = await self.admin.RotateKey(pb.RotateKeyRequest(key_id=key_id, reason="test"),
                                           metadata=as_("admin"))
        assert reply.old_key_id == key_id
        return str(reply.new_key_id)

    def vault_hashes(self) -> dict[str, str]:
        """key id -> provider hash of every key in Vault."""
        return {f"{p}/{n}": str(f.get("provider_hash")) for p, n, f in
                self.vault.all_key_fields()}

    def provider_keys(self) -> dict[str, str]:
        """provider name -> hash of the account's keys the provider still has."""
        keys = self.emu._keys.values()
        return {k.name: k.hash for k in keys
                if k.account == ACCOUNT and not k.management and not k.deleted}

    def agree(self) -> None:
        """Vault and the provider hold exactly the same keys."""
        assert self.provider_keys() == {provider_name(*kid.split("/")): h
                                        for kid, h in self.vault_hashes().items()}

    async def call(self, lease_api_key: str) -> int:
        async with httpx.AsyncClient() as http:
            r = await http.post(f"{self.emu.base_url}/chat/completions",
                                headers={"Authorization": f"Bearer {lease_api_key}"},
                                json={"model": PAID, "messages": [{"role": "user",
                                                                   "content": "hi"}]})
            return r.status_code


@pytest.fixture
async def stack(start_broker, vault_admin: VaultAdmin, clock: ManualClock,
                connect) -> AsyncIterator[Callable[..., Awaitable[Stack]]]:
    emus: list[Emulator] = []

    async def make(**overrides: Any) -> Stack:
        emu = await Emulator(clock=clock).start()
        emus.append(emu)
        emu.add_account(ACCOUNT, credits=10, balance=1e6)
        vault_admin.put_management_key(ACCOUNT, emu.add_management_key(ACCOUNT))
        overrides.setdefault("rotation", RotationSettings(interval=0, drain_poll=0.02))
        overrides.setdefault("openrouter", OpenRouterSettings(
            allowed_base_urls=(*OpenRouterSettings().allowed_base_urls, emu.base_url),
            allow_http_loopback=True))
        broker = await start_broker(
            quota=QuotaSettings(daily_limit=10**8, minute_limit=10**8), **overrides)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{broker.port}")
        from keybroker_client.v1 import keybroker_pb2_grpc as pb_grpc

        return Stack(emu, broker, vault_admin, pb_grpc.KeyAdminStub(channel),
                     connect(broker, "alice"), clock)

    yield make
    for emu in emus:
        await emu.stop()


async def test_provision_creates_keys_at_the_provider_and_in_vault_only(stack):
    """ProvisionKeys creates keys at the provider, stores them in Vault (never answering a
    secret), and the broker leases them at once."""
    s = await stack()
    made = await s.provision(2, limit=5.0, limit_reset="daily")
    assert len(made) == 2 and all(k.startswith("free/acct-a-") for k in made)
    s.agree()
    lease = await s.alice.lease_key("free")
    assert lease.key_id in made
    assert await s.call(lease.api_key) == 200
    assert lease.api_key not in str(await s.admin.ListKeys(pb.ListKeysRequest(),
                                                          metadata=as_("admin")))
    info = (await s.admin.GetKey(pb.GetKeyRequest(key_id=made[0]), metadata=as_("admin"))).key
    assert info.created_at.ToSeconds() == int(s.clock.now())
    assert not info.HasField("next_rotation_at")  # no max age, no expiry: never
    created = [k for k in s.emu._keys.values() if not k.management]
    assert {k.limit for k in created} == {5.0} and {k.limit_reset for k in created} == {"daily"}


async def test_rotation_waits_for_active_leases_then_deletes_the_old_key(stack):
    """RotateKey stores the replacement, stops new leases on the old key at once, waits for
    its active lease to complete, then deletes it at the provider and from Vault."""
    s = await stack()
    [old] = await s.provision(1)
    held = await s.alice.lease_key("free")
    assert held.key_id == old
    rotation = asyncio.create_task(s.rotate(old))
    await wait_until(lambda: len(s.vault_hashes()) == 2)
    await wait_until(lambda: s.broker.engine._registry.keys.keys() == set(s.vault_hashes()))
    for _ in range(5):  # no new lease on the old key while it drains
        lease = await s.alice.lease_key("free")
        assert lease.key_id != old
        assert await s.call(lease.api_key) == 200
        await s.alice.complete(lease.lease_id)
    await asyncio.sleep(0.2)
    assert not rotation.done(), "the rotation waits for the active lease"
    assert await s.call(held.api_key) == 200, "the old key serves until its lease ends"
    await s.alice.report_usage(held.lease_id, 200)
    await s.alice.complete(held.lease_id)
    new = await asyncio.wait_for(rotation, 10)
    assert new != old and set(s.vault_hashes()) == {new}
    assert await s.call(held.api_key) == 401, "the old key is gone at the provider"
    s.agree()
    lease = await s.alice.lease_key("free")
    assert lease.key_id == new and await s.call(lease.api_key) == 200


async def test_revoke_stops_leases_at_once_and_keeps_accounting(stack, log_lines):
    """RevokeKey disables a leaked key at once, ends its active leases (renewal refused
    FAILED_PRECONDITION saying the key was revoked, a request_id replay hands out no secret),
    deletes it at the provider and from Vault, and audits how many leases it ended; ReportUsage
    and Complete (used or unused) on those leases are still accepted and counted, no refund,
    and the other key's leases go on."""
    s = await stack()
    keys = await s.provision(2)
    held: list[Lease] = []
    while {lease.key_id for lease in held} != set(keys):  # leases on both keys
        held.append(await s.alice.lease_key("free", request_id=f"r{len(held)}", ttl=600))
    leaked = held[0].key_id
    mine = [(i, lease) for i, lease in enumerate(held) if lease.key_id == leaked]
    others = [lease for lease in held if lease.key_id != leaked]
    reply = await s.admin.RevokeKey(pb.RevokeKeyRequest(key_id=leaked, reason="leaked"),
                                    metadata=as_("admin"))
    assert reply.provider_deleted and reply.leases_ended == len(mine)
    assert await s.call(held[0].api_key) == 401
    assert set(s.vault_hashes()) == set(keys) - {leaked}
    s.agree()
    for _ in range(4):
        assert (await s.alice.lease_key("free")).key_id != leaked
    for i, lease in mine:
        with pytest.raises(LeaseNotActive) as refused:
            await s.alice.renew(lease.lease_id)
        assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert f"its key {leaked} was revoked" in refused.value.message
        with pytest.raises(LeaseNotActive) as replayed:
            await s.alice.lease_key("free", request_id=f"r{i}", ttl=600)
        assert "revoked" in replayed.value.message
        assert lease.api_key not in refused.value.message + replayed.value.message
    for lease in others:
        await s.alice.renew(lease.lease_id)
    async def account_used() -> int:
        got = await s.admin.GetKey(pb.GetKeyRequest(key_id=others[0].key_id),
                                   metadata=as_("admin"))
        return int(got.key.account_used_today)

    used_before = await account_used()
    s.clock.advance(120)  # past the report grace after the revocation, not after the expiry
    await s.alice.report_usage(mine[0][1].lease_id, 200, prompt_tokens=7)
    done = await s.alice.complete(mine[0][1].lease_id)
    assert (done.state, done.refunded) == (pb.LEASE_STATE_REVOKED, False)
    for _, lease in mine[1:]:
        done = await s.alice.complete(lease.lease_id, used=False)
        assert (done.state, done.refunded) == (pb.LEASE_STATE_REVOKED, False)
    assert await account_used() == used_before, "no refund"
    usage = await s.admin.GetUsage(pb.GetUsageRequest(days=1, group_by=[pb.USAGE_DIMENSION_KEY]),
                                   metadata=as_("admin"))
    assert [(r.group[0], r.requests, r.prompt_tokens) for r in usage.rows] == [(leaked, 1, 7)]
    ended = [line for line in log_lines() if line["event"] == "key.leases_ended"]
    assert [(x["key_id"], x["leases_ended"]) for x in ended] == [(leaked, len(mine))]


async def test_a_failed_rotation_alerts_and_the_next_run_finishes_it(stack):
    """A provider 500 mid-rotation fails RotateKey UNAVAILABLE and fires the rotation_failed
    alert; the next run resumes from the record, finishes, and the alert resolves."""
    s = await stack()
    [old] = await s.provision(1)
    s.emu.management_failures = 1  # the create call answers 500
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await s.rotate(old)
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    fired, _ = await s.broker.alerts.evaluate()
    assert [(a.rule, a.subject) for a in fired] == [("rotation_failed", old)]
    assert len(s.vault.rotation_records()) == 1
    assert set(s.vault_hashes()) == {old}, "nothing changed but the record"
    assert s.broker.wiring.lifecycle is not None
    [result] = await s.broker.wiring.lifecycle.run_schedule()
    assert result.done and set(s.vault_hashes()) == {result.new_key_id}
    assert s.vault.rotation_records() == []
    s.agree()
    _, resolved = await s.broker.alerts.evaluate()
    assert [(a.rule, a.subject) for a in resolved] == [("rotation_failed", old)]


async def test_a_provider_key_left_by_a_killed_run_is_deleted_not_kept(stack):
    """A run killed after the provider created the replacement but before Vault stored it
    left a provider key whose secret is lost: the next run deletes it and creates another."""
    s = await stack()
    [old] = await s.provision(1)
    pool, name = old.split("/")
    fields = s.vault.key_fields(pool, name)
    s.vault.save_rotation(pool, name, {"pool": pool, "name": name, "new_name": "repl-000001",
                                       "account": ACCOUNT, "step": "creating",
                                       "old_hash": fields["provider_hash"],
                                       "started_at": s.clock.now(), "reason": "test"}, 0)
    async with httpx.AsyncClient() as http:  # the killed run's POST
        mgmt = s.vault.management_key(ACCOUNT).reveal()
        r = await http.post(f"{s.emu.base_url}/keys", headers={"Authorization": f"Bearer {mgmt}"},
                            json={"name": provider_name(pool, "repl-000001")})
        orphan = r.json()["key"]
    assert s.broker.wiring.lifecycle is not None
    [result] = await s.broker.wiring.lifecycle.run_schedule()
    assert result.new_key_id == "free/repl-000001"
    assert not s.emu.is_live(orphan)
    s.agree()
    lease = await s.alice.lease_key("free")
    assert lease.key_id == "free/repl-000001" and await s.call(lease.api_key) == 200


async def test_schedule_rotates_by_age_and_before_provider_expiry(stack):
    """The rotation round rotates a key older than its pool's rotation_max_age_days and a key
    within rotation.expiry_margin_days of its expires_at, and leaves the others alone."""
    s = await stack(pools={"free": PoolSettings(rotation_max_age_days=30)},
                    rotation=RotationSettings(interval=3600, drain_poll=0.02,
                                              expiry_margin_days=7))
    [aged] = await s.provision(1)
    s.clock.advance(20 * 86400)
    expiring = (await s.provision(1, expires_in={"seconds": 9 * 86400}))[0]
    young = (await s.provision(1))[0]
    info = (await s.admin.GetKey(pb.GetKeyRequest(key_id=expiring),
                                 metadata=as_("admin"))).key
    assert info.next_rotation_at.ToSeconds() == int(s.clock.now() + 2 * 86400)
    lifecycle = s.broker.wiring.lifecycle
    assert lifecycle is not None
    assert await lifecycle.run_schedule() == []
    s.clock.advance(3 * 86400)  # expiring is now within 7 days of its expiry
    [first] = await lifecycle.run_schedule()
    assert first.old_key_id == expiring
    replacement = s.emu._key(provider_name(*first.new_key_id.split("/")))
    assert replacement.expires_at == s.clock.now() + 9 * 86400, "the same lifetime"
    s.clock.advance(8 * 86400)  # aged is 31 days old; the replacement 1 day from its margin
    assert {r.old_key_id for r in await lifecycle.run_schedule()} == {aged, first.new_key_id}
    assert young in s.vault_hashes()
    s.agree()


async def test_status_shows_age_and_next_rotation(stack):
    """keybroker status renders each managed key's age and when it is rotated next."""
    from rich.console import Console

    from broker.status import render_status

    s = await stack(pools={"free": PoolSettings(rotation_max_age_days=30)},
                    rotation=RotationSettings(interval=3600))
    [key] = await s.provision(1)
    s.clock.advance(2 * 86400)
    keys = (await s.admin.ListKeys(pb.ListKeysRequest(pool="free"), metadata=as_("admin"))).keys
    console = Console(width=200, record=True)
    console.print(render_status(keys, s.clock.now()))
    text = console.export_text()
    assert "2.0d" in text and "in 28.0d" in text and key.split("/")[1] in text


async def test_rotating_a_key_put_by_hand_is_refused_and_changes_nothing(stack, put_keys):
    """A key put in Vault by hand has no provider hash: RotateKey is INVALID_ARGUMENT, and a
    key of a pool the caller may not rotate is PERMISSION_DENIED."""
    s = await stack()
    put_keys("free", [("byhand", ACCOUNT)])
    await s.broker.engine.reload_keys()
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await s.rotate("free/byhand")
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.aio.AioRpcError) as denied:
        await s.admin.RotateKey(pb.RotateKeyRequest(key_id="free/byhand"), metadata=as_("alice"))
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert s.vault.rotation_records() == []
    assert (await s.alice.lease_key("free")).key_id == "free/byhand"


async def test_the_broker_and_lifecycle_policies_are_enough_to_rotate(stack, bao,
                                                                      vault_settings):
    """A broker whose Vault token holds only the broker and lifecycle policies written by
    `vault bootstrap` provisions and rotates keys (least privilege is enough)."""
    import dataclasses

    import hvac

    from broker.vault import VaultSession

    root = VaultAdmin(VaultSession(vault_settings))
    root.bootstrap()  # the policies for this test's key prefix
    token = hvac.Client(url=bao.addr, token=bao.root_token).auth.token.create(
        policies=[VaultAdmin.BROKER_POLICY, VaultAdmin.LIFECYCLE_POLICY], ttl="10m",
    )["auth"]["client_token"]
    s = await stack(vault=dataclasses.replace(vault_settings, token=token))
    [old] = await s.provision(1)
    new = await s.rotate(old)
    assert set(s.vault_hashes()) == {new}
    s.agree()


async def test_provision_sends_the_management_key_only_to_an_allowed_host(stack):
    """ProvisionKeys naming a base_url outside openrouter.allowed_base_urls is INVALID_ARGUMENT,
    and a listener at that URL receives no connection (the management key never leaves)."""
    import socket

    s = await stack()
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.setblocking(False)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/api/v1"
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await s.admin.ProvisionKeys(pb.ProvisionKeysRequest(
                account=ACCOUNT, pool="free", count=1, base_url=url), metadata=as_("admin"))
        assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "allowed_base_urls" in (info.value.details() or "")
        with pytest.raises(BlockingIOError):
            listener.accept()  # nobody connected
