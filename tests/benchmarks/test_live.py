"""The live frames-per-second benchmark: a camera pan of distinct frames, SPA and the dense twin timed
alternating, and frames per second and their ratio that follow from the paired medians."""

from __future__ import annotations

import numpy as np
import pytest

from spa_viz.benchmarks.live import markdown, pan_frames, run


def test_the_pan_sweeps_crops_of_the_asked_size_across_the_photo() -> None:
    photo = np.arange(60 * 80 * 3, dtype=np.uint8).reshape(60, 80, 3)
    frames = pan_frames(photo, 4, (64, 48))
    assert [f.shape for f in frames] == [(48, 64, 3)] * 4
    assert all(not np.array_equal(a, b) for a, b in zip(frames, frames[1:]))


def test_the_report_follows_from_the_paired_medians() -> None:
    report = run("spa-vit-digits", threads=1, repeats=2, warmup=1, frames=3, frame_size=(64, 48))
    medians = report["timing"]["median_ms"]
    assert report["timing"]["repeats"] == 2 and report["timing"]["baseline"] == "dense"
    assert report["fps"]["spa"] == pytest.approx(1e3 / medians["spa"])
    assert report["fps_ratio"] == pytest.approx(medians["dense"] / medians["spa"])
    assert 0 < report["mean_keep"] < 1 and report["mean_macs_saved"] > 0
    assert report["meets_target"] == (report["fps"]["spa"] >= 4 and report["fps_ratio"] > 1)
    assert "SPA / dense frames per second" in markdown(report)
