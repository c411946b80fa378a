"""A principal's limit across replicas: `keybroker serve` processes on one Redis grant a
limited principal exactly its limit under a burst, and leave the rest of the pool to others."""

from __future__ import annotations

import asyncio
from collections import Counter
from datetime import UTC, datetime

import pytest
from keybroker_client import AsyncKeyBrokerClient, BrokerError, QuotaExhausted

from broker.engine.windows import principal_day
from broker.models import PrincipalLimits
from broker.testing import PolicyBuilder
from tests.support import TOKENS
from tests.test_faults import (  # noqa: F401 - fixtures
    POOL,
    TOTAL,
    clear_of_midnight,
    fleet,
    put_accounts,
    redis_aof,
    start,
)

pytestmark = [pytest.mark.fault, pytest.mark.timeout(120)]

LIMIT = 100  # alice's own daily limit on the pool of 3 accounts x 50
CALLS = 800


async def test_three_replicas_grant_a_principal_exactly_its_limit_in_a_burst(
        tmp_path, fleet, put_accounts):  # noqa: F811 - fixtures
    """800 concurrent LeaseKey calls from one principal limited to 100 a day, over 3 replicas
    on one Redis, grant exactly 100 and refuse 700 naming principal:alice@free/day; the store
    counts 100 for her, and another principal still gets the pool's remaining 50."""
    clear_of_midnight()
    policy = (PolicyBuilder().role("consumer", rpcs=["KeyBroker/*"], pools=[POOL])
              .principal("alice", TOKENS["alice"], roles=["consumer"],
                         limits={POOL: PrincipalLimits(daily=LIMIT)})
              .principal("bob", TOKENS["bob"], roles=["consumer"])
              .write(tmp_path / "limits.toml"))
    f = fleet(3, KEYBROKER_POLICY_FILE=str(policy), KEYBROKER_STORE_REDIS_TIMEOUT="5")
    await start(f)
    alice = [AsyncKeyBrokerClient(b.target, token=TOKENS["alice"]) for b in f.brokers]
    bob = AsyncKeyBrokerClient(f.brokers[0].target, token=TOKENS["bob"])
    outcomes: Counter[str] = Counter()
    subjects: Counter[str] = Counter()
    granted_by: Counter[int] = Counter()

    async def call(i: int) -> None:
        try:
            await asyncio.wait_for(alice[i % 3].lease_key(POOL, ttl=60), 30)
        except QuotaExhausted as exc:
            outcomes["refused"] += 1
            subjects.update(v.subject for v in exc.violations)
        except BrokerError as exc:
            outcomes[exc.code.name] += 1
        else:
            outcomes["granted"] += 1
            granted_by[i % 3] += 1

    try:
        await asyncio.gather(*(call(i) for i in range(CALLS)))
        store = f.store()
        day = datetime.now(UTC).strftime("%Y-%m-%d")
        own = principal_day("alice", POOL, day)
        counted = (await store.counters([("acct-a", own)]))[own]
        accounts = await f.day_counts()
        bob_got = 0
        while True:
            try:
                await bob.lease_key(POOL, ttl=60)
            except QuotaExhausted:
                break
            bob_got += 1
        await store.close()
    finally:
        for c in (*alice, bob):
            await c.close()
    print(f"\n[principal limit] {CALLS} concurrent calls over 3 replicas, limit {LIMIT}: "
          f"{dict(outcomes)}, granted by replica {dict(sorted(granted_by.items()))}, store "
          f"counts alice {counted}, accounts {accounts}; bob then got {bob_got}")
    assert outcomes == {"granted": LIMIT, "refused": CALLS - LIMIT}
    assert subjects[f"principal:alice@{POOL}/day"] == CALLS - LIMIT  # in every refusal
    assert counted == LIMIT and sum(accounts.values()) == LIMIT
    assert bob_got == TOTAL - LIMIT and len(granted_by) == 3
