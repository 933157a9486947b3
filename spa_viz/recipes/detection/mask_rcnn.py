"""The Mask R-CNN side of the detection recipes: data in list batches, evaluation and its summary.

Data: images at their own size (no letterbox; torchvision's transform resizes and pads each batch),
ImageNet-normalized, batched as lists. Evaluation (:func:`evaluate_mask_rcnn`) runs the model's own
steps so that SPA can be traced where it runs: the transform (resize + pad), the backbone through
``spa_viz.trace`` on the padded batch (so the backbone MACs are those of the size it saw), then the
RPN and RoI heads. It reports pycocotools box AP and mask AP (against the annotation file itself for
COCO folders, crowd regions included; against the targets for generated data), per SPA layer the
keep ratio and precision / recall / IoU of the keep mask against the selection labels (made from
the masks, or boxes, of the transformed batch at each layer's token grid), backbone MACs dense vs
as run (multiply-adds, the paper's "GFLOPs"), and wall-clock per image of SPA and the dense twin,
alternating.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, Subset
from tqdm import tqdm

from spa_viz.analysis.metrics import coco_ap
from spa_viz.analysis.trace import trace
from spa_viz.data.coco import CocoDetection
from spa_viz.models.detection.mask_rcnn import SPAMaskRCNN
from spa_viz.recipes.detection.measures import latency_record, pooled_selection, selection_rows
from spa_viz.viz.tables import markdown_table

__all__ = ["collate_list", "dataset_has_masks", "evaluate_mask_rcnn", "mask_rle", "summary_table"]

log = logging.getLogger(__name__)

#: Mask probability above which a predicted pixel belongs to the object (torchvision's convention).
MASK_THRESHOLD = 0.5


def collate_list(batch: Sequence[tuple[Tensor, dict[str, Any]]]) -> tuple[list[Tensor], list[dict[str, Any]]]:
    """A batch as two lists: images (3, H, W) of any sizes, and their targets."""
    if len(batch) == 0:
        raise ValueError("cannot collate an empty batch")
    images, targets = zip(*batch)
    return list(images), list(targets)


def _base(dataset: Dataset) -> tuple[Dataset, list[int]]:
    """The dataset under a Subset and the indices it covers."""
    if isinstance(dataset, Subset):
        return dataset.dataset, list(dataset.indices)
    return dataset, list(range(len(dataset)))


def dataset_has_masks(dataset: Dataset) -> bool:
    """Whether a detection dataset yields instance masks (``has_masks`` of spa-viz datasets)."""
    return bool(getattr(_base(dataset)[0], "has_masks", False))


def mask_rle(masks: np.ndarray) -> list[dict[str, Any]]:
    """Bool/uint8 masks (K, H, W) -> COCO compressed RLEs with ``counts`` as str (JSON-ready)."""
    from pycocotools import mask as mask_utils

    if len(masks) == 0:
        return []
    encoded = mask_utils.encode(np.asfortranarray(np.moveaxis(masks.astype(np.uint8), 0, -1)))
    return [{"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")} for rle in encoded]


def _batches(dataset: Dataset, batch_size: int) -> Iterator[tuple[list[Tensor], list[dict[str, Any]]]]:
    for start in range(0, len(dataset), batch_size):
        yield collate_list([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])


class _GroundTruth:
    """COCO ground truth of the evaluated images and the category id of each 0-based label.

    COCO folders are scored against their own annotation file (crowd regions and official areas
    included); other datasets against their targets (masks RLE-encoded, areas from the masks).
    """

    def __init__(self, dataset: Dataset, num_classes: int, with_masks: bool) -> None:
        base, _ = _base(dataset)
        self.file = base if isinstance(base, CocoDetection) else None
        self.with_masks = with_masks
        self.images: list[dict[str, Any]] = []
        self.annotations: list[dict[str, Any]] = []
        if self.file is not None:
            self.category_ids = list(self.file.label_to_cat_id)
            raw = json.loads(self.file.annotation_file.read_text())
            self.categories = raw["categories"]
            self._file_annotations: dict[int, list[dict[str, Any]]] = {}
            for ann in raw["annotations"]:
                self._file_annotations.setdefault(ann["image_id"], []).append(ann)
        else:
            self.category_ids = list(range(1, num_classes + 1))
            self.categories = [{"id": k + 1, "name": str(k)} for k in range(num_classes)]

    def add(self, target: dict[str, Any], size: tuple[int, int]) -> int:
        """Record one image (its target in input pixels); return its COCO image id."""
        image_id = int(target.get("image_id", len(self.images) + 1))
        self.images.append({"id": image_id, "height": size[0], "width": size[1]})
        if self.file is not None:
            for ann in self._file_annotations.get(image_id, []):
                width, height = ann["bbox"][2:]
                self.annotations.append({"area": width * height, "iscrowd": 0, **ann})
            return image_id
        boxes = target["boxes"].tolist()
        labels = target["labels"].tolist()
        masks = target.get("masks")
        rles = mask_rle(masks.numpy()) if self.with_masks and masks is not None else [None] * len(boxes)
        areas = masks.flatten(1).sum(1).tolist() if self.with_masks and masks is not None else None
        for i, (box, label, rle) in enumerate(zip(boxes, labels, rles)):
            width, height = box[2] - box[0], box[3] - box[1]
            entry = {
                "id": len(self.annotations) + 1,
                "image_id": image_id,
                "category_id": self.category_ids[label],
                "bbox": [box[0], box[1], width, height],
                "area": areas[i] if areas else width * height,
                "iscrowd": 0,
            }
            if rle is not None:
                entry["segmentation"] = rle
            self.annotations.append(entry)
        return image_id

    def coco(self, segm: bool = False) -> dict[str, Any]:
        """The COCO dict; for mask AP (``segm``) only the annotations that have a segmentation."""
        annotations = [a for a in self.annotations if a.get("segmentation")] if segm else self.annotations
        return {"images": self.images, "annotations": annotations, "categories": self.categories}


def evaluate_mask_rcnn(
    model: SPAMaskRCNN,
    dataset: Dataset,
    *,
    batch_size: int = 8,
    timing_batch: int = 8,
    timing_repeats: int = 5,
    progress: bool = False,
) -> dict[str, Any]:
    """All metrics of a Mask R-CNN on ``dataset`` (see the module docstring); no timing when ``timing_batch`` is 0.

    Keys: ``AP``/``AP50`` (box), ``mask_AP``/``mask_AP50`` (None when the data have no masks),
    ``keep_ratio``, ``layers`` (per SPA layer), ``backbone_gmacs_dense``/``_run`` (per image),
    ``mac_saving``, ``latency``.
    """
    model.eval()
    device = next(model.parameters()).device
    with_masks = dataset_has_masks(dataset)
    truth = _GroundTruth(dataset, model.num_classes, with_masks)
    boxes_out: list[dict[str, Any]] = []
    masks_out: list[dict[str, Any]] = []
    entries = []
    total = -(-len(dataset) // batch_size)
    for images, targets in tqdm(_batches(dataset, batch_size), total=total, desc="evaluate", disable=not progress):
        with torch.no_grad():
            image_list, moved, sizes = model.prepare(
                [image.to(device) for image in images], [{k: _to(v, device) for k, v in t.items()} for t in targets]
            )
            features, record = trace(model.backbone, image_list.tensors)
            _, detections = model.detect(image_list, features, None, sizes)
        padded = tuple(int(s) for s in image_list.tensors.shape[-2:])
        entries.append((record, {g: t.cpu() for g, t in model.selection_labels(moved, padded).items()}))
        for target, size, detection in zip(targets, sizes, detections):
            image_id = truth.add(target, size)
            _add_results(detection, image_id, truth.category_ids, boxes_out, masks_out if with_masks else None)
    result: dict[str, Any] = {"num_images": len(dataset), **coco_ap(truth.coco(), boxes_out, "bbox")}
    mask_ap = coco_ap(truth.coco(segm=True), masks_out, "segm") if with_masks else {"AP": None, "AP50": None}
    result.update(mask_AP=mask_ap["AP"], mask_AP50=mask_ap["AP50"], spa_enabled=model.spa_enabled())
    result.update(pooled_selection(entries))
    if timing_batch:
        sample = [dataset[i][0].to(device) for i in range(min(timing_batch, len(dataset)))]
        result["latency"] = latency_record(model, sample, timing_repeats)
    return result


def _to(value: Any, device: torch.device) -> Any:
    return value.to(device) if isinstance(value, Tensor) else value


def _add_results(
    detection: dict[str, Tensor],
    image_id: int,
    category_ids: list[int],
    boxes_out: list[dict[str, Any]],
    masks_out: list[dict[str, Any]] | None,
) -> None:
    """COCO results (box, and mask RLE when ``masks_out`` is given) of one image's detections."""
    boxes = detection["boxes"].cpu().tolist()
    scores = detection["scores"].cpu().tolist()
    categories = [category_ids[int(label)] for label in detection["labels"].cpu()]
    for box, score, category in zip(boxes, scores, categories):
        boxes_out.append(
            {
                "image_id": image_id,
                "category_id": category,
                "score": score,
                "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]],
            }
        )
    if masks_out is not None:
        binary = (detection["masks"][:, 0] > MASK_THRESHOLD).cpu().numpy()
        for rle, score, category in zip(mask_rle(binary), scores, categories):
            masks_out.append({"image_id": image_id, "category_id": category, "score": score, "segmentation": rle})


def summary_table(result: dict[str, Any]) -> str:
    """The CLI's summary of :func:`evaluate_mask_rcnn` as a two-column markdown table."""

    def ap(value: float | None) -> str:
        return "-" if value is None else f"{value:.4f}"

    rows = [
        ("images", f"{result['num_images']}"),
        ("box AP50 / AP", f"{ap(result['AP50'])} / {ap(result['AP'])}"),
        ("mask AP50 / AP", f"{ap(result['mask_AP50'])} / {ap(result['mask_AP'])}"),
        *selection_rows(result),
    ]
    return markdown_table(["metric", "value"], rows)
