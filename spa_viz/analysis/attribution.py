"""Which tokens a model's output depends on: captum attributions and attention rollout, per token.

Every method returns one value per patch token, ``(B, gh, gw)``, so maps of different methods (and
the SPA keep masks) share one grid:

* ``integrated_gradients``: captum ``IntegratedGradients`` from a zero baseline (the mean colour of
  a normalized image), pixel attributions summed over each patch.
* ``feature_ablation``: captum ``FeatureAblation`` with a per-patch ``feature_mask``: replacing a
  patch by the baseline is "drop this token". When one forward per token does not fit the time
  budget, tokens are ablated in ``g x g`` groups.
* ``occlusion``: captum ``Occlusion`` with patch-aligned, overlapping windows (2g x 2g tokens,
  stride g), averaged per token.
* ``attention_rollout``: Abnar & Zuidema's rollout, ``prod_l (0.5 A_l + 0.5 I)``, read off the
  class-token row (the mean query row when there is no prefix token). Attention is recomputed from
  each block's own ``qkv`` on its recorded input, and for SPA blocks restricted as the block ran it:
  only kept tokens attend, only to kept tokens of the same packed row; dropped tokens pass through
  (identity rows), or with ``unkept="refresh"`` mix in the attention row of the kept token whose update
  they took.

``target`` turns the model's output into one differentiable score per image (the selected class
logit, detection score or saliency sum): ``target(model(images)) -> (B,)``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from spa_viz.analysis.trace import find_backbone, trace
from spa_viz.io.timer import stopwatch
from spa_viz.models.spa_vit import is_spa_model

__all__ = [
    "METHODS",
    "Attribution",
    "Progress",
    "attention_rollout",
    "attribute",
    "method_support",
    "patch_size_of",
]

METHODS = ("integrated_gradients", "feature_ablation", "occlusion", "attention_rollout")
Progress = Callable[[float, str], None]
Target = Callable[[Any], Tensor]
_log = logging.getLogger(__name__)


@dataclass
class Attribution:
    """Per-token attribution maps of one method for a batch, with the settings used."""

    method: str
    maps: Tensor  # (B, gh, gw) float32, CPU
    seconds: float
    settings: dict[str, Any] = field(default_factory=dict)


def _vit_backbone(model: nn.Module) -> nn.Module:
    """The module holding ``patch_embed`` and ``blocks``: the SPA backbone or the first such module."""
    try:
        return find_backbone(model)
    except ValueError:
        for module in model.modules():
            if hasattr(module, "patch_embed"):
                return module
    raise ValueError(f"{type(model).__name__} has no patch embedding; pass patch_size explicitly")


def _has_plain_vit_blocks(model: nn.Module) -> bool:
    try:
        blocks = list(getattr(_vit_backbone(model), "blocks", []))
    except ValueError:
        return False
    return bool(blocks) and all(hasattr(b, "attn") and hasattr(b.attn, "qkv") for b in blocks)


def method_support(model: nn.Module) -> dict[str, str | None]:
    """For every method of :data:`METHODS`: None if it runs on ``model``, else why not (a sentence)."""
    from spa_viz.models.detection import SPAMaskRCNN

    support: dict[str, str | None] = dict.fromkeys(METHODS)
    if not _has_plain_vit_blocks(model):
        support["attention_rollout"] = (
            "attention rollout reads a plain ViT's attention (timm blocks with one qkv projection); "
            "this backbone has windowed stages"
        )
    if isinstance(model, SPAMaskRCNN):
        support["integrated_gradients"] = (
            "integrated gradients needs a gradient from the input to the score; torchvision's Mask R-CNN "
            "selects and post-processes its detections without one"
        )
    return support


def patch_size_of(model: nn.Module) -> tuple[int, int]:
    """The (height, width) of one token's patch in input pixels."""
    size = _vit_backbone(model).patch_embed.patch_size
    return (int(size[0]), int(size[1])) if isinstance(size, (tuple, list)) else (int(size), int(size))


def _grid(images: Tensor, patch: tuple[int, int]) -> tuple[int, int]:
    height, width = images.shape[-2:]
    if height % patch[0] or width % patch[1]:
        raise ValueError(f"image size {height}x{width} is not a multiple of the patch size {patch}")
    return height // patch[0], width // patch[1]


class _CountingForward:
    """``target(model(x))`` that reports progress every time captum calls it."""

    def __init__(self, model: nn.Module, target: Target, calls: int, progress: Progress | None, label: str) -> None:
        self.model, self.target, self.calls, self.progress, self.label = model, target, max(calls, 1), progress, label
        self.done = 0

    def __call__(self, x: Tensor) -> Tensor:
        out = self.target(self.model(x))
        self.done += 1
        if self.progress is not None:
            self.progress(min(self.done / self.calls, 1.0), f"{self.label}: {self.done}/{self.calls} forward passes")
        return out


def _group_size(grid: tuple[int, int], max_features: int) -> int:
    """Smallest square token group g so that the grid splits into at most ``max_features`` groups."""
    g = 1
    while math.ceil(grid[0] / g) * math.ceil(grid[1] / g) > max_features:
        g += 1
    return g


def _patch_sum(pixels: Tensor, patch: tuple[int, int]) -> Tensor:
    """(B, C, H, W) pixel attributions -> (B, gh, gw) sums over channels and patch pixels."""
    return F.avg_pool2d(pixels.sum(1, keepdim=True), patch, stride=patch).squeeze(1) * (patch[0] * patch[1])


def _patch_mean(pixels: Tensor, patch: tuple[int, int]) -> Tensor:
    """(B, C, H, W) per-pixel values shared by all channels -> (B, gh, gw) patch means."""
    return F.avg_pool2d(pixels.mean(1, keepdim=True), patch, stride=patch).squeeze(1)


def _integrated_gradients(
    forward: Callable[[Tensor], Tensor], images: Tensor, patch: tuple[int, int], n_steps: int, batch: int
) -> Tensor:
    from captum.attr import IntegratedGradients

    with torch.enable_grad():
        pixels = IntegratedGradients(forward).attribute(
            images, baselines=torch.zeros_like(images), n_steps=n_steps, internal_batch_size=batch
        )
    return _patch_sum(pixels.detach(), patch)


def _feature_ablation(
    forward: Callable[[Tensor], Tensor], images: Tensor, patch: tuple[int, int], group: int, per_eval: int
) -> Tensor:
    from captum.attr import FeatureAblation

    height, width = images.shape[-2:]
    rows = torch.arange(height, device=images.device) // (patch[0] * group)
    cols = torch.arange(width, device=images.device) // (patch[1] * group)
    mask = (rows[:, None] * math.ceil(width / (patch[1] * group)) + cols[None, :]).expand(1, 1, height, width)
    with torch.no_grad():
        pixels = FeatureAblation(forward).attribute(
            images, baselines=0.0, feature_mask=mask, perturbations_per_eval=per_eval
        )
    return _patch_mean(pixels, patch)


def _occlusion(
    forward: Callable[[Tensor], Tensor], images: Tensor, patch: tuple[int, int], group: int, per_eval: int
) -> Tensor:
    from captum.attr import Occlusion

    channels = images.shape[1]
    window = (channels, 2 * group * patch[0], 2 * group * patch[1])
    stride = (channels, group * patch[0], group * patch[1])
    with torch.no_grad():
        pixels = Occlusion(forward).attribute(
            images, sliding_window_shapes=window, strides=stride, baselines=0.0, perturbations_per_eval=per_eval
        )
    return _patch_mean(pixels, patch)


def _occlusion_evals(grid: tuple[int, int], group: int) -> int:
    """Window positions captum's Occlusion visits: ceil((size - window) / stride) + 1 per axis."""
    return math.prod(max(math.ceil((g - 2 * group) / group), 0) + 1 for g in grid)


def _row_groups(plan_sources: Tensor, plan_slots: Tensor, row_len: int, batch: int, seq_len: int) -> Tensor:
    """(B, T) packed row of every token, -1 for tokens that were not packed."""
    groups = torch.full((batch * seq_len,), -1, dtype=torch.long)
    groups[plan_sources] = plan_slots // row_len
    return groups.view(batch, seq_len)


def _block_attention(block: nn.Module, x: Tensor, allowed: Tensor | None) -> Tensor:
    """Head-averaged attention weights (B, T, T) of ``block`` on input ``x``.

    ``allowed`` (B, T, T) bool restricts which keys a query sees (None: all); rows with no allowed
    key come back as zeros.
    """
    attn = block.attn
    batch, seq_len, _ = x.shape
    heads = attn.num_heads
    head_dim = getattr(attn, "head_dim", attn.qkv.out_features // (3 * heads))
    qkv = attn.qkv(block.norm1(x)).reshape(batch, seq_len, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
    logits = (q @ k.transpose(-2, -1)) * getattr(attn, "scale", head_dim**-0.5)
    if allowed is not None:
        logits = logits.masked_fill(~allowed[:, None], float("-inf"))
    weights = torch.nan_to_num(logits.softmax(-1), nan=0.0)
    return weights.mean(1)


def attention_rollout(model: nn.Module, images: Tensor, progress: Progress | None = None) -> Tensor:
    """Attention rollout (B, gh, gw) of a ViT or SPA-ViT, with SPA's selection and packing as run."""
    if not _has_plain_vit_blocks(model):
        raise ValueError("attention rollout needs a plain ViT backbone (timm blocks with a fused qkv)")
    backbone = _vit_backbone(model)
    blocks = list(backbone.blocks)
    inputs: dict[int, Tensor] = {}
    hooks = [
        b.register_forward_pre_hook(lambda _m, args, i=i: inputs.__setitem__(i, args[0].detach()))
        for i, b in enumerate(blocks)
    ]
    try:
        with torch.no_grad():
            if is_spa_model(backbone):
                _, record = trace(model, images)
                spa_layers = {t.layer: t for t in record.layers}
            else:
                model(images)
                spa_layers = {}
    finally:
        for hook in hooks:
            hook.remove()
    num_prefix = int(getattr(backbone, "num_prefix_tokens", 0))
    batch, seq_len, _ = inputs[0].shape
    eye = torch.eye(seq_len, device=inputs[0].device).expand(batch, seq_len, seq_len)
    rollout = eye
    with torch.no_grad():
        for i, block in enumerate(blocks):
            x = inputs[i]
            layer = spa_layers.get(getattr(block, "spa_layer", -1))
            if layer is None:
                mixed = 0.5 * _block_attention(block, x, None) + 0.5 * eye
            else:
                plan = layer.plan
                groups = _row_groups(plan.valid_sources, plan.valid_slots, plan.row_len, batch, seq_len).to(x.device)
                kept = groups >= 0
                allowed = kept[:, :, None] & kept[:, None, :] & (groups[:, :, None] == groups[:, None, :])
                # soft gating scales a kept token's attention branch by m = sigmoid(s): x + m * attn
                factor = torch.ones(batch, seq_len, device=x.device, dtype=x.dtype)
                if layer.learned and layer.soft_gating:
                    factor[:, num_prefix:] = layer.soft_gate.to(x.device, x.dtype)
                weights = _block_attention(block, x, allowed)
                gated = (factor[..., None] * weights + eye) / (1.0 + factor[..., None])
                mixed = torch.where(kept[..., None], gated, eye)
                if layer.refreshed_from is not None:
                    # refresh: an unkept token takes the update of its nearest kept token, so its row
                    # mixes in that token's attention row, weighted by its own gate factor
                    source = layer.refreshed_from.to(x.device) + num_prefix
                    borrowed = weights.gather(1, source[..., None].expand(-1, -1, seq_len))
                    own = factor[:, num_prefix:, None]
                    refreshed = (own * borrowed + eye[:, num_prefix:]) / (1.0 + own)
                    patch_rows = torch.where(kept[:, num_prefix:, None], mixed[:, num_prefix:], refreshed)
                    mixed = torch.cat([mixed[:, :num_prefix], patch_rows], dim=1)
            mixed = mixed / mixed.sum(-1, keepdim=True)
            rollout = mixed @ rollout
            if progress is not None:
                progress((i + 1) / len(blocks), f"attention rollout: block {i + 1}/{len(blocks)}")
    scores = rollout[:, 0, num_prefix:] if num_prefix else rollout.mean(1)
    patch = patch_size_of(model)
    return scores.reshape(images.shape[0], *_grid(images, patch)).float().cpu()


def _forward_seconds(model: nn.Module, images: Tensor, target: Target) -> float:
    """Wall-clock seconds of one ``target(model(images))`` without gradients."""
    with torch.no_grad(), stopwatch(images.device) as timing:
        target(model(images))
    return timing.wall


def _fit_budget(method: str, grid: tuple[int, int], budget_s: float, forward_s: float, batch: int) -> dict[str, int]:
    """Settings of ``method`` whose forward (and backward) passes fit ``budget_s`` seconds.

    An integration step (forward and backward, the steps batched together) costs about two
    forwards on a CPU; batching perturbations saves little, so the budget is counted in forwards of
    the whole batch.
    """
    forwards = max(int(budget_s / max(forward_s, 1e-6)), 1)
    tokens = grid[0] * grid[1]
    if method == "integrated_gradients":
        steps = min(max(forwards // 2, 4), 64)
        return {"n_steps": steps, "internal_batch_size": min(steps * batch, 16)}
    if method == "feature_ablation":
        return {"token_group": _group_size(grid, min(max(forwards - 1, 4), tokens))}
    group = 1
    while _occlusion_evals(grid, group) > max(forwards - 1, 4) and 2 * group < min(grid):
        group += 1
    return {"token_group": group}


def attribute(
    model: nn.Module,
    images: Tensor,
    target: Target,
    method: str,
    *,
    patch_size: tuple[int, int] | None = None,
    progress: Progress | None = None,
    budget_s: float = 8.0,
    forward_seconds: float | None = None,
    n_steps: int | None = None,
    token_group: int | None = None,
    perturbations_per_eval: int = 8,
) -> Attribution:
    """Per-token attribution maps (B, gh, gw) of ``target(model(images))`` with one of :data:`METHODS`.

    The cost is fitted to ``budget_s`` seconds from ``forward_seconds`` (one forward of the batch;
    measured once when not given): the number of integration steps for integrated gradients, the
    size of the square token groups ablated together for feature ablation and occlusion (1 = one
    token each). ``n_steps`` / ``token_group`` override the fit. ``patch_size`` defaults to the
    model's patch embedding.
    """
    if method not in METHODS:
        raise ValueError(f"unknown attribution method {method!r}; choose one of {METHODS}")
    patch = patch_size if patch_size is not None else patch_size_of(model)
    grid = _grid(images, patch)
    was_training = model.training
    model.eval()
    try:
        if method == "attention_rollout":
            with stopwatch(images.device) as timing:
                maps = attention_rollout(model, images, progress)
            return Attribution(method, maps, timing.wall)
        with stopwatch(images.device) as timing:
            needs_fit = n_steps is None if method == "integrated_gradients" else token_group is None
            if needs_fit:
                forward_s = forward_seconds if forward_seconds is not None else _forward_seconds(model, images, target)
                fitted = _fit_budget(method, grid, budget_s, forward_s, images.shape[0])
            else:
                fitted = {}
            if method == "integrated_gradients":
                steps = n_steps if n_steps is not None else fitted["n_steps"]
                batch = fitted.get("internal_batch_size", min(steps * images.shape[0], 16))
                forward = _CountingForward(
                    model, target, math.ceil(steps * images.shape[0] / batch), progress, "integrated gradients"
                )
                maps = _integrated_gradients(forward, images, patch, steps, batch)
                settings: dict[str, Any] = {"n_steps": steps, "internal_batch_size": batch}
            else:
                group = token_group if token_group is not None else fitted["token_group"]
                if method == "feature_ablation":
                    evals = math.ceil(grid[0] / group) * math.ceil(grid[1] / group)
                    run = _feature_ablation
                else:
                    evals = _occlusion_evals(grid, group)
                    run = _occlusion
                calls = math.ceil(evals / perturbations_per_eval) + 1
                forward = _CountingForward(model, target, calls, progress, method.replace("_", " "))
                maps = run(forward, images, patch, group, perturbations_per_eval)
                settings = {
                    "token_group": group,
                    "evaluations": evals,
                    "perturbations_per_eval": perturbations_per_eval,
                }
    finally:
        model.train(was_training)
    seconds = timing.wall
    _log.info("%s attribution of %d image(s) took %.2f s (%s)", method, images.shape[0], seconds, settings)
    return Attribution(method, maps.detach().float().cpu(), seconds, settings | {"baseline": "zeros"})
