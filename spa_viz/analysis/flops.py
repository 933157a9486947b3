"""Analytic FLOP counts: dense blocks, and SPA blocks as our code actually runs them.

FLOPs are ``2 x multiply-adds`` of the matrix products (what ``torch.utils.flop_counter`` counts;
norms, softmax and activations are not counted). For an SPA block we count the gate on every token
(prefix tokens too, as the code scores them), the projections and the MLP on every packed slot (container padding included), and the
attention scores of every row: ``L^2`` per row for the dense-row backends (``sdpa``, ``flex``),
or the sum of squared same-image run lengths for ``varlen`` and ``reference``. A stale-token
refresher ([ours]) adds its two projections on every refreshed token and its class-token context
projection once per image (:func:`refresh_flops`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from timm.models import VisionTransformer
from torch import Tensor, nn

from spa_viz.layers.block import BlockCosts, BlockDecision
from spa_viz.layers.refresh import RefreshDecision

__all__ = [
    "LayerFlops",
    "dense_block_flops",
    "spa_block_flops",
    "layer_flops",
    "refresh_flops",
    "static_flops",
    "paper_spa_flops",
    "paper_dense_flops",
]

_DENSE_ROW_BACKENDS = ("sdpa", "flex")


def dense_block_flops(costs: BlockCosts, tokens: int, batch: int = 1, window: int | None = None) -> int:
    """A standard transformer block on ``tokens`` tokens per image, ``batch`` images.

    ``window``: tokens per attention window (Swin: each token attends ``window`` tokens);
    None means global attention.
    """
    linear = costs.qkv_macs + costs.proj_macs + costs.mlp_macs
    pairs = tokens * (tokens if window is None else window)
    return 2 * batch * (tokens * linear + 2 * pairs * costs.attn_dim)


def _score_pairs(decision: BlockDecision) -> Tensor:
    """Query-key pairs whose score each image's tokens compute, per image (B,)."""
    plan = decision.plan
    if decision.backend in _DENSE_ROW_BACKENDS:
        return plan.kept_counts * plan.row_len
    segments = plan.segments
    pairs = torch.zeros(plan.batch_size, dtype=torch.long)
    return pairs.index_add(0, segments[:, 3], segments[:, 2] ** 2)


def spa_block_flops(decision: BlockDecision) -> int:
    """One SPA block of a batch, as run: gate, packed projections/MLP (padding too), attention."""
    costs, plan = decision.costs, decision.plan
    macs = plan.batch_size * plan.seq_len * costs.gate_macs
    macs += plan.num_slots * (costs.qkv_macs + costs.proj_macs)
    if decision.backend in _DENSE_ROW_BACKENDS:
        macs += 2 * plan.num_rows * plan.row_len**2 * costs.attn_dim
    else:
        macs += 2 * int(_score_pairs(decision).sum()) * costs.attn_dim
    if decision.sparse_mlp:
        macs += plan.num_slots * costs.mlp_macs
    else:
        macs += plan.batch_size * plan.seq_len * costs.mlp_macs
    return 2 * macs


@dataclass(frozen=True)
class LayerFlops:
    """FLOPs of one SPA layer: dense vs as run, for the batch and per image.

    Per-image run FLOPs leave out container padding, which belongs to no image; ``padding`` holds
    what the padding cost (so ``run == per_image_run.sum() + padding``).
    """

    dense: int
    run: int
    per_image_dense: int
    per_image_run: Tensor
    padding: int

    @property
    def saving(self) -> float:
        return 1.0 - self.run / self.dense if self.dense else 0.0


def layer_flops(decision: BlockDecision) -> LayerFlops:
    """Dense and run FLOPs of one traced SPA block."""
    costs, plan = decision.costs, decision.plan
    dense_one = dense_block_flops(costs, plan.seq_len, window=decision.dense_window)
    run = spa_block_flops(decision)
    per_token = costs.qkv_macs + costs.proj_macs + (costs.mlp_macs if decision.sparse_mlp else 0)
    per_image = plan.seq_len * costs.gate_macs + plan.kept_counts * per_token
    per_image = per_image + 2 * _score_pairs(decision) * costs.attn_dim
    if not decision.sparse_mlp:
        per_image = per_image + plan.seq_len * costs.mlp_macs
    per_image = 2 * per_image
    return LayerFlops(
        dense=dense_one * plan.batch_size,
        run=run,
        per_image_dense=dense_one,
        per_image_run=per_image,
        padding=run - int(per_image.sum()),
    )


def refresh_flops(decision: RefreshDecision) -> Tensor:
    """(B,) FLOPs the stale-token refresher spent per image: its projections on each refreshed token,
    plus its class-token context projection."""
    return 2 * (decision.macs_per_token * decision.refreshed_counts + decision.macs_per_image)


def static_flops(model: nn.Module, image_size: tuple[int, int]) -> int:
    """FLOPs per image of a backbone's parts that SPA does not change (embedding, dense blocks).

    Models other than timm's ViT provide ``spa_static_flops(image_size)`` themselves.
    """
    custom = getattr(model, "spa_static_flops", None)
    if callable(custom):
        return int(custom(image_size))
    if not isinstance(model, VisionTransformer):
        raise ValueError(f"no FLOP model for {type(model).__name__}; give it a spa_static_flops(image_size) method")
    patch_h, patch_w = model.patch_embed.patch_size
    grid = (image_size[0] // patch_h) * (image_size[1] // patch_w)
    tokens = grid + model.num_prefix_tokens
    proj = model.patch_embed.proj
    flops = 2 * grid * proj.weight.numel()
    for block in model.blocks:
        if not hasattr(block, "spa_layer") or not block.spa_context.config.enabled:
            flops += dense_block_flops(BlockCosts.of(block), tokens)
    return flops


def paper_dense_flops(tokens: int, dim: int, batch: int = 1) -> int:
    """The paper's dense MSA multiply-adds: ``B (4 N C^2 + 2 N^2 C)``."""
    return batch * (4 * tokens * dim**2 + 2 * tokens**2 * dim)


def paper_spa_flops(tokens: int, dim: int, rows: int, row_len: int, batch: int = 1) -> int:
    """The paper's SPA MSA multiply-adds: ``B (N C + N C^2) + B' (3 L C^2 + 2 L^2 C)``."""
    return batch * (tokens * dim + tokens * dim**2) + rows * (3 * row_len * dim**2 + 2 * row_len**2 * dim)
