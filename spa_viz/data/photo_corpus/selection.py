"""The candidate photos (the installed Python packages' and the fetched Debian packages') and their
selection: filtered, de-duplicated, split by source photo."""

from __future__ import annotations

import importlib.metadata
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image
from tqdm import tqdm

from spa_viz.data import debian_photos, photos
from spa_viz.data.debian_photos import FetchedPackage, Member
from spa_viz.data.photo_corpus.filtering import (
    EXCLUDED_LICENSE_MARKERS,
    colour_thumb,
    group_duplicates,
    object_rejection,
    perceptual_hash,
    photo_rejection,
)
from spa_viz.data.photo_corpus.records import Candidate, PhotoRecord
from spa_viz.data.photo_corpus.splits import assign_splits, split_groups

__all__ = ["NOT_PHOTOS", "WORK_SIDE", "Selection", "debian_candidates", "python_photo_candidates", "select_photos"]


#: Photos are kept in memory at most this large (longer side) while views are cut from them.
WORK_SIDE = 1024
#: Package photos (of :data:`spa_viz.data.photos.PHOTOS`) that are not photographs.
NOT_PHOTOS = {"colorwheel": "a synthetic colour wheel, not a photograph"}
_DISTRIBUTIONS = {"skimage": "scikit-image", "sklearn": "scikit-learn", "matplotlib": "matplotlib", "gradio": "gradio"}


def python_photo_candidates() -> list[Candidate]:
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


def debian_candidates(packages: Sequence[FetchedPackage]) -> list[Candidate]:
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


@dataclass
class Selection:
    photos: list[PhotoRecord]  # group representatives, split set, duplicates listed
    objects: list[PhotoRecord]
    rejected: list[dict[str, str]]
    images: dict[str, Image.Image]  # id -> work image (RGB photos, RGBA objects)


def select_photos(candidates: Sequence[Candidate], object_min_side: int = 64) -> Selection:
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
        thumbs.append(colour_thumb(flat))
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
    links = split_groups(urls, [int(r.phash, 16) for r in representatives], [thumb_of[r.id] for r in representatives])
    # every member of a linked group (duplicates too) decides its split: a held-out one pins it
    assign_splits(
        [[by_id[m] for i in group for m in (representatives[i].id, *representatives[i].duplicates)] for group in links]
    )
    objects = [r for r in representatives if r.role == "objects"]
    representatives = [r for r in representatives if r.role != "objects"]
    representatives.sort(key=lambda r: r.id)
    objects.sort(key=lambda r: r.id)
    return Selection(representatives, objects, rejected, images)
