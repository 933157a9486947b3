"""One token under the microscope: what a single patch token saw and why it was kept.

:func:`record_block_inputs` runs a batch once through SPA (traced) and once through the dense twin,
keeping every SPA block's input tokens (and, for SPA, the block's :class:`TokenLayout`).
:func:`inspect_token` then answers, for one token of one image at one SPA layer, from those inputs
alone (no forward pass; a few small matrix products):

* per head, its attention weights over the tokens it could see as the layer ran: the tokens of its
  own same-image run in its packed row (container), the only keys the packed attention gave it;
  tokens of its image kept in another container, and unkept tokens, it could not see;
* the same token's attention in the dense twin (every token of the image, or its Swin window);
* its gate's own logit, the selection score after fusion, ``sigmoid(score / tau)`` against the
  threshold, and whether the fused score decided (kept where the raw logit alone would not, or the
  other way round);
* its packed row and slot, and, with ``unkept="refresh"``, the kept token whose update it took.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

from spa_viz.analysis.trace import LayerTrace, Trace
from spa_viz.analysis.trace import trace as traced_forward
from spa_viz.layers.attention import attention_weights
from spa_viz.layers.block import TokenLayout, find_context, spa_blocks
from spa_viz.layers.gate import threshold_logit
from spa_viz.layers.packing import PackPlan, gather_kept
from spa_viz.models.twin import dense_twin

__all__ = ["BlockInputs", "TokenInspection", "inspect_token", "record_block_inputs"]


@dataclass
class BlockInputs:
    """Every SPA block's input tokens for one batch: ``spa[layer] = (tokens (B, T, C), layout)`` from the
    SPA run, ``dense[layer]`` (B, T, C) from the dense twin's run (on the model's device)."""

    spa: dict[int, tuple[Tensor, TokenLayout]]
    dense: dict[int, Tensor]


def record_block_inputs(model: nn.Module, images: Tensor, **forward_kwargs: Any) -> tuple[Any, Trace, BlockInputs]:
    """Run ``images`` through SPA (traced) and the dense twin, recording each SPA block's input.

    Returns the SPA output, its :class:`Trace` and the :class:`BlockInputs` :func:`inspect_token` reads.
    """
    ctx = find_context(model)
    ctx.inputs = {}
    try:
        output, record = traced_forward(model, images, **forward_kwargs)
        spa_inputs = ctx.inputs
    finally:
        ctx.inputs = None
    dense: dict[int, Tensor] = {}
    hooks = [
        block.register_forward_pre_hook(
            lambda module, args: dense.__setitem__(module.spa_layer, args[0].detach().flatten(1, -2))
        )
        for block in spa_blocks(model)
    ]
    try:
        with dense_twin(model), torch.no_grad():
            model(images, **forward_kwargs)
    finally:
        for hook in hooks:
            hook.remove()
    return output, record, BlockInputs(spa_inputs, dense)


@dataclass
class TokenInspection:
    """What one patch token of one image saw at one SPA layer (weights over the layer's patch grid)."""

    layer: int
    image: int
    position: tuple[int, int]
    """(row, column) of the token in the layer's patch grid."""
    grid: tuple[int, int]
    kept: bool
    raw_score: float
    """The gate's own logit (a selector's score)."""
    score: float
    """The score selection compared with the threshold (after fusion)."""
    probability: float
    """``sigmoid(score / tau)`` for a learned gate (NaN for selectors, whose scores are not logits)."""
    threshold: float
    fused_input: bool
    """Whether an earlier layer's score was fused into this layer's scores."""
    fusion_decided: bool
    """Whether the fused score kept the token where its own logit would not have, or dropped it where
    its own logit would have kept it."""
    packed_row: int | None
    slot: int | None
    """Slot within the packed row (None: not kept)."""
    refreshed_from: tuple[int, int] | None
    """With ``unkept="refresh"``: the grid position of the kept token whose update it took."""
    visible: Tensor
    """(N,) bool: patch tokens it attended to in the SPA run (its own run in its packed row)."""
    kept_elsewhere: Tensor
    """(N,) bool: patch tokens of its image that were kept but sat in another container."""
    spa_attention: Tensor | None
    """(heads, N) its attention weights over the patch grid in the SPA run (NaN where it could not
    see); None when the token was not kept (it did not attend)."""
    spa_prefix_attention: Tensor | None
    """(heads, num_prefix) its weights on the prefix (class) tokens in the SPA run."""
    dense_attention: Tensor
    """(heads, N) the same token's weights in the dense twin (NaN outside a Swin window)."""
    dense_prefix_attention: Tensor

    def summary(self) -> dict[str, Any]:
        """The scalar facts as plain JSON (the weights are shown as images)."""

        def number(value: float) -> float | None:
            return None if math.isnan(value) else round(value, 4)

        return {
            "layer": self.layer,
            "image": self.image,
            "row": self.position[0],
            "column": self.position[1],
            "kept": self.kept,
            "gate_logit": number(self.raw_score),
            "selection_score": number(self.score),
            "sigmoid(score / tau)": number(self.probability),
            "threshold": self.threshold,
            "fused_input": self.fused_input,
            "fusion_decided": self.fusion_decided,
            "packed_row": self.packed_row,
            "slot": self.slot,
            "saw_tokens": int(self.visible.sum()),
            "kept_in_other_containers": int(self.kept_elsewhere.sum()),
            "refreshed_from": None if self.refreshed_from is None else list(self.refreshed_from),
        }


def _layer(record: Trace, layer: int) -> LayerTrace:
    for candidate in record.layers:
        if candidate.layer == layer:
            return candidate
    raise ValueError(f"layer {layer} is not an SPA layer of this model; SPA layers: {[t.layer for t in record.layers]}")


def _block(model: nn.Module, layer: int) -> nn.Module:
    return next(block for block in spa_blocks(model) if block.spa_layer == layer)


def _run_weights(
    block: nn.Module, tokens: Tensor, layout: TokenLayout, plan: PackPlan, flat: int
) -> tuple[Tensor, Tensor]:
    """(heads, run length) weights of flat kept token ``flat`` over its same-image run, and the run's
    flat source indices (``image * T + token``).

    The projections run on every kept token of the layer, as the block ran them, with the layer's
    plan as the context's current one (linears that depend on it, e.g. drop-scaled adapters, see
    the layer's decision)."""
    run = next(r for r in plan.runs if r[0] <= flat < r[0] + r[3])
    start_flat, row, start, size, _ = run
    bias = layout.attention_bias(plan)
    run_bias = (
        None if bias is None else bias[row if bias.shape[0] > 1 else 0, :, start : start + size, start : start + size]
    )
    ctx = block.spa_context
    previous, ctx.last_plan = ctx.last_plan, plan.to(tokens.device)
    try:
        kept = block.norm1(gather_kept(tokens, ctx.last_plan))
        weights = attention_weights(block.attn, kept, flat, run_bias, window=slice(start_flat, start_flat + size))
    finally:
        ctx.last_plan = previous
    return weights, plan.sources[start_flat : start_flat + size]


def _spread(
    weights: Tensor, sources: Tensor, image: int, seq_len: int, prefix: int, patches: int
) -> tuple[Tensor, Tensor]:
    """Weights over run members -> (heads, N) over the patch grid (NaN where unseen) and (heads, prefix)."""
    heads = weights.shape[0]
    grid = torch.full((heads, patches), math.nan)
    prefix_weights = torch.zeros(heads, prefix)
    token = (sources - image * seq_len).cpu()
    weights = weights.detach().float().cpu()
    patch = token >= prefix
    grid[:, token[patch] - prefix] = weights[:, patch]
    prefix_weights[:, token[~patch]] = weights[:, ~patch]
    return grid, prefix_weights


@torch.no_grad()
def inspect_token(
    model: nn.Module, record: Trace, inputs: BlockInputs, layer: int, image: int, row: int, column: int
) -> TokenInspection:
    """:class:`TokenInspection` of the patch token at (``row``, ``column``) of image ``image`` at SPA layer
    ``layer``, from a :func:`record_block_inputs` run (ValueError naming the valid ranges otherwise)."""
    decision = _layer(record, layer)
    height, width = decision.grid
    batch = decision.keep.shape[0]
    if not 0 <= image < batch:
        raise ValueError(f"image {image} is outside the batch of {batch} (0-{batch - 1})")
    if not (0 <= row < height and 0 <= column < width):
        raise ValueError(f"token ({row}, {column}) is outside layer {layer}'s {height} x {width} grid")
    block = _block(model, layer)
    config = find_context(model).config
    tokens, layout = inputs.spa[layer]
    prefix, patches = decision.num_prefix, height * width
    seq_len = prefix + patches
    index = row * width + column
    device = tokens.device

    plan = decision.plan.to(device)
    flat = int(plan.flat_position[image * seq_len + prefix + index])
    kept = flat >= 0
    spa_attention = spa_prefix = None
    visible = torch.zeros(patches, dtype=torch.bool)
    packed_row = slot = None
    if kept:
        weights, sources = _run_weights(block, tokens, layout, plan, flat)
        spa_attention, spa_prefix = _spread(weights, sources, image, seq_len, prefix, patches)
        visible = ~spa_attention[0].isnan()
        position = int(plan.valid_slots[flat])
        packed_row, slot = divmod(position, plan.row_len)
    kept_elsewhere = decision.keep[image].clone() & ~visible
    if kept:
        kept_elsewhere[index] = False

    dense_tokens = inputs.dense[layer]
    everything = torch.ones(batch, seq_len, dtype=torch.bool, device=device)
    dense_plan = layout.plan(everything, replace(config, policy="image"))
    dense_flat = int(dense_plan.flat_position[image * seq_len + prefix + index])
    with dense_twin(model):  # the dense twin's projections (no adapter acts)
        weights, sources = _run_weights(block, dense_tokens, layout, dense_plan, dense_flat)
    dense_attention, dense_prefix = _spread(weights, sources, image, seq_len, prefix, patches)

    raw = float(decision.raw_scores[image, index])
    score = float(decision.scores[image, index])
    probability = float(torch.sigmoid(torch.tensor(score / decision.tau))) if decision.learned else math.nan
    cut = threshold_logit(decision.threshold, decision.tau)
    fusion_decided = bool(decision.fused_input and (raw > cut) != (score > cut))
    source = None
    if decision.refreshed_from is not None and not kept:
        borrowed = int(decision.refreshed_from[image, index])
        source = divmod(borrowed, width)
    return TokenInspection(
        layer=layer,
        image=image,
        position=(row, column),
        grid=(height, width),
        kept=kept,
        raw_score=raw,
        score=score,
        probability=probability,
        threshold=decision.threshold,
        fused_input=decision.fused_input,
        fusion_decided=fusion_decided,
        packed_row=packed_row,
        slot=slot,
        refreshed_from=source,
        visible=visible,
        kept_elsewhere=kept_elsewhere,
        spa_attention=spa_attention,
        spa_prefix_attention=spa_prefix,
        dense_attention=dense_attention,
        dense_prefix_attention=dense_prefix,
    )
