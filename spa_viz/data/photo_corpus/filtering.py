"""Which images count as photos (or as photographed objects), and which files show the same photo:
the filters, the perceptual hash and the duplicate groups."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
from PIL import Image

__all__ = [
    "DUPLICATE_BITS",
    "DUPLICATE_COLOUR",
    "EXCLUDED_LICENSE_MARKERS",
    "MAX_FLAT_SHARE",
    "MIN_SIDE",
    "colour_thumb",
    "components",
    "group_duplicates",
    "hamming",
    "object_rejection",
    "perceptual_hash",
    "photo_rejection",
]


#: Photos whose shorter side is smaller than this are left out (icons, thumbnails).
MIN_SIDE = 160
#: Share of pixels (the most frequent colour, e.g. a plain backdrop, set aside) that the next 16
#: exact colours may cover before an image counts as flat art.
MAX_FLAT_SHARE = 0.9
#: Licenses with one of these markers are left out (non-commercial terms).
EXCLUDED_LICENSE_MARKERS = ("-NC", " NC")
#: Perceptual hashes at most this many bits apart, with similar colour thumbnails, are one photo.
DUPLICATE_BITS = 10
DUPLICATE_COLOUR = 12.0  # mean absolute difference of 8 x 8 colour thumbnails (0-255)


def _flat_share(rgb: np.ndarray) -> float:
    """Share of the pixels outside the most frequent exact colour that the next 16 colours cover.

    Setting the top colour aside keeps product shots on a plain backdrop and night skies (photos)
    apart from drawings and logos, whose few flat colours fill everything.
    """
    pixels = rgb.reshape(-1, 3).astype(np.uint32)
    codes = (pixels[:, 0] << 16) | (pixels[:, 1] << 8) | pixels[:, 2]
    counts = np.sort(np.unique(codes, return_counts=True)[1])[::-1]
    rest = codes.size - counts[0]
    return float(counts[1:17].sum() / rest) if rest else 1.0


def _thumbnail(image: Image.Image, side: int = 128) -> np.ndarray:
    small = image.copy()
    small.thumbnail((side, side), Image.Resampling.NEAREST, reducing_gap=None)
    return np.asarray(small)


def photo_rejection(image: Image.Image, min_side: int = MIN_SIDE) -> str | None:
    """Why ``image`` is not kept as a photograph, or None when it is.

    Too small (shorter side < ``min_side``: icons, thumbnails); transparent pixels (a cut-out or a
    sprite, not a photo); flat colours (:func:`_flat_share` of a thumbnail above
    :data:`MAX_FLAT_SHARE`: drawings, logos; camera noise and JPEG make exact colours rare in
    photographs). This is a safety net under the per-package allow-lists, which are the rule:
    smooth renders have no flat colours and are left out by the allow-lists alone.
    """
    width, height = image.size
    if min(width, height) < min_side:
        return f"too small ({width}x{height}, shorter side < {min_side} px)"
    if "A" in image.getbands() or image.mode == "P" and "transparency" in image.info:
        alpha = np.asarray(image.convert("RGBA").getchannel("A"))
        if (alpha < 250).mean() > 0.01:
            return "transparent pixels (a cut-out or sprite, not a photo)"
    share = _flat_share(_thumbnail(image.convert("RGB")))
    if share > MAX_FLAT_SHARE:
        return f"flat colours (16 colours cover {share:.0%} of the pixels besides the main one: drawing or logo)"
    return None


def object_rejection(image: Image.Image, min_side: int = 64) -> str | None:
    """Why ``image`` is not kept as a photographed object with an exact mask, or None when it is.

    It needs an alpha channel with transparent and opaque pixels, an opaque box whose shorter side is
    at least ``min_side`` and whose area is at least 10 % opaque, and no flat colours inside.
    """
    if "A" not in image.getbands() and not (image.mode == "P" and "transparency" in image.info):
        return "no alpha channel"
    rgba = np.asarray(image.convert("RGBA"))
    opaque = rgba[..., 3] >= 128
    if opaque.all() or not opaque.any():
        return "alpha channel without both transparent and opaque pixels"
    rows, cols = np.flatnonzero(opaque.any(1)), np.flatnonzero(opaque.any(0))
    box_h, box_w = rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1
    if min(box_h, box_w) < min_side:
        return f"too small ({box_w}x{box_h} opaque box, shorter side < {min_side} px)"
    if opaque.sum() < 0.1 * box_h * box_w:
        return "opaque pixels fill under 10% of their box (thin or scattered shape)"
    share = _flat_share(rgba[..., :3][opaque][:, None, :])
    if share > MAX_FLAT_SHARE:
        return f"flat colours (16 colours cover {share:.0%} of the object besides its main one: drawing or logo)"
    return None


def _dct_matrix(n: int) -> np.ndarray:
    k = np.arange(n)[:, None]
    return np.cos(np.pi * (2 * np.arange(n)[None, :] + 1) * k / (2 * n))


_DCT32 = _dct_matrix(32)


def perceptual_hash(image: Image.Image) -> int:
    """64-bit DCT hash: the 8 x 8 lowest frequencies of a 32 x 32 grey thumbnail above their median.

    Robust to resizing and recompression; two files of one photo differ in a few bits.
    """
    grey = np.asarray(image.convert("L").resize((32, 32), Image.Resampling.BOX), dtype=np.float64)
    low = (_DCT32 @ grey @ _DCT32.T)[:8, :8].ravel()
    bits = low > np.median(low[1:])
    return int(sum(1 << i for i, bit in enumerate(bits) if bit))


def hamming(a: int, b: int) -> int:
    """Number of differing bits."""
    return (a ^ b).bit_count()


def colour_thumb(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB").resize((8, 8), Image.Resampling.BOX), dtype=np.float32)


def components(count: int, pairs: Iterator[tuple[int, int]]) -> list[list[int]]:
    """Connected components of ``range(count)`` under ``pairs`` (sorted, ordered by first index)."""
    parent = list(range(count))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in pairs:
        a, b = root(i), root(j)
        parent[max(a, b)] = min(a, b)
    groups: dict[int, list[int]] = {}
    for i in range(count):
        groups.setdefault(root(i), []).append(i)
    return sorted(groups.values())


def group_duplicates(hashes: Sequence[int], thumbs: Sequence[np.ndarray]) -> list[list[int]]:
    """Groups of indices that show one photo: perceptual hashes at most :data:`DUPLICATE_BITS` apart
    and 8 x 8 colour thumbnails within :data:`DUPLICATE_COLOUR` (so two different objects on one
    white backdrop stay apart)."""
    pairs = (
        (i, j)
        for i in range(len(hashes))
        for j in range(i)
        if hamming(hashes[i], hashes[j]) <= DUPLICATE_BITS
        and float(np.abs(thumbs[i] - thumbs[j]).mean()) <= DUPLICATE_COLOUR
    )
    return components(len(hashes), pairs)
