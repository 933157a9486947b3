"""Token gate: a per-token keep logit, fused across SPA blocks, and the keep decision.

The gate is deliberately cheap (one linear layer, C -> 1). Its logit is max-fused with the previous
SPA block's fused logit so that a token selected earlier (or at a finer scale) stays selected, and
the hard keep mask comes from a Gumbel-sigmoid with a straight-through gradient in training.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["TokenGate", "fuse_scores", "select_tokens", "threshold_logit"]


class TokenGate(nn.Module):
    """Linear C -> 1 gate producing one keep logit per token.

    ``init_bias`` sets where training starts: a positive bias makes a freshly added gate keep
    (almost) everything, so converting a pretrained model does not destroy it before training.
    """

    def __init__(self, dim: int, init_bias: float = 3.0) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, 1)
        nn.init.trunc_normal_(self.proj.weight, std=0.02)
        nn.init.constant_(self.proj.bias, init_bias)

    def forward(self, tokens: Tensor) -> Tensor:
        """Raw logits (B, N) for tokens (B, N, C)."""
        return self.proj(tokens).squeeze(-1)


def fuse_scores(
    scores: Tensor,
    previous: Tensor | None,
    grid: tuple[int, int],
    previous_grid: tuple[int, int] | None = None,
) -> Tensor:
    """Element-wise max of this block's logits with the previous SPA block's fused logits.

    When the previous block ran at twice the resolution, its logits are first 2x2 max-pooled
    (ceil mode, so odd grids keep their border tokens).
    """
    if previous is None:
        return scores
    if previous_grid is not None and tuple(previous_grid) != tuple(grid):
        b = previous.shape[0]
        prev_map = previous.reshape(b, 1, *previous_grid)
        prev_map = F.max_pool2d(prev_map, kernel_size=2, stride=2, ceil_mode=True)
        if tuple(prev_map.shape[-2:]) != tuple(grid):
            raise ValueError(
                f"cannot fuse scores from grid {previous_grid} into grid {grid}: "
                "only equal grids or a 2x downsampling are supported"
            )
        previous = prev_map.reshape(b, -1)
    if previous.shape != scores.shape:
        raise ValueError(f"previous scores {tuple(previous.shape)} do not match {tuple(scores.shape)}")
    return torch.maximum(scores, previous)


def threshold_logit(threshold: float) -> float:
    """The logit equivalent of a probability threshold (+-inf at the ends, so 0 keeps all)."""
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must lie in [0, 1], got {threshold}")
    if threshold == 0.0:
        return -math.inf
    if threshold == 1.0:
        return math.inf
    return math.log(threshold) - math.log1p(-threshold)


def select_tokens(
    scores: Tensor,
    *,
    threshold: float = 0.5,
    tau: float = 1.0,
    min_keep: int = 1,
    training: bool = False,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Hard keep mask from fused logits, plus a straight-through multiplier for the gradient.

    Training: Gumbel-sigmoid (logistic noise, temperature ``tau``), ``soft > threshold``, and the
    multiplier ``hard - soft.detach() + soft`` (value 1 on kept tokens, gradient of ``soft``).
    Evaluation: ``sigmoid(scores) > threshold`` and a multiplier of ones.
    Every image keeps at least ``min_keep`` tokens (its highest-scoring ones).

    Returns ``(keep, multiplier)``, both (B, N); ``keep`` is bool.
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be (B, N), got shape {tuple(scores.shape)}")
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    if min_keep < 0:
        raise ValueError(f"min_keep must be >= 0, got {min_keep}")
    if training:
        u = torch.rand(scores.shape, generator=generator, device=scores.device, dtype=scores.dtype)
        u = u.clamp(1e-6, 1.0 - 1e-6)
        soft = torch.sigmoid((scores + torch.log(u) - torch.log1p(-u)) / tau)
        keep = soft > threshold
    else:
        keep = scores > threshold_logit(threshold)
        soft = None
    n = scores.shape[1]
    k = min(min_keep, n)
    if k > 0:
        top = scores.detach().topk(k, dim=1).indices
        keep = keep.scatter(1, top, True)
    if soft is None:
        return keep, torch.ones_like(scores)
    hard = keep.to(scores.dtype)
    return keep, hard - soft.detach() + soft
