"""Analytic compute counts: dense blocks, and SPA blocks as our code actually runs them.

Units. Counts are **MACs** (multiply-adds of the matrix products), the unit of the SPA paper's and
Swin's "FLOPs"/"GFLOPs"; every ``*_flops`` value is ``2 x MACs`` (what ``torch.utils.flop_counter``
counts). Norms, softmax and activations are not counted.

For an SPA block we count the gate (or a training-free selector's scoring) on every token, the
projections and the MLP on the kept tokens (the kernel runs them flat, without padding), and the
attention scores as the kernel computed them: ``L^2`` per padded row for the row kernels (``sdpa``
on rows, ``flex``; the padding's share is reported apart), or the sum of squared same-image run
lengths for ``sdpa_runs``, ``varlen`` and ``reference``. What unkept tokens cost depends on
``SPAConfig.unkept``: nothing (``copy``), the output projection (``paper``: ``proj`` MACs per unkept
token), or the similarity look-up (``refresh``: ``N x K_max x C`` per image, ``K_max`` the batch's
largest kept patch count, as the kernel computes it against padded kept slots).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from timm.models import VisionTransformer
from timm.models.swin_transformer import PatchMerging
from torch import Tensor, nn

from spa_viz.layers.block import BlockCosts, BlockDecision
from spa_viz.models.spt import SPT, SPTBlock

__all__ = [
    "LayerCost",
    "dense_block_macs",
    "embed_macs",
    "layer_cost",
    "paper_dense_macs",
    "paper_spa_macs",
    "spa_block_macs",
    "static_macs",
]

_DENSE_ROW_BACKENDS = ("sdpa", "flex")


def dense_block_macs(costs: BlockCosts, tokens: int, batch: int = 1, window: int | None = None) -> int:
    """MACs of a standard transformer block on ``tokens`` tokens per image, ``batch`` images.

    ``window``: tokens per attention window (Swin: each token attends ``window`` tokens);
    None means global attention.
    """
    linear = costs.qkv_macs + costs.proj_macs + costs.mlp_macs
    pairs = tokens * (tokens if window is None else window)
    return batch * (tokens * linear + 2 * pairs * costs.attn_dim)


def _score_pairs(decision: BlockDecision) -> Tensor:
    """Query-key pairs whose score each image's tokens compute, per image (B,)."""
    plan = decision.plan
    if decision.backend in _DENSE_ROW_BACKENDS:
        return plan.kept_counts * plan.row_len
    pairs = [0] * plan.batch_size
    for _, _, _, size, image in plan.runs:
        pairs[image] += size * size
    return torch.tensor(pairs, dtype=torch.long)


def _unkept_macs(decision: BlockDecision) -> tuple[Tensor, int]:
    """MACs spent on unkept tokens: per image (B,), and the batch padding of the refresh look-up."""
    costs, plan = decision.costs, decision.plan
    kept = decision.keep.sum(1)
    tokens = decision.keep.shape[1]
    if decision.unkept == "paper":
        return (tokens - kept) * costs.proj_macs, 0
    if decision.unkept == "refresh":
        longest = int(kept.max()) if kept.numel() else 0
        per_image = tokens * kept * costs.dim
        return per_image, plan.batch_size * tokens * longest * costs.dim - int(per_image.sum())
    return torch.zeros(plan.batch_size, dtype=torch.long), 0


def spa_block_macs(decision: BlockDecision) -> int:
    """MACs of one SPA block of a batch, as run: scoring, projections/MLP on the kept tokens, attention,
    and what the ``unkept`` path spends on the other tokens."""
    costs, plan = decision.costs, decision.plan
    macs = plan.batch_size * plan.seq_len * costs.gate_macs
    macs += plan.num_kept * (costs.qkv_macs + costs.proj_macs + costs.extra_attn_macs)
    if decision.backend in _DENSE_ROW_BACKENDS:
        macs += 2 * plan.num_rows * plan.row_len**2 * costs.attn_dim
    else:
        macs += 2 * int(_score_pairs(decision).sum()) * costs.attn_dim
    if decision.sparse_mlp:
        macs += plan.num_kept * (costs.mlp_macs + costs.extra_mlp_macs)
    else:
        macs += plan.batch_size * plan.seq_len * (costs.mlp_macs + costs.extra_mlp_macs)
    unkept, unkept_padding = _unkept_macs(decision)
    return macs + int(unkept.sum()) + unkept_padding


@dataclass(frozen=True)
class LayerCost:
    """Compute of one SPA layer: dense twin vs as run, for the batch and per image, in MACs.

    Per-image run MACs leave out the attention over row padding and the refresh look-up against
    another image's longer kept list, which belong to no image; ``padding_macs`` holds what they cost (so ``macs_run == per_image_macs_run.sum() + padding_macs``).
    The ``*_flops`` properties are ``2 x`` the MACs.
    """

    macs_dense: int
    macs_run: int
    per_image_macs_dense: int
    per_image_macs_run: Tensor
    padding_macs: int

    @property
    def flops_dense(self) -> int:
        return 2 * self.macs_dense

    @property
    def flops_run(self) -> int:
        return 2 * self.macs_run

    @property
    def saving(self) -> float:
        """Share of the dense twin's compute this layer did not spend."""
        return 1.0 - self.macs_run / self.macs_dense if self.macs_dense else 0.0


def layer_cost(decision: BlockDecision) -> LayerCost:
    """Dense and run MACs of one traced SPA block."""
    costs, plan = decision.costs, decision.plan
    dense_one = dense_block_macs(costs, plan.seq_len, window=decision.dense_window)
    run = spa_block_macs(decision)
    per_token = costs.qkv_macs + costs.proj_macs + (costs.mlp_macs if decision.sparse_mlp else 0)
    per_image = plan.seq_len * costs.gate_macs + plan.kept_counts * per_token
    per_image = per_image + 2 * _score_pairs(decision) * costs.attn_dim
    if not decision.sparse_mlp:
        per_image = per_image + plan.seq_len * costs.mlp_macs
    per_image = per_image + _unkept_macs(decision)[0]
    return LayerCost(
        macs_dense=dense_one * plan.batch_size,
        macs_run=run,
        per_image_macs_dense=dense_one,
        per_image_macs_run=per_image,
        padding_macs=run - int(per_image.sum()),
    )


_EMBED_MACS: weakref.WeakKeyDictionary[nn.Module, dict[tuple, int]] = weakref.WeakKeyDictionary()


def embed_macs(embed: nn.Module, image_size: tuple[int, int]) -> int:
    """MACs per image of every convolution and linear layer of a patch embedding (a conv stem too).

    Measured once per module and image size by running it on a zero image with shape hooks; the input
    channels are ``embed.in_chans`` when set (a conv stem), else ``embed.proj.in_channels``.
    """
    cache = _EMBED_MACS.setdefault(embed, {})
    key = tuple(image_size)
    in_chans = getattr(embed, "in_chans", None) or embed.proj.in_channels
    if key not in cache:
        macs = 0

        def count(module: nn.Module, _: tuple, out: Tensor) -> None:
            nonlocal macs
            if isinstance(module, nn.Conv2d):
                macs += out.shape[-2] * out.shape[-1] * module.weight.numel()
            else:
                macs += out.numel() // out.shape[-1] * module.weight.numel()

        hooks = [m.register_forward_hook(count) for m in embed.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        reference = next(embed.parameters())
        try:
            with torch.no_grad():
                was_training = embed.training
                embed.eval()
                embed(torch.zeros(1, in_chans, *image_size, device=reference.device, dtype=reference.dtype))
                embed.train(was_training)
        finally:
            for hook in hooks:
                hook.remove()
        cache[key] = macs
    return cache[key]


def _vit_static_macs(model: VisionTransformer, image_size: tuple[int, int]) -> int:
    patch_h, patch_w = model.patch_embed.patch_size
    tokens = (image_size[0] // patch_h) * (image_size[1] // patch_w) + model.num_prefix_tokens
    macs = embed_macs(model.patch_embed, image_size)
    for block in model.blocks:
        if not hasattr(block, "spa_layer") or not block.spa_context.config.enabled:
            costs = BlockCosts.of(block)
            macs += dense_block_macs(costs, tokens) + tokens * (costs.extra_attn_macs + costs.extra_mlp_macs)
    return macs


def _spt_static_macs(model: SPT, image_size: tuple[int, int]) -> int:
    """Embedding, Swin stages, patch merging, and SPA blocks when SPA is disabled (window attention on
    the real tokens, ``4NC^2 + 2AN C`` for windows of A tokens, plus the MLP)."""
    patch = model.config.patch_size
    height, width = image_size[0] // patch, image_size[1] // patch
    macs = embed_macs(model.patch_embed, image_size)
    spa_on = model.spa_context.config.enabled
    for stage in model.layers:
        if isinstance(stage.downsample, PatchMerging):
            height, width = -(-height // 2), -(-width // 2)
            macs += height * width * stage.downsample.reduction.weight.numel()
        for block in stage.blocks:
            if isinstance(block, SPTBlock):
                if spa_on:
                    continue
                window = block.window_area((height, width))
            else:
                window = block.window_area
            macs += dense_block_macs(BlockCosts.of(block), height * width, window=window)
    return macs


def static_macs(model: nn.Module, image_size: tuple[int, int]) -> int:
    """MACs per image of a backbone's parts that SPA does not change (embedding, dense blocks).

    Knows timm's ViT and SPT; other backbones provide ``spa_static_macs(image_size)`` themselves.
    """
    custom = getattr(model, "spa_static_macs", None)
    if callable(custom):
        return int(custom(image_size))
    if isinstance(model, SPT):
        return _spt_static_macs(model, image_size)
    if isinstance(model, VisionTransformer):
        return _vit_static_macs(model, image_size)
    raise ValueError(f"no MAC model for {type(model).__name__}; give it a spa_static_macs(image_size) method")


def paper_dense_macs(tokens: int, dim: int, batch: int = 1) -> int:
    """The paper's dense MSA multiply-adds: ``B (4 N C^2 + 2 N^2 C)``."""
    return batch * (4 * tokens * dim**2 + 2 * tokens**2 * dim)


def paper_spa_macs(tokens: int, dim: int, rows: int, row_len: int, batch: int = 1) -> int:
    """The paper's SPA MSA multiply-adds: ``B (N C + N C^2) + B' (3 L C^2 + 2 L^2 C)``."""
    return batch * (tokens * dim + tokens * dim**2) + rows * (3 * row_len * dim**2 + 2 * row_len**2 * dim)
