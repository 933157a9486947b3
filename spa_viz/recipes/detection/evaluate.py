"""Evaluate a detector checkpoint: COCO AP, selection quality, keep ratios, FLOPs and CPU latency.

Why these numbers: SPA is worth it only if accuracy holds (AP, AP50 via pycocotools) while the gate
keeps few tokens (keep ratios, their spread over images), keeps the right ones (precision, recall
and IoU of each SPA layer's keep mask against the selection labels), and that turns into less
compute (backbone MACs dense vs as run, from ``spa_viz.trace``; MACs = multiply-adds, the unit of
the paper's "GFLOPs") and less time (wall-clock of the same model with SPA on and off on this
machine, alternating).

CLI: ``spa-viz evaluate detection --checkpoint DIR [--split test] [--num N]``; the data come from
the ``data`` section of the checkpoint's config.json (generated digits, or a COCO folder). Mask R-CNN
checkpoints are evaluated by :mod:`spa_viz.recipes.detection.mask_rcnn` (box and mask AP).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset
from tqdm import tqdm

from spa_viz.analysis.flops import static_macs
from spa_viz.analysis.metrics import coco_ap
from spa_viz.analysis.trace import Trace, find_backbone, trace
from spa_viz.data.coco import collate
from spa_viz.data.splits import data_config, load_split
from spa_viz.io.checkpoint import checkpoint_config, load_checkpoint
from spa_viz.layers.config import SOFT_GATING_MODES, UNKEPT_MODES
from spa_viz.models.detection import Detector, SPAMaskRCNN
from spa_viz.models.spa_vit import configure
from spa_viz.models.twin import dense_twin
from spa_viz.models.zoo import checkpoints_dir, find_checkpoint, load
from spa_viz.recipes.detection.card import model_card
from spa_viz.recipes.detection.measures import latency_record, pooled_selection, selection_rows, spa_on
from spa_viz.recipes.record import write_record
from spa_viz.viz.tables import markdown_table

__all__ = [
    "dense_gmacs",
    "evaluate",
    "main",
    "predict",
    "selection_metrics",
]

log = logging.getLogger(__name__)


def _batches(dataset: Dataset, batch_size: int) -> Iterator[tuple[Tensor, list[dict[str, Any]]]]:
    for start in range(0, len(dataset), batch_size):
        yield collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])


def _to_original(boxes: Tensor, target: Mapping[str, Any], image_size: int) -> Tensor:
    """Letterboxed input pixels -> pixels of the original image (the letterbox scale undone)."""
    height, width = target["orig_size"]
    return boxes / (image_size / max(height, width))


def predict(
    model: Detector, dataset: Dataset, image_size: int, batch_size: int = 32, progress: bool = False
) -> tuple[dict[str, Any], list[dict[str, Any]], list[Any]]:
    """Run ``model`` over ``dataset`` (traced when it has SPA on): COCO GT, COCO detections, traces.

    Boxes go back to original image pixels; category ids are label + 1.
    """
    model.eval()
    traced = spa_on(model)
    images_gt: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    detections: list[dict[str, Any]] = []
    traces: list[tuple[Trace, list[dict[str, Any]]]] = []
    batches = _batches(dataset, batch_size)
    total = -(-len(dataset) // batch_size)
    for images, targets in tqdm(batches, total=total, desc="evaluate", disable=not progress):
        if traced:
            outputs, tr = trace(model, images)
            traces.append((tr, targets))
        else:
            with torch.no_grad():
                outputs = model(images)
        for (boxes, scores, labels), target in zip(model.decode(outputs), targets):
            image_id = len(images_gt) + 1
            height, width = target["orig_size"]
            images_gt.append({"id": image_id, "height": int(height), "width": int(width)})
            for box, label in zip(
                _to_original(target["boxes"], target, image_size).tolist(), target["labels"].tolist()
            ):
                w, h = box[2] - box[0], box[3] - box[1]
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": image_id,
                        "category_id": label + 1,
                        "bbox": [box[0], box[1], w, h],
                        "area": w * h,
                        "iscrowd": 0,
                    }
                )
            for box, score, label in zip(
                _to_original(boxes, target, image_size).tolist(), scores.tolist(), labels.tolist()
            ):
                detections.append(
                    {
                        "image_id": image_id,
                        "category_id": label + 1,
                        "score": score,
                        "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]],
                    }
                )
    gt = {
        "images": images_gt,
        "annotations": annotations,
        "categories": [{"id": k + 1, "name": str(k)} for k in range(model.num_classes)],
    }
    return gt, detections, traces


def selection_metrics(
    model: Detector, traces: Sequence[tuple[Trace, list[dict[str, Any]]]], image_size: int
) -> dict[str, Any]:
    """Per SPA layer: keep ratio, label share, and precision / recall / IoU of the keep mask against the
    labels and the IoU with the previous layer's mask, pooled over the split; backbone MACs dense vs as run
    (see :func:`pooled_selection`)."""
    return pooled_selection([(tr, model.selection_labels(targets, (image_size, image_size))) for tr, targets in traces])


def dense_gmacs(model: Detector, image_size: int) -> float:
    """Backbone GMACs per image with every block dense (SPA disabled), the patch embedding (conv stem) included."""
    with dense_twin(model):
        return static_macs(find_backbone(model), (image_size, image_size)) / 1e9


def evaluate(
    model: Detector,
    dataset: Dataset,
    image_size: int,
    *,
    batch_size: int = 32,
    timing_batch: int = 32,
    timing_repeats: int = 5,
    progress: bool = False,
) -> dict[str, Any]:
    """All metrics of ``model`` on ``dataset`` (see the module docstring); timing skipped if ``timing_batch`` is 0."""
    gt, detections, traces = predict(model, dataset, image_size, batch_size, progress)
    result: dict[str, Any] = {"num_images": len(dataset), **coco_ap(gt, detections)}
    result["spa_enabled"] = spa_on(model)
    result["backbone_gmacs_dense"] = dense_gmacs(model, image_size)
    if traces:
        result.update(selection_metrics(model, traces, image_size))
    else:
        result.update(
            {
                "backbone_gmacs_run": result["backbone_gmacs_dense"],
                "mac_saving": 0.0,
                "keep_ratio": {"mean": 1.0, "p10": 1.0, "p50": 1.0, "p90": 1.0},
            }
        )
    if timing_batch:
        images, _ = collate([dataset[i] for i in range(min(timing_batch, len(dataset)))])
        device = next(model.parameters()).device
        result["latency"] = latency_record(model, images.to(device), timing_repeats)
    return result


def summary_table(result: dict[str, Any]) -> str:
    """The CLI's summary of :func:`evaluate` as a two-column markdown table."""
    rows = [
        ("images", f"{result['num_images']}"),
        ("AP50", f"{result['AP50']:.4f}"),
        ("AP", f"{result['AP']:.4f}"),
        *selection_rows(result),
    ]
    return markdown_table(["metric", "value"], rows)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """CLI: evaluate a checkpoint folder on a split of the data its config names."""
    parser = argparse.ArgumentParser(prog="spa-viz evaluate detection", description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="checkpoint folder (or a name in checkpoints/)")
    parser.add_argument("--split", default="test", choices=("train", "val", "test"))
    parser.add_argument("--num", type=int, default=None, help="first N images of the split (default: all of it)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 32 (CenterNet), 8 (Mask R-CNN)")
    parser.add_argument("--threshold", type=float, default=None, help="override the SPA keep threshold")
    parser.add_argument(
        "--unkept", choices=UNKEPT_MODES, default=None, help="override what unkept tokens become (SPA v3 paths)"
    )
    parser.add_argument(
        "--soft-gating",
        choices=SOFT_GATING_MODES,
        default=None,
        help="override soft gating (always, train = training only, off); the evaluation runs in eval mode",
    )
    parser.add_argument("--no-timing", action="store_true", help="skip the wall-clock measurement")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--no-cache", action="store_true", help="regenerate digits instead of using the cache")
    parser.add_argument("--json", type=Path, default=None, help="also write the metrics to this file")
    parser.add_argument(
        "--update-metrics",
        action="store_true",
        help="store the result as 'test' (and a fresh 'ci_subset') in the checkpoint's metrics.json "
        "and rewrite its model card; needs the whole test split",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load(args.checkpoint) if not Path(args.checkpoint).is_dir() else load_checkpoint(args.checkpoint)
    mask_rcnn = isinstance(model, SPAMaskRCNN)
    if not isinstance(model, Detector) and not mask_rcnn:
        parser.error(f"{args.checkpoint} is not a detector checkpoint")
    config = checkpoint_config(model)
    overrides = {
        name: value
        for name, value in {"threshold": args.threshold, "unkept": args.unkept, "soft_gating": args.soft_gating}.items()
        if value is not None
    }
    if overrides:
        configure(model, **overrides)
    if args.update_metrics and (args.split != "test" or args.num is not None or overrides):
        parser.error(
            "--update-metrics evaluates the whole test split at the saved settings: "
            "drop --split/--num/--threshold/--unkept/--soft-gating"
        )
    image_size = int(config["image_size"])
    cache = False if args.no_cache else None
    timing = 0 if args.no_timing else int(config.get("eval", {}).get("timing_batch", 32))
    if mask_rcnn:
        from spa_viz.recipes.detection.mask_rcnn import evaluate_mask_rcnn
        from spa_viz.recipes.detection.mask_rcnn import summary_table as mask_rcnn_table

        dataset = load_split(data_config(config["data"]), args.split, None, num=args.num, cache=cache)
        result = evaluate_mask_rcnn(
            model, dataset, batch_size=args.batch_size or 8, timing_batch=timing, progress=sys.stderr.isatty()
        )
        table = mask_rcnn_table(result)
    else:
        dataset = load_split(data_config(config["data"]), args.split, image_size, num=args.num, cache=cache)
        result = evaluate(
            model,
            dataset,
            image_size,
            batch_size=args.batch_size or 32,
            timing_batch=timing,
            progress=sys.stderr.isatty(),
        )
        table = summary_table(result)
    result["split"] = args.split
    print(f"## {args.checkpoint} on {args.split}\n\n{table}")
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    if args.update_metrics:
        _update_metrics(model, Path(args.checkpoint) if Path(args.checkpoint).is_dir() else None, result, dataset)
    return result


def _update_metrics(model: nn.Module, folder: Path | None, result: dict[str, Any], dataset: Dataset) -> None:
    """Replace 'test' and 'ci_subset' in a checkpoint's metrics.json and rebuild its model card."""
    config = checkpoint_config(model)
    folder = folder or find_checkpoint(config["name"]) or checkpoints_dir() / config["name"]
    path = folder / "metrics.json"
    metrics = json.loads(path.read_text()) if path.is_file() else {}
    num = int(metrics.get("ci_subset", {}).get("num", 32))
    subset = [dataset[i] for i in range(min(num, len(dataset)))]
    image_size = int(config["image_size"])
    metrics["test"] = result
    if isinstance(model, SPAMaskRCNN):
        from spa_viz.recipes.detection.mask_rcnn import evaluate_mask_rcnn

        ci = evaluate_mask_rcnn(model, torch.utils.data.Subset(dataset, range(len(subset))), timing_batch=0)
    else:
        ci = evaluate(model, subset, image_size, timing_batch=0)
    metrics["ci_subset"] = {"split": "test", "num": len(subset), **ci}
    write_record(folder, metrics, model_card, overwrite=True)  # --update-metrics asks for the rewrite
    log.info("updated %s and the model card", path)


if __name__ == "__main__":
    main()
