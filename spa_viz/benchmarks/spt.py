"""Benchmark on the CPU: SPT vs a dense Swin of the same depth and width.

``spa-viz bench spt [--quick] [--json PATH]``

The dense baseline is timm's own ``SwinTransformer`` (``swin_tiny_patch4_window7_224`` widths, no
pretrained weights); the SPT is :func:`spt_from_swin` of it, so both share every weight. The keep
ratio of SPA stages 3-4 is forced deterministically: each gate gets a zero weight plus a fixed logit
map (+-6) that keeps the top ``r_i`` share of a random score map, with ``r_i`` spread over the batch
around the target ratio. The stage-4 map is drawn first and stage 3 takes its 2x nearest upsampling,
so max-fusion keeps the same share in both stages.

Reported per keep ratio, for inference and for a training step (forward + backward): stage 3-4 time
and whole-backbone time (median of repeats after warm-up), analytic FLOPs (those ``spa_viz.trace``
reports, Swin window attention as dense), and the realized fraction
``(dense time / SPA time) / (dense FLOPs / SPA FLOPs)`` (1.0 = the FLOP saving fully turns into time).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
from collections.abc import Callable
from typing import Any

import timm
import torch
from torch import Tensor, nn

from spa_viz.analysis.trace import trace
from spa_viz.io.timer import time_paired
from spa_viz.models.spt import SPT, SPTBlock, spt_from_swin
from spa_viz.viz.tables import markdown_table

_log = logging.getLogger(__name__)

QUICK_RATIOS = (0.1, 0.3, 0.5, 0.9)
FULL_RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
_LOGIT = 6.0


class FixedGate(nn.Module):
    """A gate with fixed per-token logits: a zero-weight C -> 1 linear (so its cost is counted) plus a map."""

    def __init__(self, dim: int, logits: Tensor) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)
        self.register_buffer("logits", logits)

    learned = True
    name = "fixed"

    @property
    def macs_per_token(self) -> int:
        return self.proj.weight.numel()

    def forward(self, tokens: Tensor, num_prefix: int = 0) -> Tensor:
        return self.proj(tokens).squeeze(-1)[:, num_prefix:] + self.logits


def keep_maps(
    batch: int, grid4: tuple[int, int], grid3: tuple[int, int], ratio: float, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """Fixed keep logits (B, N) for stage 4 and stage 3; image i keeps about ``ratio +- 0.1`` of its tokens."""
    generator = torch.Generator().manual_seed(seed)
    spread = max(0.0, min(0.1, ratio - 0.05, 0.95 - ratio))
    ratios = torch.linspace(ratio - spread, ratio + spread, batch) if batch > 1 else torch.tensor([ratio])
    scores = torch.rand(batch, grid4[0] * grid4[1], generator=generator)
    tokens = scores.shape[1]
    counts = (ratios * tokens).round().clamp(1, tokens).long()
    rank = scores.argsort(1, descending=True).argsort(1)
    keep4 = rank < counts[:, None]
    up = keep4.view(batch, *grid4).repeat_interleave(2, 1).repeat_interleave(2, 2)[:, : grid3[0], : grid3[1]]

    def logits(keep: Tensor) -> Tensor:
        return torch.where(keep, _LOGIT, -_LOGIT).reshape(batch, -1).float()

    return logits(keep4), logits(up)


def force_keep_ratio(spt: SPT, batch: int, image_size: tuple[int, int], ratio: float) -> None:
    """Give every SPA block of ``spt`` (stages 3-4) a :class:`FixedGate` keeping about ``ratio``."""
    patch = spt.config.patch_size
    grids = [(image_size[0] // patch, image_size[1] // patch)]
    for _ in spt.layers[1:]:
        grids.append((-(-grids[-1][0] // 2), -(-grids[-1][1] // 2)))
    stage3, stage4 = grids[-2], grids[-1]
    logits4, logits3 = keep_maps(batch, stage4, stage3, ratio)
    for stage, logits in ((spt.layers[-2], logits3), (spt.layers[-1], logits4)):
        for block in stage.blocks:
            if not isinstance(block, SPTBlock):
                raise ValueError("the benchmark needs SPA in stages 3-4 (spa_start_stage <= 3)")
            block.gate = FixedGate(block.gate.proj.in_features, logits.clone())


def _late_stages(model: nn.Module, features: Tensor) -> Tensor:
    """Stages 3-4 of a Swin or SPT on stage-2 features (SPA state reset first)."""
    ctx = getattr(model, "spa_context", None)
    if ctx is not None:
        ctx.begin(tuple(features.shape[1:3]))
    return model.layers[2:](features)


def _train_step(model: nn.Module, forward: Callable[[], Tensor]) -> Callable[[], None]:
    def step() -> None:
        model.zero_grad(set_to_none=True)
        forward().float().mean().backward()

    return step


def _timings(
    models: dict[str, nn.Module], images: Tensor, features: Tensor, repeats: int, warmup: int
) -> dict[str, float]:
    """``{model}_{infer|train}_{late|all}`` times (ms): stages 3-4 and the whole backbone."""
    out: dict[str, float] = {}
    for mode in ("infer", "train"):
        for model in models.values():
            model.train(mode == "train")
        for part in ("late", "all"):
            fns = {}
            for name, model in models.items():
                forward = (
                    (lambda m=model: _late_stages(m, features))
                    if part == "late"
                    else (lambda m=model: m.forward_features(images))
                )
                fns[name] = _train_step(model, forward) if mode == "train" else forward
            with torch.set_grad_enabled(mode == "train"):
                measured = time_paired(fns, repeats, warmup).medians
            out.update({f"{name}_{mode}_{part}": 1000 * t for name, t in measured.items()})
    for model in models.values():
        model.eval()
    return out


def _flops(spt: SPT, images: Tensor) -> dict[str, float]:
    """Analytic FLOPs (dense Swin vs SPA as run) of stages 3-4 and of the backbone, plus kept shares."""
    spt.eval()
    _, tr = trace(spt, images)
    late = tr.layers  # SPA runs in stages 3-4 only
    stage3 = [t for t in late if t.grid == late[0].grid]
    stage4 = [t for t in late if t.grid == late[-1].grid]
    merging = 0
    height, width = (s // spt.config.patch_size for s in images.shape[-2:])
    for i, stage in enumerate(spt.layers):
        if i > 0:
            height, width = -(-height // 2), -(-width // 2)
            if i >= len(spt.layers) - 2:
                merging += 2 * height * width * stage.downsample.reduction.weight.numel() * images.shape[0]
    return {
        "late_dense": merging + sum(t.cost.flops_dense for t in late),
        "late_run": merging + sum(t.cost.flops_run for t in late),
        "all_dense": tr.backbone_flops_dense,
        "all_run": tr.backbone_flops_run,
        "keep_stage3": float(torch.cat([t.keep_ratio for t in stage3]).mean()),
        "keep_stage4": float(torch.cat([t.keep_ratio for t in stage4]).mean()),
        "fill": statistics.mean(t.plan.fill_ratio for t in late),
    }


def run(
    quick: bool,
    batch: int | None = None,
    size: int = 224,
    repeats: int | None = None,
    threads: int | None = None,
    ratios: tuple[float, ...] | None = None,
) -> dict[str, Any]:
    """Run the benchmark and return every number (times in ms, FLOPs per batch)."""
    torch.manual_seed(0)
    torch.set_num_threads(threads or len(os.sched_getaffinity(0)))
    batch = batch or (8 if quick else 16)
    repeats = repeats or (3 if quick else 5)
    warmup = 1 if quick else 2
    ratios = ratios or (QUICK_RATIOS if quick else FULL_RATIOS)
    if not all(0.0 < r <= 1.0 for r in ratios):
        raise ValueError(f"keep ratios must lie in (0, 1], got {ratios}")
    paired = not quick
    swin = timm.create_model(
        "swin_tiny_patch4_window7_224", pretrained=False, num_classes=0, img_size=size, drop_path_rate=0.0
    ).eval()
    images = torch.randn(batch, 3, size, size)
    with torch.no_grad():
        features = swin.layers[:2](swin.patch_embed(images))
    _log.info("SPT-T vs dense Swin-T (timm), batch %d at %d px, %d threads", batch, size, torch.get_num_threads())
    # full runs re-time the dense Swin beside every SPT (alternating runs); quick runs time it once
    dense = {} if paired else _timings({"dense": swin}, images, features, repeats, warmup)
    results = []
    for ratio in ratios:
        spt = spt_from_swin(swin, drop_path_rate=0.0)
        force_keep_ratio(spt, batch, (size, size), ratio)
        _log.info("keep %.1f", ratio)
        models = {"dense": swin, "spa": spt} if paired else {"spa": spt}
        times = {**dense, **_timings(models, images, features, repeats, warmup)}
        row: dict[str, Any] = {"ratio": ratio, **_flops(spt, images), **{f"{k}_ms": v for k, v in times.items()}}
        for part in ("late", "all"):
            flop_gain = row[f"{part}_dense"] / row[f"{part}_run"]
            for mode in ("infer", "train"):
                speedup = row[f"dense_{mode}_{part}_ms"] / row[f"spa_{mode}_{part}_ms"]
                row[f"{mode}_{part}_speedup"] = speedup
                row[f"{mode}_{part}_realized"] = speedup / flop_gain
        results.append(row)
    return {
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "batch": batch,
        "image_size": size,
        "repeats": repeats,
        "warmup": warmup,
        "paired": paired,
        "baseline": "timm SwinTransformer swin_tiny_patch4_window7_224 (dense windows), same weights",
        "rows": results,
    }


def markdown(report: dict[str, Any]) -> str:
    """The results as a markdown table (times in ms: dense Swin / SPT; realized fraction in brackets)."""
    title = (
        f"SPT-T vs dense Swin-T (timm), batch {report['batch']} at {report['image_size']} px, "
        f"{report['threads']} threads, median of {report['repeats']} "
        + ("(dense and SPT runs alternate)" if report["paired"] else "(dense timed once)")
    )
    header = [
        "keep s3/s4",
        "fill",
        "s3-4 GFLOPs dense/SPA",
        "s3-4 infer ms",
        "s3-4 train ms",
        "backbone GFLOPs dense/SPA",
        "backbone infer ms",
        "backbone train ms",
    ]

    def cell(r: dict[str, Any], key: str) -> str:
        return (
            f"{r[f'dense_{key}_ms']:.0f} / {r[f'spa_{key}_ms']:.0f} = "
            f"{r[f'{key}_speedup']:.2f}x ({r[f'{key}_realized']:.2f})"
        )

    rows = [
        [
            f"{r['keep_stage3']:.2f}/{r['keep_stage4']:.2f}",
            f"{r['fill']:.2f}",
            f"{r['late_dense'] / 1e9:.1f} / {r['late_run'] / 1e9:.1f}",
            cell(r, "infer_late"),
            cell(r, "train_late"),
            f"{r['all_dense'] / 1e9:.1f} / {r['all_run'] / 1e9:.1f}",
            cell(r, "infer_all"),
            cell(r, "train_all"),
        ]
        for r in report["rows"]
    ]
    return f"{title}\n\n{markdown_table(header, rows)}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="spa-viz bench spt", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="4 keep ratios, batch 8, 3 repeats, dense timed once (< 3 min on 2 cores)"
    )
    parser.add_argument("--json", metavar="PATH", help="also write all numbers to this JSON file")
    parser.add_argument("--batch", type=int, help="images per batch (default 16, quick 8)")
    parser.add_argument("--size", type=int, default=224, help="image side in pixels (default 224)")
    parser.add_argument("--repeats", type=int, help="timed repeats per measurement (default 5, quick 3)")
    parser.add_argument("--threads", type=int, help="torch threads (default: all cores)")
    parser.add_argument("--ratios", type=float, nargs="+", help="keep ratios of stages 3-4 (default 0.1 ... 0.9)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    report = run(args.quick, args.batch, args.size, args.repeats, args.threads, tuple(args.ratios or ()))
    print(markdown(report))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(report, handle, indent=2)


if __name__ == "__main__":
    main()
