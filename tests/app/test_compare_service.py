"""The service's comparison, trade-off and token: columns resolved per model, equal compute, label
scores where labels exist, a clicked token from the cached forward, and bounded caches."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import torch

import spa_viz
from app.examples import Examples, build_examples
from app.models import ModelRegistry
from app.service import AnalysisService, Column, SPASettings, UserError
from app.settings import AppSettings
from spa_viz.analysis.token import inspect_token, record_block_inputs
from spa_viz.viz import inspection
from tests.app.conftest import TINY, tiny_model

DIGITS = "spa-vit-digits"


@pytest.fixture(scope="module")
def examples() -> Examples:
    return build_examples(AppSettings().examples_dir)


@pytest.fixture(scope="module")
def service(examples: Examples) -> Iterator[AnalysisService]:
    settings = AppSettings(device="cpu")
    registry = ModelRegistry(settings.torch_device, capacity=3, extra={TINY: tiny_model})
    service = AnalysisService(settings, registry, examples)  # the digit examples' masks are the labels
    try:
        yield service
    finally:
        service.close()


@pytest.mark.skipif(DIGITS not in spa_viz.available(), reason="the spa-vit-digits checkpoint is not here")
def test_columns_on_labelled_digits_score_their_kept_tokens_and_tome_has_no_labels(service, examples) -> None:
    columns = [Column(DIGITS), Column(DIGITS, "uniform_topk", 0.3), Column(DIGITS, "token_merging", 4)]
    result = service.compare(examples.digits[:2], columns, layer=None, image_index=1, measure=False)
    rows = result.summary["columns"]
    assert [row["method"] for row in rows] == ["learned_gate", "uniform_topk", "token_merging"]
    assert rows[0]["amount"] == service.model(DIGITS).saved_threshold, "no amount: the saved threshold"
    assert rows[0]["label_precision"] is not None and rows[1]["label_recall"] is not None
    assert rows[2]["label_precision"] is None and rows[2]["layer"] is None
    assert rows[1]["tokens_kept"] == pytest.approx(0.3, abs=0.02)
    assert all(row["output_error"]["measure"].startswith("1 - share of detections") for row in rows)
    assert all(row["latency_ms"] is None for row in rows), "measure=False leaves the wall-clock to a later call"
    assert rows[2]["gmacs_per_image"] < rows[2]["dense_gmacs_per_image"]
    for view in result.columns:
        assert view.tokens.ndim == 3 and view.output.shape[1] == view.difference.shape[1] == view.tokens.shape[1]
    assert result.summary["image_index"] == 1 and len(result.table) == 3


def test_equal_compute_moves_later_columns_to_the_first_columns_macs(service, examples) -> None:
    columns = [Column(TINY, amount=0.5), Column(TINY, "feature_norm", 0.95), Column(TINY, "token_merging", 0)]
    result = service.compare(examples.photos[:1], columns, equal_compute=True, measure=False)
    rows = result.summary["columns"]
    target = rows[0]["gmacs_per_image"]
    assert abs(rows[1]["gmacs_per_image"] / target - 1) <= 0.02
    assert rows[1]["amount"] != 0.95 and rows[2]["amount"] > 0
    assert abs(rows[2]["gmacs_per_image"] / target - 1) <= 0.02 or result.summary["notes"]
    started = time.perf_counter()
    service.compare(examples.photos[:1], columns, equal_compute=True, measure=False)
    assert time.perf_counter() - started < 1.0, "the matched amounts and the runs are cached"


def test_bad_columns_are_user_errors(service, examples) -> None:
    photo = examples.photos[:1]
    with pytest.raises(UserError, match="compare 2 to 4 columns"):
        service.compare(photo, [Column(TINY)] * 5)
    with pytest.raises(UserError, match="threshold must lie in"):
        service.compare(photo, [Column(TINY), Column(TINY, amount=1.5)])
    with pytest.raises(UserError, match="unknown packing policy"):
        service.compare(photo, [Column(TINY), Column(TINY, policy="rows")])
    with pytest.raises(UserError, match="unknown column keys"):
        Column.from_dict({"model": TINY, "ratio": 0.3}, TINY)


def test_a_clicked_token_matches_the_library_and_answers_from_the_cache(service, examples) -> None:
    photo = examples.photos[:1]
    spa = SPASettings(threshold=0.5)
    size = service.settings.display_size
    top = inspection.title_height(size)
    cell = size // 14
    assert service.token_at(photo, TINY, spa, 3, 5 * cell + 1, top + 3 * cell + 1) == (3, 5)
    first = service.token(photo, TINY, spa, 3, 0, 3, 5)
    started = time.perf_counter()
    again = service.token(photo, TINY, spa, 3, 0, 3, 5)
    assert time.perf_counter() - started <= 0.3
    assert again.info["seconds"] <= 0.3 and first.info == {**again.info, "seconds": first.info["seconds"]}
    entry, settled = service._settle(TINY, spa)
    with entry.lock:
        service._apply(entry, settled)
        _, record, inputs = record_block_inputs(entry.model, service._prepare(entry, photo).inputs)
        expected = inspect_token(entry.model, record, inputs, 3, 0, 3, 5)
    assert first.info["gate_logit"] == pytest.approx(expected.raw_score, abs=1e-4)
    assert first.info["kept"] == expected.kept and first.info["packed_row"] == expected.packed_row


def test_a_tome_column_click_shows_the_patches_merged_with_it(service, examples) -> None:
    photo = examples.photos[:1]
    size = service.settings.display_size
    top = inspection.title_height(size)
    view = service.column_token(photo, Column(TINY, "token_merging", 12), None, 0, size / 2, top + size / 2)
    assert view.info["merged_patches"] == len(view.info["patches"]) >= 1
    assert [view.info["row"], view.info["column"]] in view.info["patches"]
    with pytest.raises(UserError, match="below its title"):
        service.column_token(photo, Column(TINY, "token_merging", 12), None, 0, 5, 2)


def test_block_inputs_and_tradeoffs_stay_bounded(service, examples) -> None:
    photo = examples.photos[:1]
    for threshold in (0.1, 0.2, 0.3, 0.4, 0.6, 0.7):
        service.token(photo, TINY, SPASettings(threshold=threshold), 3, 0, 0, 0)
    assert len(service._block_inputs._data) <= service._block_inputs.capacity == 4
    progress: list[float] = []
    view = service.tradeoff(
        photo, TINY, ["learned_gate", "token_merging"], 2, None, lambda fraction, _: progress.append(fraction)
    )
    assert progress[-1] == 1.0 and len(view.info["points"]) == 4
    gate = sorted((p for p in view.info["points"] if p["method"] == "learned_gate"), key=lambda p: p["amount"])
    assert gate[0]["gmacs_per_image"] >= gate[1]["gmacs_per_image"], "a higher threshold keeps fewer tokens"
    with pytest.raises(UserError, match="do not run on"):
        service.tradeoff(photo, TINY, ["gradcam"], 3)
    assert torch.get_num_threads() >= 1
