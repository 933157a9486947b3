"""Measurements shared by the detection evaluations (CenterNet and Mask R-CNN): selection quality and
compute pooled over traced batches, and wall-clock of SPA against its dense twin (:mod:`spa_viz.io.timer`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from spa_viz.analysis.metrics import SelectionCounts
from spa_viz.analysis.trace import Trace
from spa_viz.io.timer import PairedTiming, time_paired
from spa_viz.layers.block import find_context
from spa_viz.models.twin import dense_twin

__all__ = ["latency_record", "measure_latency", "pooled_selection", "selection_rows", "spa_on"]


def spa_on(model: nn.Module) -> bool:
    """Whether ``model`` has SPA blocks and they are enabled."""
    try:
        return find_context(model).config.enabled
    except ValueError:
        return False


def pooled_selection(entries: Sequence[tuple[Trace, Mapping[tuple[int, int], Tensor]]]) -> dict[str, Any]:
    """Selection quality and compute of traced batches, each with its selection labels per token grid.

    Per SPA layer: keep ratio, label share, precision / recall / IoU of the keep mask against the labels,
    and the IoU of its keep mask with the previous SPA layer's on the same grid (1.0: it copied it), pooled
    over all batches (:class:`SelectionCounts` summed); the per-image keep ratio's mean and
    quantiles; backbone GMACs per image dense vs as run, and the MAC saving.
    """
    per_layer: dict[int, SelectionCounts] = {}
    agreement: dict[int, SelectionCounts] = {}
    per_image_keep: list[Tensor] = []
    macs_dense = macs_run = images = 0
    for tr, labels in entries:
        ratios = []
        previous = None
        for layer in tr.layers:
            pooled = SelectionCounts.of(layer.keep, labels[tuple(layer.grid)].bool()).pooled()
            per_layer[layer.layer] = per_layer[layer.layer] + pooled if layer.layer in per_layer else pooled
            if previous is not None and previous.grid == layer.grid:
                same = SelectionCounts.of(layer.keep, previous.keep).pooled()
                agreement[layer.layer] = agreement[layer.layer] + same if layer.layer in agreement else same
            previous = layer
            ratios.append(layer.keep_ratio)
        if ratios:
            per_image_keep.append(torch.stack(ratios).mean(0))
        macs_dense += tr.backbone_macs_dense
        macs_run += tr.backbone_macs_run
        images += tr.batch_size
    layers = {
        str(layer): {
            "keep_ratio": int(c.kept) / int(c.tokens),
            "label_ratio": int(c.positives) / int(c.tokens),
            "precision": float(c.precision),
            "recall": float(c.recall),
            "iou": float(c.iou),
            "iou_with_previous_layer": float(agreement[layer].iou) if layer in agreement else None,
        }
        for layer, c in sorted(per_layer.items())
    }
    keep = torch.cat(per_image_keep) if per_image_keep else torch.ones(1)
    quantiles = torch.quantile(keep, torch.tensor([0.1, 0.5, 0.9])).tolist()
    return {
        "keep_ratio": {"mean": float(keep.mean()), "p10": quantiles[0], "p50": quantiles[1], "p90": quantiles[2]},
        "layers": layers,
        "backbone_gmacs_dense": macs_dense / max(images, 1) / 1e9,
        "backbone_gmacs_run": macs_run / max(images, 1) / 1e9,
        "mac_saving": 1.0 - macs_run / macs_dense if macs_dense else 0.0,
    }


def selection_rows(result: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The summary rows every detection evaluation shares: keep ratio, backbone MACs, wall-clock and the
    per-layer selection quality (with the IoU of each layer's keep mask with the layer before)."""
    rows = [
        ("keep ratio mean (p10/p50/p90)", "{mean:.3f} ({p10:.3f}/{p50:.3f}/{p90:.3f})".format(**result["keep_ratio"])),
        (
            "backbone GMACs/image dense -> run (multiply-adds; GFLOPs = 2x)",
            f"{result['backbone_gmacs_dense']:.4f} -> {result['backbone_gmacs_run']:.4f}",
        ),
        ("MAC saving", f"{100 * result['mac_saving']:.1f}%"),
    ]
    latency = result.get("latency")
    if latency:
        spa = latency.get("spa_ms_per_image")
        rows.append(
            (
                f"ms/image dense / SPA ({latency['device']}, batch {latency['batch']}, {latency['threads']} threads)",
                f"{latency['dense_ms_per_image']:.2f} / " + (f"{spa:.2f}" if spa else "-"),
            )
        )
    for layer, stats in result.get("layers", {}).items():
        same = stats.get("iou_with_previous_layer")
        rows.append(
            (
                f"layer {layer} keep/P/R/IoU (IoU with the layer before)",
                "{keep_ratio:.3f} / {precision:.3f} / {recall:.3f} / {iou:.3f}".format(**stats)
                + ("" if same is None else f" ({same:.3f})"),
            )
        )
    return rows


def measure_latency(model: nn.Module, images: Tensor | Sequence[Tensor], repeats: int = 5) -> PairedTiming:
    """:func:`~spa_viz.io.timer.time_paired` of ``model(images)`` in eval mode: its dense twin (the
    baseline) and SPA (when on) alternating after one warm-up round. ``images``: a batch tensor, or a
    list of (3, H, W) images for models that take lists (torchvision's R-CNNs)."""
    model.eval()

    def dense() -> None:
        with dense_twin(model):
            model(images)

    work = {"dense": dense}
    if spa_on(model):
        work["spa"] = lambda: model(images)
    with torch.no_grad():
        return time_paired(work, repeats, warmup=1, device=next(model.parameters()).device)


def latency_record(model: nn.Module, images: Tensor | Sequence[Tensor], repeats: int = 5) -> dict[str, Any]:
    """:func:`measure_latency` as stored under ``latency`` in metrics.json: how it was measured (batch,
    threads, device, repeats), median milliseconds per image of the dense twin and SPA, and the speed-up."""
    timing = measure_latency(model, images, repeats)
    batch = images.shape[0] if isinstance(images, Tensor) else len(images)
    record: dict[str, Any] = {
        "batch": batch,
        "threads": timing.threads,
        "device": timing.device,
        "repeats": timing.repeats,
        "dense_ms_per_image": 1000.0 * timing.median("dense") / batch,
    }
    if "spa" in timing.runs:
        record["spa_ms_per_image"] = 1000.0 * timing.median("spa") / batch
        record["speedup"] = 1.0 / timing.ratio("spa")
    return record
