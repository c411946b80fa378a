"""``python -m tests.chaos [--backend redis|sqlite|both] [--seed N] [--duration S]``: one campaign
per backend; prints the figures, and for a failure the seed and the shortest history excerpt
of each broken invariant. Exit 0 when every invariant holds, 1 otherwise, 2 for bad flags."""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from .campaign import Plan, run_campaign


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.chaos", description=__doc__)
    parser.add_argument("--backend", choices=("redis", "sqlite", "both"), default="both")
    parser.add_argument("--seed", type=int, default=None, help="default: from the time")
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of load")
    parser.add_argument("--clients", type=int, default=48)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else int(time.time()) % 100000
    backends = ("sqlite", "redis") if args.backend == "both" else (args.backend,)
    failed = False
    out = {}
    for backend in backends:
        workdir = Path(tempfile.mkdtemp(prefix=f"kb-chaos-{backend}-"))
        plan = Plan(backend=backend, seed=seed, duration=args.duration, clients=args.clients)
        print(f"chaos {backend} seed={seed} duration={args.duration:.0f}s "
              f"clients={args.clients} in {workdir}", flush=True)
        result = asyncio.run(run_campaign(plan, workdir))
        print(result.report(), flush=True)
        out[backend] = {"seed": seed, "ok": result.ok, "elapsed": result.elapsed,
                        **result.figures,
                        "violations": [f"{v.invariant}: {v.what}" for v in result.violations]}
        failed |= not result.ok
        if args.keep or not result.ok:
            print(f"  work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2, default=str))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
