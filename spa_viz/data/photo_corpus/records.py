"""The records every step of the photo corpus shares: a kept photo with its provenance, a candidate
photo, and the error raised when the corpus breaks its rules."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from PIL import Image

__all__ = ["Candidate", "CorpusError", "PhotoRecord"]


class CorpusError(RuntimeError):
    """The cached corpus is missing, incomplete or breaks the split-by-source rule."""


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
