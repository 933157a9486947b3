"""What counts as salient: the one threshold and the token labels made from a saliency map.

A pixel is salient when the map exceeds :data:`SALIENT` (0.5). A token is labelled salient when the
map somewhere in its patch exceeds it (``max`` over the patch, :data:`LABEL_REDUCE`): the max, not
the mean, favours recall, as the paper does for its selection labels (any object pixel).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

__all__ = ["LABEL_REDUCE", "SALIENT", "salient", "saliency_labels"]

#: Saliency above this marks a pixel as salient (the white contour in the overlays, the teacher's labels).
SALIENT = 0.5
LABEL_REDUCE = "max"


def salient(saliency: Tensor) -> Tensor:
    """Bool mask of the salient pixels of a saliency map (any shape)."""
    return saliency > SALIENT


def saliency_labels(
    saliency: Tensor, patch: int = 14, threshold: float = SALIENT, reduce: str = LABEL_REDUCE
) -> Tensor:
    """(B, gh*gw) bool token labels from (B, 1, H, W) saliency: max (or mean) over a patch > threshold."""
    if reduce not in ("max", "mean"):
        raise ValueError(f"reduce must be 'max' or 'mean', got {reduce!r}")
    pool = F.max_pool2d if reduce == "max" else F.avg_pool2d
    return (pool(saliency.float(), patch) > threshold).flatten(1)
