"""OpenRouterClient against a real broker, real OpenBao and the OpenRouter emulator.

Every test ends by checking that the broker's count of each account's requests
today equals the emulator's.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from keybroker_client import KeyBrokerClient as SyncBrokerClient
from keybroker_client import (
    OpenRouterClient,
    OpenRouterError,
    QuotaExhausted,
    RouteInternal,
    SyncOpenRouterClient,
)
from keybroker_client.v1 import keybroker_pb2 as pb

from broker.clock import ManualClock, next_midnight
from broker.config import ModelPolicy, OpenRouterSettings, PoolSettings
from broker.testing import Emulator
from broker.testing.demo import run_demo
from tests.support import TOKENS

FREE = "meta-llama/llama-3.3-70b-instruct:free"
HELLO = [{"role": "user", "content": "hello"}]


@pytest.fixture
async def emu(clock: ManualClock) -> AsyncIterator[Emulator]:
    async with Emulator(clock=clock, seed=3) as emulator:
        yield emulator


@pytest.fixture
def keys(emu: Emulator, put_keys: Callable[..., dict[str, str]]) -> Callable[..., None]:
    """keys([(name, account), ...], **fields): the same secrets in Vault and in the emulator."""

    def add(specs: list[tuple[str, str]], pool: str = "free", **fields: Any) -> None:
        secrets = put_keys(pool, specs, base_url=emu.base_url, **fields)
        for (name, account), secret in zip(specs, secrets.values(), strict=True):
            emu.add_key(account, secret, name=name)

    return add


def router(client: Any, clock: ManualClock, **kw: Any) -> OpenRouterClient:
    return OpenRouterClient(client, "free", clock=clock.now, max_wait=0.0, **kw)


async def assert_counts_agree(broker: Any, connect: Any, emu: Emulator) -> None:
    """The broker's count of each account's requests today is the emulator's."""
    infos = await connect(broker, "admin").list_keys()
    broker_counts = {k.account: k.account_used_today for k in infos}
    assert broker_counts == {a: emu.free_requests_today(a) for a in broker_counts}


async def test_failover_across_accounts_on_a_provider_429(start_broker, keys, connect, emu,
                                                          clock):
    """An account the provider says is spent fails over to another; the broker believes it."""
    keys([("a1", "acct-a"), ("b1", "acct-b")])
    emu.use("acct-a", 50)  # spent behind the broker's back
    broker = await start_broker()
    async with router(connect(broker), clock) as client:
        results = [await client.chat(HELLO, model=FREE) for _ in range(4)]
    assert {r.account for r in results} == {"acct-b"}
    failed_over = [r for r in results if len(r.attempts) > 1]
    assert len(failed_over) == 1
    first = failed_over[0].attempts[0]
    assert (first.account, first.status, first.error_type) == ("acct-a", 429, "rate_limited")
    info = await connect(broker, "admin").get_key("free/a1")
    assert info.health == pb.KEY_HEALTH_COOLING_DOWN
    assert info.cooldown_until.ToSeconds() == next_midnight(clock.now())
    await assert_counts_agree(broker, connect, emu)


async def test_exhausting_every_account_ends_in_internal_route_until_midnight(
        start_broker, keys, connect, emu, clock):
    """After both accounts' 50, the client gets RouteInternal (or QuotaExhausted) until 00:00 UTC."""
    keys([("a1", "acct-a"), ("b1", "acct-b")])
    broker = await start_broker()
    caller = connect(broker)
    async with router(caller, clock, allow_internal=True) as client:
        for _ in range(100):
            assert (await client.chat(HELLO, model=FREE)).attempts[-1].status == 200
            clock.advance(3)  # 20 a minute: under each account's minute limit
        with pytest.raises(RouteInternal) as internal:
            await client.chat(HELLO, model=FREE)
    to_midnight = next_midnight(clock.now()) - clock.now()
    assert internal.value.reason == "quota_exhausted"
    assert internal.value.retry_after == pytest.approx(to_midnight, abs=0.01)
    async with router(caller, clock) as client:
        with pytest.raises(QuotaExhausted) as exhausted:
            await client.chat(HELLO, model=FREE)
    assert exhausted.value.retry_after == pytest.approx(to_midnight, abs=0.01)
    assert len(emu.calls) == 100
    await assert_counts_agree(broker, connect, emu)


async def test_revoked_key_is_disabled_by_its_probe_before_any_caller_hits_it(
        start_broker, keys, connect, emu, clock):
    """A key revoked at the provider is disabled by the first probe; no call ever uses it."""
    keys([("good", "acct-a"), ("revoked", "acct-b")])
    emu.revoke("revoked")
    broker = await start_broker(openrouter=OpenRouterSettings(probe_interval=0.2))
    admin = connect(broker, "admin")
    info = None

    async def disabled() -> bool:
        nonlocal info
        info = await admin.get_key("free/revoked")
        return info.health == pb.KEY_HEALTH_DISABLED

    for _ in range(250):
        if await disabled():
            break
        await asyncio.sleep(0.02)
    assert info is not None and info.health_reason == "probe_401"
    async with router(connect(broker), clock) as client:
        for _ in range(6):
            assert (await client.chat(HELLO, model=FREE)).key_id == "free/good"
    assert emu.calls_with("revoked") == []
    await assert_counts_agree(broker, connect, emu)


async def test_probe_reconciles_the_daily_count_with_the_provider(start_broker, keys, connect,
                                                                  emu, clock):
    """free_model_daily_requests from a probe sets the account's day count to the provider's."""
    keys([("a1", "acct-a")])
    emu.use("acct-a", 30)
    broker = await start_broker(openrouter=OpenRouterSettings(probe_interval=0.1))
    admin = connect(broker, "admin")
    for _ in range(250):
        if (await admin.get_key("free/a1")).account_used_today == 30:
            break
        await asyncio.sleep(0.02)
    assert (await admin.get_key("free/a1")).account_remaining_today == 20
    await assert_counts_agree(broker, connect, emu)


async def test_streamed_completion_passes_chunks_and_reports_usage(start_broker, keys, connect,
                                                                   emu, clock):
    """Chunks pass through as they come; the usage chunk's tokens reach ReportUsage."""
    keys([("a1", "acct-a")])
    broker = await start_broker()
    async with (router(connect(broker), clock) as client,
                client.stream(HELLO, model=FREE, max_tokens=4) as stream):
        chunks = [chunk async for chunk in stream]
    assert len([c for c in chunks if c.get("choices")]) == 5  # 4 words and the finish chunk
    assert stream.result is not None and len(stream.result.content.split()) == 4
    assert stream.usage["completion_tokens"] == 4
    rows = await connect(broker, "admin").usage(1, ["key"], "free")
    assert [(r.requests, r.prompt_tokens, r.completion_tokens) for r in rows] == [
        (1, stream.usage["prompt_tokens"], 4)]
    async with (router(connect(broker), clock) as client,
                client.stream(HELLO, model=FREE) as stream):
        async for _chunk in stream:
            break  # a caller may stop reading early: the lease is still settled
    assert stream.result is None
    await assert_counts_agree(broker, connect, emu)


async def test_in_band_stream_error_is_raised_and_reported(start_broker, keys, connect, emu,
                                                           clock):
    """An error chunk mid-stream raises OpenRouterError and is reported as a provider failure."""
    keys([("a1", "acct-a")])
    emu.faults.stream_error_rate = 1.0
    broker = await start_broker()
    async with router(connect(broker), clock) as client:
        with pytest.raises(OpenRouterError) as err:
            async with client.stream(HELLO, model=FREE) as stream:
                async for _chunk in stream:
                    pass
    assert err.value.status == 502 and err.value.error_type == "stream_error"
    rows = await connect(broker, "admin").usage(1, ["key"], "free")
    assert [(r.requests, r.failures) for r in rows] == [(1, 1)]
    await assert_counts_agree(broker, connect, emu)


async def test_outage_fails_over_within_max_attempts(start_broker, keys, connect, emu, clock):
    """Every call answering 503 ends after max_attempts with the provider's error, each reported."""
    keys([("a1", "acct-a"), ("b1", "acct-b")])
    emu.faults.outage = 503
    broker = await start_broker()
    async with router(connect(broker), clock, max_attempts=3) as client:
        with pytest.raises(OpenRouterError) as err:
            await client.chat(HELLO, model=FREE)
    assert err.value.status == 503 and len(err.value.attempts) == 3
    assert len({a.account for a in err.value.attempts}) == 2
    await assert_counts_agree(broker, connect, emu)


async def test_timeouts_fail_over_and_count(start_broker, keys, connect, emu, clock):
    """A provider call that times out is reported as no response and fails over; both count."""
    keys([("a1", "acct-a"), ("b1", "acct-b")])
    emu.faults.latency = 0.4
    broker = await start_broker()
    async with router(connect(broker), clock, max_attempts=2, timeout=0.1) as client:
        with pytest.raises(OpenRouterError) as err:
            await client.chat(HELLO, model=FREE)
    assert [(a.status, a.error_type) for a in err.value.attempts] == [(0, "timeout")] * 2
    await asyncio.sleep(0.5)  # let the emulator finish the abandoned calls
    await assert_counts_agree(broker, connect, emu)


async def test_model_auto_with_free_first(start_broker, keys, connect, emu, clock):
    """model="auto" picks a free model with tools; keys restricted to models are respected."""
    keys([("a1", "acct-a")])
    keys([("glm", "acct-b")], pool="glm", models=("z-ai/glm-4.5-air:free",))
    keys([("big", "acct-c")], pool="big")
    policy = PoolSettings(model_policy=ModelPolicy.FREE_FIRST, required_parameters=("tools",))
    broker = await start_broker(pools={
        "free": policy, "glm": policy,
        "big": dataclasses.replace(policy, min_context=150000)})
    async with router(connect(broker), clock) as client:
        result = await client.chat(HELLO, model="auto")
    assert result.model == FREE and emu.calls[-1].model == FREE
    admin = connect(broker, "admin")  # may lease from every pool
    glm = await admin.lease_key("glm", "auto")
    # No free model has tools and 150k context: the cheapest paid one that does.
    big = await admin.lease_key("big", "auto")
    assert (glm.model, big.model) == ("z-ai/glm-4.5-air:free", "anthropic/claude-3.5-haiku")
    for lease in (glm, big):
        await admin.complete(lease.lease_id, used=False)  # never called: refunded
    await assert_counts_agree(broker, connect, emu)


async def test_sync_client_chat_and_stream(start_broker, keys, connect, emu, clock):
    """SyncOpenRouterClient completes and streams like the async one."""
    keys([("a1", "acct-a")])
    broker = await start_broker()

    def run() -> tuple[str, list[dict[str, Any]]]:
        with SyncBrokerClient(f"127.0.0.1:{broker.port}", token=TOKENS["alice"]) as sync, \
                SyncOpenRouterClient(sync, "free", clock=clock.now, max_wait=0.0) as client:
            content = client.chat(HELLO, model=FREE).content
            with client.stream(HELLO, model=FREE, max_tokens=2) as stream:
                chunks = list(stream)
        return content, chunks

    content, chunks = await asyncio.to_thread(run)
    assert content.startswith("This is an emulated answer") and chunks
    assert len(emu.calls) == 2
    await assert_counts_agree(broker, connect, emu)


async def test_demo_fails_over_and_ends_with_counts_that_agree(vault_settings):
    """keybroker demo drives completions past every account's 50 and the counts agree."""
    lines: list[str] = []
    summary = await run_demo(requests=280, concurrency=4, vault=vault_settings,
                             echo=lines.append)
    assert summary.ok + summary.internal + summary.failed == 280 and summary.failed == 0
    assert summary.internal > 0 and summary.failed_over > 0 and summary.revoked_calls == 0
    assert all(broker == emu for _, broker, emu, _ in summary.accounts)
    assert summary.statuses[429] >= 1 and any("answered 429" in line for line in lines)
    assert any("probe_401" in line for line in lines)
