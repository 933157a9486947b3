"""The one learning-rate schedule and the one running mean."""

from __future__ import annotations

import pytest

from spa_viz.recipes.meters import RunningMeans
from spa_viz.recipes.schedule import cosine_schedule


def test_warmup_then_cosine_to_the_end_value() -> None:
    values = [cosine_schedule(step, 10, 1.0, 0.1, warmup=2) for step in range(12)]
    assert values[:2] == [0.5, 1.0]
    assert values[2] == pytest.approx(1.0) and values[6] == pytest.approx(0.55)
    assert values[10] == pytest.approx(0.1) and values[11] == pytest.approx(0.1), "held after the end"
    assert all(a >= b for a, b in zip(values[2:], values[3:])), "monotone decay"


def test_running_means_skip_none_and_reset() -> None:
    meter = RunningMeans()
    meter.add(loss=1.0, select=None)
    meter.add(loss=3.0, select=2.0)
    assert meter.means() == {"loss": 2.0, "select": 2.0}
    meter.reset()
    assert meter.means() == {}
