"""Image sets a model is analysed over, read in batches of model inputs with their object annotations.

A source knows its images by position (``index``), so a row of a dataset analysis can name the
image again: :meth:`ImageSource.pixels` re-reads it for a thumbnail or to open it in the main
analysis. :meth:`ImageSource.batches` reads only the images of one batch at a time and turns them
into the model's input with the task adapter (the same preprocessing as an upload), with the object
masks and boxes mapped into the input's geometry, so memory stays bounded by the batch.

Sources: the generated digits' test split (:class:`DigitsSource`, cached once generated), the photo
corpus' test views and second check when the corpus is prepared (:class:`CorpusSource`; otherwise
:class:`SourceUnavailableError` says how to prepare it), and image files (:class:`FolderSource`, read
safely with :func:`~spa_viz.io.images.load_image`; unreadable files are skipped and listed).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from spa_viz.data.splits import DigitsData, data_config, digits_samples
from spa_viz.io.images import IMAGENET_MEAN, IMAGENET_STD, ImageInputError, denormalize, load_image

__all__ = [
    "BUILTIN_SOURCES",
    "CorpusSource",
    "DatasetBatch",
    "DigitsSource",
    "FolderSource",
    "ImageSource",
    "InputMapper",
    "SourceUnavailableError",
    "builtin_source",
]

log = logging.getLogger(__name__)

#: The largest image a folder source decodes (megapixels refused from the header) and the longest
#: side it keeps (larger images are downscaled on load): the app's upload limits.
MAX_IMAGE_PIXELS = 40_000_000
MAX_IMAGE_SIDE = 1024


class SourceUnavailableError(RuntimeError):
    """A source that cannot be read here (e.g. the photo corpus is not prepared); the message says how to get it."""


@dataclass
class DatasetBatch:
    """One batch of a source: model inputs and, where the source has them, object annotations.

    ``masks`` (one (h, w) bool union of the objects per image), ``boxes`` ((K, 4) xyxy) and
    ``classes`` ((K,) 0-based class ids of the boxes) are in the model input's pixels; None where
    the source has no such annotation.
    """

    images: Tensor
    names: list[str]
    indices: list[int]
    source: str
    masks: list[Tensor] | None = None
    boxes: list[Tensor] | None = None
    classes: list[Tensor] | None = None

    def __len__(self) -> int:
        return len(self.indices)

    def head(self, count: int) -> DatasetBatch:
        """The first ``count`` images of this batch."""

        def cut(values: list[Tensor] | None) -> list[Tensor] | None:
            return None if values is None else values[:count]

        return DatasetBatch(
            self.images[:count],
            self.names[:count],
            self.indices[:count],
            self.source,
            cut(self.masks),
            cut(self.boxes),
            cut(self.classes),
        )


class InputMapper(Protocol):
    """What a source needs of a task adapter (:class:`spa_viz.viz.tasks.TaskAdapter` has it): the input
    size, the preprocessing of an upload, and object masks and boxes mapped into the input."""

    input_size: tuple[int, int]

    def preprocess(self, pixels: np.ndarray) -> Tensor: ...

    def map_masks(self, masks: np.ndarray) -> Tensor: ...

    def map_boxes(self, image_size: tuple[int, int], boxes: np.ndarray) -> Tensor | None: ...


class ImageSource(Protocol):
    """What a dataset analysis reads: a named, indexed image set."""

    name: str

    def __len__(self) -> int: ...

    def pixels(self, index: int) -> np.ndarray:
        """RGB uint8 (H, W, 3) image ``index`` as the source holds it (for a thumbnail or the main analysis)."""
        ...

    def batches(self, task: InputMapper, batch_size: int = 32, max_images: int | None = None) -> Iterator[DatasetBatch]:
        """The first ``max_images`` images (None: all) as model inputs of ``task``, ``batch_size`` at a time."""
        ...


def _empty_mask(task: InputMapper) -> Tensor:
    return torch.zeros(task.input_size, dtype=torch.bool)


def _input_mask(task: InputMapper, masks: np.ndarray) -> Tensor:
    """The union of (K, H, W) object masks in the model input's geometry (all False without objects)."""
    return task.map_masks(masks) if len(masks) else _empty_mask(task)


def _chunks(count: int, batch_size: int) -> Iterator[range]:
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    for start in range(0, count, batch_size):
        yield range(start, min(start + batch_size, count))


def _limit(count: int, max_images: int | None) -> int:
    return count if max_images is None else max(0, min(count, max_images))


@dataclass
class DigitsSource:
    """A split of the generated cluttered digits (:mod:`spa_viz.data.digits`) with masks, boxes and classes.

    ``data`` gives seed and canvas (a digits detector's checkpoint names its own; default: the
    recipes' seed 0, 128 px); the images come from the digits cache when generated before.
    """

    split: str = "test"
    data: DigitsData = field(default_factory=DigitsData)
    num: int | None = None
    """Images of the split to read (None: the split's size in ``data``)."""

    def __post_init__(self) -> None:
        count = int(getattr(self.data, self.split)) if self.num is None else self.num
        self.samples = digits_samples(self.split, count, self.data.seed, self.data.canvas_size, self.data.cache)
        self.name = f"digits/{self.split}"

    def __len__(self) -> int:
        return len(self.samples)

    def pixels(self, index: int) -> np.ndarray:
        return self.samples[index].image

    def batches(self, task: InputMapper, batch_size: int = 32, max_images: int | None = None) -> Iterator[DatasetBatch]:
        for chunk in _chunks(_limit(len(self), max_images), batch_size):
            samples = [self.samples[i] for i in chunk]
            boxes = [task.map_boxes(s.image.shape[:2], s.boxes) for s in samples]
            yield DatasetBatch(
                images=torch.stack([task.preprocess(s.image) for s in samples]),
                names=[f"{self.split}_{i:06d}.png" for i in chunk],
                indices=list(chunk),
                source=self.name,
                masks=[_input_mask(task, s.masks) for s in samples],
                boxes=None if any(b is None for b in boxes) else boxes,
                classes=[torch.as_tensor(s.labels, dtype=torch.long) for s in samples],
            )


class CorpusSource:
    """The photo corpus' ``test`` views or its ``second_check`` (objects with exact masks), read view by view.

    Raises :class:`SourceUnavailableError` when the corpus is not prepared here. Test views carry no
    object annotation (their labels are the dense teacher's); second-check views carry the pasted
    object's mask.
    """

    def __init__(self, split: str = "test", seed: int = 0) -> None:
        from spa_viz.data.photo_corpus import CorpusError, load_views, second_check

        if split not in ("test", "second_check"):
            raise ValueError(f"unknown corpus split {split!r}; use 'test' or 'second_check'")
        try:
            self.views = second_check(seed) if split == "second_check" else load_views(split, seed)
        except CorpusError as err:
            raise SourceUnavailableError(f"photo corpus {split} is not available: {err}") from err
        self.split = split
        self.name = f"photo_corpus/{split}"

    def __len__(self) -> int:
        return len(self.views)

    def pixels(self, index: int) -> np.ndarray:
        # views are stored as uint8 and read back normalized with the ImageNet mean/std: exact round trip
        return denormalize(self.views[index].image, IMAGENET_MEAN, IMAGENET_STD)

    def batches(self, task: InputMapper, batch_size: int = 32, max_images: int | None = None) -> Iterator[DatasetBatch]:
        for chunk in _chunks(_limit(len(self), max_images), batch_size):
            views = [self.views[i] for i in chunk]
            masked = self.split == "second_check"
            yield DatasetBatch(
                images=torch.stack([task.preprocess(denormalize(v.image, IMAGENET_MEAN, IMAGENET_STD)) for v in views]),
                names=[str(v.meta["view_id"]) for v in views],
                indices=list(chunk),
                source=self.name,
                masks=[_input_mask(task, v.object_mask.numpy()[None]) for v in views] if masked else None,
            )


class FolderSource:
    """Image files (a folder's, sorted, or a given list), decoded safely one batch at a time.

    Files that are no usable image are skipped with a warning and listed in ``skipped`` as
    ``(path, reason)``; their index is not reused.
    """

    def __init__(self, files: Sequence[Path | str], name: str = "folder") -> None:
        self.files = [Path(f) for f in files]
        self.name = name
        self.skipped: list[tuple[str, str]] = []

    @classmethod
    def from_folder(cls, folder: Path | str) -> FolderSource:
        """Every visible file directly in ``folder``, sorted by name."""
        folder = Path(folder)
        if not folder.is_dir():
            raise ValueError(f"{folder} is not a folder")
        files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
        return cls(files, name=f"folder/{folder.name}")

    def __len__(self) -> int:
        return len(self.files)

    def pixels(self, index: int) -> np.ndarray:
        return load_image(self.files[index], max_pixels=MAX_IMAGE_PIXELS, max_side=MAX_IMAGE_SIDE).pixels

    def batches(self, task: InputMapper, batch_size: int = 32, max_images: int | None = None) -> Iterator[DatasetBatch]:
        for chunk in _chunks(_limit(len(self), max_images), batch_size):
            inputs, names, indices = [], [], []
            for i in chunk:
                try:
                    pixels = self.pixels(i)
                except ImageInputError as err:
                    self.skipped.append((str(self.files[i]), f"{err.reason} ({err})"))
                    log.warning("skipped %s: %s", self.files[i], err)
                    continue
                inputs.append(task.preprocess(pixels))
                names.append(self.files[i].name)
                indices.append(i)
            if inputs:
                yield DatasetBatch(torch.stack(inputs), names, indices, self.name)


#: The built-in sources by name (the app's choices); folders are opened with :class:`FolderSource`.
BUILTIN_SOURCES: tuple[str, ...] = ("digits/test", "photo_corpus/test", "photo_corpus/second_check")


def builtin_source(name: str, config: Mapping[str, Any] | None = None) -> ImageSource:
    """The built-in source ``name`` (:data:`BUILTIN_SOURCES`). ``config``: the model's checkpoint config;
    a digits detector's ``data`` section gives the digits' seed and canvas (else the recipes' defaults).

    Raises :class:`SourceUnavailableError` for a corpus source that is not prepared here.
    """
    if name == "digits/test":
        section = (config or {}).get("data")
        data = data_config(section) if section and section.get("kind", "digits") == "digits" else DigitsData()
        return DigitsSource("test", data)
    if name in ("photo_corpus/test", "photo_corpus/second_check"):
        return CorpusSource(name.split("/", 1)[1])
    raise ValueError(f"unknown source {name!r}; use one of {BUILTIN_SOURCES} or a folder")
