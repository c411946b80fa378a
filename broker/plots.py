"""Charts for people: daily requests per key (``keybroker usage --plot``)."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import date, timedelta
from typing import Any

__all__ = ["MAX_KEYS_SHOWN", "daily_requests_chart", "daily_requests_figure"]

MAX_KEYS_SHOWN = 8
"""Keys drawn on their own, busiest first; the rest are one ``other`` band."""


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt
    except ImportError as exc:  # an optional extra: pip install 'keybroker[plot]'
        raise RuntimeError("--plot needs matplotlib: pip install 'keybroker[plot]'") from exc
    return plt


def _all_days(days: Iterable[str]) -> list[str]:
    """Every day from the first to the last (a day without requests is a gap, not skipped)."""
    seen = sorted(set(days))
    if not seen:
        return []
    first, last = date.fromisoformat(seen[0]), date.fromisoformat(seen[-1])
    return [(first + timedelta(days=i)).isoformat() for i in range((last - first).days + 1)]


def daily_requests_figure(rows: Iterable[tuple[str, str, int]]) -> Any:
    """A stacked bar chart of (day, key_id, requests): a matplotlib Figure.

    Bars keep a day's width whether the chart holds 1 or 30 days, the legend sits to the
    right of the plot, the busiest ``MAX_KEYS_SHOWN`` keys get their own colour and the
    rest are summed as ``other``, and day labels thin out so they never overlap.
    """
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    per_key: dict[str, dict[str, int]] = {}
    for day, key_id, requests in rows:
        per_key.setdefault(key_id, {})[day] = per_key.get(key_id, {}).get(day, 0) + requests
    days = _all_days(d for per_day in per_key.values() for d in per_day)
    ranked = sorted(per_key, key=lambda k: (-sum(per_key[k].values()), k))
    shown = ranked[:MAX_KEYS_SHOWN] if len(ranked) > MAX_KEYS_SHOWN + 1 else ranked
    series = [(k, per_key[k]) for k in shown]
    rest = [k for k in ranked if k not in shown]
    if rest:
        other: dict[str, int] = {}
        for k in rest:
            for d, n in per_key[k].items():
                other[d] = other.get(d, 0) + n
        series.append((f"other ({len(rest)} keys)", other))

    fig, ax = plt.subplots(figsize=(10, 4.5))
    # x positions are day indices: with few days the axis is padded to a week, so one day
    # is one slim bar, not the whole width.
    xs = list(range(len(days)))
    bottom = [0] * len(days)
    for label, per_day in series:
        heights = [per_day.get(d, 0) for d in days]
        ax.bar(xs, heights, bottom=bottom, width=0.7, label=label)
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    span = max(len(days), 7)
    ax.set_xlim(-0.5 - (span - len(days)) / 2, len(days) - 0.5 + (span - len(days)) / 2)
    step = max(1, -(-len(days) // 10))  # at most about 10 labels
    ax.set_xticks(xs[::step], [d[5:] if len(days) > 1 else d for d in days[::step]])
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("requests")
    ax.set_xlabel(f"UTC day ({days[0][:4]})" if days else "UTC day")
    title = "requests per UTC day and key"
    if days:
        title += f", {days[0]} to {days[-1]}" if len(days) > 1 else f", {days[0]}"
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    if series:
        handles, labels = ax.get_legend_handles_labels()  # top of the stack first, as drawn
        ax.legend(handles[::-1], labels[::-1], loc="upper left", bbox_to_anchor=(1.01, 1.0),
                  fontsize="small", frameon=False, title="key")
    fig.tight_layout()
    return fig


def daily_requests_chart(rows: Iterable[tuple[str, str, int]], path: str) -> None:
    """Write :func:`daily_requests_figure` to ``path`` as PNG."""
    plt = _pyplot()
    fig = daily_requests_figure(rows)
    fig.savefig(path, dpi=100)
    plt.close(fig)
