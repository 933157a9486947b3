"""The composed panels (shared by the app and ``spa-viz analyze``) and the table printer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import spa_viz
from spa_viz.selection.selectors import install_selector, remove_selector
from spa_viz.viz import panels
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
        panels.gate_panel(display, record, 1, threshold=0.5),
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
    assert torch.equal(panels.gate_values(learned.layers[0], 0, True), learned.layers[0].soft_gate[0].reshape(4, 4))
    install_selector(model, "feature_norm")
    try:
        _, chosen = spa_viz.trace(model, images)
    finally:
        remove_selector(model)
    values = panels.gate_values(chosen.layers[0], 0, False)
    assert float(values.min()) == 0.0 and float(values.max()) == 1.0


def test_markdown_table() -> None:
    text = markdown_table(["a", "b"], [[1, "x"], [2.5, "y"]], ["right", None])
    assert text == "| a | b |\n|---:|---|\n| 1 | x |\n| 2.5 | y |"
    with pytest.raises(ValueError, match="2 columns"):
        markdown_table(["a", "b"], [[1]])
