"""A short campaign with a fixed seed inside the suite (the long one is `make chaos`).

Deselect it locally with ``-m "not chaos"``; CI runs it. A failure prints the seed and the
shortest excerpt of the history that breaks each invariant (see tests/chaos/checker.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.chaos.campaign import Plan, run_campaign

pytestmark = [pytest.mark.chaos, pytest.mark.slow, pytest.mark.timeout(300)]

SEED = 16


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
async def test_short_campaign_keeps_every_invariant(backend: str, tmp_path: Path):
    """Random clients and faults for 30 s: the history and final state keep all seven invariants."""
    result = await run_campaign(Plan(backend=backend, seed=SEED, duration=30.0, clients=32),
                                tmp_path / "chaos")
    print("\n" + result.report())
    assert result.figures["faults"] >= 4
    assert result.figures["granted"] > 0 and result.figures["refused"] > 0
    assert result.ok, result.report()
