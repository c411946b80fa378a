"""Server CPU per call: LeaseKey against Health/Check on one in-process broker.

A quicker, narrower companion of bench.py for working on the lease path: no
OpenBao (10 keys from an in-memory KeySource, as bench.py's pool-size rows do),
one store (SQLite, or Redis with --redis URL), and only the empty RPC and
LeaseKey cells, at 1 and 32 callers, in interleaved rounds. Prints calls/s,
server CPU us/call and both ratios per cell. ``--hold SECONDS`` instead runs one
LeaseKey x32 load for that long and prints the server's pid first, so a sampling
profiler (py-spy record --pid PID) can attach to it.

Usage: python bench/cpu.py [--redis URL] [--rounds N] [--window S] [--hold S]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import secrets
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench  # bench/bench.py: client process, cells, broker start-up


async def _run(args: argparse.Namespace, token: str, tmp: Path,
               conn: multiprocessing.connection.Connection) -> None:
    import dataclasses

    from broker.config import QuotaSettings, Settings, StoreBackend, StoreSettings

    policy = bench.bench_policy(token).write(tmp / "policy.toml")
    store = StoreSettings(sqlite_path=str(tmp / "cpu.db"))
    if args.redis:
        store = dataclasses.replace(store, backend=StoreBackend.REDIS, redis_url=args.redis,
                                    redis_prefix=f"cpu-{secrets.token_hex(4)}")
    settings = Settings(listen="127.0.0.1:0", policy_file=str(policy), store=store,
                        quota=QuotaSettings(daily_limit=10**9, minute_limit=10**9))
    broker = await bench._start_broker(settings, bench.MemoryKeySource(bench.VAULT_KEYS))
    runner = bench.Bench(conn, token, args.warmup, args.window)
    try:
        if args.hold:
            print(f"cpu: server pid {os.getpid()}", file=sys.stderr, flush=True)
            runner.window = args.hold
            await runner.run(broker.port, bench.Cell("hold", bench.VAULT_KEYS, args.kind, 32))
            return
        cells = [bench.Cell("cpu", bench.VAULT_KEYS, kind, c)
                 for c in args.callers for kind in ("empty", "lease")]
        for _ in range(args.rounds):
            for cell in cells:
                await runner.run(broker.port, cell)
        base = {c.concurrency: c for c in cells if c.kind == "empty"}
        print("| workload | callers | calls/s | server CPU us/call | ratio | CPU ratio |")
        print("|---|---:|---:|---:|---:|---:|")
        for c in cells:
            b = base[c.concurrency]
            print(f"| {c.kind} | {c.concurrency} | {c.rate:,.0f} | {c.server_us_per_call:,.0f} | "
                  f"{c.rate / b.rate:.2f} | {b.server_us_per_call / c.server_us_per_call:.2f} |")
    finally:
        conn.send("close")
        await runner.recv("closed")
        await broker.stop(0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis", default="", help="redis URL: use the Redis store")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=float, default=0.3)
    parser.add_argument("--window", type=float, default=1.5)
    parser.add_argument("--callers", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--hold", type=float, default=0.0,
                        help="one long x32 cell of --kind, for a profiler to attach")
    parser.add_argument("--kind", default="lease", choices=("lease", "empty", "cycle"))
    args = parser.parse_args()

    from broker.logging import configure_logging

    devnull = open(os.devnull, "w")  # noqa: SIM115 - lives for the whole run
    configure_logging("info", "json", stream=devnull)
    token = "kbt_bench_" + secrets.token_hex(16)
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    client = ctx.Process(target=bench.client_process, args=(child,), name="cpu-client")
    client.start()
    child.close()
    try:
        with tempfile.TemporaryDirectory(prefix="kb-cpu-") as tmpdir:
            asyncio.run(_run(args, token, Path(tmpdir), parent))
    finally:
        parent.send(None)
        client.join(10)
        if client.is_alive():
            client.terminate()
        devnull.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
