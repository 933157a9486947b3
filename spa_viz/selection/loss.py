"""The selection loss L_select: BCE between each learned gate's own logit and its token labels.

``L = L_task + alpha * L_select``, with ``L_select`` summed over SPA blocks (alpha = 0.01 in the
paper). **[ours]** The BCE reads each gate's raw logit, not the fused score: a max-fused score passes
gradient only to the branch that won the max, so later gates would learn from a fraction of their
tokens. Without ``L_select`` the paper's gate keeps far more tokens.

``alpha``: :data:`DEFAULT_ALPHA` = 0.01 is the paper's value and the library's default (also of a
recipe that does not set it). Our digit recipes set ``alpha = 0.1`` in their JSON: our ``L_select``
is the *mean* BCE over a block's tokens, summed over blocks, and the paper does not say how it
normalises; the recipes' value is a recipe choice, recorded in every checkpoint's config and card.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from spa_viz.layers.block import find_context

__all__ = ["DEFAULT_ALPHA", "selection_loss", "model_selection_loss"]

DEFAULT_ALPHA = 0.01

Grid = tuple[int, int]


def _labels_for(labels: Tensor | Mapping[Grid, Tensor], grid: Grid, scores: Tensor) -> Tensor:
    if isinstance(labels, Mapping):
        if tuple(grid) not in labels:
            raise ValueError(f"no selection labels for token grid {grid}; labels cover {sorted(labels)}")
        target = labels[tuple(grid)]
    else:
        target = labels
    if target.shape != scores.shape:
        raise ValueError(
            f"selection labels of shape {tuple(target.shape)} do not match scores {tuple(scores.shape)} "
            f"on grid {grid}; build them with spa_viz.selection.labels for this grid"
        )
    return target.to(device=scores.device, dtype=scores.dtype)


def selection_loss(
    scores: Sequence[tuple[Grid, Tensor]],
    labels: Tensor | Mapping[Grid, Tensor],
    alpha: float = DEFAULT_ALPHA,
) -> Tensor:
    """``alpha * sum_blocks BCEWithLogits(score_block, labels_at_its_grid)`` (mean over tokens).

    ``labels`` is one (B, N) tensor when every block shares a grid (SPA-ViT), or a mapping from
    grid ``(gh, gw)`` to (B, gh*gw) labels for hierarchical models.
    """
    if not scores:
        raise ValueError("no SPA scores: run the model forward (with SPA enabled) before the loss")
    total = torch.zeros((), device=scores[0][1].device)
    for grid, score in scores:
        total = total + F.binary_cross_entropy_with_logits(score, _labels_for(labels, grid, score))
    return alpha * total


def model_selection_loss(
    model: nn.Module, labels: Tensor | Mapping[Grid, Tensor], alpha: float = DEFAULT_ALPHA
) -> Tensor:
    """:func:`selection_loss` on the raw logits the model's learned gates produced in its last forward."""
    ctx = find_context(model)
    return selection_loss([(gate.grid, gate.raw) for gate in ctx.gates], labels, alpha)
