"""A real browser (Debian chromium via the playwright client) on the Dataset and Live tabs.

The Live test feeds chromium's fake camera (``--use-fake-device-for-media-stream``, permission granted
by ``--use-fake-ui-for-media-stream``): no camera anywhere. It starts the stream and checks that
frames come back annotated with running figures, then switches to the dense twin. The Dataset test runs
a few digit images, checks the summary, the plots and the worst-k galleries, and opens a gallery image
in the Analyze tab. With ``make screenshots`` both write their pictures to docs/screenshots/
(app-live.png, app-dataset.png); otherwise into a temporary folder.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

import spa_viz
from app.models import DEFAULT_CHECKPOINT
from app.settings import REPO_ROOT
from tests.app.conftest import TINY, default_checkpoint_available, serve

CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOTS = REPO_ROOT / "docs" / "screenshots"
WRITE_DOCS = os.environ.get("SPA_VIZ_SCREENSHOTS") == "1"
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--use-fake-device-for-media-stream",
    "--use-fake-ui-for-media-stream",
]
TIMEOUT_MS = 120_000
DIGITS = "spa-vit-digits"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.filterwarnings("ignore::Warning:gradio.queueing"),
    pytest.mark.skipif(
        not CHROMIUM.exists(), reason="needs Debian chromium at /usr/bin/chromium (apt-get install chromium)"
    ),
]


def _shrink(path: Path) -> None:
    """Keep a committed screenshot small: 1400 px wide, 256-colour palette."""
    image = Image.open(path).convert("RGB")
    if image.width > 1400:
        image = image.resize((1400, round(image.height * 1400 / image.width)), Image.Resampling.LANCZOS)
    image.quantize(256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)


def _screenshot(page: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(path), full_page=True)
    _shrink(path)


@contextlib.contextmanager
def _app_page(model: str) -> Iterator[Any]:
    """A headless chromium page (fake camera) on the app serving ``model``, closed afterwards."""
    from playwright.sync_api import sync_playwright

    with serve(model) as app, sync_playwright() as playwright, tempfile.TemporaryDirectory() as profile:
        browser = playwright.chromium.launch_persistent_context(
            profile,
            executable_path=str(CHROMIUM),
            headless=True,
            args=FLAGS,
            viewport={"width": 1600, "height": 1100},
            permissions=["camera"],
        )
        try:
            page = browser.new_page()
            page.set_default_timeout(TIMEOUT_MS)
            page.goto(app.url)
            yield page
        finally:
            browser.close()


def _fps(text: str) -> float:
    found = re.search(r"([\d.]+) frames/s", text)
    assert found is not None, text
    return float(found.group(1))


def test_the_fake_camera_streams_frames_that_come_back_annotated(tmp_path: Path) -> None:
    from playwright.sync_api import expect

    real = default_checkpoint_available()
    model = DEFAULT_CHECKPOINT if real else TINY
    screenshot = SCREENSHOTS / "app-live.png" if real and WRITE_DOCS else tmp_path / "app-live.png"
    with _app_page(model) as page:
        page.get_by_role("tab", name="Live").click()
        webcam = page.locator("#live-webcam")
        webcam.get_by_text("Click to Access Webcam").click()
        webcam.get_by_role("button", name="capture photo").click()  # the streaming webcam's start button
        figures = page.locator("#live-figures")
        expect(figures).to_contain_text("frames/s (SPA · layer", timeout=TIMEOUT_MS)
        output = page.locator("#live-output img")
        first = output.get_attribute("src")
        expect(output).not_to_have_attribute("src", first, timeout=TIMEOUT_MS)  # frame after frame
        expect(figures).to_contain_text("MACs saved")
        assert _fps(figures.inner_text()) > 0
        box = output.bounding_box()
        assert box is not None and box["width"] > 1.5 * box["height"], "kept tokens beside the output"

        page.locator("#live-dense").get_by_text("Dense twin").click()
        expect(figures).to_contain_text("(dense twin)", timeout=TIMEOUT_MS)
        expect(figures).to_contain_text("MACs saved 0%")
        page.locator("#live-dense").get_by_text("Dense twin").click()  # back to SPA for the picture
        expect(figures).to_contain_text("frames/s (SPA · layer", timeout=TIMEOUT_MS)
        page.wait_for_timeout(1500)
        _screenshot(page, screenshot)
        webcam.get_by_text("Stop").click()


@pytest.mark.skipif(DIGITS not in spa_viz.available(), reason=f"no {DIGITS} checkpoint")
def test_a_dataset_run_on_a_few_digits_and_an_image_opened_in_the_analyze_tab(tmp_path: Path) -> None:
    from playwright.sync_api import expect

    screenshot = (SCREENSHOTS if WRITE_DOCS else tmp_path) / "app-dataset.png"
    with _app_page(DIGITS) as page:
        expect(page.locator("#status-box")).to_contain_text(DIGITS, timeout=TIMEOUT_MS)
        page.get_by_role("tab", name="Dataset").click()
        images = page.locator("#dataset-max input[type=number]")
        images.fill("48")
        images.press("Enter")
        page.locator("#dataset-run").click()
        status = page.locator("#dataset-status")
        expect(status).to_contain_text("✅ 48 images of digits/test", timeout=TIMEOUT_MS)
        summary = page.locator("#dataset-summary")
        expect(summary).to_contain_text("backbone MACs saved")
        expect(summary).to_contain_text("Wall-clock")
        for plot in ("#dataset-scatter", "#dataset-boxes", "#dataset-sweep-plot"):
            expect(page.locator(f"{plot} .js-plotly-plot")).to_be_visible()
        expect(page.locator("#dataset-csv a")).to_have_attribute("href", re.compile(r"dataset_rows\.csv$"))
        thumbnails = page.locator("#dataset-worst-recall button.thumbnail-item")
        expect(thumbnails.first).to_be_visible()
        assert thumbnails.count() == 8
        page.locator("#dataset-worst-keep").scroll_into_view_if_needed()  # the galleries load their pictures lazily
        page.wait_for_timeout(1500)
        _screenshot(page, screenshot)

        caption = page.locator("#dataset-worst-recall").inner_text()
        index = re.search(r"#(\d+) recall", caption)
        assert index is not None, caption
        thumbnails.first.click()
        expect(page.get_by_role("tab", name="Analyze", selected=True)).to_be_visible(timeout=TIMEOUT_MS)
        expect(page.locator("#status-box")).to_contain_text(f"test_{int(index.group(1)):06d}.png", timeout=TIMEOUT_MS)
