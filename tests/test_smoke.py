"""The broker comes up on real OpenBao and SQLite and leases a key over gRPC."""

from __future__ import annotations


async def test_lease_returns_a_key_from_vault(start_broker, put_keys, connect):
    """A granted lease carries the decrypted secret, key id, account and remaining quota."""
    secrets_ = put_keys("free", [("k1", "acct-a")])
    broker = await start_broker()
    client = connect(broker)
    lease = await client.lease_key("free")
    assert lease.key_id == "free/k1"
    assert lease.api_key == secrets_["free/k1"]
    assert lease.account == "acct-a"
    assert lease.remaining_account_today == 49
