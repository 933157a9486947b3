"""Example inputs that ship with installed packages: real photos and cluttered-digit images with boxes.

They are written once into a cache folder (digits are slow to generate on a small CPU) together
with the digits' annotations. Annotations are looked up by the sha1 of the file bytes, so an
example keeps its selection labels however it reaches the app (example click, upload, API).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from spa_viz.data.digits import generate_split
from spa_viz.data.photos import load_photo

__all__ = ["EXAMPLE_PHOTOS", "Annotation", "Examples", "build_examples"]

_log = logging.getLogger(__name__)
EXAMPLE_PHOTOS = (
    "chelsea",
    "astronaut",
    "coffee",
    "rocket",
    "china",
    "flower",
    "grace_hopper",
    "cheetah",
    "lion",
    "tower",
)
DIGITS_SPLIT, DIGITS_SEED, DIGITS_COUNT = "test", 0, 4
_VERSION = 1
_MANIFEST = "manifest.json"


@dataclass(frozen=True)
class Annotation:
    """Objects of one example image, in its own pixels: xyxy boxes, class labels, visible masks."""

    boxes: np.ndarray  # float32 (K, 4)
    labels: np.ndarray  # int64 (K,)
    masks: np.ndarray  # bool (K, H, W)


@dataclass(frozen=True)
class Examples:
    """Example files by group, and the annotations of those that have them (by file sha1)."""

    photos: tuple[Path, ...]
    digits: tuple[Path, ...]
    annotations: dict[str, Annotation]


def _sha1(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


def _write(folder: Path) -> None:
    """Write photos, digit images and digit annotations into ``folder`` (a fresh one), manifest last."""
    photos = []
    for name in EXAMPLE_PHOTOS:
        path = folder / f"{name}.jpg"
        Image.fromarray(load_photo(name)).save(path, quality=92)
        photos.append(path.name)
    samples = generate_split(DIGITS_SPLIT, DIGITS_COUNT, DIGITS_SEED)
    digits, arrays = [], {}
    for i, sample in enumerate(samples):
        path = folder / f"digits_{DIGITS_SPLIT}_{i:03d}.png"
        Image.fromarray(sample.image).save(path)
        digits.append(path.name)
        arrays |= {
            f"boxes_{i}": sample.boxes,
            f"labels_{i}": sample.labels,
            f"masks_{i}": np.packbits(sample.masks, axis=-1),
        }
    np.savez_compressed(folder / "digits_annotations.npz", **arrays)
    manifest = {"version": _VERSION, "photos": photos, "digits": digits}
    (folder / _MANIFEST).write_text(json.dumps(manifest, indent=2))


def _is_fresh(folder: Path) -> bool:
    """The folder holds a complete example set of this version."""
    try:
        manifest = json.loads((folder / _MANIFEST).read_text())
        return manifest.get("version") == _VERSION and all(
            (folder / n).is_file() for n in manifest["photos"] + manifest["digits"]
        )
    except (OSError, ValueError, KeyError):
        return False


def build_examples(folder: Path) -> Examples:
    """The example set in ``folder``, written there first if missing or from another version.

    Writing goes through a staging folder renamed into place, so concurrent processes (test
    workers, app instances) never see a half-written set.
    """
    if not _is_fresh(folder):
        _log.info("writing example images into %s (once)", folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
        try:
            _write(staging)
            if not _is_fresh(folder):  # another process may have finished first
                shutil.rmtree(folder, ignore_errors=True)
                os.replace(staging, folder)
        except OSError:
            if not _is_fresh(folder):
                raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    manifest = json.loads((folder / _MANIFEST).read_text())
    annotations = {}
    with np.load(folder / "digits_annotations.npz") as arrays:
        for i, name in enumerate(manifest["digits"]):
            path = folder / name
            with Image.open(path) as image:
                width = image.size[0]
            masks = np.unpackbits(arrays[f"masks_{i}"], axis=-1, count=width).astype(bool)
            annotations[_sha1(path)] = Annotation(arrays[f"boxes_{i}"], arrays[f"labels_{i}"], masks)
    return Examples(
        photos=tuple(folder / n for n in manifest["photos"]),
        digits=tuple(folder / n for n in manifest["digits"]),
        annotations=annotations,
    )
