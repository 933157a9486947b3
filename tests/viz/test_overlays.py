"""Overlays keep their shape and draw the documented colours."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import spa_viz
from spa_viz.viz import overlays, style
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
        overlays.score_overlay(image, values, threshold=0.5),
        overlays.keep_overlay(image, keep),
        overlays.selection_overlay(image, keep, ~keep),
        overlays.saliency_overlay(image, np.random.rand(32, 32)),
        overlays.attribution_overlay(image, values - 0.5),
        overlays.draw_detections(image, np.array([[4.0, 4.0, 40.0, 40.0]]), [3], [0.9]),
    ]
    for out in outputs:
        assert out.shape == image.shape and out.dtype == np.uint8


def test_keep_overlay_leaves_kept_tokens_and_tints_dropped_ones(image: np.ndarray, keep: torch.Tensor) -> None:
    out = overlays.keep_overlay(image, keep)
    dimmed = float(np.uint8(GREY * style.DROP_DIM))
    for row in range(4):
        for col in range(4):
            pixel = out[_centre(row, col)]
            if keep[row, col]:
                assert (pixel == GREY).all(), "kept tokens show the image unchanged"
            else:
                assert np.array_equal(pixel, _blend(dimmed, style.DROPPED_COLOR, style.DROP_TINT))
    # kept regions are outlined in the kept colour on their border
    assert (out[0, 0] == style.KEPT_COLOR).all()


def test_selection_overlay_colours_tp_fp_fn(image: np.ndarray) -> None:
    keep = torch.tensor([[True, True], [False, False]])
    labels = torch.tensor([[True, False], [True, False]])
    out = overlays.selection_overlay(image, keep, labels)
    cell = 32
    assert np.array_equal(out[_centre(0, 0, cell)], _blend(GREY, style.TP_COLOR, 0.55))
    assert np.array_equal(out[_centre(0, 1, cell)], _blend(GREY, style.FP_COLOR, 0.55))
    assert np.array_equal(out[_centre(1, 0, cell)], _blend(GREY, style.FN_COLOR, 0.55))
    assert (out[_centre(1, 1, cell)] == np.uint8(GREY * style.DROP_DIM)).all(), "true negatives are only dimmed"


def test_upsample_tokens_follows_the_label_convention() -> None:
    grid = torch.arange(6).reshape(2, 3)
    up = overlays.upsample_tokens(grid, (5, 7))
    rows = np.arange(5) * 2 // 5
    cols = np.arange(7) * 3 // 7
    assert np.array_equal(up, grid.numpy()[rows[:, None], cols[None, :]])


def test_score_overlay_outlines_tokens_above_threshold(image: np.ndarray) -> None:
    scores = torch.zeros(4, 4)
    scores[1:3, 1:3] = 1.0
    out = overlays.score_overlay(image, scores, threshold=0.5)
    assert (out[16, 16:48] == 255).all(), "the top border of the above-threshold block is white"
    low, high = out[_centre(0, 0)].astype(int), out[_centre(1, 1)].astype(int)
    assert not np.array_equal(low, high)


def test_layer_strip_has_a_panel_per_layer(image: np.ndarray, traced) -> None:
    strip = overlays.layer_strip(image, traced.layers, 0, panel_size=48, columns=2)
    two_rows = overlays.layer_strip(image, traced.layers[:2], 0, panel_size=48, columns=2)
    assert strip.shape[1] == two_rows.shape[1] and strip.shape[0] > two_rows.shape[0], "3 layers in 2 columns wrap"


def test_draw_detections_colours_boxes_by_label(image: np.ndarray) -> None:
    out = overlays.draw_detections(image, np.array([[10.0, 30.0, 50.0, 60.0]]), [2], [0.5], class_names=["a", "b", "c"])
    assert (out[45, 10] == style.image_color(2)).all(), "left edge of the box"


def test_bad_image_is_rejected() -> None:
    with pytest.raises(ValueError, match="uint8 RGB"):
        overlays.keep_overlay(np.zeros((8, 8), np.uint8), torch.ones(2, 2, dtype=torch.bool))


def test_to_jpeg_round_trips_the_picture(image: np.ndarray) -> None:
    from io import BytesIO

    from PIL import Image

    data = overlays.to_jpeg(image)
    assert data[:2] == b"\xff\xd8"  # JPEG start-of-image marker
    decoded = np.asarray(Image.open(BytesIO(data)))
    assert decoded.shape == image.shape and np.abs(decoded.astype(int) - image).mean() < 8


def test_overlapping_detection_tags_stay_readable() -> None:
    """Two near-identical boxes: the more confident tag keeps its place, untouched, and the other is drawn
    clear of it (below) instead of covering it."""
    from spa_viz.viz.style import image_color

    image = np.full((256, 256, 3), 200, np.uint8)
    boxes = np.array([[40.0, 60.0, 120.0, 140.0], [45.0, 62.0, 125.0, 150.0]])
    names = [str(i) for i in range(10)]
    alone = overlays.draw_detections(image, boxes[1:], [5], [0.9], names)
    both = overlays.draw_detections(image, boxes, [3, 5], [0.5, 0.9], names)
    tag = (alone[:60] == np.array(image_color(5), np.uint8)).all(-1)  # the confident tag's fill, above its box
    assert tag.sum() > 100
    assert np.array_equal(both[:60][tag], alone[:60][tag]), "the confident tag is not covered"
    moved = (both[60:90, 38:90] == np.array(image_color(3), np.uint8)).all(-1)
    assert moved.sum() > 100, "the other tag is drawn just below it"
