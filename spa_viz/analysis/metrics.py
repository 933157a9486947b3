"""How well a keep mask follows the selection labels, and detection AP: one definition of each.

Selection metrics count, per token, kept-and-labelled (tp), kept-not-labelled (fp),
dropped-but-labelled (fn) and dropped-not-labelled (tn) tokens; positive = labelled = "should be
kept". The rule for empty denominators, the same in the app, ``spa-viz analyze``, the evaluations
and the model cards:

* **recall** = tp / (tp + fn), and **1.0 when there is no positive label** (nothing could be missed);
* **IoU** = tp / (tp + fp + fn), and **1.0 when neither the keep mask nor the labels hold a token**
  (they agree exactly);
* **precision** = tp / (tp + fp), and **0.0 when nothing is kept** (no kept token to credit; SPA
  keeps at least ``min_keep`` >= 1 tokens unless configured otherwise).

Counts add up, so a split can be scored pooled (sum the counts, then divide: the detection
evaluation) or per image (divide, then average: the saliency evaluation, one photo at a time).
Ratios are float64.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["F_BETA_SQUARED", "SelectionCounts", "coco_ap", "f_measure_curve", "mask_iou"]

#: The saliency benchmarks' F-measure weight (beta^2 = 0.3) and binarisation levels.
F_BETA_SQUARED = 0.3
F_LEVELS = 256


def _as_bool(values: Tensor | np.ndarray) -> Tensor:
    return (values if isinstance(values, Tensor) else torch.from_numpy(np.asarray(values))).bool().cpu()


@dataclass(frozen=True)
class SelectionCounts:
    """Token counts of a keep mask against labels; each field has one entry per scored unit.

    The shape of the fields is the batch shape the counts were taken over (``()`` for one mask,
    ``(L,)`` for one mask per layer, ...); ratios come back with the same shape.
    """

    tp: Tensor
    fp: Tensor
    fn: Tensor
    tn: Tensor

    @classmethod
    def of(cls, keep: Tensor | np.ndarray, labels: Tensor | np.ndarray) -> SelectionCounts:
        """Counts over the last dimension of ``keep`` and ``labels`` (bool, broadcastable, (..., N))."""
        keep, labels = _as_bool(keep), _as_bool(labels)
        if keep.shape[-1] != labels.shape[-1]:
            raise ValueError(f"keep has {keep.shape[-1]} tokens but labels have {labels.shape[-1]}")
        return cls(
            tp=(keep & labels).sum(-1),
            fp=(keep & ~labels).sum(-1),
            fn=(~keep & labels).sum(-1),
            tn=(~keep & ~labels).sum(-1),
        )

    def __add__(self, other: SelectionCounts) -> SelectionCounts:
        return SelectionCounts(self.tp + other.tp, self.fp + other.fp, self.fn + other.fn, self.tn + other.tn)

    def pooled(self) -> SelectionCounts:
        """The counts summed over every image (one count per field)."""
        return SelectionCounts(self.tp.sum(), self.fp.sum(), self.fn.sum(), self.tn.sum())

    @property
    def kept(self) -> Tensor:
        return self.tp + self.fp

    @property
    def positives(self) -> Tensor:
        return self.tp + self.fn

    @property
    def tokens(self) -> Tensor:
        return self.tp + self.fp + self.fn + self.tn

    @staticmethod
    def _ratio(numerator: Tensor, denominator: Tensor, empty: float) -> Tensor:
        numerator, denominator = numerator.double(), denominator.double()
        return torch.where(denominator > 0, numerator / denominator.clamp(min=1), torch.full_like(numerator, empty))

    @property
    def precision(self) -> Tensor:
        """tp / kept; 0.0 where nothing is kept."""
        return self._ratio(self.tp, self.kept, 0.0)

    @property
    def recall(self) -> Tensor:
        """tp / positives; 1.0 where there is no positive label."""
        return self._ratio(self.tp, self.positives, 1.0)

    @property
    def iou(self) -> Tensor:
        """tp / (kept or labelled); 1.0 where neither holds a token."""
        return self._ratio(self.tp, self.tp + self.fp + self.fn, 1.0)

    def to_dict(self, digits: int | None = 4) -> dict[str, Any]:
        """JSON-ready precision, recall, IoU (rounded to ``digits``; None: exact) and counts of one unit."""
        if self.tp.dim():
            raise ValueError("to_dict describes one scored unit; index or sum the counts first")

        def fmt(x: Tensor) -> float:
            return float(x) if digits is None else round(float(x), digits)

        return {
            "precision": fmt(self.precision),
            "recall": fmt(self.recall),
            "iou": fmt(self.iou),
            "tp": int(self.tp),
            "fp": int(self.fp),
            "fn": int(self.fn),
            "tn": int(self.tn),
        }


def coco_ap(gt: dict[str, Any], detections: list[dict[str, Any]], iou_type: str = "bbox") -> dict[str, float]:
    """COCO AP (0.50:0.95) and AP50 via pycocotools; 0 for both when there is no detection or no object.

    ``gt`` is a COCO dict (``images``, ``annotations``, ``categories``), ``detections`` COCO results;
    ``iou_type`` is ``"bbox"`` (box AP) or ``"segm"`` (mask AP: annotations and results carry RLE or
    polygon ``segmentation``).
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if iou_type not in ("bbox", "segm"):
        raise ValueError(f"iou_type must be 'bbox' or 'segm', got {iou_type!r}")
    if not detections or not gt["annotations"]:
        return {"AP": 0.0, "AP50": 0.0}
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(detections)
        evaluator = COCOeval(coco_gt, coco_dt, iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {"AP": float(evaluator.stats[0]), "AP50": float(evaluator.stats[1])}


def f_measure_curve(saliency: Tensor, mask: Tensor, beta_squared: float = F_BETA_SQUARED) -> Tensor:
    """(256,) F-measure of one saliency map (h, w) in [0, 1] against a bool object mask (h, w), the map
    binarised at each level t / 255 (map * 255 truncated >= t), as the saliency benchmarks do
    (PySODMetrics' ``Fmeasure``); precision is 0 where nothing is predicted, recall 0 without an object."""
    levels = (saliency.detach().float().cpu().clamp(0, 1) * 255).to(torch.uint8).long().flatten()
    inside = mask.detach().cpu().bool().flatten()
    object_hist = torch.bincount(levels[inside], minlength=F_LEVELS).double()
    other_hist = torch.bincount(levels[~inside], minlength=F_LEVELS).double()
    tp = object_hist.flip(0).cumsum(0).flip(0)
    predicted = tp + other_hist.flip(0).cumsum(0).flip(0)
    precision = torch.where(predicted > 0, tp / predicted.clamp(min=1), 0.0)
    objects = float(object_hist.sum())
    recall = tp / objects if objects else torch.zeros_like(tp)
    denominator = beta_squared * precision + recall
    f = torch.where(denominator > 0, (1 + beta_squared) * precision * recall / denominator.clamp(min=1e-12), 0.0)
    return f


def mask_iou(saliency: Tensor, mask: Tensor, threshold: float = 0.5) -> float:
    """IoU of a saliency map (h, w) binarised at ``threshold`` with a bool object mask (h, w); 1 when
    both are empty."""
    predicted = saliency.detach().float().cpu() >= threshold
    inside = mask.detach().cpu().bool()
    union = int((predicted | inside).sum())
    return float((predicted & inside).sum()) / union if union else 1.0
