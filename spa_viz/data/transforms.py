"""Detection transforms that keep an image, its boxes and its masks aligned: flip, letterbox, normalize.

Targets hold 'boxes' float32 [K, 4] xyxy and optionally 'masks' bool [K, H, W]; after the
transform they are in the resized image's pixel frame, with 'orig_size' (H, W) and 'valid_size'
(h, w) of the image inside the letterbox. Random flips draw from torch's global RNG.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

from spa_viz.io.images import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["DetectionTransform", "Target", "hflip", "letterbox"]

Target = dict[str, Any]


def hflip(image: Tensor, target: Target) -> tuple[Tensor, Target]:
    """Mirror a [C, H, W] image left-right together with its boxes and masks."""
    width = image.shape[-1]
    target = dict(target)
    boxes = target["boxes"]
    target["boxes"] = torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)
    if "masks" in target:
        target["masks"] = target["masks"].flip(-1)
    return image.flip(-1), target


def letterbox(image: Tensor, target: Target, size: int) -> tuple[Tensor, Target]:
    """Resize a float [C, H, W] image so its longer side is ``size``, keeping the aspect ratio, and
    zero-pad the bottom and right to ``size`` x ``size``; boxes and masks follow."""
    channels, height, width = image.shape
    scale = size / max(height, width)
    new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
    resized = F.interpolate(image[None], size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True)[0]
    out = image.new_zeros(channels, size, size)
    out[:, :new_h, :new_w] = resized
    target = dict(target)
    factors = torch.tensor([new_w / width, new_h / height] * 2, dtype=target["boxes"].dtype)
    target["boxes"] = target["boxes"] * factors.to(target["boxes"].device)
    if "masks" in target:
        masks = target["masks"]
        padded = torch.zeros(masks.shape[0], size, size, dtype=torch.bool, device=masks.device)
        if masks.shape[0] > 0:
            soft = F.interpolate(
                masks[None].float(),
                size=(new_h, new_w),
                mode="bilinear",
                align_corners=False,
                antialias=True,
            )[0]
            padded[:, :new_h, :new_w] = soft >= 0.5
        target["masks"] = padded
    target["valid_size"] = (new_h, new_w)
    return out, target


@dataclass(frozen=True)
class DetectionTransform:
    """uint8 [3, H, W] image + target -> normalised, letterboxed float [3, size, size] + target.

    With ``train=True`` the image is mirrored with probability ``hflip_prob`` first. Padding is 0
    after normalisation, i.e. the mean colour. ``size=None`` keeps the image's own size (no
    letterbox): for detectors that resize and pad batches themselves (torchvision's R-CNNs).
    """

    size: int | None
    train: bool = False
    hflip_prob: float = 0.5
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        """Validate the settings."""
        if self.size is not None and self.size < 1:
            raise ValueError(
                f"size must be a positive number of pixels (or None: keep the image size), got {self.size}"
            )
        if not 0.0 <= self.hflip_prob <= 1.0:
            raise ValueError(f"hflip_prob must lie in [0, 1], got {self.hflip_prob}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError("mean and std need 3 values each, std all positive")

    def __call__(self, image: Tensor, target: Target) -> tuple[Tensor, Target]:
        """Apply flip (train only), letterbox and normalisation."""
        if image.ndim != 3 or image.shape[0] != 3 or image.dtype != torch.uint8:
            raise ValueError(f"expected a uint8 [3, H, W] image, got {image.dtype} {tuple(image.shape)}")
        target = dict(target, orig_size=(image.shape[1], image.shape[2]))
        if self.train and torch.rand(()) < self.hflip_prob:
            image, target = hflip(image, target)
        image = image.float() / 255.0
        mean = torch.tensor(self.mean, device=image.device).view(3, 1, 1)
        std = torch.tensor(self.std, device=image.device).view(3, 1, 1)
        image = (image - mean) / std
        if self.size is None:
            return image, dict(target, valid_size=(image.shape[1], image.shape[2]))
        return letterbox(image, target, self.size)
