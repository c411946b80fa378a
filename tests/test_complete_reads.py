"""Complete on the broker that granted the lease: one store call, the same answers."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from keybroker_client import PermissionDenied

from broker.config import LeaseSettings, StoreBackend, StoreSettings
from broker.testing import RedisServer


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


def _hgetall_calls(server: RedisServer) -> int:
    import redis

    stats = redis.Redis.from_url(server.url).info("commandstats")
    return int(stats.get("cmdstat_hgetall", {}).get("calls", 0))


async def test_complete_of_a_lease_granted_here_does_not_read_the_lease_again(
        redis_server, start_broker, put_keys, connect) -> None:
    """Completing a lease this broker granted makes no separate read of the lease on Redis
    (the ownership check uses what the grant recorded; the store's complete decides): the
    lease ends, refunded, and a second Complete changes nothing."""
    put_keys("free", [("k1", "acct-a")])
    broker = await start_broker(  # no sweep meanwhile: it reads health with HGETALL too
        store=StoreSettings(backend=StoreBackend.REDIS, redis_url=redis_server.url,
                            redis_prefix="cr"),
        lease=LeaseSettings(sweep_interval=3600.0))
    alice = connect(broker, "alice")
    lease = await alice.lease_key("free")
    before = _hgetall_calls(redis_server)
    done = await alice.complete(lease.lease_id, used=False)
    # one HGETALL: the one complete.lua returns the lease with; none before it
    assert _hgetall_calls(redis_server) == before + 1
    assert done.refunded
    again = await alice.complete(lease.lease_id, used=False)
    assert again.refunded  # the store's answer: already completed, refunded then


async def test_another_principal_may_not_complete_a_lease_granted_here(
        start_broker, put_keys, connect) -> None:
    """The ownership check still holds for a lease this broker granted: another principal's
    Complete is PERMISSION_DENIED and leaves the lease active for its owner."""
    put_keys("free", [("k1", "acct-a")])
    broker = await start_broker()
    lease = await connect(broker, "alice").lease_key("free")
    with pytest.raises(PermissionDenied, match="another principal"):
        await connect(broker, "bob").complete(lease.lease_id, used=False)
    done = await connect(broker, "alice").complete(lease.lease_id, used=True)
    assert not done.refunded
