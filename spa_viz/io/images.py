"""Read user-supplied image files safely into RGB uint8 arrays, with messages a user can act on.

Why a module of its own: uploads can be anything (text, empty, truncated, 16-bit, palette, EXIF
rotated, decompression bombs). Every problem becomes an :class:`ImageInputError` whose message
names the file and what to do; everything that was converted is listed in ``notes``.
"""

from __future__ import annotations

import hashlib
import io
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = ["ImageInputError", "InputImage", "load_image"]

_log = logging.getLogger(__name__)
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")


class ImageInputError(ValueError):
    """An input file that cannot be used as an image; the message says why and what to do."""


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


def load_image(path: str | Path, *, max_pixels: int, max_side: int = 1024) -> InputImage:
    """Decode ``path`` into an :class:`InputImage` or raise :class:`ImageInputError`.

    Images over ``max_pixels`` are refused from their header, before any pixel is decoded
    (decompression-bomb guard); images with a side over ``max_side`` are downscaled (the models see
    128-224 px anyway).
    """
    path = Path(path)
    name = path.name
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ImageInputError(f"{name}: cannot read the file ({err.strerror or err})") from err
    if not data:
        raise ImageInputError(f"{name}: the file is empty (0 bytes); upload a PNG, JPEG, WebP, BMP or TIFF image")
    notes: list[str] = []
    with warnings.catch_warnings():
        # PIL's own bomb warning is replaced by the explicit max_pixels check below
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise ImageInputError(
                    f"{name}: {width}x{height} = {width * height / 1e6:.0f} megapixels is over the limit of "
                    f"{max_pixels / 1e6:.0f} megapixels; downscale the image before uploading"
                )
            orientation = image.getexif().get(0x0112, 1)
            if image.format == "JPEG":
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
                f"{name}: not an image file this app can read; upload a PNG, JPEG, WebP, BMP or TIFF image"
            ) from err
        except Image.DecompressionBombError as err:
            raise ImageInputError(
                f"{name}: refused as a possible decompression bomb ({err}); downscale the image before uploading"
            ) from err
        except (OSError, SyntaxError, ValueError) as err:
            raise ImageInputError(f"{name}: the image data is corrupt or truncated ({err})") from err
    original_size = (width, height) if orientation in (5, 6, 7, 8) else (height, width)
    image = _to_rgb(image, notes)
    if max(image.size) > max_side:
        image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    if max(original_size) > max_side:
        notes.append(f"downscaled from {original_size[1]}x{original_size[0]}")
    pixels = np.asarray(image, dtype=np.uint8)
    pixels.setflags(write=False)
    _log.debug("loaded %s %s %s", name, pixels.shape, notes)
    return InputImage(name, pixels, hashlib.sha1(data).hexdigest(), original_size, tuple(notes))
