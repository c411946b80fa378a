"""The minute-reset rule of a 429: only a reset at the end of the current minute means the
minute window; a reset mid-minute is a cooldown until that reset (docs/design.md, "Health")."""

from __future__ import annotations

import pytest
from keybroker_client import QuotaExhausted

from broker.config import QuotaSettings

QUOTA = QuotaSettings(daily_limit=50, minute_limit=20)


@pytest.mark.parametrize("second", [0.5, 7.9, 20.0, 44.25, 55.5])
async def test_a_reset_mid_minute_is_a_cooldown_until_that_reset(start_broker, put_keys,
                                                                 connect, clock, second):
    """A 429 with 0 remaining and a reset 3 s ahead, mid-minute: refused until the reset
    (RetryInfo to it), granted 1 s after it in the same minute."""
    put_keys("free", [("a1", "acct-a")])
    broker = await start_broker(quota=QUOTA)
    client = connect(broker)
    clock.advance(second)  # T0 is the start of a minute
    lease = await client.lease_key("free")
    reset = clock.now() + 3.0
    await client.report_usage(lease.lease_id, 429, ratelimit_limit=20, ratelimit_remaining=0,
                              ratelimit_reset_ms=int(reset * 1000))
    await client.complete(lease.lease_id)
    with pytest.raises(QuotaExhausted) as info:
        await client.lease_key("free")
    assert info.value.retry_after == pytest.approx(3.0, abs=0.01)
    clock.advance(4.0)
    granted = await client.lease_key("free")
    assert granted.account == "acct-a"


@pytest.mark.parametrize("second", [30.0, 50.0, 58.0])
async def test_a_reset_at_the_end_of_the_minute_fills_the_minute_window(start_broker, put_keys,
                                                                        connect, clock, second):
    """A 429 with 0 remaining whose reset is the end of the current minute fills the minute
    window: refused until the next minute, granted in it."""
    put_keys("free", [("a1", "acct-a")])
    broker = await start_broker(quota=QUOTA)
    client = connect(broker)
    clock.advance(second)
    lease = await client.lease_key("free")
    reset = clock.now() - second + 60.0
    await client.report_usage(lease.lease_id, 429, ratelimit_limit=20, ratelimit_remaining=0,
                              ratelimit_reset_ms=int(reset * 1000))
    await client.complete(lease.lease_id)
    with pytest.raises(QuotaExhausted) as info:
        await client.lease_key("free")
    assert info.value.retry_after == pytest.approx(60.0 - second, abs=0.01)
    clock.advance(60.0 - second + 0.5)
    assert (await client.lease_key("free")).account == "acct-a"
