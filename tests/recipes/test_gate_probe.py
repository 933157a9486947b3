"""The gate probe: the task loss reaches an unkept token's score only on the paths that claim it."""

from __future__ import annotations

from pathlib import Path

import pytest

import spa_viz
from spa_viz.recipes.detection.gate_probe import format_probe, probe_gates

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "spa-vit-digits-noselect-bias0.json"


@pytest.mark.skipif("dense-vit-digits" not in spa_viz.available(), reason="the recipe starts from dense-vit-digits")
def test_probe_tells_copy_from_the_paths_that_reach_every_gate() -> None:
    signals = probe_gates(CONFIG, ("copy", "refresh"), batches=1, batch_size=2)
    by_path = {path: [s for s in signals if s.unkept == path] for path in ("copy", "refresh")}
    assert [s.layer for s in by_path["copy"]] == [2, 3, 4, 5] == [s.layer for s in by_path["refresh"]]
    for signal in by_path["copy"]:
        assert 0.0 < signal.keep < 1.0, "bias-0 gates keep about half under Gumbel noise"
        assert signal.unkept_zero_share == 1.0 and signal.unkept_open_share == 0.0
    assert all(s.unkept_zero_share == 0.0 for s in by_path["refresh"])
    assert all(s.bias_grad != 0.0 for s in signals)
    table = format_probe(signals)
    assert table.count("\n") == 1 + len(signals) and "| refresh | 5 |" in table
