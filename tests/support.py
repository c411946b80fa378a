"""What tests share besides fixtures: principals and their tokens, the policy, settings, waits.

Fixtures live in conftest.py; tests import everything else from here.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from broker.config import LeaseSettings, QuotaSettings, Settings, StoreSettings, VaultSettings
from broker.testing import PolicyBuilder

T0 = datetime(2026, 3, 10, 12, 0, 0, tzinfo=UTC)

# Bearer tokens of the test principals (test-only values).
TOKENS = {name: f"kbt_test_{name}_{'x' * 24}" for name in
          ("alice", "bob", "carol", "reader", "admin", "nobody")}

POLICY = (
    PolicyBuilder()
    .role("consumer", rpcs=["KeyBroker/*"], pools=["free", "paid"],
          priorities=["high", "normal", "low"])
    .role("free_consumer", rpcs=["LeaseKey", "RenewLease", "ReportUsage", "Complete"],
          pools=["free"])
    .role("reader", rpcs=["ListKeys", "GetKey"], pools=["*"])
    .role("admin", rpcs=["*"], pools=["*"])
    .principal("alice", TOKENS["alice"], roles=["consumer"])
    .principal("bob", TOKENS["bob"], roles=["consumer"])
    .principal("carol", TOKENS["carol"], roles=["free_consumer"])
    .principal("reader", TOKENS["reader"], roles=["reader"])
    .principal("admin", TOKENS["admin"], roles=["admin"])
    .principal("nobody", TOKENS["nobody"], roles=[])
    .to_toml())
"""The shared policy: alice and bob consume free and paid (at any priority), carol only free
(normal and low priority), reader reads, admin does anything, nobody nothing."""

KeySpec = tuple[str, str]  # (name, account); account "" means the key is its own account


def make_settings(tmp_path: Path, vault: VaultSettings, policy: Path, **overrides: Any) -> Settings:
    """Settings for a test broker on 127.0.0.1:0; keyword overrides replace fields."""
    base = Settings(
        listen="127.0.0.1:0", policy_file=str(policy),
        store=StoreSettings(sqlite_path=str(tmp_path / "state.db")),
        vault=vault, lease=LeaseSettings(sweep_interval=0.05), quota=QuotaSettings())
    return dataclasses.replace(base, **overrides)


async def wait_until(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll ``cond`` every 20 ms; TimeoutError when it is still false after ``timeout`` s."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError("condition not met in time")
        await asyncio.sleep(0.02)
