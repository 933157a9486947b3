"""The dataset analysis: rows agree with a direct trace, selection scores follow the labels by hand,
the run stops at the cap and on cancel, files round-trip, the sweep's compute falls with the threshold,
and on the digits split its AP50 is the detection evaluation's."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

import spa_viz
from spa_viz.analysis.dataset import (
    LABEL_BOXES,
    LABEL_MASKS,
    ImageRow,
    analyse_dataset,
    dataset_sweep,
    load_rows,
    rows_to_csv,
    summarise,
    summary_to_json,
)
from spa_viz.analysis.metrics import f_measure_curve
from spa_viz.analysis.trace import trace
from spa_viz.data.sources import (
    CorpusSource,
    DatasetBatch,
    DigitsSource,
    FolderSource,
    SourceUnavailableError,
    builtin_source,
)
from spa_viz.data.splits import DigitsData, digits_samples
from spa_viz.models.saliency.spa import spa_saliency
from spa_viz.viz.tasks import DETECTION_AGREEMENT, ClassificationTask, SaliencyTask, adapter_for
from tests.conftest import tiny_vit
from tests.layers.small_models import random_gates
from tests.models.test_saliency_spa import tiny_saliency

DIGITS = "spa-vit-digits"


@pytest.fixture(scope="module")
def vit() -> torch.nn.Module:
    """A 32 px ViT (4 x 4 grid of 8 px patches) with SPA in blocks 1-3 and random gates."""
    torch.manual_seed(0)
    model = spa_viz.patch(tiny_vit(), 1)
    random_gates(model, seed=3)
    return model


@pytest.fixture(scope="module")
def task(vit) -> ClassificationTask:
    return ClassificationTask(vit, {})


def _images(count: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(count, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _objects(count: int) -> list[torch.Tensor]:
    """Per image: the top-left 16 x 16 pixels (tokens 0, 1, 4, 5) and one pixel of the last token (15)."""
    mask = torch.zeros(32, 32, dtype=torch.bool)
    mask[:16, :16] = True
    mask[31, 31] = True
    return [mask.clone() for _ in range(count)]


LABELLED = {0, 1, 4, 5, 15}


def _batch(images: torch.Tensor, start: int = 0, **annotations) -> DatasetBatch:
    indices = list(range(start, start + len(images)))
    return DatasetBatch(images, [f"im{i}" for i in indices], indices, "made", **annotations)


def _rows(model, task, batches, **kwargs) -> list[ImageRow]:
    return [row for rows in analyse_dataset(model, task, batches, **kwargs) for row in rows]


def test_rows_agree_with_a_direct_trace(vit, task) -> None:
    images = _images(4)
    rows = _rows(vit, task, [_batch(images[:2]), _batch(images[2:], start=2)])
    _, first = trace(vit, images[:2])
    _, second = trace(vit, images[2:])
    assert [row.index for row in rows] == [0, 1, 2, 3] and [row.name for row in rows] == ["im0", "im1", "im2", "im3"]
    for record, batch_rows in ((first, rows[:2]), (second, rows[2:])):
        for i, row in enumerate(batch_rows):
            assert row.layers == [t.layer for t in record.layers] == [1, 2, 3]
            assert row.keep == [float(t.keep_ratio[i]) for t in record.layers]
            assert row.macs_dense * 2 == record.backbone_macs_dense
        padding = sum(t.cost.padding_macs for t in record.layers)
        assert sum(row.macs_run for row in batch_rows) + padding == record.backbone_macs_run
    assert len({tuple(row.keep) for row in rows}) > 1  # the random gates keep a different mix per image
    # no annotation and no dense teacher (a classifier): no labels, no scores
    assert all(row.label_source is None and row.recall is None and row.object_share is None for row in rows)


def test_precision_recall_and_iou_follow_hand_made_labels(vit, task) -> None:
    images = _images(3)
    rows = _rows(vit, task, [_batch(images, masks=_objects(3))])
    _, record = trace(vit, images)
    for i, row in enumerate(rows):
        assert row.label_source == LABEL_MASKS and row.object_share == pytest.approx(5 / 16)
        for position, layer in enumerate(record.layers):
            kept = set(torch.nonzero(layer.keep[i]).flatten().tolist())
            hits = len(kept & LABELLED)
            assert row.recall[position] == pytest.approx(hits / len(LABELLED))
            assert row.precision[position] == pytest.approx(hits / len(kept) if kept else 0.0)
            assert row.iou[position] == pytest.approx(hits / len(kept | LABELLED))
    # boxes instead of masks: a box over pixels 0..8 touches the tokens of rows and columns 0 and 1
    boxes = [torch.tensor([[0.0, 0.0, 9.0, 9.0]])] * 3
    boxed = _rows(vit, task, [_batch(images, boxes=boxes)])
    assert {row.label_source for row in boxed} == {LABEL_BOXES}
    assert [row.object_share for row in boxed] == [pytest.approx(4 / 16)] * 3
    kept = set(torch.nonzero(record.layers[0].keep[0]).flatten().tolist())
    assert boxed[0].recall[0] == pytest.approx(len(kept & {0, 1, 4, 5}) / 4)


def test_the_run_stops_at_the_cap_and_on_cancel(vit, task) -> None:
    read = []

    def batches():
        for start in range(0, 10, 2):
            read.append(start)
            yield _batch(_images(2, seed=start), start=start)

    capped = list(analyse_dataset(vit, task, batches(), max_images=3))
    assert [len(rows) for rows in capped] == [2, 1] and read == [0, 2]  # the third batch is never read
    read.clear()
    fractions = []
    cancelled = list(
        analyse_dataset(
            vit, task, batches(), total=10, cancel=lambda: len(read) >= 2, progress=lambda f, _: fractions.append(f)
        )
    )
    assert [len(rows) for rows in cancelled] == [2, 2] and read == [0, 2]
    assert fractions == [0.2, 0.4]


def _made_rows() -> list[ImageRow]:
    """Rows whose keep rises with the object share, with a gap, and one image without labels."""
    rows = []
    for i, share in enumerate([0.1, 0.4, 0.2, 0.3]):
        rows.append(
            ImageRow(
                source="made",
                index=i,
                name=f"im{i}",
                layers=[2, 3],
                keep=[0.1 + share / 2, 0.05 + share / 4],
                label_source=LABEL_MASKS,
                object_share=share,
                precision=[0.5, 0.6],
                recall=[1.0 - share, 0.9],
                iou=[0.4, 0.5],
                macs_run=100 - i,
                macs_dense=200,
                output_gap_name=DETECTION_AGREEMENT,
                output_gap=1.0 - share,
                ms_spa=1.5,
                ms_dense=2.0,
            )
        )
    rows.append(ImageRow("other", 0, "plain", [2, 3], [0.9, 0.8], macs_run=150, macs_dense=200))
    return rows


def test_the_summary_ranks_and_correlates() -> None:
    rows = _made_rows()
    summary = summarise(rows, worst_k=2)
    assert summary.images == 5 and summary.sources == ["made", "other"]
    assert summary.label_sources == {LABEL_MASKS: 4, "none": 1}
    first = summary.layers[0]
    assert first.layer == 2 and first.keep.count == 5 and first.recall.count == 4
    assert first.recall.min == pytest.approx(0.6) and first.recall.max == pytest.approx(0.9)
    assert first.keep_object_correlation == pytest.approx(1.0)
    assert summary.macs_saved_pooled == pytest.approx(1 - (100 + 99 + 98 + 97 + 150) / 1000)
    assert [r.index for r in summary.worst["recall"]] == [1, 3]  # recall 1 - share: largest shares first
    assert [r.value for r in summary.worst["output_error"]] == pytest.approx([0.4, 0.3])  # 1 - agreement
    assert [(r.source, r.value) for r in summary.worst["keep"]][0] == ("other", 0.9)
    assert summarise(rows, layer=3).worst["keep"][0].value == 0.8
    with pytest.raises(ValueError, match="not an SPA layer"):
        summarise(rows, layer=7)


def test_csv_and_json_round_trip(tmp_path) -> None:
    rows = _made_rows()
    rows_to_csv(rows, tmp_path / "rows.csv")
    assert load_rows(tmp_path / "rows.csv") == rows
    summary = summarise(rows)
    summary_to_json(summary, rows, tmp_path / "summary.json", {"model": "made"})
    assert load_rows(tmp_path / "summary.json") == rows
    document = json.loads((tmp_path / "summary.json").read_text())
    assert document["meta"] == {"model": "made"} and document["summary"] == summary.to_dict()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rows.csv", "summary.json"]  # no temporary file left


def test_f_measure_curve() -> None:
    mask = torch.zeros(10, 10, dtype=torch.bool)
    mask[:4] = True
    assert float(f_measure_curve(mask.float(), mask).max()) == pytest.approx(1.0)
    flat = f_measure_curve(torch.full((10, 10), 0.3), mask)
    share = 0.4  # everything predicted at levels up to 0.3 * 255: precision = the object share, recall 1
    assert float(flat[0]) == pytest.approx(1.3 * share / (0.3 * share + 1)) and float(flat[100]) == 0.0


@pytest.fixture(scope="module")
def saliency() -> torch.nn.Module:
    model = spa_saliency(tiny_saliency(), {"start_layer": 1, "threshold": 0.5, "soft_gating": True})
    random_gates(model, seed=5)
    return model.eval()


def test_the_sweep_spends_less_as_the_threshold_rises(saliency) -> None:
    task = SaliencyTask(saliency, {})
    images = torch.randn(4, 3, 56, 56, generator=torch.Generator().manual_seed(2))
    masks = [torch.zeros(56, 56, dtype=torch.bool)] * 4
    masks = [m.index_fill(0, torch.arange(10, 30), True) for m in masks]
    batches = [_batch(images[:2], masks=masks[:2]), _batch(images[2:], start=2, masks=masks[2:])]
    before = spa_viz.spa_context(saliency).config.to_dict()
    points = dataset_sweep(saliency, task, batches, [0.8, 0.2, 0.5], peers=["feature_norm"], points=2)
    assert spa_viz.spa_context(saliency).config.to_dict() == before
    dense, *gate, low, high = points
    assert dense.label == "dense twin" and dense.macs == dense.dense_macs and dense.metrics["output_gap"] == 0
    assert [p.amount for p in gate] == [0.2, 0.5, 0.8]
    macs = [p.macs for p in gate]
    assert macs == sorted(macs, reverse=True) and macs[0] > macs[-1] and macs[0] <= dense.macs
    assert low.amount < high.amount and low.macs < high.macs <= dense.macs
    for point in points:
        assert point.images == 4 and 0 <= point.metrics["max_f_measure"] <= 1
        assert point.output_gap_name == "saliency MAE vs the dense teacher"
    assert gate[-1].metrics["output_gap"] > 0


def test_an_unprepared_corpus_says_how_to_prepare_it(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("SPA_VIZ_CACHE", str(tmp_path))
    with pytest.raises(SourceUnavailableError, match="prepare"):
        CorpusSource("test")


@pytest.fixture(scope="module")
def digits_model() -> torch.nn.Module:
    if DIGITS not in spa_viz.available():
        pytest.skip(f"the {DIGITS} checkpoint is not here")
    return spa_viz.load(DIGITS)


@pytest.fixture(scope="module")
def digits() -> DigitsSource:
    return DigitsSource("test", DigitsData(cache=False), num=6)


def test_digits_ap50_is_the_detection_evaluations(digits_model, digits) -> None:
    from spa_viz.analysis.metrics import coco_ap
    from spa_viz.data.coco import InMemoryDetection
    from spa_viz.data.splits import Sample
    from spa_viz.recipes.detection.evaluate import predict

    task = adapter_for(digits_model)
    rows = _rows(digits_model, task, digits.batches(task, batch_size=4))
    assert len(rows) == 6 and {row.label_source for row in rows} == {LABEL_MASKS}
    assert all(row.macs_run < row.macs_dense for row in rows)
    threshold = spa_viz.spa_context(digits_model).config.threshold
    dense, point = dataset_sweep(digits_model, task, digits.batches(task, batch_size=4), [threshold])
    samples = [Sample(s.image, s.boxes, s.labels, s.masks) for s in digits.samples]
    gt, detections, _ = predict(digits_model, InMemoryDetection(samples, 96), 96)
    assert point.metrics["AP50"] == pytest.approx(coco_ap(gt, detections)["AP50"], abs=1e-9)
    assert math.isfinite(dense.metrics["AP50"]) and dense.metrics["output_gap"] == 1.0


def test_analyze_summary_writes_json_and_csv_for_a_folder(digits_model, digits, tmp_path) -> None:
    from spa_viz.cli import main

    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(digits.pixels(i)).save(folder / f"digit{i}.png")
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    assert main(["analyze", str(folder), "--out", str(out), "--summary", "--model", DIGITS]) == 1  # one skipped
    document = json.loads((out / "dataset_summary.json").read_text())
    assert document["summary"]["images"] == 3 and document["meta"]["model"] == DIGITS
    assert [s["input"].endswith("notes.txt") for s in document["meta"]["skipped"]] == [True]
    rows = load_rows(out / "dataset_rows.csv")
    assert [row.name for row in rows] == ["digit0.png", "digit1.png", "digit2.png"]
    assert rows == load_rows(out / "dataset_summary.json")
    assert rows[0].label_source.startswith("dense twin's detections")  # a folder has no annotations
    assert main(["analyze", str(folder), "--out", str(out), "--summary", "--model", DIGITS]) == 2  # no overwrite


def test_a_folder_source_skips_what_is_no_image(tmp_path, task) -> None:
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "b.png").write_bytes(b"")
    Image.fromarray(np.full((8, 8, 3), 255, np.uint8)).save(tmp_path / "c.jpg")
    source = FolderSource.from_folder(tmp_path)
    batches = list(source.batches(task, batch_size=2))
    assert [b.names for b in batches] == [["a.png"], ["c.jpg"]] and [b.indices for b in batches] == [[0], [2]]
    assert batches[0].images.shape == (1, 3, 32, 32)
    assert [reason.split(" ")[0] for _, reason in source.skipped] == ["empty"]


def test_builtin_sources_by_name() -> None:
    source = builtin_source("digits/test", {"data": {"kind": "digits", "seed": 1, "test": 2, "cache": False}})
    assert source.name == "digits/test" and len(source) == 2
    assert np.array_equal(source.pixels(1), digits_samples("test", 2, seed=1)[1].image)
    with pytest.raises(ValueError, match="unknown source"):
        builtin_source("imagenet/val")
