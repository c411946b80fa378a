"""The Python client: lease context managers, refunds, and named exceptions."""

from __future__ import annotations

import asyncio

import pytest
from keybroker_client import KeyBrokerClient, PermissionDenied, QuotaExhausted, Unauthenticated

from broker.config import QuotaSettings
from tests.support import TOKENS


async def account_usage(connect, broker) -> tuple[int, int]:
    info = (await connect(broker, "admin").list_keys("free"))[0]
    return info.account_used_today, info.active_leases


async def test_async_lease_block_completes_as_used(start_broker, put_keys, connect):
    """Leaving `async with client.lease()` normally completes the lease and keeps the charge."""
    put_keys("free", [("k1", "acct-a")])
    broker = await start_broker()
    client = connect(broker)
    async with client.lease("free") as lease:
        assert lease.api_key.startswith("sk-or-v1-test-")
        assert await account_usage(connect, broker) == (1, 1)
    assert await account_usage(connect, broker) == (1, 0)


async def test_async_lease_block_refunds_when_body_fails_before_use(start_broker, put_keys,
                                                                    connect):
    """An exception before the key was used completes with used=false and refunds the unit."""
    put_keys("free", [("k1", "acct-a")])
    broker = await start_broker()
    client = connect(broker)
    with pytest.raises(RuntimeError):
        async with client.lease("free"):
            raise RuntimeError("failed before calling the provider")
    assert await account_usage(connect, broker) == (0, 0)


async def test_async_lease_block_keeps_charge_when_body_fails_after_report(
        start_broker, put_keys, connect):
    """An exception after report() keeps the unit spent (the call went out)."""
    put_keys("free", [("k1", "acct-a")])
    broker = await start_broker()
    client = connect(broker)
    with pytest.raises(RuntimeError):
        async with client.lease("free") as lease:
            await lease.report(http_status=200, latency_ms=120, prompt_tokens=5)
            raise RuntimeError("failed while parsing the answer")
    assert await account_usage(connect, broker) == (1, 0)


async def test_quota_exhausted_is_a_named_exception_with_retry_after(start_broker, put_keys,
                                                                     connect):
    """Exhaustion raises QuotaExhausted with retry_after and violations, not grpc.RpcError."""
    put_keys("free", [("k1", "acct-a")])
    broker = await start_broker(quota=QuotaSettings(daily_limit=1, minute_limit=10))
    client = connect(broker)
    await client.lease_key("free")
    with pytest.raises(QuotaExhausted) as info:
        async with client.lease("free"):
            pass
    assert info.value.retry_after > 0 and info.value.violations


async def test_sync_client_lease_and_errors(start_broker, put_keys):
    """The blocking client leases, refunds on failure and raises named exceptions."""
    put_keys("free", [("k1", "acct-a")])
    broker = await start_broker()
    target = f"127.0.0.1:{broker.port}"

    def work() -> tuple[str, str, str]:
        with KeyBrokerClient(target, token=TOKENS["alice"]) as client:
            with client.lease("free") as lease:
                key_id = lease.key_id
            try:
                with client.lease("free"):
                    raise ValueError("boom")
            except ValueError:
                pass
            used = client.list_keys  # alice may not read admin data
            try:
                used("free")
            except PermissionDenied as exc:
                denied = exc.reason
            with KeyBrokerClient(target, token="kbt_unknown_token_value_000") as stranger:
                try:
                    stranger.lease_key("free")
                except Unauthenticated as exc:
                    unauth = exc.reason
        return key_id, denied, unauth

    key_id, denied, unauth = await asyncio.to_thread(work)
    assert (key_id, denied, unauth) == ("free/k1", "PERMISSION_DENIED", "UNAUTHENTICATED")
    info = (await asyncio.to_thread(
        lambda: KeyBrokerClient(target, token=TOKENS["admin"]).list_keys("free")))[0]
    assert info.account_used_today == 1


async def test_internal_route_needs_no_completion(start_broker, put_keys, connect):
    """An internal-route answer inside `lease()` yields route 'internal' and completes nothing."""
    put_keys("free", [("k1", "acct-a")])
    broker = await start_broker(quota=QuotaSettings(daily_limit=1, minute_limit=10))
    client = connect(broker)
    await client.lease_key("free")
    async with client.lease("free", allow_internal=True, priority="low") as lease:
        assert not lease.external and lease.internal_reason == "quota_exhausted"
