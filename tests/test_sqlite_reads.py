"""The SQLite store keeps reads that grow with the data off the event loop."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path

from broker.models import Window
from broker.store import Candidate, Reservation, ReserveRequest
from broker.store.sqlite import SQLiteStore

ROWS = 300_000


def _fill_usage(path: Path) -> None:
    db = sqlite3.connect(path)
    buckets = json.dumps([0] * 8)
    db.executemany(
        "INSERT INTO usage(day, key_id, account, model, principal, requests, failures, "
        "prompt_tokens, completion_tokens, cost, latency_ms_sum, latency_buckets) "
        "VALUES ('2026-01-01', ?, 'acct', ?, 'p', 1, 0, 1, 1, 0.0, 5, ?)",
        ((f"pool/k{i % 100}", f"model-{i}", buckets) for i in range(ROWS)))
    db.commit()
    db.close()


async def test_a_lease_is_not_held_up_by_a_large_usage_read(tmp_path):
    """A reservation started while 300,000 usage rows are being read completes before that read."""
    path = tmp_path / "state.db"
    store = SQLiteStore(path)
    store.open()
    _fill_usage(path)
    order: list[str] = []

    async def read_usage() -> None:
        rows = await store.usage("2026-01-01", "2026-01-01")
        assert len(rows) == ROWS
        order.append("usage")

    async def lease() -> None:
        await asyncio.sleep(0)  # the usage read is under way first
        result = await store.reserve(ReserveRequest(
            lease_id="ls_1", principal="p", request_id="", pool="pool", model="m", units=1,
            created_at=100.0, expires_at=160.0,
            candidates=[Candidate("pool/k1", "acct", (Window("day", 10, 1000.0, "day"),))]))
        assert isinstance(result, Reservation)
        order.append("lease")

    try:
        await asyncio.gather(read_usage(), lease())
    finally:
        await store.close()
    assert order == ["lease", "usage"]


async def test_reads_on_the_reader_see_what_was_just_written(tmp_path):
    """A count written by a reservation is read back at once through the reader connection."""
    store = SQLiteStore(tmp_path / "state.db")
    try:
        result = await store.reserve(ReserveRequest(
            lease_id="ls_1", principal="p", request_id="", pool="pool", model="m", units=2,
            created_at=100.0, expires_at=160.0,
            candidates=[Candidate("pool/k1", "acct", (Window("day", 10, 1000.0, "day"),))]))
        assert isinstance(result, Reservation)
        assert await store.counters([("acct", "day")]) == {"day": 2}
        assert await store.live_counters(100.0) == {"day": 2}
        assert await store.active_leases(100.0) == {"pool/k1": 1}
    finally:
        await store.close()
