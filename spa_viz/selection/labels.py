"""Selection labels: per-token targets telling the SPA gate which tokens to keep.

SPA supervises its gate with labels made from the task's own annotations (Zhang et al., arXiv
2410.23608): a token is positive iff at least one object pixel falls in its grid cell.

Conventions. Pixel (i, j) occupies [j, j+1) x [i, i+1). A box (x1, y1, x2, y2) covers a pixel iff
their overlap has positive area. A token grid (gh, gw) with stride (sh, sw) is the backbone's real
token geometry: token (r, c) covers pixels [r * sh, (r + 1) * sh) x [c * sw, (c + 1) * sw), so pixel
row i belongs to token row floor(i / sh). That is right for a ViT (the patch size) and for a Swin/SPT
stage whose grid covers a padded image (patch merging pads at the bottom and right: at 100 px with
stride 16, seven tokens cover 112 px and the last one holds pixels 96-99 only). When ``stride`` is
not given the grid must tile the image exactly (stride = H / gh). Labels are flattened in raster
(row-major) order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

__all__ = ["TokenGrid", "batch_labels", "labels_from_boxes", "labels_from_masks", "multiscale_labels", "token_stride"]

Stride = tuple[int, int]


class TokenGrid(NamedTuple):
    """One SPA stage's token grid ``shape`` (gh, gw) and its pixel ``stride`` (sh, sw): the backbone's
    real token geometry, which backbones report for an image size (e.g. ``Detector.selection_grids``)."""

    shape: tuple[int, int]
    stride: Stride


def _check_size(image_size: Sequence[int]) -> tuple[int, int]:
    """Validate an (H, W) image size."""
    if len(image_size) != 2 or any(int(s) != s or s <= 0 for s in image_size):
        raise ValueError(f"image_size must be two positive ints (H, W), got {tuple(image_size)}")
    return int(image_size[0]), int(image_size[1])


def _check_grid(grid: Sequence[int]) -> tuple[int, int]:
    """Validate a token grid (gh, gw)."""
    if len(grid) != 2 or any(int(g) != g or g <= 0 for g in grid):
        raise ValueError(f"grid must be two positive ints (gh, gw), got {tuple(grid)}")
    return int(grid[0]), int(grid[1])


def token_stride(image_size: Sequence[int], grid: Sequence[int], stride: int | Sequence[int] | None = None) -> Stride:
    """The (sh, sw) pixel stride of a token grid: ``stride`` validated, or H / gh when the grid tiles the image."""
    height, width = _check_size(image_size)
    gh, gw = _check_grid(grid)
    if stride is None:
        if height % gh or width % gw:
            raise ValueError(
                f"grid {(gh, gw)} does not tile the image {(height, width)} exactly; pass the backbone's token "
                "stride (e.g. stride=16 for an SPT stage-3 grid over a padded image)"
            )
        return height // gh, width // gw
    pair = (stride, stride) if isinstance(stride, int) else tuple(stride)
    if len(pair) != 2 or any(int(v) != v or v <= 0 for v in pair):
        raise ValueError(f"stride must be a positive int or two positive ints (sh, sw), got {stride!r}")
    return int(pair[0]), int(pair[1])


def labels_from_boxes(
    boxes: Tensor, image_size: tuple[int, int], grid: tuple[int, int], stride: int | Stride | None = None
) -> Tensor:
    """Label the tokens touched by any box.

    Args:
        boxes: float [K, 4] boxes (x1, y1, x2, y2) in pixels; parts outside the image are ignored,
            zero-area boxes cover nothing.
        image_size: (H, W) of the image the boxes live in.
        grid: (gh, gw) token grid.
        stride: the grid's pixel stride (see :func:`token_stride`); None when it tiles the image.

    Returns:
        bool [gh * gw] labels in raster order, on the device of ``boxes``.
    """
    height, width = _check_size(image_size)
    gh, gw = _check_grid(grid)
    sh, sw = token_stride((height, width), (gh, gw), stride)
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
            "boxes must be xyxy with x2 >= x1 and y2 >= y1; convert COCO xywh boxes with x2 = x + w, y2 = y + h"
        )
    # Pixels j whose [j, j+1) meets [x1, x2) in a positive length: floor(x1) <= j <= ceil(x2) - 1.
    col_lo, col_hi = torch.floor(x1).long(), torch.ceil(x2).long() - 1
    row_lo, row_hi = torch.floor(y1).long(), torch.ceil(y2).long() - 1
    valid = (x2 > x1) & (y2 > y1) & (col_hi >= 0) & (row_hi >= 0)
    valid &= (col_lo < width) & (row_lo < height)
    col_lo, col_hi = col_lo.clamp(0, width - 1), col_hi.clamp(0, width - 1)
    row_lo, row_hi = row_lo.clamp(0, height - 1), row_hi.clamp(0, height - 1)
    # A contiguous pixel range [lo, hi] covers the tokens lo // stride .. hi // stride.
    rows = torch.arange(gh, device=boxes.device)
    cols = torch.arange(gw, device=boxes.device)
    in_rows = (rows >= (row_lo // sh)[:, None]) & (rows <= (row_hi // sh)[:, None])
    in_cols = (cols >= (col_lo // sw)[:, None]) & (cols <= (col_hi // sw)[:, None])
    hit = in_rows[:, :, None] & in_cols[:, None, :] & valid[:, None, None]
    return hit.any(0).reshape(gh * gw)


def labels_from_masks(masks: Tensor, grid: tuple[int, int], stride: int | Stride | None = None) -> Tensor:
    """Label the tokens whose cell holds any object pixel.

    Args:
        masks: [K, H, W] binary masks (bool or integer 0/1), or a single [H, W] map that is either
            a bool mask or integer instance ids with 0 as background.
        grid: (gh, gw) token grid.
        stride: the grid's pixel stride (see :func:`token_stride`); None when it tiles the image.

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
    gh, gw = _check_grid(grid)
    sh, sw = token_stride((height, width), (gh, gw), stride)
    device = foreground.device
    rows = min(height, gh * sh)  # pixels beyond the grid's reach belong to no token
    cols = min(width, gw * sw)
    row_cell = torch.arange(rows, device=device) // sh
    col_cell = torch.arange(cols, device=device) // sw
    per_row_cell = torch.zeros(gh, cols, dtype=torch.long, device=device).index_add_(
        0, row_cell, foreground[:rows, :cols].long()
    )
    per_cell = torch.zeros(gh, gw, dtype=torch.long, device=device).index_add_(1, col_cell, per_row_cell)
    return (per_cell > 0).reshape(gh * gw)


def _target_labels(
    target: Mapping[str, Any], image_size: tuple[int, int], grid: tuple[int, int], stride: Stride
) -> Tensor:
    """Labels of one target: from its masks when present, else from its boxes."""
    if not isinstance(target, Mapping) or "boxes" not in target:
        raise ValueError("each target must be a dict with 'boxes' (xyxy) and optionally 'masks'")
    masks = target.get("masks")
    if masks is None:
        return labels_from_boxes(target["boxes"], image_size, grid, stride)
    masks = torch.as_tensor(masks)
    if tuple(masks.shape[-2:]) != tuple(image_size):
        raise ValueError(
            f"masks of spatial size {tuple(masks.shape[-2:])} do not match image_size "
            f"{tuple(image_size)}; resize masks together with the image"
        )
    return labels_from_masks(masks, grid, stride)


def batch_labels(
    targets: Sequence[Mapping[str, Any]],
    image_size: tuple[int, int],
    grid: tuple[int, int],
    stride: int | Stride | None = None,
) -> Tensor:
    """Selection labels of a batch of detection targets, bool [B, gh * gw].

    Each target holds 'boxes' (float [K, 4] xyxy pixels) and optionally 'masks' ([K, H, W]); masks,
    when present, give the tighter labels and are used instead of boxes.
    """
    image_size = _check_size(image_size)
    gh, gw = _check_grid(grid)
    pixel_stride = token_stride(image_size, (gh, gw), stride)
    if len(targets) == 0:
        return torch.zeros(0, gh * gw, dtype=torch.bool)
    return torch.stack([_target_labels(t, image_size, (gh, gw), pixel_stride) for t in targets])


def multiscale_labels(
    targets: Sequence[Mapping[str, Any]],
    image_size: tuple[int, int],
    grids: Sequence[TokenGrid | tuple[int, int]],
    strides: Sequence[int | Stride | None] | None = None,
) -> list[Tensor]:
    """Selection labels for each SPA stage of a hierarchical backbone: one [B, gh * gw] per grid.

    ``grids`` are :class:`TokenGrid` s (shape and stride) or plain (gh, gw) shapes whose stride comes
    from ``strides`` (None entries, or None for all: the grid tiles the image).
    """
    if len(grids) == 0:
        raise ValueError("grids is empty; pass one (gh, gw) per SPA stage")
    strides = [None] * len(grids) if strides is None else list(strides)
    if len(strides) != len(grids):
        raise ValueError(f"got {len(strides)} strides for {len(grids)} grids; pass one per grid")
    labels = []
    for grid, stride in zip(grids, strides):
        if isinstance(grid, TokenGrid):
            grid, stride = grid.shape, grid.stride
        labels.append(batch_labels(targets, image_size, grid, stride))
    return labels
