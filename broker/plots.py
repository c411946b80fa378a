"""Charts for people: daily requests per key (``keybroker usage --plot``)."""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["daily_requests_chart"]


def daily_requests_chart(rows: Iterable[tuple[str, str, int]], path: str) -> None:
    """A stacked bar chart of (day, key_id, requests) written to ``path`` as PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt
    except ImportError as exc:  # an optional extra: pip install 'keybroker[plot]'
        raise RuntimeError("--plot needs matplotlib: pip install 'keybroker[plot]'") from exc
    data: dict[str, dict[str, int]] = {}
    for day, key_id, requests in rows:
        data.setdefault(key_id, {})[day] = requests
    days = sorted({d for per_key in data.values() for d in per_key})
    fig, ax = plt.subplots(figsize=(max(6, len(days) * 0.9), 4))
    bottom = [0] * len(days)
    for key_id, per_day in sorted(data.items()):
        heights = [per_day.get(d, 0) for d in days]
        ax.bar(days, heights, bottom=bottom, label=key_id)
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    ax.set_ylabel("requests")
    ax.set_title("requests per day and key")
    if data:
        ax.legend(fontsize="small")
    fig.autofmt_xdate()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
