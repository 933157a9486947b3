"""Score the real-photo SPA model and the training-free selectors on the held-out photos.

``python -m spa_viz.evaluate_saliency [--out results.json]`` loads ``spa-dinov2-s14-saliency`` and,
on every held-out photo (:data:`spa_viz.data.photos.HELD_OUT`, batch 1), compares each token
selection with the dense teacher's selection labels (precision / recall / IoU of the keep mask per
SPA layer), and the SPA model's saliency map with the dense model's (MAE), and reports the backbone
FLOP saving and CPU latency. The dense teacher is the same model with SPA disabled.

Selectors are scored twice: at *equal keep ratio* (each selector keeps, per photo and SPA layer,
exactly as many tokens as the learned gate did) and at their own defaults. Precision, recall and
IoU follow the rule of :mod:`spa_viz.analysis.metrics`, per photo (means over SPA layers), then
averaged over photos.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from spa_viz.analysis.metrics import SelectionCounts
from spa_viz.analysis.trace import trace
from spa_viz.data.photos import HELD_OUT, load_photo
from spa_viz.io.files import write_text_atomic
from spa_viz.io.timer import median_seconds
from spa_viz.layers.config import SPAConfig
from spa_viz.models.saliency import preprocess_image
from spa_viz.models.saliency.labels import LABEL_REDUCE, SALIENT, saliency_labels
from spa_viz.models.spa_vit import configure, spa_context
from spa_viz.models.twin import dense_twin
from spa_viz.models.zoo import load
from spa_viz.selection.selectors import SELECTORS, TokenSelector, install_selector, remove_selector, top_counts_mask
from spa_viz.viz.tables import markdown_table

__all__ = [
    "CHECKPOINT",
    "LabelOracle",
    "evaluate",
    "evaluate_selection",
    "held_out_batch",
    "latency",
    "main",
    "results_table",
    "teacher_saliency",
    "threshold_sweep",
]

log = logging.getLogger(__name__)

CHECKPOINT = "spa-dinov2-s14-saliency"


def teacher_saliency(model: nn.Module, images: Tensor) -> Tensor:
    """(B, 1, H, W) saliency of the dense twin of ``model``."""
    with dense_twin(model), torch.inference_mode():
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
    counts = SelectionCounts.of(keep, labels.reshape(1, -1))  # one entry per SPA layer
    return {
        "keep_ratio": tr.mean_keep_ratio,
        "keep_ratio_per_layer": {str(t.layer): float(t.keep_ratio[0]) for t in tr.layers},
        "kept_per_layer": [int(t.kept_counts[0]) for t in tr.layers],
        "saliency_mae": float((out.float() - teacher.float()).abs().mean()),
        "backbone_saving": tr.backbone_saving,
        "precision": float(counts.precision.mean()),
        "recall": float(counts.recall.mean()),
        "iou": float(counts.iou.mean()),
    }


_AVERAGED = ("keep_ratio", "saliency_mae", "backbone_saving", "precision", "recall", "iou")


def _summarize(per_photo: dict[str, dict[str, Any]]) -> dict[str, Any]:
    means = {k: statistics.fmean(p[k] for p in per_photo.values()) for k in _AVERAGED}
    return {**means, "per_photo": per_photo}


def _run_selector(
    model: nn.Module,
    name: str | type[TokenSelector],
    images: Tensor,
    teachers: Tensor,
    labels: Tensor,
    names: Sequence[str],
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
        with torch.inference_mode():
            return (
                1e3 * median_seconds({"model": lambda: model(batch)}, repeats, warmup=1, device=batch.device)["model"]
            )

    result: dict[str, Any] = {"repeats": repeats, "threads": torch.get_num_threads(), "device": str(images.device)}
    for size in batch_sizes:
        batch = images[torch.arange(size) % len(images)]
        with dense_twin(model):
            dense_ms = timed(batch)
        spa_ms = timed(batch)
        result[f"batch_{size}"] = {"dense_ms": dense_ms, "spa_ms": spa_ms, "speedup": dense_ms / spa_ms}
    return result


def threshold_sweep(
    model: nn.Module, images: Tensor, teachers: Tensor, labels: Tensor, thresholds: Sequence[float]
) -> list[dict[str, float]]:
    """Keep ratio, saliency MAE, FLOP saving and IoU of the learned gate at other inference thresholds."""
    config = spa_context(model).config
    original = config.threshold

    def summary() -> dict[str, Any]:
        return _summarize(
            {
                str(i): evaluate_selection(model, images[i : i + 1], teachers[i : i + 1], labels[i : i + 1])
                for i in range(len(images))
            }
        )

    rows = []
    try:
        for threshold in thresholds:
            configure(model, threshold=threshold)
            rows.append({"threshold": threshold, **{k: v for k, v in summary().items() if k in _AVERAGED}})
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
        "label_rule": f"{LABEL_REDUCE} of teacher saliency over a patch > {SALIENT}",
        "label_ratio": float(labels.float().mean()),
        "threshold": spa_context(model).config.threshold,
        "learned": _summarize(learned),
        "equal_keep": {},
        "default": {},
    }
    for name in tqdm(selectors, desc="selectors", leave=False):
        results["equal_keep"][name] = _run_selector(model, name, images, teachers, labels, names, learned)
        results["default"][name] = _run_selector(model, name, images, teachers, labels, names, None)
        results["default"][name]["params"] = SELECTORS[name].default_params
    results["label_oracle"] = _run_selector(model, LabelOracle, images, teachers, labels, names, None)
    if thresholds:
        results["threshold_sweep"] = threshold_sweep(model, images, teachers, labels, thresholds)
    if timing:
        results["latency"] = latency(model, images, repeats=repeats)
    return results


def _cells(label: str, m: dict[str, Any]) -> list[str]:
    return [
        label,
        f"{m['keep_ratio']:.3f}",
        f"{m['precision']:.3f}",
        f"{m['recall']:.3f}",
        f"{m['iou']:.3f}",
        f"{m['saliency_mae']:.4f}",
        f"{m['backbone_saving']:.3f}",
    ]


def results_table(results: dict[str, Any]) -> str:
    """The comparison as a markdown table (means over photos and SPA layers) plus the latency table."""
    rows = [_cells("learned gate (SPA)", results["learned"])]
    rows += [_cells(f"{name}, equal keep", m) for name, m in results["equal_keep"].items()]
    for name, m in results["default"].items():
        params = ", ".join(f"{k}={v}" for k, v in m["params"].items())
        rows.append(_cells(f"{name}, default ({params})", m))
    if "label_oracle" in results:
        rows.append(_cells("label oracle (keeps exactly the teacher labels; diagnostic)", results["label_oracle"]))
    header = ["selection", "keep ratio", "precision", "recall", "IoU", "saliency MAE", "backbone FLOP saving"]
    text = markdown_table(header, rows)
    timing = results.get("latency")
    if timing:
        runs = [
            [key[6:], f"{value['dense_ms']:.0f}", f"{value['spa_ms']:.0f}", f"{value['speedup']:.2f}x"]
            for key, value in timing.items()
            if key.startswith("batch_")
        ]
        text += (
            f"\n\nCPU latency, full model, median of {timing['repeats']} ({timing['threads']} threads):\n\n"
            + markdown_table(["batch", "dense ms", "SPA ms", "speed-up"], runs)
        )
    return text


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
    print(results_table(results))
    if args.out is not None:
        write_text_atomic(args.out, json.dumps(results, indent=2) + "\n")
        log.info("wrote %s", args.out)
    return results


if __name__ == "__main__":
    main()
