"""The terminal view behind ``keybroker status``: pools, keys, usage bars, health."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from rich.console import Group
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from .clock import next_midnight

__all__ = ["render_status"]

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


def render_status(keys: Sequence[Any], now: float) -> Group:
    """One table per pool from KeyAdmin.ListKeys answers (``KeyInfo`` messages)."""
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
                      title_justify="left")
        for column in ("key", "account", "account usage", "", "key today", "health", "until",
                       "leases", "age", "next rotation"):
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
                          Text(label + (f" ({k.health_reason})" if k.health_reason else ""),
                               style=colour), until, str(k.active_leases), _age(k, now),
                          _next_rotation(k, now))
        parts.append(table)
    if not pools:
        parts.append(Text("no keys visible to this principal"))
    return Group(*parts)
