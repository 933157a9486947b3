"""The Live tab: webcam frames keep one analyser per session (bounded), run at the model's saved gate
settings whatever other requests set, switch to the dense twin; videos come back annotated as mp4, a
webm copy and a per-frame CSV in a bounded folder; the ``/live_frame`` and ``/live_video`` endpoints
answer a gradio_client."""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
from gradio_client import Client, handle_file
from PIL import Image

import spa_viz
from app.files import disk_usage
from app.live_service import LiveLimits, LiveService
from app.models import ModelRegistry
from app.service import AnalysisService, UserError
from app.settings import AppSettings
from spa_viz.analysis.live import CSV_COLUMNS
from tests.app.conftest import TINY, Served, tiny_model

pytestmark = pytest.mark.filterwarnings("ignore::Warning:gradio.queueing")


def _frame(shift: int, size: tuple[int, int] = (120, 160)) -> np.ndarray:
    """A grey frame with a bright square that moves with ``shift``."""
    frame = np.full((*size, 3), 60, dtype=np.uint8)
    frame[30:80, 20 + shift : 70 + shift] = (240, 200, 40)
    return frame


def _video(path: Path, frames: int, size: tuple[int, int] = (96, 128)) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 10.0, (size[1], size[0]))
    for i in range(frames):
        writer.write(cv2.cvtColor(_frame(3 * i, size), cv2.COLOR_RGB2BGR))
    writer.release()
    return path


def _frames_in(path: Path) -> int:
    capture = cv2.VideoCapture(str(path))
    count = 0
    while capture.read()[0]:
        count += 1
    capture.release()
    return count


@pytest.fixture(scope="module")
def live() -> Iterator[LiveService]:
    settings = AppSettings(device="cpu")
    registry = ModelRegistry(settings.torch_device, capacity=2, extra={TINY: tiny_model})
    analysis = AnalysisService(settings, registry)
    try:
        yield LiveService(analysis, LiveLimits(streams=2, videos=2, max_frames=12))
    finally:
        analysis.close()


def test_a_stream_keeps_its_running_figures_and_switches_to_the_dense_twin(live: LiveService) -> None:
    entry = live.analysis.model(TINY)
    results = [live.frame("a", _frame(i * 5), TINY, layer=5) for i in range(3)]
    last = results[-1]
    assert last.layer == 5 and not last.dense
    assert last.annotated.ndim == 3 and last.annotated.shape[0] > 360, "the frame under a bar of figures"
    assert last.keep_mask is not None and 0 < last.keep < 1, "the random gates split the tokens"
    assert last.mean_keep == pytest.approx(np.mean([r.keep for r in results]))
    dense = live.frame("a", _frame(0), TINY, layer=5, dense=True)
    assert dense.dense and dense.keep == 1.0 and dense.macs_saved == 0.0 and dense.keep_mask is None
    assert dense.mean_keep == 1.0, "the switch restarts the running figures"
    # another request sets the shared model's threshold: the stream still runs at the saved settings
    with entry.lock:
        spa_viz.configure(entry.model, threshold=0.999)
    again = live.frame("a", _frame(0), TINY, layer=5)
    first_again = live.frame("b", _frame(0), TINY, layer=5)
    assert again.keep == pytest.approx(first_again.keep) == pytest.approx(results[0].keep)
    assert live.frame("b", _frame(0), TINY, layer=4.6).layer == 5, "the nearest SPA layer"


def test_streams_are_bounded_and_bad_frames_refused(live: LiveService) -> None:
    for session in ("s1", "s2", "s3", "s4"):
        live.frame(session, _frame(0), TINY)
    assert live.stream_count() == live.limits.streams
    with pytest.raises(UserError, match="no frame"):
        live.frame("s1", None, TINY)
    with pytest.raises(UserError, match="smoothing"):
        live.frame("s1", _frame(0), TINY, smoothing=1.0)
    smoothed = [live.frame("s5", _frame(4 * i), TINY, smoothing=0.8) for i in range(3)]
    assert smoothed[-1].shown_mask is not None and smoothed[-1].keep_mask is not None
    assert "moving average" not in str(smoothed[-1].keep), "figures stay the frame's own"


def test_a_video_comes_back_annotated_with_a_webm_copy_and_a_csv(live: LiveService, tmp_path: Path) -> None:
    clip = _video(tmp_path / "clip.mp4", 16)
    result = live.annotate(clip, TINY, layer=5, max_frames=10)
    assert result.report.frames == 10 and result.report.truncated
    assert result.mp4.suffix == ".mp4" and _frames_in(result.mp4) == 10
    assert result.preview is not None and result.preview.suffix == ".webm" and _frames_in(result.preview) == 10
    with open(result.csv, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert tuple(rows[0]) == CSV_COLUMNS and [int(r["frame"]) for r in rows] == list(range(10))
    assert "10 frames" in result.text() and "frame cap" in result.text()
    dense = live.annotate(clip, TINY, dense=True, max_frames=4)
    assert dense.mp4.name.endswith("_dense.mp4") and dense.report.mean_macs_saved == 0.0
    with pytest.raises(UserError, match="max_frames"):
        live.annotate(clip, TINY, max_frames=13)
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00" * 2000)
    with pytest.raises(UserError, match="cannot|no frames"):
        live.annotate(broken, TINY)
    for _ in range(3):
        live.annotate(clip, TINY, max_frames=2)
    folder = live.analysis.files.root / "live_videos"
    assert len(list(folder.iterdir())) == live.limits.videos, "only the last few videos stay on disk"
    assert disk_usage(folder).files <= 3 * live.limits.videos


def test_the_live_endpoints_answer_a_gradio_client(served: Served, tmp_path: Path) -> None:
    client = Client(served.url, verbose=False, download_files=str(tmp_path / "downloads"))
    picture = tmp_path / "frame.png"
    Image.fromarray(_frame(10)).save(picture)
    image, figures = client.predict(frame=handle_file(str(picture)), model=TINY, layer=5, api_name="/live_frame")
    assert "frames/s" in figures and "SPA · layer 5" in figures
    annotated = np.asarray(Image.open(image))
    assert annotated.shape[0] > 360 and annotated.shape[1] > annotated.shape[0], "kept tokens beside the output"
    dense_image, dense_figures = client.predict(
        frame=handle_file(str(picture)), model=TINY, layer=5, dense=True, api_name="/live_frame"
    )
    assert "dense twin" in dense_figures
    clip = _video(tmp_path / "clip.mp4", 6)
    preview, report, mp4, table = client.predict(
        video=handle_file(str(clip)), model=TINY, max_frames=5, api_name="/live_video"
    )
    assert "5 frames" in report
    assert Path(mp4).suffix == ".mp4" and _frames_in(Path(mp4)) == 5
    with open(table, newline="") as handle:
        assert len(list(csv.DictReader(handle))) == 5
    assert preview is not None
