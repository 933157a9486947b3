"""The one definition of precision / recall / IoU (and its rule for empty cases), and COCO AP."""

from __future__ import annotations

import pytest
import torch

from spa_viz.analysis.metrics import SelectionCounts, coco_ap


def test_counts_and_ratios_of_one_mask() -> None:
    keep = torch.tensor([True, True, True, False, False])
    labels = torch.tensor([True, True, False, True, False])
    m = SelectionCounts.of(keep, labels)
    assert (int(m.tp), int(m.fp), int(m.fn), int(m.tn)) == (2, 1, 1, 1)
    assert float(m.precision) == pytest.approx(2 / 3) and float(m.recall) == pytest.approx(2 / 3)
    assert float(m.iou) == pytest.approx(0.5)
    assert m.to_dict(digits=None)["iou"] == pytest.approx(0.5) and m.to_dict()["tn"] == 1
    with pytest.raises(ValueError, match="tokens"):
        SelectionCounts.of(keep, labels[:3])


def test_empty_cases_follow_the_documented_rule() -> None:
    nothing = torch.zeros(4, dtype=torch.bool)
    some = torch.tensor([True, False, False, False])
    no_labels = SelectionCounts.of(some, nothing)
    assert float(no_labels.recall) == 1.0, "no positive label: nothing could be missed"
    assert float(no_labels.precision) == 0.0 and float(no_labels.iou) == 0.0
    both_empty = SelectionCounts.of(nothing, nothing)
    assert float(both_empty.iou) == 1.0 and float(both_empty.recall) == 1.0
    assert float(both_empty.precision) == 0.0, "nothing kept: no kept token to credit"


def test_rows_are_scored_separately_and_counts_pool_by_addition() -> None:
    keep = torch.tensor([[True, False], [False, False]])
    labels = torch.tensor([[True, True], [False, False]])
    per_row = SelectionCounts.of(keep, labels)
    assert per_row.recall.tolist() == [0.5, 1.0] and per_row.iou.tolist() == [0.5, 1.0]
    pooled = SelectionCounts.of(keep[0], labels[0]) + SelectionCounts.of(keep[1], labels[1])
    assert float(pooled.recall) == 0.5 and int(pooled.tokens) == 4
    with pytest.raises(ValueError, match="one scored unit"):
        per_row.to_dict()


def test_coco_ap_perfect_wrong_and_empty() -> None:
    gt = {
        "images": [{"id": 1, "height": 64, "width": 64}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 2, "bbox": [4, 4, 20, 30], "area": 600, "iscrowd": 0}],
        "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
    }
    perfect = [{"image_id": 1, "category_id": 2, "score": 0.9, "bbox": [4, 4, 20, 30]}]
    assert coco_ap(gt, perfect) == pytest.approx({"AP": 1.0, "AP50": 1.0})
    assert coco_ap(gt, [{**perfect[0], "category_id": 1}])["AP50"] == 0.0
    assert coco_ap(gt, []) == {"AP": 0.0, "AP50": 0.0}
