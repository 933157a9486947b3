"""The views of a split and their safetensors shards: what each view is (plain, augmented,
copy-paste, second-check object), its pixels and teacher outputs, written and reused shard by shard."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from tqdm import tqdm

from spa_viz.data import photos
from spa_viz.data.photo_corpus.records import CorpusError
from spa_viz.data.photo_corpus.teacher import Teacher, label_rule, teacher_outputs
from spa_viz.data.views import ViewConfig, paste_cutout, paste_object, salient_cutout
from spa_viz.io.files import write_atomic
from spa_viz.models.saliency.decoder import PATCH_SIZE

__all__ = ["SHARD_SIZE", "build_views"]

log = logging.getLogger(__name__)


SHARD_SIZE = 1024


def _code(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "big")


_KINDS = {"augment": 1, "paste": 2, "object": 3}


def _plan(split: str, photo_ids: Sequence[str], config: ViewConfig) -> list[dict[str, Any]]:
    """The view specs of one photo split, in shard order: plain, augmented, then copy-paste views."""
    per_photo = config.train_views_per_photo if split == "train" else config.eval_views_per_photo
    specs: list[dict[str, Any]] = [{"kind": "plain", "photo": p, "index": 0} for p in photo_ids]
    specs += [{"kind": "augment", "photo": p, "index": i} for p in photo_ids for i in range(1, per_photo)]
    pastes = round(len(specs) * config.paste_fraction / (1.0 - config.paste_fraction)) if len(photo_ids) > 1 else 0
    specs += [{"kind": "paste", "photo": "", "index": k} for k in range(pastes)]
    return specs


def _rng(seed: int, kind: str, *keys: int) -> np.random.Generator:
    return np.random.default_rng([seed, _KINDS[kind], *keys])


class _Donors:
    """Salient cut-outs of a split's plain views (from the teacher), for copy-paste composites."""

    def __init__(self, config: ViewConfig, threshold: float) -> None:
        self.config = config
        self.threshold = threshold
        self.cutouts: dict[str, Any] = {}

    def add(self, photo: str, image: np.ndarray, saliency: np.ndarray) -> None:
        try:
            cutout = salient_cutout(image, saliency, self.threshold)
        except ValueError:
            return
        low, high = self.config.paste_area
        if low <= cutout.area <= high:
            self.cutouts[photo] = cutout


def _make_view(
    spec: dict[str, Any], split: str, seed: int, work: dict[str, Image.Image], donors: _Donors, config: ViewConfig
) -> np.ndarray:
    """The pixels of one view spec; fills in ``photo``, ``pasted`` and ``params`` of paste specs."""
    if spec["kind"] == "plain":
        return photos.resize_square(np.asarray(work[spec["photo"]]), config.size)
    if spec["kind"] == "augment":
        rng = _rng(seed, "augment", _code(spec["photo"]), spec["index"])
        return photos.augment(np.asarray(work[spec["photo"]]), rng, config.augment)
    rng = _rng(seed, "paste", _code(split), spec["index"])
    names = sorted(work)
    base = names[int(rng.integers(len(names)))]
    options = sorted(d for d in donors.cutouts if d != base)
    if not options:
        raise CorpusError(f"split {split!r} has no photo with a salient cut-out to paste (need one besides {base!r})")
    donor = options[int(rng.integers(len(options)))]
    view = photos.augment(np.asarray(work[base]), rng, config.augment)
    composite, _, params = paste_cutout(view, donors.cutouts[donor], rng, config.paste_side)
    spec.update(photo=base, pasted=donor, params=params)
    return composite


def _shard_ranges(count: int) -> list[tuple[int, int]]:
    return [(start, min(count, start + SHARD_SIZE)) for start in range(0, count, SHARD_SIZE)]


def _read_shard(path: Path, key: str, start: int, count: int) -> tuple[dict[str, Tensor], list[dict[str, Any]]] | None:
    """(tensors, view specs) of a finished shard of this corpus key and range, else None."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("key") != key or meta.get("start") != str(start) or meta.get("count") != str(count):
                return None
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (a safetensors handle, not a dict)
            return tensors, json.loads(meta["specs"])
    except Exception as e:  # a torn or foreign file is recomputed, never trusted
        log.warning("ignoring unreadable shard %s (%s)", path, e)
        return None


def _write_shard(
    path: Path, tensors: dict[str, Tensor], key: str, start: int, count: int, specs: list[dict[str, Any]]
) -> None:
    from safetensors.torch import save_file

    metadata = {"key": key, "start": str(start), "count": str(count), "specs": json.dumps(specs)}
    write_atomic(path, lambda p: save_file({k: v.contiguous() for k, v in tensors.items()}, str(p), metadata=metadata))


def _object_view(
    spec: dict[str, Any],
    seed: int,
    backgrounds: dict[str, Image.Image],
    objects: dict[str, Image.Image],
    config: ViewConfig,
) -> tuple[np.ndarray, np.ndarray]:
    """A second-check view: object ``spec["pasted"]`` on a random crop of a random background."""
    rng = _rng(seed, "object", _code(spec["pasted"]))
    names = sorted(backgrounds)
    background = names[int(rng.integers(len(names)))]
    view = photos.augment(np.asarray(backgrounds[background]), rng, config.background)
    image, mask, params = paste_object(view, np.asarray(objects[spec["pasted"]]), rng, config.object_area)
    spec.update(photo=background, params=params)
    return image, mask


def _compute_shard(
    chunk: list[dict[str, Any]],
    split: str,
    work: dict[str, Image.Image],
    objects: dict[str, Image.Image] | None,
    donors: _Donors,
    config: ViewConfig,
    seed: int,
    teacher: Teacher,
) -> dict[str, Tensor]:
    """Pixels and teacher outputs of the views of ``chunk``.

    Copy-paste views come last in a split's plan and need the teacher's map of every plain view,
    so the teacher labels the chunk's other views first, then the copy-paste views are cut.
    """
    images: list[np.ndarray | None] = [None] * len(chunk)
    maps: list[Tensor | None] = [None] * len(chunk)
    labels: list[Tensor | None] = [None] * len(chunk)
    masks = []
    phases = (
        [i for i, s in enumerate(chunk) if s["kind"] != "paste"],
        [i for i, s in enumerate(chunk) if s["kind"] == "paste"],
    )
    for phase in phases:
        if not phase:
            continue
        for i in tqdm(phase, desc=f"{split} views", unit="view", leave=False):
            if chunk[i]["kind"] == "object":
                images[i], mask = _object_view(chunk[i], seed, work, objects or {}, config)
                masks.append(mask)
            else:
                images[i] = _make_view(chunk[i], split, seed, work, donors, config)
        saliency, tokens = teacher_outputs(np.stack([images[i] for i in phase]), teacher, desc=f"teacher {split}")
        for row, i in enumerate(phase):
            maps[i], labels[i] = saliency[row], tokens[row]
            if chunk[i]["kind"] == "plain":
                donors.add(chunk[i]["photo"], images[i], saliency[row, 0].float().numpy())
    tensors = {
        "images": torch.from_numpy(np.stack(images)),
        "saliency": torch.stack(maps),
        "labels": torch.stack(labels),
    }
    if masks:
        from spa_viz.selection.labels import labels_from_masks

        object_mask = torch.from_numpy(np.stack(masks))
        grid = (config.size // PATCH_SIZE,) * 2
        tensors["object_mask"] = object_mask
        tensors["object_tokens"] = torch.stack([labels_from_masks(m, grid) for m in object_mask])
    return tensors


def build_views(
    split: str,
    work: dict[str, Image.Image],
    config: ViewConfig,
    seed: int,
    directory: Path,
    key: str,
    teacher: Teacher,
    objects: dict[str, Image.Image] | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Compute (or reuse) the shards of one split; returns (view specs, shard records).

    ``work``: the split's photos (for ``second_check``: its backgrounds) by id; ``objects``: the
    second check's RGBA objects by id. A shard already on disk with this ``key`` is read back.
    """
    if split == "second_check":
        if not objects:
            raise CorpusError("the second check needs objects")
        specs = [{"kind": "object", "photo": "", "pasted": o, "index": 0} for o in sorted(objects)]
    else:
        specs = _plan(split, sorted(work), config)
    donors = _Donors(config, label_rule()["threshold"])
    shards = []
    ranges = _shard_ranges(len(specs))
    for number, (start, end) in enumerate(tqdm(ranges, desc=f"{split} shards", unit="shard")):
        path = directory / f"{split}-{number:03d}.safetensors"
        chunk = specs[start:end]
        stored = _read_shard(path, key, start, end - start)
        if stored is not None:
            tensors = stored[0]
            for spec, done in zip(chunk, stored[1]):
                spec.update(done)
            for spec, image, saliency in zip(chunk, tensors["images"], tensors["saliency"]):
                if spec["kind"] == "plain":
                    donors.add(spec["photo"], image.numpy(), saliency[0].float().numpy())
            log.info("reusing %s (%d views)", path.name, end - start)
        else:
            tensors = _compute_shard(chunk, split, work, objects, donors, config, seed, teacher)
            _write_shard(path, tensors, key, start, end - start, chunk)
        shards.append({"file": path.name, "split": split, "start": start, "count": end - start})
    for number, spec in enumerate(specs):
        spec["view_id"] = f"{split}/{number:05d}"
        spec.setdefault("pasted", "")
        spec.setdefault("params", {})
    return specs, shards
