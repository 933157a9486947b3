"""The Dataset tab: the service streams a run batch by batch, cancels before the next batch, writes its
exports into bounded folders, reads zips safely, refuses folders outside the allowed ones, and the
``/dataset`` family of endpoints answers a gradio_client."""

from __future__ import annotations

import csv
import io
import json
import stat
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from gradio_client import Client, handle_file
from PIL import Image

import spa_viz
from app.dataset_service import (
    SOURCE_FOLDER,
    SOURCE_ZIP,
    DatasetLimits,
    DatasetRequest,
    DatasetService,
    extract_images,
)
from app.dataset_tab import parse_thresholds
from app.files import disk_usage
from app.models import ModelRegistry
from app.service import AnalysisService, UserError
from app.settings import AppSettings
from tests.app.conftest import TINY, Served, tiny_model

DIGITS = "spa-vit-digits"
needs_digits = pytest.mark.skipif(DIGITS not in spa_viz.available(), reason=f"no {DIGITS} checkpoint")
pytestmark = pytest.mark.filterwarnings("ignore::Warning:gradio.queueing")


def _rows(path: str) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _png(color: tuple[int, int, int], size: tuple[int, int] = (40, 48)) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((*size, 3), color, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def allowed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("allowed")
    (folder / "images").mkdir()
    for i in range(5):
        (folder / "images" / f"im{i}.png").write_bytes(_png((40 * i, 90, 200 - 30 * i)))
    (folder / "images" / "notes.txt").write_text("not an image")
    return folder


@pytest.fixture(scope="module")
def datasets(allowed: Path) -> Iterator[DatasetService]:
    settings = AppSettings(device="cpu", allow_dirs=(allowed,))
    registry = ModelRegistry(settings.torch_device, settings.allow_dirs, capacity=2, extra={TINY: tiny_model})
    analysis = AnalysisService(settings, registry)
    try:
        yield DatasetService(analysis, DatasetLimits(max_images=40, runs=2, uploads=2, worst_k=4, timing_repeats=1))
    finally:
        analysis.close()


@needs_digits
def test_a_digits_run_streams_batches_then_a_summary_sweep_and_exports(datasets: DatasetService) -> None:
    request = DatasetRequest("digits/test", DIGITS, 0.5, max_images=20, batch_size=8, thresholds=[0.3, 0.7])
    fractions: list[float] = []
    views = list(datasets.run(request, "s1", lambda fraction, text: fractions.append(fraction)))
    partial, final = views[:-1], views[-1]
    assert [v.images for v in partial] == [8, 16, 20], "one partial view per batch, the cap cut the last one"
    assert not any(v.done for v in partial) and final.done
    assert fractions[:3] == pytest.approx([0.4, 0.8, 1.0])
    assert partial[0].scatter is not None and len(partial[0].scatter.data[0].x) == 8
    rows = _rows(final.csv)
    assert [int(r["index"]) for r in rows] == list(range(20))
    document = json.loads(Path(final.json).read_text())
    assert document["summary"]["images"] == 20 and document["meta"]["model"] == DIGITS
    assert document["meta"]["wall_clock_ms"]["batch"] == 8, "paired timing of one batch"
    methods = [p["method"] for p in document["meta"]["sweep"]]
    assert methods == ["dense", "learned_gate", "learned_gate"], "dense twin, then the two thresholds"
    assert "AP50" in document["meta"]["sweep"][0]["metrics"], "the digits carry boxes: AP50 vs MACs"
    assert [len(final.worst[k]) for k in ("recall", "output_error", "keep")] == [4, 4, 4]
    lowest = min(rows, key=lambda row: (float(row["recall_L2"]), int(row["index"])))
    assert final.worst["recall"][0][1].startswith(f"#{lowest['index']} "), "worst by recall at the first SPA layer"
    assert datasets.worst_index(final.run_id, "recall", 0) == int(lowest["index"])
    assert "Wall-clock" in final.summary and "MACs saved" in final.summary
    # the scatter re-renders at another layer from the kept rows; an image opens with the run's settings
    entry = datasets.analysis.model(DIGITS)
    other = datasets.scatter(final.run_id, entry.spa_layers[-1])
    assert f"layer {entry.spa_layers[-1]}" in other.layout.title.text
    path, model, threshold = datasets.open_image(final.run_id, 3)
    assert (model, threshold) == (DIGITS, 0.5)
    assert np.array_equal(np.asarray(Image.open(path).convert("RGB")), datasets.get_run(final.run_id).source.pixels(3))
    with pytest.raises(UserError, match="no image 999"):
        datasets.open_image(final.run_id, 999)


@needs_digits
def test_cancel_stops_before_the_next_batch_and_keeps_what_was_read(datasets: DatasetService) -> None:
    request = DatasetRequest("digits/test", DIGITS, 0.5, max_images=40, batch_size=8)
    stream = datasets.run(request, "s2")
    first = next(stream)
    assert first.images == 8
    assert datasets.cancel("s2") and not datasets.cancel("nobody")
    rest = list(stream)
    assert len(rest) == 1 and rest[0].done and rest[0].images == 8
    assert "cancelled after 8 images" in rest[0].status
    assert rest[0].sweep is None, "a cancelled run skips the sweep"
    assert len(_rows(rest[0].csv)) == 8


def test_the_model_lock_is_free_between_batches(datasets: DatasetService) -> None:
    entry = datasets.analysis.model(TINY)
    stream = datasets.run(DatasetRequest("digits/test", TINY, 0.5, max_images=4, batch_size=2, sweep=False), "s3")
    next(stream)
    acquired = entry.lock.acquire(timeout=5)  # another request gets the model between two batches
    assert acquired
    entry.lock.release()
    assert list(stream)[-1].images == 4


def test_folders_must_lie_under_the_allowed_ones(datasets: DatasetService, allowed: Path, tmp_path: Path) -> None:
    views = list(
        datasets.run(DatasetRequest(SOURCE_FOLDER, TINY, 0.5, folder=str(allowed / "images"), sweep=False), "s4")
    )
    final = views[-1]
    assert final.images == 5 and "notes.txt" in Path(final.json).read_text(), "the text file is listed as skipped"
    outside = tmp_path / "outside"
    outside.mkdir()
    with pytest.raises(UserError, match="outside the folders"):
        list(datasets.run(DatasetRequest(SOURCE_FOLDER, TINY, 0.5, folder=str(outside)), "s4"))
    with pytest.raises(UserError, match="outside the folders"):
        list(datasets.run(DatasetRequest(SOURCE_FOLDER, TINY, 0.5, folder=str(allowed / ".." / "..")), "s4"))


def _zip(path: Path, members: dict[str, bytes], links: tuple[str, ...] = ()) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as bundle:
        for name, data in members.items():
            bundle.writestr(name, data)
        for name in links:
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            bundle.writestr(info, "/etc/passwd")
    return path


def test_zip_extraction_is_flat_bounded_and_skips_links(tmp_path: Path) -> None:
    archive = _zip(
        tmp_path / "set.zip",
        {
            "../../escape.png": _png((1, 2, 3)),
            "/abs/root.jpg": _png((4, 5, 6)),
            "ok/a.png": _png((7, 8, 9)),
            "x.txt": b"x",
        },
        links=("link.png",),
    )
    target = tmp_path / "out"
    files, notes = extract_images(archive, target, max_files=10, max_bytes=10_000_000)
    assert [f.name for f in files] == ["00000_escape.png", "00001_root.jpg", "00002_a.png"]
    assert all(f.parent == target for f in files), "every file lands directly in the target"
    assert not (tmp_path / "escape.png").exists() and not list(tmp_path.parent.glob("escape.png"))
    assert any("2 entries" in note for note in notes), "the text file and the link are left out"
    few, notes = extract_images(archive, tmp_path / "few", max_files=2, max_bytes=10_000_000)
    assert len(few) == 2 and any("first 2 images" in note for note in notes)
    bomb = _zip(tmp_path / "bomb.zip", {"big.png": bytes(5_000_000)})
    assert bomb.stat().st_size < 100_000
    with pytest.raises(UserError, match="expands to more than"):
        extract_images(bomb, tmp_path / "bomb", max_files=10, max_bytes=1_000_000)
    (tmp_path / "no.zip").write_bytes(b"not a zip")
    with pytest.raises(UserError, match="not a readable zip"):
        extract_images(tmp_path / "no.zip", tmp_path / "no", 10, 1000)


def test_uploaded_zips_runs_and_their_files_stay_under_the_caps(datasets: DatasetService, tmp_path: Path) -> None:
    root = datasets.analysis.files.root
    for i in range(4):
        archive = _zip(tmp_path / f"upload{i}.zip", {f"im{k}.png": _png((30 * i, 20 * k, 90)) for k in range(3)})
        final = list(datasets.run(DatasetRequest(SOURCE_ZIP, TINY, 0.5, archive=str(archive), sweep=False), "z"))[-1]
        assert final.images == 3
    assert len(list((root / "dataset_uploads").iterdir())) == datasets.limits.uploads
    assert len(list((root / "dataset_runs").iterdir())) <= datasets.limits.runs
    with datasets._lock:
        assert len(datasets._runs) <= datasets.limits.runs, "only the last few runs keep their rows in memory"
    assert disk_usage(root / "dataset_runs").files <= datasets.limits.runs * (2 + 3 * datasets.limits.worst_k)
    with pytest.raises(UserError, match="no longer kept"):
        datasets.get_run("gone")


def test_bad_requests_are_refused_with_a_message(datasets: DatasetService) -> None:
    with pytest.raises(UserError, match="max_images"):
        list(datasets.run(DatasetRequest("digits/test", TINY, 0.5, max_images=41), "b"))
    with pytest.raises(UserError, match="peer methods"):
        list(datasets.run(DatasetRequest("digits/test", TINY, 0.5, peers=["nope"]), "b"))
    with pytest.raises(UserError, match="unknown source"):
        list(datasets.run(DatasetRequest("mnist", TINY, 0.5), "b"))
    assert parse_thresholds("0.7, 0.3;0.5 0.3") == [0.3, 0.5, 0.7]
    with pytest.raises(UserError):
        parse_thresholds("low")


@needs_digits
def test_the_dataset_endpoints_answer_a_gradio_client(served: Served, tmp_path: Path) -> None:
    client = Client(served.url, verbose=False, download_files=str(tmp_path))
    answer = client.predict(
        source="digits/test",
        model=DIGITS,
        threshold=0.5,
        max_images=12,
        batch_size=6,
        sweep=True,
        thresholds="0.4, 0.6",
        peers=[],
        api_name="/dataset",
    )
    run_id, status, summary = answer[:3]
    assert "12 images" in status and "Backbone" not in status
    assert "MACs saved" in summary
    csv_path, json_path = answer[-2], answer[-1]
    assert len(_rows(csv_path)) == 12
    assert len(json.loads(Path(json_path).read_text())["meta"]["sweep"]) == 3
    scatter = client.predict(run=run_id, layer=4, api_name="/dataset_layer")
    assert "layer 4" in json.dumps(scatter)
    opened = client.predict(run=run_id, index=5, api_name="/dataset_open")
    assert Path(opened[0]).name == "test_000005.png", opened
    assert tuple(opened[-3:]) == (DIGITS, "learned gate", 0.5), "the Analyze tab gets the run's model and threshold"
    assert [Path(p).name for p in opened[-4]] == ["test_000005.png"], "and the image as its batch"
    # a second client's cancel finds nothing running in its own session
    assert client.predict(api_name="/dataset_cancel") == "nothing is running"


def test_a_run_and_a_cancel_from_two_threads(datasets: DatasetService) -> None:
    """Cancel comes from another thread (the page's button is its own request)."""
    started = threading.Event()
    results = []

    def runner() -> None:
        for view in datasets.run(
            DatasetRequest("digits/test", TINY, 0.5, max_images=40, batch_size=2, sweep=False), "t"
        ):
            started.set()
            results.append(view)

    thread = threading.Thread(target=runner)
    thread.start()
    assert started.wait(60)
    datasets.cancel("t")
    thread.join(120)
    assert results[-1].done and results[-1].images < 40


def test_dataset_and_live_files_stay_bounded_through_the_api(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Like tests/app/test_disk.py: many zip runs and videos over HTTP keep the app's folders under their caps,
    gradio's cache (the uploads) is swept, and everything is removed when the app stops."""
    from app.dataset_service import DatasetLimits
    from app.live_service import LiveLimits
    from tests.app.conftest import serve
    from tests.app.test_disk import swept_files
    from tests.app.test_live_tab import _video

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio-cache"))
    with serve(TINY, cache_check_s=1, cache_age_s=2) as app:
        client = Client(app.url, verbose=False, download_files=str(tmp_path / "downloads"))
        root = app.service.files.root
        for i in range(DatasetLimits().runs + 2):
            archive = _zip(tmp_path / f"set{i}.zip", {f"im{k}.png": _png((20 * i, 30 * k, 99)) for k in range(2)})
            answer = client.predict(
                source=SOURCE_ZIP, archive=handle_file(str(archive)), model=TINY, sweep=False, api_name="/dataset"
            )
            assert "2 images" in answer[1]
        for i in range(LiveLimits().videos + 1):
            clip = _video(tmp_path / f"clip{i}.mp4", 3)
            client.predict(video=handle_file(str(clip)), model=TINY, max_frames=2, api_name="/live_video")
        assert len(list((root / "dataset_uploads").iterdir())) == DatasetLimits().uploads
        assert len(list((root / "dataset_runs").iterdir())) == DatasetLimits().runs
        assert len(list((root / "live_videos").iterdir())) == LiveLimits().videos
        cache = tmp_path / "gradio-cache"
        deadline = time.monotonic() + 20
        while [p for p in swept_files(app.demo, cache) if p.stat().st_size] and time.monotonic() < deadline:
            time.sleep(0.5)
        left = swept_files(app.demo, cache)
        assert all(p.stat().st_size == 0 for p in left), "gradio's sweep removes the uploaded zips and videos"
        assert len(left) <= 2, f"the empty upload leftovers are removed as requests come, but the last: {left}"
    assert not root.exists(), "the app's folder goes when it stops"
