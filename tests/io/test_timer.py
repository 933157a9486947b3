"""The one timer: it measures the block it wraps, and medians interleave their candidates."""

from __future__ import annotations

import time

import pytest

from spa_viz.io.timer import median_seconds, stopwatch


def test_stopwatch_fills_in_wall_and_cpu_time() -> None:
    with stopwatch() as timing:
        time.sleep(0.02)
    assert timing.wall >= 0.02 and 0.0 <= timing.cpu < timing.wall


def test_median_seconds_warms_up_then_alternates() -> None:
    calls: list[str] = []
    result = median_seconds({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=3, warmup=2)
    assert calls == ["a", "a", "b", "b"] + ["a", "b"] * 3
    assert set(result) == {"a", "b"} and all(v >= 0 for v in result.values())
    with pytest.raises(ValueError, match="repeats"):
        median_seconds({"a": lambda: None}, repeats=0)
