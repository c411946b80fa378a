"""Split a py-spy raw profile (``py-spy record --format raw``) of a broker by component.

Each sample is put in one component, by its innermost frame that says which (leaf first):
the broker module it is in, or a library (structlog, aiosqlite, redis). Samples under
``broker/audit.py`` count as ``audit`` whatever they call (its log line, JSON, the file),
those under the metrics code or prometheus_client as ``metrics`` (also when the audit
calls its metrics sink), OpenTelemetry's as ``tracing``; samples with no broker frame are
gRPC's and asyncio's (``framework``).

Usage: python bench/profile_split.py PROFILE.txt [...]
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

# (substring of a frame, component). An owner anywhere in the stack takes the sample (the
# innermost one when there are several); else the innermost broker or library frame.
OWNERS = (("broker/audit.py", "audit"), ("broker/metrics.py", "metrics"),
          ("broker/telemetry.py", "tracing"), ("opentelemetry", "tracing"),
          ("prometheus_client", "metrics"))
BROKER = (("broker/api/interceptor.py", "auth + interceptor"), ("broker/auth.py", "auth + interceptor"),
          ("broker/api/convert.py", "conversion"), ("broker/api/servicers.py", "conversion"),
          ("broker/store/", "store"), ("broker/engine/", "engine"),
          ("broker/validate.py", "engine"), ("broker/logging.py", "logging"),
          ("structlog", "logging"), ("aiosqlite", "store"), ("redis/", "store"))


def component(stack: str) -> str:
    frames = stack.split(";")
    for frame in reversed(frames):  # the innermost owner: a metrics sink under the audit
        for needle, name in OWNERS:
            if needle in frame:
                return name
    for frame in reversed(frames):
        for needle, name in BROKER:
            if needle in frame:
                return name
        if "broker/" in frame and "broker/cli.py" not in frame:  # the cli is every stack's root
            return "broker (other)"
    return "framework (gRPC, asyncio)"


def split(path: Path) -> Counter[str]:
    counts: Counter[str] = Counter()
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if stack and n.isdigit():
            counts[component(stack)] += int(n)
    return counts


def main() -> None:
    for arg in sys.argv[1:]:
        counts = split(Path(arg))
        total = sum(counts.values())
        print(f"{arg}: {total} samples")
        for name, n in counts.most_common():
            print(f"  {name:28} {100 * n / total:5.1f} %")


if __name__ == "__main__":
    main()
