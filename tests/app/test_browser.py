"""A real browser (Debian chromium via the playwright client) uploads an image, moves the threshold
and switches the fusion mode.

Checks that the kept-token mask and the MAC numbers on the page change, that the wall-clock line is
filled in after the views, that the per-layer strip follows the fusion mode, and, when the default
real-photo checkpoint ran, takes the screenshot used in the docs (docs/screenshots/app.png; written
there only by `make screenshots`).
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

from app.examples import build_examples
from app.models import DEFAULT_CHECKPOINT
from app.settings import REPO_ROOT, AppSettings
from tests.app.conftest import TINY, default_checkpoint_available, serve

CHROMIUM = Path("/usr/bin/chromium")
MEASURED = "dense twin and SPA alternating"
"""Only the measured wall-clock line says this (the "measuring ..." placeholder does not)."""
SCREENSHOTS = REPO_ROOT / "docs" / "screenshots"
# `make screenshots` sets this: only then do the tests overwrite the committed pictures, so a plain
# `make test` leaves the tree as it found it
WRITE_DOCS = os.environ.get("SPA_VIZ_SCREENSHOTS") == "1"
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
TIMEOUT_MS = 90_000

pytestmark = [
    pytest.mark.browser,
    pytest.mark.filterwarnings("ignore::Warning:gradio.queueing"),
    pytest.mark.skipif(
        not CHROMIUM.exists(), reason="needs Debian chromium at /usr/bin/chromium (apt-get install chromium)"
    ),
]


def _shrink(path: Path) -> None:
    """Keep the committed screenshot small: 1400 px wide, 256-colour palette."""
    image = Image.open(path).convert("RGB")
    if image.width > 1400:
        image = image.resize((1400, round(image.height * 1400 / image.width)), Image.Resampling.LANCZOS)
    image.quantize(256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)


@contextlib.contextmanager
def _app_page(model: str) -> Iterator[Any]:
    """A headless chromium page on the app serving ``model`` (closed afterwards)."""
    from playwright.sync_api import sync_playwright

    with serve(model) as app, sync_playwright() as playwright, tempfile.TemporaryDirectory() as profile:
        browser = playwright.chromium.launch_persistent_context(
            profile, executable_path=str(CHROMIUM), headless=True, args=FLAGS, viewport={"width": 1600, "height": 1100}
        )
        try:
            page = browser.new_page()
            page.set_default_timeout(TIMEOUT_MS)
            page.goto(app.url)
            yield page
        finally:
            browser.close()


def test_upload_then_threshold_and_fusion_change_the_views(tmp_path: Path) -> None:
    from playwright.sync_api import expect

    examples = build_examples(AppSettings().examples_dir)
    real = default_checkpoint_available()
    model = DEFAULT_CHECKPOINT if real else TINY
    # only the real model's page goes into the docs, and only when asked for
    screenshot = SCREENSHOTS / "app.png" if real and WRITE_DOCS else tmp_path / "app.png"
    with _app_page(model) as page:
        status = page.locator("#status-box")
        expect(status).to_contain_text("chelsea.jpg", timeout=TIMEOUT_MS)  # the page opens analysed

        upload = examples.photos[2]  # coffee; uploading adds it to the batch
        page.locator("input[type=file]").first.set_input_files(str(upload))
        expect(status).to_contain_text(f"1: {upload.name}", timeout=TIMEOUT_MS)

        threshold = page.locator("#threshold input[type=number]")
        if threshold.is_disabled():  # untrained gates open on a training-free selector
            page.locator("#selector input").click()
            page.get_by_role("option", name="learned gate").click()
            expect(threshold).to_be_enabled()
        kept = page.locator("#kept-image img")
        stats = page.locator("#stats")
        expect(stats).to_contain_text("Backbone GMACs")
        expect(stats).to_contain_text(MEASURED, timeout=TIMEOUT_MS)  # the wall-clock follows the views
        page.wait_for_load_state("networkidle")
        before_mask, before_stats = kept.get_attribute("src"), stats.inner_text()

        threshold.fill("0.7")
        threshold.press("Enter")
        expect(kept).not_to_have_attribute("src", before_mask, timeout=TIMEOUT_MS)
        expect(stats).not_to_have_text(before_stats, timeout=TIMEOUT_MS)
        assert "Backbone GMACs" in stats.inner_text()

        strip = page.locator("#strip-image img")
        expect(stats).to_contain_text(MEASURED, timeout=TIMEOUT_MS)
        page.wait_for_load_state("networkidle")
        before_strip = strip.get_attribute("src")
        saved = page.locator("#fusion input[type=radio]:checked").input_value()  # the page opens on the model's mode
        other = "stage" if saved == "chain" else "chain"
        page.locator("#fusion").get_by_text(other, exact=True).click()
        expect(strip).not_to_have_attribute("src", before_strip, timeout=TIMEOUT_MS)
        expect(stats).to_contain_text("selection score: own logit", timeout=TIMEOUT_MS)  # the first SPA layer
        switched = strip.get_attribute("src")
        page.locator("#fusion").get_by_text(saved, exact=True).click()  # back to the saved mode for the screenshot
        expect(strip).not_to_have_attribute("src", switched, timeout=TIMEOUT_MS)
        expect(stats).to_contain_text(MEASURED, timeout=TIMEOUT_MS)

        age = page.locator("#age-image img")
        page.wait_for_load_state("networkidle")
        before_age = age.get_attribute("src")
        saved_path = page.locator("#unkept input[type=radio]:checked").input_value()
        assert saved_path == "saved", "the page opens on the path the model was saved with"
        page.locator("#unkept").get_by_text("refresh", exact=True).click()
        expect(stats).to_contain_text("Unkept tokens (refresh", timeout=TIMEOUT_MS)
        expect(age).not_to_have_attribute("src", before_age, timeout=TIMEOUT_MS)
        page.locator("#unkept").get_by_text(saved_path, exact=True).click()
        expect(stats).not_to_contain_text("Unkept tokens (refresh", timeout=TIMEOUT_MS)
        expect(stats).to_contain_text(MEASURED, timeout=TIMEOUT_MS)

        page.wait_for_load_state("networkidle")
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(screenshot), full_page=True)
        _shrink(screenshot)


def test_digit_batch_shows_packing_across_images(tmp_path: Path) -> None:
    """The digits example batch on the shipped SPA detector: several images share the packed rows.

    Takes the second docs screenshot (docs/screenshots/app-digits.png with ``make screenshots``).
    """
    from playwright.sync_api import expect

    build_examples(AppSettings().examples_dir)
    with _app_page("spa-vit-digits") as page:
        status = page.locator("#status-box")
        expect(status).to_contain_text("spa-vit-digits", timeout=TIMEOUT_MS)
        page.get_by_text("digits batch (boxes)").click()
        expect(status).to_contain_text("3: digits", timeout=TIMEOUT_MS)
        stats = page.locator("#stats")
        expect(stats).to_contain_text("row", timeout=TIMEOUT_MS)
        rows = re.search(r"B\S* = (\d+) rows?", stats.inner_text())
        assert rows is not None, stats.inner_text()
        assert int(rows.group(1)) < 4, "the 4 images' kept tokens should share fewer rows than images"
        expect(stats).to_contain_text("batch of 4", timeout=TIMEOUT_MS)  # the wall-clock of the whole batch
        page.wait_for_load_state("networkidle")
        shot = (SCREENSHOTS if WRITE_DOCS else tmp_path) / "app-digits.png"
        page.screenshot(path=str(shot), full_page=True)
        _shrink(shot)
