"""COCO-format detection datasets with transforms that keep images, boxes and masks aligned.

Why: SPA is trained and inspected on detection data; every sample must come with boxes (and masks
when the annotations have them) in the resized image's pixel frame so that selection labels
(``spa_viz.selection.labels``) can be made for any token grid.

Targets hold 'boxes' float32 [K, 4] xyxy in resized pixels, 'labels' int64 [K] in 0..C-1 (COCO
category ids sorted ascending), 'masks' bool [K, S, S] when available, 'image_id', 'orig_size'
(H, W) and 'valid_size' (h, w) of the image inside the letterbox. Random flips draw from torch's
global RNG: seed it with ``torch.manual_seed`` (DataLoader workers derive their seeds from it).
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from spa_viz.data.transforms import DetectionTransform, Target
from spa_viz.io.images import IMAGENET_MEAN, IMAGENET_STD
from spa_viz.selection.labels import TokenGrid, multiscale_labels

__all__ = [
    "CocoDetection",
    "DetectionSample",
    "InMemoryDetection",
    "add_selection_labels",
    "collate",
]

log = logging.getLogger(__name__)


def add_selection_labels(target: Target, image_size: tuple[int, int], grids: Sequence[tuple[int, int]]) -> Target:
    """Set ``target['select_labels']``: one bool [gh * gw] SPA selection label per grid (from masks
    when the target has them, else from boxes)."""
    target["select_labels"] = [labels[0] for labels in multiscale_labels([target], image_size, grids)]
    return target


def collate(batch: Sequence[tuple[Tensor, Target]]) -> tuple[Tensor, list[Target]]:
    """Stack the images of a batch; keep targets as a list (object counts differ per image)."""
    if len(batch) == 0:
        raise ValueError("cannot collate an empty batch")
    images, targets = zip(*batch)
    if len({tuple(image.shape) for image in images}) != 1:
        raise ValueError("images in a batch differ in shape; letterbox them to one size first")
    return torch.stack(images), list(targets)


class _DetectionDataset(Dataset):
    """Shared __getitem__: load a raw sample, transform it, optionally add selection labels."""

    def __init__(
        self, transform: DetectionTransform, select_grids: Sequence[TokenGrid | tuple[int, int]] | None
    ) -> None:
        self.transform = transform
        self.select_grids = (
            None if select_grids is None else [g if isinstance(g, TokenGrid) else tuple(g) for g in select_grids]
        )

    def _raw(self, index: int) -> tuple[Tensor, Target]:
        """uint8 [3, H, W] image and target in original pixels."""
        raise NotImplementedError

    @property
    def has_masks(self) -> bool:
        """Whether samples come with instance masks (else selection labels and training use boxes)."""
        raise NotImplementedError

    def __getitem__(self, index: int) -> tuple[Tensor, Target]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        image, target = self.transform(*self._raw(index % len(self)))
        if self.select_grids is not None:
            if self.transform.size is None:
                raise ValueError("selection labels in the dataset need a letterbox size; make them after resizing")
            add_selection_labels(target, (self.transform.size, self.transform.size), self.select_grids)
        return image, target


def _decode_segmentation(segmentation: Any, height: int, width: int) -> np.ndarray:
    """Polygon list, uncompressed RLE or compressed RLE -> bool [H, W] mask (via pycocotools)."""
    from pycocotools import mask as mask_utils

    if isinstance(segmentation, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), list):
        rle = mask_utils.frPyObjects(segmentation, height, width)
    elif isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), (str, bytes)):
        rle = segmentation
    else:
        raise ValueError("segmentation must be polygons, or an RLE dict with 'counts' and 'size'")
    with warnings.catch_warnings():  # pycocotools 2.0.x under numpy 2 warns on every decode
        warnings.filterwarnings("ignore", message="__array__ implementation", category=DeprecationWarning)
        mask = mask_utils.decode(rle).astype(bool)
    if mask.shape != (height, width):
        raise ValueError(f"RLE of size {mask.shape} does not match its {height}x{width} image")
    return mask


class CocoDetection(_DetectionDataset):
    """A COCO detection dataset (annotations JSON + image folder) as a torch Dataset.

    Crowd annotations and boxes with zero width or height are skipped. 'masks' are returned when
    ``with_masks`` is set and every kept annotation of the image has a segmentation.
    """

    def __init__(
        self,
        annotation_file: str | Path,
        image_dir: str | Path,
        size: int | None,
        train: bool = False,
        with_masks: bool = True,
        select_grids: Sequence[TokenGrid | tuple[int, int]] | None = None,
        hflip_prob: float = 0.5,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
    ) -> None:
        super().__init__(DetectionTransform(size, train, hflip_prob, mean, std), select_grids)
        self.annotation_file = Path(annotation_file)
        self.image_dir = Path(image_dir)
        self.with_masks = with_masks
        if not self.image_dir.is_dir():
            raise ValueError(f"image_dir {self.image_dir} is not a directory; check the path")
        try:
            coco = json.loads(self.annotation_file.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f"cannot read COCO annotations {self.annotation_file}: {error}") from error
        if not isinstance(coco, dict) or not all(k in coco for k in ("images", "annotations", "categories")):
            raise ValueError(
                f"{self.annotation_file} is not COCO detection JSON: need 'images', 'annotations' and 'categories'"
            )
        categories = sorted(coco["categories"], key=lambda c: c["id"])
        self.class_names: list[str] = [str(c["name"]) for c in categories]
        self.cat_id_to_label: dict[int, int] = {c["id"]: i for i, c in enumerate(categories)}
        self.label_to_cat_id: list[int] = [c["id"] for c in categories]
        self.images: list[dict[str, Any]] = sorted(coco["images"], key=lambda im: im["id"])
        known = {im["id"] for im in self.images}
        self._annotations: dict[int, list[dict[str, Any]]] = {im["id"]: [] for im in self.images}
        for ann in coco["annotations"]:
            if ann["image_id"] not in known:
                raise ValueError(f"annotation {ann.get('id')} refers to unknown image {ann['image_id']}")
            if ann["category_id"] not in self.cat_id_to_label:
                raise ValueError(
                    f"annotation {ann.get('id')} has category {ann['category_id']} missing from 'categories'"
                )
            _, _, w, h = ann["bbox"]
            if not ann.get("iscrowd", 0) and w > 0 and h > 0:
                self._annotations[ann["image_id"]].append(ann)
        missing = [im["file_name"] for im in self.images if not (self.image_dir / im["file_name"]).is_file()]
        if missing:
            raise ValueError(
                f"{len(missing)} image files listed in {self.annotation_file} are missing "
                f"from {self.image_dir} (first: {missing[:3]}); fix the paths or regenerate"
            )
        log.debug("loaded %d images from %s", len(self.images), self.annotation_file)

    def __len__(self) -> int:
        return len(self.images)

    @property
    def has_masks(self) -> bool:
        """True when masks are wanted and at least one kept annotation has a segmentation."""
        return self.with_masks and any(a.get("segmentation") for anns in self._annotations.values() for a in anns)

    def _raw(self, index: int) -> tuple[Tensor, Target]:
        info = self.images[index]
        path = self.image_dir / info["file_name"]
        try:
            with Image.open(path) as file:
                pixels = np.array(file.convert("RGB"))
        except (OSError, SyntaxError, ValueError) as error:
            raise ValueError(
                f"cannot read image {path} (id {info['id']}): {error}; the file is "
                "missing or corrupt, replace it or regenerate the dataset"
            ) from error
        height, width = pixels.shape[:2]
        if (height, width) != (info["height"], info["width"]):
            raise ValueError(
                f"image {path} is {width}x{height} but the JSON says "
                f"{info['width']}x{info['height']}; fix the annotations"
            )
        anns = self._annotations[info["id"]]
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        target: Target = {
            "boxes": boxes,
            "labels": torch.tensor([self.cat_id_to_label[a["category_id"]] for a in anns], dtype=torch.int64),
            "image_id": int(info["id"]),
        }
        if self.with_masks and all(a.get("segmentation") for a in anns):
            masks = [_decode_segmentation(a["segmentation"], height, width) for a in anns]
            target["masks"] = (
                torch.from_numpy(np.stack(masks)) if masks else torch.zeros(0, height, width, dtype=torch.bool)
            )
        return torch.from_numpy(pixels).permute(2, 0, 1).contiguous(), target


class DetectionSample(Protocol):
    """What ``InMemoryDetection`` reads from a sample (e.g. ``spa_viz.data.digits.DigitSample``)."""

    image: np.ndarray  # uint8 [H, W, 3]
    boxes: np.ndarray  # [K, 4] xyxy pixels
    labels: np.ndarray  # [K] contiguous class indices
    masks: np.ndarray | None  # bool [K, H, W] or None


class InMemoryDetection(_DetectionDataset):
    """In-memory samples (e.g. from ``digits.generate_split``) behind the same transforms as COCO.

    Image ids are 1 + the sample index, as in the COCO files the digits generator writes.
    """

    def __init__(
        self,
        samples: Sequence[DetectionSample],
        size: int | None,
        train: bool = False,
        select_grids: Sequence[TokenGrid | tuple[int, int]] | None = None,
        hflip_prob: float = 0.5,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
    ) -> None:
        super().__init__(DetectionTransform(size, train, hflip_prob, mean, std), select_grids)
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def has_masks(self) -> bool:
        return any(sample.masks is not None for sample in self.samples[:1])

    def _raw(self, index: int) -> tuple[Tensor, Target]:
        sample = self.samples[index]
        image = np.asarray(sample.image)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"sample {index}: image must be uint8 [H, W, 3], got {image.dtype} {image.shape}")
        target: Target = {
            "boxes": torch.as_tensor(np.asarray(sample.boxes, dtype=np.float32)).reshape(-1, 4),
            "labels": torch.as_tensor(np.asarray(sample.labels, dtype=np.int64)),
            "image_id": index + 1,
        }
        if sample.masks is not None:
            target["masks"] = torch.as_tensor(np.asarray(sample.masks, dtype=bool))
        return torch.from_numpy(image).permute(2, 0, 1).contiguous(), target
