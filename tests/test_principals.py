"""Principals in the policy: tokens with validity times (several per principal, rotated
without downtime) and limits of their own per pool, enforced in the atomic reservation."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from keybroker_client import AsyncKeyBrokerClient, QuotaExhausted, Unauthenticated

from broker.app import PolicyFile
from broker.auth import Policy, hash_token, new_token
from broker.config import QuotaSettings
from broker.errors import InvalidArgument, TokenExpired, TokenNotYetValid
from broker.models import PrincipalLimits
from broker.testing import PolicyBuilder
from broker.testing.policy import Token
from tests.support import T0, TOKENS

KEYBROKER = Path(sys.executable).with_name("keybroker")
NOW = T0.timestamp()
OLD, NEW = f"kbt_test_old_{'o' * 24}", f"kbt_test_new_{'n' * 24}"


def _policy(path: Path, *, tokens: list[Token] | None = None,
            limits: dict[str, PrincipalLimits] | None = None) -> Path:
    """svc consumes pool free with ``tokens`` (default: TOKENS['alice'] for ever) and
    ``limits``; bob consumes free without limits."""
    b = (PolicyBuilder().role("consumer", rpcs=["KeyBroker/*"], pools=["free"])
         .principal("svc", roles=["consumer"], tokens=tokens or [Token(TOKENS["alice"])],
                    limits=limits)
         .principal("bob", TOKENS["bob"], roles=["consumer"]))
    return b.write(path)


def _client(broker: Any, token: str) -> AsyncKeyBrokerClient:
    return AsyncKeyBrokerClient(f"127.0.0.1:{broker.port}", token=token)


# -- tokens ----------------------------------------------------------------------------------


async def test_an_expired_token_is_refused_with_its_reason_while_its_successor_serves(
        tmp_path, start_broker, put_keys, clock):
    """During a rotation both tokens lease; past the old one's not_after it answers
    UNAUTHENTICATED with reason TOKEN_EXPIRED and the new one keeps leasing."""
    put_keys("free", [("k1", "")])
    path = _policy(tmp_path / "p.toml", tokens=[Token(OLD, not_after=NOW + 60),
                                                Token(NEW, not_before=NOW - 60)])
    broker = await start_broker(policy_file=str(path))
    old, new = _client(broker, OLD), _client(broker, NEW)
    try:
        for c in (old, new):
            assert (await c.lease_key("free")).key_id == "free/k1"
        clock.advance(61)
        with pytest.raises(Unauthenticated) as info:
            await old.lease_key("free")
        assert info.value.reason == "TOKEN_EXPIRED"
        assert "expired at 2026-03-10T12:01:00Z" in str(info.value)
        assert (await new.lease_key("free")).key_id == "free/k1"
    finally:
        await old.close()
        await new.close()


async def test_a_token_before_its_not_before_is_refused_with_its_reason(
        tmp_path, start_broker, put_keys, clock):
    """A token used before its not_before answers UNAUTHENTICATED, reason TOKEN_NOT_YET_VALID,
    and leases once that time has come."""
    put_keys("free", [("k1", "")])
    path = _policy(tmp_path / "p.toml", tokens=[Token(NEW, not_before=NOW + 3600)])
    broker = await start_broker(policy_file=str(path))
    client = _client(broker, NEW)
    try:
        with pytest.raises(Unauthenticated) as info:
            await client.lease_key("free")
        assert info.value.reason == "TOKEN_NOT_YET_VALID"
        clock.advance(3600)
        assert (await client.lease_key("free")).key_id == "free/k1"
    finally:
        await client.close()


def test_token_validity_is_judged_at_the_given_time():
    """by_token accepts a token inside [not_before, not_after) and names why outside it."""
    text = (PolicyBuilder().role("r", rpcs=["LeaseKey"], pools=["free"])
            .principal("svc", roles=["r"], tokens=[Token(OLD, NOW, NOW + 10)]).to_toml())
    policy = Policy.from_mapping(tomllib.loads(text))
    assert policy.by_token(OLD, NOW).name == "svc"
    assert policy.by_token(OLD, NOW + 9.5).name == "svc"
    with pytest.raises(TokenExpired):
        policy.by_token(OLD, NOW + 10)
    with pytest.raises(TokenNotYetValid):
        policy.by_token(OLD, NOW - 1)


@pytest.mark.parametrize(("entry", "field"), [
    ({"sha256": "x" * 64}, "principals[0].tokens[0].sha256"),
    ({"sha256": "a" * 64, "not_after": "next tuesday"}, "principals[0].tokens[0].not_after"),
    ({"sha256": "a" * 64, "not_before": datetime(2026, 2, 1, tzinfo=UTC),
      "not_after": datetime(2026, 1, 1, tzinfo=UTC)}, "principals[0].tokens[0].not_after"),
    ({"sha256": "a" * 64, "expires": "2026-01-01"}, "principals[0].tokens[0]"),
    ("a" * 64, "principals[0].tokens[0]"),
])
def test_a_bad_token_entry_names_its_field(entry, field):
    """A token entry with a bad hash, time, order or field is refused naming where."""
    with pytest.raises(InvalidArgument) as info:
        Policy.from_mapping({"roles": {}, "principals": [{"name": "svc", "tokens": [entry]}]})
    assert info.value.field == field


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(KEYBROKER), *args], capture_output=True, text=True, timeout=60,
                          check=False)


def test_token_new_rotate_prints_a_tokens_line_the_policy_accepts():
    """`token new --rotate OLD_SHA256` prints a tokens line under which the old token works
    until the overlap ends and the new one from now on."""
    old = new_token()
    out = cli("token", "new", "--rotate", hash_token(old), "--overlap", "2")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    token = lines[0].split(":", 1)[1].strip()
    line = next(x for x in lines if x.startswith("tokens = "))
    principal = tomllib.loads(line)
    policy = Policy.from_mapping({"roles": {"r": {"rpcs": ["LeaseKey"], "pools": ["free"]}},
                                  "principals": [{"name": "svc", "roles": ["r"], **principal}]})
    start = datetime.now(UTC).timestamp()
    assert policy.by_token(token, start).name == "svc"
    assert policy.by_token(old, start + 3600).name == "svc"
    with pytest.raises(TokenExpired):
        policy.by_token(old, start + 2 * 3600 + 60)
    assert policy.by_token(token, start + 400 * 86400).name == "svc"
    bad = cli("token", "new", "--rotate", old)
    assert bad.returncode == 2 and "64 hex digits" in bad.stderr


# -- limits ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("limits", "field"), [
    ({"free": {"daily": -1}}, "principals[0].limits.free.daily"),
    ({"free": {"minute": 1.5}}, "principals[0].limits.free.minute"),
    ({"free": {"daily_share": 1.5}}, "principals[0].limits.free.daily_share"),
    ({"free": {"daily_share": 0}}, "principals[0].limits.free.daily_share"),
    ({"free": {"per_day": 3}}, "principals[0].limits.free"),
    ({"free": 3}, "principals[0].limits.free"),
])
def test_a_bad_principal_limit_names_its_field(limits, field):
    """A principal limit that is negative, fractional, out of (0, 1] or unknown is refused
    naming where."""
    with pytest.raises(InvalidArgument) as info:
        Policy.from_mapping({"roles": {}, "principals": [
            {"name": "svc", "token_sha256": "a" * 64, "limits": limits}]})
    assert info.value.field == field


def test_principal_limits_are_refused_with_a_redis_cluster(tmp_path):
    """A policy with principal limits does not load for a Redis Cluster store (a limit
    spanning accounts cannot be charged atomically there), and says why."""
    path = _policy(tmp_path / "p.toml", limits={"free": PrincipalLimits(daily=3)})
    with pytest.raises(InvalidArgument) as info:
        PolicyFile(str(path), limits_allowed=False).load()
    assert info.value.field == f"policy_file {path}"  # a configuration error naming the file
    assert "principals.limits" in info.value.message and "Redis Cluster" in info.value.message
    PolicyFile(str(path)).load()
    plain = _policy(tmp_path / "plain.toml")
    PolicyFile(str(plain), limits_allowed=False).load()


async def test_a_principal_daily_limit_spans_accounts_refuses_with_whose_and_refunds(
        tmp_path, start_broker, put_keys, connect, clock):
    """A principal's daily limit of 3 holds across two accounts with room to spare: the 4th
    lease is RESOURCE_EXHAUSTED naming principal:svc@free/day with RetryInfo to 00:00 UTC,
    other principals still lease, and Complete(used=false) gives the unit back."""
    put_keys("free", [("k1", "acct-a"), ("k2", "acct-b")])
    path = _policy(tmp_path / "p.toml", limits={"free": PrincipalLimits(daily=3)})
    broker = await start_broker(policy_file=str(path),
                                quota=QuotaSettings(daily_limit=50, minute_limit=50))
    svc, bob = connect(broker, "alice"), connect(broker, "bob")
    leases = [await svc.lease_key("free") for _ in range(3)]
    assert {le.key_id for le in leases} <= {"free/k1", "free/k2"}
    with pytest.raises(QuotaExhausted) as info:
        await svc.lease_key("free")
    assert [v.subject for v in info.value.violations] == ["principal:svc@free/day"]
    assert "3 of 3 used" in info.value.violations[0].description
    midnight = datetime(2026, 3, 11, tzinfo=UTC).timestamp()
    assert info.value.retry_after == pytest.approx(midnight - clock.now(), abs=0.01)
    assert (await bob.lease_key("free")).key_id in {"free/k1", "free/k2"}
    internal = await svc.lease_key("free", allow_internal=True)
    assert (internal.route, internal.internal_reason) == ("internal", "quota_exhausted")
    await svc.complete(leases[0].lease_id, used=False)
    assert (await svc.lease_key("free")).key_id in {"free/k1", "free/k2"}
    with pytest.raises(QuotaExhausted):
        await svc.lease_key("free")


async def test_a_principal_minute_limit_and_share_of_the_pool_hold(
        tmp_path, start_broker, put_keys, connect, clock):
    """A minute limit of 2 refuses the 3rd lease until the next minute; a daily_share of 0.1
    of a 2 x 20 pool allows 4 leases a day."""
    put_keys("free", [("k1", "acct-a"), ("k2", "acct-b")])
    path = _policy(tmp_path / "p.toml",
                   limits={"free": PrincipalLimits(minute=2, daily_share=0.1)})
    broker = await start_broker(policy_file=str(path),
                                quota=QuotaSettings(daily_limit=20, minute_limit=50))
    svc = connect(broker, "alice")
    for _ in range(2):
        await svc.lease_key("free")
    with pytest.raises(QuotaExhausted) as info:
        await svc.lease_key("free")
    assert [v.subject for v in info.value.violations] == ["principal:svc@free/minute"]
    assert info.value.retry_after == pytest.approx(60.0, abs=0.01)
    clock.advance(60)
    for _ in range(2):
        await svc.lease_key("free")
    clock.advance(60)
    with pytest.raises(QuotaExhausted) as info:
        await svc.lease_key("free")
    assert [v.subject for v in info.value.violations] == ["principal:svc@free/day"]
