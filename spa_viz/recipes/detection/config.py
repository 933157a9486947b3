"""A detection training recipe as typed dataclasses, read strictly from the JSON files in ``configs/``.

The JSON keys are the dataclass fields (a misspelt key fails with the known ones); missing keys take
the defaults below. ``model`` is the checkpoint architecture config (``architecture``, ``backbone``,
``head``; Mask R-CNN also ``transform``) and is checked by the detector builders; ``data`` is :class:`~spa_viz.data.splits.DigitsData`
or :class:`~spa_viz.data.splits.CocoData`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from spa_viz.data.splits import DataConfig, DigitsData, data_config
from spa_viz.io.config import ConfigError, from_dict, read_json, to_dict
from spa_viz.selection.loss import DEFAULT_ALPHA

__all__ = ["AMP", "ARCHITECTURES", "EvalSettings", "Recipe", "TrainSettings", "TrainingError", "load_config"]

#: Mixed-precision modes of ``train.amp`` (CUDA only; the CPU always runs float32).
AMP = ("bf16", "fp16", "none")
#: The registered architectures a detection recipe may name (``model.architecture``): the ones its
#: training loop handles; the model is built through the registry (:func:`~spa_viz.io.checkpoint.build_architecture`).
ARCHITECTURES = ("spa_vit_detector", "spt_detector", "spt_mask_rcnn", "spa_vit_mask_rcnn")


class TrainingError(ValueError):
    """A config, output folder or resume state that cannot be used; the message says what to do."""


@dataclass(frozen=True)
class TrainSettings:
    """The optimisation: AdamW with warm-up + cosine decay, ``L = L_task + alpha * L_select``."""

    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    warmup_steps: int = 100
    alpha: float = DEFAULT_ALPHA  # weight of the selection loss (the paper's 0.01; see spa_viz.selection.loss)
    gate_lr_scale: float = 1.0  # learning-rate factor of the SPA gates (fresh gates on a trained backbone move fast)
    gate_input_grad: bool = True  # False [ablation]: gates score a detached block input (no gradient into the backbone)
    grad_clip: float = 1.0  # 0: off
    accumulate: int = 1  # batches whose gradients are summed per optimizer step
    amp: str = "bf16"
    minutes: float | None = None  # time budget; the run stops early (and evaluates) past it
    val_num: int = 300  # validation images after every epoch
    log_every: int = 25
    threads: int | None = None  # torch CPU threads (None: torch's choice)
    workers: int = 0  # DataLoader worker processes


@dataclass(frozen=True)
class EvalSettings:
    """The final evaluation: the fixed CI subset size and the CPU latency measurement."""

    ci_num: int = 32
    timing_batch: int = 32
    timing_repeats: int = 5


@dataclass(frozen=True)
class Recipe:
    """One training run: what to build, on which data, how to train and evaluate it."""

    name: str | None = None
    description: str = ""
    out: str | None = None  # output folder (default: checkpoints/<name>)
    seed: int = 0
    image_size: int = (
        96  # CenterNet: the letterbox size; Mask R-CNN: what the app letterboxes uploads to (the model resizes)
    )
    init_from: str | None = None  # checkpoint folder to start from (weights must match)
    init_backbone_from: str | None = None  # backbone weights: a checkpoint folder or a timm weights file
    model: dict[str, Any] | None = None
    data: DataConfig = field(default_factory=DigitsData)
    train: TrainSettings = field(default_factory=TrainSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)

    def to_dict(self) -> dict[str, Any]:
        """The recipe as JSON (what resume states record and the resume check compares)."""
        return to_dict(self)


#: Recipe fields that must match for ``--resume`` to continue a run.
RESUME_KEYS = ("model", "data", "image_size", "seed", "init_from", "init_backbone_from")


def load_config(path: str | Path, overrides: Mapping[str, Any] | None = None) -> Recipe:
    """The recipe in the JSON file ``path`` (with ``overrides``), validated; TrainingError says what is wrong."""
    path = Path(path)
    try:
        raw = read_json(path, overrides)
        if isinstance(raw.get("data"), Mapping):
            raw["data"] = data_config(raw["data"], where=f"{path}: data")
        recipe = from_dict(Recipe, raw, where=str(path))
    except ConfigError as err:
        raise TrainingError(str(err)) from err
    if not recipe.model or recipe.model.get("architecture") not in ARCHITECTURES:
        raise TrainingError(f"{path}: model.architecture must be one of {list(ARCHITECTURES)}")
    if recipe.train.accumulate < 1:
        raise TrainingError(f"{path}: train.accumulate must be >= 1, got {recipe.train.accumulate}")
    if recipe.train.amp not in AMP:
        raise TrainingError(f"{path}: train.amp must be one of {list(AMP)}, got {recipe.train.amp!r}")
    return recipe if recipe.name else replace(recipe, name=path.stem)
