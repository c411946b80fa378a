"""Usage analytics: group recorded usage rows by day, key, account, model or principal."""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .models import LATENCY_BUCKETS_MS, UsageRow

__all__ = ["Dimension", "UsageSummary", "summarize"]


class Dimension(enum.StrEnum):
    DAY = "day"
    KEY = "key_id"
    ACCOUNT = "account"
    MODEL = "model"
    PRINCIPAL = "principal"


@dataclass(frozen=True)
class UsageSummary:
    group: tuple[str, ...]  # values of the requested dimensions, in their order
    requests: int
    failures: int
    prompt_tokens: int
    completion_tokens: int
    cost: float
    latency_ms_avg: float
    latency_ms_p50: float
    latency_ms_p95: float
    latency_ms_p99: float


def _percentile(buckets: Sequence[int], q: float) -> float:
    """The upper bound of the histogram bucket holding quantile ``q`` (an upper estimate)."""
    total = sum(buckets)
    if not total:
        return 0.0
    rank, seen = q * total, 0
    for i, count in enumerate(buckets):
        seen += count
        if seen >= rank and count:
            return float(LATENCY_BUCKETS_MS[i]) if i < len(LATENCY_BUCKETS_MS) else float("inf")
    return float("inf")


def summarize(rows: Iterable[UsageRow], by: Sequence[Dimension]) -> list[UsageSummary]:
    """Sum rows per distinct combination of the ``by`` dimensions (all rows when empty)."""
    groups: dict[tuple[str, ...], list[UsageRow]] = {}
    for row in rows:
        groups.setdefault(tuple(str(getattr(row, d.value)) for d in by), []).append(row)
    out = []
    for group, members in sorted(groups.items()):
        buckets = [sum(col) for col in zip(*(m.latency_buckets for m in members), strict=True)]
        requests = sum(m.requests for m in members)
        out.append(UsageSummary(
            group=group, requests=requests, failures=sum(m.failures for m in members),
            prompt_tokens=sum(m.prompt_tokens for m in members),
            completion_tokens=sum(m.completion_tokens for m in members),
            cost=sum(m.cost for m in members),
            latency_ms_avg=sum(m.latency_ms_sum for m in members) / requests if requests else 0.0,
            latency_ms_p50=_percentile(buckets, 0.50), latency_ms_p95=_percentile(buckets, 0.95),
            latency_ms_p99=_percentile(buckets, 0.99)))
    return out
