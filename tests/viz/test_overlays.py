"""Overlays keep their shape and draw the documented colours; figures show exactly the trace and plan."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import spa_viz
from spa_viz.analysis import render
from spa_viz.layers.packing import plan_packing
from tests.conftest import mixed_gate_tiny_vit

GREY = 200


@pytest.fixture
def image() -> np.ndarray:
    return np.full((64, 64, 3), GREY, dtype=np.uint8)


@pytest.fixture
def keep() -> torch.Tensor:
    """A 4x4 checkerboard: 16 px cells on a 64 px image."""
    return (torch.arange(4)[:, None] + torch.arange(4)[None, :]) % 2 == 0


@pytest.fixture
def traced():
    model = mixed_gate_tiny_vit()
    _, tr = spa_viz.trace(model, torch.randn(3, 3, 32, 32))
    return tr


def _centre(row: int, col: int, cell: int = 16) -> tuple[int, int]:
    return row * cell + cell // 2, col * cell + cell // 2


def _blend(base: float, color: tuple[int, int, int], alpha: float) -> np.ndarray:
    return np.clip(
        np.float32(base) * (1 - np.float32(alpha)) + np.array(color, np.float32) * np.float32(alpha), 0, 255
    ).round()


def test_overlays_keep_the_image_shape(image: np.ndarray, keep: torch.Tensor) -> None:
    values = torch.rand(4, 4)
    outputs = [
        render.score_overlay(image, values, threshold=0.5),
        render.keep_overlay(image, keep),
        render.selection_overlay(image, keep, ~keep),
        render.saliency_overlay(image, np.random.rand(32, 32)),
        render.attribution_overlay(image, values - 0.5),
        render.draw_detections(image, np.array([[4.0, 4.0, 40.0, 40.0]]), [3], [0.9]),
    ]
    for out in outputs:
        assert out.shape == image.shape and out.dtype == np.uint8


def test_keep_overlay_leaves_kept_tokens_and_tints_dropped_ones(image: np.ndarray, keep: torch.Tensor) -> None:
    out = render.keep_overlay(image, keep)
    dimmed = float(np.uint8(GREY * render.DROP_DIM))
    for row in range(4):
        for col in range(4):
            pixel = out[_centre(row, col)]
            if keep[row, col]:
                assert (pixel == GREY).all(), "kept tokens show the image unchanged"
            else:
                assert np.array_equal(pixel, _blend(dimmed, render.DROPPED_COLOR, render.DROP_TINT))
    # kept regions are outlined in the kept colour on their border
    assert (out[0, 0] == render.KEPT_COLOR).all()


def test_selection_overlay_colours_tp_fp_fn(image: np.ndarray) -> None:
    keep = torch.tensor([[True, True], [False, False]])
    labels = torch.tensor([[True, False], [True, False]])
    out = render.selection_overlay(image, keep, labels)
    cell = 32
    assert np.array_equal(out[_centre(0, 0, cell)], _blend(GREY, render.TP_COLOR, 0.55))
    assert np.array_equal(out[_centre(0, 1, cell)], _blend(GREY, render.FP_COLOR, 0.55))
    assert np.array_equal(out[_centre(1, 0, cell)], _blend(GREY, render.FN_COLOR, 0.55))
    assert (out[_centre(1, 1, cell)] == np.uint8(GREY * render.DROP_DIM)).all(), "true negatives are only dimmed"


def test_selection_metrics() -> None:
    keep = torch.tensor([True, True, True, False, False])
    labels = torch.tensor([True, True, False, True, False])
    m = render.selection_metrics(keep, labels)
    assert (m.tp, m.fp, m.fn, m.tn) == (2, 1, 1, 1)
    assert m.precision == pytest.approx(2 / 3) and m.recall == pytest.approx(2 / 3) and m.iou == pytest.approx(0.5)
    with pytest.raises(ValueError, match="tokens"):
        render.selection_metrics(keep, labels[:3])


def test_upsample_tokens_follows_the_label_convention() -> None:
    grid = torch.arange(6).reshape(2, 3)
    up = render.upsample_tokens(grid, (5, 7))
    rows = np.arange(5) * 2 // 5
    cols = np.arange(7) * 3 // 7
    assert np.array_equal(up, grid.numpy()[rows[:, None], cols[None, :]])


def test_score_overlay_outlines_tokens_above_threshold(image: np.ndarray) -> None:
    scores = torch.zeros(4, 4)
    scores[1:3, 1:3] = 1.0
    out = render.score_overlay(image, scores, threshold=0.5)
    assert (out[16, 16:48] == 255).all(), "the top border of the above-threshold block is white"
    low, high = out[_centre(0, 0)].astype(int), out[_centre(1, 1)].astype(int)
    assert not np.array_equal(low, high)


def test_layer_strip_has_a_panel_per_layer(image: np.ndarray, traced) -> None:
    strip = render.layer_strip(image, traced.layers, 0, panel_size=48, columns=2)
    two_rows = render.layer_strip(image, traced.layers[:2], 0, panel_size=48, columns=2)
    assert strip.shape[1] == two_rows.shape[1] and strip.shape[0] > two_rows.shape[0], "3 layers in 2 columns wrap"


def test_layout_figure_matches_the_pack_plan() -> None:
    keep = torch.tensor([[True] * 7, [True, False, True, False, False, True, False], [False] * 6 + [True]])
    plan = plan_packing(keep, "container", 4)
    scores = torch.linspace(0, 1, 18).reshape(3, 6)
    fig = render.packed_layout_figure(plan, grid=(2, 3), num_prefix=1, scores=scores, image_names=["a", "b", "c"])
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


def test_flops_figure_numbers_match_the_trace(traced) -> None:
    fig = render.flops_figure(traced)
    dense, run = fig.data
    assert list(dense.x) == [f"L{t.layer}" for t in traced.layers]
    assert np.allclose(dense.y, [t.flops.dense / 1e9 for t in traced.layers])
    assert np.allclose(run.y, [t.flops.run / 1e9 for t in traced.layers])
    assert f"saving {traced.backbone_saving:.1%}" in fig.layout.title.text


def test_kept_histogram_counts_images(traced) -> None:
    layer = traced.layers[1]
    fig = render.kept_histogram_figure(traced, layer.layer)
    assert sorted(fig.data[0].x) == sorted(layer.kept_counts.tolist())
    assert f"layer {layer.layer}" in fig.layout.title.text


def test_draw_detections_colours_boxes_by_label(image: np.ndarray) -> None:
    out = render.draw_detections(image, np.array([[10.0, 30.0, 50.0, 60.0]]), [2], [0.5], class_names=["a", "b", "c"])
    assert (out[45, 10] == render.image_color(2)).all(), "left edge of the box"


def test_bad_image_is_rejected() -> None:
    with pytest.raises(ValueError, match="uint8 RGB"):
        render.keep_overlay(np.zeros((8, 8), np.uint8), torch.ones(2, 2, dtype=torch.bool))
