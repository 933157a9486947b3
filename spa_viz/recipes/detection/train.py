"""Train an SPA detector from a JSON config: ``python -m spa_viz.train --config configs/NAME.json``.

Loss: ``L = L_task + alpha * L_select`` (CenterNet loss + the BCE of every SPA block's fused score
against selection labels made from the masks, or boxes, at that block's token grid). The output
folder receives, after every epoch, a loadable checkpoint (``model.safetensors`` + ``config.json``
+ ``metrics.json`` with the learning curves + ``README.md`` model card) and a ``last/`` resume
state (weights, optimizer tensors and RNG state in safetensors, the rest in JSON; no pickle).
At the end the model is evaluated on the test split (``spa_viz.evaluate``).

Runs on the CPU by default; on CUDA with bf16 autocast; on several GPUs with
``torchrun --nproc_per_node N -m spa_viz.train --config ...`` (DDP, enabled by torchrun's env vars).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import shlex
import shutil
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from spa_viz.checkpoint import CheckpointError, check_state_dict, load_checkpoint, save_checkpoint, write_atomic
from spa_viz.data.coco import collate
from spa_viz.evaluate import class_names, evaluate, load_split
from spa_viz.layers.block import find_context
from spa_viz.models.detector import Detector, build_spa_vit_detector, build_spt_detector, keep_ratios
from spa_viz.selection.loss import model_selection_loss

__all__ = ["DEFAULTS", "BUILDERS", "TrainingError", "load_config", "build_model", "train", "main"]

log = logging.getLogger(__name__)

BUILDERS: dict[str, Callable[[dict[str, Any]], Detector]] = {
    "spa_vit_detector": build_spa_vit_detector,
    "spt_detector": build_spt_detector,
}

DEFAULTS: dict[str, Any] = {
    "name": None,
    "description": "",
    "out": None,
    "seed": 0,
    "image_size": 96,
    "init_from": None,
    "model": None,
    "data": {"kind": "digits", "seed": 0, "canvas_size": 128, "train": 4000, "val": 300, "test": 500,
             "cache": True, "hflip": 0.0},
    "train": {"epochs": 10, "batch_size": 32, "lr": 1e-3, "min_lr": 1e-5, "weight_decay": 0.05,
              "warmup_steps": 100, "alpha": 0.01, "gate_lr_scale": 1.0, "grad_clip": 1.0, "amp": "bf16", "minutes": None,
              "val_num": 300, "log_every": 25, "threads": None, "workers": 0},
    "eval": {"ci_num": 32, "timing_batch": 32, "timing_repeats": 5},
}
_SECTIONS = ("data", "train", "eval")
_RESUME_KEYS = ("model", "data", "image_size", "seed", "init_from")  # must match to resume


class TrainingError(ValueError):
    """A config, output folder or resume state that cannot be used; the message says what to do."""


# ----------------------------------------------------------------------------------------- config
def load_config(path: str | Path, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The config file merged over :data:`DEFAULTS` (one level deep), validated."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise TrainingError(f"cannot read config {path}: {err}") from err
    if not isinstance(raw, dict):
        raise TrainingError(f"{path} must hold a JSON object")
    unknown = sorted(set(raw) - set(DEFAULTS))
    if unknown:
        raise TrainingError(f"{path}: unknown keys {unknown}; known: {sorted(DEFAULTS)}")
    config = copy.deepcopy(DEFAULTS)
    for key, value in raw.items():
        if key in _SECTIONS:
            if key == "data" and value.get("kind", "digits") != "digits":
                config["data"] = {"hflip": 0.0}
            extra = sorted(set(value) - set(config[key])) if key != "data" else []
            if extra:
                raise TrainingError(f"{path}: unknown {key} settings {extra}; known: {sorted(config[key])}")
            config[key].update(value)
        else:
            config[key] = value
    for key, value in (overrides or {}).items():
        section, _, name = key.rpartition(".")
        (config[section] if section else config)[name] = value
    if not config["model"] or config["model"].get("architecture") not in BUILDERS:
        raise TrainingError(f"{path}: model.architecture must be one of {sorted(BUILDERS)}")
    if not config["name"]:
        config["name"] = path.stem
    if config["train"]["amp"] not in ("bf16", "fp16", "none"):
        raise TrainingError("train.amp must be 'bf16', 'fp16' or 'none'")
    return config


def build_model(config: Mapping[str, Any]) -> Detector:
    """The detector of a training config (weights from ``init_from`` when given)."""
    model = BUILDERS[config["model"]["architecture"]](copy.deepcopy(config["model"]))
    source = config.get("init_from")
    if source:
        state = load_checkpoint(source).state_dict()
        check_state_dict(model.state_dict(), state, source=str(source))
        model.load_state_dict(state)
        log.info("initialised from %s", source)
    return model


# ------------------------------------------------------------------------------------ distributed
def _init_distributed() -> tuple[int, int, int]:
    """(rank, world size, local rank); starts the process group when torchrun set WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), world, int(os.environ.get("LOCAL_RANK", "0"))


def _any_rank(flag: bool, device: torch.device, world: int) -> bool:
    """True if ``flag`` is set on any rank (so all ranks stop together)."""
    if world == 1:
        return flag
    value = torch.tensor([float(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


# --------------------------------------------------------------------------------- resume state
def save_resume_state(
    folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> None:
    """``folder/{model,optimizer}.safetensors`` + ``state.json``: everything to continue training."""
    folder.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    opt = optimizer.state_dict()
    tensors = {f"state.{pid}.{name}": t.detach().contiguous().cpu() for pid, entry in opt["state"].items()
               for name, t in entry.items()}
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    write_atomic(folder / "model.safetensors", lambda p: save_file(weights, str(p)))
    write_atomic(folder / "optimizer.safetensors", lambda p: save_file(tensors, str(p)))
    full = {**state, "param_groups": opt["param_groups"]}
    write_atomic(folder / "state.json", lambda p: p.write_text(json.dumps(full, indent=1) + "\n"))


def load_resume_state(
    folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer, config: Mapping[str, Any]
) -> dict[str, Any]:
    """Restore model, optimizer and RNG from :func:`save_resume_state`; return the JSON state."""
    try:
        state = json.loads((folder / "state.json").read_text())
        weights = load_file(str(folder / "model.safetensors"))
        tensors = load_file(str(folder / "optimizer.safetensors"))
    except (OSError, json.JSONDecodeError, SafetensorError, ValueError) as err:
        raise TrainingError(f"cannot resume from {folder}: the state is missing or corrupt ({err}); "
                            "start again with --overwrite") from err
    saved = state.get("config", {})
    changed = [k for k in _RESUME_KEYS if saved.get(k) != config.get(k)]
    if changed:
        raise TrainingError(f"cannot resume from {folder}: the config changed in {changed}; "
                            "use the config it was started with, or start again with --overwrite")
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
        raise TrainingError(f"cannot resume from {folder}: optimizer state does not fit ({err})") from err
    torch.set_rng_state(tensors["rng.cpu"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    return state


# ------------------------------------------------------------------------------------ training
def _param_groups(model: nn.Module, weight_decay: float, gate_lr_scale: float) -> list[dict[str, Any]]:
    """AdamW groups: decay on matrices and convolutions; none on norms, biases, embeddings; SPA gates
    apart, with their own learning-rate scale (fresh gates on a trained backbone must move fast)."""
    groups: dict[str, list[nn.Parameter]] = {"decay": [], "no_decay": [], "gate": []}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if ".gate." in f".{name}":
            groups["gate"].append(param)
        elif param.ndim < 2 or name.endswith(("pos_embed", "cls_token", "relative_position_bias_table")):
            groups["no_decay"].append(param)
        else:
            groups["decay"].append(param)
    settings = {"decay": (weight_decay, 1.0), "no_decay": (0.0, 1.0), "gate": (0.0, gate_lr_scale)}
    return [{"params": groups[k], "weight_decay": wd, "lr_scale": scale} for k, (wd, scale) in settings.items() if groups[k]]


def _lr_at(step: int, total: int, train_cfg: Mapping[str, Any]) -> float:
    """Linear warm-up, then cosine decay from ``lr`` to ``min_lr`` at ``total`` steps."""
    lr, min_lr, warmup = train_cfg["lr"], train_cfg["min_lr"], train_cfg["warmup_steps"]
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))


def _epoch_batches(size: int, batch: int, epoch: int, seed: int, rank: int, world: int) -> list[list[int]]:
    """This rank's batches of one epoch: a seeded permutation, sharded, incomplete batches dropped."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(size, generator=generator)[rank::world].tolist()
    return [order[i : i + batch] for i in range(0, len(order) - batch + 1, batch)]


def _materialise(dataset: Dataset, desc: str) -> list[tuple[Tensor, dict[str, Any]]]:
    """Transform every sample once (no random augmentation), dropping masks once labels exist."""
    items = []
    for i in tqdm(range(len(dataset)), desc=desc, disable=None):
        image, target = dataset[i]
        if "select_labels" in target:
            target.pop("masks", None)
        items.append((image, target))
    return items


def _autocast(device: torch.device, amp: str) -> Any:
    enabled = device.type == "cuda" and amp != "none"
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16, enabled=enabled)


def _spa_enabled(model: nn.Module) -> bool:
    return find_context(model).config.enabled


def _checkpoint_config(model: Detector, config: Mapping[str, Any], classes: list[str]) -> dict[str, Any]:
    """What goes into config.json: the architecture, and the recipe and data that made the weights."""
    return {
        **model.architecture_config(),
        "name": config["name"],
        "description": config["description"],
        "image_size": config["image_size"],
        "class_names": classes,
        "data": config["data"],
        "train": config["train"],
        "seed": config["seed"],
        "init_from": config["init_from"],
    }


class _Averages:
    """Running means of logged scalars over an epoch."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)

    def add(self, **values: float | None) -> None:
        for key, value in values.items():
            if value is not None:
                self.sums[key] += float(value)
                self.counts[key] += 1

    def means(self) -> dict[str, float]:
        return {k: self.sums[k] / self.counts[k] for k in self.sums}


def _prepare_output(out: Path, resume: bool, overwrite: bool) -> None:
    """Check the output folder against --resume / --overwrite; clear an old resume state on overwrite."""
    last = out / "last"
    if resume and not (last / "state.json").is_file():
        raise TrainingError(f"--resume: {last} holds no resume state; start without --resume")
    if not resume and ((out / "model.safetensors").exists() or last.exists()):
        if not overwrite:
            raise TrainingError(f"{out} already holds a checkpoint; pass --overwrite to replace it or --resume to continue")
        shutil.rmtree(last, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)


def _train_step(model: Detector, wrapped: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                images: Tensor, targets: list[dict[str, Any]], train_cfg: Mapping[str, Any], image_size: int,
                alpha: float | None) -> dict[str, float | None]:
    """One optimisation step of ``L_task + alpha * L_select`` (no L_select when ``alpha`` is None: SPA off).

    Returns the unweighted losses for logging (``loss_select`` is the sum of BCEs over SPA blocks).
    """
    with _autocast(images.device, train_cfg["amp"]):
        outputs = wrapped(images)
    losses = model.loss(outputs, targets)
    total, select = losses["task"], None
    if alpha is not None:
        labels = model.selection_labels(targets, (image_size, image_size))
        select = model_selection_loss(model, {g: t.to(images.device) for g, t in labels.items()}, 1.0)
        total = total + alpha * select
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(total).backward()
    if train_cfg["grad_clip"]:
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(model.parameters(), train_cfg["grad_clip"])
    scaler.step(optimizer)
    scaler.update()
    return {"loss_task": losses["task"].item(), "loss_heatmap": losses["heatmap"].item(),
            "loss_size": losses["size"].item(), "loss_offset": losses["offset"].item(),
            "loss_select": None if select is None else select.item()}


def train(config: dict[str, Any], out: Path, *, resume: bool = False, overwrite: bool = False,
          command: str = "", device: str = "auto") -> dict[str, Any]:
    """Train as ``config`` says, writing checkpoints to ``out``; returns the final metrics."""
    rank, world, local_rank = _init_distributed()
    if device == "auto":
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    train_cfg, eval_cfg = config["train"], config["eval"]
    if train_cfg["threads"]:
        torch.set_num_threads(int(train_cfg["threads"]))
    last = out / "last"
    if rank == 0:
        _prepare_output(out, resume, overwrite)

    torch.manual_seed(config["seed"])
    model = build_model(config).to(dev)
    image_size = int(config["image_size"])
    grids = model.selection_grids((image_size, image_size))
    spa_on = _spa_enabled(model)
    threshold = find_context(model).config.threshold
    alpha = float(train_cfg["alpha"])

    data_start = time.perf_counter()
    data_cfg = config["data"]
    augment = float(data_cfg.get("hflip", 0.0)) > 0
    train_ds = load_split(data_cfg, "train", image_size, train=True, select_grids=grids)
    if not augment and data_cfg.get("kind", "digits") == "digits":  # COCO-format sets stream from disk
        train_ds = _materialise(train_ds, "prepare train")
    val_ds = _materialise(load_split(data_cfg, "val", image_size, num=train_cfg["val_num"], select_grids=grids), "prepare val")
    classes = class_names(data_cfg)
    data_minutes = (time.perf_counter() - data_start) / 60

    optimizer = torch.optim.AdamW(
        _param_groups(model, train_cfg["weight_decay"], float(train_cfg["gate_lr_scale"])), lr=train_cfg["lr"]
    )
    history: list[dict[str, Any]] = []
    epoch, batch_done, elapsed = 0, 0, 0.0
    if resume:
        state = load_resume_state(last, model, optimizer, config)
        epoch, batch_done, elapsed, history = state["epoch"], state["batch"], state["elapsed_s"], state["history"]
        log.info("resumed from %s at epoch %d, batch %d", last, epoch, batch_done)

    wrapped: nn.Module = model
    if world > 1:  # the gates of a dense twin get no gradient
        wrapped = nn.parallel.DistributedDataParallel(
            model, device_ids=[dev.index] if dev.type == "cuda" else None, find_unused_parameters=not spa_on
        )
    scaler = torch.amp.GradScaler(dev.type, enabled=dev.type == "cuda" and train_cfg["amp"] == "fp16")
    batch_size = int(train_cfg["batch_size"])
    steps_per_epoch = len(_epoch_batches(len(train_ds), batch_size, 0, config["seed"], rank, world))
    if steps_per_epoch == 0:
        raise TrainingError(f"{len(train_ds)} training images give no full batch of {batch_size} per rank")
    total_steps = int(train_cfg["epochs"]) * steps_per_epoch
    budget = train_cfg["minutes"]
    if rank == 0:
        log.info("%s: %d train images, %d steps/epoch, %d epochs, SPA %s, alpha %g, device %s, world %d",
                 config["name"], len(train_ds), steps_per_epoch, train_cfg["epochs"], "on" if spa_on else "off",
                 alpha, dev, world)

    stopped_early = False
    lr = _lr_at(epoch * steps_per_epoch + batch_done, total_steps, train_cfg)
    clock = time.perf_counter() - elapsed
    while epoch < int(train_cfg["epochs"]) and not stopped_early:
        wrapped.train()
        batches = _epoch_batches(len(train_ds), batch_size, epoch, config["seed"], rank, world)[batch_done:]
        loader = DataLoader(train_ds, batch_sampler=batches, collate_fn=collate,
                            num_workers=int(train_cfg["workers"]))
        averages = _Averages()
        bar = tqdm(loader, total=len(batches), desc=f"epoch {epoch + 1}/{train_cfg['epochs']}",
                   disable=None if rank == 0 else True)
        for images, targets in bar:
            step = epoch * steps_per_epoch + batch_done
            lr = _lr_at(step, total_steps, train_cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr * group["lr_scale"]
            values = _train_step(model, wrapped, optimizer, scaler, images.to(dev, non_blocking=True), targets,
                                 train_cfg, image_size, alpha if spa_on else None)
            batch_done += 1
            ratios = keep_ratios(model, threshold) if spa_on else []
            averages.add(**values, **{f"keep_{layer}": r for layer, r in ratios})
            if rank == 0:
                means = averages.means()
                bar.set_postfix(task=f"{means['loss_task']:.3f}",
                                select=f"{means['loss_select']:.3f}" if spa_on else "-",
                                keep=f"{sum(r for _, r in ratios) / len(ratios):.2f}" if ratios else "-")
                if batch_done % int(train_cfg["log_every"]) == 0:
                    log.info("epoch %d step %d/%d lr %.2e L_task %.4f L_select %s keep %s", epoch + 1, batch_done,
                             steps_per_epoch, lr, means["loss_task"],
                             f"{means['loss_select']:.4f}" if spa_on else "-",
                             " ".join(f"L{k[5:]}={v:.3f}" for k, v in means.items() if k.startswith("keep_")) or "-")
            over_budget = budget is not None and time.perf_counter() - clock > 60 * float(budget)
            if _any_rank(over_budget, dev, world):
                stopped_early = batch_done < steps_per_epoch or epoch + 1 < int(train_cfg["epochs"])
                break
        bar.close()
        epoch_done = batch_done >= steps_per_epoch
        means = averages.means()
        entry: dict[str, Any] = {
            "epoch": epoch + 1, "steps": batch_done, "complete": epoch_done, "lr": lr,
            **{k: v for k, v in means.items() if not k.startswith("keep_")},
            "keep_ratio_train": {k[5:]: v for k, v in means.items() if k.startswith("keep_")},
        }
        if epoch_done:
            epoch, batch_done = epoch + 1, 0
        if rank == 0:
            val = evaluate(model, val_ds, image_size, timing_batch=0)
            entry.update(val_AP50=val["AP50"], val_AP=val["AP"], val_keep_ratio=val["keep_ratio"]["mean"],
                         val_flops_saving=val["flops_saving"], elapsed_min=(time.perf_counter() - clock) / 60)
            history.append(entry)
            log.info("epoch %d: L_task %.4f L_select %s val AP50 %.4f AP %.4f keep %.3f (%.1f min)", entry["epoch"],
                     entry["loss_task"], f"{entry['loss_select']:.4f}" if spa_on else "-", val["AP50"], val["AP"],
                     val["keep_ratio"]["mean"], entry["elapsed_min"])
            ckpt_config = _checkpoint_config(model, config, classes)
            state = {"epoch": epoch, "batch": batch_done, "elapsed_s": time.perf_counter() - clock,
                     "history": history, "config": config}
            save_resume_state(last, model, optimizer, state)
            metrics = {"status": "training", "command": command, "history": history}
            save_checkpoint(model, out, ckpt_config, metrics=metrics,
                            card=model_card(ckpt_config, metrics, command), overwrite=True)
        if world > 1:
            dist.barrier()

    metrics: dict[str, Any] = {}
    if rank == 0:
        metrics = _final_metrics(model, config, history, image_size, grids, stopped_early,
                                 (time.perf_counter() - clock) / 60, data_minutes, eval_cfg)
        metrics["command"] = command
        ckpt_config = _checkpoint_config(model, config, classes)
        save_checkpoint(model, out, ckpt_config, metrics=metrics, card=model_card(ckpt_config, metrics, command),
                        overwrite=True)
        log.info("wrote %s", out)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return metrics


def _final_metrics(model: Detector, config: Mapping[str, Any], history: list[dict[str, Any]], image_size: int,
                   grids: Sequence[tuple[int, int]], stopped_early: bool, train_minutes: float,
                   data_minutes: float, eval_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Test-split metrics (with CPU timing), the fixed CI subset, and the learning curves."""
    model = model.cpu().eval()
    data = config["data"]
    test = load_split(data, "test", image_size, select_grids=grids)
    result = evaluate(model, test, image_size, timing_batch=int(eval_cfg["timing_batch"]),
                      timing_repeats=int(eval_cfg["timing_repeats"]), progress=sys.stderr.isatty())
    ci = evaluate(model, load_split(data, "test", image_size, num=int(eval_cfg["ci_num"])), image_size, timing_batch=0)
    return {
        "status": "stopped early (time budget)" if stopped_early else "complete",
        "split": "test",
        "test": result,
        "ci_subset": {"split": "test", "num": int(eval_cfg["ci_num"]), **ci},
        "history": history,
        "train_minutes": train_minutes,
        "data_minutes": data_minutes,
        "machine": {"device": "cpu", "threads": torch.get_num_threads(), "torch": torch.__version__},
    }


# ------------------------------------------------------------------------------------ model card
def _fmt(value: Any, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if isinstance(value, float) else ("-" if value is None else str(value))


def model_card(config: Mapping[str, Any], metrics: Mapping[str, Any], command: str) -> str:
    """README.md of a checkpoint: what it is, how it was made (exact command), what it scores."""
    backbone = config["backbone"]
    spa = backbone.get("spa") or backbone.get("timm_kwargs", {}).get("spa", {})
    lines = [
        f"# {config['name']}",
        "",
        config.get("description") or "",
        "",
        "A CenterNet-style digit detector on an SPA backbone (Select and Pack Attention, Zhang et al., "
        "arXiv 2410.23608), trained by `spa_viz.train` on the cluttered-digits data of `spa_viz.data.digits`.",
        "",
        "## Reproduce",
        "",
        "```bash",
        command or f"python -m spa_viz.train --config configs/{config['name']}.json",
        f"python -m spa_viz.evaluate --checkpoint checkpoints/{config['name']}",
        "```",
        "",
        "## Model",
        "",
        f"- architecture: `{config['architecture']}`, backbone `{backbone['timm_name']}` "
        f"{json.dumps(backbone.get('timm_kwargs', {}))}",
        *([f"- patch embedding: conv stem of widths {backbone['stem']} (`ConvStemEmbed`) + 1x1 projection"]
          if backbone.get("stem") else []),
        f"- SPA: enabled={spa.get('enabled')}, threshold={spa.get('threshold')}, policy={spa.get('policy')}, "
        f"start_layer={spa.get('start_layer', '(SPT stages)')}",
        f"- input {config['image_size']} px (letterboxed from the {config['data'].get('canvas_size', '?')} px "
        "images; boxes are reported in original pixels)",
        f"- initialised from: {config.get('init_from') or 'scratch (random init)'}",
        f"- recipe: {json.dumps(config['train'])}",
        f"- data: {json.dumps(config['data'])}",
        "",
    ]
    test = metrics.get("test")
    if test:
        keep = test["keep_ratio"]
        latency = test.get("latency", {})
        lines += [
            f"## Results on the held-out test split ({test['num_images']} images)",
            "",
            "| AP50 | AP | keep ratio mean (p10/p50/p90) | backbone GFLOPs dense -> run | FLOP saving | CPU ms/img dense | CPU ms/img SPA |",
            "|---|---|---|---|---|---|---|",
            f"| {test['AP50']:.4f} | {test['AP']:.4f} | {keep['mean']:.3f} ({keep['p10']:.3f}/{keep['p50']:.3f}/"
            f"{keep['p90']:.3f}) | {test['backbone_gflops_dense']:.4f} -> {test['backbone_gflops_run']:.4f} | "
            f"{100 * test['flops_saving']:.1f}% | {_fmt(latency.get('dense_ms_per_image'), 2)} | "
            f"{_fmt(latency.get('spa_ms_per_image'), 2)} |",
            "",
        ]
        if test.get("layers"):
            lines += ["Selection per SPA layer (keep mask vs labels from the masks):", "",
                      "| layer | keep | label share | precision | recall | IoU |", "|---|---|---|---|---|---|"]
            lines += [f"| {k} | {v['keep_ratio']:.3f} | {v['label_ratio']:.3f} | {v['precision']:.3f} | "
                      f"{v['recall']:.3f} | {v['iou']:.3f} |" for k, v in test["layers"].items()]
            lines.append("")
        lines += [f"Latency: batch {latency.get('batch')}, {latency.get('threads')} threads on a shared 2-core CPU "
                  "(noisy); FLOPs are analytic (`spa_viz.trace`), eval mode.", ""]
    history = metrics.get("history", [])
    if history:
        lines += ["## Learning curve", "", "| epoch | L_task | L_select | train keep | val AP50 | val keep | min |",
                  "|---|---|---|---|---|---|---|"]
        for h in history:
            keep_train = h.get("keep_ratio_train") or {}
            mean_keep = sum(keep_train.values()) / len(keep_train) if keep_train else None
            lines.append(f"| {h['epoch']}{'' if h['complete'] else ' (part)'} | {_fmt(h.get('loss_task'))} | "
                         f"{_fmt(h.get('loss_select'))} | {_fmt(mean_keep)} | {_fmt(h.get('val_AP50'))} | "
                         f"{_fmt(h.get('val_keep_ratio'))} | {_fmt(h.get('elapsed_min'), 1)} |")
        lines.append("")
    lines += [f"Status: {metrics.get('status')}.", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ CLI
def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """CLI entry point."""
    parser = argparse.ArgumentParser(prog="python -m spa_viz.train", description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, required=True, help="JSON config (see configs/)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: config 'out' or checkpoints/NAME)")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/last")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint in OUT")
    parser.add_argument("--minutes", type=float, default=None, help="training time budget (stops early, then evaluates)")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:1")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    overrides = {k: v for k, v in {"train.minutes": args.minutes, "train.epochs": args.epochs,
                                    "seed": args.seed}.items() if v is not None}
    try:
        config = load_config(args.config, overrides)
        out = args.out or Path(config["out"] or Path("checkpoints") / config["name"])
        command = "python -m spa_viz.train " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
        return train(config, out, resume=args.resume, overwrite=args.overwrite, command=command, device=args.device)
    except (TrainingError, CheckpointError) as err:
        parser.exit(2, f"error: {err}\n")


if __name__ == "__main__":
    main()
