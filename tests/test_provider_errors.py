"""Provider budget, credit and upstream errors end to end (issue 17).

The OpenRouter emulator produces each error row of docs/openrouter.md; real brokers on
SQLite or on one Redis (two replicas: the error is reported through one, leases are
asked of the other); the Python OpenRouterClient reports what it saw. Every test ends
with service resuming by itself after the condition clears and no key disabled.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
from keybroker_client import OpenRouterClient, OpenRouterError, QuotaExhausted
from keybroker_client.v1 import keybroker_pb2 as pb
from rich.console import Console

from broker.clock import ManualClock, next_midnight
from broker.config import ModelPolicy, PoolSettings, QuotaSettings, StoreBackend, StoreSettings
from broker.status import render_status
from broker.testing import Emulator, RedisServer
from tests.support import T0

FREE = "meta-llama/llama-3.3-70b-instruct:free"
FREE2 = "z-ai/glm-4.5-air:free"
PAID = "openai/gpt-4o-mini"
HELLO = [{"role": "user", "content": "hello"}]
QUOTA = QuotaSettings(daily_limit=1000, minute_limit=1000)


class FlowingClock(ManualClock):
    """Real time from T0 on, plus whatever a test advances or sets (Retry-After waits are
    real; resets days ahead are stepped over)."""

    def __init__(self, start: float) -> None:
        super().__init__(start)
        self._t0 = time.monotonic()

    def now(self) -> float:
        return self._now + (time.monotonic() - self._t0)


@pytest.fixture
def clock() -> ManualClock:
    return FlowingClock(T0.timestamp())


@pytest.fixture(scope="module")
def shared_redis() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture
async def emu(clock: ManualClock) -> AsyncIterator[Emulator]:
    async with Emulator(clock=clock, seed=5) as emulator:
        yield emulator


@pytest.fixture(params=["sqlite", "redis"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def keys(emu: Emulator, put_keys: Callable[..., dict[str, str]]) -> Callable[..., None]:
    """keys([(name, account), ...]): the same secrets in Vault and in the emulator."""

    def add(specs: list[tuple[str, str]], pool: str = "free") -> None:
        secrets = put_keys(pool, specs, base_url=emu.base_url)
        for (name, account), secret in zip(specs, secrets.values(), strict=True):
            emu.add_key(account, secret, name=name)

    return add


@pytest.fixture
def brokers(start_broker: Any, backend: str, request: pytest.FixtureRequest) -> Any:
    """brokers() -> (A, B): one SQLite broker twice, or two replicas on one Redis."""

    async def make(**kw: Any) -> tuple[Any, Any]:
        kw.setdefault("quota", QUOTA)
        if backend == "sqlite":
            one = await start_broker(**kw)
            return one, one
        server: RedisServer = request.getfixturevalue("shared_redis")
        store = StoreSettings(backend=StoreBackend.REDIS, redis_url=server.url,
                              redis_prefix=f"kb{uuid.uuid4().hex[:8]}")
        return await start_broker(store=store, **kw), await start_broker(store=store, **kw)

    return make


async def status_text(broker: Any, connect: Any, now: float) -> str:
    """What ``keybroker status`` shows for this broker."""
    admin = connect(broker, "admin")
    console = Console(record=True, width=240)
    console.print(render_status(await admin.list_keys(), now, await admin.cooldowns()))
    return console.export_text()


def router(client: Any, clock: ManualClock, **kw: Any) -> OpenRouterClient:
    kw.setdefault("max_wait", 0.0)
    return OpenRouterClient(client, "free", clock=clock.now, **kw)


async def no_key_disabled(broker: Any, connect: Any) -> list[Any]:
    infos = await connect(broker, "admin").list_keys()
    assert infos and all(k.enabled and k.health != pb.KEY_HEALTH_DISABLED for k in infos), \
        [(k.key_id, k.health, k.health_reason) for k in infos]
    return infos


async def test_32_paid_callers_against_an_in_flight_budget_of_8_are_all_served(
        brokers, keys, connect, emu, clock):
    """32 concurrent paid calls on an account whose in-flight budget admits 8: every caller is
    served within Retry-After + 1 s of the burst, and no key is disabled."""
    keys([("a1", "acct-a"), ("a2", "acct-a")])
    emu.add_account("acct-a", credits=100, balance=100).in_flight_budget = 8
    emu.faults.latency = 0.15
    emu.faults.in_flight_retry_after = 1
    a, b = await brokers()
    routers = [router(connect(x), clock, max_wait=5.0, max_attempts=12, deadline=30.0)
               for x in (a, b)]
    for r in routers:  # connected before the burst: its clock is the provider's, not gRPC's
        warm = await r.broker.lease_key("free", PAID)
        await r.broker.complete(warm.lease_id, used=False)

    async def one(i: int) -> float:
        started = time.monotonic()
        await routers[i % 2].chat(HELLO, model=PAID)
        return time.monotonic() - started

    took = await asyncio.gather(*(one(i) for i in range(32)))
    for r in routers:
        await r.aclose()
    refused = [c for c in emu.calls if c.status == 402]
    assert refused, "the burst never hit the in-flight budget"
    assert max(took) <= emu.faults.in_flight_retry_after + 1.0, sorted(took)
    assert sum(c.status == 200 for c in emu.calls) == 32
    await no_key_disabled(a, connect)


async def test_weight_exceeds_budget_fails_the_request_only(brokers, keys, connect, emu, clock):
    """One request too big for the in-flight budget fails at once (402, no failover) and
    leaves every key and account healthy: the next, smaller request is served."""
    keys([("a1", "acct-a"), ("b1", "acct-b")])
    emu.add_account("acct-a", credits=100, balance=100)
    emu.add_account("acct-b", credits=100, balance=100)
    emu.faults.max_request_tokens = 100
    a, b = await brokers()
    async with router(connect(a), clock) as client:
        with pytest.raises(OpenRouterError) as info:
            await client.chat(HELLO, model=PAID, max_tokens=5000)
        assert info.value.status == 402 and len(info.value.attempts) == 1
    async with router(connect(b), clock) as client:
        for _ in range(4):
            assert (await client.chat(HELLO, model=PAID, max_tokens=10)).attempts[0].status == 200
    infos = await no_key_disabled(a, connect)
    assert all(k.health == pb.KEY_HEALTH_HEALTHY for k in infos)


async def test_a_spent_key_limit_cools_that_key_until_its_reset(brokers, keys, connect, emu,
                                                                clock):
    """A key whose own credit limit is spent answers 402 openrouter_key_limit: the client fails
    over, the key cools until the next 00:00 UTC (daily reset) on every replica, and serves
    again by itself after it."""
    keys([("a1", "acct-a"), ("b1", "acct-b")])
    emu.add_account("acct-a", credits=100, balance=100)
    emu.add_account("acct-b", credits=100, balance=100)
    emu.set_key_limit("a1", 0.0, "daily")
    a, b = await brokers()
    async with router(connect(a), clock) as client:
        results = [await client.chat(HELLO, model=PAID) for _ in range(3)]
    assert {r.account for r in results} == {"acct-b"}
    assert [c.status for c in emu.calls_with("a1")] == [402]
    info = await connect(b, "admin").get_key("free/a1")
    assert info.health == pb.KEY_HEALTH_COOLING_DOWN and info.enabled
    assert info.cooldown_until.ToSeconds() == next_midnight(clock.now())
    emu.set_key_limit("a1", 5.0, "daily")  # a new day's limit
    clock.set(next_midnight(clock.now()) + 1)
    async with router(connect(b), clock) as client:
        served = {(await client.chat(HELLO, model=PAID)).account for _ in range(4)}
    assert "acct-a" in served
    await no_key_disabled(a, connect)


async def test_a_probe_learns_a_weekly_key_limit_reset(start_broker, keys, connect, emu, clock):
    """When the 402 body lacks a reset time, a probe of /key moves the key's cooldown to its
    limit's next reset (weekly: the next Monday 00:00 UTC), and releases it once credit is
    left."""
    keys([("a1", "acct-a"), ("b1", "acct-b")])
    emu.add_account("acct-a", credits=100, balance=100)
    emu.add_account("acct-b", credits=100, balance=100)
    emu.set_key_limit("a1", 0.0, "weekly")
    broker = await start_broker(quota=QUOTA)
    async with router(connect(broker), clock) as client:
        for _ in range(2):
            await client.chat(HELLO, model=PAID)
    prober = broker.prober
    await prober.probe_all()
    info = await connect(broker, "admin").get_key("free/a1")
    monday = next_midnight(clock.now())
    while time.gmtime(monday).tm_wday != 0:
        monday += 86400
    assert info.health == pb.KEY_HEALTH_COOLING_DOWN
    assert info.cooldown_until.ToSeconds() == monday
    emu.set_key_limit("a1", 5.0, "weekly")  # raised: credit is left
    await prober.probe_all()
    info = await connect(broker, "admin").get_key("free/a1")
    assert info.health == pb.KEY_HEALTH_HEALTHY and info.enabled


async def test_out_of_credits_stops_paid_use_only_and_resumes(brokers, keys, connect, emu,
                                                              clock):
    """An account whose balance cannot pay stops paid leases (402 openrouter_credits) while
    its free models are still served; once it has credit, paid use resumes after the
    re-check by itself."""
    keys([("a1", "acct-a")])
    emu.add_account("acct-a", credits=10, balance=0)
    a, b = await brokers()
    async with router(connect(a), clock) as client:
        with pytest.raises((OpenRouterError, QuotaExhausted)):
            await client.chat(HELLO, model=PAID)
        assert [c.status for c in emu.calls] == [402]  # one call: the account is not retried
        assert (await client.chat(HELLO, model=FREE)).account == "acct-a"
    with pytest.raises(QuotaExhausted) as refused:
        await connect(b).lease_key("free", PAID)
    assert 0 < refused.value.retry_after <= 40
    assert any("no_credits" in v.description for v in refused.value.violations)
    text = await status_text(b, connect, clock.now())
    assert "paid use of account acct-a" in text and "out of credits for paid models" in text
    emu.add_account("acct-a", credits=10, balance=10)  # topped up
    clock.advance(40)  # past the re-check (health.circuit_seconds, jittered)
    async with router(connect(b), clock) as client:
        assert (await client.chat(HELLO, model=PAID)).account == "acct-a"
    await no_key_disabled(a, connect)


async def test_a_negative_balance_stops_free_use_too_and_resumes(brokers, keys, connect, emu,
                                                                 clock):
    """A negative balance makes even free models answer 402: the account stops entirely and
    the client fails over to another account; after the balance is positive the account
    serves again by itself."""
    keys([("a1", "acct-a"), ("b1", "acct-b")])
    emu.add_account("acct-a", credits=10, balance=-1)
    a, b = await brokers()
    async with router(connect(a), clock) as client:
        results = [await client.chat(HELLO, model=FREE) for _ in range(4)]
    assert {r.account for r in results} == {"acct-b"}
    assert [c.status for c in emu.calls_with("a1")] == [402]
    info = await connect(b, "admin").get_key("free/a1")
    assert info.health == pb.KEY_HEALTH_COOLING_DOWN and "negative_balance" in info.health_reason
    emu.add_account("acct-a", credits=10, balance=5)
    clock.advance(40)
    async with router(connect(b), clock) as client:
        served = {(await client.chat(HELLO, model=FREE)).account for _ in range(4)}
    assert "acct-a" in served
    await no_key_disabled(a, connect)


async def test_a_403_budget_cools_the_key_until_resets_at(brokers, keys, connect, emu, clock):
    """A 403 guardrail budget with resets_at cools that key until resets_at (the client fails
    over to another key); after resets_at the key serves again by itself."""
    keys([("a1", "acct-a"), ("b1", "acct-b")])
    resets_at = float(int(clock.now()) + 7200)
    emu.faults.budgets["a1"] = {"limit_source": "openrouter_guardrail_budget",
                                "resets_at": resets_at, "scope": "key"}
    a, b = await brokers()
    async with router(connect(a), clock) as client:
        results = [await client.chat(HELLO, model=FREE) for _ in range(3)]
    assert {r.account for r in results} == {"acct-b"}
    info = await connect(b, "admin").get_key("free/a1")
    assert info.health == pb.KEY_HEALTH_COOLING_DOWN and info.enabled
    assert info.cooldown_until.ToSeconds() == resets_at
    clock.set(resets_at + 1)
    async with router(connect(b), clock) as client:
        served = {(await client.chat(HELLO, model=FREE)).account for _ in range(4)}
    assert "acct-a" in served
    await no_key_disabled(a, connect)


async def test_an_upstream_429_cools_the_model_pool_wide_not_the_account(
        brokers, keys, connect, emu, clock):
    """An upstream provider's 429 cools the model for the whole pool (RetryInfo on every
    replica), no other account is spent on it, the account still serves other models, the
    client switches to the caller's fallback model, and the model serves again after."""
    keys([("a1", "acct-a"), ("b1", "acct-b"), ("c1", "acct-c")])
    emu.faults.upstream_rate_limited[FREE] = clock.now() + 30
    a, b = await brokers()
    async with router(connect(a), clock) as client:
        with pytest.raises((QuotaExhausted, OpenRouterError)):
            await client.chat(HELLO, model=FREE)
        switched = await client.chat(HELLO, model=FREE, models=[FREE2])
    assert switched.model == FREE2
    assert [c.status for c in emu.calls if c.model == FREE] == [429]
    with pytest.raises(QuotaExhausted) as refused:
        await connect(b).lease_key("free", FREE)
    assert 20 < refused.value.retry_after <= 31
    assert any("upstream_429" in v.description for v in refused.value.violations)
    internal = await connect(b).lease_key("free", FREE, allow_internal=True)
    assert (internal.route, internal.internal_reason) == ("internal", "model_cooling_down")
    infos = await no_key_disabled(a, connect)
    assert all(k.health == pb.KEY_HEALTH_HEALTHY for k in infos)  # no account cooled
    text = await status_text(b, connect, clock.now())
    assert f"model {FREE}" in text and "upstream provider rate-limited this model" in text
    clock.advance(31)
    async with router(connect(b), clock) as client:
        assert (await client.chat(HELLO, model=FREE)).model == FREE


async def test_a_429_chunk_mid_stream_is_reported_as_that_429(brokers, keys, connect, emu,
                                                              clock):
    """A stream that breaks with an in-band upstream 429 chunk raises it, is reported as a 429
    from that upstream provider (the model cools, not the account), never as a success."""
    keys([("a1", "acct-a")])
    emu.faults.stream_error_rate = 1.0
    emu.faults.stream_error_status = 429
    a, b = await brokers()
    async with router(connect(a), clock) as client:
        with pytest.raises(OpenRouterError) as info:
            async with client.stream(HELLO, model=FREE) as stream:
                async for _ in stream:
                    pass
    assert info.value.status == 429
    rows = await connect(a, "admin").usage(days=1, group_by=["model"])
    assert sum(r.failures for r in rows) == 1 and sum(r.requests for r in rows) == 1
    with pytest.raises(QuotaExhausted) as refused:
        await connect(b).lease_key("free", FREE)
    assert any("upstream_429" in v.description for v in refused.value.violations)
    assert (await connect(b).lease_key("free", FREE2)).account == "acct-a"
    emu.faults.stream_error_rate = 0.0
    clock.advance(5)
    async with router(connect(b), clock) as client:
        async with client.stream(HELLO, model=FREE) as stream:
            async for _ in stream:
                pass
        assert stream.result is not None
    await no_key_disabled(a, connect)


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_the_fault_endpoint_sets_every_row(brokers, emu, clock):
    """/_emulator/faults sets budgets, key limits, accounts, upstream limits and stream error
    codes (what tools and other languages' tests use)."""
    import httpx

    emu.add_account("acct-a", credits=10, balance=1)
    emu.add_key("acct-a", name="a1")
    async with httpx.AsyncClient() as http:
        url = f"http://{emu.host}:{emu.port}/_emulator/faults"
        r = await http.post(url, json={
            "key_limit": {"key": "a1", "limit": 1.5, "limit_reset": "monthly"},
            "account": {"name": "acct-a", "balance": -2, "in_flight_budget": 4},
            "upstream_rate_limited": {FREE: clock.now() + 60},
            "budgets": {"a1": {"limit_source": "openrouter_workspace_budget",
                               "resets_at": clock.now() + 60}},
            "stream_error_status": 429, "max_request_tokens": 50})
        assert r.status_code == 200, r.text
    assert emu.key_limit_remaining("a1") == 1.5
    assert emu.accounts["acct-a"].balance == -2 and emu.accounts["acct-a"].in_flight_budget == 4
    assert FREE in emu.faults.upstream_rate_limited and "a1" in emu.faults.budgets
    assert emu.faults.stream_error_status == 429 and emu.faults.max_request_tokens == 50


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_model_auto_moves_off_a_model_cooling_upstream(brokers, keys, connect, emu, clock):
    """With model="auto", an upstream 429 on the chosen model makes the broker pick another
    model while the first cools; the client's retry lands there without calling the first
    model again."""
    keys([("a1", "acct-a"), ("b1", "acct-b")])
    a, _ = await brokers(pools={"free": PoolSettings(model_policy=ModelPolicy.FREE_FIRST)})
    first = await connect(a).lease_key("free", "auto")  # the model auto picks
    await connect(a).complete(first.lease_id, used=False)
    emu.faults.upstream_rate_limited[first.model] = clock.now() + 30
    async with router(connect(a), clock, max_attempts=3) as client:
        result = await client.chat(HELLO, model="auto")
    assert [c.model for c in emu.calls].count(first.model) == 1  # once, then never again
    assert result.model != first.model and result.model.endswith(":free")
