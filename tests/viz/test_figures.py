"""Figures show exactly the trace and the pack plan."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import spa_viz
from spa_viz.layers.packing import plan_packing
from spa_viz.viz import figures
from tests.conftest import mixed_gate_tiny_vit


@pytest.fixture
def traced():
    model = mixed_gate_tiny_vit()
    _, tr = spa_viz.trace(model, torch.randn(3, 3, 32, 32))
    return tr


def test_layout_figure_matches_the_pack_plan() -> None:
    keep = torch.tensor([[True] * 7, [True, False, True, False, False, True, False], [False] * 6 + [True]])
    plan = plan_packing(keep, "container", 4)
    scores = torch.linspace(0, 1, 18).reshape(3, 6)
    fig = figures.packed_layout_figure(plan, grid=(2, 3), num_prefix=1, scores=scores, image_names=["a", "b", "c"])
    heat = fig.data[0]
    assert np.array_equal(np.asarray(heat.z), plan.slot_image.numpy().astype(float))
    padding = next(t for t in fig.data if t.name and t.name.startswith("padding"))
    assert len(padding.x) == int((plan.slot_image < 0).sum()) == plan.num_slots - plan.num_kept
    title = fig.layout.title.text
    assert f"B′ = {plan.num_rows} rows" in title and "L = 4" in title and f"{plan.fill_ratio:.1%}" in title
    # slot (row 0, slot 1) holds image 0's token 1 = patch 0: row 0, column 0, score scores[0, 0]
    assert plan.slot_image[0, 1] == 0 and plan.slot_token[0, 1] == 1
    assert "a" in heat.text[0][1] and "token row 0, col 0" in heat.text[0][1] and "0.000" in heat.text[0][1]
    legend = [t.name for t in fig.data if t.name]
    assert "a (7 tokens)" in legend and "b (3 tokens)" in legend and "c (1 tokens)" in legend


def test_macs_figure_numbers_match_the_trace(traced) -> None:
    fig = figures.macs_figure(traced)
    dense, run = fig.data
    assert list(dense.x) == [f"L{t.layer}" for t in traced.layers]
    assert np.allclose(dense.y, [t.cost.macs_dense / 1e9 for t in traced.layers])
    assert np.allclose(run.y, [t.cost.macs_run / 1e9 for t in traced.layers])
    assert f"saving {traced.backbone_saving:.1%}" in fig.layout.title.text


def test_kept_histogram_counts_images(traced) -> None:
    layer = traced.layers[1]
    fig = figures.kept_histogram_figure(traced, layer.layer)
    assert sorted(fig.data[0].x) == sorted(layer.kept_counts.tolist())
    assert f"layer {layer.layer}" in fig.layout.title.text


def test_one_image_is_drawn_on_its_token_grid() -> None:
    """A single image: its token grid with each kept token's packed position, dropped tokens blank."""
    keep = torch.tensor([[True, True, False, True, False, False, True]])  # prefix + 6 patches (2 x 3)
    plan = plan_packing(keep, "container", 2)
    fig = figures.packed_layout_figure(plan, grid=(2, 3), num_prefix=1, image_names=["one"])
    z = np.asarray(fig.data[0].z, dtype=float)
    assert z.shape == (2, 3)
    # flat slots: 0 = prefix, 1 = patch 0, 2 = patch 2, 3 = patch 5
    assert z[0, 0] == 1 and z[0, 2] == 2 and z[1, 2] == 3 and np.isnan(z[0, 1]) and np.isnan(z[1, 0])
    assert "packed row 1, slot 0" in fig.data[0].text[0][2] and "dropped" in fig.data[0].text[0][1]
    assert "3 of 6 patch tokens" in fig.layout.title.text and "B′ = 2 rows" in fig.layout.title.text


def test_one_image_histogram_shows_every_layer() -> None:
    model = mixed_gate_tiny_vit()
    _, one = spa_viz.trace(model, torch.randn(1, 3, 32, 32))
    fig = figures.kept_histogram_figure(one, one.layers[1].layer)
    assert list(fig.data[0].x) == [f"L{t.layer}" for t in one.layers]
    assert list(fig.data[0].y) == [int(t.kept_counts[0]) for t in one.layers]
    assert len(set(fig.data[0].marker.color)) == 2, "the shown layer is highlighted"
