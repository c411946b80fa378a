"""Terminal views: ``keybroker status`` (pools, keys, usage bars, health) and ``usage`` tables."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from rich.console import Group
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from .clock import next_midnight
from .engine.health import describe_reason

__all__ = ["render_status", "render_usage"]

_HEALTH = {1: ("healthy", "green"), 2: ("cooling down", "yellow"), 3: ("circuit open", "red"),
           4: ("disabled", "bold red")}


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def _age(k: Any, now: float) -> str:
    """The key's age at the provider ('' for keys put in Vault by hand)."""
    if not k.HasField("created_at"):
        return ""
    days = (now - k.created_at.ToSeconds()) / 86400.0
    return f"{days:.1f}d" if days >= 1 else _duration(now - k.created_at.ToSeconds())


def _next_rotation(k: Any, now: float) -> str:
    """When the schedule rotates the key: 'in 3.2d', 'due' or '' (never)."""
    if not k.HasField("next_rotation_at"):
        return ""
    left = k.next_rotation_at.ToSeconds() - now
    if left <= 0:
        return "due"
    return f"in {left / 86400.0:.1f}d" if left >= 86400 else f"in {_duration(left)}"


def render_status(keys: Sequence[Any], now: float, cooldowns: Sequence[Any] = ()) -> Group:
    """One table per pool from KeyAdmin.ListKeys answers (``KeyInfo`` messages), then the
    cooldowns that are no one key's (``Cooldown`` messages: models cooling pool-wide,
    accounts' paid use), every reason in words."""
    pools: dict[str, list[Any]] = {}
    for k in keys:
        pools.setdefault(k.pool, []).append(k)
    reset_in = _duration(next_midnight(now) - now)
    parts: list[Any] = [Text(f"keybroker status at {datetime.fromtimestamp(now, UTC):%H:%M:%S}"
                             f" UTC, daily quotas reset in {reset_in}", style="bold")]
    for pool, rows in sorted(pools.items()):
        accounts = {k.account: (k.account_used_today, k.account_daily_limit) for k in rows}
        used = sum(u for u, _ in accounts.values())
        total = sum(t for _, t in accounts.values())
        table = Table(title=f"pool {pool} ({rows[0].strategy}): {used}/{total} used today",
                      title_justify="left",
                      caption="key today: leases through this broker on the key; account usage: "
                              "the account's day, which also counts what the provider reported "
                              "(probes, 429s)", caption_justify="left")
        # Age and next rotation only where some key is managed (provisioned, or scheduled).
        managed = any(k.HasField("created_at") or k.HasField("next_rotation_at") for k in rows)
        for column in ("key", "account", "account usage", "", "key today", "health", "until",
                       "leases", *(("age", "next rotation") if managed else ())):
            table.add_column(column)
        for k in sorted(rows, key=lambda r: r.key_id):
            label, colour = _HEALTH.get(k.health, ("unknown", "white"))
            until = ""
            if k.HasField("cooldown_until") and k.cooldown_until.ToSeconds() > now:
                until = _duration(k.cooldown_until.ToSeconds() - now)
            limit = max(k.account_daily_limit, 1)
            table.add_row(k.name, k.account,
                          ProgressBar(total=limit, completed=min(k.account_used_today, limit),
                                      width=20),
                          f"{k.account_used_today}/{k.account_daily_limit}", str(k.used_today),
                          Text(label + (f": {describe_reason(k.health_reason)}"
                                        if k.health_reason else ""),
                               style=colour), until, str(k.active_leases),
                          *((_age(k, now), _next_rotation(k, now)) if managed else ()))
        # The account's day also holds what the provider counted beyond this broker's leases
        # (a probe's free_model_daily_requests, a 429's headers): one row per account says so,
        # so the "key today" column adds up to the pool's header.
        for account, (account_used, _) in sorted(accounts.items()):
            through_keys = sum(k.used_today for k in rows if k.account == account)
            if account_used > through_keys:
                table.add_row(Text("(other)", style="dim"), account, "", "",
                              str(account_used - through_keys),
                              Text("counted by the provider, not by a lease here", style="dim"),
                              "", "", *(("", "") if managed else ()))
        parts.append(table)
    if cooldowns:
        table = Table(title="cooldowns (models pool-wide, accounts' paid use)",
                      title_justify="left")
        for column in ("pool", "cooling", "reason", "until"):
            table.add_column(column)
        for c in cooldowns:
            what = f"model {c.name}" if c.scope == "model" else f"paid use of account {c.name}"
            left = c.until.ToSeconds() - now
            table.add_row(c.pool, what, Text(c.description or describe_reason(c.reason),
                                             style="yellow"),
                          _duration(left) if left > 0 else "in-flight cap")
        parts.append(table)
    if not pools:
        parts.append(Text("no keys visible to this principal"))
    return Group(*parts)


# Metric columns of `keybroker usage`, most wanted first: narrow terminals drop from the end.
USAGE_COLUMNS: tuple[tuple[str, str], ...] = (
    ("requests", "requests"), ("failures", "failures"), ("cost", "cost $"),
    ("latency_ms_p50", "p50 ms"), ("latency_ms_p95", "p95 ms"), ("prompt_tokens", "prompt tok"),
    ("completion_tokens", "compl. tok"), ("latency_ms_avg", "avg ms"),
    ("latency_ms_p99", "p99 ms"))
KEY_ID_WIDTH = 20


def _cell(value: Any) -> str:
    if isinstance(value, float):
        if value == float("inf"):
            return ">max"
        return f"{value:.4g}" if value < 1e4 else f"{value:,.0f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def _left_abbreviated(text: str, width: int) -> str:
    """``…ool/long-key-name``: ids differ at their end, so keep the end."""
    return text if len(text) <= width else "…" + text[-(width - 1):]


def render_usage(records: Sequence[dict[str, Any]], dims: Sequence[str], days: int,
                 width: int) -> Table:
    """The ``keybroker usage`` table for a terminal ``width`` columns wide.

    Grouping columns are never cut (dates whole, key ids abbreviated from the left);
    metric columns are added most wanted first while they fit, and the caption names
    those left out and says what p50/p95/p99 are.
    """
    def shown(dim: str, value: Any) -> str:
        text = _cell(value)
        return _left_abbreviated(text, KEY_ID_WIDTH) if dim == "key" else text

    rows = [{d: shown(d, r[d]) for d in dims} | {f: _cell(r[f]) for f, _ in USAGE_COLUMNS}
            for r in records]

    def column_width(name: str, header: str) -> int:
        return max([len(header), *(len(row[name]) for row in rows)]) + 3  # borders, padding

    used = 1 + sum(column_width(d, d) for d in dims)
    metrics: list[tuple[str, str]] = []
    hidden: list[str] = []
    for name, header in USAGE_COLUMNS:
        need = column_width(name, header)
        if used + need <= width and not hidden:
            metrics.append((name, header))
            used += need
        else:
            hidden.append(header)
    notes = []
    if any(name.startswith("latency_ms_p") for name, _ in metrics):
        notes.append("p50/p95/p99: upper bounds of the latency histogram buckets "
                     "(the true percentile is at most this)")
    if hidden:
        notes.append(f"not shown at this width: {', '.join(hidden)} (--csv or --json show all)")
    table = Table(title=f"usage, last {days} day(s)", title_justify="left",
                  caption="\n".join(notes) or None, caption_justify="left")
    for d in dims:
        table.add_column(d, no_wrap=True, min_width=10 if d == "day" else None)
    for _, header in metrics:
        table.add_column(header, justify="right", no_wrap=True)
    for row in rows:
        table.add_row(*(row[d] for d in dims), *(row[name] for name, _ in metrics))
    return table
