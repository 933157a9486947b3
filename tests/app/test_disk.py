"""The app's disk use stays bounded: its own files under their caps, gradio's cache swept, all removed at the end."""

from __future__ import annotations

import time
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
from gradio_client import Client, handle_file
from PIL import Image

from app.files import disk_usage
from tests.app.conftest import TINY, serve

pytestmark = pytest.mark.filterwarnings("ignore::Warning:gradio.queueing")

PANELS, REPORTS, AGE_S = 10, 2, 2


def swept_files(demo: gr.Blocks, cache: Path) -> list[Path]:
    """Files in gradio's cache that its sweep should remove: all but the ones it keeps for good."""
    kept = {Path(f) for block in demo.blocks.values() for f in getattr(block, "keep_in_cache", set())}
    return [p for p in cache.rglob("*") if p.is_file() and p not in kept]


def test_many_analyses_and_reports_stay_under_the_caps_and_gradio_sweeps_its_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "gradio-cache"
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(cache))  # this app's gradio cache only
    uploads = []  # images of our own: the example photos are kept in gradio's cache for good
    for i, color in enumerate(((200, 40, 40), (40, 160, 60), (30, 60, 200))):
        uploads.append(tmp_path / f"upload{i}.png")
        Image.fromarray(
            np.random.default_rng(i).integers(0, 256, (120, 160, 3), dtype=np.uint8) // 2 + np.uint8(color) // 2
        ).save(uploads[-1])
    with serve(
        TINY, panel_files=PANELS, report_files=REPORTS, cache_check_s=1, cache_age_s=AGE_S, timing_repeats=3
    ) as app:
        client = Client(app.url, verbose=False, download_files=str(tmp_path / "downloads"))
        root = app.service.files.root
        assert not [p for p in cache.rglob("*") if p.is_file()], (
            "the example images are served in place: no copies for the sweep to remove"
        )
        peak = 0
        for i in range(12):
            photo = uploads[i % 3]
            settings = dict(model=TINY, selector="learned gate", threshold=0.3 + 0.03 * i, layer=3 + i % 9)
            client.predict(files=[handle_file(str(photo))], api_name="/analyze", **settings)
            if i % 4 == 3:
                client.predict(files=[handle_file(str(photo))], api_name="/report", **settings)
            peak = max(peak, disk_usage(root).files)
        assert peak <= PANELS + REPORTS, f"the app's folder held {peak} files"
        assert len(list((root / "reports").iterdir())) == REPORTS
        held = {p.name for p in swept_files(app.demo, cache)}
        assert held and held <= {p.name for p in uploads}, (
            f"gradio's cache holds recent uploads only (no panel copies, no empty temporary files): {held}"
        )
        deadline = time.monotonic() + 4 * AGE_S + 5
        while swept_files(app.demo, cache) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not swept_files(app.demo, cache), "gradio's sweep removes uploads older than the age"
    assert not root.exists(), "the app's folder is removed when it stops"
