"""Task adapters: how far an SPA output is from its dense twin's (the app's output line)."""

from __future__ import annotations

import torch

from spa_viz.viz.tasks import ClassificationTask, SaliencyTask


def test_saliency_gap_is_the_mean_absolute_map_difference_of_one_image() -> None:
    dense = torch.zeros(2, 1, 8, 8)
    spa = dense.clone()
    spa[1, 0, :4] = 0.5  # half of image 1's pixels off by 0.5
    assert SaliencyTask.output_gap(spa, dense, 0) == ("saliency MAE vs the dense teacher", 0.0)
    name, value = SaliencyTask.output_gap(spa, dense, 1)
    assert value == 0.25 and "MAE" in name


def test_tasks_without_a_gap_measure_say_so() -> None:
    assert ClassificationTask.output_gap(torch.zeros(1, 5), torch.zeros(1, 5), 0) is None


def test_detection_output_gap_counts_agreeing_detections() -> None:
    from spa_viz.viz.tasks import DETECTION_AGREEMENT, MaskRCNNTask

    task = MaskRCNNTask.__new__(MaskRCNNTask)  # only the detection helpers are used
    task.min_score = 0.3

    def detections(boxes, scores, labels):
        return [
            {
                "boxes": torch.tensor(boxes, dtype=torch.float),
                "scores": torch.tensor(scores),
                "labels": torch.tensor(labels),
                "masks": torch.zeros(len(labels), 1, 4, 4),
            }
        ]

    dense = detections([[0, 0, 10, 10], [20, 20, 30, 30]], [0.9, 0.8], [1, 2])
    same = detections([[0, 0, 10, 11], [20, 20, 30, 30]], [0.85, 0.7], [1, 2])
    moved = detections([[0, 0, 10, 10], [50, 50, 60, 60], [20, 20, 30, 30]], [0.9, 0.6, 0.5], [1, 2, 3])
    assert task.output_gap(same, dense, 0) == (DETECTION_AGREEMENT, 1.0)
    assert task.output_gap(moved, dense, 0) == (DETECTION_AGREEMENT, 1 / 3)
    empty = detections([], [], [])
    assert task.output_gap(empty, empty, 0)[1] == 1.0 and task.output_gap(empty, dense, 0)[1] == 0.0
