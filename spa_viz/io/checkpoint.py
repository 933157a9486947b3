"""Checkpoints: ``model.safetensors`` + ``config.json`` (+ ``metrics.json``, model card), never pickle.

A checkpoint folder's ``config.json`` names an *architecture* (a builder registered here with
:func:`register_architecture`) and its arguments. :func:`build_architecture` is the one way to
build a model from such a config: loading builds through it, and so do the training recipes.
Loading then checks the tensors against the model: a missing, unexpected or wrongly shaped tensor
fails with its name. A checkpoint may be *partial* (``"partial": true``): it stores only the
trained tensors (e.g. the SPA gates) on top of a base model the builder provides (e.g. the
imported DINOv2 backbone).

:func:`save_checkpoint` writes the tensors and ``config.json``; what is measured about them,
``metrics.json`` and the model card, follows with :func:`spa_viz.recipes.record.write_record`.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from spa_viz.io.files import write_atomic, write_text_atomic

__all__ = [
    "FORMAT",
    "CheckpointError",
    "register_architecture",
    "architectures",
    "build_architecture",
    "save_checkpoint",
    "load_checkpoint",
    "read_config",
    "check_state_dict",
    "load_torch_weights",
    "checkpoint_config",
    "set_checkpoint_config",
]

FORMAT = "spa-viz/1"
_log = logging.getLogger(__name__)

#: ``builder(config, **parts) -> model``; ``parts`` are prebuilt pieces a caller hands in (e.g. a
#: small base model in tests) instead of the ones the config would load.
Builder = Callable[..., nn.Module]
_ARCHITECTURES: dict[str, Builder] = {}
_CONFIG_ATTRIBUTE = "spa_viz_config"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as it is; the message says what is wrong and what to do."""


def register_architecture(name: str) -> Callable[[Builder], Builder]:
    """Register ``builder(config) -> model`` under ``name`` for :func:`load_checkpoint`."""

    def wrap(builder: Builder) -> Builder:
        _ARCHITECTURES[name] = builder
        return builder

    return wrap


def architectures() -> list[str]:
    return sorted(_ARCHITECTURES)


def build_architecture(config: dict[str, Any], **parts: Any) -> nn.Module:
    """The model ``config`` describes, built by the builder registered for ``config["architecture"]``.

    ``parts`` go to the builder as keyword arguments. The config is not modified.
    """
    name = config.get("architecture")
    if name not in _ARCHITECTURES:
        raise CheckpointError(f"unknown architecture {name!r}; registered: {architectures()}")
    return _ARCHITECTURES[name](copy.deepcopy(config), **parts)


def save_checkpoint(
    model: nn.Module,
    directory: str | Path,
    config: dict[str, Any],
    *,
    tensors: dict[str, torch.Tensor] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``model.safetensors`` + ``config.json``; refuses to replace a checkpoint unless ``overwrite``.

    ``config`` must hold ``architecture`` (a registered name). ``tensors`` (default: the full
    state dict) lets partial checkpoints store only what was trained. Metrics and the model card
    follow with :func:`spa_viz.recipes.record.write_record`.
    """
    directory = Path(directory)
    if config.get("architecture") not in _ARCHITECTURES:
        raise CheckpointError(f"unknown architecture {config.get('architecture')!r}; registered: {architectures()}")
    if (directory / "model.safetensors").exists() and not overwrite:
        raise CheckpointError(f"{directory} already holds a checkpoint; pass overwrite=True to replace it")
    directory.mkdir(parents=True, exist_ok=True)
    state = tensors if tensors is not None else model.state_dict()
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    full = {"format": FORMAT, **config, "tensors": {k: list(v.shape) for k, v in sorted(state.items())}}
    write_atomic(directory / "model.safetensors", lambda p: save_file(state, str(p), metadata={"format": FORMAT}))
    write_text_atomic(directory / "config.json", json.dumps(full, indent=2) + "\n")
    return directory


def read_config(directory: str | Path) -> dict[str, Any]:
    """The parsed ``config.json`` of a checkpoint folder, with clear errors for bad folders."""
    directory = Path(directory)
    path = directory / "config.json"
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint folder {directory} does not exist")
    if not path.is_file():
        raise CheckpointError(f"{directory} has no config.json; a checkpoint is model.safetensors + config.json")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON ({err})") from err
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a spa-viz checkpoint config (expected format {FORMAT!r})")
    if config.get("architecture") not in _ARCHITECTURES:
        raise CheckpointError(
            f"{path} names unknown architecture {config.get('architecture')!r}; known: {architectures()}"
        )
    return config


def check_state_dict(
    expected: dict[str, torch.Tensor],
    found: dict[str, torch.Tensor],
    *,
    partial: bool = False,
    source: str = "checkpoint",
) -> None:
    """Raise :class:`CheckpointError` naming the first mismatched tensors between model and file."""
    unexpected = sorted(set(found) - set(expected))
    missing = [] if partial else sorted(set(expected) - set(found))
    wrong = [
        f"{k}: file {tuple(found[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(found) & set(expected))
        if tuple(found[k].shape) != tuple(expected[k].shape)
    ]
    problems = []
    if wrong:
        problems.append("shape mismatch: " + "; ".join(wrong[:5]))
    if missing:
        problems.append("missing tensors: " + ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else ""))
    if unexpected:
        problems.append("unexpected tensors: " + ", ".join(unexpected[:5]) + (" ..." if len(unexpected) > 5 else ""))
    if problems:
        raise CheckpointError(f"{source} does not match its config: " + " | ".join(problems))


def load_checkpoint(directory: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Build the model a checkpoint folder describes and load its tensors (eval mode)."""
    directory = Path(directory)
    config = read_config(directory)
    weights = directory / "model.safetensors"
    if not weights.is_file():
        raise CheckpointError(f"{directory} has no model.safetensors")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{weights} is not a readable safetensors file ({err})") from err
    listed = config.get("tensors")
    if listed is not None:
        in_file = {k: list(v.shape) for k, v in state.items()}
        if in_file != listed:
            names = sorted(k for k in set(in_file) | set(listed) if in_file.get(k) != listed.get(k))
            raise CheckpointError(f"{weights} does not match the tensor list in config.json: {names[:5]}")
    model = build_architecture(config)
    check_state_dict(model.state_dict(), state, partial=bool(config.get("partial")), source=str(weights))
    model.load_state_dict(state, strict=not config.get("partial"))
    set_checkpoint_config(model, config)
    return model.to(device).eval()


def checkpoint_config(model: nn.Module) -> dict[str, Any]:
    """A copy of the ``config.json`` ``model`` was loaded from (what ``spa_viz.load`` recorded);
    ``{}`` for a model built in code."""
    return dict(getattr(model, _CONFIG_ATTRIBUTE, None) or {})


def set_checkpoint_config(model: nn.Module, config: dict[str, Any]) -> None:
    """Record ``config`` as the description of ``model`` (read back with :func:`checkpoint_config`)."""
    setattr(model, _CONFIG_ATTRIBUTE, dict(config))


def load_torch_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file, or of a torch file that loads under ``weights_only=True``.

    Pickles that need arbitrary code are refused rather than unpickled.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as err:
            raise CheckpointError(f"{path} is not a readable safetensors file ({err})") from err
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError, ... for bad files
        raise CheckpointError(
            f"refusing to load {path}: it does not load under torch.load(weights_only=True) ({type(err).__name__}). "
            "Convert it to safetensors on a machine where you trust it."
        ) from err
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} does not hold a flat dict of tensors (a state dict)")
    return obj
