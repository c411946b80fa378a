"""Bad input on every RPC gets a clear status, never INTERNAL, and changes no state."""

from __future__ import annotations

import math
import sqlite3

import grpc
import pytest
from google.protobuf import duration_pb2
from keybroker_client.v1 import keybroker_pb2 as pb

from broker.config import QuotaSettings
from tests.support import TOKENS

INV, NF, PD = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
               grpc.StatusCode.PERMISSION_DENIED)
LEASE = "<lease>"  # replaced by a real lease id owned by the caller
# The service each RPC belongs to, from the proto's service descriptors.
SERVICE_OF = {m.name: s.name for s in pb.DESCRIPTOR.services_by_name.values() for m in s.methods}


def d(seconds: int, nanos: int = 0) -> duration_pb2.Duration:
    return duration_pb2.Duration(seconds=seconds, nanos=nanos)


# (rpc, request, who, expected code)
CASES = [
    ("LeaseKey", pb.LeaseKeyRequest(pool=""), "alice", INV),
    ("LeaseKey", pb.LeaseKeyRequest(pool="has space"), "alice", INV),
    ("LeaseKey", pb.LeaseKeyRequest(pool="p" * 65), "alice", INV),
    ("LeaseKey", pb.LeaseKeyRequest(pool="../free"), "alice", INV),
    ("LeaseKey", pb.LeaseKeyRequest(pool="nosuchpool"), "admin", NF),
    ("LeaseKey", pb.LeaseKeyRequest(pool="nosuchpool"), "alice", PD),
    ("LeaseKey", pb.LeaseKeyRequest(pool="free", units=-1), "alice", INV),
    ("LeaseKey", pb.LeaseKeyRequest(pool="free", units=1001), "alice", INV),
    ("LeaseKey", pb.LeaseKeyRequest(pool="free", units=2**31 - 1), "alice", INV),
    ("LeaseKey", pb.LeaseKeyRequest(pool="free", units=51), "alice", INV),
    ("LeaseKey", pb.LeaseKeyRequest(pool="free", ttl=d(0, 500_000_000)), "alice", INV),
    ("LeaseKey", pb.LeaseKeyRequest(pool="free", ttl=d(-5)), "alice", INV),
    ("LeaseKey", pb.LeaseKeyRequest(pool="free", ttl=d(99_999)), "alice", INV),
    ("LeaseKey", pb.LeaseKeyRequest(pool="free", ttl=d(2**40)), "alice", INV),
    ("LeaseKey", pb.LeaseKeyRequest(pool="free", request_id="r" * 129), "alice", INV),
    ("LeaseKey", pb.LeaseKeyRequest(pool="free", request_id="line\nbreak"), "alice", INV),
    ("LeaseKey", pb.LeaseKeyRequest(pool="free", request_id="caf\u00e9"), "alice", INV),
    ("LeaseKey", pb.LeaseKeyRequest(pool="free", model="m" * 300), "alice", INV),
    ("LeaseKey", pb.LeaseKeyRequest(pool="free", model="bad\x01model"), "alice", INV),
    ("LeaseKey", pb.LeaseKeyRequest(pool="free", model="not/served"), "alice", INV),
    ("LeaseKey", pb.LeaseKeyRequest(pool="free", priority=99), "alice", INV),
    ("RenewLease", pb.RenewLeaseRequest(lease_id=""), "alice", INV),
    ("RenewLease", pb.RenewLeaseRequest(lease_id="garbage"), "alice", INV),
    ("RenewLease", pb.RenewLeaseRequest(lease_id="ls_" + "g" * 32), "alice", INV),
    ("RenewLease", pb.RenewLeaseRequest(lease_id="ls_" + "0" * 32), "alice", NF),
    ("RenewLease", pb.RenewLeaseRequest(lease_id=LEASE, ttl=d(0)), "alice", INV),
    ("RenewLease", pb.RenewLeaseRequest(lease_id=LEASE, ttl=d(86_400)), "alice", INV),
    ("ReportUsage", pb.ReportUsageRequest(lease_id="x"), "alice", INV),
    ("ReportUsage", pb.ReportUsageRequest(lease_id=LEASE, http_status=42), "alice", INV),
    ("ReportUsage", pb.ReportUsageRequest(lease_id=LEASE, http_status=600), "alice", INV),
    ("ReportUsage", pb.ReportUsageRequest(lease_id=LEASE, http_status=-1), "alice", INV),
    ("ReportUsage", pb.ReportUsageRequest(lease_id=LEASE, http_status=401,
                                          prompt_tokens=-1), "alice", INV),
    ("ReportUsage", pb.ReportUsageRequest(lease_id=LEASE, http_status=401, cost=-1.0),
     "alice", INV),
    ("ReportUsage", pb.ReportUsageRequest(lease_id=LEASE, http_status=401, cost=math.nan),
     "alice", INV),
    ("ReportUsage", pb.ReportUsageRequest(lease_id=LEASE, http_status=401, latency_ms=-5),
     "alice", INV),
    ("ReportUsage", pb.ReportUsageRequest(lease_id=LEASE, http_status=429,
                                          ratelimit_remaining=-1), "alice", INV),
    ("ReportUsage", pb.ReportUsageRequest(lease_id=LEASE, http_status=401,
                                          error_type="e" * 200), "alice", INV),
    ("ReportUsage", pb.ReportUsageRequest(lease_id=LEASE, http_status=429,
                                          retry_after=d(-3)), "alice", INV),
    ("ReportUsage", pb.ReportUsageRequest(lease_id="ls_" + "1" * 32, http_status=401),
     "alice", NF),
    ("Complete", pb.CompleteRequest(lease_id=""), "alice", INV),
    ("Complete", pb.CompleteRequest(lease_id="ls_short"), "alice", INV),
    ("Complete", pb.CompleteRequest(lease_id="ls_" + "2" * 32, used=False), "alice", NF),
    ("ListKeys", pb.ListKeysRequest(pool="bad pool"), "admin", INV),
    ("ListKeys", pb.ListKeysRequest(pool="nosuchpool"), "admin", NF),
    ("ListKeys", pb.ListKeysRequest(page_size=-1), "admin", INV),
    ("ListKeys", pb.ListKeysRequest(page_token="bm90IGEgdG9rZW4"), "admin", INV),
    ("ListKeys", pb.ListKeysRequest(page_token="\u00e9" * 10_000), "admin", INV),
    ("GetKey", pb.GetKeyRequest(key_id=""), "admin", INV),
    ("GetKey", pb.GetKeyRequest(key_id="noslash"), "admin", INV),
    ("GetKey", pb.GetKeyRequest(key_id="free/"), "admin", INV),
    ("GetKey", pb.GetKeyRequest(key_id="free/ghost"), "admin", NF),
    ("SetKeyEnabled", pb.SetKeyEnabledRequest(key_id="free/k1", reason="r" * 300), "admin",
     INV),
    ("SetKeyEnabled", pb.SetKeyEnabledRequest(key_id="free/ghost"), "admin", NF),
    ("SetKeyEnabled", pb.SetKeyEnabledRequest(key_id="a/b/c"), "admin", INV),
    ("GetUsage", pb.GetUsageRequest(days=400), "admin", INV),
    ("GetUsage", pb.GetUsageRequest(days=-1), "admin", INV),
    ("GetUsage", pb.GetUsageRequest(days=1, group_by=[pb.USAGE_DIMENSION_DAY] * 2), "admin", INV),
    ("GetUsage", pb.GetUsageRequest(days=1, group_by=[pb.USAGE_DIMENSION_UNSPECIFIED]), "admin",
     INV),
    ("GetUsage", pb.GetUsageRequest(days=1, group_by=[99]), "admin", INV),
    ("GetUsage", pb.GetUsageRequest(days=1, pool="bad pool"), "admin", INV),
    ("GetUsage", pb.GetUsageRequest(days=1), "alice", PD),
    ("GetUsage", pb.GetUsageRequest(days=32), "admin", INV),
    ("GetUsage", pb.GetUsageRequest(days=1, page_size=-1000), "admin", INV),
    ("GetUsage", pb.GetUsageRequest(days=1, page_token="{}"), "admin", INV),
    ("ClearCooldown", pb.ClearCooldownRequest(), "admin", INV),
    ("ClearCooldown", pb.ClearCooldownRequest(account="acct-a", key_id="free/k1"), "admin", INV),
    ("ClearCooldown", pb.ClearCooldownRequest(key_id="free/k1", reason="r" * 300), "admin", INV),
    ("ClearCooldown", pb.ClearCooldownRequest(account="a\x00b"), "admin", INV),
    ("ClearCooldown", pb.ClearCooldownRequest(key_id="a/b/c"), "admin", INV),
    ("ClearCooldown", pb.ClearCooldownRequest(key_id="free/ghost"), "admin", NF),
    ("ClearCooldown", pb.ClearCooldownRequest(account="acct-ghost"), "admin", NF),
    ("ClearCooldown", pb.ClearCooldownRequest(account="acct-a"), "alice", PD),
    ("ClearCooldown", pb.ClearCooldownRequest(key_id="free/k1"), "reader", PD),
    ("RotateKey", pb.RotateKeyRequest(), "admin", INV),
    ("RotateKey", pb.RotateKeyRequest(key_id="a/b/c"), "admin", INV),
    ("RotateKey", pb.RotateKeyRequest(key_id="free/k1", reason="r" * 300), "admin", INV),
    ("RotateKey", pb.RotateKeyRequest(key_id="free/k1"), "admin", INV),  # put by hand
    ("RotateKey", pb.RotateKeyRequest(key_id="free/ghost"), "admin", NF),
    ("RotateKey", pb.RotateKeyRequest(key_id="free/k1"), "alice", PD),
    ("RevokeKey", pb.RevokeKeyRequest(), "admin", INV),
    ("RevokeKey", pb.RevokeKeyRequest(key_id="../free/k1"), "admin", INV),
    ("RevokeKey", pb.RevokeKeyRequest(key_id="free/k1", reason="bad\x00"), "admin", INV),
    ("RevokeKey", pb.RevokeKeyRequest(key_id="free/ghost"), "admin", NF),
    ("RevokeKey", pb.RevokeKeyRequest(key_id="free/k1"), "reader", PD),
    ("ProvisionKeys", pb.ProvisionKeysRequest(pool="free"), "admin", INV),
    ("ProvisionKeys", pb.ProvisionKeysRequest(account="acct-a"), "admin", INV),
    ("ProvisionKeys", pb.ProvisionKeysRequest(account="acct-a", pool="free", count=101),
     "admin", INV),
    ("ProvisionKeys", pb.ProvisionKeysRequest(account="acct-a", pool="free", count=-1),
     "admin", INV),
    ("ProvisionKeys", pb.ProvisionKeysRequest(account="acct-a", pool="free", limit=-1),
     "admin", INV),
    ("ProvisionKeys", pb.ProvisionKeysRequest(account="acct-a", pool="free",
                                              limit_reset="hourly"), "admin", INV),
    ("ProvisionKeys", pb.ProvisionKeysRequest(account="acct-a", pool="free",
                                              expires_in=d(-5)), "admin", INV),
    ("ProvisionKeys", pb.ProvisionKeysRequest(account="acct-a", pool="free",
                                              base_url="ftp://x"), "admin", INV),
    ("ProvisionKeys", pb.ProvisionKeysRequest(account="acct-a", pool="free"), "admin", NF),
    ("ProvisionKeys", pb.ProvisionKeysRequest(account="acct-a", pool="free"), "alice", PD),
    ("LeaseKey", pb.LeaseKeyRequest(pool="free", priority=pb.PRIORITY_HIGH), "carol", PD),
    ("ReportUsage", pb.ReportUsageRequest(lease_id=LEASE, http_status=200, model="m/two"),
     "alice", INV),
]


def test_table_covers_every_rpc_with_request_fields():
    """The table has rows for exactly the RPCs of the proto whose request has a field to get
    wrong, so a new RPC fails here until it has rows."""
    with_fields = {m.name for s in pb.DESCRIPTOR.services_by_name.values() for m in s.methods
                   if m.input_type.fields}
    assert {rpc for rpc, *_ in CASES} == with_fields


def snapshot(db_path) -> dict[str, list[tuple]]:
    with sqlite3.connect(f"file:{db_path}?mode=ro", uri=True) as db:
        return {table: sorted(db.execute(f"SELECT * FROM {table}"))
                for table in ("counters", "leases", "health", "usage")}


async def test_every_bad_input_gets_a_clear_status_and_changes_nothing(
        start_broker, put_keys, connect, tmp_path):
    """Each row of the table answers its status (never INTERNAL) and leaves the state as it was."""
    put_keys("free", [("k1", "acct-a"), ("k2", "acct-b")], models=("m/one:free",))
    broker = await start_broker(quota=QuotaSettings(daily_limit=50, minute_limit=50))
    alice = connect(broker, "alice")
    lease = await alice.lease_key("free", ttl=60)
    admin_views = await connect(broker, "admin").list_keys()
    before = snapshot(tmp_path / "state.db")
    failures = []
    for rpc, request, who, expected in CASES:
        if getattr(request, "lease_id", None) == LEASE:
            request.lease_id = lease.lease_id
        service = alice.admin if SERVICE_OF[rpc] == "KeyAdmin" else alice.broker
        try:
            await getattr(service, rpc)(request, metadata=(("authorization",
                                                            f"Bearer {TOKENS[who]}"),))
            failures.append(f"{rpc} {request} succeeded")
            continue
        except grpc.aio.AioRpcError as err:
            if err.code() != expected:
                failures.append(f"{rpc} {request}: {err.code()} {err.details()}")
            assert err.details(), "every refusal says why"
        after = snapshot(tmp_path / "state.db")
        if after != before:
            failures.append(f"{rpc} {request} changed state")
    assert not failures, "\n".join(failures)
    assert await connect(broker, "admin").list_keys() == admin_views


async def test_invalid_argument_names_the_field(start_broker, put_keys, connect):
    """An INVALID_ARGUMENT carries ErrorInfo and a BadRequest naming the offending field."""
    put_keys("free", [("k1", "acct-a")])
    broker = await start_broker()
    with pytest.raises(Exception) as info:
        await connect(broker).lease_key("free", units=5000)
    assert info.value.code is INV
    assert info.value.reason == "INVALID_ARGUMENT"
    assert info.value.field == "units"


async def test_leasing_before_keys_load_is_unavailable(start_broker, vault_settings, connect):
    """Until the first key load LeaseKey is UNAVAILABLE, not INTERNAL."""
    import dataclasses

    dead = dataclasses.replace(vault_settings, addr="http://127.0.0.1:9", reload_interval=0.2,
                               timeout=0.2)
    broker = await start_broker(wait_ready=False, vault=dead)
    with pytest.raises(Exception) as info:
        await connect(broker).lease_key("free")
    assert info.value.code is grpc.StatusCode.UNAVAILABLE
