"""Lease lifecycle: idempotency, refund, completion, renewal, expiry, ownership."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from keybroker_client import LeaseNotActive, NotFound, PermissionDenied, QuotaExhausted
from keybroker_client.v1 import keybroker_pb2 as pb

from broker.config import LeaseSettings, QuotaSettings
from tests.support import wait_until

QUOTA = QuotaSettings(daily_limit=10, minute_limit=100)


async def used_today(broker, connect, account="acct-a") -> int:
    keys = await connect(broker, "admin").list_keys("free")
    return next(k.account_used_today for k in keys if k.account == account)


async def test_same_request_id_returns_the_same_lease_charged_once(start_broker, put_keys,
                                                                   connect):
    """Retrying LeaseKey with the same request_id returns the same lease and charges once."""
    put_keys("free", [("k1", "acct-a"), ("k2", "acct-a")])
    broker = await start_broker(quota=QUOTA)
    client = connect(broker)
    first = await client.lease_key("free", request_id="req-1")
    again = await client.lease_key("free", request_id="req-1")
    assert (again.lease_id, again.key_id, again.api_key) == (first.lease_id, first.key_id,
                                                             first.api_key)
    assert await used_today(broker, connect) == 1


async def test_concurrent_retries_of_one_request_id_charge_once(start_broker, put_keys, connect):
    """Twenty concurrent LeaseKey calls with one request_id yield one lease and one unit."""
    put_keys("free", [("k1", "acct-a")])
    broker = await start_broker(quota=QUOTA)
    client = connect(broker)
    leases = await asyncio.gather(*(client.lease_key("free", request_id="same")
                                    for _ in range(20)))
    assert len({lease.lease_id for lease in leases}) == 1
    assert await used_today(broker, connect) == 1


async def test_request_id_is_scoped_to_the_principal(start_broker, put_keys, connect):
    """Two principals using the same request_id get two different leases."""
    put_keys("free", [("k1", "acct-a")])
    broker = await start_broker(quota=QUOTA)
    a = await connect(broker, "alice").lease_key("free", request_id="r")
    b = await connect(broker, "bob").lease_key("free", request_id="r")
    assert a.lease_id != b.lease_id
    assert await used_today(broker, connect) == 2


async def test_request_id_reused_for_another_pool_is_rejected(start_broker, put_keys, connect):
    """Reusing a request_id for a different pool is INVALID_ARGUMENT and charges nothing."""
    put_keys("free", [("k1", "acct-a")])
    put_keys("paid", [("p1", "acct-p")])
    broker = await start_broker(quota=QUOTA)
    client = connect(broker)
    await client.lease_key("free", request_id="r")
    with pytest.raises(Exception) as info:
        await client.lease_key("paid", request_id="r")
    assert info.value.code is grpc.StatusCode.INVALID_ARGUMENT
    paid = await connect(broker, "admin").list_keys("paid")
    assert paid[0].account_used_today == 0


async def test_replayed_request_id_after_exhaustion_still_returns_its_lease(
        start_broker, put_keys, connect):
    """A retry of a granted request succeeds even when the quota has run out since."""
    put_keys("free", [("k1", "acct-a")])
    broker = await start_broker(quota=QuotaSettings(daily_limit=1, minute_limit=10))
    client = connect(broker)
    first = await client.lease_key("free", request_id="only")
    with pytest.raises(QuotaExhausted):
        await client.lease_key("free")
    assert (await client.lease_key("free", request_id="only")).lease_id == first.lease_id


async def test_complete_unused_refunds_and_twice_is_harmless(start_broker, put_keys, connect):
    """Complete(used=false) refunds the units once; completing again changes nothing."""
    put_keys("free", [("k1", "acct-a")])
    broker = await start_broker(quota=QUOTA)
    client = connect(broker)
    lease = await client.lease_key("free", units=3)
    assert await used_today(broker, connect) == 3
    done = await client.complete(lease.lease_id, used=False)
    assert done.state == pb.LEASE_STATE_COMPLETED and done.refunded
    assert await used_today(broker, connect) == 0
    again = await client.complete(lease.lease_id, used=False)
    assert again.state == pb.LEASE_STATE_COMPLETED and again.refunded
    assert await used_today(broker, connect) == 0


async def test_complete_used_keeps_the_charge(start_broker, put_keys, connect):
    """Complete(used=true) and Complete without `used` both keep the units spent."""
    put_keys("free", [("k1", "acct-a")])
    broker = await start_broker(quota=QUOTA)
    client = connect(broker)
    one = await client.lease_key("free")
    two = await client.lease_key("free")
    assert not (await client.complete(one.lease_id, used=True)).refunded
    raw = await client.broker.Complete(pb.CompleteRequest(lease_id=two.lease_id),
                                       metadata=client._metadata)
    assert not raw.refunded
    assert await used_today(broker, connect) == 2


async def test_uncompleted_lease_expires_and_stays_charged(start_broker, put_keys, connect,
                                                           clock, log_lines):
    """A lease not completed by its TTL expires (audited), cannot be renewed and is not refunded."""
    put_keys("free", [("k1", "acct-a")])
    broker = await start_broker(quota=QUOTA)
    client = connect(broker)
    lease = await client.lease_key("free", ttl=5)
    clock.advance(6)
    await wait_until(lambda: any(line.get("event") == "lease.expired" for line in log_lines()))
    with pytest.raises(LeaseNotActive):
        await client.renew(lease.lease_id, ttl=30)
    done = await client.complete(lease.lease_id, used=False)
    assert done.state == pb.LEASE_STATE_EXPIRED and not done.refunded
    assert await used_today(broker, connect) == 1
    expired = [x for x in log_lines() if x.get("event") == "lease.expired"]
    assert expired[0]["lease_id"] == lease.lease_id and expired[0]["principal"] == "alice"


async def test_complete_after_ttl_before_sweep_counts_as_expired(start_broker, put_keys,
                                                                 connect, clock):
    """Completing after the TTL passed, even before the sweeper ran, gives no refund."""
    put_keys("free", [("k1", "acct-a")])
    broker = await start_broker(quota=QUOTA, lease=LeaseSettings(sweep_interval=3600))
    client = connect(broker)
    lease = await client.lease_key("free", ttl=5)
    clock.advance(5)
    done = await client.complete(lease.lease_id, used=False)
    assert done.state == pb.LEASE_STATE_EXPIRED and not done.refunded


async def test_renew_extends_the_lease(start_broker, put_keys, connect, clock):
    """RenewLease moves expires_at to now + ttl and keeps the lease alive past the old TTL."""
    put_keys("free", [("k1", "acct-a")])
    broker = await start_broker(quota=QUOTA, lease=LeaseSettings(sweep_interval=3600))
    client = connect(broker)
    lease = await client.lease_key("free", ttl=10)
    clock.advance(8)
    new_expiry = await client.renew(lease.lease_id, ttl=60)
    assert new_expiry.timestamp() == pytest.approx(clock.now() + 60, abs=0.01)
    clock.advance(20)
    done = await client.complete(lease.lease_id, used=False)
    assert done.state == pb.LEASE_STATE_COMPLETED and done.refunded


async def test_only_the_owner_may_renew_report_or_complete(start_broker, put_keys, connect):
    """Another principal gets PERMISSION_DENIED on renew, report and complete of my lease."""
    put_keys("free", [("k1", "acct-a")])
    broker = await start_broker(quota=QUOTA)
    lease = await connect(broker, "alice").lease_key("free")
    bob = connect(broker, "bob")
    for call in (bob.renew(lease.lease_id, ttl=30), bob.report_usage(lease.lease_id, 200),
                 bob.complete(lease.lease_id, used=False)):
        with pytest.raises(PermissionDenied):
            await call
    assert await used_today(broker, connect) == 1


async def test_unknown_lease_is_not_found(start_broker, put_keys, connect):
    """A well-formed lease id that was never issued is NOT_FOUND on every lease RPC."""
    put_keys("free", [("k1", "acct-a")])
    broker = await start_broker(quota=QUOTA)
    client = connect(broker)
    ghost = "ls_" + "0" * 32
    for call in (client.renew(ghost), client.report_usage(ghost, 200),
                 client.complete(ghost)):
        with pytest.raises(NotFound):
            await call
