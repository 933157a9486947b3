"""Task adapters: how far an SPA output is from its dense twin's (the app's output line)."""

from __future__ import annotations

import torch

from spa_viz.viz.tasks import DetectionTask, SaliencyTask


def test_saliency_gap_is_the_mean_absolute_map_difference_of_one_image() -> None:
    dense = torch.zeros(2, 1, 8, 8)
    spa = dense.clone()
    spa[1, 0, :4] = 0.5  # half of image 1's pixels off by 0.5
    assert SaliencyTask.output_gap(spa, dense, 0) == ("saliency MAE vs the dense teacher", 0.0)
    name, value = SaliencyTask.output_gap(spa, dense, 1)
    assert value == 0.25 and "MAE" in name


def test_tasks_without_a_gap_measure_say_so() -> None:
    assert DetectionTask.output_gap({}, {}, 0) is None
