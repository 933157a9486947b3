"""The app's own files on disk (rendered panels, report zips): bounded in count and removed at exit.

Everything the app writes lives in one folder, :class:`AppFiles`, with one :class:`BoundedFolder`
per kind of file. A bounded folder keeps at most ``capacity`` entries and drops the least recently
used one when a new one comes. The folder is removed by :meth:`AppFiles.close`, or at the latest
when the interpreter exits.

``python -m app`` puts this folder inside gradio's cache folder, so gradio serves the files
without copying each of them into its cache first (one copy on disk, counted by these caps).
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
import threading
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "AppFiles",
    "BoundedFolder",
    "DiskUsage",
    "UploadSweeper",
    "disk_usage",
    "gradio_cache_dir",
    "sweep_upload_leftovers",
]

_log = logging.getLogger(__name__)


def gradio_cache_dir() -> Path:
    """Gradio's cache folder: ``$GRADIO_TEMP_DIR`` (``python -m app`` sets one per process), else gradio's
    default under the system temp folder."""
    return Path(os.environ.get("GRADIO_TEMP_DIR") or Path(tempfile.gettempdir()) / "gradio")


def sweep_upload_leftovers(folder: Path, age_s: float, now: float | None = None) -> int:
    """Remove the empty ``tmp*`` files older than ``age_s`` directly in ``folder`` (gradio's cache) and
    return how many went. Gradio's multipart parser streams every upload into such a temporary file,
    keeps its own copy under a hashed folder, and leaves the temporary file behind empty; its own cache
    sweep does not remove them, so browser use piled them up. Files with content and young ones stay."""
    now = time.time() if now is None else now
    removed = 0
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return 0
    for entry in entries:
        if not entry.name.startswith("tmp"):
            continue
        try:
            info = entry.stat(follow_symlinks=False)
            if entry.is_file(follow_symlinks=False) and info.st_size == 0 and now - info.st_mtime > age_s:
                os.unlink(entry.path)
                removed += 1
        except OSError:  # gone meanwhile, or not ours to remove
            continue
    if removed:
        _log.info("removed %d empty upload leftovers from %s", removed, folder)
    return removed


class UploadSweeper:
    """At most every ``check_s``: remove gradio's empty upload leftovers older than ``age_s`` (gradio 6.31
    leaves an empty ``tmp*`` file in its cache for every upload; see :func:`sweep_upload_leftovers`)."""

    def __init__(self, check_s: float, age_s: float) -> None:
        self.check_s, self.age_s = check_s, age_s
        self._last = -math.inf
        self._lock = threading.Lock()

    def __call__(self) -> None:
        with self._lock:
            now = time.monotonic()
            if now - self._last < self.check_s:
                return
            self._last = now
        sweep_upload_leftovers(gradio_cache_dir(), self.age_s)


@dataclass(frozen=True)
class DiskUsage:
    """Files below a folder and their size."""

    files: int
    bytes: int

    @property
    def megabytes(self) -> float:
        return self.bytes / 1e6

    def __str__(self) -> str:
        return f"{self.files} files, {self.megabytes:.1f} MB"


def disk_usage(folder: Path) -> DiskUsage:
    """Regular files below ``folder`` (recursively) and their total size; nothing when it is missing."""
    files = size = 0
    for root, _, names in os.walk(folder):
        for name in names:
            try:
                size += (Path(root) / name).lstat().st_size
            except FileNotFoundError:  # removed while we walked
                continue
            files += 1
    return DiskUsage(files, size)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


class BoundedFolder:
    """A folder holding at most ``capacity`` entries (files or subfolders), least recently used dropped first.

    :meth:`reuse` hands back an entry that is still on disk (marking it used); :meth:`claim` makes
    room for a new entry and returns its path for the caller to write. An entry someone else removed
    (gradio's cache cleaner can) is simply written again on its next :meth:`claim`.
    """

    def __init__(self, folder: Path, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"a bounded folder needs capacity >= 1, got {capacity}")
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.capacity = capacity
        self._entries: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()

    def reuse(self, name: str) -> Path | None:
        """The path of entry ``name`` when it is still on disk (now the most recently used), else None."""
        path = self.folder / name
        with self._lock:
            if name not in self._entries:
                return None
            if not path.exists():
                del self._entries[name]
                return None
            self._entries.move_to_end(name)
        return path

    def claim(self, name: str) -> Path:
        """Register entry ``name`` (dropping the least recently used beyond the capacity) and return its path."""
        with self._lock:
            self._entries[name] = None
            self._entries.move_to_end(name)
            dropped = []
            while len(self._entries) > self.capacity:
                dropped.append(self._entries.popitem(last=False)[0])
        for old in dropped:
            _remove(self.folder / old)
        return self.folder / name

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)


class AppFiles:
    """The app's folder: ``panels/`` (rendered PNGs) and ``reports/`` (one subfolder per report zip).

    Created fresh inside ``parent`` (default: the system's temporary folder); removed by
    :meth:`close` or when the interpreter exits.
    """

    def __init__(self, parent: Path | None = None, *, panel_capacity: int = 128, report_capacity: int = 8) -> None:
        if parent is not None:
            parent.mkdir(parents=True, exist_ok=True)
        self.root = Path(tempfile.mkdtemp(prefix="spa-viz-app-", dir=parent)).resolve()
        self.panels = BoundedFolder(self.root / "panels", panel_capacity)
        self.reports = BoundedFolder(self.root / "reports", report_capacity)
        self._cleanup = weakref.finalize(self, shutil.rmtree, str(self.root), ignore_errors=True)

    def usage(self) -> DiskUsage:
        return disk_usage(self.root)

    def close(self) -> None:
        """Remove the folder and everything in it (idempotent)."""
        if self._cleanup.alive:
            _log.info("removing the app's files in %s", self.root)
        self._cleanup()
