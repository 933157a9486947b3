"""The analysis service in process: every selector a model can run, fusion modes, the wall-clock
measurement and the bound on the app's own files."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

import spa_viz
from app.examples import Examples, build_examples
from app.files import AppFiles, BoundedFolder
from app.models import LEARNED_GATE, ModelError, ModelRegistry, selector_amount
from app.service import AnalysisService, SPASettings, UserError
from app.settings import AppSettings
from app.ui import PanelFiles
from spa_viz.models.zoo import checkpoints_dir
from spa_viz.selection.selectors import SELECTORS
from tests.app.conftest import TINY, tiny_model

DIGIT_MODELS = [name for name in ("spt-digits", "spa-vit-digits") if name in spa_viz.available()]


@pytest.fixture(scope="module")
def examples() -> Examples:
    return build_examples(AppSettings().examples_dir)


@pytest.fixture(scope="module")
def service() -> Iterator[AnalysisService]:
    settings = AppSettings(device="cpu", report_files=2)
    registry = ModelRegistry(settings.torch_device, capacity=3, extra={TINY: tiny_model})
    service = AnalysisService(settings, registry)
    try:
        yield service
    finally:
        service.close()


@pytest.mark.skipif(not DIGIT_MODELS, reason="no SPT / SPA-ViT digit checkpoint in checkpoints/")
@pytest.mark.parametrize("model", DIGIT_MODELS)
def test_every_selector_the_model_can_run_runs_through_the_service(
    service: AnalysisService, examples: Examples, model: str
) -> None:
    entry = service.model(model)
    has_class_token = spa_viz.spa_context(entry.model).num_prefix > 0
    assert entry.selectors[0] == LEARNED_GATE
    assert ("cls_attention" in entry.selectors) == has_class_token, "SPT has no class token"
    assert set(entry.selectors[1:]) == {n for n in SELECTORS if has_class_token or n != "cls_attention"}
    batch = examples.digits[:2]
    for name in entry.selectors[1:]:
        amount = selector_amount(name)
        spa = SPASettings(selector=name, selector_amount=0.3)
        result = service.analyze(batch, model, spa, measure=False)
        layers = result.summary["trace"]["layers"]
        assert layers and all(layer["selector"] == name and layer["score_source"] == "selector" for layer in layers)
        for layer in layers:
            tokens = layer["grid"][0] * layer["grid"][1]
            if amount.param == "ratio":
                assert layer["kept_per_image"] == [math.ceil(0.3 * tokens)] * 2, (name, layer["layer"])
            else:
                assert all(1 <= kept <= tokens for kept in layer["kept_per_image"]), (name, layer["layer"])
        assert result.gate.shape[0] > result.gate.shape[1] // 2 and result.strip.size


@pytest.mark.skipif("spt-digits" not in spa_viz.available(), reason="the spt-digits checkpoint is not here")
def test_a_selector_the_model_cannot_run_is_a_user_error(service: AnalysisService, examples: Examples) -> None:
    with pytest.raises(UserError, match=r"cls_attention cannot run on spt-digits: it needs a class token") as info:
        service.analyze(examples.digits[:1], "spt-digits", SPASettings(selector="cls_attention"))
    assert "['learned gate', 'feature_norm', 'random', 'uniform_topk']" in str(info.value)
    with pytest.raises(UserError, match="unknown selector 'gradcam'"):
        service.analyze(examples.digits[:1], "spt-digits", SPASettings(selector="gradcam"))


def test_selector_amount_comes_from_the_selector_class() -> None:
    assert selector_amount("cls_attention").param == "p" and selector_amount("cls_attention").default == 0.9
    assert {selector_amount(n).param for n in ("feature_norm", "random", "uniform_topk")} == {"ratio"}
    with pytest.raises(ValueError, match="unknown selector"):
        selector_amount("nope")


def test_fusion_mode_is_a_live_setting_and_bad_values_name_the_allowed(
    service: AnalysisService, examples: Examples
) -> None:
    photo = examples.photos[:1]
    chain = service.analyze(photo, TINY, SPASettings(fusion="chain"), measure=False)
    stage = service.analyze(photo, TINY, SPASettings(fusion="stage"), measure=False)
    layers = chain.summary["trace"]["layers"]
    assert [layer["fusion"] for layer in layers] == ["chain"] * len(layers)
    assert layers[0]["score_source"] == "own logit" and {layer["score_source"] for layer in layers[1:]} == {"fused"}
    assert {layer["score_source"] for layer in stage.summary["trace"]["layers"]} == {"own logit"}, (
        "a plain ViT has one stage: nothing to fuse"
    )
    assert not np.array_equal(chain.strip, stage.strip)
    with pytest.raises(
        UserError, match=r"unknown fusion mode 'cascade'; choose one of \['stage', 'chain', 'none', 'saved'\]"
    ):
        service.analyze(photo, TINY, SPASettings(fusion="cascade"))


@pytest.mark.skipif("spt-digits" not in spa_viz.available(), reason="the spt-digits checkpoint is not here")
def test_default_fusion_is_the_mode_the_model_was_saved_with(service: AnalysisService, examples: Examples) -> None:
    entry = service.model("spt-digits")
    spa_viz.configure(entry.model, fusion="chain")  # another request left the shared model in another mode
    shown = service.analyze(examples.digits[:1], "spt-digits", SPASettings(), measure=False)
    assert SPASettings().fusion == "saved" and entry.saved_fusion == "stage"
    assert {layer["fusion"] for layer in shown.summary["trace"]["layers"]} == {"stage"}
    assert shown.summary["settings"]["fusion"] == "stage"


@pytest.mark.skipif("spt-digits" not in spa_viz.available(), reason="the spt-digits checkpoint is not here")
def test_stage_fusion_on_spt_fuses_only_across_stages(service: AnalysisService, examples: Examples) -> None:
    trace = service.analyze(examples.digits[:1], "spt-digits", SPASettings(fusion="stage"), measure=False)
    layers = trace.summary["trace"]["layers"]
    first_grid = layers[0]["grid"]
    first_stage = [layer for layer in layers if layer["grid"] == first_grid]
    assert all(layer["score_source"] == "own logit" for layer in first_stage)
    none = service.analyze(examples.digits[:1], "spt-digits", SPASettings(fusion="none"), measure=False)
    assert {layer["score_source"] for layer in none.summary["trace"]["layers"]} == {"own logit"}


@pytest.mark.skipif("spa-vit-digits" not in spa_viz.available(), reason="the spa-vit-digits checkpoint is not here")
def test_unkept_switch_reruns_the_analysis_with_token_ages(service: AnalysisService, examples: Examples) -> None:
    """The unkept path opens as saved, switches live, and the token-age view and summary follow it."""
    digits = examples.digits[:2]
    entry = service.model("spa-vit-digits")
    saved = service.analyze(digits, "spa-vit-digits", SPASettings(), measure=False)
    assert saved.summary["settings"]["unkept"] == entry.saved_unkept
    copy = service.analyze(digits, "spa-vit-digits", SPASettings(unkept="copy"), measure=False)
    refresh = service.analyze(digits, "spa-vit-digits", SPASettings(unkept="refresh"), measure=False)
    copied, refreshed = copy.summary["trace"], refresh.summary["trace"]
    assert {layer["unkept"] for layer in copied["layers"]} == {"copy"}
    assert all(layer["share_stale"] > 0 and layer["share_refreshed"] == 0 for layer in copied["layers"])
    assert all(layer["share_stale"] == 0 and layer["mean_age"] == 0 for layer in refreshed["layers"])
    assert copied["output_mean_age"] > 0 and refreshed["output_mean_age"] == 0
    assert copy.age.shape[2] == 3 and not np.array_equal(copy.age, refresh.age)
    assert "refresh" in refresh.stats and "not current" in refresh.stats
    assert (
        entry.saved_threshold
        == json.loads((checkpoints_dir() / "spa-vit-digits" / "config.json").read_text())["backbone"]["spa"][
            "threshold"
        ]
    ), "the app opens at the threshold saved with the model"
    with pytest.raises(UserError, match=r"unknown unkept path 'drop'.*copy.*paper.*refresh"):
        service.analyze(digits, "spa-vit-digits", SPASettings(unkept="drop"), measure=False)


def test_wall_clock_is_measured_once_per_batch_and_settings(service: AnalysisService, examples: Examples) -> None:
    photo = examples.photos[2:4]
    spa = SPASettings(threshold=0.45)
    shown = service.analyze(photo, TINY, spa, measure=False)
    assert "measuring" in shown.stats and shown.summary["latency_ms"] is None
    before = service.timing_count
    clock = service.measure(photo, TINY, spa)
    assert service.timing_count == before + 1
    assert clock.batch == 2 and clock.device == "cpu" and clock.threads == torch.get_num_threads()
    assert 3 <= clock.repeats <= service.settings.timing_repeats and clock.dense_s > 0 and clock.spa_s > 0
    stats, summary = service.timing(photo, TINY, spa, layer=8, image_index=1)
    assert service.timing_count == before + 1, "another layer or image reuses the measurement"
    line = stats.split("  \n")[1]
    assert re.search(rf"median of {clock.repeats} runs each, dense twin and SPA alternating, no tracing", line)
    assert f"batch of 2, {clock.threads} thread" in line and "MACs saved" in line
    assert summary["latency_ms"]["dense"] == round(clock.dense_s * 1000, 2)
    again = service.analyze(photo, TINY, spa, layer=6, measure=False)
    assert "measuring" not in again.stats, "the cached measurement shows at once"
    service.measure(photo, TINY, SPASettings(threshold=0.55))
    assert service.timing_count == before + 2, "new settings are measured anew"


def test_timing_repeats_shrink_to_fit_the_budget(service: AnalysisService) -> None:
    budget = service.settings.timing_budget_s
    assert service._timing_repeats(0.001) == service.settings.timing_repeats
    assert service._timing_repeats(budget) == 3, "never fewer than 3"
    assert service._timing_repeats(budget / 10.5) == 4  # 5.25 pairs fit, one is the warm-up


def test_reports_and_panels_stay_under_their_caps(service: AnalysisService, examples: Examples) -> None:
    reports = [
        service.report(examples.photos[:1], TINY, SPASettings(threshold=t), layer=4, image_index=0)
        for t in (0.3, 0.4, 0.5, 0.6)
    ]
    assert [p.exists() for p in reports] == [False, False, True, True], "the cap is 2 reports"
    assert len(list(service.files.reports.folder.iterdir())) == 2

    panels = PanelFiles(BoundedFolder(service.files.root / "test-panels", capacity=4))
    written = [panels(np.full((8, 8, 3), value, dtype=np.uint8)) for value in range(10)]
    assert len(list((service.files.root / "test-panels").iterdir())) == 4
    assert panels(np.full((8, 8, 3), 9, dtype=np.uint8)) == written[-1], "a panel already written is reused"
    Path(written[-1]).unlink()  # removed behind its back (gradio's cache sweep can): written again
    assert Path(panels(np.full((8, 8, 3), 9, dtype=np.uint8))).exists()


def test_concurrent_requests_writing_the_same_panel(tmp_path: Path) -> None:
    panels = PanelFiles(BoundedFolder(tmp_path, capacity=4))
    shared = np.full((64, 64, 3), 7, dtype=np.uint8)  # the same cached array, as two requests hand it over
    with ThreadPoolExecutor(8) as pool:
        paths = set(pool.map(lambda _: panels(shared), range(32)))
    assert len(paths) == 1 and [p.name for p in tmp_path.iterdir()] == [Path(paths.pop()).name]


def test_app_files_are_removed_on_close(tmp_path: Path) -> None:
    files = AppFiles(tmp_path, panel_capacity=2, report_capacity=1)
    (files.panels.claim("a.png")).write_bytes(b"x")
    assert files.usage().files == 1 and files.root.parent == tmp_path.resolve()
    files.close()
    assert not files.root.exists()
    files.close()  # idempotent


def test_an_image_index_past_the_batch_is_named(service: AnalysisService, examples: Examples) -> None:
    photos = examples.photos[:2]
    shown = service.analyze(photos, TINY, SPASettings(), image_index=5, measure=False)
    assert shown.summary["image_index"] == 1
    assert any("image index 5 is outside the batch of 2 (0-1): showing image 1" in w for w in shown.warnings)
    assert "outside the batch" in shown.status
    inside = service.analyze(photos, TINY, SPASettings(), image_index=1, measure=False)
    assert not any("outside the batch" in w for w in inside.warnings)


def test_a_slower_spa_run_says_why() -> None:
    from app.service import WallClock

    slow = WallClock(dense_s=0.010, spa_s=0.015, repeats=5, batch=1, threads=1, device="cpu")
    fast = WallClock(dense_s=0.010, spa_s=0.006, repeats=5, batch=8, threads=1, device="cpu")
    assert "Why SPA is slower here" in slow.line(0.4) and "40%" in slow.line(0.4) and "batch of 1" in slow.line(0.4)
    assert "Why SPA is slower" not in fast.line(0.4)


def test_a_large_timm_name_is_refused_before_it_is_built() -> None:
    registry = ModelRegistry(torch.device("cpu"), max_params=10_000_000)
    with pytest.raises(ModelError, match=r"vit_large_patch16_224 has 304M parameters.*--max-params"):
        registry.get("vit_large_patch16_224")
    assert registry.loaded() == [] and not registry._building, "a refused name leaves no build lock behind"


def test_a_model_being_built_does_not_hold_up_loaded_ones() -> None:
    """One request builds a slow model; another, for a model already loaded, is answered meanwhile."""
    import threading

    started, release = threading.Event(), threading.Event()

    def slow() -> torch.nn.Module:
        started.set()
        assert release.wait(30), "the test released the build"
        return tiny_model()

    registry = ModelRegistry(torch.device("cpu"), capacity=2, extra={TINY: tiny_model, "slow": slow})
    registry.get(TINY)
    builder = threading.Thread(target=registry.get, args=("slow",))
    builder.start()
    assert started.wait(30)
    answered = threading.Event()
    threading.Thread(target=lambda: (registry.get(TINY), answered.set())).start()
    assert answered.wait(10), "a loaded model is served while another one builds"
    release.set()
    builder.join(30)
    assert sorted(registry.loaded()) == sorted([TINY, "slow"])


@pytest.mark.skipif("spa-vit-digits" not in spa_viz.available(), reason="the spa-vit-digits checkpoint is not here")
def test_detector_predictions_show_the_dense_twin_and_the_ground_truth(
    service: AnalysisService, examples: Examples
) -> None:
    digit = examples.digits[:1]
    without_truth = service.analyze(digit, "spa-vit-digits", SPASettings(), measure=False)
    single = service.analyze(examples.photos[:1], TINY, SPASettings(), measure=False)
    assert without_truth.predictions.shape[1] > 1.8 * without_truth.gate.shape[1], "SPA and dense twin side by side"
    assert single.predictions.shape[1] < 1.5 * single.gate.shape[1], "other tasks: one picture"

    settings = AppSettings(device="cpu")
    annotated = AnalysisService(settings, ModelRegistry(settings.torch_device, capacity=1), examples)
    try:
        with_truth = annotated.analyze(digit, "spa-vit-digits", SPASettings(), measure=False)
        entry = annotated.model("spa-vit-digits")
    finally:
        annotated.close()
    assert with_truth.predictions.shape == without_truth.predictions.shape
    white = lambda picture: int((picture == 255).all(-1).sum())  # noqa: E731
    assert white(with_truth.predictions) > white(without_truth.predictions), "ground-truth boxes drawn in white"
    truth = next(iter(examples.annotations.values())).boxes
    mapped = entry.adapter.map_boxes((128, 128), truth)
    assert mapped.shape == (len(truth), 4) and float(mapped.max()) <= 96 + 1e-3, "letterboxed to the 96 px input"
