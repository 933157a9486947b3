"""Splits by source photo, never by view: which split a source photo goes to, which photos must share
one, and the check that a built index keeps the rule."""

from __future__ import annotations

import fnmatch
import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from spa_viz.data.debian_photos import SECOND_CHECK_BACKGROUNDS
from spa_viz.data.photo_corpus.filtering import DUPLICATE_COLOUR, components, hamming
from spa_viz.data.photo_corpus.records import CorpusError, PhotoRecord

__all__ = [
    "CORPUS_SPLITS",
    "NEAR_BITS",
    "SPLITS",
    "SPLIT_FRACTIONS",
    "assign_splits",
    "check_index",
    "split_groups",
    "split_of",
]


SPLITS = ("train", "val", "test")
#: Splits of views: the three photo splits and the second check (objects on held-out backgrounds).
CORPUS_SPLITS = (*SPLITS, "second_check")
SPLIT_FRACTIONS = {"train": 0.8, "val": 0.1, "test": 0.1}
#: Photos whose hashes are at most this many bits apart share a split (the same view of one
#: landmark by two photographers, say), whether or not they are duplicates.
NEAR_BITS = 14


def split_groups(sources: Sequence[set[str]], hashes: Sequence[int], thumbs: Sequence[np.ndarray]) -> list[list[int]]:
    """Groups of indices that must share a split: a common original (source URL), or hashes at
    most :data:`NEAR_BITS` apart with colour thumbnails within twice :data:`DUPLICATE_COLOUR`."""
    first: dict[str, int] = {}
    pairs = [(first.setdefault(url, i), i) for i, urls in enumerate(sources) for url in sorted(urls)]
    pairs += [
        (i, j)
        for i in range(len(hashes))
        for j in range(i)
        if hamming(hashes[i], hashes[j]) <= NEAR_BITS
        and float(np.abs(thumbs[i] - thumbs[j]).mean()) <= 2 * DUPLICATE_COLOUR
    ]
    return components(len(sources), iter(pairs))


def split_of(key: str) -> str:
    """Train / val / test for a source photo, from a hash of its id (80 / 10 / 10 %)."""
    value = int.from_bytes(hashlib.sha256(f"spa-viz photo split|{key}".encode()).digest()[:8], "big") / 2**64
    edge = 0.0
    for split in SPLITS:
        edge += SPLIT_FRACTIONS[split]
        if value < edge:
            return split
    return SPLITS[-1]


def assign_splits(
    groups: Sequence[Sequence[PhotoRecord]], backgrounds: Sequence[str] = SECOND_CHECK_BACKGROUNDS
) -> None:
    """Set ``split`` on every record, one split per group (= source photo).

    ``held_out`` in a group pins it: to ``second_check`` when every member matches a listed
    background, else to ``test``. Other groups: :func:`split_of` of the smallest member id.
    """
    for group in groups:
        ids = sorted(r.id for r in group)
        if any(r.role == "objects" for r in group):
            split = "second_check"
        elif any(r.role == "held_out" for r in group):
            background = all(any(fnmatch.fnmatchcase(i, pattern) for pattern in backgrounds) for i in ids)
            split = "second_check" if background else "test"
        else:
            split = split_of(ids[0])
        for record in group:
            record.split = split


def check_index(index: dict[str, Any]) -> None:
    """Raise :class:`CorpusError` unless the index keeps every source photo in one split.

    Checked: a photo id (or a merged duplicate of it) is listed once; every view of a split uses
    photos of that split only (its base and its pasted donor); training views come from ``pool``
    photos only; and no package that gives the second check an object or a background gives a
    training view.
    """
    split_of_photo: dict[str, str] = {}
    package_of: dict[str, str] = {}
    role_of: dict[str, str] = {}
    for record in index["photos"] + index["objects"]:
        for member in [record["id"], *record["duplicates"]]:
            if member in split_of_photo:
                raise CorpusError(f"photo {member!r} is listed twice")
            split_of_photo[member] = record["split"]
        package_of[record["id"]] = record["package"]
        role_of[record["id"]] = record["role"]
    for split, specs in index["views"].items():
        for spec in specs:
            for source in (spec["photo"], spec["pasted"]):
                if not source:
                    continue
                if source not in split_of_photo:
                    raise CorpusError(f"view {spec['view_id']} uses unknown photo {source!r}")
                if split_of_photo[source] != split:
                    raise CorpusError(
                        f"view {spec['view_id']} of split {split!r} uses {source!r} of split {split_of_photo[source]!r}"
                    )
                if split == "train" and role_of[source] != "pool":
                    raise CorpusError(f"training view {spec['view_id']} uses {source!r} (role {role_of[source]!r})")
    train_packages = {package_of[s["photo"]] for s in index["views"].get("train", [])} | {
        package_of[s["pasted"]] for s in index["views"].get("train", []) if s["pasted"]
    }
    check_packages = {package_of[s[k]] for s in index["views"].get("second_check", []) for k in ("photo", "pasted")}
    shared = train_packages & check_packages
    if shared:
        raise CorpusError(f"packages {sorted(shared)} give both training views and second-check images")
