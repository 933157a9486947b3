"""A per-layer record of everything an SPA model decided for a batch: what the app and notebooks draw.

``out, tr = spa_viz.trace(model, images)`` runs the model once and returns its output plus a
:class:`Trace`: for each SPA layer the fused scores, soft gate, keep mask, pack plan, kept counts,
backend, and FLOPs dense vs as run (a stale-token refresher's cost included). All tensors are on
the CPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from spa_viz.analysis.flops import LayerFlops, layer_flops, refresh_flops, static_flops
from spa_viz.layers.block import BlockDecision, find_context
from spa_viz.layers.packing import PackPlan
from spa_viz.layers.refresh import RefreshDecision

__all__ = ["LayerTrace", "Trace", "trace", "find_backbone"]


@dataclass
class LayerTrace:
    """One SPA layer's decisions for a batch of B images on a (gh, gw) token grid."""

    layer: int
    grid: tuple[int, int]
    num_prefix: int
    scores: Tensor
    keep: Tensor
    plan: PackPlan
    backend: str
    flops: LayerFlops

    @property
    def soft_gate(self) -> Tensor:
        """(B, N) sigmoid of the fused scores: the factor soft gating multiplies tokens by."""
        return torch.sigmoid(self.scores)

    @property
    def kept_counts(self) -> Tensor:
        """(B,) patch tokens kept per image (prefix tokens not counted)."""
        return self.keep.sum(1)

    @property
    def keep_ratio(self) -> Tensor:
        """(B,) share of patch tokens kept per image."""
        return self.kept_counts.float() / self.keep.shape[1]

    def score_map(self, image: int = 0) -> Tensor:
        """(gh, gw) fused logits of one image."""
        return self.scores[image].reshape(self.grid)

    def keep_map(self, image: int = 0) -> Tensor:
        """(gh, gw) keep mask of one image."""
        return self.keep[image].reshape(self.grid)

    def summary(self) -> dict[str, Any]:
        """JSON-ready numbers of this layer."""
        plan = self.plan
        return {
            "layer": self.layer,
            "grid": list(self.grid),
            "backend": self.backend,
            "policy": plan.policy,
            "kept_per_image": self.kept_counts.tolist(),
            "keep_ratio_per_image": [round(r, 4) for r in self.keep_ratio.tolist()],
            "rows": plan.num_rows,
            "row_len": plan.row_len,
            "fill_ratio": round(plan.fill_ratio, 4),
            "flops_dense": self.flops.dense,
            "flops_run": self.flops.run,
            "flops_padding": self.flops.padding,
            "flops_saving": round(self.flops.saving, 4),
        }


@dataclass
class Trace:
    """Everything the SPA layers of a model decided for one batch, plus whole-backbone FLOPs."""

    layers: list[LayerTrace]
    image_size: tuple[int, int]
    batch_size: int
    static_flops: int
    refresh: RefreshDecision | None = None
    """What the stale-token refresher ([ours]) did, when one ran."""

    @property
    def refresh_flops(self) -> int:
        """FLOPs of the stale-token refresher for the batch (0 without one); part of the run cost."""
        return 0 if self.refresh is None else int(refresh_flops(self.refresh).sum())

    @property
    def backbone_flops_dense(self) -> int:
        return self.static_flops * self.batch_size + sum(t.flops.dense for t in self.layers)

    @property
    def backbone_flops_run(self) -> int:
        return self.static_flops * self.batch_size + sum(t.flops.run for t in self.layers) + self.refresh_flops

    @property
    def backbone_saving(self) -> float:
        dense = self.backbone_flops_dense
        return 1.0 - self.backbone_flops_run / dense if dense else 0.0

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
        """JSON-ready summary of the whole trace."""
        summary = {
            "image_size": list(self.image_size),
            "batch_size": self.batch_size,
            "mean_keep_ratio": round(self.mean_keep_ratio, 4),
            "backbone_flops_dense": self.backbone_flops_dense,
            "backbone_flops_run": self.backbone_flops_run,
            "backbone_saving": round(self.backbone_saving, 4),
            "layers": [t.summary() for t in self.layers],
        }
        if self.refresh is not None:
            summary["refresh"] = {"refreshed_per_image": self.refresh.refreshed_counts.tolist(), "flops": self.refresh_flops}
        return summary


def find_backbone(model: nn.Module) -> nn.Module:
    """The module that owns the SPA context (the model itself, or e.g. a detector's backbone)."""
    ctx = find_context(model)
    for module in model.modules():
        if getattr(module, "spa_context", None) is ctx and not hasattr(module, "spa_layer"):
            return module
    raise ValueError("found SPA blocks but no backbone that owns them")


def _layer_trace(decision: BlockDecision) -> LayerTrace:
    return LayerTrace(
        layer=decision.layer,
        grid=decision.grid,
        num_prefix=decision.num_prefix,
        scores=decision.scores,
        keep=decision.keep,
        plan=decision.plan,
        backend=decision.backend,
        flops=layer_flops(decision),
    )


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
        decisions, refresh = ctx.records, ctx.refresh_record
    finally:
        ctx.records = None
    image_size = (int(images.shape[-2]), int(images.shape[-1]))
    return out, Trace(
        layers=[_layer_trace(d) for d in decisions],
        image_size=image_size,
        batch_size=int(images.shape[0]),
        static_flops=static_flops(backbone, image_size),
        refresh=refresh,
    )
