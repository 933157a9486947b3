"""The app's disk hygiene outside its own folder: gradio's empty upload leftovers are swept."""

from __future__ import annotations

import os
import time
from pathlib import Path

from app.files import sweep_upload_leftovers


def test_empty_upload_leftovers_are_swept_when_old(tmp_path: Path) -> None:
    """Gradio leaves an empty tmp* file per upload in its cache; old empty ones go, everything else stays."""
    now = time.time()
    old_empty, young_empty, old_full = tmp_path / "tmpold", tmp_path / "tmpyoung", tmp_path / "tmpfull"
    other = tmp_path / "upload.png"
    folder = tmp_path / "tmpfolder"
    for path in (old_empty, young_empty, other):
        path.write_bytes(b"")
    old_full.write_bytes(b"data")
    folder.mkdir()
    for path in (old_empty, old_full, other, folder):
        os.utime(path, (now - 7200, now - 7200))
    assert sweep_upload_leftovers(tmp_path, age_s=3600, now=now) == 1
    assert not old_empty.exists()
    assert young_empty.exists() and old_full.exists() and other.exists() and folder.is_dir()
    assert sweep_upload_leftovers(tmp_path / "missing", age_s=0) == 0
