"""keybroker scale benchmark: the pool at 10,000 and 100,000 keys, each figure beside its target.

Self-contained, like bench/bench.py (whose helpers it imports): its own OpenBao dev server,
redis-server and brokers, on free ports, in temporary directories.

  * cold start   ``keybroker serve`` as a process, from start to SERVING (keys loaded), with
                 1,000 and 10,000 keys in Vault (KV v2 + Transit); target <= 15 s at 10,000;
  * reload       the key source of a broker holding 10,000 keys reloads after one key was
                 rewritten: Vault requests and seconds, against a full load;
  * LeaseKey     a broker whose pool has 100,000 keys in 50,000 accounts against one with 10
                 keys (in-memory KeySource, SQLite): server CPU per call and calls/s, same
                 run, interleaved; target within +-10 %;
  * RSS          of a broker process at SERVING: 10,000 keys from Vault (target <= 150 MB),
                 10,000 and 100,000 keys in memory (children of this script);
  * Redis        ``used_memory`` (INFO memory) before and after every account of a pool was
                 leased through, per account.

``section()`` returns the markdown section (the lead wires it into ``make bench``);
``python bench/scale.py [--quick]`` prints it. ``--quick`` (~1 min) uses 1,000 keys in
Vault, shorter windows and fewer Redis accounts: a smoke run, not the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import bench as base

COLD_TARGET_S = 15.0
RSS_TARGET_MB = 150.0
LEASE_TOLERANCE = 0.10
BIG_POOL = 100_000
FULL: dict[str, Any] = {"vault_keys": (1_000, 10_000), "redis_accounts": 5_000, "warmup": 0.5, "window": 2.0,
        "rounds": 3}
QUICK: dict[str, Any] = {"vault_keys": (1_000,), "redis_accounts": 500, "warmup": 0.2, "window": 1.0,
         "rounds": 1}


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _mark(ok: bool) -> str:
    return "met" if ok else "**not met**"


# -- Vault: cold start and reload ----------------------------------------------------------


def _vault_env(addr: str, token: str, prefix: str, policy: Path, db: Path) -> dict[str, str]:
    from broker.testing.process import clean_environ

    return {**clean_environ(), "KEYBROKER_POLICY_FILE": str(policy),
            "KEYBROKER_STORE_SQLITE_PATH": str(db), "KEYBROKER_VAULT_ADDR": addr,
            "KEYBROKER_VAULT_TOKEN": token, "KEYBROKER_VAULT_KEY_PREFIX": prefix,
            "KEYBROKER_LOG_LEVEL": "info"}


def cold_starts(tmp: Path, sizes: tuple[int, ...]) -> dict[str, Any]:
    """Fill Vault with each size, then time `keybroker serve` to SERVING; then a reload."""
    from broker.config import VaultSettings
    from broker.testing import BaoDevServer, BrokerProcess
    from broker.testing.vaultfill import fill_keys
    from broker.vault import VaultAdmin, VaultKeySource, VaultSession

    out: dict[str, Any] = {"cold": {}, "rss": {}, "fill": {}}
    policy = base.bench_policy("kbt_scale_" + secrets.token_hex(16)).write(tmp / "policy.toml")
    with BaoDevServer() as bao:
        for n in sizes:
            prefix = f"scale{n}"
            vault = VaultSettings(addr=bao.addr, token=bao.root_token, key_prefix=prefix,
                                  reload_interval=3600.0)
            VaultAdmin(VaultSession(vault)).bootstrap()
            t0 = time.perf_counter()
            fill_keys(vault, base.POOL, [f"k{i:06d}" for i in range(n)])
            out["fill"][n] = time.perf_counter() - t0
            print(f"scale: {n:,} keys put in Vault in {out['fill'][n]:.1f} s", file=sys.stderr)
            runs = []
            for i in range(2):
                proc = BrokerProcess(_vault_env(bao.addr, bao.root_token, prefix, policy,
                                                tmp / f"cold-{n}-{i}.db"), name=f"cold {n}")
                t0 = time.perf_counter()
                proc.start()
                try:
                    proc.wait_serving_blocking(120)
                    runs.append(time.perf_counter() - t0)
                    out["rss"][n] = _rss_mb(proc.pid)
                    loaded = [e.get("total") for e in proc.log_events()
                              if e.get("event") == "keys.loaded"]
                    if loaded != [n]:
                        raise RuntimeError(f"cold start {n}: keys.loaded said {loaded}")
                finally:
                    proc.stop()
            out["cold"][n] = min(runs)
            print(f"scale: cold start {n:,}: {[round(r, 2) for r in runs]} s", file=sys.stderr)
        # Reload of the largest pool after one key was rewritten, counted at the HTTP client.
        n = max(sizes)
        vault = VaultSettings(addr=bao.addr, token=bao.root_token, key_prefix=f"scale{n}",
                              reload_interval=3600.0)
        session = VaultSession(vault)
        seen: list[str] = []
        session.client().adapter.session.hooks["response"].append(
            lambda r, *a, **k: seen.append(f"{r.request.method} {r.request.path_url}"))
        source = VaultKeySource(session)
        t0 = time.perf_counter()
        assert len(asyncio.run(source.load())) == n
        full_s, full_requests = time.perf_counter() - t0, len(seen)
        VaultAdmin(VaultSession(vault)).put_key(base.POOL, "k000007", "sk-or-v1-rotated-"
                                                + secrets.token_hex(20), account="acct-000003")
        seen.clear()
        t0 = time.perf_counter()
        keys = asyncio.run(source.load())
        reload_s = time.perf_counter() - t0
        assert len(keys) == n
        reads = [s for s in seen if s.startswith("GET ") and "/data/" in s]
        out["reload"] = {"keys": n, "full_s": full_s, "full_requests": full_requests,
                         "reload_s": reload_s, "requests": len(seen), "reads": len(reads)}
    return out


# -- LeaseKey at 10 vs 100,000 keys, and RSS: brokers as child processes --------------------


class ChildBroker:
    """A broker with ``n`` in-memory keys in a process of its own (so one broker's periodic
    work never stalls the other's loop, and its RSS and CPU are its own)."""

    def __init__(self, n: int, token: str) -> None:
        self.n = n
        self.proc = subprocess.Popen([sys.executable, __file__, "--serve-child", str(n)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env={**os.environ, "KB_SCALE_TOKEN": token})
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().split()
        if len(line) != 2:
            self.stop()
            raise RuntimeError(f"broker with {n:,} keys did not start")
        self.port, self.rss_at_ready = int(line[0]), float(line[1])

    @property
    def pid(self) -> int:
        return self.proc.pid

    def rss(self) -> float:
        return _rss_mb(self.proc.pid)

    def stop(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


async def _serve_child(n: int) -> None:
    """Run as a child: a broker with ``n`` in-memory keys; print "port rss_mb" once SERVING,
    stop when stdin closes."""
    from broker.config import QuotaSettings, Settings, StoreSettings
    from broker.logging import configure_logging

    configure_logging("warning", "json", stream=open(os.devnull, "w"))  # noqa: SIM115
    with tempfile.TemporaryDirectory(prefix="kb-scale-child-") as tmpdir:
        tmp = Path(tmpdir)
        policy = base.bench_policy(os.environ["KB_SCALE_TOKEN"]).write(tmp / "policy.toml")
        settings = Settings(listen="127.0.0.1:0", policy_file=str(policy),
                            store=StoreSettings(sqlite_path=str(tmp / "state.db")),
                            quota=QuotaSettings(daily_limit=10**9, minute_limit=10**9))
        broker = await base._start_broker(settings, base.MemoryKeySource(n))
        try:
            print(f"{broker.port} {_rss_mb(os.getpid()):.1f}", flush=True)
            await asyncio.to_thread(sys.stdin.read)
        finally:
            await broker.stop(0)


async def _lease_cells(bench: Any, children: dict[int, ChildBroker], rounds: int) -> list[Any]:
    cells = [base.Cell(f"{n} keys", n, "lease", c) for c in (1, 32) for n in children]
    for _ in range(rounds):
        for cell in cells:
            child = children[cell.keys]
            await bench.run(child.port, cell, pids=[child.pid])
    bench.conn.send("close")
    await bench.recv("closed")
    return cells


def lease_scaling(plan: dict[str, Any]) -> tuple[list[Any], dict[int, float]]:
    """LeaseKey cells against child brokers of 10 and BIG_POOL keys; RSS of 10,000 and
    BIG_POOL-key brokers once SERVING and after the cells."""
    token = "kbt_scale_" + secrets.token_hex(16)
    rss: dict[int, float] = {}
    children: dict[int, ChildBroker] = {}
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    client = ctx.Process(target=base.client_process, args=(child,), name="scale-client",
                         daemon=True)
    try:
        mid = ChildBroker(10_000, token)
        rss[10_000] = mid.rss_at_ready
        mid.stop()
        for n in (10, BIG_POOL):
            t0 = time.perf_counter()
            children[n] = ChildBroker(n, token)
            print(f"scale: broker with {n:,} in-memory keys SERVING in "
                  f"{time.perf_counter() - t0:.1f} s", file=sys.stderr)
        client.start()
        child.close()
        cells = asyncio.run(_lease_cells(base.Bench(parent, token, plan["warmup"],
                                                    plan["window"]), children, plan["rounds"]))
        rss[BIG_POOL] = max(children[BIG_POOL].rss_at_ready, children[BIG_POOL].rss())
        return cells, rss
    finally:
        for broker in children.values():
            broker.stop()
        base.stop_client(client, parent, child)


# -- Redis memory per account --------------------------------------------------------------


async def _redis_leases(url: str, tmp: Path, accounts: int) -> dict[str, float]:
    import redis.asyncio as aioredis
    from keybroker_client import AsyncKeyBrokerClient

    from broker.config import QuotaSettings, Settings, StoreBackend, StoreSettings

    token = "kbt_scale_" + secrets.token_hex(16)
    policy = base.bench_policy(token).write(tmp / "redis-policy.toml")
    settings = Settings(listen="127.0.0.1:0", policy_file=str(policy),
                        store=StoreSettings(backend=StoreBackend.REDIS, redis_url=url,
                                            redis_prefix="scale"),
                        quota=QuotaSettings(daily_limit=10**9, minute_limit=10**9))
    info = aioredis.from_url(url)
    broker = await base._start_broker(settings, base.MemoryKeySource(2 * accounts))
    try:
        await info.execute_command("MEMORY", "PURGE")
        before = (await info.info("memory"))["used_memory"]
        keys_before = await info.dbsize()
        gate = asyncio.Semaphore(32)
        async with AsyncKeyBrokerClient(f"127.0.0.1:{broker.port}", token=token) as client:

            async def one() -> None:
                async with gate:
                    lease = await client.lease_key(base.POOL)
                    await client.complete(lease.lease_id, used=True)

            await asyncio.gather(*(one() for _ in range(2 * accounts)))  # round robin: each key
        await info.execute_command("MEMORY", "PURGE")
        after = (await info.info("memory"))["used_memory"]
        keys_after = await info.dbsize()
    finally:
        await broker.stop(0)
        await info.aclose()
    return {"accounts": accounts, "bytes": (after - before) / accounts,
            "redis_keys": (keys_after - keys_before) / accounts}


def redis_per_account(tmp: Path, accounts: int) -> dict[str, float] | None:
    try:
        from broker.testing import RedisServer

        server = RedisServer().start()
    except (ImportError, FileNotFoundError, RuntimeError, TimeoutError) as exc:
        print(f"scale: no Redis ({exc}); skipping its row", file=sys.stderr)
        return None
    try:
        return asyncio.run(_redis_leases(server.url, tmp, accounts))
    finally:
        server.close()


# -- the section ---------------------------------------------------------------------------


def section(quick: bool = False) -> str:
    """Run every measurement and return the markdown section."""
    from broker.logging import configure_logging

    plan = QUICK if quick else FULL
    devnull = open(os.devnull, "w")  # noqa: SIM115 - closed below
    configure_logging("warning", "json", stream=devnull)
    began, load0 = time.monotonic(), os.getloadavg()[0]
    try:
        with tempfile.TemporaryDirectory(prefix="kb-scale-") as tmpdir:
            tmp = Path(tmpdir)
            vault = cold_starts(tmp, plan["vault_keys"])
            cells, rss = lease_scaling(plan)
            redis = redis_per_account(tmp, plan["redis_accounts"])
    finally:
        devnull.close()
    return render(vault, cells, rss, redis, quick=quick, elapsed=time.monotonic() - began,
                  load=(load0, os.getloadavg()[0]), rounds=plan["rounds"],
                  window=plan["window"])


def render(vault: dict[str, Any], cells: list[Any], rss: dict[int, float],
           redis: dict[str, float] | None, *, quick: bool, elapsed: float,
           load: tuple[float, float], rounds: int = 1, window: float = 0.0) -> str:
    biggest = max(vault["cold"])
    lines = [
        "## Scale of the pool" + (" (--quick smoke run, not the figures)" if quick else ""),
        "",
        f"Run on {os.cpu_count()} CPU(s) in {elapsed:.0f} s; 1-minute load average "
        f"before/after {load[0]:.2f}/{load[1]:.2f}.",
        "",
        "| figure | measured | target | |",
        "|---|---:|---|---|",
    ]
    for n, s in sorted(vault["cold"].items()):
        target = f"<= {COLD_TARGET_S:g} s" if n >= 10_000 else "(reported)"
        mark = _mark(s <= COLD_TARGET_S) if n >= 10_000 else ""
        lines.append(f"| cold start, {n:,} keys in Vault: `keybroker serve` to SERVING "
                     f"| {s:.2f} s | {target} | {mark} |")
    r = vault["reload"]
    lines.append(f"| reload of {r['keys']:,} keys after 1 was rewritten: KV reads "
                 f"| {r['reads']} ({r['requests']} Vault requests, {r['reload_s']:.2f} s; a "
                 f"full load: {r['full_requests']:,} requests, {r['full_s']:.2f} s) "
                 f"| reads only what changed (1) | {_mark(r['reads'] == 1)} |")
    for c in (1, 32):
        small = next(x for x in cells if x.keys == 10 and x.concurrency == c)
        big = next(x for x in cells if x.keys == BIG_POOL and x.concurrency == c)
        cpu = big.server_us_per_call / small.server_us_per_call
        rate = big.rate / small.rate
        lines.append(
            f"| LeaseKey, {BIG_POOL:,} keys / {BIG_POOL // 2:,} accounts vs 10 keys, {c} "
            f"caller(s): server CPU per call | {cpu:.2f}x ({big.server_us_per_call:,.0f} vs "
            f"{small.server_us_per_call:,.0f} us; calls/s {rate:.2f}x) "
            f"| 1.00x +- {LEASE_TOLERANCE:.0%} | {_mark(abs(cpu - 1) <= LEASE_TOLERANCE)} |")
    lines.append(f"| broker RSS at SERVING, {biggest:,} keys from Vault "
                 f"| {vault['rss'][biggest]:.0f} MB "
                 + (f"| <= {RSS_TARGET_MB:g} MB | {_mark(vault['rss'][biggest] <= RSS_TARGET_MB)} |"
                    if biggest >= 10_000 else "| (10,000 in the full run) | |"))
    for n, mb in sorted(rss.items()):
        target = (f"<= {RSS_TARGET_MB:g} MB | {_mark(mb <= RSS_TARGET_MB)}" if n == 10_000
                  else "(reported) |")
        lines.append(f"| broker RSS at SERVING, {n:,} keys in memory | {mb:.0f} MB | {target} |")
    if redis is not None:
        lines.append(f"| Redis memory per account used ({redis['accounts']:,} accounts, 2 keys "
                     f"and 2 completed leases each) | {redis['bytes']:,.0f} bytes "
                     f"({redis['redis_keys']:.1f} Redis keys) | (reported) | |")
    else:
        lines.append("| Redis memory per account | skipped: no redis-server | (reported) | |")
    lines += [
        "",
        "Cold start: the broker as a process (`keybroker serve`, SQLite, token auth, one "
        "OpenBao dev server on this machine), best of two starts; it includes the Python "
        "start (~1 s). The keys were written by `broker.testing.vaultfill` "
        + ", ".join(f"({n:,} in {s:.0f} s)" for n, s in sorted(vault["fill"].items()))
        + ". Reload: the Vault key source in this process, requests counted at its HTTP "
        "client. LeaseKey: two broker processes (in-memory KeySource, two keys per account, "
        "SQLite, round robin, quotas out of reach, their periodic loops running: at 100,000 "
        "keys an alert evaluation and a key reload each walk every key), load from a "
        f"separate client process, {rounds} interleaved round(s) of {window:g} s; server "
        "CPU per call (from /proc) is the steadier figure on a shared machine. RSS: VmRSS "
        "of the broker process once SERVING (100,000: the larger of that and after the "
        "LeaseKey rounds). Redis: `used_memory` after `MEMORY "
        "PURGE`, before and after leasing through every key once; the lease records "
        "(kept `lease.retention_days`) are part of it.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from broker.logging import configure_logging

    configure_logging("warning", "console", sys.stderr)  # stdout is the markdown section
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run (~1 min)")
    parser.add_argument("--serve-child", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_child:
        asyncio.run(_serve_child(args.serve_child))
        return 0
    print(section(quick=args.quick))
    return 0


if __name__ == "__main__":
    sys.exit(main())
