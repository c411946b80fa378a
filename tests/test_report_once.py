"""ReportUsage is applied once per lease: a retried report answers the first answer and
changes nothing (health, statistics, counters, usage rows)."""

from __future__ import annotations

import pytest
from keybroker_client.v1 import keybroker_pb2 as pb

from broker.config import QuotaSettings

QUOTA = QuotaSettings(daily_limit=50, minute_limit=100)


async def test_a_retried_429_report_neither_doubles_the_backoff_nor_the_usage(
        start_broker, put_keys, connect, clock):
    """Reporting the same 429 (no reset) on one lease twice: one 60 s cooldown, one usage row
    request, and the retry gets the first answer."""
    put_keys("free", [("a1", "acct-a")])
    broker = await start_broker(quota=QUOTA)
    client = connect(broker)
    lease = await client.lease_key("free")
    first = await client.report_usage(lease.lease_id, 429, latency_ms=10)
    clock.advance(1)
    again = await client.report_usage(lease.lease_id, 429, latency_ms=10)
    assert again == first
    info = await connect(broker, "admin").get_key("free/a1")
    assert info.health == pb.KEY_HEALTH_COOLING_DOWN
    assert info.cooldown_until.ToMilliseconds() / 1000 - (clock.now() - 1) == pytest.approx(
        60, rel=0.11)
    rows = await connect(broker, "admin").usage(days=1, group_by=["key"])
    assert [(r.requests, r.failures) for r in rows] == [(1, 1)]


async def test_a_second_report_on_a_lease_does_not_change_its_key(start_broker, put_keys,
                                                                  connect):
    """A 200 reported first, then a 401 on the same lease: the first answer stands and the key
    stays healthy (one lease is one provider answer)."""
    put_keys("free", [("a1", "acct-a")])
    broker = await start_broker(quota=QUOTA)
    client = connect(broker)
    lease = await client.lease_key("free")
    first = await client.report_usage(lease.lease_id, 200, latency_ms=10)
    again = await client.report_usage(lease.lease_id, 401)
    assert again == first and again.health == pb.KEY_HEALTH_HEALTHY
    assert (await connect(broker, "admin").get_key("free/a1")).health == pb.KEY_HEALTH_HEALTHY
