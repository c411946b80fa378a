"""keybroker benchmark: LeaseKey against an empty RPC on the same server, in one run.

Self-contained: starts its own OpenBao dev server, bootstraps it, puts keys,
writes a one-token policy and runs the brokers in this process (gRPC on
127.0.0.1:0, SQLite in a temporary directory, quotas set out of reach). The
load comes from a separate client process, so the client never competes with
the server for the server's event loop.

Measured, each for a bounded time after a warm-up:
  * empty RPC  grpc.health.v1.Health/Check on the same server (the baseline);
  * LeaseKey   a lease and nothing else;
  * cycle      LeaseKey followed by Complete(used=true);
at 1 and 32 concurrent callers: throughput, p50/p99 latency and the ratio to
the empty RPC at the same concurrency. Then LeaseKey against pools of 10 (from
Vault), 1,000 and 10,000 keys (built in memory by a custom KeySource, since
putting 10,000 keys through Vault one by one takes minutes).

Cells are measured in interleaved rounds (empty, lease, cycle, 1,000 keys,
10,000 keys, then again), so a slow spell on the machine hits every cell alike
instead of skewing one ratio.

Usage: python bench/bench.py [--quick] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import math
import multiprocessing
import os
import platform
import secrets
import sys
import tempfile
import time
from array import array
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import duration_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from keybroker_client.v1 import keybroker_pb2 as pb
from keybroker_client.v1 import keybroker_pb2_grpc as pb_grpc

POOL = "bench"
PRINCIPAL = "bench"
VAULT_KEYS = 10
MEMORY_POOL_SIZES = (1000, 10000)
CONCURRENCY = (1, 32)
# Leases in the bench ask for this TTL so none expires (and the expiry sweep stays idle)
# while the bench runs; the work per LeaseKey does not depend on the TTL.
LEASE_TTL_S = 600
DEFAULT_OUT = Path(__file__).resolve().parent / "results.md"


def bench_policy(token: str) -> Any:
    """A PolicyBuilder whose one principal, ``PRINCIPAL`` with ``token``, may do anything."""
    from broker.testing import PolicyBuilder

    return PolicyBuilder().role("bench", rpcs=["*"], pools=["*"]).principal(
        PRINCIPAL, token, roles=["bench"])
FULL = {"warmup": 0.5, "window": 2.0, "rounds": 2}
QUICK = {"warmup": 0.2, "window": 1.0, "rounds": 1}


# -- client process ---------------------------------------------------------------------------


def _percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted list (0 for an empty one)."""
    if not sorted_values:
        return 0.0
    rank = max(1, math.ceil(q / 100.0 * len(sorted_values) - 1e-9))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def _operation(kind: str, channel: grpc.aio.Channel,
               token: str) -> Callable[[], Awaitable[None]]:
    md = (("authorization", f"Bearer {token}"),)
    if kind == "empty":
        health = health_pb2_grpc.HealthStub(channel)
        check = health_pb2.HealthCheckRequest()

        async def empty() -> None:
            await health.Check(check, metadata=md)

        return empty
    stub = pb_grpc.KeyBrokerStub(channel)
    lease_req = pb.LeaseKeyRequest(pool=POOL, ttl=duration_pb2.Duration(seconds=LEASE_TTL_S))
    if kind == "lease":

        async def lease() -> None:
            await stub.LeaseKey(lease_req, metadata=md)

        return lease
    if kind == "cycle":

        async def cycle() -> None:
            granted = await stub.LeaseKey(lease_req, metadata=md)
            await stub.Complete(pb.CompleteRequest(lease_id=granted.lease_id, used=True),
                                metadata=md)

        return cycle
    raise ValueError(f"unknown workload {kind!r}")


async def _measure(conn: Connection, channels: list[grpc.aio.Channel],
                   cmd: dict[str, Any]) -> dict[str, Any]:
    """Run one cell; send ("start",) and ("end",) at the window edges (for server CPU).

    With several channels (brokers), callers are spread over them round-robin.
    """
    ops = [_operation(cmd["kind"], channel, cmd["token"]) for channel in channels]
    t_start = time.perf_counter() + cmd["warmup"]
    t_end = t_start + cmd["window"]
    latencies = array("d")
    errors: list[str] = []
    cpu: dict[str, float] = {}

    async def caller(op: Callable[[], Awaitable[None]]) -> None:
        while True:
            t0 = time.perf_counter()
            if t0 >= t_end:
                return
            try:
                await op()
            except grpc.RpcError as exc:
                errors.append(f"{exc.code().name}: {exc.details()}")  # type: ignore[attr-defined]
                if len(errors) > 100:
                    return
                continue
            t1 = time.perf_counter()
            if t_start <= t1 <= t_end:  # completions inside the window
                latencies.append(t1 - t0)

    async def marks() -> None:
        await asyncio.sleep(max(0.0, t_start - time.perf_counter()))
        conn.send(("start",))
        cpu["start"] = time.process_time()
        await asyncio.sleep(max(0.0, t_end - time.perf_counter()))
        cpu["end"] = time.process_time()
        conn.send(("end",))

    callers = [asyncio.create_task(caller(ops[i % len(ops)]))
               for i in range(cmd["concurrency"])]
    try:
        await marks()
    finally:
        # Calls still in flight at the end of the window are not counted; cancel them
        # rather than wait (at a few calls/s a full round of 32 would take seconds).
        for task in callers:
            task.cancel()
        outcomes = await asyncio.gather(*callers, return_exceptions=True)
    for outcome in outcomes:
        if isinstance(outcome, BaseException) and not isinstance(outcome,
                                                                 asyncio.CancelledError):
            raise outcome
    return {"latencies": latencies, "errors": errors[:3], "error_count": len(errors),
            "client_cpu": cpu["end"] - cpu["start"]}


async def _client_loop(conn: Connection) -> None:
    loop = asyncio.get_running_loop()
    channels: dict[str, grpc.aio.Channel] = {}  # one per broker, reused across its cells
    try:
        while True:
            cmd = await loop.run_in_executor(None, conn.recv)
            if cmd is None:
                return
            if cmd == "close":  # before the brokers stop, so no call sees a GOAWAY
                for channel in channels.values():
                    await channel.close()
                channels.clear()
                conn.send(("closed", None))
                continue
            targets = cmd["target"] if isinstance(cmd["target"], list) else [cmd["target"]]
            for target in targets:
                if target not in channels:
                    channels[target] = grpc.aio.insecure_channel(target)
                    await asyncio.wait_for(channels[target].channel_ready(), 10)
            conn.send(("result", await _measure(conn, [channels[t] for t in targets], cmd)))
    finally:
        for channel in channels.values():
            await channel.close()


def client_process(conn: Connection) -> None:
    """Entry point of the load-generating process."""
    try:
        asyncio.run(_client_loop(conn))
    except (EOFError, KeyboardInterrupt, BrokenPipeError):
        pass
    finally:
        conn.close()


# -- server side ------------------------------------------------------------------------------


@dataclasses.dataclass
class Cell:
    """One (broker, workload, callers) combination, summed over its rounds."""

    label: str
    keys: int
    kind: str
    concurrency: int
    latencies: list[float] = dataclasses.field(default_factory=list)
    window: float = 0.0
    server_cpu: float = 0.0
    server_wall: float = 0.0
    client_cpu: float = 0.0

    @property
    def calls(self) -> int:
        return len(self.latencies)

    @property
    def rate(self) -> float:
        return self.calls / self.window

    def percentile_ms(self, q: float) -> float:
        return _percentile(sorted(self.latencies), q) * 1e3

    @property
    def server_us_per_call(self) -> float:
        return self.server_cpu / max(self.calls, 1) * 1e6

    @property
    def server_cores(self) -> float:
        return self.server_cpu / self.server_wall

    @property
    def client_cores(self) -> float:
        return self.client_cpu / self.window


class MemoryKeySource:
    """A KeySource with ``n`` keys built in memory (two keys per account), for pool scaling."""

    def __init__(self, n: int) -> None:
        from broker.models import Key, Secret

        self._keys = [Key(pool=POOL, name=f"k{i:05d}", account=f"acct-{i // 2:05d}",
                          secret=Secret(f"sk-or-v1-bench-{secrets.token_hex(24)}"))
                      for i in range(n)]

    async def load(self) -> list[Any]:
        return list(self._keys)


class Bench:
    def __init__(self, conn: Connection, token: str, warmup: float, window: float) -> None:
        self.conn = conn
        self.token = token
        self.warmup = warmup
        self.window = window

    async def recv(self, expected: str) -> Any:
        msg = await asyncio.to_thread(self.conn.recv)
        if msg[0] != expected:
            raise RuntimeError(f"client sent {msg!r}, expected {expected!r}")
        return msg[-1]

    async def run(self, port: int | list[int], cell: Cell,
                  pids: list[int] | None = None) -> None:
        """Measure one round of ``cell`` and add it to the cell's totals.

        ``pids``: broker processes whose CPU to count instead of this process's.
        """
        ports = port if isinstance(port, list) else [port]
        self.conn.send({"target": [f"127.0.0.1:{p}" for p in ports], "kind": cell.kind,
                        "concurrency": cell.concurrency, "warmup": self.warmup,
                        "window": self.window, "token": self.token})
        await self.recv("start")
        cpu0, wall0 = _cpu(pids), time.perf_counter()
        await self.recv("end")
        cpu1, wall1 = _cpu(pids), time.perf_counter()
        r = await self.recv("result")
        name = f"{cell.label} {cell.kind} x{cell.concurrency}"
        if r["error_count"]:
            raise RuntimeError(f"{name}: {r['error_count']} failed calls, e.g. {r['errors']}")
        if not r["latencies"]:
            raise RuntimeError(f"{name}: no call completed in the window")
        cell.latencies.extend(r["latencies"])
        cell.window += self.window
        cell.server_cpu += cpu1 - cpu0
        cell.server_wall += wall1 - wall0
        cell.client_cpu += r["client_cpu"]
        print(f"  {name:>28}  {len(r['latencies']) / self.window:9.0f}/s", file=sys.stderr)


def _cpu(pids: list[int] | None) -> float:
    """CPU seconds of this process, or of the given processes (from /proc)."""
    if not pids:
        return time.process_time()
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / ticks  # utime + stime
    return total


async def _start_broker(settings: Any, key_source: Any = None) -> Any:
    from broker.runtime import Broker

    broker = Broker(settings, key_source=key_source)
    await broker.start()
    deadline = time.monotonic() + 60
    while not (broker.engine.ready and broker.source_error is None):
        if time.monotonic() > deadline:
            await broker.stop(0)
            raise TimeoutError(f"broker did not load its keys: {broker.source_error}")
        await asyncio.sleep(0.05)
    return broker


async def run_all(bench: Bench, settings: Any, tmp: Path, rounds: int,
                  redis_url: str = "", processes: list[Any] | None = None,
                  cluster_url: str = "") -> list[Cell]:
    """Start the Vault broker and one broker per in-memory pool, then measure every cell."""
    from broker.config import StoreBackend

    processes = processes or []
    brokers: dict[int, Any] = {}
    try:
        brokers[VAULT_KEYS] = await _start_broker(settings)
        for n in MEMORY_POOL_SIZES:
            store = dataclasses.replace(settings.store, sqlite_path=str(tmp / f"keys-{n}.db"))
            brokers[n] = await _start_broker(dataclasses.replace(settings, store=store),
                                             MemoryKeySource(n))
        redis_broker = None
        if redis_url:
            redis_store = dataclasses.replace(settings.store, backend=StoreBackend.REDIS,
                                              redis_url=redis_url, redis_prefix="bench-inproc")
            redis_broker = await _start_broker(dataclasses.replace(settings, store=redis_store))
        cluster_broker = None
        if cluster_url:
            cluster_store = dataclasses.replace(
                settings.store, backend=StoreBackend.REDIS, redis_url=cluster_url,
                redis_prefix="bench-cluster", redis_cluster=True)
            cluster_broker = await _start_broker(dataclasses.replace(settings, store=cluster_store))
        on_redis = {"redis": redis_broker, "redis-cluster": cluster_broker}
        cells: list[Cell] = []
        for c in CONCURRENCY:
            row = [Cell("main", VAULT_KEYS, kind, c) for kind in ("empty", "lease", "cycle")]
            row += [Cell(f"{n} keys", n, "lease", c) for n in MEMORY_POOL_SIZES]
            for label, broker in on_redis.items():
                if broker is not None:
                    row += [Cell(label, VAULT_KEYS, kind, c) for kind in ("empty", "lease",
                                                                          "cycle")]
            for _ in range(rounds):
                for cell in row:
                    on = on_redis.get(cell.label)
                    await bench.run(on.port if on else brokers[cell.keys].port, cell)
            cells += row
        for broker in on_redis.values():
            if broker is not None:
                await broker.stop(0)
        if processes:
            row = [Cell(f"{n} process(es)", VAULT_KEYS, kind, 32) for n in (1, 2)
                   for kind in ("empty", "lease")]
            for _ in range(rounds):
                for cell in row:
                    n = int(cell.label.split()[0])
                    await bench.run([p.port for p in processes[:n]], cell,
                                    pids=[p.pid for p in processes[:n]])
            cells += row
        bench.conn.send("close")
        await bench.recv("closed")
        return cells
    finally:
        for broker in brokers.values():
            await broker.stop(0)


# -- report -----------------------------------------------------------------------------------

_NAMES = {"empty": "empty RPC (Health/Check)", "lease": "LeaseKey",
          "cycle": "LeaseKey + Complete (cycle)"}


def _ratio(x: float) -> str:
    return f"{x:.2f}" if x >= 0.1 else f"{x:.3f}"


def _latency(cell: Cell, warmup: float) -> tuple[str, str, bool]:
    if cell.concurrency / cell.rate > warmup:  # Little's law: mean latency > the warm-up
        return "n/a", "n/a", True
    return f"{cell.percentile_ms(50):,.2f}", f"{cell.percentile_ms(99):,.2f}", False


def render(cells: list[Cell], *, quick: bool, warmup: float, window: float, rounds: int,
           elapsed: float, load: tuple[float, float]) -> str:
    main = [c for c in cells if c.label == "main" or c.label.endswith(" keys")]
    extra = [c for c in cells if c not in main]
    cells = main
    empty = {c.concurrency: c.rate for c in cells if c.kind == "empty"}
    empty_cpu = {c.concurrency: c.server_us_per_call for c in cells if c.kind == "empty"}
    lease10 = {c.concurrency: c.rate for c in cells if c.kind == "lease" and c.keys == VAULT_KEYS}
    lines = [
        "# keybroker benchmark" + (" (--quick smoke run, not representative)" if quick else ""),
        "",
        f"Run {datetime.now(UTC):%Y-%m-%d %H:%M} UTC on {os.cpu_count()} CPU(s), "
        f"Python {platform.python_version()}, grpcio {grpc.__version__}, "
        f"{platform.machine()}. Each cell: {rounds} interleaved round(s) of {warmup:g} s "
        f"warm-up + {window:g} s measured; whole run {elapsed:.0f} s. 1-minute load average "
        f"before/after: {load[0]:.2f}/{load[1]:.2f} (anything else running on the machine "
        "skews the numbers, the ratios less than the absolute values).",
        "",
        "Server: brokers in one process (grpc.aio, SQLite WAL in a temp dir, audit log rendered "
        "as JSON to /dev/null), keys from a local OpenBao dev server. Load: one separate "
        "client process (grpc.aio, one channel per broker, N concurrent callers, each calling "
        "back to back). Server and client share the machine's cores.",
        "",
        "## LeaseKey vs an empty RPC on the same server "
        f"({VAULT_KEYS} keys from Vault, round_robin)",
        "",
        "| workload | callers | calls | calls/s | p50 ms | p99 ms | ratio to empty RPC "
        "| server CPU us/call | CPU ratio | server CPU (cores) | client CPU (cores) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    unsteady: list[Cell] = []
    for kind in ("empty", "lease", "cycle"):
        for c in (c for c in cells if c.keys == VAULT_KEYS and c.kind == kind):
            p50, p99, flag = _latency(c, warmup)
            if flag and all(c is not u for u in unsteady):
                unsteady.append(c)
            lines.append(
                f"| {_NAMES[c.kind]} | {c.concurrency} | {c.calls:,} | {c.rate:,.0f} | {p50} | "
                f"{p99} | {_ratio(c.rate / empty[c.concurrency])} | "
                f"{c.server_us_per_call:,.0f} | "
                f"{_ratio(empty_cpu[c.concurrency] / c.server_us_per_call)} | "
                f"{c.server_cores:.2f} | {c.client_cores:.2f} |")
    lines += [
        "",
        "ratio = calls/s of the row / calls/s of the empty RPC at the same number of callers "
        "(a cycle is two RPCs, counted once). Server CPU is the broker process's CPU time "
        "(all threads, gRPC's included) during the windows, per call completed and per second "
        "of wall time. CPU ratio = server CPU per empty RPC / server CPU per call of the row: "
        "the throughput ratio a saturated server would show, and less sensitive than "
        "calls/s to other load on the machine. The broker serves RPCs on one asyncio thread: "
        "at about 1.0 core it is saturated; well below that, something else had the CPU.",
        "",
        "## LeaseKey vs pool size",
        "",
        "| keys | key source | callers | calls | calls/s | p50 ms | p99 ms | ratio to empty RPC "
        f"| ratio to {VAULT_KEYS} keys | server CPU us/call | CPU ratio |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n in (VAULT_KEYS, *MEMORY_POOL_SIZES):
        for c in (c for c in cells if c.keys == n and c.kind == "lease"):
            source = "Vault (OpenBao)" if n == VAULT_KEYS else "in-memory KeySource"
            p50, p99, flag = _latency(c, warmup)
            if flag and all(c is not u for u in unsteady):
                unsteady.append(c)
            lines.append(
                f"| {n:,} | {source} | {c.concurrency} | {c.calls:,} | {c.rate:,.0f} | {p50} | "
                f"{p99} | {_ratio(c.rate / empty[c.concurrency])} | "
                f"{_ratio(c.rate / lease10[c.concurrency])} | {c.server_us_per_call:,.0f} | "
                f"{_ratio(empty_cpu[c.concurrency] / c.server_us_per_call)} |")
    lines += [
        "",
        f"The {VAULT_KEYS}-key rows are the LeaseKey rows above. The 1,000- and 10,000-key "
        "pools run on brokers of their own (own SQLite file) whose KeySource builds the keys "
        "in memory instead of reading them from Vault: putting 10,000 keys through Vault one "
        "by one takes minutes, and the broker holds decrypted keys in memory either way, so "
        "the lease path is the same. Two keys per account; quotas out of reach (10^9/day "
        "and /minute); round_robin. Ratios use the baseline measured in this run.",
    ]
    lines += _render_redis(extra, warmup)
    if unsteady:
        means = ", ".join(f"{c.label} x{c.concurrency}: {c.concurrency / c.rate * 1e3:,.0f} ms"
                          for c in unsteady)
        lines += [
            "",
            "n/a: the mean latency (callers / calls/s, Little's law, as every caller calls "
            "back to back) exceeds the warm-up, so the windows saw the start-up queue rather "
            f"than a steady state and the percentiles would be biased low. Mean latency: "
            f"{means}.",
        ]
    lines.append("")
    return "\n".join(lines)


def _render_redis(cells: list[Cell], warmup: float) -> list[str]:
    """The Redis-store tables: one broker in this process, then 1 vs 2 broker processes."""
    if not cells:
        return ["", "## Redis store", "", "Skipped: no redis-server binary was found."]
    lines = ["", "## Redis store (one redis-server, and a Redis Cluster of three, AOF off, "
             "on this machine)", "",
             "| broker | workload | callers | calls | calls/s | p50 ms | p99 ms "
             "| ratio to empty RPC | server CPU us/call | CPU ratio |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for label in dict.fromkeys(c.label for c in cells):
        group = [c for c in cells if c.label == label]
        empty = {c.concurrency: c for c in group if c.kind == "empty"}
        for c in group:
            p50, p99, _ = _latency(c, warmup)
            base = empty[c.concurrency]
            who = {"redis": "in-process (Redis)",
                   "redis-cluster": "in-process (Redis Cluster of 3)"}.get(
                       label, f"{label} on one Redis")
            lines.append(
                f"| {who} | {_NAMES[c.kind]} | {c.concurrency} | {c.calls:,} | {c.rate:,.0f} | "
                f"{p50} | {p99} | {_ratio(c.rate / base.rate)} | {c.server_us_per_call:,.0f} | "
                f"{_ratio(base.server_us_per_call / c.server_us_per_call)} |")
    one = next((c for c in cells if c.label == "1 process(es)" and c.kind == "lease"), None)
    two = next((c for c in cells if c.label == "2 process(es)" and c.kind == "lease"), None)
    if one and two:
        lines += ["", f"Two broker processes on one Redis serve {two.rate / one.rate:.2f}x the "
                  "LeaseKey throughput of one (32 callers spread over them; the client process "
                  "and both brokers share this machine's cores). Server CPU for these rows is "
                  "the broker processes' own (from /proc). Every LeaseKey on Redis is one "
                  "script call: one round trip (on the cluster too: these leases carry no "
                  "request_id, and the first account tried has room)."]
    return lines


# -- main -------------------------------------------------------------------------------------


def _start_redis() -> Any:
    """A redis-server of the bench's own, or None when there is none."""
    try:
        from broker.testing import RedisServer

        return RedisServer().start()
    except (ImportError, FileNotFoundError, RuntimeError, TimeoutError) as exc:
        print(f"bench: no Redis ({exc}); skipping the Redis rows", file=sys.stderr)
        return None


def _start_redis_cluster() -> Any:
    """A Redis Cluster of three redis-servers, or None."""
    try:
        from broker.testing import RedisClusterNodes

        return RedisClusterNodes().start()
    except (ImportError, FileNotFoundError, RuntimeError, TimeoutError) as exc:
        print(f"bench: no Redis Cluster ({exc}); skipping its rows", file=sys.stderr)
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="short smoke run (~20 s); prints the tables, writes no file "
                             "unless --out is given")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"Markdown file to write (default: {DEFAULT_OUT.name} beside "
                             "this script; none with --quick)")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    out = args.out if args.out is not None else (None if args.quick else DEFAULT_OUT)

    from broker.config import QuotaSettings, Settings, StoreSettings, VaultSettings
    from broker.logging import configure_logging
    from broker.testing import BaoDevServer, BrokerProcess
    from broker.vault import VaultAdmin, VaultSession

    began = time.monotonic()
    load_before = os.getloadavg()[0]
    devnull = open(os.devnull, "w")  # noqa: SIM115 - lives for the whole run, closed below
    configure_logging("info", "json", stream=devnull)
    token = "kbt_bench_" + secrets.token_hex(16)
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    client = ctx.Process(target=client_process, args=(child,), name="bench-client")
    try:
        with tempfile.TemporaryDirectory(prefix="kb-bench-") as tmpdir, BaoDevServer() as bao:
            tmp = Path(tmpdir)
            vault = VaultSettings(addr=bao.addr, token=bao.root_token, key_prefix="bench",
                                  reload_interval=3600.0)
            admin = VaultAdmin(VaultSession(vault))
            admin.bootstrap()
            for i in range(VAULT_KEYS):
                admin.put_key(POOL, f"k{i:05d}", f"sk-or-v1-bench-{secrets.token_hex(24)}",
                              account=f"acct-{i // 2:05d}")
            policy = bench_policy(token).write(tmp / "policy.toml")
            settings = Settings(
                listen="127.0.0.1:0", policy_file=str(policy),
                store=StoreSettings(sqlite_path=str(tmp / "main.db")), vault=vault,
                quota=QuotaSettings(daily_limit=10**9, minute_limit=10**9))
            redis = _start_redis()
            cluster = _start_redis_cluster() if redis is not None else None
            processes: list[BrokerProcess] = []
            if redis is not None:
                env = {**os.environ, "KEYBROKER_POLICY_FILE": str(policy),
                       "KEYBROKER_STORE_BACKEND": "redis", "KEYBROKER_STORE_REDIS_URL": redis.url,
                       "KEYBROKER_STORE_REDIS_PREFIX": "bench-procs",
                       "KEYBROKER_VAULT_ADDR": bao.addr, "KEYBROKER_VAULT_TOKEN": bao.root_token,
                       "KEYBROKER_VAULT_KEY_PREFIX": "bench",
                       "KEYBROKER_QUOTA_DAILY_LIMIT": str(10**9),
                       "KEYBROKER_QUOTA_MINUTE_LIMIT": str(10**9),
                       "KEYBROKER_LOG_LEVEL": "warning"}
                try:
                    for i in range(2):
                        processes.append(BrokerProcess(env, name=f"bench broker {i}").start())
                        processes[-1].wait_serving_blocking(60)
                except BaseException:
                    for proc in processes:
                        proc.stop()
                    raise
            client.start()
            child.close()
            print(f"bench: OpenBao at {bao.addr}, {VAULT_KEYS} keys put; measuring "
                  f"{plan['rounds']} round(s) of {plan['warmup']:g} s warm-up + "
                  f"{plan['window']:g} s per cell", file=sys.stderr)
            try:
                cells = asyncio.run(run_all(
                    Bench(parent, token, plan["warmup"], plan["window"]), settings, tmp,
                    plan["rounds"], redis_url=redis.url if redis else "", processes=processes,
                    cluster_url=cluster.url if cluster else ""))
            finally:
                for proc in processes:
                    proc.stop()
                if redis is not None:
                    redis.close()
                if cluster is not None:
                    cluster.close()
    finally:
        if client.is_alive():
            with contextlib.suppress(BrokenPipeError, OSError):
                parent.send(None)
            client.join(10)
        if client.is_alive():
            client.terminate()
            client.join(5)
        parent.close()
        child.close()
        devnull.close()
    text = render(cells, quick=args.quick, warmup=plan["warmup"], window=plan["window"],
                  rounds=plan["rounds"], elapsed=time.monotonic() - began,
                  load=(load_before, os.getloadavg()[0]))
    print(text)
    if out is not None:
        out.write_text(text)
        print(f"bench: wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
