"""Resume state of a training run: weights, optimizer tensors and RNG in safetensors, the rest in JSON.

A run writes its state to ``OUT/last`` after every epoch (next to the loadable checkpoint in ``OUT``);
``--resume`` continues from it exactly, provided the recipe keys that shape the model and the data
did not change. No pickle: optimizer tensors are flattened to ``state.<param id>.<name>`` entries.
"""

from __future__ import annotations

import json
import shutil
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from spa_viz.io.checkpoint import check_state_dict
from spa_viz.io.files import OutputExistsError, refuse_overwrite, write_atomic, write_text_atomic

__all__ = ["RESUME_FOLDER", "ResumeError", "load_resume_state", "prepare_output", "save_resume_state"]

#: The resume state's folder inside a run's output folder.
RESUME_FOLDER = "last"


class ResumeError(ValueError):
    """An output folder or resume state that cannot be used; the message says what to do instead."""


def prepare_output(out: Path, *, resume: bool, overwrite: bool) -> None:
    """Check ``out`` against ``--resume`` / ``--overwrite`` (its resume state is ``out/last``).

    Without ``--resume`` an existing checkpoint or resume state is refused unless ``--overwrite``,
    and an old resume state is cleared so the new run cannot pick it up.
    """
    last = out / RESUME_FOLDER
    if resume and not (last / "state.json").is_file():
        raise ResumeError(f"--resume: {last} holds no resume state; start without --resume")
    if not resume and not overwrite:
        try:
            refuse_overwrite([out / "model.safetensors", last], where=out)
        except OutputExistsError as err:
            raise ResumeError(f"{err} (or --resume to continue)") from err
    if not resume:
        shutil.rmtree(last, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)


def save_resume_state(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """``folder/{model,optimizer}.safetensors`` + ``state.json``: everything to continue training.

    ``state`` is the run's JSON state (epoch, step, history, its recipe under ``"config"``).
    """
    folder.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    opt = optimizer.state_dict()
    tensors = {
        f"state.{pid}.{name}": t.detach().contiguous().cpu()
        for pid, entry in opt["state"].items()
        for name, t in entry.items()
    }
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    write_atomic(folder / "model.safetensors", lambda p: save_file(weights, str(p)))
    write_atomic(folder / "optimizer.safetensors", lambda p: save_file(tensors, str(p)))
    full = {**state, "param_groups": opt["param_groups"]}
    write_text_atomic(folder / "state.json", json.dumps(full, indent=1) + "\n")


def load_resume_state(
    folder: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    config: Mapping[str, Any],
    keys: Sequence[str],
) -> dict[str, Any]:
    """Restore model, optimizer and RNG from :func:`save_resume_state`; return the JSON state.

    ``config`` is the recipe of the run now; its ``keys`` must equal those the state was saved with.
    """
    try:
        state = json.loads((folder / "state.json").read_text())
        weights = load_file(str(folder / "model.safetensors"))
        tensors = load_file(str(folder / "optimizer.safetensors"))
    except (OSError, json.JSONDecodeError, SafetensorError, ValueError) as err:
        raise ResumeError(
            f"cannot resume from {folder}: the state is missing or corrupt ({err}); start again with --overwrite"
        ) from err
    saved = state.get("config", {})
    changed = [k for k in keys if saved.get(k) != config[k]]
    if changed:
        raise ResumeError(
            f"cannot resume from {folder}: the config changed in {changed}; "
            "use the config it was started with, or start again with --overwrite"
        )
    check_state_dict(model.state_dict(), weights, source=str(folder / "model.safetensors"))
    model.load_state_dict(weights)
    per_param: dict[int, dict[str, Tensor]] = defaultdict(dict)
    for key, tensor in tensors.items():
        if key.startswith("state."):
            _, pid, name = key.split(".", 2)
            per_param[int(pid)][name] = tensor
    try:
        optimizer.load_state_dict({"state": dict(per_param), "param_groups": state["param_groups"]})
    except (KeyError, ValueError) as err:
        raise ResumeError(f"cannot resume from {folder}: optimizer state does not fit ({err})") from err
    torch.set_rng_state(tensors["rng.cpu"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    return state
