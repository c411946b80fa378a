"""Usage analytics: GetUsage grouped by day, key, account, model and principal; the CLI."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from keybroker_client import InvalidArgument, PermissionDenied

from broker.config import QuotaSettings
from tests.support import TOKENS


async def _traffic(broker, connect, clock):
    """Yesterday: alice 2 calls; today: alice 3 (one 503), bob 1 on another model."""
    alice, bob = connect(broker, "alice"), connect(broker, "bob")
    clock.advance(-86400)
    for latency in (120, 180):
        lease = await alice.lease_key("free", model="m/a:free")
        await lease.report(http_status=200, latency_ms=latency, prompt_tokens=10,
                           completion_tokens=5, cost=0.001)
    clock.advance(86400)
    for status, latency in ((200, 300), (503, 50), (200, 3000)):
        lease = await alice.lease_key("free", model="m/a:free")
        await lease.report(http_status=status, latency_ms=latency, prompt_tokens=10)
    lease = await bob.lease_key("free", model="m/b:free")
    await lease.report(http_status=200, latency_ms=900, completion_tokens=7)


async def test_usage_grouped_by_day_and_principal(start_broker, put_keys, connect, clock):
    """GetUsage sums requests, failures, tokens and cost per group, over the days asked."""
    put_keys("free", [("k1", "acct-a"), ("k2", "acct-b")])
    broker = await start_broker(quota=QuotaSettings(daily_limit=50, minute_limit=100))
    await _traffic(broker, connect, clock)
    admin = connect(broker, "admin")
    rows = {tuple(r.group): r for r in await admin.usage(2, ["day", "principal"])}
    assert set(rows) == {("2026-03-09", "alice"), ("2026-03-10", "alice"),
                         ("2026-03-10", "bob")}
    y = rows[("2026-03-09", "alice")]
    assert (y.requests, y.failures, y.prompt_tokens, y.completion_tokens) == (2, 0, 20, 10)
    assert y.cost == pytest.approx(0.002)
    assert y.latency_ms_avg == pytest.approx(150)
    t = rows[("2026-03-10", "alice")]
    assert (t.requests, t.failures) == (3, 1)
    assert (t.latency_ms_p50, t.latency_ms_p99) == (500.0, 4000.0)
    today = await admin.usage(1, ["model"])
    assert [(tuple(r.group), r.requests) for r in today] == [(("m/a:free",), 3),
                                                             (("m/b:free",), 1)]
    everything = await admin.usage(7, [])
    assert len(everything) == 1 and everything[0].requests == 6


async def test_usage_by_key_and_account(start_broker, put_keys, connect, clock):
    """Grouping by key or account splits the same reports along the pool's keys."""
    put_keys("free", [("k1", "acct-a"), ("k2", "acct-b")])
    broker = await start_broker(quota=QuotaSettings(daily_limit=50, minute_limit=100))
    await _traffic(broker, connect, clock)
    admin = connect(broker, "admin")
    by_key = {r.group[0]: r.requests for r in await admin.usage(2, ["key"])}
    by_account = {r.group[0]: r.requests for r in await admin.usage(2, ["account"])}
    assert sum(by_key.values()) == 6 and set(by_key) <= {"free/k1", "free/k2"}
    assert by_account == {"acct-a": by_key.get("free/k1", 0), "acct-b": by_key.get("free/k2", 0)}


async def test_usage_needs_permission_and_valid_arguments(start_broker, put_keys, connect):
    """GetUsage is denied by default and rejects bad days, dimensions and pools."""
    put_keys("free", [("k1", "acct-a")])
    broker = await start_broker()
    with pytest.raises(PermissionDenied):
        await connect(broker, "alice").usage(1, ["day"])
    admin = connect(broker, "admin")
    for days, dims, pool in ((400, ["day"], ""), (1, ["day", "day"], ""), (1, ["day"], "bad pool")):
        with pytest.raises(InvalidArgument):
            await admin.usage(days, dims, pool)
    from keybroker_client.v1 import keybroker_pb2 as pb
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await admin.admin.GetUsage(pb.GetUsageRequest(days=1, group_by=[0]),
                                   metadata=admin._metadata)
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT


async def test_usage_command_prints_csv_json_and_a_plot(start_broker, put_keys, connect, clock,
                                                        tmp_path):
    """`keybroker usage` prints CSV or JSON and writes a PNG chart of daily use per key."""
    put_keys("free", [("k1", "acct-a"), ("k2", "acct-b")])
    broker = await start_broker(quota=QuotaSettings(daily_limit=50, minute_limit=100))
    await _traffic(broker, connect, clock)
    exe = str(Path(sys.executable).parent / "keybroker")
    env = {**os.environ, "KEYBROKER_TOKEN": TOKENS["admin"],
           "KEYBROKER_TARGET": f"127.0.0.1:{broker.port}"}

    def run(*args: str) -> str:
        return subprocess.run([exe, "usage", *args], capture_output=True, text=True, env=env,
                              check=True).stdout

    as_json = json.loads(await asyncio.to_thread(run, "--days", "2", "--by", "principal",
                                                 "--json"))
    assert {r["principal"]: r["requests"] for r in as_json} == {"alice": 5, "bob": 1}
    as_csv = (await asyncio.to_thread(run, "--days", "2", "--by", "day", "--csv")).splitlines()
    assert as_csv[0].startswith("day,requests,failures")
    assert [line.split(",")[:2] for line in as_csv[1:]] == [["2026-03-09", "2"],
                                                           ["2026-03-10", "4"]]
    png = tmp_path / "usage.png"
    await asyncio.to_thread(run, "--days", "2", "--plot", str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 2000
