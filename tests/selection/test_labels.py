"""Selection labels against brute-force labellers, including one built from a backbone's real token geometry."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spa_viz.models.spt import SPT
from spa_viz.selection.labels import (
    batch_labels,
    labels_from_boxes,
    labels_from_masks,
    multiscale_labels,
    token_stride,
)

# (image size, grid, stride): exact tilings and grids that cover a padded image
CASES = [
    ((28, 28), (1, 1), (28, 28)),
    ((28, 28), (4, 4), (7, 7)),
    ((30, 45), (2, 3), (15, 15)),
    ((30, 45), (5, 9), (6, 5)),
    ((100, 100), (25, 25), (4, 4)),
    ((100, 100), (13, 13), (8, 8)),
    ((100, 100), (7, 7), (16, 16)),
    ((100, 100), (4, 4), (32, 32)),
    ((17, 23), (3, 2), (8, 16)),
]


def reference_box_mask(boxes: np.ndarray, height: int, width: int) -> np.ndarray:
    """Pixels covered by any box, by looping over pixels: [j, j+1) x [i, i+1) overlaps a box."""
    mask = np.zeros((height, width), dtype=bool)
    for x1, y1, x2, y2 in np.asarray(boxes, dtype=np.float64).reshape(-1, 4):
        for i in range(height):
            for j in range(width):
                overlap_w = min(j + 1, x2) - max(j, x1)
                overlap_h = min(i + 1, y2) - max(i, y1)
                if overlap_w > 0 and overlap_h > 0:
                    mask[i, j] = True
    return mask


def reference_labels(foreground: np.ndarray, grid: tuple[int, int], stride: tuple[int, int]) -> np.ndarray:
    """Token (r, c) is positive iff some foreground pixel lies in [r*sh, (r+1)*sh) x [c*sw, (c+1)*sw)."""
    labels = np.zeros(grid, dtype=bool)
    for r in range(grid[0]):
        for c in range(grid[1]):
            cell = foreground[r * stride[0] : (r + 1) * stride[0], c * stride[1] : (c + 1) * stride[1]]
            labels[r, c] = cell.any()
    return labels.reshape(-1)


@pytest.mark.parametrize(("size", "grid", "stride"), CASES)
def test_boxes_and_masks_match_reference(size, grid, stride) -> None:
    boxes = np.array(
        [
            [0.0, 0.0, 1.0, 1.0],
            [3.5, 2.25, 9.0, 7.75],
            [10.0, 12.0, 10.0, 15.0],
            [-5.0, 4.0, 3.2, 6.0],
            [size[1] - 2.5, size[0] - 0.5, size[1] + 8.0, size[0] + 3.0],
        ]
    )
    foreground = reference_box_mask(boxes, *size)
    expected = reference_labels(foreground, grid, stride)
    got = labels_from_boxes(torch.tensor(boxes, dtype=torch.float32), size, grid, stride)
    assert got.dtype == torch.bool and got.shape == (grid[0] * grid[1],)
    np.testing.assert_array_equal(got.numpy(), expected)
    np.testing.assert_array_equal(labels_from_masks(torch.from_numpy(foreground), grid, stride).numpy(), expected)


def test_padded_grid_example_from_the_issue() -> None:
    """SPT at 100 px: a box at columns [64, 80) lies in stride-16 token column 4 only (not {4, 5})."""
    labels = labels_from_boxes(torch.tensor([[64.0, 0.0, 80.0, 10.0]]), (100, 100), (7, 7), stride=16)
    assert labels.view(7, 7)[0].nonzero().flatten().tolist() == [4]


def test_grid_that_does_not_tile_needs_a_stride() -> None:
    with pytest.raises(ValueError, match="stride"):
        labels_from_boxes(torch.zeros(0, 4), (100, 100), (7, 7))
    assert token_stride((96, 96), (12, 12)) == (8, 8)
    assert token_stride((100, 100), (7, 7), 16) == (16, 16)


@st.composite
def geometry_case(draw: st.DrawFn) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    stride = (draw(st.integers(1, 9)), draw(st.integers(1, 9)))
    grid = (draw(st.integers(1, 6)), draw(st.integers(1, 6)))
    # the image reaches into the last token (padded grids) or exactly fills the grid
    height = draw(st.integers((grid[0] - 1) * stride[0] + 1, grid[0] * stride[0]))
    width = draw(st.integers((grid[1] - 1) * stride[1] + 1, grid[1] * stride[1]))
    return (height, width), grid, stride


@settings(max_examples=150, deadline=None)
@given(geometry_case(), st.data())
def test_any_size_any_grid_property(case, data: st.DataObject) -> None:
    size, grid, stride = case
    coord = st.floats(-4.0, 60.0, allow_nan=False, width=32).map(lambda v: round(v * 4) / 4)
    raw = data.draw(st.lists(st.tuples(coord, coord, coord, coord), min_size=0, max_size=4))
    boxes = np.array([[min(a, c), min(b, d), max(a, c), max(b, d)] for a, b, c, d in raw], dtype=np.float64).reshape(
        -1, 4
    )
    foreground = reference_box_mask(boxes, *size)
    expected = reference_labels(foreground, grid, stride)
    np.testing.assert_array_equal(labels_from_boxes(torch.tensor(boxes), size, grid, stride).numpy(), expected)
    np.testing.assert_array_equal(labels_from_masks(torch.from_numpy(foreground), grid, stride).numpy(), expected)
    seed = data.draw(st.integers(0, 2**31))
    masks = np.random.default_rng(seed).random((3, *size)) > 0.95
    ids = np.zeros(size, dtype=np.int64)
    for index, mask in enumerate(masks, start=1):
        ids[mask] = index
    expected = reference_labels(masks.any(0), grid, stride)
    np.testing.assert_array_equal(labels_from_masks(torch.from_numpy(masks), grid, stride).numpy(), expected)
    np.testing.assert_array_equal(labels_from_masks(torch.from_numpy(ids), grid, stride).numpy(), expected)


def _spt_receptive_fields(model: SPT, size: tuple[int, int]) -> list[tuple[tuple[int, int], np.ndarray]]:
    """Per stage, the input pixels each token is computed from by patch embedding and patch merging
    (attention excluded), found by autograd: the real token-to-pixel geometry of the backbone."""
    image = torch.randn(1, 3, *size, dtype=torch.float64, requires_grad=True)
    x = model.patch_embed.double()(image)
    maps = [x]
    for stage in model.layers[1:]:
        x = stage.downsample.double()(x)
        maps.append(x)
    fields = []
    for feature in maps:
        gh, gw = feature.shape[1:3]
        support = np.zeros((gh, gw, *size), dtype=bool)
        probe = torch.randn(feature.shape[-1], dtype=torch.float64)  # a plain sum would cancel after LayerNorm
        for r in range(gh):
            for c in range(gw):
                (grad,) = torch.autograd.grad(feature[0, r, c] @ probe, image, retain_graph=True)
                support[r, c] = grad[0].abs().sum(0).numpy() > 0
        fields.append(((gh, gw), support))
    return fields


@pytest.mark.parametrize("size", [(100, 100), (96, 116), (64, 44)])
def test_labels_follow_the_backbones_real_token_geometry(size) -> None:
    """Brute force: token positive iff an object pixel is in its receptive field through SPT's patch
    embedding and padded patch merging; the labeller gets only grid and stride from the model."""
    torch.manual_seed(0)
    model = SPT(img_size=128, embed_dim=8, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1), window_size=4, num_classes=0)
    fields = _spt_receptive_fields(model, size)
    strides = [model.config.patch_size * 2**i for i in range(len(fields))]
    rng = np.random.default_rng(1)
    for _ in range(3):
        foreground = rng.random(size) > 0.995
        boxes = torch.tensor([[5.0, 7.0, 33.0, 18.0], [size[1] - 9.0, size[0] - 3.0, size[1], size[0]]])
        box_pixels = reference_box_mask(boxes.numpy(), *size)
        for ((gh, gw), support), stride in zip(fields, strides, strict=True):
            expected = (support & foreground).any((2, 3)).reshape(-1)
            got = labels_from_masks(torch.from_numpy(foreground), (gh, gw), stride)
            np.testing.assert_array_equal(got.numpy(), expected)
            expected_boxes = (support & box_pixels).any((2, 3)).reshape(-1)
            np.testing.assert_array_equal(labels_from_boxes(boxes, size, (gh, gw), stride).numpy(), expected_boxes)


def test_empty_targets() -> None:
    assert not labels_from_boxes(torch.zeros(0, 4), (16, 16), (4, 4)).any()
    assert not labels_from_boxes(torch.zeros(0), (16, 16), (4, 4)).any()
    assert not labels_from_masks(torch.zeros(0, 16, 16, dtype=torch.bool), (4, 4)).any()
    assert not labels_from_masks(torch.zeros(16, 16, dtype=torch.int32), (4, 4)).any()
    assert batch_labels([], (16, 16), (4, 4)).shape == (0, 16)


def test_batch_uses_masks_when_present() -> None:
    box = torch.tensor([[0.0, 0.0, 16.0, 16.0]])
    mask = torch.zeros(1, 16, 16, dtype=torch.bool)
    mask[0, 0, 0] = True
    targets = [{"boxes": box}, {"boxes": box, "masks": mask}, {"boxes": torch.zeros(0, 4)}]
    labels = batch_labels(targets, (16, 16), (4, 4))
    assert labels.shape == (3, 16) and labels.dtype == torch.bool
    assert labels[0].all() and labels[1].sum() == 1 and labels[1, 0] and not labels[2].any()
    scales = multiscale_labels(targets, (16, 16), [(8, 8), (4, 4), (2, 2)])
    assert [s.shape for s in scales] == [(3, 64), (3, 16), (3, 4)]
    assert torch.equal(scales[1], labels)
    padded = multiscale_labels(targets, (16, 16), [(3, 3)], strides=[6])
    assert padded[0].shape == (3, 9) and padded[0][1].tolist() == [True] + [False] * 8


@pytest.mark.parametrize(
    "call",
    [
        lambda: labels_from_boxes(torch.zeros(3, 5), (8, 8), (2, 2)),
        lambda: labels_from_boxes(torch.zeros(4), (8, 8), (2, 2)),
        lambda: labels_from_boxes(torch.tensor([[4.0, 0.0, 2.0, 3.0]]), (8, 8), (2, 2)),
        lambda: labels_from_boxes(torch.tensor([[0.0, 0.0, float("nan"), 3.0]]), (8, 8), (2, 2)),
        lambda: labels_from_boxes(torch.zeros(0, 4), (8, 8), (-1, 2)),
        lambda: labels_from_boxes(torch.zeros(0, 4), (8, 8), (0, 2)),
        lambda: labels_from_boxes(torch.zeros(0, 4), (8, 8), (3, 2)),
        lambda: labels_from_boxes(torch.zeros(0, 4), (0, 8), (1, 1)),
        lambda: labels_from_boxes(torch.zeros(0, 4), (8, 8), (2.5, 2)),
        lambda: labels_from_boxes(torch.zeros(0, 4), (8, 8), (2, 2), stride=0),
        lambda: labels_from_boxes(torch.zeros(0, 4), (8, 8), (2, 2), stride=(4, 4, 4)),
        lambda: labels_from_masks(torch.zeros(8, 8), (2, 2)),
        lambda: labels_from_masks(torch.zeros(1, 1, 8, 8, dtype=torch.bool), (2, 2)),
        lambda: labels_from_masks(torch.zeros(8, dtype=torch.bool), (2, 2)),
        lambda: labels_from_masks(torch.zeros(8, 8, dtype=torch.bool), (2, -2)),
        lambda: batch_labels([{"masks": torch.zeros(1, 8, 8)}], (8, 8), (2, 2)),
        lambda: batch_labels(
            [{"boxes": torch.zeros(0, 4), "masks": torch.zeros(0, 4, 8, dtype=torch.bool)}],
            (8, 8),
            (2, 2),
        ),
        lambda: multiscale_labels([], (8, 8), []),
        lambda: multiscale_labels([], (8, 8), [(2, 2)], strides=[4, 4]),
    ],
)
def test_bad_input_raises(call: Callable[[], object]) -> None:
    with pytest.raises(ValueError):
        call()
