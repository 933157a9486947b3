"""The training CLI on a tiny config: losses go down, checkpoints load bit-exactly, resume is exact,
and bad folders, states and configs fail with clear errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from spa_viz.io.checkpoint import CheckpointError, load_checkpoint
from spa_viz.recipes.detection.config import TrainingError, load_config
from spa_viz.recipes.detection.train import main

TINY = {
    "name": "tiny",
    "image_size": 32,
    "model": {
        "architecture": "spa_vit_detector",
        "backbone": {
            "timm_name": "spa_vit_digits",
            "timm_kwargs": {"img_size": 32, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2},
            "spa": {"start_layer": 1},
        },
        "head": {"num_classes": 10, "hidden": 16},
    },
    "data": {"kind": "digits", "seed": 0, "canvas_size": 48, "train": 96, "val": 16, "test": 16, "cache": False},
    "train": {
        "epochs": 3,
        "batch_size": 16,
        "lr": 3e-3,
        "warmup_steps": 2,
        "alpha": 1.0,
        "gate_lr_scale": 10.0,
        "val_num": 16,
    },
    "eval": {"ci_num": 8, "timing_batch": 4, "timing_repeats": 1},
}


def write_config(folder: Path, **changes) -> Path:
    config = json.loads(json.dumps(TINY))
    for key, value in changes.items():
        section, _, name = key.rpartition(".")
        (config[section] if section else config)[name] = value
    path = folder / "tiny.json"
    path.write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path, dict]:
    folder = tmp_path_factory.mktemp("train")
    config = write_config(folder)
    metrics = main(["--config", str(config), "--out", str(folder / "out")])
    return config, folder / "out", metrics


def test_smoke_run_lowers_both_losses_and_writes_a_checkpoint(trained) -> None:
    _, out, metrics = trained
    history = metrics["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert history[-1]["loss_task"] < history[0]["loss_task"]
    assert history[-1]["loss_select"] < history[0]["loss_select"]
    assert set(history[0]["keep_ratio_train"]) == {"1"}
    for name in ("model.safetensors", "config.json", "metrics.json", "README.md", "last/state.json"):
        assert (out / name).is_file(), name
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["status"] == "complete" and "AP50" in saved["test"] and saved["ci_subset"]["num"] == 8
    assert "spa-viz train detection --config" in (out / "README.md").read_text()


def test_checkpoint_loads_back_bit_exactly(trained) -> None:
    _, out, _ = trained
    model = load_checkpoint(out)
    weights = load_file(str(out / "last" / "model.safetensors"))
    state = model.state_dict()
    assert set(state) == set(weights)
    assert all(torch.equal(state[k], weights[k]) for k in weights)


def test_resume_continues_exactly(tmp_path) -> None:
    constant_lr = {"train.min_lr": 3e-3, "train.warmup_steps": 0, "train.epochs": 2}
    straight = write_config(tmp_path, **constant_lr)
    main(["--config", str(straight), "--out", str(tmp_path / "a")])
    main(["--config", str(straight), "--out", str(tmp_path / "b"), "--epochs", "1"])
    metrics = main(["--config", str(straight), "--out", str(tmp_path / "b"), "--resume"])
    assert [h["epoch"] for h in metrics["history"]] == [1, 2]
    a = load_file(str(tmp_path / "a" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_refuses_to_overwrite(trained, capsys) -> None:
    config, out, _ = trained
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", str(config), "--out", str(out)])
    assert exit_info.value.code == 2
    assert "--overwrite" in capsys.readouterr().err


def test_corrupt_or_mismatched_checkpoint_fails_clearly(trained, tmp_path) -> None:
    _, out, _ = trained
    corrupt = shutil.copytree(out, tmp_path / "corrupt")
    (corrupt / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_checkpoint(corrupt)

    mismatched = shutil.copytree(out, tmp_path / "mismatched")
    config = json.loads((mismatched / "config.json").read_text())
    config["head"]["num_classes"] = 7
    (mismatched / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="shape mismatch"):
        load_checkpoint(mismatched)


def test_bad_resume_state_or_config_fails_clearly(trained, tmp_path, capsys) -> None:
    config, out, _ = trained
    broken = shutil.copytree(out, tmp_path / "broken")
    (broken / "last" / "state.json").write_text("{ not json")
    with pytest.raises(SystemExit):
        main(["--config", str(config), "--out", str(broken), "--resume"])
    assert "missing or corrupt" in capsys.readouterr().err

    changed = write_config(tmp_path, **{"model": {**TINY["model"], "head": {"num_classes": 10, "hidden": 8}}})
    with pytest.raises(SystemExit):
        main(["--config", str(changed), "--out", str(shutil.copytree(out, tmp_path / "changed")), "--resume"])
    assert "config changed" in capsys.readouterr().err

    with pytest.raises(SystemExit):
        main(["--config", str(config), "--out", str(tmp_path / "fresh"), "--resume"])
    assert "no resume state" in capsys.readouterr().err

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**TINY, "learning_rate": 1}))
    with pytest.raises(TrainingError, match="unknown keys"):
        load_config(bad)
    bad.write_text(json.dumps({**TINY, "train": {"lr": 1, "epocs": 2}}))
    with pytest.raises(TrainingError, match="epocs"):
        load_config(bad)


def test_trains_on_coco_format_files(tmp_path) -> None:
    """The path users take with their own data: COCO JSON + image folders, streamed from disk."""
    from spa_viz.data.digits import DigitsConfig, write_split

    digits = DigitsConfig.for_canvas(48)
    files = {
        split: {
            "annotations": str(write_split(tmp_path / "coco", split, count, seed=1, config=digits)),
            "images": str(tmp_path / "coco" / split / "images"),
        }
        for split, count in (("train", 32), ("val", 8), ("test", 8))
    }
    config = write_config(tmp_path, data={"kind": "coco", "hflip": 0.5, **files}, **{"train.epochs": 1})
    metrics = main(["--config", str(config), "--out", str(tmp_path / "out")])
    assert metrics["status"] == "complete" and metrics["test"]["num_images"] == 8
    assert set(metrics["history"][0]["keep_ratio_train"]) == {"1"}
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["class_names"] == [str(d) for d in range(10)] and saved["data"]["kind"] == "coco"
    load_checkpoint(tmp_path / "out")


def test_example_coco_config_is_valid() -> None:
    config = load_config(Path(__file__).resolve().parents[2] / "configs" / "examples" / "spa-vit-coco.json")
    assert config.data.kind == "coco" and config.train.workers == 8 and config.data.train.images == "data/my_coco/train"


def test_torchrun_ddp_two_processes(tmp_path) -> None:
    """Multi-GPU path on CPU: torchrun with 2 ranks (gloo) trains and rank 0 writes one checkpoint."""
    import os
    import subprocess
    import sys

    config = write_config(tmp_path, **{"train.epochs": 1, "train.batch_size": 8})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "spa_viz.cli",
            "train",
            "detection",
            "--config",
            str(config),
            "--out",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "world 2" in result.stderr
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["status"] == "complete"
    assert metrics["history"][0]["steps"] == 96 // (8 * 2)  # each rank takes its own half of the batches
    load_checkpoint(tmp_path / "out")
