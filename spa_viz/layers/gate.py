"""Token gate: a per-token keep logit, its fusion across scales, and the keep decision.

The gate is deliberately cheap (one linear layer, C -> 1). How a block's own logit ``s_raw`` becomes
the score it selects with is the *fusion mode* (``SPAConfig.fusion``):

* ``"stage"`` (the paper's multi-scale fusion, the default): ``s = max(s_raw, pool(s_in))`` where
  ``s_in`` is the last fused score of the *previous stage*, 2x2 max-pooled to this stage's grid;
  every block of a stage fuses with that same ``s_in``. The first SPA stage (and a plain SPA-ViT,
  which has one scale) has no ``s_in``, so there ``s = s_raw``.
* ``"chain"`` **[ours, ablation]**: every block fuses with the previous block's fused score, so the
  first gate is a floor for all later ones.
* ``"none"``: ``s = s_raw`` everywhere.

The hard keep mask comes from a Gumbel-sigmoid with a straight-through gradient in training and
from the same rule without the noise in evaluation: ``sigmoid(s / tau) > threshold``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "FUSION_MODES",
    "TokenGate",
    "check_fusion",
    "detach_gate_inputs",
    "ensure_min_keep",
    "fuse_scores",
    "gumbel_keep",
    "pool_scores",
    "select_tokens",
    "straight_through",
    "threshold_logit",
]

FUSION_MODES = ("stage", "chain", "none")

Grid = tuple[int, int]


class TokenGate(nn.Module):
    """Linear C -> 1 gate producing one keep logit per token.

    ``init_bias`` sets where training starts: a positive bias makes a freshly added gate keep
    (almost) everything, so converting a pretrained model does not destroy it before training.
    The gate reads the block input (before ``norm1``), as the paper's ``s = W_g r + b_g``.
    ``detach_input`` (an ablation, not saved with the weights) scores a detached copy of it, so no
    gradient flows through the gate into the features it reads.
    """

    learned = True
    name = "learned"
    detach_input = False

    def __init__(self, dim: int, init_bias: float = 3.0) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, 1)
        nn.init.trunc_normal_(self.proj.weight, std=0.02)
        nn.init.constant_(self.proj.bias, init_bias)

    @property
    def macs_per_token(self) -> int:
        """Scoring multiply-adds per token."""
        return self.proj.weight.numel()

    def forward(self, tokens: Tensor, num_prefix: int = 0) -> Tensor:
        """Raw logits (B, N) of the patch tokens of ``tokens`` (B, num_prefix + N, C)."""
        if self.detach_input:
            tokens = tokens.detach()
        # scoring all tokens then slicing avoids copying the non-contiguous patch slice
        return self.proj(tokens).squeeze(-1)[:, num_prefix:]


def detach_gate_inputs(model: nn.Module, detach: bool = True) -> int:
    """Set ``detach_input`` on every :class:`TokenGate` of ``model`` and return how many there are.

    With it the gates still learn from ``L_select`` and the task loss, but neither reaches the
    backbone through them: the control that tells whether ``L_select``'s pull on the features is what
    a model trained with it loses."""
    gates = [module for module in model.modules() if isinstance(module, TokenGate)]
    for gate in gates:
        gate.detach_input = detach
    return len(gates)


def check_fusion(mode: str) -> str:
    """``mode`` if it is a fusion mode, else ValueError naming the allowed ones."""
    if mode not in FUSION_MODES:
        raise ValueError(f"unknown fusion mode {mode!r}; choose one of {FUSION_MODES}")
    return mode


def pool_scores(scores: Tensor, grid: Grid, target: Grid) -> Tensor:
    """Scores (B, gh*gw) on ``grid`` brought to ``target``: unchanged if equal, 2x2 max-pooled if half.

    Pooling uses ceil mode, so odd grids keep their border tokens (as Swin's padded patch merging).
    """
    if tuple(grid) == tuple(target):
        return scores
    batch = scores.shape[0]
    pooled = F.max_pool2d(scores.reshape(batch, 1, *grid), kernel_size=2, stride=2, ceil_mode=True)
    if tuple(pooled.shape[-2:]) != tuple(target):
        raise ValueError(
            f"cannot fuse scores from grid {tuple(grid)} into grid {tuple(target)}: "
            "only equal grids or a 2x downsampling are supported"
        )
    return pooled.reshape(batch, -1)


def fuse_scores(scores: Tensor, incoming: Tensor | None) -> Tensor:
    """Element-wise max of a block's logits with the incoming fused logits (already on its grid)."""
    if incoming is None:
        return scores
    if incoming.shape != scores.shape:
        raise ValueError(f"incoming scores {tuple(incoming.shape)} do not match {tuple(scores.shape)}")
    return torch.maximum(scores, incoming)


def threshold_logit(threshold: float, tau: float = 1.0) -> float:
    """The logit ``s`` above which ``sigmoid(s / tau) > threshold`` (+-inf at the ends: 0 keeps all)."""
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must lie in [0, 1], got {threshold}")
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    if threshold == 0.0:
        return -math.inf
    if threshold == 1.0:
        return math.inf
    return tau * (math.log(threshold) - math.log1p(-threshold))


def ensure_min_keep(keep: Tensor, scores: Tensor, min_keep: int, counts: list[int] | None = None) -> Tensor:
    """``keep`` plus, in images that keep fewer than ``min_keep``, their highest-scoring tokens.

    ``counts`` (the kept count per image, when the caller has it) saves a pass over ``keep``.
    """
    k = min(min_keep, scores.shape[1])
    if k <= 0:
        return keep
    if counts is None:
        counts = keep.sum(1).tolist()
    if min(counts, default=k) >= k:
        return keep
    top = scores.detach().topk(k, dim=1).indices
    return keep.scatter(1, top, True)


def gumbel_keep(
    scores: Tensor,
    *,
    threshold: float = 0.5,
    tau: float = 1.0,
    training: bool = False,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor | None]:
    """The keep rule of :func:`select_tokens` without ``min_keep``: ``(keep, soft)``, where ``soft`` is
    the noisy soft gate in training (None in evaluation). The SPA kernel enforces ``min_keep`` with
    the counts it computes for packing anyway, then builds the straight-through multiplier with
    :func:`straight_through`."""
    if not training:
        return scores > threshold_logit(threshold, tau), None
    u = torch.rand(scores.shape, generator=generator, device=scores.device, dtype=scores.dtype)
    u = u.clamp(1e-6, 1.0 - 1e-6)
    soft = torch.sigmoid((scores + torch.log(u) - torch.log1p(-u)) / tau)
    return soft > threshold, soft


def straight_through(keep: Tensor, soft: Tensor) -> Tensor:
    """``hard - soft.detach() + soft``: the value of the hard mask, the gradient of the soft gate."""
    return keep.to(soft.dtype) - soft.detach() + soft


def select_tokens(
    scores: Tensor,
    *,
    threshold: float = 0.5,
    tau: float = 1.0,
    min_keep: int = 1,
    training: bool = False,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Hard keep mask from fused logits, plus the straight-through multiplier in training.

    Training: Gumbel-sigmoid ``soft = sigmoid((scores + logistic noise) / tau)``, ``keep = soft >
    threshold``, and the multiplier ``hard - soft.detach() + soft`` (value 1 on kept tokens,
    gradient of ``soft``). Evaluation: the same rule without the noise, ``sigmoid(scores / tau) >
    threshold``, and no multiplier (None). Every image keeps at least ``min_keep`` tokens (its
    highest-scoring ones).

    Returns ``(keep, multiplier)``; ``keep`` is bool (B, N).
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be (B, N), got shape {tuple(scores.shape)}")
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    if min_keep < 0:
        raise ValueError(f"min_keep must be >= 0, got {min_keep}")
    keep, soft = gumbel_keep(scores, threshold=threshold, tau=tau, training=training, generator=generator)
    keep = ensure_min_keep(keep, scores, min_keep)
    return keep, None if soft is None else straight_through(keep, soft)
