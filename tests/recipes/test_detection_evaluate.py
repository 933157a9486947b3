"""Detection evaluation: FLOPs with a conv stem, and every shipped checkpoint reproduces the metrics its
metrics.json records for a fixed subset of the test split ("ci_subset")."""

from __future__ import annotations

import json
from functools import cache

import pytest
import torch

import spa_viz
from spa_viz.data.coco import InMemoryDetection
from spa_viz.data.splits import Sample, digits_samples
from spa_viz.io.checkpoint import checkpoint_config
from spa_viz.models.detection import Detector, build_spa_vit_detector
from spa_viz.models.twin import dense_twin
from spa_viz.models.zoo import checkpoints_dir
from spa_viz.recipes.detection.evaluate import dense_gmacs, evaluate, main
from tests.recipes.shipped import DIGIT_DETECTORS
from tests.recipes.shipped import present as shipped_present

SHIPPED = DIGIT_DETECTORS
#: Tolerances for re-running on another CPU (BLAS differences can flip a borderline score or gate).
TOL = {"AP50": 0.02, "AP": 0.02, "keep": 0.01, "mac_saving": 0.01}


def present() -> list[str]:
    return shipped_present(SHIPPED)


@cache
def test_samples(seed: int, canvas: int, num: int) -> tuple[Sample, ...]:
    return tuple(digits_samples("test", num, seed, canvas, cache=False))


test_samples.__test__ = False  # a helper, not a test


def test_dense_macs_count_the_conv_stem_like_torch() -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    backbone = {
        "timm_name": "spa_vit_digits",
        "stem": [8, 16],
        "spa": {"start_layer": 1},
        "timm_kwargs": {"img_size": 32, "patch_size": 4, "embed_dim": 16, "depth": 2, "num_heads": 2},
    }
    model = build_spa_vit_detector(
        {"architecture": "spa_vit_detector", "backbone": backbone, "head": {"num_classes": 3}}
    ).eval()
    with dense_twin(model), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model.backbone.forward_features(torch.zeros(1, 3, 32, 32))
    assert 2 * dense_gmacs(model, 32) * 1e9 == pytest.approx(counter.get_total_flops(), rel=1e-9)


def test_the_shipped_checkpoints_are_there_and_small() -> None:
    names = present()
    assert {"dense-vit-digits", "spa-vit-digits", "spa-vit-digits-noselect"} <= set(names)
    for name in names:
        assert (checkpoints_dir() / name / "model.safetensors").stat().st_size < 20 * 2**20
        assert "spa-viz train detection --config configs/" in (checkpoints_dir() / name / "README.md").read_text()


@pytest.mark.parametrize("name", present())
def test_ci_subset_reproduces_recorded_metrics(name: str) -> None:
    model = spa_viz.load(name)
    assert isinstance(model, Detector)
    config = checkpoint_config(model)
    expected = json.loads((checkpoints_dir() / name / "metrics.json").read_text())["ci_subset"]
    data = config["data"]
    samples = test_samples(int(data["seed"]), int(data["canvas_size"]), int(expected["num"]))
    dataset = InMemoryDetection(list(samples), int(config["image_size"]))
    result = evaluate(model, dataset, int(config["image_size"]), timing_batch=0)
    assert result["AP50"] == pytest.approx(expected["AP50"], abs=TOL["AP50"])
    assert result["AP"] == pytest.approx(expected["AP"], abs=TOL["AP"])
    assert result["keep_ratio"]["mean"] == pytest.approx(expected["keep_ratio"]["mean"], abs=TOL["keep"])
    assert result["mac_saving"] == pytest.approx(expected["mac_saving"], abs=TOL["mac_saving"])
    for layer, stats in expected.get("layers", {}).items():
        assert result["layers"][layer]["keep_ratio"] == pytest.approx(stats["keep_ratio"], abs=TOL["keep"])


@pytest.mark.skipif(not present(), reason="no shipped checkpoint")
def test_cli_prints_a_table(capsys) -> None:
    result = main(["--checkpoint", present()[0], "--num", "4", "--no-timing", "--no-cache"])
    assert result["num_images"] == 4
    assert "AP50" in capsys.readouterr().out
