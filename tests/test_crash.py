"""Crash-restart: `keybroker serve` killed with SIGKILL mid-load loses no count and no lease."""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from keybroker_client import AsyncKeyBrokerClient, BrokerError, Lease
from keybroker_client.v1 import keybroker_pb2 as pb

from broker.config import VaultSettings
from broker.testing import BaoDevServer, BrokerProcess, free_port
from broker.testing.process import clean_environ
from tests.support import POLICY, TOKENS

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]

POOL = "free"
DAILY = 60  # per account; the minute limit is far above it so only the day window binds
MINUTE = 1000
CALLERS = 16
KILL_AFTER = 40  # acknowledged grants before the SIGKILL


@pytest.fixture(params=[1, 2], ids=["1worker", "2workers"])
def spawn_broker(request: pytest.FixtureRequest, tmp_path: Path, bao: BaoDevServer,
                 vault_settings: VaultSettings) -> Iterator[Callable[..., BrokerProcess]]:
    """spawn_broker(name, port=None) -> a `keybroker serve` subprocess on one SQLite file,
    with one worker or (`serve --workers 2`) two."""
    policy = tmp_path / "policy.toml"
    policy.write_text(POLICY)
    base = clean_environ()
    started: list[BrokerProcess] = []

    def spawn(name: str, port: int | None = None, **settings: str) -> BrokerProcess:
        port = port or free_port()
        env = {
            **base,
            "KEYBROKER_POLICY_FILE": str(policy),
            "KEYBROKER_STORE_SQLITE_PATH": str(tmp_path / "state.db"),
            "KEYBROKER_VAULT_ADDR": bao.addr,
            "KEYBROKER_VAULT_TOKEN": bao.root_token,
            "KEYBROKER_VAULT_KEY_PREFIX": vault_settings.key_prefix,
            "KEYBROKER_QUOTA_DAILY_LIMIT": str(DAILY),
            "KEYBROKER_QUOTA_MINUTE_LIMIT": str(MINUTE),
            "KEYBROKER_LOG_LEVEL": "info",
            "KEYBROKER_LOG_FORMAT": "json",
            **{f"KEYBROKER_{k.upper()}": v for k, v in settings.items()},
        }
        proc = BrokerProcess(env, name=name, port=port, log_path=tmp_path / f"{name}.log",
                             workers=request.param).start()
        started.append(proc)
        return proc

    yield spawn
    for proc in started:
        proc.stop()


def _clear_of_midnight(margin: float = 30.0) -> None:
    """Daily counters reset at 00:00 UTC: never run across it (waits at most `margin` s)."""
    now = datetime.now(UTC)
    midnight = (now + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    left = (midnight - now).total_seconds()
    if left < margin:
        time.sleep(left + 1.0)


async def _account_usage(target: str) -> tuple[dict[str, int], dict[str, int]]:
    """(account -> account_used_today, key_id -> used_today) from ListKeys as admin."""
    async with AsyncKeyBrokerClient(target, token=TOKENS["admin"]) as admin:
        reply = await admin.admin.ListKeys(pb.ListKeysRequest(pool=POOL),
                                           metadata=(("authorization",
                                                      f"Bearer {TOKENS['admin']}"),))
    accounts: dict[str, int] = {}
    for key in reply.keys:
        assert accounts.setdefault(key.account, key.account_used_today) == key.account_used_today
    return accounts, {key.key_id: key.used_today for key in reply.keys}


async def test_sigkill_mid_load_loses_no_count_and_never_over_grants(spawn_broker, put_keys):
    """After SIGKILL under 16 concurrent callers and a restart, quota stays exact and leases live on."""
    _clear_of_midnight()
    put_keys(POOL, [("a1", "acct-a"), ("a2", "acct-a"), ("b1", "acct-b"), ("b2", "acct-b")])
    total_quota = 2 * DAILY

    first = spawn_broker("run1")
    await first.wait_serving()
    before: list[Lease] = []
    after_kill_errors: list[grpc.StatusCode] = []
    killed = asyncio.Event()
    async with AsyncKeyBrokerClient(first.target, token=TOKENS["alice"]) as alice:
        # One lease completed before the crash: its outcome must survive it.
        done_early = await alice.lease_key(POOL)
        before.append(done_early)
        early = await alice.complete(done_early.lease_id, used=True)
        assert early.state == pb.LEASE_STATE_COMPLETED

        async def caller() -> None:
            while not killed.is_set():
                try:
                    lease = await alice.lease_key(POOL)
                except BrokerError as exc:
                    if not killed.is_set():
                        raise
                    after_kill_errors.append(exc.code)
                    return
                before.append(lease)  # an answer received is an acknowledged grant
                if len(before) >= KILL_AFTER and not killed.is_set():
                    first.kill9()
                    killed.set()

        await asyncio.wait_for(asyncio.gather(*(caller() for _ in range(CALLERS))), 20)
    assert first.proc.wait(10) == -signal.SIGKILL
    acked_before = Counter(lease.account for lease in before)
    acked_keys_before = Counter(lease.key_id for lease in before)
    assert KILL_AFTER <= len(before) < total_quota

    second = spawn_broker("run2", port=first.port)
    await second.wait_serving()

    # Nothing acknowledged was lost; at most the calls in flight at the kill were charged
    # without an answer.
    used, used_by_key = await _account_usage(second.target)
    assert set(used) == {"acct-a", "acct-b"}
    for account, count in acked_before.items():
        assert used[account] >= count, (account, used, acked_before)
    for key_id, count in acked_keys_before.items():
        assert used_by_key[key_id] >= count, (key_id, used_by_key, acked_keys_before)
    assert sum(used.values()) <= len(before) + CALLERS

    after: list[Lease] = []
    async with AsyncKeyBrokerClient(second.target, token=TOKENS["alice"]) as alice:

        async def drain() -> None:
            while len(after) <= total_quota:  # bounded even if the quota were not enforced
                try:
                    lease = await alice.lease_key(POOL)
                except BrokerError as exc:
                    if exc.code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                        return
                    raise
                after.append(lease)

        await asyncio.wait_for(asyncio.gather(*(drain() for _ in range(CALLERS))), 20)

        # A lease granted before the crash can be completed after it, idempotently.
        pending = before[-1]
        for _ in range(2):
            reply = await alice.complete(pending.lease_id, used=True)
            assert (reply.state, reply.refunded) == (pb.LEASE_STATE_COMPLETED, False)
        # A lease completed before the crash keeps its outcome.
        again = await alice.complete(done_early.lease_id, used=False)
        assert (again.state, again.refunded) == (pb.LEASE_STATE_COMPLETED, False)

        # Exhausted stays exhausted.
        with pytest.raises(BrokerError) as excinfo:
            await alice.lease_key(POOL)
        assert excinfo.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED

    ids = [lease.lease_id for lease in before + after]
    assert len(ids) == len(set(ids)), "a lease id was granted twice"
    assert len(before) + len(after) <= total_quota
    assert len(before) + len(after) >= total_quota - CALLERS
    used, used_by_key = await _account_usage(second.target)
    assert used == {"acct-a": DAILY, "acct-b": DAILY}
    assert sum(used_by_key.values()) == total_quota
    assert all(code == grpc.StatusCode.UNAVAILABLE for code in after_kill_errors), \
        after_kill_errors


async def test_uncompleted_lease_expires_at_ttl_after_restart_and_stays_charged(
        spawn_broker, put_keys):
    """A lease left active by a SIGKILL expires at its TTL in the restarted broker, unrefunded."""
    _clear_of_midnight()
    put_keys(POOL, [("k1", "acct-t")])
    first = spawn_broker("run1", lease_sweep_interval="0.1")
    await first.wait_serving()
    async with AsyncKeyBrokerClient(first.target, token=TOKENS["alice"]) as alice:
        short = await alice.lease_key(POOL, ttl=2.0)
        long = await alice.lease_key(POOL, ttl=60.0)
    first.kill9()
    assert first.proc.wait(10) == -signal.SIGKILL
    assert short.expires_at is not None
    assert datetime.now(UTC) < short.expires_at, "killed too late to test expiry after restart"

    second = spawn_broker("run2", port=first.port, lease_sweep_interval="0.1")
    await second.wait_serving()

    # The restarted broker's sweeper expires it at its TTL (audited), not before.
    deadline = time.monotonic() + 15
    expired: list[dict[str, Any]] = []
    while not expired:
        expired = [e for e in second.log_events()
                   if e.get("event") == "lease.expired" and e.get("lease_id") == short.lease_id]
        assert time.monotonic() < deadline, f"no lease.expired:\n{second.output()[-3000:]}"
        await asyncio.sleep(0.1)
    assert datetime.fromisoformat(expired[0]["timestamp"]) >= short.expires_at
    assert not [e for e in second.log_events() if e.get("event") == "lease.expired"
                and e.get("lease_id") == long.lease_id]

    async with AsyncKeyBrokerClient(second.target, token=TOKENS["alice"]) as alice:
        for _ in range(2):  # even "never used" refunds nothing once expired, and stays so
            reply = await alice.complete(short.lease_id, used=False)
            assert (reply.state, reply.refunded) == (pb.LEASE_STATE_EXPIRED, False)
        # Control: the long lease is still active after the restart, so this one refunds.
        reply = await alice.complete(long.lease_id, used=False)
        assert (reply.state, reply.refunded) == (pb.LEASE_STATE_COMPLETED, True)
    used, _ = await _account_usage(second.target)
    assert used == {"acct-t": 1}
