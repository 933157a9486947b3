"""Mask R-CNN through the training and evaluation CLIs on tiny models: a two-step run from a COCO-format
folder (RLE and polygon masks), the evaluation CLI reproducing the recorded metrics, gradient
accumulation, backbone initialisation, torchrun with two gloo ranks, and clear errors for bad data."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from timm.models.swin_transformer import SwinTransformer

from spa_viz.analysis.trace import find_backbone
from spa_viz.data.digits import DigitsConfig, write_split
from spa_viz.io.checkpoint import load_checkpoint
from spa_viz.models.detection import SPAMaskRCNN
from spa_viz.recipes.detection.config import load_config
from spa_viz.recipes.detection.evaluate import main as evaluate_main
from spa_viz.recipes.detection.train import build_model, main

BODY = {
    "img_size": 64,
    "embed_dim": 16,
    "depths": [1, 1, 1, 1],
    "num_heads": [1, 2, 2, 4],
    "spa": {"policy": "container", "container_len": 16},
}
TINY = {
    "name": "tiny-mask",
    "image_size": 48,
    "model": {
        "architecture": "spt_mask_rcnn",
        "backbone": {"timm_name": "spt_digits", "timm_kwargs": BODY},
        "head": {
            "num_classes": 10,
            "fpn_channels": 16,
            "anchor_sizes": [8, 16, 32, 64, 128],
            "rpn_pre_nms_top_n_train": 200,
            "rpn_post_nms_top_n_train": 100,
            "rpn_pre_nms_top_n_test": 100,
            "rpn_post_nms_top_n_test": 50,
            "rpn_batch_size_per_image": 64,
            "box_representation": 32,
            "box_batch_size_per_image": 32,
            "box_detections_per_img": 20,
            "mask_layers": [16],
            "mask_predictor_channels": 16,
        },
        "transform": {"min_size": [64], "max_size": 64},
    },
    "data": {"kind": "digits", "seed": 0, "canvas_size": 48, "train": 16, "val": 4, "test": 4, "cache": False},
    "train": {"epochs": 1, "batch_size": 8, "lr": 1e-3, "warmup_steps": 1, "alpha": 1.0, "val_num": 4},
    "eval": {"ci_num": 2, "timing_batch": 2, "timing_repeats": 1},
}


def write_config(folder: Path, name: str = "tiny.json", **changes) -> Path:
    config = json.loads(json.dumps(TINY))
    for key, value in changes.items():
        section, _, field = key.rpartition(".")
        (config[section] if section else config)[field] = value
    path = folder / name
    path.write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def coco_folder(tmp_path_factory) -> dict:
    """A COCO-format digits folder; the train split's first images carry polygon masks instead of RLE."""
    root = tmp_path_factory.mktemp("coco")
    digits = DigitsConfig.for_canvas(48)
    files = {}
    for split, count in (("train", 16), ("val", 4), ("test", 4)):
        annotations = write_split(root, split, count, seed=1, config=digits)
        files[split] = {"annotations": str(annotations), "images": str(root / split / "images")}
    train = json.loads(Path(files["train"]["annotations"]).read_text())
    for ann in train["annotations"][:6]:
        x, y, w, h = ann["bbox"]
        ann["segmentation"] = [[x, y, x + w, y, x + w, y + h, x, y + h]]
    Path(files["train"]["annotations"]).write_text(json.dumps(train))
    return files


@pytest.fixture(scope="module")
def trained(coco_folder, tmp_path_factory) -> tuple[Path, dict]:
    folder = tmp_path_factory.mktemp("run")
    config = write_config(folder, data={"kind": "coco", **coco_folder})
    metrics = main(["--config", str(config), "--out", str(folder / "out")])
    return folder / "out", metrics


def test_two_steps_from_a_coco_folder(trained) -> None:
    out, metrics = trained
    assert metrics["status"] == "complete" and metrics["history"][0]["steps"] == 2
    history = metrics["history"][0]
    for key in ("loss_task", "loss_select", "loss_mask", "loss_classifier", "val_AP50", "val_mask_AP50"):
        assert history[key] is not None, key
    test = metrics["test"]
    assert test["num_images"] == 4 and test["mask_AP"] is not None and set(test["layers"]) == {"2", "3"}
    assert test["backbone_gmacs_dense"] > 0 and "spa_ms_per_image" in test["latency"]
    model = load_checkpoint(out)
    assert isinstance(model, SPAMaskRCNN)
    card = (out / "README.md").read_text()
    assert "| box AP50 | box AP | mask AP50 | mask AP |" in card and "Cascade" in card


def test_evaluation_cli_reproduces_the_recorded_metrics(trained, capsys) -> None:
    out, metrics = trained
    result = evaluate_main(["--checkpoint", str(out), "--no-timing"])
    printed = capsys.readouterr().out
    assert "mask AP50 / AP" in printed and "layer 2 keep/P/R/IoU" in printed and "MAC saving" in printed
    recorded = metrics["test"]
    for key in ("AP", "AP50", "mask_AP", "mask_AP50", "mac_saving", "keep_ratio", "layers", "backbone_gmacs_run"):
        assert result[key] == recorded[key], key


def test_gradient_accumulation_steps_once_per_group(tmp_path) -> None:
    config = write_config(tmp_path, **{"train.batch_size": 4, "train.accumulate": 2})
    metrics = main(["--config", str(config), "--out", str(tmp_path / "out")])
    assert metrics["history"][0]["steps"] == 16 // (4 * 2)
    state = json.loads((tmp_path / "out" / "last" / "state.json").read_text())
    assert state["config"]["train"]["accumulate"] == 2
    steps = load_file(str(tmp_path / "out" / "last" / "optimizer.safetensors"))
    assert {float(v) for k, v in steps.items() if k.endswith(".step")} == {2.0}


def test_backbone_initialisation_from_a_checkpoint_and_from_swin_weights(trained, tmp_path) -> None:
    source, _ = trained
    config = write_config(tmp_path, init_backbone_from=str(source))
    model = build_model(load_config(config))
    expected = find_backbone(load_checkpoint(source)).state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in find_backbone(model).state_dict().items())

    torch.manual_seed(3)
    swin = SwinTransformer(img_size=64, embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4), window_size=4)
    weights = tmp_path / "swin.safetensors"
    save_file({k: v.contiguous() for k, v in swin.state_dict().items()}, str(weights))
    model = build_model(load_config(write_config(tmp_path, "swin.json", init_backbone_from=str(weights))))
    body = find_backbone(model)
    assert torch.equal(body.layers[2].blocks[0].attn.qkv.weight, swin.layers[2].blocks[0].attn.qkv.weight)
    assert torch.equal(body.patch_embed.proj.weight, swin.patch_embed.proj.weight)


def test_boxes_only_data_fall_back_with_a_warning(coco_folder, tmp_path, caplog) -> None:
    files = json.loads(json.dumps(coco_folder))
    for split in ("train", "val", "test"):
        coco = json.loads(Path(files[split]["annotations"]).read_text())
        for ann in coco["annotations"]:
            ann.pop("segmentation")
        path = tmp_path / f"{split}.json"
        path.write_text(json.dumps(coco))
        files[split]["annotations"] = str(path)
    config = write_config(tmp_path, data={"kind": "coco", **files})
    with caplog.at_level(logging.WARNING):
        metrics = main(["--config", str(config), "--out", str(tmp_path / "out")])
    assert "no instance masks" in caplog.text
    assert "loss_mask" not in metrics["history"][0] and metrics["history"][0]["loss_select"] is not None
    assert metrics["test"]["mask_AP"] is None and metrics["test"]["AP50"] is not None


def test_bad_data_fails_clearly(coco_folder, tmp_path, capsys) -> None:
    wrong = write_config(tmp_path, "wrong.json", data={"kind": "coco", **coco_folder})
    raw = json.loads(wrong.read_text())
    raw["model"]["head"]["num_classes"] = 7
    wrong.write_text(json.dumps(raw))
    with pytest.raises(SystemExit):
        main(["--config", str(wrong), "--out", str(tmp_path / "a")])
    assert "have 10 categories" in capsys.readouterr().err

    files = json.loads(json.dumps(coco_folder))
    coco = json.loads(Path(files["train"]["annotations"]).read_text())
    coco["images"][0]["file_name"] = "nowhere.png"
    (tmp_path / "missing.json").write_text(json.dumps(coco))
    files["train"]["annotations"] = str(tmp_path / "missing.json")
    config = write_config(tmp_path, "missing_cfg.json", data={"kind": "coco", **files})
    with pytest.raises(SystemExit):
        main(["--config", str(config), "--out", str(tmp_path / "b")])
    err = capsys.readouterr().err
    assert "are missing" in err and "nowhere.png" in err


def test_torchrun_two_gloo_ranks(tmp_path) -> None:
    """The multi-GPU path on the CPU: torchrun with 2 ranks (gloo); each rank takes its half of the batches."""
    config = write_config(tmp_path, **{"train.batch_size": 4})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
        + ["-m", "spa_viz.cli", "train", "detection", "--config", str(config), "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "world 2" in result.stderr
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["status"] == "complete" and metrics["history"][0]["steps"] == 16 // (4 * 2)
    assert isinstance(load_checkpoint(tmp_path / "out"), SPAMaskRCNN)


def test_coco_configs_build_the_papers_models() -> None:
    """The paper-reproduction configs: SPT-T with stage 3 deepened by 4 blocks and SPA in stages 3-4,
    its Swin-T baseline dense; the one-GPU command's --set override reaches the recipe."""
    from dataclasses import replace

    root = Path(__file__).resolve().parents[2] / "configs" / "coco"
    spt = load_config(root / "spt-tiny-mask-rcnn.json", {"train.accumulate": 8})
    swin = load_config(root / "swin-tiny-mask-rcnn.json")
    assert spt.train.accumulate == 8 and spt.train.batch_size * 8 == 16 and spt.data.hflip == 0.5
    for config, depth, enabled in ((spt, 10, True), (swin, 6, False)):
        assert config.init_backbone_from.endswith("swin_tiny_patch4_window7_224.safetensors")
        model = build_model(replace(config, init_backbone_from=None))
        body = find_backbone(model)
        assert len(body.layers[2].blocks) == depth and body.spa_context.config.enabled is enabled
        assert model.num_classes == 80 and model.transform.max_size == 1333


def test_set_overrides_any_recipe_key(tmp_path) -> None:
    from spa_viz.recipes.detection.train import _parse_sets

    assert _parse_sets(["train.accumulate=8", "data.hflip=0.5", "name=run-a"]) == {
        "train.accumulate": 8,
        "data.hflip": 0.5,
        "name": "run-a",
    }
    with pytest.raises(SystemExit):
        main(["--config", str(write_config(tmp_path)), "--set", "train.accumulate"])


def test_spa_vit_through_the_simple_pyramid_trains(tmp_path) -> None:
    vit = {
        "timm_name": "spa_vit_digits",
        "timm_kwargs": {"img_size": 64, "embed_dim": 32, "depth": 2, "num_heads": 2, "dynamic_img_size": True},
        "spa": {"start_layer": 1},
    }
    config = write_config(tmp_path, model={**TINY["model"], "architecture": "spa_vit_mask_rcnn", "backbone": vit})
    metrics = main(["--config", str(config), "--out", str(tmp_path / "out")])
    assert metrics["history"][0]["loss_select"] is not None and set(metrics["test"]["layers"]) == {"1"}
    assert isinstance(load_checkpoint(tmp_path / "out"), SPAMaskRCNN)
