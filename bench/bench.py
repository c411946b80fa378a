"""keybroker benchmark: the broker as deployed against an empty RPC and a bare grpc.aio server.

Self-contained: starts its own OpenBao dev server (10 keys put through Vault), a
redis-server, and three server processes, each on a free port:
  * ``keybroker serve`` on SQLite (WAL, in a temporary directory),
  * ``keybroker serve`` on Redis,
  each as deployed: an audit file on disk (hash-chained, flushed per record), the
  Prometheus endpoint on, JSON logs at level info to a file, keys from OpenBao;
  * the floor: a bare grpc.aio server with no interceptors answering one empty unary
    RPC (the ``grpc.health.v1.Health/Check`` method, a fixed answer), in its own process.
The load comes from one separate client process (grpc.aio, N callers back to back).

Workloads, each at 1 and 32 callers, measured for a bounded window after a warm-up:
  * floor        the empty RPC on the bare server;
  * empty        Health/Check on the broker (its interceptor passes health through);
  * lease        LeaseKey alone;
  * lease+report LeaseKey then ReportUsage(200);
  * cycle        LeaseKey, ReportUsage(200), Complete(used=true): what a client does.
ReportUsage's and Complete's rows are derived: their latency is the client's timing of
that call inside its workload, their server CPU the workload's CPU per call less the
workload without them (same run). Server CPU comes from /proc of the server process.
Handler cost = server CPU per call less the empty RPC's on the same broker.

Cells are measured in interleaved rounds, so a slow spell on the machine hits every
cell alike. Pool-size and worker rows live in their own scripts.

Usage: python bench/bench.py [--quick] [--out FILE]
       python bench/bench.py --floor-server PORT   (the floor process; used by the bench)
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
CONCURRENCY = (1, 32)
# Leases in the bench ask for this TTL so none expires (and the expiry sweep stays idle)
# while the bench runs; the work per LeaseKey does not depend on the TTL.
LEASE_TTL_S = 600
DEFAULT_OUT = Path(__file__).resolve().parent / "results.md"
FULL = {"warmup": 0.5, "window": 2.0, "rounds": 3}
QUICK = {"warmup": 0.3, "window": 1.0, "rounds": 1}
KINDS = ("empty", "lease", "report", "cycle")  # per broker; the floor has "floor" only
# Targets of issue 18 at 32 callers: handler cost (server CPU per call less the empty RPC's)
# in microseconds, and LeaseKey's p99 over the empty RPC's p99.
HANDLER_TARGET_US = {("sqlite", "LeaseKey"): 120, ("redis", "LeaseKey"): 160,
                     ("sqlite", "ReportUsage"): 100, ("redis", "ReportUsage"): 100,
                     ("sqlite", "Complete"): 100, ("redis", "Complete"): 100}
P99_RATIO_TARGET = 1.5


def bench_policy(token: str) -> Any:
    """A PolicyBuilder whose one principal, ``PRINCIPAL`` with ``token``, may do anything."""
    from broker.testing import PolicyBuilder

    return PolicyBuilder().role("bench", rpcs=["*"], pools=["*"]).principal(
        PRINCIPAL, token, roles=["bench"])


# -- the floor: a bare grpc.aio server --------------------------------------------------------


async def _floor_server(port: int) -> None:
    """An empty unary RPC (Health/Check, a fixed answer) on grpc.aio, no interceptors."""
    answer = health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)

    async def check(request: Any, context: Any) -> Any:
        return answer

    handler = grpc.method_handlers_generic_handler("grpc.health.v1.Health", {
        "Check": grpc.unary_unary_rpc_method_handler(
            check, request_deserializer=health_pb2.HealthCheckRequest.FromString,
            response_serializer=health_pb2.HealthCheckResponse.SerializeToString)})
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


# -- client process ---------------------------------------------------------------------------


def _percentile(sorted_values: list[float] | array[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted list (0 for an empty one)."""
    if not sorted_values:
        return 0.0
    rank = max(1, math.ceil(q / 100.0 * len(sorted_values) - 1e-9))
    return sorted_values[min(rank, len(sorted_values)) - 1]


Stage = Callable[[Any], Awaitable[Any]]


def _operation(kind: str, channel: grpc.aio.Channel, token: str) -> list[tuple[str, Stage]]:
    """The calls of one workload, in order: (name, call given the previous call's answer)."""
    md = (("authorization", f"Bearer {token}"),)
    if kind in ("empty", "floor"):
        health = health_pb2_grpc.HealthStub(channel)
        check = health_pb2.HealthCheckRequest()

        async def empty(_: Any) -> Any:
            return await health.Check(check, metadata=md)

        return [(kind, empty)]
    stub = pb_grpc.KeyBrokerStub(channel)
    lease_req = pb.LeaseKeyRequest(pool=POOL, ttl=duration_pb2.Duration(seconds=LEASE_TTL_S))

    async def lease(_: Any) -> Any:
        return await stub.LeaseKey(lease_req, metadata=md)

    async def report(granted: Any) -> Any:
        await stub.ReportUsage(pb.ReportUsageRequest(
            lease_id=granted.lease_id, http_status=200, prompt_tokens=12, completion_tokens=34,
            latency_ms=250), metadata=md)
        return granted

    async def complete(granted: Any) -> Any:
        return await stub.Complete(pb.CompleteRequest(lease_id=granted.lease_id, used=True),
                                   metadata=md)

    stages: dict[str, list[tuple[str, Stage]]] = {
        "lease": [("lease", lease)],
        "report": [("lease", lease), ("report", report)],
        "cycle": [("lease", lease), ("report", report), ("complete", complete)]}
    if kind not in stages:
        raise ValueError(f"unknown workload {kind!r}")
    return stages[kind]


async def _measure(conn: Connection, channel: grpc.aio.Channel | list[grpc.aio.Channel],
                   cmd: dict[str, Any]) -> dict[str, Any]:
    """Run one cell; send ("start",) and ("end",) at the window edges (for server CPU).

    Latencies: of the whole workload ("total") and of each call in it, for workloads that
    finished inside the window. Given several channels (bench/workers.py: one connection
    each, so the kernel spreads them over a broker's workers), caller i uses channel i mod n.
    """
    channels = channel if isinstance(channel, list) else [channel]
    plans = [_operation(cmd["kind"], ch, cmd["token"]) for ch in channels]
    stages = plans[0]
    t_start = time.perf_counter() + cmd["warmup"]
    t_end = t_start + cmd["window"]
    latencies: dict[str, array[float]] = {name: array("d") for name, _ in stages}
    latencies["total"] = array("d")
    errors: list[str] = []
    cpu: dict[str, float] = {}
    perf = time.perf_counter

    async def caller(i: int) -> None:
        stages = plans[i % len(plans)]
        took = [0.0] * len(stages)
        while True:
            t0 = perf()
            if t0 >= t_end:
                return
            try:
                answer, t = None, t0
                for i, (_, call) in enumerate(stages):
                    answer = await call(answer)
                    now = perf()
                    took[i], t = now - t, now
            except grpc.RpcError as exc:
                errors.append(f"{exc.code().name}: {exc.details()}")  # type: ignore[attr-defined]
                if len(errors) > 100:
                    return
                continue
            if t_start <= t <= t_end:  # workloads completed inside the window
                latencies["total"].append(t - t0)
                for i, (name, _) in enumerate(stages):
                    latencies[name].append(took[i])

    async def marks() -> None:
        await asyncio.sleep(max(0.0, t_start - perf()))
        conn.send(("start",))
        cpu["start"] = time.process_time()
        await asyncio.sleep(max(0.0, t_end - perf()))
        cpu["end"] = time.process_time()
        conn.send(("end",))

    callers = [asyncio.create_task(caller(i)) for i in range(cmd["concurrency"])]
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
    return {"latencies": {k: v.tolist() for k, v in latencies.items()}, "errors": errors[:3],
            "error_count": len(errors), "client_cpu": cpu["end"] - cpu["start"]}


async def _client_loop(conn: Connection) -> None:
    loop = asyncio.get_running_loop()
    channels: dict[str, grpc.aio.Channel] = {}  # one per server, reused across its cells
    try:
        while True:
            cmd = await loop.run_in_executor(None, conn.recv)
            if cmd is None:
                return
            if cmd == "close":  # before the servers stop, so no call sees a GOAWAY
                for channel in channels.values():
                    await channel.close()
                channels.clear()
                conn.send(("closed", None))
                continue
            target = cmd["target"]
            if target not in channels:
                channels[target] = grpc.aio.insecure_channel(target)
                await asyncio.wait_for(channels[target].channel_ready(), 10)
            conn.send(("result", await _measure(conn, channels[target], cmd)))
    finally:
        for channel in channels.values():
            await channel.close()


def serve_client(conn: Connection, loop: Callable[[Connection], Awaitable[None]]) -> None:
    """Run a load client's command ``loop`` on ``conn`` until the parent hangs up."""
    try:
        asyncio.run(loop(conn))
    except (EOFError, KeyboardInterrupt, BrokenPipeError):
        pass
    finally:
        conn.close()


def client_process(conn: Connection) -> None:
    """Entry point of the load-generating process."""
    serve_client(conn, _client_loop)


def stop_client(client: Any, parent: Connection, child: Connection) -> None:
    """Ask the load client to leave, end it if it does not, and close both pipe ends."""
    if client.is_alive():
        with contextlib.suppress(BrokenPipeError, OSError):
            parent.send(None)
        client.join(10)
    if client.is_alive():
        client.terminate()
        client.join(5)
    parent.close()
    child.close()


# -- server side ------------------------------------------------------------------------------


@dataclasses.dataclass
class Cell:
    """One (server, workload, callers) combination, summed over its rounds."""

    label: str
    keys: int
    kind: str
    concurrency: int
    latencies: list[float] = dataclasses.field(default_factory=list)  # whole workloads
    stages: dict[str, list[float]] = dataclasses.field(default_factory=dict)  # per call
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

    def percentile_ms(self, q: float, stage: str = "") -> float:
        values = self.stages[stage] if stage else self.latencies
        return _percentile(sorted(values), q) * 1e3

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
    """A KeySource with ``n`` keys built in memory (two keys per account), for in-process
    runs (bench/cpu.py)."""

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

    async def run(self, port: int, cell: Cell, pids: list[int] | None = None) -> None:
        """Measure one round of ``cell`` and add it to the cell's totals.

        ``pids``: server processes whose CPU to count instead of this process's.
        """
        self.conn.send({"target": f"127.0.0.1:{port}", "kind": cell.kind,
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
        if not r["latencies"]["total"]:  # a stall of the machine: the other rounds count
            print(f"bench: {name}: no call completed in this window", file=sys.stderr)
        done = r["latencies"].pop("total")
        cell.latencies.extend(done)
        for stage, values in r["latencies"].items():
            cell.stages.setdefault(stage, []).extend(values)
        cell.window += self.window
        cell.server_cpu += cpu1 - cpu0
        cell.server_wall += wall1 - wall0
        cell.client_cpu += r["client_cpu"]
        print(f"  {name:>24}  {len(done) / self.window:9.0f}/s", file=sys.stderr)


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
    """An in-process broker (bench/cpu.py), once it has loaded its keys."""
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


@dataclasses.dataclass
class Server:
    """A server process under load: where it listens and its pid (for /proc CPU)."""

    label: str
    port: int
    pid: int


async def run_all(bench: Bench, servers: list[Server], rounds: int) -> list[Cell]:
    """Every cell of every server, in interleaved rounds."""
    cells: list[Cell] = []
    for c in CONCURRENCY:
        row = []
        for server in servers:
            kinds = ("floor",) if server.label == "floor" else KINDS
            row += [Cell(server.label, VAULT_KEYS, kind, c) for kind in kinds]
        by_label = {s.label: s for s in servers}
        for _ in range(rounds):
            for cell in row:
                server = by_label[cell.label]
                await bench.run(server.port, cell, pids=[server.pid])
        cells += row
    bench.conn.send("close")
    await bench.recv("closed")
    return cells


async def profile(bench: Bench, servers: list[Server], out: Path, seconds: float,
                  native: bool = False) -> None:
    """py-spy record of each server under LeaseKey, and under the cycle, at 32 callers."""
    beside = Path(sys.executable).with_name("py-spy")
    spy = str(beside) if beside.exists() else "py-spy"
    out.mkdir(parents=True, exist_ok=True)
    bench.window = seconds
    for server in servers:
        for kind in ("lease", "cycle"):
            target = out / f"{server.label}-{kind}.txt"
            proc = await asyncio.create_subprocess_exec(
                spy, "record", "--pid", str(server.pid), "--duration", str(int(seconds)),
                "--rate", "250", "--native" if native else "--gil", "--format", "raw",
                "--output", str(target),
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
            cell = Cell(server.label, VAULT_KEYS, kind, 32)
            await bench.run(server.port, cell, pids=[server.pid])
            await proc.wait()
            print(f"bench: {target} ({cell.rate:,.0f}/s, {cell.server_us_per_call:,.0f} us "
                  "server CPU per workload under the profiler)", file=sys.stderr)
    bench.conn.send("close")
    await bench.recv("closed")


# -- report -----------------------------------------------------------------------------------


@dataclasses.dataclass
class Row:
    """One line of the table: an RPC (or the cycle) on one server at one concurrency."""

    server: str
    name: str
    concurrency: int
    rate: float
    p50: float
    p99: float
    cpu_us: float


def _rows(cells: list[Cell]) -> list[Row]:
    """The table's rows; ReportUsage and Complete are derived (see the module docstring)."""
    rows: list[Row] = []
    find = {(c.label, c.kind, c.concurrency): c for c in cells}
    for c in CONCURRENCY:
        floor = find.get(("floor", "floor", c))
        if floor is not None:
            rows.append(Row("floor", "empty RPC, bare grpc.aio", c, floor.rate,
                            floor.percentile_ms(50), floor.percentile_ms(99),
                            floor.server_us_per_call))
        for label in dict.fromkeys(x.label for x in cells if x.label != "floor"):
            empty, lease = find[(label, "empty", c)], find[(label, "lease", c)]
            report, cycle = find[(label, "report", c)], find[(label, "cycle", c)]
            rows += [
                Row(label, "empty RPC (Health/Check)", c, empty.rate, empty.percentile_ms(50),
                    empty.percentile_ms(99), empty.server_us_per_call),
                Row(label, "LeaseKey", c, lease.rate, lease.percentile_ms(50),
                    lease.percentile_ms(99), lease.server_us_per_call),
                Row(label, "ReportUsage", c, report.rate, report.percentile_ms(50, "report"),
                    report.percentile_ms(99, "report"),
                    report.server_us_per_call - lease.server_us_per_call),
                Row(label, "Complete", c, cycle.rate, cycle.percentile_ms(50, "complete"),
                    cycle.percentile_ms(99, "complete"),
                    cycle.server_us_per_call - report.server_us_per_call),
                Row(label, "cycle: LeaseKey + ReportUsage + Complete", c, cycle.rate,
                    cycle.percentile_ms(50), cycle.percentile_ms(99), cycle.server_us_per_call)]
    return rows


def _verdict(value: float, target: float) -> str:
    return f"{'met' if value <= target else 'missed'} (<= {target:g})"


def render(cells: list[Cell], *, quick: bool, warmup: float, window: float, rounds: int,
           elapsed: float, load: tuple[float, float]) -> str:
    rows = _rows(cells)
    empty = {(r.server, r.concurrency): r for r in rows if r.name.startswith("empty RPC (")}
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
        "Servers, each its own process: `keybroker serve` on SQLite (WAL) and on Redis (one "
        "local redis-server, AOF off) as deployed: audit file on disk (hash-chained, written "
        "before each answer), Prometheus endpoint on, JSON logs at info to a file, "
        f"{VAULT_KEYS} keys from a local OpenBao dev server, round_robin, quotas out of reach; "
        "and the floor, a bare grpc.aio server with no interceptors answering an empty unary "
        "RPC. Load: one separate client process (grpc.aio, one channel per server, N callers "
        "each calling back to back). Servers and client share the machine's cores.",
        "",
        "## Per RPC, as deployed",
        "",
        "| server | RPC | callers | calls/s | p50 ms | p99 ms | p99 / empty p99 "
        "| server CPU us/call | handler cost us (CPU - empty's) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    misses: list[str] = []
    for r in rows:
        base = empty.get((r.server, r.concurrency))
        ratio, handler = "", ""
        if base is not None and r is not base and r.server != "floor":
            p99_ratio = r.p99 / base.p99
            ratio = f"{p99_ratio:.2f}"
            cost = r.cpu_us - base.cpu_us
            handler = f"{cost:,.0f}"
            if r.concurrency == 32 and r.name == "LeaseKey":
                ratio += " " + _verdict(p99_ratio, P99_RATIO_TARGET)
                if p99_ratio > P99_RATIO_TARGET and "@" not in r.server:
                    misses.append(f"LeaseKey p99 ratio on {r.server}")
            target = HANDLER_TARGET_US.get((r.server.split("@")[0], r.name))
            if target is not None and r.concurrency == 32:
                handler += " " + _verdict(cost, target)
                if cost > target and "@" not in r.server:
                    misses.append(f"{r.name} handler cost on {r.server}")
        lines.append(f"| {r.server} | {r.name} | {r.concurrency} | {r.rate:,.0f} | {r.p50:,.2f} "
                     f"| {r.p99:,.2f} | {ratio} | {r.cpu_us:,.0f} | {handler} |")
    lines += [
        "",
        "calls/s: completed calls (for the cycle, cycles) per second. ReportUsage and Complete "
        "are measured inside workloads: ReportUsage's row from LeaseKey + ReportUsage, "
        "Complete's from the cycle; their latency is the client's timing of that call alone, "
        "their server CPU the workload's CPU per workload less the same workload without "
        "the call (LeaseKey alone; LeaseKey + ReportUsage), from the same run. Server CPU "
        "is the server process's CPU time (all threads, gRPC's included, from /proc) during "
        "the windows, per call. Handler cost = server CPU per call less the broker's empty "
        "RPC's: what the broker's own code costs beyond gRPC. Targets (issue 18, at 32 "
        "callers): handler cost LeaseKey <= 120 us on SQLite and <= 160 us on Redis, "
        "ReportUsage and Complete <= 100 us; LeaseKey p99 <= 1.5x the empty RPC's.",
        "",
        "Targets missed in this run (this tree's brokers): "
        + (", ".join(misses) if misses else "none") + ".",
        "",
        "## Server CPU and load",
        "",
        "| server | workload | callers | calls | server CPU (cores) | client CPU (cores) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for c in cells:
        lines.append(f"| {c.label} | {c.kind} | {c.concurrency} | {c.calls:,} | "
                     f"{c.server_cores:.2f} | {c.client_cores:.2f} |")
    compared = [r for r in rows if "@" in r.server]
    if compared:
        now = {(r.server, r.name, r.concurrency): r for r in rows}
        lines += ["", "## A/B: this tree against the other revision, same run", "",
                  "| store | RPC | callers | server CPU us/call (this / other) | ratio "
                  "| handler cost us (this / other) | calls/s ratio |",
                  "|---|---|---:|---:|---:|---:|---:|"]
        for r in compared:
            store = r.server.split("@")[0]
            mine = now[(store, r.name, r.concurrency)]
            e_mine = empty[(store, r.concurrency)]
            e_base = empty[(r.server, r.concurrency)]
            if r.name.startswith("empty"):
                continue
            lines.append(
                f"| {store} | {r.name} | {r.concurrency} | {mine.cpu_us:,.0f} / {r.cpu_us:,.0f} "
                f"| {mine.cpu_us / r.cpu_us:.2f} | {mine.cpu_us - e_mine.cpu_us:,.0f} / "
                f"{r.cpu_us - e_base.cpu_us:,.0f} | {mine.rate / r.rate:.2f} |")
    lines += [
        "",
        "A broker serves RPCs on one asyncio thread: at about 1.0 core it is saturated; well "
        "below that at 32 callers, the client process (or something else on the machine) had "
        "the CPU.",
        "",
    ]
    return "\n".join(lines)


# -- main -------------------------------------------------------------------------------------


def _start_redis() -> Any:
    """A redis-server of the bench's own, or None when there is none."""
    try:
        from broker.testing import RedisServer

        return RedisServer().start()
    except (ImportError, FileNotFoundError, RuntimeError, TimeoutError) as exc:
        print(f"bench: no Redis ({exc}); skipping the Redis rows", file=sys.stderr)
        return None


def _broker_env(tmp: Path, name: str, bao: Any, policy: Path, **extra: str) -> dict[str, str]:
    """``keybroker serve``'s environment as deployed: audit file, metrics, JSON logs."""
    from broker.testing._util import free_port
    from broker.testing.process import clean_environ

    return {**clean_environ(), "KEYBROKER_POLICY_FILE": str(policy),
            "KEYBROKER_VAULT_ADDR": bao.addr, "KEYBROKER_VAULT_TOKEN": bao.root_token,
            "KEYBROKER_VAULT_KEY_PREFIX": "bench",
            "KEYBROKER_QUOTA_DAILY_LIMIT": str(10**9),
            "KEYBROKER_QUOTA_MINUTE_LIMIT": str(10**9),
            "KEYBROKER_LOG_LEVEL": "info", "KEYBROKER_LOG_FORMAT": "json",
            "KEYBROKER_AUDIT_FILE": str(tmp / f"{name}-audit.jsonl"),
            "KEYBROKER_METRICS_LISTEN": f"127.0.0.1:{free_port()}", **extra}


def _export(rev: str, tmp: Path) -> Path:
    """The ``broker`` package of git revision ``rev``, exported under ``tmp`` (for --compare)."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    dest = tmp / f"rev-{rev.replace('/', '_')}"
    dest.mkdir()
    archive = subprocess.run(["git", "-C", str(root), "archive", rev, "broker"],
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="short smoke run (~40 s); prints the tables, writes no file "
                             "unless --out is given")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"Markdown file to write (default: {DEFAULT_OUT.name} beside "
                             "this script; none with --quick)")
    parser.add_argument("--rounds", type=int, default=None, help="override the rounds")
    parser.add_argument("--profile", type=Path, default=None, metavar="DIR",
                        help="instead of the tables: py-spy (on PATH or beside python) "
                             "records each broker (the GIL holder: the Python work) under "
                             "LeaseKey and the cycle at 32 callers into "
                             "DIR/<store>-<workload>.txt (raw format; split them with "
                             "bench/profile_split.py)")
    parser.add_argument("--profile-seconds", type=float, default=10.0)
    parser.add_argument("--profile-native", action="store_true",
                        help="with --profile: all samples, C frames included (py-spy --native)")
    parser.add_argument("--compare", default="", metavar="REV",
                        help="A/B in one run: also serve the broker of git revision REV "
                             "(its broker/ package on PYTHONPATH) on both stores, as "
                             "<store>@REV rows")
    parser.add_argument("--floor-server", type=int, metavar="PORT", default=None,
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.floor_server is not None:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(_floor_server(args.floor_server))
        return 0
    plan = dict(QUICK if args.quick else FULL)
    if args.rounds:
        plan["rounds"] = args.rounds
    out = args.out if args.out is not None else (None if args.quick else DEFAULT_OUT)

    import subprocess

    from broker.config import VaultSettings
    from broker.testing import BaoDevServer, BrokerProcess
    from broker.testing._util import free_port, stop_process
    from broker.vault import VaultAdmin, VaultSession

    began = time.monotonic()
    load_before = os.getloadavg()[0]
    token = "kbt_bench_" + secrets.token_hex(16)
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    client = ctx.Process(target=client_process, args=(child,), name="bench-client")
    brokers: list[BrokerProcess] = []
    floor: subprocess.Popen[bytes] | None = None
    redis = None
    try:
        with tempfile.TemporaryDirectory(prefix="kb-bench-") as tmpdir, BaoDevServer() as bao:
            tmp = Path(tmpdir)
            vault = VaultSettings(addr=bao.addr, token=bao.root_token, key_prefix="bench")
            admin = VaultAdmin(VaultSession(vault))
            admin.bootstrap()
            for i in range(VAULT_KEYS):
                admin.put_key(POOL, f"k{i:05d}", f"sk-or-v1-bench-{secrets.token_hex(24)}",
                              account=f"acct-{i // 2:05d}")
            policy = bench_policy(token).write(tmp / "policy.toml")
            try:
                brokers.append(BrokerProcess(
                    _broker_env(tmp, "sqlite", bao, policy,
                                KEYBROKER_STORE_SQLITE_PATH=str(tmp / "bench.db")),
                    name="sqlite", log_path=tmp / "sqlite.log").start())
                redis = _start_redis()
                variants = [("", {})]
                if args.compare:
                    variants.append((f"@{args.compare}",
                                     {"PYTHONPATH": str(_export(args.compare, tmp))}))
                for suffix, extra in variants:
                    if suffix:
                        brokers.append(BrokerProcess(
                            _broker_env(tmp, "sqlite" + suffix, bao, policy, **extra,
                                        KEYBROKER_STORE_SQLITE_PATH=str(tmp / "base.db")),
                            name="sqlite" + suffix, log_path=tmp / "sqlite-base.log").start())
                    if redis is not None:
                        brokers.append(BrokerProcess(
                            _broker_env(tmp, "redis" + suffix, bao, policy, **extra,
                                        KEYBROKER_STORE_BACKEND="redis",
                                        KEYBROKER_STORE_REDIS_URL=redis.url,
                                        KEYBROKER_STORE_REDIS_PREFIX="bench" + suffix),
                            name="redis" + suffix, log_path=tmp / f"redis{suffix}.log").start())
                floor_port = free_port()
                floor = subprocess.Popen([sys.executable, __file__, "--floor-server",
                                          str(floor_port)], stdin=subprocess.DEVNULL)
                for proc in brokers:
                    proc.wait_serving_blocking(60)
                servers = [Server("floor", floor_port, floor.pid)]
                servers += [Server(p.name, p.port, p.pid) for p in brokers]
                client.start()
                child.close()
                print(f"bench: OpenBao at {bao.addr}, {VAULT_KEYS} keys put; measuring "
                      f"{plan['rounds']} round(s) of {plan['warmup']:g} s warm-up + "
                      f"{plan['window']:g} s per cell", file=sys.stderr)
                runner = Bench(parent, token, plan["warmup"], plan["window"])
                if args.profile is not None:
                    asyncio.run(profile(runner, servers[1:], args.profile,
                                        args.profile_seconds, args.profile_native))
                    return 0
                cells = asyncio.run(run_all(runner, servers, int(plan["rounds"])))
            finally:
                for proc in brokers:
                    proc.stop()
                stop_process(floor)
                if redis is not None:
                    redis.close()
    finally:
        stop_client(client, parent, child)
    text = render(cells, quick=args.quick, warmup=plan["warmup"], window=plan["window"],
                  rounds=int(plan["rounds"]), elapsed=time.monotonic() - began,
                  load=(load_before, os.getloadavg()[0]))
    print(text)
    if out is not None:
        out.write_text(text)
        print(f"bench: wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
