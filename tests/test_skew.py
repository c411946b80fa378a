"""Replicas on one Redis in the situations the chaos campaign found: clocks that disagree by a
second, a replica's cache behind what a peer wrote to the store."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from keybroker_client import QuotaExhausted

from broker.clock import ManualClock
from broker.config import QuotaSettings, StoreBackend, StoreSettings
from broker.runtime import Broker
from broker.testing import RedisServer
from tests.support import T0, make_settings, wait_until


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@contextlib.asynccontextmanager
async def replicas(tmp_path: Path, vault_settings, policy_file, redis_server: RedisServer,
                   quota: QuotaSettings, *clocks: ManualClock) -> AsyncIterator[list[Broker]]:
    """One broker per clock on one Redis (a fresh prefix), each ready; stopped at the end."""
    store = StoreSettings(backend=StoreBackend.REDIS, redis_url=redis_server.url,
                          redis_prefix=f"kb{uuid.uuid4().hex[:8]}", redis_timeout=5.0)
    brokers: list[Broker] = []
    try:
        for clock in clocks:
            b = Broker(make_settings(tmp_path, vault_settings, policy_file, store=store,
                                     quota=quota), clock=clock)
            brokers.append(b)
            await b.start()
        for b in brokers:
            await wait_until(lambda b=b: b.engine.ready)
        yield brokers
    finally:
        for b in brokers:
            await b.stop(0)


async def test_a_replica_ahead_does_not_wipe_the_window_a_replica_behind_still_charges(
        tmp_path: Path, vault_settings, policy_file, put_keys, connect, redis_server):
    """A replica 1.3 s ahead prunes right after its minute ends; one 0.3 s behind, still in that
    full minute, must keep refusing instead of granting the minute's quota a second time."""
    put_keys("free", [("a1", "acct-a")])
    quota = QuotaSettings(daily_limit=50, minute_limit=2)
    end = T0.timestamp() + 60.0  # T0 starts a minute
    ahead, behind = ManualClock(end - 5.0), ManualClock(end - 5.0)
    async with replicas(tmp_path, vault_settings, policy_file, redis_server, quota,
                        ahead, behind) as brokers:
        late = connect(brokers[1])
        for _ in range(2):
            await late.lease_key("free", ttl=600)
        with pytest.raises(QuotaExhausted):
            await late.lease_key("free")
        ahead.set(end + 1.0)
        behind.set(end - 0.3)
        await brokers[0].engine.sweep()  # the replica ahead: its minute has ended
        with pytest.raises(QuotaExhausted):
            await late.lease_key("free")


async def test_retry_info_of_a_cooling_key_uses_the_store_counts_not_a_stale_cache(
        tmp_path: Path, vault_settings, policy_file, put_keys, connect, redis_server):
    """A replica whose cache still shows a minute full (a peer refunded since) tells a caller
    refused by a 3 s cooldown to come back when the cooldown ends, not at the minute's end."""
    put_keys("free", [("a1", "acct-a")])
    quota = QuotaSettings(daily_limit=50, minute_limit=2)
    clock = ManualClock(T0.timestamp() + 10.0)  # 50 s before the minute ends
    async with replicas(tmp_path, vault_settings, policy_file, redis_server, quota,
                        clock, clock) as brokers:
        a, b = connect(brokers[0]), connect(brokers[1])
        first = await a.lease_key("free", ttl=600)
        second = await a.lease_key("free", ttl=600)
        await b.complete(first.lease_id, used=False)  # the store's minute has room again
        await a.report_usage(second.lease_id, 429,
                             ratelimit_reset_ms=int((clock.now() + 3.0) * 1000))
        with pytest.raises(QuotaExhausted) as info:
            await a.lease_key("free")
        assert info.value.retry_after <= 3.0 + 1.0


async def test_retry_info_follows_a_cooldown_a_peer_shortened(
        tmp_path: Path, vault_settings, policy_file, put_keys, connect, redis_server):
    """A 429 through one replica cools an account for 100 s; a later 429 through another, with
    a reset 3 s away, shortens it (the provider's latest word wins): the first replica, its
    cache still showing 100 s, tells the next caller 3 s, not the end of the other account's
    full minute, and grants on the account once those 3 s have passed."""
    put_keys("free", [("a1", "acct-a"), ("b1", "acct-b")])
    quota = QuotaSettings(daily_limit=50, minute_limit=3)
    clock = ManualClock(T0.timestamp() + 10.0)  # 50 s before the minute ends
    async with replicas(tmp_path, vault_settings, policy_file, redis_server, quota,
                        clock, clock) as brokers:
        a, b = connect(brokers[0]), connect(brokers[1])
        full = await a.lease_key("free", units=3, ttl=600)  # one account's minute is full
        first = await a.lease_key("free", ttl=600)
        second = await a.lease_key("free", ttl=600)
        other = first.account
        assert second.account == other != full.account
        await a.report_usage(first.lease_id, 429, retry_after=100.0)
        with pytest.raises(QuotaExhausted) as info:
            await a.lease_key("free")
        assert info.value.retry_after == pytest.approx(50.0, abs=1.0)  # the full minute's end
        await b.report_usage(second.lease_id, 429,
                             ratelimit_reset_ms=int((clock.now() + 3.0) * 1000))
        with pytest.raises(QuotaExhausted) as info:
            await a.lease_key("free")
        assert info.value.retry_after <= 3.0 + 0.01
        clock.advance(3.5)
        lease = await a.lease_key("free")
        assert lease.account == other
