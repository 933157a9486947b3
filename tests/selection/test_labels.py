"""Selection labels against a brute-force per-pixel reference."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spa_viz.selection.labels import (
    batch_labels,
    labels_from_boxes,
    labels_from_masks,
    multiscale_labels,
)

GRIDS = [(1, 1), (2, 3), (4, 4), (5, 7), (7, 5), (8, 8), (13, 11)]


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


def reference_labels(foreground: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Cell (r, c) is positive iff some foreground pixel (i, j) maps to it by floor(i*gh/H), ..."""
    height, width = foreground.shape
    gh, gw = grid
    labels = np.zeros((gh, gw), dtype=bool)
    for i in range(height):
        for j in range(width):
            if foreground[i, j]:
                labels[i * gh // height, j * gw // width] = True
    return labels.reshape(-1)


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("size", [(28, 28), (30, 45), (17, 23)])
def test_boxes_match_reference(grid: tuple[int, int], size: tuple[int, int]) -> None:
    boxes = np.array(
        [
            [0.0, 0.0, 1.0, 1.0],
            [3.5, 2.25, 9.0, 7.75],
            [10.0, 12.0, 10.0, 15.0],
            [-5.0, 4.0, 3.2, 6.0],
            [size[1] - 2.5, size[0] - 0.5, size[1] + 8.0, size[0] + 3.0],
        ]
    )
    expected = reference_labels(reference_box_mask(boxes, *size), grid)
    got = labels_from_boxes(torch.tensor(boxes, dtype=torch.float32), size, grid)
    assert got.dtype == torch.bool and got.shape == (grid[0] * grid[1],)
    np.testing.assert_array_equal(got.numpy(), expected)


@st.composite
def boxes_case(draw: st.DrawFn) -> tuple[np.ndarray, tuple[int, int], tuple[int, int]]:
    height = draw(st.integers(1, 24))
    width = draw(st.integers(1, 24))
    grid = (draw(st.integers(1, height)), draw(st.integers(1, width)))
    coord = st.floats(-4.0, 28.0, allow_nan=False, width=32).map(lambda v: round(v * 4) / 4)
    raw = draw(st.lists(st.tuples(coord, coord, coord, coord), min_size=0, max_size=4))
    boxes = np.array(
        [[min(a, c), min(b, d), max(a, c), max(b, d)] for a, b, c, d in raw], dtype=np.float64
    ).reshape(-1, 4)
    return boxes, (height, width), grid


@settings(max_examples=150, deadline=None)
@given(boxes_case())
def test_boxes_property(case: tuple[np.ndarray, tuple[int, int], tuple[int, int]]) -> None:
    boxes, size, grid = case
    foreground = reference_box_mask(boxes, *size)
    expected = reference_labels(foreground, grid)
    np.testing.assert_array_equal(
        labels_from_boxes(torch.tensor(boxes), size, grid).numpy(), expected
    )
    # The filled box as a mask labels the same tokens as the box.
    np.testing.assert_array_equal(
        labels_from_masks(torch.from_numpy(foreground), grid).numpy(), expected
    )


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_masks_property(data: st.DataObject) -> None:
    height, width = data.draw(st.integers(1, 20)), data.draw(st.integers(1, 20))
    grid = (data.draw(st.integers(1, height)), data.draw(st.integers(1, width)))
    k = data.draw(st.integers(0, 3))
    seed = data.draw(st.integers(0, 2**31))
    masks = np.random.default_rng(seed).random((k, height, width)) > 0.9
    expected = reference_labels(masks.any(0), grid)
    np.testing.assert_array_equal(
        labels_from_masks(torch.from_numpy(masks), grid).numpy(), expected
    )
    ids = np.zeros((height, width), dtype=np.int64)
    for index, mask in enumerate(masks, start=1):
        ids[mask] = index
    np.testing.assert_array_equal(labels_from_masks(torch.from_numpy(ids), grid).numpy(), expected)


@pytest.mark.parametrize("grid", GRIDS)
def test_filled_box_mask_agrees_with_box(grid: tuple[int, int]) -> None:
    masks = torch.zeros(2, 30, 45, dtype=torch.bool)
    masks[0, 3:9, 4:20] = True
    masks[1, 20:30, 40:45] = True
    boxes = torch.tensor([[4.0, 3.0, 20.0, 9.0], [40.0, 20.0, 45.0, 30.0]])
    assert torch.equal(labels_from_masks(masks, grid), labels_from_boxes(boxes, (30, 45), grid))
    assert torch.equal(
        labels_from_masks(masks.to(torch.uint8), grid), labels_from_masks(masks, grid)
    )


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


@pytest.mark.parametrize(
    "call",
    [
        lambda: labels_from_boxes(torch.zeros(3, 5), (8, 8), (2, 2)),
        lambda: labels_from_boxes(torch.zeros(4), (8, 8), (2, 2)),
        lambda: labels_from_boxes(torch.tensor([[4.0, 0.0, 2.0, 3.0]]), (8, 8), (2, 2)),
        lambda: labels_from_boxes(torch.tensor([[0.0, 0.0, float("nan"), 3.0]]), (8, 8), (2, 2)),
        lambda: labels_from_boxes(torch.zeros(0, 4), (8, 8), (-1, 2)),
        lambda: labels_from_boxes(torch.zeros(0, 4), (8, 8), (0, 2)),
        lambda: labels_from_boxes(torch.zeros(0, 4), (8, 8), (16, 2)),
        lambda: labels_from_boxes(torch.zeros(0, 4), (0, 8), (1, 1)),
        lambda: labels_from_boxes(torch.zeros(0, 4), (8, 8), (2.5, 2)),
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
    ],
)
def test_bad_input_raises(call: Callable[[], object]) -> None:
    with pytest.raises(ValueError):
        call()
