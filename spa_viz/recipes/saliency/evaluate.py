"""Score the real-photo SPA model and the training-free selectors on the held-out photos.

``python -m spa_viz.evaluate_saliency [--out results.json]`` loads ``spa-dinov2-s14-saliency`` and,
on every held-out photo (:data:`spa_viz.data.photos.HELD_OUT`, batch 1), compares each token
selection with the dense teacher's selection labels (precision / recall / IoU of the keep mask per
SPA layer), and the SPA model's saliency map with the dense model's (MAE), and reports the backbone
FLOP saving and CPU latency. The dense teacher is the same model with SPA disabled.

Selectors are scored twice: at *equal keep ratio* (each selector keeps, per photo and SPA layer,
exactly as many tokens as the learned gate did) and at their own defaults. When the model has a
stale-token refresher ([ours], :mod:`spa_viz.layers.refresh`), every row runs with it and the learned
gate and the label oracle are also scored without it.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from spa_viz.analysis.trace import trace
from spa_viz.data.photos import HELD_OUT, load_photo
from spa_viz.models.img_focus import preprocess_image
from spa_viz.models.spa_vit import configure, spa_context
from spa_viz.models.zoo import load
from spa_viz.layers.config import SPAConfig
from spa_viz.selection.selectors import SELECTORS, TokenSelector, install_selector, remove_selector, top_counts_mask

__all__ = [
    "CHECKPOINT",
    "LABEL_REDUCE",
    "LABEL_THRESHOLD",
    "LabelOracle",
    "dense",
    "evaluate",
    "has_refresh",
    "without_refresh",
    "evaluate_selection",
    "held_out_batch",
    "latency",
    "markdown_table",
    "saliency_labels",
    "teacher_saliency",
    "threshold_sweep",
    "main",
]

log = logging.getLogger(__name__)

CHECKPOINT = "spa-dinov2-s14-saliency"
#: A token is salient when the teacher's saliency somewhere in its 14x14 patch exceeds 0.5: the
#: max (not the mean) favours recall, as the paper does for its selection labels (any object pixel).
LABEL_THRESHOLD = 0.5
LABEL_REDUCE = "max"


def saliency_labels(
    saliency: Tensor, patch: int = 14, threshold: float = LABEL_THRESHOLD, reduce: str = LABEL_REDUCE
) -> Tensor:
    """(B, gh*gw) bool token labels from (B, 1, H, W) saliency: max (or mean) over a patch > threshold."""
    if reduce not in ("max", "mean"):
        raise ValueError(f"reduce must be 'max' or 'mean', got {reduce!r}")
    pool = F.max_pool2d if reduce == "max" else F.avg_pool2d
    return (pool(saliency.float(), patch) > threshold).flatten(1)


@contextmanager
def dense(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` as its dense twin (SPA disabled) inside the block, then restore the setting."""
    config = spa_context(model).config
    was = config.enabled
    configure(model, enabled=False)
    try:
        yield model
    finally:
        configure(model, enabled=was)


def has_refresh(model: nn.Module) -> bool:
    """Whether ``model``'s SPA backbone runs a stale-token refresher."""
    return spa_context(model).refresh is not None


@contextmanager
def without_refresh(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` without its stale-token refresher inside the block (plain SPA), then restore it."""
    ctx = spa_context(model)
    saved = ctx.refresh
    ctx.refresh = None
    try:
        yield model
    finally:
        ctx.refresh = saved


def teacher_saliency(model: nn.Module, images: Tensor) -> Tensor:
    """(B, 1, H, W) saliency of the dense twin of ``model``."""
    with dense(model), torch.inference_mode():
        return model(images)


def held_out_batch(names: Sequence[str] = HELD_OUT) -> Tensor:
    """(B, 3, 224, 224) normalized held-out photos."""
    return torch.stack([preprocess_image(load_photo(name)) for name in names])


class LabelOracle(TokenSelector):
    """Diagnostic, not a baseline: keeps exactly the teacher-labelled tokens in every SPA layer.

    It shows the saliency error of a perfect label-following selection, given that unkept tokens
    pass unchanged (SPA's rule).
    """

    name = "label_oracle"
    default_params: dict[str, Any] = {}

    def __init__(self, block: nn.Module, labels: Tensor) -> None:
        super().__init__(block, ratio=1.0)
        object.__setattr__(self, "labels", labels)

    def scores(self, patch_tokens: Tensor, prefix_tokens: Tensor) -> Tensor:
        return self.labels.to(device=patch_tokens.device, dtype=patch_tokens.dtype)

    def select(self, scores: Tensor, config: SPAConfig) -> Tensor:
        return top_counts_mask(scores, (scores > 0).sum(1).clamp(min=min(config.min_keep, scores.shape[1])))


def evaluate_selection(model: nn.Module, image: Tensor, teacher: Tensor, labels: Tensor) -> dict[str, Any]:
    """Metrics of whatever gate or selector ``model`` runs, on one image (1, 3, H, W)."""
    with torch.inference_mode():
        out, tr = trace(model, image)
    keep = torch.stack([layer.keep[0] for layer in tr.layers])  # (layers, N)
    target = labels.reshape(1, -1).expand_as(keep)
    hits = (keep & target).sum(1).float()
    precision = hits / keep.sum(1).clamp(min=1)
    recall = torch.where(target.sum(1) > 0, hits / target.sum(1).clamp(min=1), 1.0)
    iou = torch.where((keep | target).sum(1) > 0, hits / (keep | target).sum(1).clamp(min=1), 1.0)
    return {
        "keep_ratio": tr.mean_keep_ratio,
        "keep_ratio_per_layer": {str(t.layer): float(t.keep_ratio[0]) for t in tr.layers},
        "kept_per_layer": [int(t.kept_counts[0]) for t in tr.layers],
        "saliency_mae": float((out.float() - teacher.float()).abs().mean()),
        "backbone_saving": 1.0 - tr.backbone_flops_run / tr.backbone_flops_dense,
        "precision": float(precision.mean()),
        "recall": float(recall.mean()),
        "iou": float(iou.mean()),
    }


_AVERAGED = ("keep_ratio", "saliency_mae", "backbone_saving", "precision", "recall", "iou")


def _summarize(per_photo: dict[str, dict[str, Any]]) -> dict[str, Any]:
    means = {k: statistics.fmean(p[k] for p in per_photo.values()) for k in _AVERAGED}
    return {**means, "per_photo": per_photo}


def _run_selector(
    model: nn.Module, name: str | type[TokenSelector], images: Tensor, teachers: Tensor, labels: Tensor, names: Sequence[str],
    matched: dict[str, dict[str, Any]] | None,
) -> dict[str, Any]:
    """Metrics of selector ``name``: at its defaults, or with the learned gate's counts (``matched``)."""
    per_photo = {}
    try:
        for i, photo in enumerate(names):
            params = {"labels": labels[i : i + 1]} if name is LabelOracle else {}
            selectors = install_selector(model, name, **params)
            if matched is not None:
                for selector, kept in zip(selectors, matched[photo]["kept_per_layer"]):
                    selector.ratio, selector.p = kept / labels.shape[1], None
            per_photo[photo] = evaluate_selection(model, images[i : i + 1], teachers[i : i + 1], labels[i : i + 1])
    finally:
        remove_selector(model)
    return _summarize(per_photo)


def latency(model: nn.Module, images: Tensor, batch_sizes: Sequence[int] = (1, 8), repeats: int = 5) -> dict[str, Any]:
    """Median wall-clock ms of the full model (backbone + decoder), dense twin vs SPA, per batch size.

    Batches cycle through ``images``; one warm-up run precedes the ``repeats`` timed runs.
    """

    def timed(batch: Tensor) -> float:
        times = []
        for run in range(repeats + 1):
            start = time.perf_counter()
            with torch.inference_mode():
                model(batch)
            if run:
                times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)

    result: dict[str, Any] = {"repeats": repeats, "threads": torch.get_num_threads(), "device": str(images.device)}
    for size in batch_sizes:
        batch = images[torch.arange(size) % len(images)]
        with dense(model):
            dense_ms = timed(batch)
        spa_ms = timed(batch)
        result[f"batch_{size}"] = {"dense_ms": dense_ms, "spa_ms": spa_ms, "speedup": dense_ms / spa_ms}
    return result


def threshold_sweep(
    model: nn.Module, images: Tensor, teachers: Tensor, labels: Tensor, thresholds: Sequence[float]
) -> list[dict[str, float]]:
    """Keep ratio, saliency MAE, FLOP saving and IoU of the learned gate at other inference thresholds.

    With a refresher, ``saliency_mae_no_refresh`` and ``backbone_saving_no_refresh`` give the same
    selection without it.
    """
    config = spa_context(model).config
    original = config.threshold

    def summary() -> dict[str, Any]:
        return _summarize(
            {str(i): evaluate_selection(model, images[i : i + 1], teachers[i : i + 1], labels[i : i + 1]) for i in range(len(images))}
        )

    rows = []
    try:
        for threshold in thresholds:
            configure(model, threshold=threshold)
            row = {"threshold": threshold, **{k: v for k, v in summary().items() if k in _AVERAGED}}
            if has_refresh(model):
                with without_refresh(model):
                    plain = summary()
                row["saliency_mae_no_refresh"] = plain["saliency_mae"]
                row["backbone_saving_no_refresh"] = plain["backbone_saving"]
            rows.append(row)
    finally:
        configure(model, threshold=original)
    return rows


def evaluate(
    model: nn.Module,
    names: Sequence[str] = HELD_OUT,
    *,
    selectors: Sequence[str] = tuple(SELECTORS),
    timing: bool = True,
    repeats: int = 5,
    thresholds: Sequence[float] = (),
) -> dict[str, Any]:
    """All metrics on the photos ``names``: learned gate, selectors (matched and default), latency."""
    device = next(model.parameters()).device
    images = held_out_batch(names).to(device)
    teachers = torch.cat([teacher_saliency(model, images[i : i + 1]) for i in range(len(names))])
    labels = saliency_labels(teachers, patch=model.patch_size)
    learned = {
        photo: evaluate_selection(model, images[i : i + 1], teachers[i : i + 1], labels[i : i + 1])
        for i, photo in enumerate(tqdm(names, desc="learned gate", leave=False))
    }
    results: dict[str, Any] = {
        "photos": list(names),
        "label_rule": f"{LABEL_REDUCE} of teacher saliency over a patch > {LABEL_THRESHOLD}",
        "label_ratio": float(labels.float().mean()),
        "threshold": spa_context(model).config.threshold,
        "refresh": has_refresh(model),
        "learned": _summarize(learned),
        "equal_keep": {},
        "default": {},
    }
    for name in tqdm(selectors, desc="selectors", leave=False):
        results["equal_keep"][name] = _run_selector(model, name, images, teachers, labels, names, learned)
        results["default"][name] = _run_selector(model, name, images, teachers, labels, names, None)
        results["default"][name]["params"] = SELECTORS[name].default_params
    results["label_oracle"] = _run_selector(model, LabelOracle, images, teachers, labels, names, None)
    if results["refresh"]:
        with without_refresh(model):
            results["learned_no_refresh"] = _summarize(
                {photo: evaluate_selection(model, images[i : i + 1], teachers[i : i + 1], labels[i : i + 1]) for i, photo in enumerate(names)}
            )
            results["label_oracle_no_refresh"] = _run_selector(model, LabelOracle, images, teachers, labels, names, None)
    if thresholds:
        results["threshold_sweep"] = threshold_sweep(model, images, teachers, labels, thresholds)
    if timing:
        results["latency"] = latency(model, images, repeats=repeats)
    return results


def _row(label: str, m: dict[str, Any]) -> str:
    return (
        f"| {label} | {m['keep_ratio']:.3f} | {m['precision']:.3f} | {m['recall']:.3f} | {m['iou']:.3f} "
        f"| {m['saliency_mae']:.4f} | {m['backbone_saving']:.3f} |"
    )


def markdown_table(results: dict[str, Any]) -> str:
    """The comparison as a markdown table (means over photos and SPA layers) plus latency lines."""
    refresh = results.get("refresh", False)
    with_refresh = " + refresher" if refresh else ""
    lines = [
        "| selection | keep ratio | precision | recall | IoU | saliency MAE | backbone FLOP saving |",
        "|---|---|---|---|---|---|---|",
        _row(f"learned gate (SPA){with_refresh}", results["learned"]),
    ]
    if refresh:
        lines.append(_row("learned gate (SPA), no refresher", results["learned_no_refresh"]))
    lines += [_row(f"{name}, equal keep{with_refresh}", m) for name, m in results["equal_keep"].items()]
    for name, m in results["default"].items():
        params = ", ".join(f"{k}={v}" for k, v in m["params"].items())
        lines.append(_row(f"{name}, default ({params}){with_refresh}", m))
    if "label_oracle" in results:
        lines.append(_row(f"label oracle (keeps exactly the teacher labels; diagnostic){with_refresh}", results["label_oracle"]))
    if refresh:
        lines.append(_row("label oracle, no refresher", results["label_oracle_no_refresh"]))
    timing = results.get("latency")
    if timing:
        lines.append("")
        lines.append(f"CPU latency, full model, median of {timing['repeats']} ({timing['threads']} threads):")
        lines.append("")
        lines.append("| batch | dense ms | SPA ms | speed-up |")
        lines.append("|---|---|---|---|")
        for key, value in timing.items():
            if key.startswith("batch_"):
                lines.append(f"| {key[6:]} | {value['dense_ms']:.0f} | {value['spa_ms']:.0f} | {value['speedup']:.2f}x |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m spa_viz.evaluate_saliency", description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", default=CHECKPOINT, help="checkpoint name or folder")
    parser.add_argument("--out", type=Path, default=None, help="write all numbers to this JSON file")
    parser.add_argument("--photos", nargs="+", default=list(HELD_OUT), help="held-out photo names")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per latency measurement")
    parser.add_argument("--no-timing", action="store_true", help="skip the latency measurement")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    unknown = sorted(set(args.photos) - set(HELD_OUT))
    if unknown:
        parser.error(f"{unknown} are not held-out photos; choose from {list(HELD_OUT)}")
    model = load(args.checkpoint, device=args.device)
    results = evaluate(model, args.photos, timing=not args.no_timing, repeats=args.repeats)
    print(markdown_table(results))
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
        log.info("wrote %s", args.out)
    return results


if __name__ == "__main__":
    main()
