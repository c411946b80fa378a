"""What people read: `keybroker status`, `usage` and `simulate` output, rendered for real."""

from __future__ import annotations

import itertools
import re
from datetime import UTC, datetime

from keybroker_client.v1 import keybroker_pb2 as pb
from rich.console import Console

from broker.status import render_status

NOW = datetime(2026, 11, 27, 15, 0, tzinfo=UTC).timestamp()


def render(renderable: object, width: int = 120) -> str:
    console = Console(record=True, width=width, force_terminal=False, color_system=None)
    console.print(renderable)
    return console.export_text()


def key(name: str, account: str, used: int, account_used: int) -> pb.KeyInfo:
    return pb.KeyInfo(key_id=f"free/{name}", pool="free", name=name, account=account,
                      strategy="round_robin", health=pb.KEY_HEALTH_HEALTHY, used_today=used,
                      account_daily_limit=50, account_minute_limit=20,
                      account_used_today=account_used)


def test_status_rows_add_up_to_the_pool_header_after_a_reconcile():
    """When the provider counted more than the keys charged (probes, 429s), status shows the
    difference as its own row per account, so the key column sums to the pool header."""
    text = render(render_status([key("a1", "acct-a", 3, 12), key("a2", "acct-a", 2, 12),
                                 key("b1", "acct-b", 4, 4)], NOW), width=160)
    assert "pool free (round_robin): 16/100 used today" in text
    other = [line for line in text.splitlines() if "counted by the provider" in line]
    assert len(other) == 1 and "acct-a" in other[0] and " 7 " in other[0], text
    assert "key today: leases through this broker" in text


def usage_records(n_keys: int) -> list[dict[str, object]]:
    return [{"day": f"2026-11-{20 + i % 7:02d}", "key": f"free/a-rather-long-key-name-{i:03d}",
             "requests": 1200 + i, "failures": 3, "prompt_tokens": 123456, "completion_tokens": 65432,
             "cost": 0.0123, "latency_ms_avg": 812.5, "latency_ms_p50": 750.0,
             "latency_ms_p95": 2500.0, "latency_ms_p99": 5000.0} for i in range(n_keys)]


def test_usage_table_at_80_columns_keeps_dates_whole_and_key_ids_recognisable():
    """At 80 columns `usage` never cuts a date, abbreviates key ids from the left, drops whole
    metric columns instead of truncating cells, and says what it left out and what p50 means."""
    from broker.status import render_usage

    text = render(render_usage(usage_records(12), ["day", "key"], 7, 80), width=80)
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 80
    for i in range(12):
        assert f"2026-11-{20 + i % 7:02d}" in text
        assert re.search(rf"│ …[-a-z]*key-name-{i:03d} +│", text), text
    assert "1,200" in text and "p50 ms" in text
    assert "not shown at this width" in text and "--csv or --json show all" in text
    assert "upper bounds of the latency histogram buckets" in text


def test_usage_table_shows_every_column_when_wide():
    """On a wide terminal every metric column is shown and nothing is listed as left out."""
    from broker.status import render_usage

    text = render(render_usage(usage_records(2), ["day", "key"], 7, 200), width=200)
    for header in ("requests", "failures", "cost $", "p50 ms", "p95 ms", "p99 ms", "avg ms",
                   "prompt tok", "compl. tok"):
        assert header in text
    assert "not shown" not in text
    assert "upper bounds of the latency histogram buckets" in text


def test_demo_summary_explains_an_account_where_broker_and_emulator_disagree():
    """`keybroker demo`'s account table says why a count differs (use the broker never saw,
    not yet reconciled) instead of a bare NO."""
    from broker.testing.demo import SHARED, DemoSummary, render_summary

    shared, spent = SHARED
    summary = DemoSummary(accounts=[("acct-a", 12, 12, 50), (shared, 10, 10 + spent, 50)],
                          now=NOW)
    text = render(render_summary(summary), width=160)
    row = next(line for line in text.splitlines() if line.startswith(f"│ {shared}"))
    assert "NO" not in row
    assert f"{spent} the provider counted that the broker never saw" in text
    assert "next key probe or 429" in text


def test_simulate_lists_its_scenarios_and_reports_progress():
    """`simulate --help` lists every scenario, and the run reports one step per scenario and
    strategy as it goes (the CLI draws a progress bar from it)."""
    import subprocess
    import sys
    from pathlib import Path

    from broker.config import StrategyName
    from broker.testing.simulate import SCENARIOS, main

    help_text = subprocess.run([str(Path(sys.executable).parent / "keybroker"), "simulate",
                                "--help"], capture_output=True, text=True, check=True,
                               env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"}).stdout
    assert all(s.name in help_text for s in SCENARIOS)
    steps: list[tuple[int, int, str]] = []
    main(seed=1, scenario="uniform", demand_scale=0.05,
         progress=lambda done, total, label: steps.append((done, total, label)))
    assert [(d, t) for d, t, _ in steps] == [(i + 1, len(StrategyName))
                                             for i in range(len(StrategyName))]
    assert steps[0][2] == "uniform / round_robin"


def test_the_cli_names_the_simulator_scenarios_exactly():
    """The CLI's list of simulator scenarios is the simulator's own."""
    from broker.cli import SIMULATOR_SCENARIOS
    from broker.testing.simulate import SCENARIOS

    assert tuple(s.name for s in SCENARIOS) == SIMULATOR_SCENARIOS


def _chart_rows(days: int, keys: int) -> list[tuple[str, str, int]]:
    return [(f"2026-11-{1 + d:02d}", f"free/key-{k:02d}", 5 + (d * 7 + k * 3) % 20)
            for d in range(days) for k in range(keys)]


def _overlaps(a: object, b: object) -> bool:
    return not (a.x1 <= b.x0 or b.x1 <= a.x0 or a.y1 <= b.y0 or b.y1 <= a.y0)  # type: ignore[attr-defined]


def test_usage_plot_keeps_the_legend_off_the_bars_for_one_to_thirty_days(tmp_path):
    """The chart's legend sits outside the plotting area, one day is a narrow bar rather than
    the full width, many keys fold into 'other', and 30 days get readable, non-overlapping dates."""
    from broker.plots import daily_requests_chart, daily_requests_figure

    for days, keys in ((1, 3), (7, 4), (30, 12)):
        fig = daily_requests_figure(_chart_rows(days, keys))
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        ax = fig.axes[0]
        legend = ax.get_legend()
        assert legend is not None
        assert not _overlaps(legend.get_window_extent(renderer), ax.get_window_extent(renderer))
        bars = [p for p in ax.patches]
        assert max(b.get_window_extent(renderer).width for b in bars) < 0.2 * ax.bbox.width
        labels = [t.get_text() for t in legend.get_texts()]
        assert len(labels) <= 9 and (keys <= 8 or labels[0].startswith("other"))
        ticks = [t for t in ax.get_xticklabels() if t.get_text()]
        boxes = [t.get_window_extent(renderer) for t in ticks]
        assert all(not _overlaps(a, b) for a, b in itertools.pairwise(boxes))
        import matplotlib.pyplot as plt

        plt.close(fig)
    daily_requests_chart(_chart_rows(30, 12), str(tmp_path / "u.png"))
    assert (tmp_path / "u.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_status_shows_rotation_columns_only_for_pools_with_managed_keys():
    """Keys put by hand have no age or rotation schedule: their pool's table leaves those two
    columns out, so it fits 80 columns without cutting the key names; a managed key's pool shows
    them."""
    plain = render(render_status([key("a1", "acct-a", 3, 3)], NOW), width=160)
    assert "next rotation" not in plain and " age " not in plain, plain
    narrow = render(render_status([key("a1", "acct-a", 3, 3)], NOW), width=80)
    assert "│ a1 " in narrow and "│ acct-a " in narrow, narrow
    managed = key("m1", "acct-a", 1, 1)
    managed.created_at.FromSeconds(int(NOW) - 3 * 86400)
    managed.next_rotation_at.FromSeconds(int(NOW) + 86400)
    shown = render(render_status([managed], NOW), width=160)
    assert "next rotation" in shown and "3.0d" in shown and "in 1.0d" in shown, shown
