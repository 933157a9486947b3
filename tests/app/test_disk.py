"""The app's disk use stays bounded: its own files under their caps, gradio's cache swept, all removed at the end."""

from __future__ import annotations

import time
from pathlib import Path

import gradio as gr
import pytest
from gradio_client import Client, handle_file

from app.examples import build_examples
from app.files import disk_usage
from app.settings import AppSettings
from tests.app.conftest import TINY, serve

pytestmark = pytest.mark.filterwarnings("ignore::Warning:gradio.queueing")

PANELS, REPORTS, AGE_S = 10, 2, 2


def gradio_cache_files(demo: gr.Blocks) -> set[Path]:
    """Files gradio holds in its cache for this app (uploads, copies), other than the ones it keeps for good."""
    kept = set().union(*(getattr(block, "keep_in_cache", set()) for block in demo.blocks.values()))
    return {Path(f) for files in demo.temp_file_sets for f in list(files) if f not in kept and Path(f).exists()}


def test_many_analyses_and_reports_stay_under_the_caps_and_gradio_sweeps_its_cache() -> None:
    examples = build_examples(AppSettings().examples_dir)
    with serve(
        TINY, panel_files=PANELS, report_files=REPORTS, cache_check_s=1, cache_age_s=AGE_S, timing_repeats=3
    ) as app:
        client = Client(app.url, verbose=False)
        root = app.service.files.root
        peak = 0
        for i in range(12):
            photo = examples.photos[i % len(examples.photos)]
            settings = dict(model=TINY, selector="learned gate", threshold=0.3 + 0.03 * i, layer=3 + i % 9)
            client.predict(files=[handle_file(str(photo))], api_name="/analyze", **settings)
            if i % 4 == 3:
                client.predict(files=[handle_file(str(photo))], api_name="/report", **settings)
            peak = max(peak, disk_usage(root).files)
        assert peak <= PANELS + REPORTS, f"the app's folder held {peak} files"
        assert len(list((root / "reports").iterdir())) == REPORTS
        assert gradio_cache_files(app.demo), "the uploads are in gradio's cache"
        deadline = time.monotonic() + 4 * AGE_S + 5
        while gradio_cache_files(app.demo) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not gradio_cache_files(app.demo), "gradio's sweep removes uploads older than the age"
    assert not root.exists(), "the app's folder is removed when it stops"
