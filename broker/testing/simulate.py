"""A discrete-event simulation of one UTC day, driving the real LeaseEngine.

Keys are simulated (latency, failure rate, outages, upstream 429s) and so is the
provider's own per-account accounting, which, like OpenRouter's, counts failed
attempts too. Everything else is the production code path: LeaseEngine with its
strategies, health state machine and hybrid admission, over an in-memory SQLite
StateStore, on a ManualClock stepped from 00:00 to 24:00 UTC. Callers behave like
the OpenRouter client: lease, call, report, complete, and fail over to another
lease up to ``attempts`` times. Same seed, same table.
"""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from ..audit import Audit
from ..clock import ManualClock
from ..config import AccountSettings, LeaseSettings, PoolSettings, QuotaSettings, Settings, StrategyName
from ..engine import LeaseEngine, LeaseGrant, LeaseRequest
from ..engine.windows import account_day
from ..errors import QuotaExhausted
from ..models import Key, Priority, Secret, UsageReport
from ..store.sqlite import SQLiteStore

__all__ = ["SCENARIOS", "Result", "Scenario", "SimKey", "render_table", "run_all", "run_scenario"]

DAY0 = datetime(2026, 1, 1, tzinfo=UTC).timestamp()
POOL = "sim"


@dataclass(frozen=True)
class SimKey:
    """A simulated key.

    Attributes:
        latency_ms: median latency of its calls; ``sigma`` the log-normal spread.
        fail_rate: chance a call answers 503 (fast, in ``fail_latency_ms``).
        outages: (start hour, end hour) spans in which every call answers 503.
        upstream_429_rate: chance of an upstream provider 429 with no reset time.
    """

    name: str
    account: str
    latency_ms: float = 800.0
    sigma: float = 0.3
    fail_rate: float = 0.0
    fail_latency_ms: float = 60.0
    outages: tuple[tuple[float, float], ...] = ()
    upstream_429_rate: float = 0.0


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    keys: tuple[SimKey, ...]
    daily_limit: int = 400
    demand_ratio: float = 1.15  # requests per day / the pool's daily quota
    bursty: bool = False
    priorities: tuple[float, float, float] = (0.0, 1.0, 0.0)  # high, normal, low shares
    hybrid: bool = False
    timeout_ms: float = 10_000.0
    attempts: int = 3
    hidden_usage: tuple[tuple[str, int], ...] = ()  # (account, units spent elsewhere today)

    @property
    def capacity(self) -> int:
        return self.daily_limit * len({k.account for k in self.keys})


def _accounts(n: int, keys_per_account: int = 2) -> list[tuple[str, str]]:
    return [(f"k{a}{chr(97 + i)}", f"acct{a}") for a in range(n) for i in range(keys_per_account)]


SCENARIOS: tuple[Scenario, ...] = (
    Scenario("uniform", "8 equal keys on 4 accounts, 1% errors",
             tuple(SimKey(n, a, fail_rate=0.01) for n, a in _accounts(4))),
    Scenario("heterogeneous-latency",
             "each account has a fast key (300 ms) and a slow one (6 s median, 10 s timeout)",
             tuple(SimKey(n, a, latency_ms=300.0 if n.endswith("a") else 6000.0, sigma=0.5)
                   for n, a in _accounts(4))),
    Scenario("flaky-key", "one key answers 503 to 40% of calls (fast); the rest 1%",
             tuple(SimKey(n, a, fail_rate=0.4 if n == "k0a" else 0.01)
                   for n, a in _accounts(4))),
    Scenario("dies-and-recovers",
             "two accounts of 2 keys, plus acct2 whose only key dies at 12:00 and acct3 whose "
             "only key is down until 10:00",
             (*(SimKey(n, a, fail_rate=0.01) for n, a in _accounts(2)),
              SimKey("k2a", "acct2", fail_rate=0.01, outages=((12.0, 24.0),)),
              SimKey("k3a", "acct3", fail_rate=0.01, outages=((0.0, 10.0),)))),
    Scenario("hidden-usage",
             "another app already spent 250 of acct0's 400 today (only the provider knows); "
             "k1a meets upstream 429s on 5% of calls",
             tuple(SimKey(n, a, fail_rate=0.01, upstream_429_rate=0.05 if n == "k1a" else 0.0)
                   for n, a in _accounts(4)),
             hidden_usage=(("acct0", 250),)),
    Scenario("bursty-priorities",
             "bursts of demand at 30% over quota; 5% high, 55% normal, 40% low; no hybrid",
             tuple(SimKey(n, a, fail_rate=0.01) for n, a in _accounts(4)),
             demand_ratio=1.3, bursty=True, priorities=(0.05, 0.55, 0.40)),
    Scenario("bursty-priorities-hybrid",
             "the same demand with a 10% high-priority reserve and low-priority pacing",
             tuple(SimKey(n, a, fail_rate=0.01) for n, a in _accounts(4)),
             demand_ratio=1.3, bursty=True, priorities=(0.05, 0.55, 0.40), hybrid=True),
)


@dataclass
class Result:
    scenario: str
    strategy: str
    requests: int = 0
    succeeded: int = 0
    latencies: list[float] = field(default_factory=list)
    units_used: int = 0
    capacity: int = 0
    rate_limited: int = 0
    high: int = 0
    high_external: int = 0
    internal: int = 0
    grants: int = 0  # lease.granted audit records the engine wrote
    attempts: int = 0  # provider calls made with granted leases
    engine_units: int = 0  # the engine's own day counters at the end (must equal units_used)

    @property
    def success_rate(self) -> float:
        return self.succeeded / self.requests if self.requests else 0.0

    def percentile(self, q: float) -> float:
        if not self.latencies:
            return 0.0
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]

    @property
    def quota_used(self) -> float:
        """Share of the day's quota the broker's callers spent (as the provider counted)."""
        return self.units_used / self.capacity if self.capacity else 0.0

    @property
    def high_external_share(self) -> float | None:
        return self.high_external / self.high if self.high else None


class _Provider:
    """The provider side: answers calls and keeps its own per-account day/minute counts."""

    def __init__(self, scenario: Scenario, rng: random.Random) -> None:
        self._s = scenario
        self._rng = rng
        self._keys = {k.name: k for k in scenario.keys}
        self._day: dict[str, int] = dict(scenario.hidden_usage)
        self._hidden = sum(n for _, n in scenario.hidden_usage)
        self._minute: dict[tuple[str, int], int] = {}

    def units(self) -> int:
        """Units the provider counted for the broker's calls (hidden usage excluded)."""
        return sum(self._day.values()) - self._hidden

    def call(self, key_name: str, now: float) -> tuple[int, float, dict[str, Any]]:
        """(status, latency in ms, rate-limit fields for ReportUsage)."""
        k, rng = self._keys[key_name], self._rng
        minute = int(now // 60)
        if self._day.get(k.account, 0) >= self._s.daily_limit:
            return 429, 40.0, {"ratelimit_limit": self._s.daily_limit, "ratelimit_remaining": 0,
                               "ratelimit_reset_ms": int((DAY0 + 86400) * 1000)}
        if self._minute.get((k.account, minute), 0) >= 20:
            return 429, 40.0, {"ratelimit_limit": 20, "ratelimit_remaining": 0,
                               "ratelimit_reset_ms": (minute + 1) * 60_000}
        # Every attempt counts, failed or not, as on OpenRouter.
        self._day[k.account] = self._day.get(k.account, 0) + 1
        self._minute[(k.account, minute)] = self._minute.get((k.account, minute), 0) + 1
        hour = (now - DAY0) / 3600.0
        if any(a <= hour < b for a, b in k.outages) or rng.random() < k.fail_rate:
            return 503, k.fail_latency_ms * rng.uniform(0.5, 1.5), {}
        if rng.random() < k.upstream_429_rate:
            return 429, k.fail_latency_ms, {}
        latency = k.latency_ms * math.exp(rng.gauss(0.0, k.sigma))
        if latency > self._s.timeout_ms:
            return 0, self._s.timeout_ms, {}
        return 200, latency, {}


class _Caller:
    principal = "simulator"

    def require(self, rpc: str, pool: str) -> None:
        return None

    def may(self, rpc: str, pool: str) -> bool:
        return True

    def may_any(self, rpc: str) -> bool:
        return True

    def may_priority(self, priority: object) -> bool:
        return True

    def limits_for(self, pool: str) -> None:
        return None


class _Source:
    def __init__(self, keys: Sequence[Key]) -> None:
        self._keys = list(keys)

    async def load(self) -> list[Key]:
        return self._keys


class _Silent:
    def info(self, *args: Any, **kwargs: Any) -> None:
        return None


class _Counting:
    """An audit logger that only counts grants (evidence the real engine decided)."""

    def __init__(self) -> None:
        self.granted = 0

    def info(self, event: str, **kwargs: Any) -> None:
        if event == "lease.granted":
            self.granted += 1


def _arrivals(s: Scenario, rng: random.Random) -> list[tuple[float, Priority]]:
    n = int(s.capacity * s.demand_ratio)
    times: list[float] = []
    if s.bursty:  # half the demand in four one-hour bursts, the rest spread over the day
        bursts = [3.0, 9.0, 14.0, 20.0]
        for i in range(n):
            if i % 2:
                times.append(rng.uniform(0, 86400))
            else:
                start = bursts[(i // 2) % 4] * 3600
                times.append(start + rng.uniform(0, 3600))
    else:
        times = [rng.uniform(0, 86400) for _ in range(n)]
    high, normal, _ = s.priorities
    out = []
    for t in sorted(times):
        r = rng.random()
        prio = Priority.HIGH if r < high else Priority.NORMAL if r < high + normal else Priority.LOW
        out.append((t, prio))
    return out


async def run_scenario(s: Scenario, strategy: StrategyName, seed: int = 1) -> Result:
    """Run one day of ``s`` with ``strategy`` through a fresh engine."""
    rng = random.Random(f"{seed}:{s.name}")  # same demand and luck for every strategy
    engine_rng = random.Random(f"{seed}:{s.name}:{strategy.value}:engine")
    clock = ManualClock(DAY0)
    pool = PoolSettings(strategy=strategy,
                        reserve_high_fraction=0.1 if s.hybrid else 0.0, pace_low=s.hybrid)
    settings = Settings(
        quota=QuotaSettings(daily_limit=s.daily_limit, minute_limit=20),
        lease=LeaseSettings(default_ttl=60.0), pools={POOL: pool},
        accounts={k.account: AccountSettings() for k in s.keys})
    keys = [Key(pool=POOL, name=k.name, account=k.account, secret=Secret(f"sim-{k.name}"))
            for k in s.keys]
    store = SQLiteStore(":memory:")
    audit_log = _Counting()
    lease_ids = random.Random(f"{seed}:ids")
    engine = LeaseEngine(store=store, keys=_Source(keys), clock=clock, settings=settings,
                         audit=Audit(audit_log),
                         new_lease_id=lambda: f"ls_{lease_ids.getrandbits(128):032x}",
                         rng=engine_rng)
    await engine.start()
    await engine.reload_keys()
    provider = _Provider(s, random.Random(f"{seed}:{s.name}:provider"))
    caller = _Caller()
    result = Result(s.name, strategy.value, capacity=s.capacity)
    for t, prio in _arrivals(s, rng):
        clock.set(DAY0 + t)
        result.requests += 1
        result.high += prio is Priority.HIGH
        spent = 0.0
        for attempt in range(s.attempts):
            try:
                got = await engine.lease(caller, LeaseRequest(
                    pool=POOL, priority=prio, allow_internal=s.hybrid))
            except QuotaExhausted:
                break
            if not isinstance(got, LeaseGrant):
                result.internal += 1
                break
            if attempt == 0 and prio is Priority.HIGH:
                result.high_external += 1
            result.attempts += 1
            status, latency, limits = provider.call(got.key.name, clock.now())
            spent += latency
            result.rate_limited += status == 429
            await engine.report(caller, got.lease.lease_id, UsageReport(
                http_status=status, latency_ms=int(latency),
                error_type="timeout" if status == 0 else "", **limits))
            await engine.complete(caller, got.lease.lease_id, used=True)
            if status == 200:
                result.succeeded += 1
                result.latencies.append(spent)
                break
    result.units_used = provider.units()
    result.grants = audit_log.granted
    result.engine_units = sum((await store.counters(
        [(a, account_day(a, "2026-01-01")) for a in {k.account for k in s.keys}])).values())
    await store.close()
    return result


async def run_all(seed: int = 1, scenarios: Sequence[Scenario] = SCENARIOS,
                  strategies: Sequence[StrategyName] = tuple(StrategyName),
                  demand_scale: float = 1.0,
                  progress: Callable[[int, int, str], None] | None = None) -> list[Result]:
    """Every scenario under every strategy; ``progress(done, total, "scenario / strategy")``
    is called after each run."""
    out = []
    total = len(scenarios) * len(strategies)
    for s in scenarios:
        scaled = replace(s, daily_limit=max(1, int(s.daily_limit * demand_scale)))
        for strategy in strategies:
            out.append(await run_scenario(scaled, strategy, seed))
            if progress is not None:
                progress(len(out), total, f"{s.name} / {strategy}")
    return out


def render_table(results: Sequence[Result]) -> str:
    """A Markdown table: one row per scenario and strategy."""
    lines = ["| scenario | strategy | success | p50 ms | p95 ms | quota used by 00:00 | 429s "
             "| high-priority external |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        high = r.high_external_share
        lines.append(
            f"| {r.scenario} | {r.strategy} | {r.success_rate:.1%} | {r.percentile(0.5):.0f} "
            f"| {r.percentile(0.95):.0f} | {r.quota_used:.1%} | {r.rate_limited} "
            f"| {'-' if high is None else f'{high:.1%}'} |")
    return "\n".join(lines)


def verdicts(results: Sequence[Result]) -> list[str]:
    """Plain statements of where `intelligent` wins and where it does not, with margins."""
    by: dict[str, dict[str, Result]] = {}
    for r in results:
        by.setdefault(r.scenario, {})[r.strategy] = r
    out = []
    simple = ("round_robin", "least_used", "performance_based")
    for scenario, rows in by.items():
        if "intelligent" not in rows:
            continue
        smart = rows["intelligent"]
        best = max((rows[n] for n in simple if n in rows), key=lambda r: r.success_rate)
        delta = smart.success_rate - best.success_rate
        rr = rows.get("round_robin")
        vs_rr = f"; vs round_robin {smart.success_rate - rr.success_rate:+.1%}" if rr else ""
        if delta > 0.0005:
            word = "beats"
        elif delta >= -0.0005:
            word = "matches"
        else:
            word = "trails" + (" (by less than half a point)" if delta >= -0.005 else "")
        out.append(f"{scenario}: intelligent {word} the best simple strategy ({best.strategy}) "
                   f"on success: {delta:+.1%}{vs_rr}; p95 {smart.percentile(0.95):.0f} ms vs "
                   f"{best.percentile(0.95):.0f} ms")
    return out


def main(seed: int = 1, scenario: str = "", demand_scale: float = 1.0,
         progress: Callable[[int, int, str], None] | None = None) -> str:
    """The Markdown table and verdicts of ``keybroker simulate``."""
    chosen = [s for s in SCENARIOS if not scenario or s.name == scenario]
    results = asyncio.run(run_all(seed, chosen, demand_scale=demand_scale, progress=progress))
    return render_table(results) + "\n\n" + "\n".join(f"- {v}" for v in verdicts(results))
