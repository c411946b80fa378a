"""Lease-path checks that must not look at every key of a large pool, kept exact."""

from __future__ import annotations

import pytest
from keybroker_client import InvalidArgument


async def test_units_fit_check_names_the_largest_key_window_and_grants_up_to_it(
        start_broker, put_keys, connect) -> None:
    """Keys of 3, 12 and 6 units a day: 12 units lease the 12-unit key, 13 units are
    INVALID_ARGUMENT naming 12 (twice, and after a grant), 1 unit still leases."""
    put_keys("free", [("small", "acct-s")], daily_limit=3)
    put_keys("free", [("large", "acct-l")], daily_limit=12)
    put_keys("free", [("mid", "acct-m")], daily_limit=6)
    alice = connect(await start_broker())
    lease = await alice.lease_key("free", units=12)
    assert lease.key_id == "free/large"
    await alice.complete(lease.lease_id, used=False)
    for _ in range(2):
        with pytest.raises(InvalidArgument, match=r"largest 12\)"):
            await alice.lease_key("free", units=13)
    one = await alice.lease_key("free", units=1)
    await alice.complete(one.lease_id, used=False)
    with pytest.raises(InvalidArgument, match=r"largest 12\)"):
        await alice.lease_key("free", units=13)
