import json
import pickle

import pytest
import torch

import spa_viz
from spa_viz.io.checkpoint import (
    CheckpointError,
    build_architecture,
    load_checkpoint,
    load_torch_weights,
    save_checkpoint,
)
from spa_viz.models.zoo import build_timm_spa_vit

CONFIG = {
    "architecture": "timm_spa_vit",
    "timm_name": "vit_tiny_patch16_224",
    "timm_kwargs": {"img_size": 32, "patch_size": 8, "depth": 2, "num_classes": 3},
    "spa": {"start_layer": 1, "policy": "image", "threshold": 0.4},
}


@pytest.fixture
def saved(tmp_path):
    model = build_timm_spa_vit(CONFIG)
    return model, save_checkpoint(model, tmp_path / "ckpt", CONFIG)


def test_roundtrip_is_bit_exact(saved) -> None:
    model, folder = saved
    loaded = load_checkpoint(folder)
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    assert spa_viz.spa_context(loaded).config.threshold == 0.4
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.eval()(images), loaded(images))
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]


def test_refuses_to_overwrite(saved) -> None:
    model, folder = saved
    with pytest.raises(CheckpointError, match="overwrite=True"):
        save_checkpoint(model, folder, CONFIG)


def test_build_architecture_builds_the_registered_model_and_names_unknown_ones() -> None:
    model = build_architecture(CONFIG)
    assert [b.spa_layer for b in spa_viz.spa_blocks(model)] == [1]
    with pytest.raises(CheckpointError, match="unknown architecture 'nope'; registered: .*timm_spa_vit"):
        build_architecture({"architecture": "nope"})


def test_config_that_does_not_match_the_tensors_names_the_tensor(saved) -> None:
    _, folder = saved
    config = json.loads((folder / "config.json").read_text())
    config["timm_kwargs"]["embed_dim"] = 96
    config.pop("tensors")
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        CheckpointError, match=r"shape mismatch: blocks.0.attn.proj.bias: file \(192,\) vs model \(96,\)"
    ):
        load_checkpoint(folder)


def test_tensor_list_guards_against_swapped_weights(saved, tmp_path) -> None:
    _, folder = saved
    config = json.loads((folder / "config.json").read_text())
    config["tensors"]["head.weight"] = [7, 7]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="head.weight"):
        load_checkpoint(folder)


@pytest.mark.parametrize("content", [b"", b"not a safetensors file at all"])
def test_corrupt_weights_give_a_clear_error(saved, content) -> None:
    _, folder = saved
    (folder / "model.safetensors").write_bytes(content)
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_checkpoint(folder)


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda f: (f / "config.json").unlink(), "no config.json"),
        (lambda f: (f / "config.json").write_text("{oops"), "not valid JSON"),
        (
            lambda f: (f / "config.json").write_text('{"format": "spa-viz/1", "architecture": "nope"}'),
            "unknown architecture",
        ),
    ],
)
def test_bad_config_gives_a_clear_error(saved, setup, message) -> None:
    _, folder = saved
    setup(folder)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(folder)


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickles_are_refused_unless_weights_only(tmp_path) -> None:
    good = tmp_path / "good.pt"
    torch.save({"state_dict": {"w": torch.ones(2)}}, good)
    assert torch.equal(load_torch_weights(good)["w"], torch.ones(2))
    evil = tmp_path / "evil.pt"
    with evil.open("wb") as f:
        pickle.dump({"w": _Evil()}, f)
    with pytest.raises(CheckpointError, match="weights_only=True"):
        load_torch_weights(evil)


def test_load_by_name_folder_and_timm_name(saved, monkeypatch, tmp_path) -> None:
    _, folder = saved
    monkeypatch.setenv("SPA_VIZ_CHECKPOINTS", str(folder.parent))
    monkeypatch.setattr("spa_viz.io.paths.BUILTIN_CHECKPOINT_DIRS", ())  # the search path: only that folder
    assert spa_viz.available() == ["ckpt"]
    assert spa_viz.is_spa_model(spa_viz.load("ckpt"))
    assert spa_viz.is_spa_model(spa_viz.load(folder))
    timm_model = spa_viz.load("vit_tiny_patch16_224", start_layer=5, threshold=0.3)
    assert [b.spa_layer for b in spa_viz.spa_blocks(timm_model)][0] == 5
    with pytest.raises(CheckpointError, match="neither a checkpoint nor a timm model"):
        spa_viz.load("no_such_model")


def test_timm_name_with_weights_file_checks_every_tensor(tmp_path) -> None:
    import timm

    weights = tmp_path / "w.safetensors"
    from safetensors.torch import save_file

    state = timm.create_model("vit_tiny_patch16_224", num_classes=10).state_dict()
    save_file(state, str(weights))
    with pytest.raises(CheckpointError, match="head.weight"):
        spa_viz.load("vit_tiny_patch16_224", weights=weights)
    with pytest.raises(CheckpointError, match="pass the timm model name too"):
        spa_viz.load(weights)
