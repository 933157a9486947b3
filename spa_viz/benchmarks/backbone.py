"""Whole-backbone benchmark of shipped SPA checkpoints against their dense twins, at the batch sizes the
app runs (1 and 4) and at batch 32.

For each checkpoint the backbone's ``forward_features`` runs on real test images, SPA and its dense
twin (the same weights with SPA disabled) alternating in one loop, so machine load hits both alike;
the median of ``repeats`` runs is taken for each. The MAC ratio comes from one trace of the same
images (``backbone_macs_dense / backbone_macs_run``), and the realized fraction is
``(dense time / SPA time) / MAC ratio``: 1.0 means the time saving equals the compute saving.

At batch 1 every image of the batch-4 set runs on its own (round robin over the images, SPA and
dense alternating); the speed-up and MAC ratio are those of the four images together.

For SPA-ViT at batch 1 the benchmark also times the *ideal* SPA: the dense time minus, for every SPA
block, (its dense time on all tokens - its dense time on just the tokens SPA kept), measured on the
block's real inputs. That is what SPA would cost with zero selection and packing overhead; the gap
to it is the kernel's overhead, and the ideal's own realized fraction shows how much of the MAC
saving the hardware can turn into time for so few tokens (small matrix products are slower per MAC).
"""

from __future__ import annotations

import logging
import platform
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from spa_viz.analysis.trace import find_backbone, trace
from spa_viz.io.timer import median_seconds
from spa_viz.layers.block import find_context
from spa_viz.models.twin import dense_twin

__all__ = [
    "SHIPPED",
    "TARGETS",
    "BackboneResult",
    "bench_backbone",
    "bench_checkpoints",
    "environment",
    "format_backbone_table",
    "test_images",
]

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
    ideal_spa_ms: float | None = None

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

    @property
    def ideal_realized(self) -> float | None:
        """Realized fraction of the zero-overhead SPA (None where it was not measured)."""
        return None if self.ideal_spa_ms is None else self.dense_ms / self.ideal_spa_ms / self.mac_ratio

    def to_dict(self) -> dict[str, Any]:
        ideal = self.ideal_realized
        return {
            **asdict(self),
            "speedup": round(self.speedup, 4),
            "mac_ratio": round(self.mac_ratio, 4),
            "mac_saving": round(self.mac_saving, 4),
            "realized": round(self.realized, 4),
            "ideal_realized": None if ideal is None else round(ideal, 4),
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


def _dense_block_savings(backbone: nn.Module, image: Tensor, repeats: int) -> float | None:
    """Seconds the SPA blocks of a ViT would save on one image with zero overhead: per block, dense time
    on all its input tokens minus dense time on the tokens SPA kept (None for non-ViT backbones)."""
    if not hasattr(backbone, "blocks"):
        return None
    blocks = [b for b in backbone.blocks if hasattr(b, "spa_layer")]
    inputs: dict[int, Tensor] = {}
    hooks = [b.register_forward_pre_hook(lambda m, args: inputs.__setitem__(m.spa_layer, args[0])) for b in blocks]
    try:
        _, tr = trace(backbone, image)
    finally:
        for hook in hooks:
            hook.remove()
    prefix = find_context(backbone).num_prefix
    saved = 0.0
    with dense_twin(backbone), torch.inference_mode():
        for block, record in zip(blocks, tr.layers, strict=True):
            x = inputs[block.spa_layer]
            kept = torch.cat([torch.arange(prefix), record.keep[0].nonzero().squeeze(1) + prefix]).to(x.device)
            x_kept = x[:, kept]
            seconds = median_seconds({"all": partial(block, x), "kept": partial(block, x_kept)}, repeats, warmup=3)
            saved += seconds["all"] - seconds["kept"]
    return saved


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
        ideal_saved: float | None = 0.0 if batch == 1 else None
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
            if ideal_saved is not None:
                saved = _dense_block_savings(backbone, group, repeats)
                ideal_saved = None if saved is None else ideal_saved + saved
        ideal_ms = None if ideal_saved is None else 1e3 * (dense_total - ideal_saved)
        result = BackboneResult(
            name,
            batch,
            1e3 * dense_total,
            1e3 * spa_total,
            macs_dense,
            macs_run,
            statistics.fmean(kept),
            repeats,
            ideal_ms,
        )
        _log.info(
            "%s batch %d: dense %.2f ms, SPA %.2f ms, speed-up %.2fx, MAC ratio %.2fx, realized %.2f",
            name,
            batch,
            result.dense_ms,
            result.spa_ms,
            result.speedup,
            result.mac_ratio,
            result.realized,
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
        "| checkpoint | batch | keep | MACs saved | dense ms | SPA ms | speed-up | MAC ratio | realized "
        "| zero-overhead SPA ms (realized) | target |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        target = TARGETS.get(r.checkpoint, {}).get(r.batch)
        if target is not None:
            verdict = f">= {target}: {'met' if r.realized >= target else 'MISSED'}"
        elif r.checkpoint.startswith("spt") and r.batch == 1 and r.mac_saving >= 0.15:
            verdict = f"faster than dense: {'met' if r.speedup > 1 else 'MISSED'}"
        else:
            verdict = "-"
        ideal = "-" if r.ideal_spa_ms is None else f"{r.ideal_spa_ms:.2f} ({r.ideal_realized:.2f})"
        lines.append(
            f"| {r.checkpoint} | {r.batch} | {r.keep_ratio:.1%} | {r.mac_saving:.1%} | {r.dense_ms:.2f} | "
            f"{r.spa_ms:.2f} | {r.speedup:.2f}x | {r.mac_ratio:.2f}x | {r.realized:.2f} | {ideal} | {verdict} |"
        )
    return "\n".join(lines)


SHIPPED = ("spa-vit-digits", "spt-digits")
"""The shipped SPA checkpoints whose backbones the benchmark times by default."""


def test_images(model: nn.Module, count: int = 32) -> Tensor:
    """The first ``count`` images of the test split of a detection checkpoint, as the model sees them."""
    from spa_viz.data.coco import collate
    from spa_viz.data.splits import data_config, load_split
    from spa_viz.io.checkpoint import checkpoint_config

    config = checkpoint_config(model)
    dataset = load_split(data_config(config["data"]), "test", int(config["image_size"]), num=count)
    images, _ = collate([dataset[i] for i in range(min(count, len(dataset)))])
    return images


def bench_checkpoints(names: Sequence[str], repeats: int) -> list[BackboneResult]:
    """:func:`bench_backbone` of each named checkpoint on its own test images (1 torch thread is the caller's call)."""
    from spa_viz.models.zoo import load

    results = []
    for name in names:
        model = load(name).eval()
        results += bench_backbone(name, model, test_images(model), repeats=repeats)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: ``spa-viz bench backbone [CHECKPOINT ...] [--repeats N] [--json PATH]`` (1 torch thread)."""
    import argparse
    import json

    parser = argparse.ArgumentParser(prog="spa-viz bench backbone", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoints", nargs="*", default=list(SHIPPED), help=f"default: {' '.join(SHIPPED)}")
    parser.add_argument("--repeats", type=int, default=40, help="timed runs of SPA and of the dense twin each")
    parser.add_argument("--json", metavar="PATH", help="also write the results here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    torch.set_num_threads(1)
    results = bench_checkpoints(args.checkpoints, args.repeats)
    print(format_backbone_table(results))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"environment": environment(1), "results": [r.to_dict() for r in results]}, handle, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
