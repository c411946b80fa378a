"""ReportUsage drives health and reconciles quota with what the provider says."""

from __future__ import annotations

import pytest
from keybroker_client import QuotaExhausted
from keybroker_client.v1 import keybroker_pb2 as pb

from broker.config import QuotaSettings

QUOTA = QuotaSettings(daily_limit=50, minute_limit=100)


async def key_info(broker, connect, key_id):
    return await connect(broker, "admin").get_key(key_id)


async def test_429_cools_the_account_until_the_reported_reset(start_broker, put_keys, connect,
                                                              clock):
    """A 429 with X-RateLimit-Reset cools every key of the account until that time."""
    put_keys("free", [("a1", "acct-a"), ("a2", "acct-a")])
    broker = await start_broker(quota=QUOTA)
    client = connect(broker)
    lease = await client.lease_key("free")
    reset_ms = int((clock.now() + 90) * 1000)
    health = await client.report_usage(lease.lease_id, 429, ratelimit_limit=20,
                                       ratelimit_remaining=0, ratelimit_reset_ms=reset_ms)
    assert health.health == pb.KEY_HEALTH_COOLING_DOWN
    assert health.cooldown_until.ToMilliseconds() == reset_ms
    with pytest.raises(QuotaExhausted) as info:
        await client.lease_key("free")
    assert info.value.retry_after == pytest.approx(90, abs=0.01)
    other = await key_info(broker, connect, "free/a2")
    assert other.health == pb.KEY_HEALTH_COOLING_DOWN
    clock.advance(90)
    assert (await client.lease_key("free")).account == "acct-a"


async def test_429_daily_limit_reconciles_the_counter(start_broker, put_keys, connect, clock):
    """A daily 429 saying 0 remaining sets the account's day counter to the full quota."""
    put_keys("free", [("a1", "acct-a")])
    broker = await start_broker(quota=QUOTA)
    client = connect(broker)
    lease = await client.lease_key("free")
    midnight_ms = int((clock.now() + 12 * 3600) * 1000)
    await client.report_usage(lease.lease_id, 429, ratelimit_limit=50, ratelimit_remaining=0,
                              ratelimit_reset_ms=midnight_ms)
    info = await key_info(broker, connect, "free/a1")
    assert info.account_used_today == 50
    assert info.account_remaining_today == 0


async def test_provider_remaining_is_believed_in_both_directions(start_broker, put_keys,
                                                                 connect, clock):
    """When the provider reports 30 left of 50, the broker's day counter becomes 20."""
    put_keys("free", [("a1", "acct-a")])
    broker = await start_broker(quota=QUOTA)
    client = connect(broker)
    lease = await client.lease_key("free")
    await client.report_usage(lease.lease_id, 429, ratelimit_limit=50, ratelimit_remaining=30,
                              ratelimit_reset_ms=int((clock.now() + 3600 * 12) * 1000))
    assert (await key_info(broker, connect, "free/a1")).account_used_today == 20


async def test_429_without_reset_backs_off_exponentially(start_broker, put_keys, connect, clock):
    """A 429 that names no reset cools down for 60 s, then 120 s on the next one (+-10% jitter)."""
    put_keys("free", [("a1", "acct-a")])
    broker = await start_broker(quota=QUOTA)
    client = connect(broker)
    lease = await client.lease_key("free")
    first = await client.report_usage(lease.lease_id, 429)
    assert 54 <= first.cooldown_until.ToSeconds() - clock.now() <= 66
    clock.advance(67)
    lease = await client.lease_key("free")
    second = await client.report_usage(lease.lease_id, 429)
    assert 108 <= second.cooldown_until.ToSeconds() - clock.now() <= 132


async def test_401_disables_the_key_until_an_operator_enables_it(start_broker, put_keys,
                                                                 connect, log_lines):
    """A 401 disables only that key; SetKeyEnabled(true) puts it back."""
    put_keys("free", [("bad", "acct-a"), ("good", "acct-b")])
    broker = await start_broker(quota=QUOTA)
    client = connect(broker)
    leases = [await client.lease_key("free") for _ in range(2)]
    bad = next(lease for lease in leases if lease.key_id == "free/bad")
    health = await client.report_usage(bad.lease_id, 401, error_type="invalid_key")
    assert health.health == pb.KEY_HEALTH_DISABLED
    assert {(await client.lease_key("free")).key_id for _ in range(4)} == {"free/good"}
    info = await key_info(broker, connect, "free/bad")
    assert (info.enabled, info.health, info.health_reason) == (False, pb.KEY_HEALTH_DISABLED,
                                                               "http_401")
    admin = connect(broker, "admin")
    back = await admin.set_key_enabled("free/bad", True, reason="key replaced")
    assert back.health == pb.KEY_HEALTH_HEALTHY and back.enabled
    assert "free/bad" in {(await client.lease_key("free")).key_id for _ in range(4)}
    events = [x for x in log_lines() if x.get("event") == "key.enabled"]
    assert events and events[0]["principal"] == "admin" and events[0]["reason"] == "key replaced"


async def test_402_stops_the_account_for_a_while_and_never_disables_the_key(
        start_broker, put_keys, connect):
    """A bare 402 (no reason) on a free model stops the account (negative balance) with a
    RetryInfo, and the key itself stays enabled and undisabled."""
    put_keys("free", [("k", "acct-a")])
    broker = await start_broker(quota=QUOTA)
    client = connect(broker)
    lease = await client.lease_key("free")
    assert (await client.report_usage(lease.lease_id, 402)).health == pb.KEY_HEALTH_COOLING_DOWN
    with pytest.raises(QuotaExhausted) as info:
        await client.lease_key("free")
    assert 0 < info.value.retry_after <= 700
    assert any("negative_balance" in v.description for v in info.value.violations)
    key = await connect(broker, "admin").get_key("free/k")
    assert key.enabled and key.health != pb.KEY_HEALTH_DISABLED


async def test_caller_errors_do_not_hurt_the_key(start_broker, put_keys, connect):
    """400 and 403 (moderation) are the caller's fault and leave the key healthy."""
    put_keys("free", [("k", "acct-a")])
    broker = await start_broker(quota=QUOTA)
    client = connect(broker)
    for status in (400, 403, 400, 403, 400, 403):
        lease = await client.lease_key("free")
        assert (await client.report_usage(lease.lease_id, status)).health == \
            pb.KEY_HEALTH_HEALTHY


async def test_repeated_5xx_open_the_circuit_and_it_recovers(start_broker, put_keys, connect,
                                                             clock):
    """Five 5xx/timeouts in a row open the circuit; after the backoff one probe lease goes out."""
    put_keys("free", [("k", "acct-a")])
    broker = await start_broker(quota=QUOTA)
    client = connect(broker)
    results = []
    for status in (502, 503, 0, 408, 500):
        lease = await client.lease_key("free")
        results.append((await client.report_usage(lease.lease_id, status,
                                                  error_type="timeout" if not status else ""
                                                  )).health)
    assert results[:4] == [pb.KEY_HEALTH_HEALTHY] * 4
    assert results[4] == pb.KEY_HEALTH_CIRCUIT_OPEN
    with pytest.raises(QuotaExhausted) as info:
        await client.lease_key("free")
    assert 27 <= info.value.retry_after <= 33
    clock.advance(34)
    probe = await client.lease_key("free")
    with pytest.raises(QuotaExhausted):
        await client.lease_key("free")  # only one probe while the circuit is half-open
    assert (await client.report_usage(probe.lease_id, 200)).health == pb.KEY_HEALTH_HEALTHY
    assert (await client.lease_key("free")).key_id == "free/k"


async def test_failed_probe_reopens_with_longer_backoff(start_broker, put_keys, connect, clock):
    """A probe that fails reopens the circuit for about twice as long."""
    put_keys("free", [("k", "acct-a")])
    broker = await start_broker(quota=QUOTA)
    client = connect(broker)
    for _ in range(5):
        await client.report_usage((await client.lease_key("free")).lease_id, 503)
    clock.advance(34)
    probe = await client.lease_key("free")
    health = await client.report_usage(probe.lease_id, 503)
    assert health.health == pb.KEY_HEALTH_CIRCUIT_OPEN
    info = await connect(broker, "admin").get_key("free/k")
    assert 54 <= info.cooldown_until.ToSeconds() - clock.now() <= 66


async def test_unreported_probe_does_not_keep_the_circuit_open_forever(start_broker, put_keys,
                                                                       connect, clock):
    """When a probe lease is never reported on, another probe is allowed after the timeout."""
    put_keys("free", [("k", "acct-a")])
    broker = await start_broker(quota=QUOTA)
    client = connect(broker)
    for _ in range(5):
        await client.report_usage((await client.lease_key("free")).lease_id, 500)
    clock.advance(34)
    await client.lease_key("free")  # the probe, never reported
    with pytest.raises(QuotaExhausted):
        await client.lease_key("free")
    clock.advance(61)
    assert (await client.lease_key("free")).key_id == "free/k"


async def test_health_transitions_are_audited(start_broker, put_keys, connect, log_lines):
    """Each change of a key's health state writes a key.health audit record."""
    put_keys("free", [("k", "acct-a")])
    broker = await start_broker(quota=QUOTA)
    client = connect(broker)
    await client.report_usage((await client.lease_key("free")).lease_id, 401)
    records = [x for x in log_lines() if x.get("event") == "key.health"]
    assert records[-1]["decision"] == "disabled" and records[-1]["previous"] == "healthy"
    assert records[-1]["key_id"] == "free/k" and records[-1]["reason"] == "http_401"


async def test_allow_internal_routes_internally_instead_of_failing(start_broker, put_keys,
                                                                   connect, clock):
    """With allow_internal, an exhausted pool answers ROUTE_INTERNAL with a reason and no key."""
    put_keys("free", [("k", "acct-a")])
    broker = await start_broker(quota=QuotaSettings(daily_limit=1, minute_limit=10))
    client = connect(broker)
    await client.lease_key("free")
    lease = await client.lease_key("free", allow_internal=True)
    assert lease.route == "internal" and lease.internal_reason == "quota_exhausted"
    assert lease.api_key == "" and lease.lease_id == ""
    assert lease.retry_after == pytest.approx(12 * 3600, abs=0.01)


async def test_all_keys_disabled_is_reported_as_unhealthy(start_broker, put_keys, connect):
    """When every key is disabled the internal route says ALL_KEYS_UNHEALTHY."""
    put_keys("free", [("k", "acct-a")])
    broker = await start_broker(quota=QUOTA)
    await connect(broker, "admin").set_key_enabled("free/k", False, reason="maintenance")
    lease = await connect(broker).lease_key("free", allow_internal=True)
    assert lease.internal_reason == "all_keys_unhealthy"


async def test_usage_reports_are_accepted_after_expiry(start_broker, put_keys, connect, clock):
    """A report on an expired lease is still recorded (the call may have ended after the TTL)."""
    put_keys("free", [("k", "acct-a")])
    broker = await start_broker(quota=QUOTA)
    client = connect(broker)
    lease = await client.lease_key("free", ttl=2)
    clock.advance(5)
    health = await client.report_usage(lease.lease_id, 401)
    assert health.health == pb.KEY_HEALTH_DISABLED
