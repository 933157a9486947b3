"""Task adapters: what the app and the CLI need to know about a model's task, and nothing about SPA.

One adapter per task (``saliency``, ``detection`` (CenterNet detectors, or torchvision Mask R-CNN:
:class:`MaskRCNNTask`), ``classification``) turns uploaded pixels into
the model's input, draws its predictions, picks the scalar that attributions explain, and maps
object masks into the input's geometry for selection labels. The task comes from the checkpoint's
``config.json`` (``task`` or ``architecture``) or, for timm names, from the model itself.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_iou

from spa_viz.analysis.trace import find_backbone
from spa_viz.data.transforms import DetectionTransform
from spa_viz.io.checkpoint import checkpoint_config
from spa_viz.io.images import IMAGENET_MEAN, IMAGENET_STD, denormalize, resize_normalize
from spa_viz.models.saliency.labels import SALIENT, salient
from spa_viz.viz import overlays

__all__ = ["ClassificationTask", "DetectionTask", "MaskRCNNTask", "SaliencyTask", "TaskAdapter", "adapter_for"]

Target = Callable[[Any], Tensor]


class TaskAdapter:
    """Base: square plain-resize preprocessing with a mean/std; subclasses add the task's views."""

    task: ClassVar[str] = ""

    def __init__(self, model: nn.Module, config: dict[str, Any]) -> None:
        self.model = model
        self.config = config
        backbone = find_backbone(model)
        size = config.get("image_size") or backbone.patch_embed.img_size
        self.input_size: tuple[int, int] = (int(size), int(size)) if isinstance(size, int) else tuple(map(int, size))
        self.mean: tuple[float, ...] = tuple(config.get("mean", IMAGENET_MEAN))
        self.std: tuple[float, ...] = tuple(config.get("std", IMAGENET_STD))

    def preprocess(self, pixels: np.ndarray) -> Tensor:
        """RGB uint8 (H, W, 3) -> normalized float (3, h, w) model input."""
        return resize_normalize(pixels, self.input_size, self.mean, self.std)

    def map_masks(self, masks: np.ndarray) -> Tensor:
        """Object masks (K, H, W) in the uploaded image's pixels -> their union (h, w) in the input."""
        union = torch.from_numpy(np.asarray(masks, dtype=bool).any(0)).float()[None, None]
        return F.interpolate(union, size=self.input_size, mode="bilinear", antialias=True)[0, 0] >= 0.5

    def display(self, x: Tensor) -> np.ndarray:
        """The model input (3, h, w) back as the RGB uint8 picture the model saw."""
        return denormalize(x, self.mean, self.std)

    def predictions(self, output: Any, index: int) -> dict[str, Any]:
        """JSON-ready predictions of image ``index``."""
        raise NotImplementedError

    def draw(self, display: np.ndarray, output: Any, index: int, truth: Tensor | None = None) -> np.ndarray:
        """The predictions of image ``index`` drawn on its display image (with the ground-truth boxes
        ``truth``, in input pixels, where the task has boxes)."""
        raise NotImplementedError

    def target(self, output: Any, index: int) -> tuple[Target, str]:
        """A per-image score for attributing image ``index`` alone (batch of one), and what it is."""
        raise NotImplementedError

    def teacher_mask(self, dense_output: Any, index: int) -> Tensor | None:
        """Pixels the dense teacher marks as object (input geometry), if this task has a teacher."""
        return None

    @staticmethod
    def output_gap(output: Any, dense_output: Any, index: int) -> tuple[str, float] | None:
        """(name, value) of how far image ``index``'s SPA output is from its dense twin's, if this task has one."""
        return None

    def output_error(self, output: Any, dense_output: Any, index: int) -> tuple[str, float]:
        """(name, value) of how far image ``index``'s output is from the dense twin's, 0 = the same and
        larger = further (what the comparison table and the trade-off plot show): :meth:`output_gap`
        where it is an error; subclasses whose gap is an agreement, or that have none, say their own."""
        gap = self.output_gap(output, dense_output, index)
        if gap is None:
            raise NotImplementedError(f"{type(self).__name__} has no output error vs the dense twin")
        return gap

    def map_boxes(self, image_size: tuple[int, int], boxes: np.ndarray) -> Tensor | None:
        """xyxy boxes in an image's own pixels (``image_size`` = (H, W)) in the model's input pixels, for
        tasks that draw boxes (None: this task draws none)."""
        return None

    def output_map(self, output: Any, index: int) -> Tensor | None:
        """(h, w) the model's output of image ``index`` as one map in [0, 1] (what |SPA - dense| is drawn
        of), or None for outputs that are not maps (class scores)."""
        return None

    def output_difference(self, output: Any, dense_output: Any, index: int) -> tuple[Tensor, str] | None:
        """(|SPA - dense| of :meth:`output_map`, what the map is), or None where there is no map."""
        spa, dense = self.output_map(output, index), self.output_map(dense_output, index)
        if spa is None or dense is None:
            return None
        return (spa - dense).abs(), self.output_map_name

    output_map_name = "output"


class SaliencyTask(TaskAdapter):
    """Saliency models (B, 1, H, W) in [0, 1]; the dense twin's salient pixels are the teacher label."""

    task = "saliency"

    def predictions(self, output: Tensor, index: int) -> dict[str, Any]:
        sal = output[index, 0]
        return {
            "saliency_mean": round(float(sal.mean()), 4),
            "salient_share": round(float(salient(sal).float().mean()), 4),
        }

    def draw(self, display: np.ndarray, output: Tensor, index: int, truth: Tensor | None = None) -> np.ndarray:
        sal = output[index, 0].float().cpu().numpy()
        return overlays.add_title(
            overlays.saliency_overlay(display, sal),
            "Predicted saliency",
            f"{salient(sal).mean():.0%} of pixels > {SALIENT:g} (white contour)",
        )

    def target(self, output: Tensor, index: int) -> tuple[Target, str]:
        region = salient(output[index : index + 1, 0])
        if not bool(region.any()):
            return (lambda out: out.flatten(1).sum(1)), f"sum of the whole saliency map (nothing > {SALIENT:g})"
        area = int(region.sum())

        def score(out: Tensor) -> Tensor:
            return (out[:, 0] * region.to(out.device)).flatten(1).sum(1)

        return score, f"sum of predicted saliency over the salient region ({area} px > {SALIENT:g})"

    def teacher_mask(self, dense_output: Tensor, index: int) -> Tensor:
        return salient(dense_output[index, 0].float().cpu())

    output_map_name = "saliency"

    def output_map(self, output: Tensor, index: int) -> Tensor:
        return output[index, 0].float().cpu()

    @staticmethod
    def output_gap(output: Tensor, dense_output: Tensor, index: int) -> tuple[str, float]:
        """Mean absolute difference of the saliency maps (what the model card's MAE measures)."""
        gap = (output[index].float().cpu() - dense_output[index].float().cpu()).abs().mean()
        return "saliency MAE vs the dense teacher", float(gap)


DETECTION_AGREEMENT = "detections agreeing with the dense twin's (same class, IoU >= 0.5)"


class DetectionTask(TaskAdapter):
    """Detectors with ``decode(outputs) -> [(boxes, scores, labels)]``; input letterboxed."""

    task = "detection"
    min_score = 0.3

    def __init__(self, model: nn.Module, config: dict[str, Any]) -> None:
        super().__init__(model, config)
        self.transform = DetectionTransform(self.input_size[0], mean=self.mean, std=self.std)
        names = config.get("class_names")
        self.class_names = list(names) if names else [str(i) for i in range(int(getattr(model, "num_classes", 10)))]

    def _transform(self, pixels: np.ndarray, masks: np.ndarray | None = None) -> tuple[Tensor, dict[str, Any]]:
        image = torch.from_numpy(np.array(pixels, dtype=np.uint8)).permute(2, 0, 1).contiguous()
        target: dict[str, Any] = {"boxes": torch.zeros(0, 4)}
        if masks is not None:
            target["masks"] = torch.from_numpy(np.asarray(masks, dtype=bool))
        return self.transform(image, target)

    def preprocess(self, pixels: np.ndarray) -> Tensor:
        return self._transform(pixels)[0]

    def map_masks(self, masks: np.ndarray) -> Tensor:
        height, width = masks.shape[-2:]
        return self._transform(np.zeros((height, width, 3), np.uint8), masks)[1]["masks"].any(0)

    def _detections(self, output: dict[str, Tensor], index: int) -> tuple[Tensor, Tensor, Tensor]:
        one = {k: v[index : index + 1] for k, v in output.items()}
        boxes, scores, labels = self.model.decode(one, threshold=self.min_score)[0]
        return boxes.cpu(), scores.cpu(), labels.cpu()

    output_map_name = "heat-map peak over classes"

    def output_gap(self, output: Any, dense_output: Any, index: int) -> tuple[str, float]:
        """Share of detections (score > ``min_score``) that SPA and the dense twin agree on: pairs of the
        same class with box IoU >= 0.5, matched greedily by score, over the larger of the two counts
        (1.0 when neither finds anything)."""
        boxes, scores, labels = self._detections(output, index)
        dense_boxes, _, dense_labels = self._detections(dense_output, index)
        larger = max(len(labels), len(dense_labels))
        if larger == 0:
            return DETECTION_AGREEMENT, 1.0
        overlap = box_iou(boxes, dense_boxes) if len(labels) and len(dense_labels) else torch.zeros(0, 0)
        free = set(range(len(dense_labels)))
        matched = 0
        for i in scores.argsort(descending=True).tolist():
            candidates = [j for j in free if dense_labels[j] == labels[i] and overlap[i, j] >= 0.5]
            if candidates:
                free.remove(max(candidates, key=lambda j: float(overlap[i, j])))
                matched += 1
        return DETECTION_AGREEMENT, matched / larger

    def output_error(self, output: Any, dense_output: Any, index: int) -> tuple[str, float]:
        """1 - the share of detections agreeing with the dense twin's (:meth:`output_gap`)."""
        _, agreement = self.output_gap(output, dense_output, index)
        return "1 - share of detections agreeing with the dense twin's", 1.0 - agreement

    def output_map(self, output: dict[str, Tensor], index: int) -> Tensor:
        return torch.sigmoid(output["heatmap"][index].float()).amax(0).cpu()

    def predictions(self, output: dict[str, Tensor], index: int) -> dict[str, Any]:
        boxes, scores, labels = self._detections(output, index)
        return {
            "detections": [
                {
                    "label": self.class_names[int(label)],
                    "score": round(float(s), 4),
                    "box_xyxy": [round(float(v), 1) for v in b],
                }
                for b, s, label in zip(boxes, scores, labels)
            ]
        }

    def map_boxes(self, image_size: tuple[int, int], boxes: np.ndarray) -> Tensor:
        """xyxy boxes in an image's own pixels (``image_size`` = (H, W)) -> the model's input pixels."""
        image = torch.zeros(3, *image_size, dtype=torch.uint8)
        _, target = self.transform(image, {"boxes": torch.as_tensor(np.asarray(boxes), dtype=torch.float32)})
        return target["boxes"]

    def _truth_note(self, truth: Tensor | None) -> str:
        return "" if truth is None else f" · white: {len(truth)} ground-truth box{'es' if len(truth) != 1 else ''}"

    def draw(
        self, display: np.ndarray, output: dict[str, Tensor], index: int, truth: Tensor | None = None
    ) -> np.ndarray:
        boxes, scores, labels = self._detections(output, index)
        scale = display.shape[1] / self.input_size[1]
        drawn = display if truth is None else overlays.draw_boxes(display, truth, scale=scale)
        drawn = overlays.draw_detections(drawn, boxes, labels, scores, self.class_names, scale=scale)
        return overlays.add_title(
            drawn, f"Detections (score > {self.min_score:g})", f"{len(scores)} found{self._truth_note(truth)}"
        )

    def target(self, output: dict[str, Tensor], index: int) -> tuple[Target, str]:
        boxes, scores, labels = self._detections(output, index)
        if not len(scores):
            return (
                lambda out: torch.sigmoid(out["heatmap"]).flatten(1).amax(1)
            ), "highest heat-map peak (no detection)"
        stride = self.model.stride
        box, label = boxes[0], int(labels[0])
        x0, y0 = int(box[0] // stride), int(box[1] // stride)
        x1, y1 = int(box[2] // stride) + 1, int(box[3] // stride) + 1

        def score(out: dict[str, Tensor]) -> Tensor:
            return torch.sigmoid(out["heatmap"][:, label, y0:y1, x0:x1]).flatten(1).amax(1)

        return score, f"score of the top detection '{self.class_names[label]}' ({float(scores[0]):.2f})"


class MaskRCNNTask(DetectionTask):
    """torchvision Mask R-CNN models (``spt_mask_rcnn``, ``spa_vit_mask_rcnn``): a list of per-image
    ``boxes``, ``labels``, ``scores``, ``masks``; input letterboxed to ``image_size`` like the detectors.

    Attribution target: the score of the top detection. A perturbed input's detections are re-matched
    to it (same class, box IoU >= 0.5) and the best match's score is taken; an image where it is lost
    (below torchvision's score threshold, or moved) scores 0.
    """

    task = "detection"

    def _detections(self, output: list[dict[str, Tensor]], index: int) -> tuple[Tensor, Tensor, Tensor]:
        detection = output[index]
        keep = detection["scores"] >= self.min_score
        return detection["boxes"][keep].cpu(), detection["scores"][keep].cpu(), detection["labels"][keep].cpu()

    output_map_name = "instance masks x score"

    def output_map(self, output: list[dict[str, Tensor]], index: int) -> Tensor:
        detection = output[index]
        masks = detection["masks"][:, 0].float() * detection["scores"].float()[:, None, None]
        if not len(masks):
            return torch.zeros(self.input_size)
        return masks.amax(0).cpu()

    def predictions(self, output: list[dict[str, Tensor]], index: int) -> dict[str, Any]:
        keep = output[index]["scores"] >= self.min_score
        areas = (output[index]["masks"][keep, 0] > 0.5).flatten(1).sum(1).tolist()
        found = super().predictions(output, index)
        for entry, area in zip(found["detections"], areas):
            entry["mask_pixels"] = int(area)
        return found

    def draw(
        self, display: np.ndarray, output: list[dict[str, Tensor]], index: int, truth: Tensor | None = None
    ) -> np.ndarray:
        boxes, scores, labels = self._detections(output, index)
        keep = output[index]["scores"] >= self.min_score
        masks = output[index]["masks"][keep, 0].float().cpu()
        scale = display.shape[1] / self.input_size[1]
        drawn = overlays.draw_masks(display, masks, labels)
        drawn = drawn if truth is None else overlays.draw_boxes(drawn, truth, scale=scale)
        drawn = overlays.draw_detections(drawn, boxes, labels, scores, self.class_names, scale=scale)
        return overlays.add_title(
            drawn,
            f"Detections and masks (score > {self.min_score:g})",
            f"{len(scores)} found{self._truth_note(truth)}",
        )

    def target(self, output: list[dict[str, Tensor]], index: int) -> tuple[Target, str]:
        boxes, scores, labels = self._detections(output, index)
        if not len(scores):

            def best(out: list[dict[str, Tensor]]) -> Tensor:
                return torch.stack([o["scores"].max() if len(o["scores"]) else o["scores"].new_zeros(()) for o in out])

            return best, f"highest detection score (no detection above {self.min_score:g})"
        reference, label = boxes[:1], int(labels[0])

        def score(out: list[dict[str, Tensor]]) -> Tensor:
            values = []
            for o in out:
                match = (o["labels"] == label) & (box_iou(o["boxes"], reference.to(o["boxes"].device))[:, 0] >= 0.5)
                values.append(o["scores"][match].max() if match.any() else o["scores"].new_zeros(()))
            return torch.stack(values)

        return score, f"score of the top detection '{self.class_names[label]}' ({float(scores[0]):.2f})"


class ClassificationTask(TaskAdapter):
    """Classifiers returning logits (B, K); ImageNet names for 1000-class timm models."""

    task = "classification"

    def __init__(self, model: nn.Module, config: dict[str, Any]) -> None:
        super().__init__(model, config)
        cfg = getattr(model, "pretrained_cfg", None) or {}
        self.mean = tuple(config.get("mean", cfg.get("mean", IMAGENET_MEAN)))
        self.std = tuple(config.get("std", cfg.get("std", IMAGENET_STD)))
        classes = int(getattr(model, "num_classes", 0))
        if classes <= 0:
            raise ValueError(
                "this model has no classification head (num_classes=0), so there are no predictions to show"
            )
        if config.get("class_names"):
            self.class_names = list(config["class_names"])
        elif classes == 1000:
            from timm.data import ImageNetInfo

            info = ImageNetInfo()
            self.class_names = [info.index_to_description(i).split(",")[0] for i in range(1000)]
        else:
            self.class_names = [f"class {i}" for i in range(classes)]

    def _top(self, output: Tensor, index: int, k: int = 5) -> list[tuple[str, float]]:
        probs = output[index].float().softmax(-1)
        values, classes = probs.topk(min(k, probs.numel()))
        return [(self.class_names[int(c)], float(v)) for v, c in zip(values, classes)]

    def predictions(self, output: Tensor, index: int) -> dict[str, Any]:
        return {"top5": [{"label": n, "probability": round(p, 4)} for n, p in self._top(output, index)]}

    def draw(self, display: np.ndarray, output: Tensor, index: int, truth: Tensor | None = None) -> np.ndarray:
        top = self._top(output, index, 3)
        lines = " · ".join(f"{n} {p:.0%}" for n, p in top[1:])
        return overlays.add_title(display, f"Top-1: {top[0][0]} ({top[0][1]:.0%})", lines or None)

    def output_error(self, output: Tensor, dense_output: Tensor, index: int) -> tuple[str, float]:
        """Total variation distance between the class probabilities of SPA and the dense twin (0 to 1)."""
        spa, dense = output[index].float().softmax(-1), dense_output[index].float().softmax(-1)
        return "class-probability distance vs the dense twin (total variation)", float((spa - dense).abs().sum() / 2)

    def target(self, output: Tensor, index: int) -> tuple[Target, str]:
        label = int(output[index].argmax())
        return (lambda out: out[:, label]), f"logit of the top class '{self.class_names[label]}'"


_BY_ARCHITECTURE = {
    "img_focus_spa": SaliencyTask,
    "spa_vit_detector": DetectionTask,
    "spt_detector": DetectionTask,
    "spt_mask_rcnn": MaskRCNNTask,
    "spa_vit_mask_rcnn": MaskRCNNTask,
}
_BY_TASK = {cls.task: cls for cls in (SaliencyTask, DetectionTask, ClassificationTask)}


def adapter_for(model: nn.Module, config: dict[str, Any] | None = None) -> TaskAdapter:
    """The adapter of a loaded model, from its config's ``task`` / ``architecture`` or its shape.

    ``config`` defaults to the config.json the model was loaded from (:func:`checkpoint_config`).
    """
    config = checkpoint_config(model) if config is None else config
    task = config.get("task")
    if task is not None:
        if task not in _BY_TASK:
            raise ValueError(f"config.json names task {task!r}; known tasks: {sorted(_BY_TASK)}")
        return _BY_TASK[task](model, config)
    cls = _BY_ARCHITECTURE.get(config.get("architecture", ""))
    if cls is None:
        cls = DetectionTask if callable(getattr(model, "decode", None)) else ClassificationTask
    return cls(model, config)
