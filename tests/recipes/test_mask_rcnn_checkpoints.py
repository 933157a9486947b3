"""The shipped Mask R-CNN digit checkpoints: small enough for git, their cards are the rendered
templates, and a fixed subset of the test split reproduces the metrics their metrics.json records."""

from __future__ import annotations

import json

import pytest

import spa_viz
from spa_viz.data.coco import InMemoryDetection
from spa_viz.data.splits import digits_samples
from spa_viz.io.checkpoint import checkpoint_config
from spa_viz.models.detection import SPAMaskRCNN
from spa_viz.models.zoo import checkpoints_dir
from spa_viz.recipes.detection.card import model_card
from spa_viz.recipes.detection.evaluate import main
from spa_viz.recipes.detection.mask_rcnn import evaluate_mask_rcnn

SHIPPED = ("spt-maskrcnn-digits", "spt-maskrcnn-digits-refresh", "swin-maskrcnn-digits")
#: Tolerances for re-running on another CPU (BLAS differences can flip a borderline score or gate).
TOL = {"AP": 0.02, "keep": 0.01, "mac_saving": 0.01}


def present() -> list[str]:
    return [name for name in SHIPPED if (checkpoints_dir() / name / "metrics.json").is_file()]


@pytest.mark.parametrize("name", present())
def test_checkpoint_is_small_and_its_card_is_the_rendered_template(name: str) -> None:
    folder = checkpoints_dir() / name
    assert (folder / "model.safetensors").stat().st_size <= 25 * 2**20
    config = json.loads((folder / "config.json").read_text())
    metrics = json.loads((folder / "metrics.json").read_text())
    assert model_card(config, metrics, metrics.get("command", "")) == (folder / "README.md").read_text()


@pytest.mark.parametrize("name", present())
def test_ci_subset_reproduces_recorded_metrics(name: str) -> None:
    model = spa_viz.load(name)
    assert isinstance(model, SPAMaskRCNN)
    config = checkpoint_config(model)
    expected = json.loads((checkpoints_dir() / name / "metrics.json").read_text())["ci_subset"]
    data = config["data"]
    samples = digits_samples("test", int(expected["num"]), int(data["seed"]), int(data["canvas_size"]), cache=False)
    result = evaluate_mask_rcnn(model, InMemoryDetection(samples, None), timing_batch=0)
    for key in ("AP50", "AP", "mask_AP50", "mask_AP"):
        assert result[key] == pytest.approx(expected[key], abs=TOL["AP"]), key
    assert result["keep_ratio"]["mean"] == pytest.approx(expected["keep_ratio"]["mean"], abs=TOL["keep"])
    assert result["mac_saving"] == pytest.approx(expected["mac_saving"], abs=TOL["mac_saving"])
    for layer, stats in expected.get("layers", {}).items():
        assert result["layers"][layer]["keep_ratio"] == pytest.approx(stats["keep_ratio"], abs=TOL["keep"])


@pytest.mark.skipif("spt-maskrcnn-digits" not in present(), reason="the spt-maskrcnn-digits checkpoint is not here")
def test_cli_prints_box_and_mask_ap_selection_and_macs(capsys) -> None:
    result = main(["--checkpoint", "spt-maskrcnn-digits", "--num", "4", "--no-timing", "--no-cache"])
    printed = capsys.readouterr().out
    assert result["num_images"] == 4 and result["mask_AP50"] is not None
    for text in ("box AP50 / AP", "mask AP50 / AP", "layer 2 keep/P/R/IoU", "MAC saving"):
        assert text in printed, text
