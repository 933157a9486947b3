"""Whole-backbone benchmark of shipped SPA checkpoints against their dense twins, at the batch sizes the
app runs (1 and 4) and at batch 32.

For each checkpoint the backbone's ``forward_features`` runs on real test images, SPA and its dense
twin (the same weights with SPA disabled) alternating in one loop, so machine load hits both alike;
the median of ``repeats`` runs is taken for each. The MAC ratio comes from one trace of the same
images (``backbone_macs_dense / backbone_macs_run``), and the realized fraction is
``(dense time / SPA time) / MAC ratio``: 1.0 means the time saving equals the compute saving.

At batch 1 every image of the batch-4 set runs on its own (round robin over the images, SPA and
dense alternating); the speed-up and MAC ratio are those of the four images together.
"""

from __future__ import annotations

import logging
import platform
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from spa_viz.analysis.trace import find_backbone, trace
from spa_viz.io.timer import median_seconds
from spa_viz.layers.block import find_context
from spa_viz.models.twin import dense_twin

__all__ = ["BackboneResult", "TARGETS", "bench_backbone", "environment", "format_backbone_table"]

_log = logging.getLogger(__name__)

TARGETS: dict[str, dict[int, float]] = {"spa-vit-digits": {1: 0.8, 4: 0.85, 32: 0.9}}
"""Realized-fraction targets per checkpoint and batch size (issue 11); SPT's target is a speed-up > 1
at batch 1 whenever it saves at least 15% of the backbone's MACs."""


@dataclass(frozen=True)
class BackboneResult:
    """One checkpoint at one batch size: median milliseconds per batch, MACs, and their ratios."""

    checkpoint: str
    batch: int
    dense_ms: float
    spa_ms: float
    macs_dense: int
    macs_run: int
    keep_ratio: float
    repeats: int

    @property
    def speedup(self) -> float:
        return self.dense_ms / self.spa_ms

    @property
    def mac_ratio(self) -> float:
        return self.macs_dense / self.macs_run

    @property
    def mac_saving(self) -> float:
        return 1.0 - self.macs_run / self.macs_dense

    @property
    def realized(self) -> float:
        return self.speedup / self.mac_ratio

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "speedup": round(self.speedup, 4),
            "mac_ratio": round(self.mac_ratio, 4),
            "mac_saving": round(self.mac_saving, 4),
            "realized": round(self.realized, 4),
        }


def _forward(backbone: nn.Module, images: Tensor, dense: bool) -> Callable[[], Any]:
    """``forward_features`` of ``images`` without autograd, as SPA or as the dense twin."""

    def run() -> Any:
        with torch.inference_mode():
            if not dense:
                return backbone.forward_features(images)
            with dense_twin(backbone):
                return backbone.forward_features(images)

    return run


def bench_backbone(
    name: str,
    model: nn.Module,
    images: Tensor,
    batches: Sequence[int] = (1, 4, 32),
    repeats: int = 40,
) -> list[BackboneResult]:
    """Time the SPA backbone of ``model`` against its dense twin on ``images`` (at least max(batches)).

    Batch 1 runs each of the first four images alone (round robin); batch b > 1 runs the first b images.
    """
    backbone = find_backbone(model).eval()
    config = find_context(backbone).config
    if not config.enabled:
        raise ValueError(f"{name}: SPA is disabled in this model; benchmark an SPA checkpoint against its twin")
    if images.shape[0] < max(batches):
        raise ValueError(f"need {max(batches)} images for batch {max(batches)}, got {images.shape[0]}")
    results = []
    for batch in batches:
        groups = [images[i : i + 1] for i in range(min(4, images.shape[0]))] if batch == 1 else [images[:batch]]
        spa_total = dense_total = 0.0
        macs_dense = macs_run = 0
        kept = []
        for group in groups:
            _, tr = trace(backbone, group)
            macs_dense += tr.backbone_macs_dense
            macs_run += tr.backbone_macs_run
            kept.append(tr.mean_keep_ratio)
            seconds = median_seconds(
                {"spa": _forward(backbone, group, False), "dense": _forward(backbone, group, True)}, repeats, warmup=3
            )
            spa_total += seconds["spa"]
            dense_total += seconds["dense"]
        result = BackboneResult(
            name, batch, 1e3 * dense_total, 1e3 * spa_total, macs_dense, macs_run, statistics.fmean(kept), repeats
        )
        _log.info(
            "%s batch %d: dense %.2f ms, SPA %.2f ms, speed-up %.2fx, MAC ratio %.2fx, realized %.2f",
            name, batch, result.dense_ms, result.spa_ms, result.speedup, result.mac_ratio, result.realized,
        )
        results.append(result)
    return results


def environment(threads: int) -> dict[str, Any]:
    """What the numbers were measured on."""
    return {
        "torch": torch.__version__,
        "threads": threads,
        "clock": "wall (median of alternating runs)",
        "device": "cpu",
        "processor": platform.processor() or platform.machine(),
    }


def format_backbone_table(results: Sequence[BackboneResult]) -> str:
    """A markdown table of the results, with the issue's targets where one applies."""
    lines = [
        "| checkpoint | batch | keep | MACs saved | dense ms | SPA ms | speed-up | MAC ratio | realized | target |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        target = TARGETS.get(r.checkpoint, {}).get(r.batch)
        if target is not None:
            verdict = f">= {target}: {'met' if r.realized >= target else 'MISSED'}"
        elif r.checkpoint.startswith("spt") and r.batch == 1 and r.mac_saving >= 0.15:
            verdict = f"faster than dense: {'met' if r.speedup > 1 else 'MISSED'}"
        else:
            verdict = "-"
        lines.append(
            f"| {r.checkpoint} | {r.batch} | {r.keep_ratio:.1%} | {r.mac_saving:.1%} | {r.dense_ms:.2f} | "
            f"{r.spa_ms:.2f} | {r.speedup:.2f}x | {r.mac_ratio:.2f}x | {r.realized:.2f} | {verdict} |"
        )
    return "\n".join(lines)
