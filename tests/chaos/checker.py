"""The checker: the seven invariants of the campaign over its history and the store's final state.

1. No over-grant: per account and window (day and minute, by the granting replica's clock),
   acknowledged granted units minus every unit possibly refunded never exceed the limit.
2. Nothing lost: the store's final day counts lie between acknowledged grants minus every
   possible refund and acknowledged grants plus every unknown grant minus acknowledged refunds.
3. Idempotency: one lease per (principal, request_id); a lease is refunded at most once.
4. No false refusal: once healed, every pool the store shows room in grants through every
   replica; during the run, refusals while the store showed room are counted.
5. Honest RetryInfo: no refusal is followed, before its RetryInfo ran out (less a second and
   the replicas' skew), by a grant of as many units or more in the same pool without a refund,
   an enable or a clock fault in between.
6. Error codes: never INTERNAL or UNKNOWN; UNAVAILABLE (and timeouts) only while a fault is
   active or within ``GRACE`` seconds after it healed.
7. No secret in any log, audit file, SQLite or Redis file, or /metrics page after the run.
"""

from __future__ import annotations

import bisect
import itertools
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

from broker.clock import day_window, minute_window
from broker.engine.windows import account_day

from .campaign import ACCOUNTS, DAILY, MINUTE, POOLS, World
from .history import FAIL, OK, UNKNOWN, Fault, Op

__all__ = ["GRACE", "Result", "check", "late_retry_info"]

GRACE = 10.0  # seconds after a fault heals in which UNAVAILABLE and timeouts still pass
RETRY_SLACK = 1.0  # RetryInfo may be late by this much (plus the replicas' skew)
SKEW = 0.8  # the most two replicas' clocks differ by (each is skewed up to 0.4 s)


@dataclass
class Violation:
    invariant: int
    what: str
    ops: list[Op] = field(default_factory=list)


@dataclass
class Result:
    seed: int
    backend: str
    violations: list[Violation] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)
    elapsed: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.violations

    def report(self, excerpt: int = 12) -> str:
        f = self.figures
        lines = [f"chaos {self.backend} seed={self.seed}: "
                 f"{'PASS' if self.ok else 'FAIL'} in {self.elapsed:.0f}s",
                 f"  operations {f['ops']} {f['by_kind']}",
                 f"  outcomes {f['outcomes']}  codes {f['codes']}",
                 f"  faults {f['faults']} {f['fault_kinds']}",
                 f"  granted {f['granted']} leases ({f['granted_units']} units), "
                 f"refunded {f['refunded']}, refused {f['refused']} "
                 f"(store showed room at {f['refused_with_room']} of {f['refused_read']} read), "
                 f"day windows {f['day_windows']} ({f['days_checked']} open at the end, read back), "
                 f"minute windows {f['minute_windows']}",
                 f"  checks {f['checks']}"]
        for v in self.violations[:10]:
            lines.append(f"  VIOLATION of invariant {v.invariant}: {v.what}")
            for op in sorted(v.ops, key=lambda o: o.invoke)[:excerpt]:
                lines.append(f"    {op.line()}")
        if len(self.violations) > 10:
            lines.append(f"  ... {len(self.violations) - 10} more violations")
        if not self.ok:
            lines.append(f"  replay: make chaos SEED={self.seed} BACKEND={self.backend}")
        return "\n".join(lines)


def lids_first(windows: dict[tuple[str, str], list[str]], acct: str, win: str) -> str:
    return windows[(acct, win)][0]


def _grants(ops: list[Op]) -> dict[str, Op]:
    """lease id -> the first acknowledged LeaseKey that returned it."""
    out: dict[str, Op] = {}
    for op in sorted(ops, key=lambda o: o.complete):
        if op.kind in ("lease", "check") and op.outcome == OK and op.result.get("lease_id"):
            out.setdefault(op.result["lease_id"], op)
    return out


async def check(world: World, metrics: str) -> Result:
    h = world.history
    ops = [op for op in h.ops if op.outcome]  # ops never finished (none expected) are skipped
    result = Result(world.plan.seed, world.plan.backend)
    bad = result.violations
    grants = _grants(ops)
    leases_by_id = {lid: op for lid, op in grants.items()}

    # refunds: definite (an acknowledged Complete said refunded) and possible (unknown outcome)
    refunded: dict[str, Op] = {}
    maybe_refunded: dict[str, Op] = {}
    complete_acks: dict[str, list[Op]] = defaultdict(list)
    for op in ops:
        if op.kind != "complete":
            continue
        lid = op.args["lease_id"]
        if op.outcome == OK:
            complete_acks[lid].append(op)
        if op.outcome == OK and op.result.get("refunded"):
            refunded.setdefault(lid, op)
        elif op.outcome == UNKNOWN and not op.args["used"]:
            maybe_refunded.setdefault(lid, op)
    unknown_leases = [op for op in ops if op.kind == "lease" and op.outcome == UNKNOWN]
    unknown_units = sum(op.args["units"] for op in unknown_leases)

    # ---- 1. no over-grant, per account and day / minute window
    def units_of(lid: str) -> int:
        return int(leases_by_id[lid].args.get("units", 1))

    windows: dict[tuple[str, str], list[str]] = defaultdict(list)
    for lid, op in grants.items():
        at = op.result["granted_at"]
        acct = op.result["account"]
        windows[(acct, "d:" + day_window(at)[0])].append(lid)
        windows[(acct, "m:" + minute_window(at)[0])].append(lid)
    for (acct, win), lids in windows.items():
        limit = DAILY if win.startswith("d:") else MINUTE
        granted = sum(units_of(lid) for lid in lids)
        back = sum(units_of(lid) for lid in lids if lid in refunded or lid in maybe_refunded)
        if granted - back > limit:
            bad.append(Violation(1, f"{acct} {win}: {granted} units granted, at most {back} "
                                    f"refunded, limit {limit}", [grants[lid] for lid in lids]))

    # ---- 2. nothing lost: the store's final day counts (of the days not ended: the store
    # deletes a window once it has ended; usage rows keep the history)
    final = time.time() + min(r.offset for r in world.replicas)
    days = sorted({(acct, win[2:]) for acct, win in windows
                   if win.startswith("d:") and day_window(grants[lids_first(windows, acct, win)]
                                                          .result["granted_at"])[1] > final})
    counts, _health = await world.truth([(a, account_day(a, d)) for a, d in days])
    for acct, day in days:
        lids = windows[(acct, "d:" + day)]
        acked = sum(units_of(lid) for lid in lids)
        sure_back = sum(units_of(lid) for lid in lids if lid in refunded)
        maybe_back = sum(units_of(lid) for lid in lids
                         if lid in maybe_refunded and lid not in refunded)
        low, high = acked - sure_back - maybe_back, acked - sure_back + unknown_units
        got = counts[account_day(acct, day)]
        if not low <= got <= high:
            excerpt = [grants[lid] for lid in lids] + [refunded[lid] for lid in lids
                                                       if lid in refunded]
            bad.append(Violation(2, f"{acct} day {day}: store holds {got}, history allows "
                                    f"{low}..{high}", excerpt))
    lost = [op for op in ops if op.kind in ("renew", "complete", "report")
            and op.code == "NOT_FOUND" and op.args["lease_id"] in grants]
    if lost:
        bad.append(Violation(2, f"{len(lost)} calls on acknowledged leases answered NOT_FOUND",
                             lost[:5] + [grants[o.args["lease_id"]] for o in lost[:5]]))

    # ---- 3. idempotency
    by_request: dict[tuple[str, str], dict[str, Op]] = defaultdict(dict)
    for op in ops:
        if op.kind == "lease" and op.outcome == OK and op.args.get("request_id"):
            by_request[(op.principal, op.args["request_id"])].setdefault(
                op.result["lease_id"], op)
    for (who, rid), leases in by_request.items():
        if len(leases) > 1:
            bad.append(Violation(3, f"{who} request_id {rid}: {len(leases)} different leases",
                                 list(leases.values())))
    for lid, acks in complete_acks.items():
        if len({op.result.get("refunded") for op in acks}) > 1:
            bad.append(Violation(3, f"lease {lid}: retried Completes disagree on the refund",
                                 [grants[lid], *acks] if lid in grants else acks))
    wrong = [op for op in ops if op.result.get("wrong_secret")]
    if wrong:
        bad.append(Violation(3, "a lease carried another key's secret", wrong))

    # ---- 4. no false refusal
    checks = [op for op in ops if op.kind == "check"]
    for op in checks:
        if op.outcome != OK and op.args.get("store_room"):
            bad.append(Violation(4, f"healed: pool {op.args['pool']} has room in the store "
                                    f"but replica {op.replica} answered {op.code}", [op]))
    refusals = [op for op in ops if op.kind == "lease" and op.code == "RESOURCE_EXHAUSTED"]
    read = [op for op in refusals if "store_room" in op.result]
    with_room = [op for op in read if op.result["store_room"]]

    # ---- 5. honest RetryInfo
    bad.extend(late_retry_info(ops, grants, h.faults))

    # ---- 6. error codes
    codes = Counter(op.code or "OK" for op in ops)
    for op in ops:
        if op.code in ("INTERNAL", "UNKNOWN"):
            bad.append(Violation(6, f"{op.kind} answered {op.code}", [op]))
    unexplained = [op for op in ops if op.outcome == UNKNOWN and not any(
        f.start - 0.5 <= op.complete and op.invoke <= f.healed + GRACE for f in h.faults)]
    if unexplained:
        bad.append(Violation(6, f"{len(unexplained)} UNAVAILABLE/timeouts with no fault active "
                                f"nor healed within {GRACE:.0f}s", unexplained[:8]))

    # ---- 7. no secret at rest or in telemetry
    leaks = []
    blobs = [(str(p), p.read_bytes()) for p in sorted(world.dir.rglob("*")) if p.is_file()]
    blobs.append(("/metrics", metrics.encode()))
    for name, data in blobs:
        for kid, secret in world.secrets.items():
            if secret.encode() in data or secret[-24:].encode() in data:
                leaks.append(f"{kid} in {name}")
    if leaks:
        bad.append(Violation(7, "secret found: " + ", ".join(leaks[:5])))

    kinds = Counter(op.kind for op in ops)
    result.figures = {
        "ops": len(ops), "by_kind": dict(kinds), "outcomes": dict(Counter(op.outcome for op in ops)),
        "codes": dict(codes), "faults": len(h.faults),
        "fault_kinds": dict(Counter(f.kind for f in h.faults)),
        "granted": len(grants), "granted_units": sum(units_of(lid) for lid in grants),
        "refunded": len(refunded), "refused": len(refusals), "refused_read": len(read),
        "refused_with_room": len(with_room), "unknown_leases": len(unknown_leases),
        "day_windows": sum(1 for _, w in windows if w.startswith("d:")), "days_checked": len(days),
        "minute_windows": sum(1 for _, w in windows if w.startswith("m:")),
        "accounts": len(ACCOUNTS), "files_scanned": len(blobs),
        "checks": {"healed_probes": len(checks),
                   "healed_granted": sum(1 for op in checks if op.outcome == OK),
                   "retryinfo_checked": len(refusals),
                   "unknown_outcomes_explained": sum(1 for op in ops if op.outcome == UNKNOWN)
                   - len(unexplained)},
    }
    return result


def late_retry_info(ops: list[Op], grants: dict[str, Op], faults: list[Fault]) -> list[Violation]:
    """Invariant 5: refusals followed, before their RetryInfo ran out (less ``RETRY_SLACK``
    and ``SKEW``), by a grant of as many units or more in the same pool, with nothing that
    may have freed the granted account in between: a refund on it, an operator's enable of
    one of its keys, a 429 reported on it (the provider's latest reset wins, so a later 429
    may end a cooldown sooner), or a clock fault (any account)."""
    key_account = {f"{pool}/{name}": acct for pool, accts in POOLS.items()
                   for acct, names in accts.items() for name in names}
    # what can free an account before any clock says so, each as the span it may act in
    spans: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for op in ops:
        if op.outcome == FAIL:
            continue
        if op.kind == "complete" and not op.args["used"] and op.args["lease_id"] in grants:
            spans[grants[op.args["lease_id"]].result["account"]].append((op.invoke, op.complete))
        elif ((op.kind == "enable" and op.args["enabled"])
              or (op.kind == "report" and op.args["status"] == 429)):
            spans[key_account[op.args["key_id"]]].append((op.invoke, op.complete))
    everyone = [(f.start, f.healed) for f in faults if f.kind == "clock"]
    index: dict[str, tuple[list[float], list[float]]] = {}
    for acct in {*key_account.values(), *spans}:
        found = sorted(spans.get(acct, []) + everyone)
        index[acct] = ([start for start, _ in found],
                       list(itertools.accumulate((end for _, end in found), max)))
    granted_ops = sorted(grants.values(), key=lambda o: o.complete)

    def enabled_between(acct: str, a: float, b: float) -> bool:
        """Something that frees ``acct`` (or a clock change: replicas on different days) may
        have taken effect between ``a`` and ``b``."""
        starts, latest_end = index.get(acct, ([], []))
        n = bisect.bisect_right(starts, b)  # the enablers that began by b ...
        return n > 0 and latest_end[n - 1] >= a - 0.5  # ... one of which lasted until a

    # The earliest a grant may have happened: a LeaseKey retried with its request_id after an
    # unknown outcome (the answer lost, the lease granted in the store) is answered with the
    # lease its first attempt got, so the grant may be as old as that attempt.
    first_try: dict[tuple[str, str], float] = {}
    for op in ops:
        if op.kind == "lease" and op.args.get("request_id") and op.outcome != FAIL:
            ident = (op.principal, op.args["request_id"])
            first_try[ident] = min(first_try.get(ident, op.invoke), op.invoke)

    def granted_from(g: Op) -> float:
        rid = g.args.get("request_id")
        return min(g.invoke, first_try.get((g.principal, rid), g.invoke)) if rid else g.invoke

    late = []
    refusals = [op for op in ops if op.kind == "lease" and op.code == "RESOURCE_EXHAUSTED"]
    for ref in refusals:
        retry = ref.result.get("retry_after", 0.0)
        horizon = ref.complete + retry - RETRY_SLACK - SKEW
        for g in granted_ops:
            if g.complete >= horizon:
                break
            if (granted_from(g) > ref.complete and g.args.get("pool") == ref.args["pool"]
                    and g.args.get("units", 1) >= ref.args["units"]
                    and not enabled_between(g.result.get("account", ""), ref.invoke,
                                            g.complete)):
                late.append(Violation(5, f"refused with RetryInfo {retry:.1f}s, yet granted "
                                         f"{g.complete - ref.complete:.1f}s later", [ref, g]))
                break
    return late
