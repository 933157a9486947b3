"""Selection labels: per-token targets telling the SPA gate which tokens to keep.

SPA supervises its gate with labels made from the task's own annotations (Zhang et al., arXiv
2410.23608): a token is positive iff at least one object pixel falls in its grid cell.

Conventions. Pixel (i, j) occupies [j, j+1) x [i, i+1). A box (x1, y1, x2, y2) covers a pixel iff
their overlap has positive area. A token grid (gh, gw) splits an H x W image into cells; pixel row i
belongs to cell row floor(i * gh / H) and column j to cell column floor(j * gw / W), which also
covers sizes the grid does not divide. Labels are flattened in raster (row-major) order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["batch_labels", "labels_from_boxes", "labels_from_masks", "multiscale_labels"]


def _check_size(image_size: Sequence[int]) -> tuple[int, int]:
    """Validate an (H, W) image size."""
    if len(image_size) != 2 or any(int(s) != s or s <= 0 for s in image_size):
        raise ValueError(f"image_size must be two positive ints (H, W), got {tuple(image_size)}")
    return int(image_size[0]), int(image_size[1])


def _check_grid(grid: Sequence[int], image_size: tuple[int, int]) -> tuple[int, int]:
    """Validate a token grid (gh, gw) against the image it tiles."""
    if len(grid) != 2 or any(int(g) != g or g <= 0 for g in grid):
        raise ValueError(f"grid must be two positive ints (gh, gw), got {tuple(grid)}")
    gh, gw = int(grid[0]), int(grid[1])
    if gh > image_size[0] or gw > image_size[1]:
        raise ValueError(
            f"grid {(gh, gw)} is finer than the image {image_size}: every cell must hold at least "
            "one pixel; use a coarser grid or a larger image"
        )
    return gh, gw


def _cell_of(length: int, cells: int, device: torch.device) -> Tensor:
    """Cell index floor(i * cells / length) of every pixel index i (exact integer arithmetic)."""
    return torch.arange(length, device=device) * cells // length


def labels_from_boxes(boxes: Tensor, image_size: tuple[int, int], grid: tuple[int, int]) -> Tensor:
    """Label the tokens touched by any box.

    Args:
        boxes: float [K, 4] boxes (x1, y1, x2, y2) in pixels; parts outside the image are ignored,
            zero-area boxes cover nothing.
        image_size: (H, W) of the image the boxes live in.
        grid: (gh, gw) token grid.

    Returns:
        bool [gh * gw] labels in raster order, on the device of ``boxes``.
    """
    height, width = _check_size(image_size)
    gh, gw = _check_grid(grid, (height, width))
    boxes = torch.as_tensor(boxes)
    if boxes.numel() == 0:
        boxes = boxes.reshape(0, 4)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must have shape [K, 4] (xyxy), got {tuple(boxes.shape)}")
    boxes = boxes.to(torch.float64)
    if not torch.isfinite(boxes).all():
        raise ValueError("boxes contain NaN or inf; drop or fix those boxes first")
    x1, y1, x2, y2 = boxes.unbind(1)
    if (x2 < x1).any() or (y2 < y1).any():
        raise ValueError(
            "boxes must be xyxy with x2 >= x1 and y2 >= y1; convert COCO xywh boxes with "
            "x2 = x + w, y2 = y + h"
        )
    # Pixels j whose [j, j+1) meets [x1, x2) in a positive length: floor(x1) <= j <= ceil(x2) - 1.
    col_lo, col_hi = torch.floor(x1).long(), torch.ceil(x2).long() - 1
    row_lo, row_hi = torch.floor(y1).long(), torch.ceil(y2).long() - 1
    valid = (x2 > x1) & (y2 > y1) & (col_hi >= 0) & (row_hi >= 0)
    valid &= (col_lo < width) & (row_lo < height)
    col_lo, col_hi = col_lo.clamp(0, width - 1), col_hi.clamp(0, width - 1)
    row_lo, row_hi = row_lo.clamp(0, height - 1), row_hi.clamp(0, height - 1)
    # The pixel -> cell map is monotone and, with cells no smaller than a pixel, skips no cell:
    # a contiguous pixel range maps onto the contiguous cell range between its end cells.
    rows = torch.arange(gh, device=boxes.device)
    cols = torch.arange(gw, device=boxes.device)
    in_rows = (rows >= (row_lo * gh // height)[:, None]) & (
        rows <= (row_hi * gh // height)[:, None]
    )
    in_cols = (cols >= (col_lo * gw // width)[:, None]) & (cols <= (col_hi * gw // width)[:, None])
    hit = in_rows[:, :, None] & in_cols[:, None, :] & valid[:, None, None]
    return hit.any(0).reshape(gh * gw)


def labels_from_masks(masks: Tensor, grid: tuple[int, int]) -> Tensor:
    """Label the tokens whose cell holds any object pixel.

    Args:
        masks: [K, H, W] binary masks (bool or integer 0/1), or a single [H, W] map that is either
            a bool mask or integer instance ids with 0 as background.
        grid: (gh, gw) token grid.

    Returns:
        bool [gh * gw] labels in raster order, on the device of ``masks``.
    """
    masks = torch.as_tensor(masks)
    if masks.is_floating_point() or masks.is_complex():
        raise ValueError("masks must be bool or integer; threshold soft masks first (masks > 0.5)")
    if masks.ndim == 3:
        foreground = (masks != 0).any(0)
    elif masks.ndim == 2:
        foreground = masks != 0
    else:
        raise ValueError(f"masks must have shape [K, H, W] or [H, W], got {tuple(masks.shape)}")
    height, width = _check_size(tuple(foreground.shape))
    gh, gw = _check_grid(grid, (height, width))
    device = foreground.device
    per_row_cell = torch.zeros(gh, width, dtype=torch.long, device=device).index_add_(
        0, _cell_of(height, gh, device), foreground.long()
    )
    per_cell = torch.zeros(gh, gw, dtype=torch.long, device=device).index_add_(
        1, _cell_of(width, gw, device), per_row_cell
    )
    return (per_cell > 0).reshape(gh * gw)


def _target_labels(
    target: Mapping[str, Any], image_size: tuple[int, int], grid: tuple[int, int]
) -> Tensor:
    """Labels of one target: from its masks when present, else from its boxes."""
    if not isinstance(target, Mapping) or "boxes" not in target:
        raise ValueError("each target must be a dict with 'boxes' (xyxy) and optionally 'masks'")
    masks = target.get("masks")
    if masks is None:
        return labels_from_boxes(target["boxes"], image_size, grid)
    masks = torch.as_tensor(masks)
    if tuple(masks.shape[-2:]) != tuple(image_size):
        raise ValueError(
            f"masks of spatial size {tuple(masks.shape[-2:])} do not match image_size "
            f"{tuple(image_size)}; resize masks together with the image"
        )
    return labels_from_masks(masks, grid)


def batch_labels(
    targets: Sequence[Mapping[str, Any]], image_size: tuple[int, int], grid: tuple[int, int]
) -> Tensor:
    """Selection labels of a batch of detection targets, bool [B, gh * gw].

    Each target holds 'boxes' (float [K, 4] xyxy pixels) and optionally 'masks' ([K, H, W]); masks,
    when present, give the tighter labels and are used instead of boxes.
    """
    image_size = _check_size(image_size)
    gh, gw = _check_grid(grid, image_size)
    if len(targets) == 0:
        return torch.zeros(0, gh * gw, dtype=torch.bool)
    return torch.stack([_target_labels(t, image_size, (gh, gw)) for t in targets])


def multiscale_labels(
    targets: Sequence[Mapping[str, Any]],
    image_size: tuple[int, int],
    grids: Sequence[tuple[int, int]],
) -> list[Tensor]:
    """Selection labels for each SPA stage of a hierarchical backbone: one [B, gh * gw] per grid."""
    if len(grids) == 0:
        raise ValueError("grids is empty; pass one (gh, gw) per SPA stage")
    return [batch_labels(targets, image_size, grid) for grid in grids]
