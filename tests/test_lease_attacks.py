"""The lease-path attacks of the adversarial review, each played against a real broker."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest
from keybroker_client import InvalidArgument, LeaseNotActive, PermissionDenied
from keybroker_client.v1 import keybroker_pb2 as pb

from broker.auth import Policy
from broker.clock import next_midnight
from broker.config import LeaseSettings, QuotaSettings
from broker.errors import InvalidArgument as DomainInvalidArgument
from broker.models import Priority
from tests.support import TOKENS

QUOTA = QuotaSettings(daily_limit=50, minute_limit=100)
FOREVER_MS = 1 << 53  # the reset time of the review's attack: the year ~287,000
# The defaults of health.reset_margin, health.max_retry_after and lease.report_grace.
RESET_MARGIN, MAX_RETRY_AFTER, REPORT_GRACE = 300.0, 3600.0, 60.0


async def health_of(broker, connect, key_id):
    return (await connect(broker, "admin").get_key(key_id)).health


# -- High 1: one consumer can take an account out of service ---------------------------------

async def test_a_far_future_reset_cools_down_no_later_than_next_midnight(start_broker, put_keys,
                                                                         connect, clock):
    """A 429 claiming a reset in the year 287,000 cools the account only until 00:00 UTC plus
    the margin."""
    put_keys("free", [("a1", "acct-a")])
    broker = await start_broker(quota=QUOTA)
    client = connect(broker)
    lease = await client.lease_key("free")
    health = await client.report_usage(lease.lease_id, 429, ratelimit_reset_ms=FOREVER_MS)
    assert health.health == pb.KEY_HEALTH_COOLING_DOWN
    latest = next_midnight(clock.now()) + RESET_MARGIN
    assert health.cooldown_until.ToSeconds() <= latest
    clock.set(latest + 1)
    assert (await client.lease_key("free")).key_id == "free/a1"


async def test_a_huge_retry_after_is_cut_to_the_configured_ceiling(start_broker, put_keys,
                                                                   connect, clock):
    """A 429 with a Retry-After of almost a week cools the account for health.max_retry_after."""
    put_keys("free", [("a1", "acct-a")])
    broker = await start_broker(quota=QUOTA)
    client = connect(broker)
    lease = await client.lease_key("free")
    health = await client.report_usage(lease.lease_id, 429, retry_after=7 * 86400 - 1)
    assert health.cooldown_until.ToSeconds() - clock.now() == pytest.approx(MAX_RETRY_AFTER,
                                                                           abs=1)


async def test_a_report_long_after_its_lease_ended_is_refused(start_broker, put_keys, connect,
                                                              clock):
    """A 429 reported past lease.report_grace after the lease was completed is refused with
    FAILED_PRECONDITION and leaves the account usable."""
    put_keys("free", [("a1", "acct-a")])
    broker = await start_broker(quota=QUOTA)
    client = connect(broker)
    lease = await client.lease_key("free", ttl=600)
    await client.complete(lease.lease_id, used=True)
    clock.advance(REPORT_GRACE + 1)
    with pytest.raises(LeaseNotActive) as info:
        await client.report_usage(lease.lease_id, 429, ratelimit_reset_ms=FOREVER_MS)
    assert "report_grace" in info.value.message
    assert await health_of(broker, connect, "free/a1") == pb.KEY_HEALTH_HEALTHY
    assert (await client.lease_key("free")).key_id == "free/a1"


async def test_a_401_on_an_old_lease_does_not_disable_the_key(start_broker, put_keys, connect,
                                                              clock):
    """A 401 reported on a lease that expired minutes ago is refused and the key stays enabled."""
    put_keys("free", [("a1", "acct-a")])
    broker = await start_broker(quota=QUOTA)
    client = connect(broker)
    lease = await client.lease_key("free", ttl=10)
    clock.advance(10 + REPORT_GRACE + 1)
    with pytest.raises(LeaseNotActive):
        await client.report_usage(lease.lease_id, 401)
    assert await health_of(broker, connect, "free/a1") == pb.KEY_HEALTH_HEALTHY


async def test_a_429_reported_right_after_a_refund_still_counts(start_broker, put_keys, connect,
                                                                clock):
    """The OpenRouter client's order (refund the lease, then report its 429) keeps working
    within the grace."""
    put_keys("free", [("a1", "acct-a")])
    broker = await start_broker(quota=QUOTA)
    client = connect(broker)
    lease = await client.lease_key("free")
    await client.complete(lease.lease_id, used=False)
    clock.advance(2)
    reset_ms = int((clock.now() + 40) * 1000)
    health = await client.report_usage(lease.lease_id, 429, ratelimit_limit=50,
                                       ratelimit_remaining=0, ratelimit_reset_ms=reset_ms)
    assert health.health == pb.KEY_HEALTH_COOLING_DOWN
    assert health.cooldown_until.ToMilliseconds() == reset_ms


async def test_clear_cooldown_by_account_puts_every_key_back(start_broker, put_keys, connect):
    """KeyAdmin.ClearCooldown(account) ends the account's cooldown for all its keys."""
    put_keys("free", [("a1", "acct-a"), ("a2", "acct-a")])
    broker = await start_broker(quota=QUOTA)
    client = connect(broker)
    lease = await client.lease_key("free")
    await client.report_usage(lease.lease_id, 429, retry_after=3000)
    assert await health_of(broker, connect, "free/a2") == pb.KEY_HEALTH_COOLING_DOWN
    admin = connect(broker, "admin")
    reply = await admin._call(admin.admin.ClearCooldown,
                              pb.ClearCooldownRequest(account="acct-a", reason="false alarm"))
    assert sorted(k.key_id for k in reply.keys) == ["free/a1", "free/a2"]
    assert {k.health for k in reply.keys} == {pb.KEY_HEALTH_HEALTHY}
    assert (await client.lease_key("free")).account == "acct-a"


async def test_clear_cooldown_by_key_ends_its_circuit_and_account_cooldown(start_broker,
                                                                           put_keys, connect):
    """ClearCooldown(key_id) ends the key's open circuit and its account's cooldown, but a
    disabled key stays disabled."""
    put_keys("free", [("a1", "acct-a"), ("b1", "acct-b")])
    broker = await start_broker(quota=QUOTA)
    client = connect(broker, "alice")
    admin = connect(broker, "admin")
    for _ in range(broker.settings.health.failure_threshold):
        lease = await client.lease_key("free")
        await client.report_usage(lease.lease_id, 503 if lease.key_id == "free/a1" else 200)
        await client.complete(lease.lease_id)
    while (await health_of(broker, connect, "free/a1")) != pb.KEY_HEALTH_CIRCUIT_OPEN:
        lease = await client.lease_key("free")
        await client.report_usage(lease.lease_id, 503 if lease.key_id == "free/a1" else 200)
        await client.complete(lease.lease_id)
    lease = await client.lease_key("free")
    await client.report_usage(lease.lease_id, 429, retry_after=3000)  # acct-b cools down
    reply = await admin._call(admin.admin.ClearCooldown, pb.ClearCooldownRequest(key_id="free/a1"))
    assert [k.health for k in reply.keys] == [pb.KEY_HEALTH_HEALTHY]
    assert await health_of(broker, connect, "free/b1") == pb.KEY_HEALTH_COOLING_DOWN
    await admin._call(admin.admin.ClearCooldown, pb.ClearCooldownRequest(key_id="free/b1"))
    assert await health_of(broker, connect, "free/b1") == pb.KEY_HEALTH_HEALTHY
    await admin.set_key_enabled("free/a1", False)
    reply = await admin._call(admin.admin.ClearCooldown, pb.ClearCooldownRequest(key_id="free/a1"))
    assert [k.health for k in reply.keys] == [pb.KEY_HEALTH_DISABLED]


async def test_clear_cooldown_command_asks_the_broker(start_broker, put_keys, connect, tmp_path):
    """`keybroker keys clear-cooldown --account` ends the cooldown through the broker's API."""
    put_keys("free", [("a1", "acct-a")])
    broker = await start_broker(quota=QUOTA)
    client = connect(broker)
    lease = await client.lease_key("free")
    await client.report_usage(lease.lease_id, 429, retry_after=3000)
    exe = str(Path(sys.executable).parent / "keybroker")
    env = {**os.environ, "KEYBROKER_TOKEN": TOKENS["admin"],
           "KEYBROKER_TARGET": f"127.0.0.1:{broker.port}"}
    done = await asyncio.to_thread(
        subprocess.run, [exe, "keys", "clear-cooldown", "--account", "acct-a", "--reason", "ok"],
        capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert "cleared the cooldown of account acct-a" in done.stdout
    assert await health_of(broker, connect, "free/a1") == pb.KEY_HEALTH_HEALTHY
    env["KEYBROKER_TOKEN"] = TOKENS["alice"]
    denied = await asyncio.to_thread(
        subprocess.run, [exe, "keys", "clear-cooldown", "free/a1"],
        capture_output=True, text=True, env=env)
    assert denied.returncode == 1
    assert "PERMISSION_DENIED" in denied.stderr and "Traceback" not in denied.stderr


# -- Medium 4: a replay returns a disabled or rotated key's secret ------------------------------

async def test_a_replay_of_an_active_lease_returns_its_secret(start_broker, put_keys, connect):
    """Replaying the request_id of an active lease on an unchanged key returns the same secret."""
    secrets_ = put_keys("free", [("a1", "acct-a")])
    broker = await start_broker(quota=QUOTA)
    client = connect(broker)
    first = await client.lease_key("free", request_id="r-1")
    again = await client.lease_key("free", request_id="r-1")
    assert again.lease_id == first.lease_id
    assert again.api_key == secrets_["free/a1"]


async def test_a_replay_of_a_completed_lease_returns_no_secret(start_broker, put_keys, connect):
    """Replaying the request_id of a completed lease answers FAILED_PRECONDITION, no secret."""
    put_keys("free", [("a1", "acct-a")])
    broker = await start_broker(quota=QUOTA)
    client = connect(broker)
    lease = await client.lease_key("free", request_id="r-1")
    await client.complete(lease.lease_id)
    with pytest.raises(LeaseNotActive) as info:
        await client.lease_key("free", request_id="r-1")
    assert "no longer active" in info.value.message


async def test_a_replay_after_rotation_returns_no_secret(start_broker, put_keys, connect):
    """After the key was rewritten with a new secret, replaying an active lease's request_id
    answers FAILED_PRECONDITION and hands out neither secret."""
    put_keys("free", [("a1", "acct-a")])
    broker = await start_broker(quota=QUOTA)
    client = connect(broker)
    await client.lease_key("free", request_id="r-1", ttl=600)
    rotated = put_keys("free", [("a1", "acct-a")])["free/a1"]
    await broker.engine.reload_keys()
    with pytest.raises(LeaseNotActive) as info:
        await client.lease_key("free", request_id="r-1")
    assert "rewritten" in info.value.message and rotated not in info.value.message
    assert (await client.lease_key("free", request_id="r-2")).api_key == rotated


async def test_a_replay_after_disable_returns_no_secret(start_broker, put_keys, connect):
    """After an operator disabled the key, replaying an active lease's request_id answers
    FAILED_PRECONDITION."""
    put_keys("free", [("a1", "acct-a")])
    broker = await start_broker(quota=QUOTA)
    client = connect(broker)
    await client.lease_key("free", request_id="r-1", ttl=600)
    await connect(broker, "admin").set_key_enabled("free/a1", False)
    with pytest.raises(LeaseNotActive):
        await client.lease_key("free", request_id="r-1")


# -- Medium 5: unbounded storage through ReportUsage and GetUsage -----------------------------

async def test_a_report_must_name_the_leased_model(start_broker, put_keys, connect):
    """A report naming a model neither leased nor served by the key is INVALID_ARGUMENT and
    records nothing; one the key serves is accepted."""
    put_keys("free", [("a1", "acct-a")], models=("m/one", "m/two"))
    broker = await start_broker(quota=QUOTA)
    client = connect(broker)
    lease = await client.lease_key("free", "m/one")
    with pytest.raises(InvalidArgument) as info:
        await client.report_usage(lease.lease_id, 200, model="junk-0001")
    assert info.value.field == "model"
    await client.report_usage(lease.lease_id, 200, model="m/two")
    rows = await connect(broker, "admin").usage(1, ["model"])
    assert sorted(r.group[0] for r in rows) == ["m/two"]


async def test_a_report_on_a_model_bound_lease_of_an_any_model_key(start_broker, put_keys,
                                                                   connect):
    """On a key without a model list, a lease for one model accepts reports of that model only."""
    put_keys("free", [("a1", "acct-a")])
    broker = await start_broker(quota=QUOTA)
    client = connect(broker)
    lease = await client.lease_key("free", "m/one")
    with pytest.raises(InvalidArgument):
        await client.report_usage(lease.lease_id, 200, model="m/other")
    await client.report_usage(lease.lease_id, 200, model="m/one")


async def test_get_usage_reads_no_more_days_than_are_kept(start_broker, put_keys, connect):
    """GetUsage over more days than lease.usage_retention_days (31) is INVALID_ARGUMENT."""
    put_keys("free", [("a1", "acct-a")])
    broker = await start_broker(quota=QUOTA)
    admin = connect(broker, "admin")
    assert await admin.usage(31, ["day"]) == []
    with pytest.raises(InvalidArgument) as info:
        await admin.usage(32, ["day"])
    assert info.value.field == "days"


async def test_get_usage_is_bounded_in_rows(start_broker, put_keys, connect):
    """A GetUsage page holds at most lease.usage_max_rows rows, whatever page_size asks, and
    the rest of a larger answer comes on the next pages rather than in one unbounded reply."""
    put_keys("free", [("a1", "acct-a"), ("a2", "acct-b"), ("a3", "acct-c")])
    broker = await start_broker(quota=QUOTA, lease=LeaseSettings(sweep_interval=0.05,
                                                                 usage_max_rows=2))
    client = connect(broker)
    admin = connect(broker, "admin")
    for _ in range(3):
        lease = await client.lease_key("free")
        await client.report_usage(lease.lease_id, 200)
    first = await admin.usage_page(1, ["key"], page_size=1000)
    assert len(first.rows) == 2 and first.next_page_token
    rest = await admin.usage_page(1, ["key"], page_size=1000, page_token=first.next_page_token)
    assert len(rest.rows) == 1 and rest.next_page_token == ""
    assert sorted(r.group[0] for r in await admin.usage(1, ["key"])) == [
        "free/a1", "free/a2", "free/a3"]


# -- Medium 6: priority is the caller's choice -------------------------------------------------

async def test_high_priority_needs_a_grant(start_broker, put_keys, connect):
    """A consumer whose roles do not list "high" in priorities gets PERMISSION_DENIED for a
    high-priority lease and is charged nothing; normal priority still works."""
    put_keys("free", [("a1", "acct-a")])
    broker = await start_broker(quota=QUOTA)
    carol = connect(broker, "carol")
    with pytest.raises(PermissionDenied) as info:
        await carol.lease_key("free", priority="high")
    assert "high priority" in info.value.message
    assert (await connect(broker, "admin").get_key("free/a1")).used_today == 0
    assert (await carol.lease_key("free")).key_id == "free/a1"
    assert (await connect(broker, "alice").lease_key("free", priority="high")).key_id


def test_policy_priorities_default_to_normal_and_low():
    """A role without `priorities` may lease at normal and low priority, not high; unknown
    priority names are refused when the policy is read."""
    policy = Policy.from_mapping({
        "roles": {"plain": {"rpcs": ["LeaseKey"], "pools": ["*"]},
                  "vip": {"rpcs": ["LeaseKey"], "pools": ["*"], "priorities": ["HIGH"]}},
        "principals": [{"name": "p", "mtls_cn": "p", "roles": ["plain"]},
                       {"name": "v", "mtls_cn": "v", "roles": ["plain", "vip"]}]})
    plain, vip = policy.by_certificate("p"), policy.by_certificate("v")
    assert [plain.may_priority(p) for p in Priority] == [False, True, True]
    assert [vip.may_priority(p) for p in Priority] == [True, True, True]
    with pytest.raises(DomainInvalidArgument) as info:
        Policy.from_mapping({"roles": {"r": {"rpcs": [], "priorities": ["urgent"]}}})
    assert info.value.field == "roles.r.priorities"
