"""A per-layer record of everything an SPA model decided for a batch: what the app and notebooks draw.

``out, tr = spa_viz.trace(model, images)`` runs the model once and returns its output plus a
:class:`Trace`: for each SPA layer the gate's raw and fused scores, soft gate, keep mask, pack plan,
kept counts, backend, and compute dense vs as run (MACs; FLOPs = 2 x MACs). All tensors are on the
CPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from spa_viz.analysis.flops import LayerCost, layer_cost, static_macs
from spa_viz.layers.block import BlockDecision, find_backbone, find_context

__all__ = ["LayerTrace", "Trace", "trace", "find_backbone"]


@dataclass
class LayerTrace(BlockDecision):
    """One SPA layer's decisions for a batch of B images on a (gh, gw) token grid: the kernel's
    :class:`~spa_viz.layers.block.BlockDecision` plus what it cost (``cost``).

    ``scores`` are what selection used (a learned gate's fused logits, or a selector's scores);
    ``raw_scores`` the learned gate's own logits before fusion.
    """

    cost: LayerCost | None = None

    @property
    def soft_gate(self) -> Tensor:
        """(B, N) sigmoid of the fused scores: the factor soft gating scales kept tokens' branches by."""
        return torch.sigmoid(self.scores)

    @property
    def kept_counts(self) -> Tensor:
        """(B,) patch tokens kept per image (prefix tokens not counted)."""
        return self.keep.sum(1)

    @property
    def keep_ratio(self) -> Tensor:
        """(B,) share of patch tokens kept per image."""
        return self.kept_counts.float() / self.keep.shape[1]

    def score_map(self, image: int = 0, raw: bool = False) -> Tensor:
        """(gh, gw) selection scores (or the gate's raw logits) of one image."""
        return (self.raw_scores if raw else self.scores)[image].reshape(self.grid)

    def keep_map(self, image: int = 0) -> Tensor:
        """(gh, gw) keep mask of one image."""
        return self.keep[image].reshape(self.grid)

    @property
    def refreshed(self) -> Tensor:
        """(B, N) bool: unkept tokens that still received an update (``paper``: their own output
        projection; ``refresh``: a kept token's update, in images that kept any patch token)."""
        unkept = ~self.keep
        if self.unkept == "paper":
            return unkept
        if self.unkept == "refresh":
            return unkept & (self.kept_counts > 0)[:, None]
        return torch.zeros_like(self.keep)

    @property
    def stale(self) -> Tensor:
        """(B, N) bool: tokens this layer passed on unchanged."""
        return ~(self.keep | self.refreshed)

    def summary(self) -> dict[str, Any]:
        """JSON-ready numbers of this layer (compute in MACs and FLOPs = 2 x MACs)."""
        plan, cost = self.plan, self.cost
        return {
            "layer": self.layer,
            "grid": list(self.grid),
            "selector": self.selector,
            "fusion": self.fusion if self.learned else None,
            "fused_input": self.fused_input,
            "unkept": self.unkept,
            "threshold": self.threshold,
            "tau": self.tau,
            "soft_gating": self.soft_gating,
            "share_kept": round(float(self.keep.float().mean()), 4),
            "share_refreshed": round(float(self.refreshed.float().mean()), 4),
            "share_stale": round(float(self.stale.float().mean()), 4),
            "backend": self.backend,
            "policy": plan.policy,
            "kept_per_image": self.kept_counts.tolist(),
            "keep_ratio_per_image": [round(r, 4) for r in self.keep_ratio.tolist()],
            "rows": plan.num_rows,
            "row_len": plan.row_len,
            "fill_ratio": round(plan.fill_ratio, 4),
            "reused_plan": self.reused_plan,
            "macs_dense": cost.macs_dense,
            "macs_run": cost.macs_run,
            "macs_padding": cost.padding_macs,
            "flops_dense": cost.flops_dense,
            "flops_run": cost.flops_run,
            "saving": round(cost.saving, 4),
        }


@dataclass
class Trace:
    """Everything the SPA layers of a model decided for one batch, plus whole-backbone compute."""

    layers: list[LayerTrace]
    image_size: tuple[int, int]
    batch_size: int
    static_macs: int
    """MACs per image of the backbone parts SPA does not change (embedding, dense blocks)."""
    dense_after: bool = False
    """Whether dense blocks follow the last SPA layer (they update every token: output age 0)."""

    def token_ages(self) -> list[Tensor]:
        """Per SPA layer, (B, N) long: how many SPA layers ago each token was last updated, after that
        layer ran (0 = updated by it). Across a patch merging the oldest of the merged tokens counts."""
        ages: list[Tensor] = []
        previous: Tensor | None = None
        grid: tuple[int, int] | None = None
        for record in self.layers:
            if previous is None:
                previous = torch.zeros_like(record.keep, dtype=torch.long)
            elif tuple(record.grid) != grid:
                pooled = F.max_pool2d(previous.reshape(-1, 1, *grid).float(), kernel_size=2, stride=2, ceil_mode=True)
                previous = pooled.reshape(previous.shape[0], -1).long()
            age = torch.where(record.stale, previous + 1, 0)
            ages.append(age)
            previous, grid = age, tuple(record.grid)
        return ages

    def output_age(self, ages: list[Tensor] | None = None) -> Tensor | None:
        """(B, N_last) age of every token at the backbone output (0 everywhere when dense blocks follow),
        or None without SPA layers; ``ages``: :meth:`token_ages`, when the caller has them already."""
        if not self.layers:
            return None
        last = (self.token_ages() if ages is None else ages)[-1]
        return torch.zeros_like(last) if self.dense_after else last

    @property
    def backbone_macs_dense(self) -> int:
        """Backbone MACs of the batch with every block dense (the dense twin)."""
        return self.static_macs * self.batch_size + sum(t.cost.macs_dense for t in self.layers)

    @property
    def backbone_macs_run(self) -> int:
        """Backbone MACs of the batch as SPA ran it."""
        return self.static_macs * self.batch_size + sum(t.cost.macs_run for t in self.layers)

    @property
    def backbone_flops_dense(self) -> int:
        return 2 * self.backbone_macs_dense

    @property
    def backbone_flops_run(self) -> int:
        return 2 * self.backbone_macs_run

    @property
    def backbone_saving(self) -> float:
        """Share of the dense twin's backbone compute SPA did not spend."""
        dense = self.backbone_macs_dense
        return 1.0 - self.backbone_macs_run / dense if dense else 0.0

    @property
    def mean_keep_ratio(self) -> float:
        """Mean share of patch tokens kept, over SPA layers and images."""
        if not self.layers:
            return 1.0
        return float(torch.stack([t.keep_ratio for t in self.layers]).mean())

    def layer(self, index: int) -> LayerTrace:
        """The record of model layer ``index`` (ValueError if that layer is not an SPA layer)."""
        for record in self.layers:
            if record.layer == index:
                return record
        raise ValueError(f"layer {index} is not an SPA layer; SPA layers: {[t.layer for t in self.layers]}")

    def summary(self) -> dict[str, Any]:
        """JSON-ready summary of the whole trace (MACs = multiply-adds, the paper's "FLOPs"; FLOPs = 2 x MACs)."""
        ages = self.token_ages()
        return {
            "image_size": list(self.image_size),
            "batch_size": self.batch_size,
            "units": "macs_* count multiply-adds (the SPA and Swin papers' 'FLOPs'); flops_* = 2 x macs_*",
            "mean_keep_ratio": round(self.mean_keep_ratio, 4),
            "backbone_macs_dense": self.backbone_macs_dense,
            "backbone_macs_run": self.backbone_macs_run,
            "backbone_flops_dense": self.backbone_flops_dense,
            "backbone_flops_run": self.backbone_flops_run,
            "backbone_saving": round(self.backbone_saving, 4),
            "layers": [
                {**t.summary(), "mean_age": round(float(age.float().mean()), 4)}
                for t, age in zip(self.layers, ages, strict=True)
            ],
            "output_mean_age": None if not self.layers else round(float(self.output_age(ages).float().mean()), 4),
        }


def _layer_trace(decision: BlockDecision) -> LayerTrace:
    return LayerTrace(**vars(decision), cost=layer_cost(decision))


def _dense_after_last_spa_layer(backbone: nn.Module) -> bool:
    """Whether a dense block (no SPA) runs after the backbone's last SPA block (a ViT's dense tail)."""
    blocks = getattr(backbone, "blocks", None)
    if blocks is None:
        return False
    spa = [i for i, block in enumerate(blocks) if hasattr(block, "spa_layer")]
    return bool(spa) and spa[-1] < len(blocks) - 1


def trace(model: nn.Module, images: Tensor, *, grad: bool = False, **forward_kwargs: Any) -> tuple[Any, Trace]:
    """Run ``model(images)`` once and return its output and the per-layer SPA :class:`Trace`.

    Runs under ``torch.no_grad()`` unless ``grad=True``; the model's train/eval mode is respected.
    """
    ctx = find_context(model)
    backbone = find_backbone(model)
    ctx.records = []
    try:
        with torch.set_grad_enabled(grad):
            out = model(images, **forward_kwargs)
        decisions = ctx.records
    finally:
        ctx.records = None
    image_size = (int(images.shape[-2]), int(images.shape[-1]))
    return out, Trace(
        layers=[_layer_trace(d) for d in decisions],
        image_size=image_size,
        batch_size=int(images.shape[0]),
        static_macs=static_macs(backbone, image_size),
        dense_after=_dense_after_last_spa_layer(backbone),
    )
