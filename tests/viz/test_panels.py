"""The composed panels (shared by the app and ``spa-viz analyze``) and the table printer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import spa_viz
from spa_viz.selection.selectors import install_selector, remove_selector
from spa_viz.viz import overlays, panels
from spa_viz.viz.tables import markdown_table
from tests.conftest import mixed_gate_tiny_vit


@pytest.fixture
def display() -> np.ndarray:
    return np.full((64, 64, 3), 120, dtype=np.uint8)


def test_panels_stack_a_title_above_the_image_and_a_legend_below(display: np.ndarray) -> None:
    model = mixed_gate_tiny_vit()
    _, tr = spa_viz.trace(model, torch.randn(2, 3, 32, 32))
    record = tr.layers[0]
    labels = torch.ones(record.keep.shape[1], dtype=torch.bool)
    for panel in (
        panels.gate_panel(display, record, 1),
        panels.kept_panel(display, record, 1, "image"),
        panels.labels_panel(display, record, 1, labels),
        panels.attribution_panel(display, torch.randn(4, 4), "Attribution", "logit of class 0"),
    ):
        assert panel.dtype == np.uint8 and panel.shape[1] == 64 and panel.shape[0] > 64 + 20
    layout = panels.layout_panel(record)
    assert layout.shape[1] >= 360 and layout.shape[0] > record.plan.num_rows * 14


def test_gate_values_normalize_selector_scores_only() -> None:
    model = mixed_gate_tiny_vit()
    images = torch.randn(2, 3, 32, 32)
    _, learned = spa_viz.trace(model, images)
    assert torch.equal(panels.gate_values(learned.layers[0], 0), learned.layers[0].soft_gate[0].reshape(4, 4))
    install_selector(model, "feature_norm")
    try:
        _, chosen = spa_viz.trace(model, images)
    finally:
        remove_selector(model)
    values = panels.gate_values(chosen.layers[0], 0)
    assert float(values.min()) == 0.0 and float(values.max()) == 1.0


def test_gate_panel_outline_is_the_keep_rule_the_trace_ran_with() -> None:
    model = mixed_gate_tiny_vit()
    spa_viz.configure(model, tau=3.0, threshold=0.6)
    _, tr = spa_viz.trace(model, torch.randn(2, 3, 32, 32))
    record = tr.layers[0]
    assert (record.threshold, record.tau) == (0.6, 3.0)
    values = panels.gate_values(record, 1)
    assert torch.equal(values.reshape(-1) > 0.6, record.keep[1]), "drawn above the threshold = kept"
    assert not torch.equal(record.soft_gate[1] > 0.6, record.keep[1]), "tau 3 changes which tokens pass"


def test_score_source_tells_own_logit_from_fused_scores() -> None:
    model = mixed_gate_tiny_vit()
    images = torch.randn(2, 3, 32, 32)
    spa_viz.configure(model, fusion="chain")
    _, chain = spa_viz.trace(model, images)
    spa_viz.configure(model, fusion="none")
    _, own = spa_viz.trace(model, images)
    assert [panels.score_source(t) for t in own.layers] == ["own logit"] * len(own.layers)
    assert panels.score_source(chain.layers[0]) == "own logit" and panels.fused_share(chain.layers[0]) is None
    assert not chain.layers[0].fused_input and all(t.fused_input for t in chain.layers[1:])
    later = chain.layers[1]
    share = panels.fused_share(later, 0)
    assert share == float((later.scores[0] > later.raw_scores[0]).float().mean()) and 0 < share < 1
    assert panels.score_source(later, 0) == f"fused: {share:.0%} earlier"
    strip = panels.strip_panel(np.full((64, 64, 3), 120, dtype=np.uint8), chain.layers, 0, "x")
    plain = overlays.layer_strip(np.full((64, 64, 3), 120, dtype=np.uint8), chain.layers, 0)
    assert strip.shape[0] > plain.shape[0], "every layer panel carries its caption"
    install_selector(model, "random")
    try:
        _, chosen = spa_viz.trace(model, images)
    finally:
        remove_selector(model)
    assert panels.fused_share(chosen.layers[0]) is None and panels.score_source(chosen.layers[0]) == "selector random"


def test_markdown_table() -> None:
    text = markdown_table(["a", "b"], [[1, "x"], [2.5, "y"]], ["right", None])
    assert text == "| a | b |\n|---:|---|\n| 1 | x |\n| 2.5 | y |"
    with pytest.raises(ValueError, match="2 columns"):
        markdown_table(["a", "b"], [[1]])
