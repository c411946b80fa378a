"""``keybroker demo``: a few hundred chat completions through OpenRouterClient, end to end.

It starts an OpenBao dev server (or uses the one given), the OpenRouter emulator
with several accounts, and a broker on SQLite in a temporary directory; imports
one or two keys per account; and drives completions through ``OpenRouterClient``
(a few streamed, a few with ``model="auto"``). Along the way:

- part-way through, "another team" spends 30 of one account's requests behind the
  broker's back, so the provider says 429 before the broker's count reaches 50:
  the client fails over and the broker reconciles its count with the provider's;
- one key was revoked at the provider: the first key probe disables it before any
  caller is handed it;
- a few percent of calls fail with 502 and fail over to another key;
- once every account has spent its 50, the broker routes INTERNAL.

Time is simulated (a ManualClock shared by broker, emulator and client, one
second per completion) so the per-minute windows pass in seconds, not minutes.
It ends with the ``keybroker status`` table and the broker's and the emulator's
counts side by side.
"""

from __future__ import annotations

import asyncio
import collections
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from keybroker_client import (
    AsyncKeyBrokerClient,
    OpenRouterClient,
    OpenRouterError,
    QuotaExhausted,
    RouteInternal,
)

from ..clock import ManualClock
from ..config import VaultSettings
from .devstack import DevStack
from .emulator import Emulator

__all__ = ["DemoSummary", "run_demo"]

MODEL = "meta-llama/llama-3.3-70b-instruct:free"
ACCOUNTS = (("acct-a", ("a1", "a2")), ("acct-b", ("b1",)), ("acct-c", ("c1",)),
            ("acct-d", ("d1", "d2")), ("acct-e", ("e1",)))
REVOKED = "d2"
SHARED = ("acct-c", 30)  # an account another team spends from, unseen by the broker


@dataclass
class DemoSummary:
    """What the demo saw."""

    ok: int = 0
    internal: int = 0
    failed: int = 0
    failed_over: int = 0
    streamed: int = 0
    statuses: collections.Counter[int] = field(default_factory=collections.Counter)
    accounts: list[tuple[str, int, int, int]] = field(default_factory=list)  # name, broker, emu, limit
    keys: list[Any] = field(default_factory=list)  # KeyInfo messages
    now: float = 0.0
    seconds: float = 0.0
    revoked_calls: int = 0


async def run_demo(*, requests: int = 300, concurrency: int = 4, failure_rate: float = 0.03,
                   seed: int = 7, vault: VaultSettings | None = None,
                   echo: Callable[[str], None] = print) -> DemoSummary:
    """Run the demo; ``vault`` reuses a bootstrapped Vault (else an OpenBao dev server starts).

    ``echo`` receives one line per notable event (failovers, disabled keys, INTERNAL).
    """
    clock = ManualClock(time.time())
    keys = [(name, account) for account, names in ACCOUNTS for name in names]
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="kb-demo-") as tmp:
        async with DevStack(tmp, keys=keys, vault=vault, clock=clock, seed=seed,
                            reload_interval=3600.0, sweep_interval=0.2, probe_interval=0.0,
                            tracing=False, stop_grace=0.0) as stack:
            emu = stack.emulator
            emu.revoke(REVOKED)
            emu.faults.failure_rate = failure_rate
            await stack.wait_ready()
            # One round of key probes (what `[openrouter] probe_interval` runs in the background).
            await stack.broker.prober.probe_all()
            summary = await _drive(stack.broker.port, stack.caller_token, stack.operator_token,
                                   clock, emu, requests, concurrency, echo)
    summary.seconds = time.monotonic() - started
    return summary


async def _drive(port: int, caller: str, operator: str, clock: ManualClock, emu: Emulator,
                 requests: int, concurrency: int, echo: Callable[[str], None]) -> DemoSummary:
    summary = DemoSummary()
    target = f"127.0.0.1:{port}"
    async with AsyncKeyBrokerClient(target, token=caller) as client, \
            AsyncKeyBrokerClient(target, token=operator) as admin, \
            OpenRouterClient(client, "free", allow_internal=True, max_wait=0.0,
                             clock=clock.now) as router:
        for key in await admin.list_keys("free"):
            if not key.enabled:
                echo(f"probe: {key.key_id} ({key.account}) disabled before use "
                     f"({key.health_reason})")
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(requests):
            queue.put_nowait(i)
        seen_429: set[str] = set()
        told: set[bool] = set()  # INTERNAL announced: for a minute window / for the day

        async def one(i: int) -> None:
            if i == requests // 5:
                emu.use(*SHARED)
                echo(f"#{i}: another team spends {SHARED[1]} of {SHARED[0]}'s requests "
                     "(the broker cannot see that)")
            messages = [{"role": "user", "content": f"demo request {i}"}]
            model = "auto" if i % 7 == 3 else MODEL
            try:
                if i % 10 == 5:
                    async with router.stream(messages, model=model, max_tokens=8) as s:
                        async for _chunk in s:
                            pass
                    result = s.result
                    summary.streamed += 1
                else:
                    result = await router.chat(messages, model=model, max_tokens=16)
            except RouteInternal as exc:
                summary.internal += 1
                day = exc.retry_after > 120
                if day not in told:
                    told.add(day)
                    when = (f"{exc.retry_after / 3600:.1f} h (00:00 UTC)" if day else
                            f"{exc.retry_after:.0f} s (next minute window)")
                    echo(f"#{i}: no key can take it: broker routes INTERNAL ({exc.reason}; "
                         f"external again in {when})")
                return
            except (OpenRouterError, QuotaExhausted) as exc:
                summary.failed += 1
                echo(f"#{i}: failed: {exc}")
                return
            assert result is not None
            summary.ok += 1
            for a in result.attempts:
                summary.statuses[a.status] += 1
            if len(result.attempts) > 1:
                summary.failed_over += 1
                limited = {a.account for a in result.attempts if a.status == 429}
                if limited - seen_429 or not limited:  # one line per account that ran dry
                    seen_429.update(limited)
                    chain = " -> ".join(f"{a.key_id} ({a.account}) answered {a.status} "
                                        f"{a.error_type}" for a in result.attempts[:-1])
                    echo(f"#{i}: {chain} -> failed over to {result.key_id} ({result.account})")

        async def worker() -> None:
            while not queue.empty():
                i = queue.get_nowait()
                await one(i)
                clock.advance(1.0)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        summary.keys = list(await admin.list_keys("free"))
    summary.now = clock.now()
    accounts = {k.account: k.account_used_today for k in summary.keys}
    summary.accounts = [(a, used, emu.free_requests_today(a), emu.free_daily_limit(a))
                        for a, used in sorted(accounts.items())]
    summary.revoked_calls = len(emu.calls_with(REVOKED))
    return summary


def _agreement(account: str, broker_used: int, emu_used: int) -> str:
    """``yes``, or in words why the broker's count of ``account`` differs from the provider's."""
    if broker_used == emu_used:
        return "yes"
    if emu_used > broker_used:
        who = " (another team's use, by design)" if account == SHARED[0] else ""
        return (f"not yet: {emu_used - broker_used} the provider counted that the broker never "
                f"saw{who}; the broker adopts the provider's count at its next key probe or 429")
    return (f"not yet: the broker charged {broker_used - emu_used} more (leases granted whose "
            "calls never reached the provider); refunds and reconciliation settle it")


def render_summary(summary: DemoSummary) -> Any:
    """The ``keybroker status`` view plus the demo's own tables (rich renderables)."""
    from rich.console import Group
    from rich.table import Table

    from ..status import render_status

    counts = Table(title="accounts: broker vs. emulator (free requests today)")
    for column in ("account", "broker", "emulator", "limit", "agree"):
        counts.add_column(column, justify="left" if column in ("account", "agree") else "right")
    for name, broker_used, emu_used, limit in summary.accounts:
        counts.add_row(name, str(broker_used), str(emu_used), str(limit),
                       _agreement(name, broker_used, emu_used))
    totals = Table(title=f"requests ({summary.seconds:.1f} s)")
    totals.add_column("outcome")
    totals.add_column("count", justify="right")
    for label, value in (("completed", summary.ok), ("  of which failed over", summary.failed_over),
                         ("  of which streamed", summary.streamed),
                         ("routed INTERNAL", summary.internal), ("failed", summary.failed),
                         ("calls with the revoked key", summary.revoked_calls)):
        totals.add_row(label, str(value))
    for status, n in sorted(summary.statuses.items()):
        totals.add_row(f"provider answered {status or 'nothing'}", str(n))
    return Group(render_status(summary.keys, summary.now), counts, totals)
