"""The broker's own CPU per RPC, without gRPC: LeaseKey, ReportUsage, Complete called
through the broker's interceptor and servicer in one process, one call after another.

What gRPC costs (HTTP/2, the C core, the asyncio glue) is left out, so the figure is
the handler's cost alone and much steadier than bench.py's on a busy machine: CPU time
of this process per call, median of several rounds. The broker is as deployed: an
audit file on disk (written and flushed before each answer), JSON logs at info (to a
file), the metrics sink; 10 keys from an in-memory KeySource (no OpenBao).

``--compare REV`` runs the same measurement for the broker of git revision REV (its
``broker/`` package on PYTHONPATH), alternating the two in separate processes, and
prints both with their ratio: an A/B of one change on one machine in one run.

Usage: python bench/handler.py [--redis] [--calls N] [--rounds N] [--compare REV]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RPCS = ("LeaseKey", "ReportUsage", "Complete")


class _Context:
    """What the interceptor asks of a grpc.aio ServicerContext."""

    def __init__(self, token: str) -> None:
        self._md = (("authorization", f"Bearer {token}"),)

    def invocation_metadata(self) -> Any:
        return self._md

    def auth_context(self) -> Any:
        return {}

    async def abort_with_status(self, status: Any) -> None:
        raise RuntimeError(f"aborted: {status.code} {status.details}")


class _Details:
    def __init__(self, method: str) -> None:
        self.method = method
        self.invocation_metadata = ()


async def _child(args: argparse.Namespace, tmp: Path) -> dict[str, float]:
    import dataclasses

    import grpc
    from google.protobuf import duration_pb2
    from keybroker_client.v1 import keybroker_pb2 as pb

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import bench  # MemoryKeySource, the policy
    from broker.config import QuotaSettings, Settings, StoreBackend, StoreSettings
    from broker.logging import configure_logging

    log = (tmp / "broker.log").open("w")
    configure_logging("info", "json", stream=log)
    token = "kbt_bench_" + secrets.token_hex(16)
    policy = bench.bench_policy(token).write(tmp / "policy.toml")
    store = StoreSettings(sqlite_path=str(tmp / "handler.db"))
    if args.redis_url:
        store = dataclasses.replace(store, backend=StoreBackend.REDIS, redis_url=args.redis_url,
                                    redis_prefix=f"h-{secrets.token_hex(4)}")
    settings = Settings(listen="127.0.0.1:0", policy_file=str(policy), store=store,
                        audit_file=str(tmp / "audit.jsonl"), metrics_listen="127.0.0.1:0",
                        quota=QuotaSettings(daily_limit=10**9, minute_limit=10**9))
    broker = await bench._start_broker(settings, bench.MemoryKeySource(bench.VAULT_KEYS))
    try:
        servicer = broker.wiring.servicers[0]
        interceptor = broker.wiring.interceptors[0]
        handlers: dict[str, Any] = {}
        for rpc, req_type, resp_type in (
                ("LeaseKey", pb.LeaseKeyRequest, pb.LeaseKeyResponse),
                ("ReportUsage", pb.ReportUsageRequest, pb.ReportUsageResponse),
                ("Complete", pb.CompleteRequest, pb.CompleteResponse)):
            inner = grpc.unary_unary_rpc_method_handler(
                getattr(servicer, rpc), request_deserializer=req_type.FromString,
                response_serializer=resp_type.SerializeToString)

            async def continuation(_: Any, inner: Any = inner) -> Any:
                return inner

            handlers[rpc] = await interceptor.intercept_service(
                continuation, _Details(f"/keybroker.v1.KeyBroker/{rpc}"))
        ctx = _Context(token)
        lease_body = pb.LeaseKeyRequest(
            pool=bench.POOL, ttl=duration_pb2.Duration(seconds=600)).SerializeToString()
        spent = dict.fromkeys(RPCS, 0.0)
        clock = time.process_time

        async def call(rpc: str, body: bytes) -> Any:
            h = handlers[rpc]
            t0 = clock()
            answer = await h.unary_unary(h.request_deserializer(body), ctx)
            h.response_serializer(answer)
            spent[rpc] += clock() - t0
            return answer

        async def cycle() -> None:
            granted = await call("LeaseKey", lease_body)
            await call("ReportUsage", pb.ReportUsageRequest(
                lease_id=granted.lease_id, http_status=200, prompt_tokens=12,
                completion_tokens=34, latency_ms=250).SerializeToString())
            await call("Complete", pb.CompleteRequest(lease_id=granted.lease_id,
                                                      used=True).SerializeToString())

        for _ in range(200):  # warm-up: caches, the statement cache, the first keys
            await cycle()
        spent = dict.fromkeys(RPCS, 0.0)
        for _ in range(args.calls):
            await cycle()
        return {rpc: spent[rpc] / args.calls * 1e6 for rpc in RPCS}
    finally:
        await broker.stop(0)
        log.close()


def _export(rev: str, tmp: Path) -> Path:
    root = Path(__file__).resolve().parent.parent
    dest = tmp / "rev"
    dest.mkdir()
    archive = subprocess.run(["git", "-C", str(root), "archive", rev, "broker"],
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis", action="store_true", help="the Redis store (own server)")
    parser.add_argument("--calls", type=int, default=1500, help="cycles per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--compare", default="", metavar="REV")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--redis-url", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        with tempfile.TemporaryDirectory(prefix="kb-handler-") as tmp:
            print(json.dumps(asyncio.run(_child(args, Path(tmp)))))
        return 0
    redis = None
    if args.redis:
        from broker.testing import RedisServer

        redis = RedisServer().start()
    try:
        with tempfile.TemporaryDirectory(prefix="kb-handler-ab-") as tmpdir:
            variants = {"this tree": dict(os.environ)}
            if args.compare:
                variants[args.compare] = {**os.environ,
                                          "PYTHONPATH": str(_export(args.compare, Path(tmpdir)))}
            results: dict[str, list[dict[str, float]]] = {v: [] for v in variants}
            argv = [sys.executable, __file__, "--child", "--calls", str(args.calls)]
            if redis is not None:
                argv += ["--redis-url", redis.url]
            load = os.getloadavg()[0]
            for i in range(args.rounds):
                for name, env in (variants.items() if i % 2 == 0
                                  else reversed(variants.items())):
                    out = subprocess.run(argv, env=env, capture_output=True, text=True,
                                         check=False)
                    if out.returncode != 0:  # e.g. a store timeout on an overloaded machine
                        print(f"  round {i + 1} {name} failed; left out:\n"
                              + out.stderr[-600:], file=sys.stderr)
                        continue
                    results[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
                    print(f"  round {i + 1} {name}: " + ", ".join(
                        f"{k} {v:.0f}" for k, v in results[name][-1].items()), file=sys.stderr)
    finally:
        if redis is not None:
            redis.close()
    store = "Redis" if args.redis else "SQLite"
    print(f"Handler CPU per call without gRPC, us (median of up to {args.rounds} rounds of "
          f"{args.calls} cycles; {store}; load average {load:.2f} -> "
          f"{os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs)")
    names = list(variants)
    print("| RPC | " + " | ".join(names) + (" | ratio |" if len(names) > 1 else " |"))
    print("|---|" + "---:|" * (len(names) + (1 if len(names) > 1 else 0)))
    for rpc in RPCS:
        med = [statistics.median(r[rpc] for r in results[n]) if results[n] else math.nan
               for n in names]
        ratio = f" {med[0] / med[1]:.2f} |" if len(med) > 1 else ""
        print(f"| {rpc} | " + " | ".join(f"{m:,.0f}" for m in med) + " |" + ratio)
    return 0


if __name__ == "__main__":
    sys.exit(main())
