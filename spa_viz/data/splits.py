"""The detection data a recipe names: typed ``data`` sections and the datasets they describe.

A training recipe's (and a detection checkpoint's) ``data`` section is either generated digits
(:class:`DigitsData`) or COCO-format files (:class:`CocoData`); :func:`data_config` reads the JSON
object strictly and :func:`load_split` turns it into a letterboxed dataset. Generated digits are
cached (``cache_dir("digits")``), since generating is slow on a small CPU and the result is
deterministic.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from spa_viz.data.coco import CocoDetection, InMemoryDetection
from spa_viz.data.digits import CATEGORIES, DigitsConfig, generate_split
from spa_viz.io.config import ConfigError, from_dict
from spa_viz.io.files import write_atomic
from spa_viz.io.paths import cache_dir
from spa_viz.selection.labels import TokenGrid

__all__ = [
    "CocoData",
    "CocoFiles",
    "DataConfig",
    "DigitsData",
    "Sample",
    "class_names",
    "data_config",
    "digits_samples",
    "load_split",
]

log = logging.getLogger(__name__)

_CACHE_VERSION = 1


@dataclass(frozen=True)
class DigitsData:
    """Generated cluttered digits (:mod:`spa_viz.data.digits`): images per split, seed, canvas, cache."""

    kind: str = "digits"
    seed: int = 0
    canvas_size: int = 128
    train: int = 4000
    val: int = 300
    test: int = 500
    cache: bool = True
    hflip: float = 0.0  # probability of a random left-right flip while training (digits are not symmetric)


@dataclass(frozen=True)
class CocoFiles:
    """One split of a COCO-format dataset: the annotations JSON and the image folder."""

    annotations: str
    images: str


@dataclass(frozen=True)
class CocoData:
    """COCO-format files per split (streamed from disk)."""

    kind: str = "coco"
    train: CocoFiles | None = None
    val: CocoFiles | None = None
    test: CocoFiles | None = None
    hflip: float = 0.0
    with_masks: bool = True


DataConfig = DigitsData | CocoData
_KINDS: dict[str, type[DigitsData] | type[CocoData]] = {"digits": DigitsData, "coco": CocoData}


def data_config(data: Mapping[str, Any], where: str = "data") -> DataConfig:
    """The typed data section of a recipe or checkpoint config (``kind`` picks the type; default digits)."""
    kind = data.get("kind", "digits")
    if kind not in _KINDS:
        raise ConfigError(f"{where}: unknown data kind {kind!r}; use one of {sorted(_KINDS)}")
    return from_dict(_KINDS[kind], data, where=where)


@dataclass(frozen=True)
class Sample:
    """One in-memory detection image (what ``InMemoryDetection`` reads)."""

    image: np.ndarray  # uint8 [H, W, 3]
    boxes: np.ndarray  # float32 [K, 4] xyxy
    labels: np.ndarray  # int64 [K]
    masks: np.ndarray  # bool [K, H, W]


def _cache_key(split: str, seed: int, config: DigitsConfig) -> str:
    blob = json.dumps({"v": _CACHE_VERSION, "split": split, "seed": seed, "config": asdict(config)}, sort_keys=True)
    return f"{split}-seed{seed}-{hashlib.sha1(blob.encode()).hexdigest()[:12]}"


def _save_cache(path: Path, samples: Sequence[Sample]) -> None:
    """Write samples to one .npz (masks bit-packed), atomically."""
    masks = [s.masks.reshape(len(s.masks), -1) for s in samples]
    arrays = {
        "images": np.stack([s.image for s in samples]),
        "counts": np.array([len(s.boxes) for s in samples], dtype=np.int64),
        "boxes": np.concatenate([s.boxes.reshape(-1, 4) for s in samples]).astype(np.float32),
        "labels": np.concatenate([s.labels for s in samples]).astype(np.int64),
        "masks": np.packbits(np.concatenate(masks), axis=1),
    }
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:  # a file object: np.savez would append .npz to a path
            np.savez(handle, **arrays)

    write_atomic(path, write)


def _load_cache(path: Path, num: int) -> list[Sample]:
    with np.load(path) as data:
        images, counts = data["images"][:num], data["counts"]
        starts = np.concatenate([[0], np.cumsum(counts)])
        height, width = images.shape[1:3]
        masks = np.unpackbits(data["masks"][: starts[num]], axis=1, count=height * width).astype(bool)
        boxes, labels = data["boxes"], data["labels"]
    return [
        Sample(
            images[i],
            boxes[starts[i] : starts[i + 1]],
            labels[starts[i] : starts[i + 1]],
            masks[starts[i] : starts[i + 1]].reshape(-1, height, width),
        )
        for i in range(num)
    ]


def digits_samples(split: str, num: int, seed: int, canvas_size: int = 128, cache: bool = False) -> list[Sample]:
    """The first ``num`` images of a cluttered-digits split (image i depends only on seed, split, i).

    With ``cache``, generated images are kept in ``cache_dir("digits")`` and any cached prefix at
    least ``num`` long is reused.
    """
    config = DigitsConfig.for_canvas(canvas_size)
    key = _cache_key(split, seed, config)
    root = cache_dir("digits")
    if cache:
        for path in sorted(root.glob(f"{key}-n*.npz")) if root.is_dir() else []:
            if int(path.stem.rsplit("-n", 1)[1]) >= num:
                log.info("digits/%s: %d images from cache %s", split, num, path)
                return _load_cache(path, num)
    generated = generate_split(split, num, seed, config=config, progress=sys.stderr.isatty())
    samples = [Sample(s.image, s.boxes, s.labels, s.masks) for s in generated]
    if cache and num > 0:
        _save_cache(root / f"{key}-n{num}.npz", samples)
    return samples


def load_split(
    data: DataConfig,
    split: str,
    image_size: int | None,
    *,
    num: int | None = None,
    train: bool = False,
    select_grids: Sequence[TokenGrid | tuple[int, int]] | None = None,
    cache: bool | None = None,
) -> Dataset:
    """The dataset ``data`` describes for ``split``, letterboxed to ``image_size`` (None: each image at
    its own size, for detectors that resize themselves).

    ``num`` takes the first ``num`` images; ``train`` turns on the random flip with ``data.hflip``
    (default 0: digits are not mirror-symmetric); ``cache`` overrides ``data.cache`` for digits.
    """
    if isinstance(data, DigitsData):
        count = int(getattr(data, split)) if num is None else num
        samples = digits_samples(split, count, data.seed, data.canvas_size, data.cache if cache is None else cache)
        flip = train and data.hflip > 0
        return InMemoryDetection(samples, image_size, train=flip, select_grids=select_grids, hflip_prob=data.hflip)
    files = getattr(data, split)
    if files is None:
        raise ValueError(f"the data section has no {split!r} entry with annotations and images")
    dataset = CocoDetection(
        files.annotations,
        files.images,
        image_size,
        train=train and data.hflip > 0,
        with_masks=data.with_masks,
        select_grids=select_grids,
        hflip_prob=data.hflip,
    )
    if num is not None:
        return torch.utils.data.Subset(dataset, range(min(num, len(dataset))))
    return dataset


def class_names(data: DataConfig) -> list[str]:
    """Class names of a data section (digits: "0".."9"; COCO: read from the train annotations)."""
    if isinstance(data, DigitsData):
        return [c["name"] for c in CATEGORIES]
    if data.train is None:
        raise ValueError("the data section has no 'train' entry to read the class names from")
    coco = json.loads(Path(data.train.annotations).read_text())
    return [str(c["name"]) for c in sorted(coco["categories"], key=lambda c: c["id"])]
