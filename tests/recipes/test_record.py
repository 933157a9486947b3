"""The one writer of a checkpoint's metrics.json and model card: rendered from the folder's own
config.json, refused over an existing record unless asked, nothing written when the card fails."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from spa_viz.io.checkpoint import save_checkpoint
from spa_viz.io.files import OutputExistsError
from spa_viz.models.zoo import build_timm_spa_vit
from spa_viz.recipes.record import write_record

CONFIG = {
    "architecture": "timm_spa_vit",
    "timm_name": "vit_tiny_patch16_224",
    "timm_kwargs": {"img_size": 32, "patch_size": 8, "depth": 2, "num_classes": 3},
    "spa": {"start_layer": 1, "policy": "image", "threshold": 0.4},
}


def card(config: Mapping[str, Any], metrics: Mapping[str, Any]) -> str:
    return f"# {config['timm_name']} ({len(config['tensors'])} tensors): AP50 {metrics['ap50']}\n"


@pytest.fixture
def folder(tmp_path) -> Path:
    return save_checkpoint(build_timm_spa_vit(CONFIG), tmp_path / "ckpt", CONFIG)


def test_card_is_rendered_from_the_saved_config(folder) -> None:
    write_record(folder, {"ap50": 0.5}, card)
    tensors = len(json.loads((folder / "config.json").read_text())["tensors"])
    assert (folder / "README.md").read_text() == f"# vit_tiny_patch16_224 ({tensors} tensors): AP50 0.5\n"
    assert (folder / "metrics.json").read_text() == '{\n  "ap50": 0.5\n}\n'


def test_refuses_to_overwrite_unless_asked(folder) -> None:
    write_record(folder, {"ap50": 0.5}, card)
    with pytest.raises(OutputExistsError, match="metrics.json.*overwrite=True"):
        write_record(folder, {"ap50": 0.9}, card)
    assert json.loads((folder / "metrics.json").read_text()) == {"ap50": 0.5}
    write_record(folder, {"ap50": 0.9}, card, overwrite=True, indent=1)
    assert (folder / "metrics.json").read_text() == '{\n "ap50": 0.9\n}\n'
    assert (folder / "README.md").read_text().endswith("AP50 0.9\n")


def test_without_a_renderer_only_metrics_are_written(folder) -> None:
    write_record(folder, {"ap50": 0.5}, None)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "metrics.json", "model.safetensors"]


def test_nothing_is_written_when_the_card_fails(folder) -> None:
    write_record(folder, {"ap50": 0.5}, card)

    def broken(config: Mapping[str, Any], metrics: Mapping[str, Any]) -> str:
        return config["no such key"]

    with pytest.raises(KeyError):
        write_record(folder, {"ap50": 0.9}, broken, overwrite=True)
    assert json.loads((folder / "metrics.json").read_text()) == {"ap50": 0.5}
