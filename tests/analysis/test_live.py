"""Live analysis: one frame's figures match its own trace, the dense twin keeps everything and saves
nothing, smoothing changes only the drawn mask (by the documented moving average), and a video goes
through end to end into an mp4 and a CSV that match its frames, without ever replacing a file."""

from __future__ import annotations

import csv
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import spa_viz
from spa_viz.analysis.live import CSV_COLUMNS, FrameAnalyser, VideoError, annotate_video
from spa_viz.io.files import OutputExistsError
from spa_viz.viz.panels import gate_values
from tests.conftest import tiny_vit
from tests.layers.small_models import random_gates

LAYER = 2


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    """A tiny ViT (32 px, 16 tokens) with SPA from block 1 and random gates: each frame keeps its own mix."""
    torch.manual_seed(0)
    vit = spa_viz.patch(tiny_vit(), 1)
    random_gates(vit, std=1.0, seed=3)
    return vit


@pytest.fixture(scope="module")
def frames() -> list[np.ndarray]:
    generator = np.random.default_rng(0)
    return [generator.integers(0, 256, (48, 64, 3), dtype=np.uint8) for _ in range(5)]


def traced(analyser: FrameAnalyser, frame: np.ndarray) -> spa_viz.Trace:
    """The trace of ``frame`` run on its own, outside the analyser."""
    return spa_viz.trace(analyser.model, analyser.task.preprocess(frame)[None])[1]


def moving_square(path: Path, count: int = 10, size: tuple[int, int] = (64, 48)) -> None:
    """A white square moving right across a dark frame, written as an mp4v video."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 10.0, size)
    assert writer.isOpened()
    for i in range(count):
        frame = np.full((size[1], size[0], 3), 30, np.uint8)
        frame[12:36, 4 + 4 * i : 28 + 4 * i] = 255
        writer.write(frame)
    writer.release()


def decoded(path: Path) -> list[np.ndarray]:
    """Every frame of a video as RGB."""
    capture = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
    capture.release()
    return frames


def test_a_frame_reports_its_own_trace_and_running_figures(model, frames) -> None:
    analyser = FrameAnalyser(model, layer=LAYER, window=2)
    results = [analyser.analyse(frame) for frame in frames[:3]]
    for frame, result in zip(frames, results):
        record = traced(analyser, frame)
        assert result.keep == pytest.approx(float(record.layer(LAYER).keep_ratio[0]))
        assert result.macs_saved == pytest.approx(record.backbone_saving)
        np.testing.assert_array_equal(result.keep_mask, record.layer(LAYER).keep_map(0).numpy())
        assert result.annotated.dtype == np.uint8 and result.annotated.ndim == 3
        assert 0 < result.forward_ms <= result.frame_ms and not result.dense and result.layer == LAYER
    assert len({r.keep for r in results}) > 1, "the random gates should keep a different share per frame"
    assert results[0].fps == pytest.approx(1e3 / results[0].frame_ms)
    last = results[-2:]  # the window holds the last two frames
    assert results[-1].mean_keep == pytest.approx(sum(r.keep for r in last) / 2)
    assert results[-1].mean_macs_saved == pytest.approx(sum(r.macs_saved for r in last) / 2)
    assert results[-1].fps == pytest.approx(2e3 / sum(r.frame_ms for r in last))


def test_the_dense_switch_keeps_every_token_and_saves_nothing(model, frames) -> None:
    analyser = FrameAnalyser(model, layer=LAYER)
    sparse = analyser.analyse(frames[0])
    assert sparse.keep < 1.0 and sparse.macs_saved > 0.0
    analyser.dense = True
    dense = analyser.analyse(frames[0])
    assert dense.dense and dense.keep == 1.0 and dense.macs_saved == 0.0
    assert dense.keep_mask is None and dense.shown_mask is None
    assert dense.mean_keep == 1.0 and dense.mean_macs_saved == 0.0  # switching restarted the running figures
    assert spa_viz.spa_context(model).config.enabled  # the twin is left again after the frame
    assert FrameAnalyser(model, layer=LAYER, dense=True).analyse(frames[1]).keep == 1.0


def test_smoothing_off_draws_the_frames_own_mask(model, frames) -> None:
    analyser = FrameAnalyser(model, layer=LAYER)
    for frame in frames:
        result = analyser.analyse(frame)
        record = traced(analyser, frame).layer(LAYER)
        np.testing.assert_array_equal(result.shown_mask, result.keep_mask)
        np.testing.assert_allclose(result.shown_scores, gate_values(record, 0).numpy(), atol=1e-6)


def test_smoothing_draws_the_moving_average_and_leaves_the_compute_alone(model, frames) -> None:
    smoothing = 0.6
    smoothed, plain = FrameAnalyser(model, layer=LAYER, smoothing=smoothing), FrameAnalyser(model, layer=LAYER)
    average = None
    differs = False
    for frame in frames:
        result, reference = smoothed.analyse(frame), plain.analyse(frame)
        record = traced(smoothed, frame).layer(LAYER)
        values = gate_values(record, 0).numpy().astype(np.float64)
        average = values if average is None else smoothing * average + (1 - smoothing) * values
        np.testing.assert_allclose(result.shown_scores, average, atol=1e-6)
        np.testing.assert_array_equal(result.shown_mask, average > record.threshold)
        assert result.keep == reference.keep and result.macs_saved == reference.macs_saved
        np.testing.assert_array_equal(result.keep_mask, reference.keep_mask)
        differs |= not np.array_equal(result.shown_mask, result.keep_mask)
    assert differs, "over five random frames the averaged mask should differ from some frame's own"
    smoothed.reset()
    first = smoothed.analyse(frames[0])
    np.testing.assert_allclose(first.shown_scores, plain.analyse(frames[0]).shown_scores, atol=1e-6)


def test_bad_settings_are_refused(model) -> None:
    with pytest.raises(ValueError, match="smoothing"):
        FrameAnalyser(model, smoothing=1.0)
    with pytest.raises(ValueError, match="not an SPA layer"):
        FrameAnalyser(model, layer=0)
    with pytest.raises(ValueError, match="uint8"):
        FrameAnalyser(model).analyse(np.zeros((8, 8, 3), np.float32))


@pytest.fixture(scope="module")
def digits() -> torch.nn.Module:
    return spa_viz.load("spa-vit-digits")


def test_a_video_is_annotated_end_to_end_with_matching_csv_rows(digits, tmp_path) -> None:
    source, target = tmp_path / "square.mp4", tmp_path / "annotated.mp4"
    moving_square(source)
    report = annotate_video(source, target, FrameAnalyser(digits), progress=False)
    assert report.frames == 10 and not report.truncated and report.source_fps == pytest.approx(10.0)
    assert report.source_size == report.analysed_size == (64, 48)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["annotated.csv", "annotated.mp4", "square.mp4"]
    with report.csv.open() as handle:
        reader = csv.DictReader(handle)
        rows = list(reader)
    assert tuple(reader.fieldnames) == CSV_COLUMNS
    assert [int(r["frame"]) for r in rows] == list(range(10))
    fresh = FrameAnalyser(digits)
    for row, frame in zip(rows, decoded(source), strict=True):
        again = fresh.analyse(frame)
        assert float(row["keep"]) == pytest.approx(again.keep, abs=1e-6)
        assert float(row["macs_saved"]) == pytest.approx(again.macs_saved, abs=1e-6)
        assert float(row["forward_ms"]) > 0
    written = decoded(target)
    assert len(written) == 10
    assert (written[0].shape[1], written[0].shape[0]) == report.output_size
    assert report.mean_keep == pytest.approx(np.mean([float(r["keep"]) for r in rows]), abs=1e-6)


def test_the_frame_cap_and_downscaling_are_reported(digits, tmp_path) -> None:
    source = tmp_path / "square.mp4"
    moving_square(source)
    report = annotate_video(source, tmp_path / "capped.mp4", FrameAnalyser(digits), max_frames=3, max_side=32)
    assert report.frames == 3 and report.truncated and len(decoded(report.video)) == 3
    assert report.analysed_size == (32, 24)
    assert any("downscaled" in note for note in report.notes) and any("cap" in note for note in report.notes)


def test_existing_outputs_are_never_replaced(model, tmp_path) -> None:
    source, target = tmp_path / "square.mp4", tmp_path / "out.mp4"
    moving_square(source, count=2)
    annotate_video(source, target, FrameAnalyser(model), progress=False)
    before = target.read_bytes(), target.with_suffix(".csv").read_bytes()
    with pytest.raises(OutputExistsError, match="out.mp4"):
        annotate_video(source, target, FrameAnalyser(model), progress=False)
    target.unlink()
    with pytest.raises(OutputExistsError, match="out.csv"):  # the CSV alone is guarded too
        annotate_video(source, target, FrameAnalyser(model), progress=False)
    assert not target.exists() and target.with_suffix(".csv").read_bytes() == before[1]


def test_unreadable_videos_give_clear_errors(model, tmp_path) -> None:
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
    with pytest.raises(VideoError, match="cannot read corrupt.mp4|no frames"):
        annotate_video(corrupt, tmp_path / "out.mp4", FrameAnalyser(model), progress=False)
    with pytest.raises(VideoError, match="no video file"):
        annotate_video(tmp_path / "missing.mp4", tmp_path / "out.mp4", FrameAnalyser(model), progress=False)
    with pytest.raises(ValueError, match="mp4"):
        annotate_video(corrupt, tmp_path / "out.avi", FrameAnalyser(model), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corrupt.mp4"]  # nothing written, no temporary left
