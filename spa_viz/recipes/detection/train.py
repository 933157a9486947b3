"""Train an SPA detector from a JSON config: ``spa-viz train detection --config configs/NAME.json``.

Loss: ``L = L_task + alpha * L_select`` (CenterNet loss + the BCE of every SPA block's own gate logit,
before fusion, against selection labels made from the masks, or boxes, at that block's token grid;
``alpha`` as :mod:`spa_viz.selection.loss` documents it). The model is built through the
architecture registry (:func:`~spa_viz.io.checkpoint.build_architecture`) and started from other
weights by :mod:`spa_viz.models.weights`. The output folder receives, after every epoch, a loadable
checkpoint (``model.safetensors`` + ``config.json`` + ``metrics.json`` with the learning curves +
``README.md`` model card, :func:`~spa_viz.recipes.record.write_record`) and a ``last/`` resume state
(:mod:`spa_viz.recipes.resume`). At the end the model is evaluated on the test split
(:mod:`spa_viz.recipes.detection.evaluate`).

Mask R-CNN recipes (``model.architecture`` ``spt_mask_rcnn`` / ``spa_vit_mask_rcnn``) train
torchvision's Mask R-CNN: ``L_task`` is the sum of its losses (RPN objectness and box, classifier, box,
mask) and ``L_select`` comes from the masks of the batch as the model's transform resized and padded
it; images keep their own size (the model resizes them) and the evaluation adds mask AP.

Runs on the CPU by default; on CUDA with bf16 autocast; on several GPUs with
``torchrun --nproc_per_node N -m spa_viz.cli train detection --config ...`` (DDP, enabled by torchrun's env vars:
NCCL on GPUs, gloo on the CPU). ``train.accumulate`` sums gradients over that many batches per
optimizer step (effective batch = batch_size x accumulate x processes).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
import time
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from spa_viz.data.coco import collate
from spa_viz.data.splits import class_names, load_split
from spa_viz.io.checkpoint import CheckpointError, build_architecture, save_checkpoint
from spa_viz.layers.gate import detach_gate_inputs
from spa_viz.models.detection import Detector, SPAMaskRCNN, keep_ratios
from spa_viz.models.spa_vit import spa_context
from spa_viz.models.weights import init_backbone, init_from_checkpoint
from spa_viz.recipes.detection.card import model_card
from spa_viz.recipes.detection.config import RESUME_KEYS, Recipe, TrainingError, TrainSettings, load_config
from spa_viz.recipes.detection.evaluate import evaluate
from spa_viz.recipes.detection.mask_rcnn import collate_list, dataset_has_masks, evaluate_mask_rcnn
from spa_viz.recipes.meters import RunningMeans
from spa_viz.recipes.record import write_record
from spa_viz.recipes.resume import RESUME_FOLDER, ResumeError, load_resume_state, prepare_output, save_resume_state
from spa_viz.recipes.schedule import cosine_schedule
from spa_viz.selection.loss import model_selection_loss

__all__ = ["TrainingError", "build_model", "load_config", "main", "saved_config", "train"]

log = logging.getLogger(__name__)

Model = Detector | SPAMaskRCNN


def build_model(config: Recipe) -> Model:
    """The model of a recipe, built through the architecture registry, with weights from ``init_from``
    (the whole model) and ``init_backbone_from`` (its SPA backbone); see :mod:`spa_viz.models.weights`."""
    model = build_architecture(config.model)
    if config.init_from:
        init_from_checkpoint(model, config.init_from)
    if config.init_backbone_from:
        init_backbone(model, config.init_backbone_from)
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
    return [
        {"params": groups[k], "weight_decay": wd, "lr_scale": scale} for k, (wd, scale) in settings.items() if groups[k]
    ]


def _lr_at(step: int, total: int, settings: TrainSettings) -> float:
    """Linear warm-up, then cosine decay from ``lr`` to ``min_lr`` at ``total`` steps."""
    return cosine_schedule(step, total, settings.lr, settings.min_lr, settings.warmup_steps)


def _epoch_batches(size: int, batch: int, epoch: int, seed: int, rank: int, world: int) -> list[list[int]]:
    """This rank's batches of one epoch: a seeded permutation, sharded, incomplete batches dropped."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(size, generator=generator)[rank::world].tolist()
    return [order[i : i + batch] for i in range(0, len(order) - batch + 1, batch)]


class _Materialised(Dataset):
    """Transformed samples held in memory as float16 (half the memory of float32: 24,000 digit images at
    128 px are 2.4 GB instead of 4.7 GB), handed out as float32."""

    def __init__(self, items: list[tuple[Tensor, dict[str, Any]]]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Any]]:
        image, target = self.items[index]
        return image.float(), target


def _materialise(dataset: Dataset, desc: str) -> _Materialised:
    """Transform every sample once (no random augmentation), dropping masks once labels exist."""
    items = []
    for i in tqdm(range(len(dataset)), desc=desc, disable=None):
        image, target = dataset[i]
        if "select_labels" in target:
            target.pop("masks", None)
        items.append((image.half(), target))
    return _Materialised(items)


def _autocast(device: torch.device, amp: str) -> Any:
    enabled = device.type == "cuda" and amp != "none"
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16, enabled=enabled)


def saved_config(model: Model, config: Recipe, classes: list[str]) -> dict[str, Any]:
    """What goes into config.json: the architecture, and the recipe and data that made the weights."""
    recipe = config.to_dict()
    return {
        **model.architecture_config(),
        **{key: recipe[key] for key in ("name", "description", "image_size")},
        "class_names": classes,
        **{key: recipe[key] for key in ("data", "train", "eval", "seed", "init_from", "init_backbone_from")},
    }


def _to_device(targets: list[dict[str, Any]], device: torch.device) -> list[dict[str, Any]]:
    return [{k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in t.items()} for t in targets]


def _losses(
    model: Model,
    wrapped: nn.Module,
    images: Tensor | list[Tensor],
    targets: list[dict[str, Any]],
    settings: TrainSettings,
    image_size: int,
    alpha: float | None,
) -> tuple[Tensor, dict[str, float | None]]:
    """``L_task + alpha * L_select`` of one batch (no L_select when ``alpha`` is None: SPA off) and the
    unweighted losses for logging (``loss_select`` is the sum of BCEs over SPA blocks)."""
    device = next(model.parameters()).device
    if isinstance(model, SPAMaskRCNN):
        with _autocast(device, settings.amp):
            losses = wrapped(images, targets)
        select = losses.pop("loss_select", None)
        task = sum(losses.values())
        total = task if alpha is None or select is None else task + alpha * select
        values = {"loss_task": task.item(), **{k: v.item() for k, v in losses.items()}}
        return total, {**values, "loss_select": None if select is None else select.item()}
    with _autocast(device, settings.amp):
        outputs = wrapped(images)
    losses = model.loss(outputs, targets)
    total, select = losses["task"], None
    if alpha is not None:
        labels = model.selection_labels(targets, (image_size, image_size))
        select = model_selection_loss(model, {g: t.to(device) for g, t in labels.items()}, 1.0)
        total = total + alpha * select
    return total, {
        "loss_task": losses["task"].item(),
        "loss_heatmap": losses["heatmap"].item(),
        "loss_size": losses["size"].item(),
        "loss_offset": losses["offset"].item(),
        "loss_select": None if select is None else select.item(),
    }


def _optimizer_step(
    model: Model, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, settings: TrainSettings
) -> None:
    """Clip (when set), step and clear the gradients summed since the last step."""
    if settings.grad_clip:
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


def _load_data(config: Recipe, model: Model, image_size: int) -> tuple[Dataset, Any, list[str], bool]:
    """(train set, validation set, class names, whether the data have masks); TrainingError when the data
    cannot be used (files missing, categories that do not match the model's classes)."""
    data, settings = config.data, config.train
    try:
        classes = class_names(data)
        if len(classes) != model.num_classes:
            raise TrainingError(
                f"the data have {len(classes)} categories ({', '.join(classes[:10])}{', ...' if len(classes) > 10 else ''}) "
                f"but the model has head.num_classes = {model.num_classes}; set model.head.num_classes to {len(classes)}"
            )
        if isinstance(model, SPAMaskRCNN):  # images at their own size: the model resizes and pads
            train_ds = load_split(data, "train", None, train=True)
            val_ds = load_split(data, "val", None, num=settings.val_num)
            masks = dataset_has_masks(train_ds)
            if not masks:
                log.warning(
                    "the training data have no instance masks: the mask head is not trained (box branch "
                    "only), selection labels come from the boxes and mask AP is not measured"
                )
            return train_ds, val_ds, classes, masks
        grids = model.selection_grids((image_size, image_size))
        train_ds = load_split(data, "train", image_size, train=True, select_grids=grids)
        if data.hflip <= 0 and data.kind == "digits":  # COCO-format sets stream from disk
            train_ds = _materialise(train_ds, "prepare train")
        val_ds = _materialise(
            load_split(data, "val", image_size, num=settings.val_num, select_grids=grids), "prepare val"
        )
        return train_ds, val_ds, classes, True
    except (OSError, ValueError) as err:
        if isinstance(err, TrainingError):
            raise
        raise TrainingError(f"cannot use the data of {config.name}: {err}") from err


def _validate(model: Model, val_ds: Any, image_size: int) -> dict[str, Any]:
    """The history fields of one validation pass (box AP, and mask AP for Mask R-CNN)."""
    if isinstance(model, SPAMaskRCNN):
        val = evaluate_mask_rcnn(model, val_ds, timing_batch=0)
        extra = {"val_mask_AP50": val["mask_AP50"], "val_mask_AP": val["mask_AP"]}
    else:
        val, extra = evaluate(model, val_ds, image_size, timing_batch=0), {}
    return {
        "val_AP50": val["AP50"],
        "val_AP": val["AP"],
        **extra,
        "val_keep_ratio": val["keep_ratio"]["mean"],
        "val_mac_saving": val["mac_saving"],
    }


def train(
    config: Recipe, out: Path, *, resume: bool = False, overwrite: bool = False, command: str = "", device: str = "auto"
) -> dict[str, Any]:
    """Train as ``config`` says, writing checkpoints to ``out``; returns the final metrics."""
    rank, world, local_rank = _init_distributed()
    if device == "auto":
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    settings = config.train
    if settings.threads:
        torch.set_num_threads(int(settings.threads))
    last = out / RESUME_FOLDER
    if rank == 0:
        prepare_output(out, resume=resume, overwrite=overwrite)

    torch.manual_seed(config.seed)
    model = build_model(config).to(dev)
    mask_rcnn = isinstance(model, SPAMaskRCNN)
    if mask_rcnn:
        model.select_alpha = 1.0  # the recipe weighs L_select itself (alpha below)
    if not settings.gate_input_grad:
        log.info("gate_input_grad off: %d gates score a detached block input", detach_gate_inputs(model))
    image_size = int(config.image_size)
    spa = spa_context(model).config
    spa_on = spa.enabled
    alpha = float(settings.alpha)

    data_start = time.perf_counter()
    train_ds, val_ds, classes, has_masks = _load_data(config, model, image_size)
    data_minutes = (time.perf_counter() - data_start) / 60

    optimizer = torch.optim.AdamW(
        _param_groups(model, settings.weight_decay, float(settings.gate_lr_scale)), lr=settings.lr
    )
    history: list[dict[str, Any]] = []
    epoch, batch_done, elapsed = 0, 0, 0.0
    if resume:
        state = load_resume_state(last, model, optimizer, config.to_dict(), RESUME_KEYS)
        epoch, batch_done, elapsed, history = state["epoch"], state["batch"], state["elapsed_s"], state["history"]
        log.info("resumed from %s at epoch %d, step %d", last, epoch, batch_done)

    wrapped: nn.Module = model
    if world > 1:  # the gates of a dense twin, and a mask head without masks, get no gradient
        wrapped = nn.parallel.DistributedDataParallel(
            model,
            device_ids=[dev.index] if dev.type == "cuda" else None,
            find_unused_parameters=not spa_on or not has_masks,
        )
    scaler = torch.amp.GradScaler(dev.type, enabled=dev.type == "cuda" and settings.amp == "fp16")
    batch_size = int(settings.batch_size)
    accumulate = int(settings.accumulate)
    epochs = int(settings.epochs)
    micro_per_epoch = len(_epoch_batches(len(train_ds), batch_size, 0, config.seed, rank, world))
    steps_per_epoch = micro_per_epoch // accumulate
    if steps_per_epoch == 0:
        raise TrainingError(
            f"{len(train_ds)} training images give no optimizer step of {accumulate} batch(es) of {batch_size} per rank"
        )
    total_steps = epochs * steps_per_epoch
    budget = settings.minutes
    collate_fn = collate_list if mask_rcnn else collate
    if rank == 0:
        log.info(
            "%s: %d train images, %d steps/epoch (batch %d x %d accumulated x %d processes), %d epochs, "
            "SPA %s, alpha %g, device %s, world %d",
            config.name,
            len(train_ds),
            steps_per_epoch,
            batch_size,
            accumulate,
            world,
            epochs,
            "on" if spa_on else "off",
            alpha,
            dev,
            world,
        )

    stopped_early = False
    lr = _lr_at(epoch * steps_per_epoch + batch_done, total_steps, settings)
    clock = time.perf_counter() - elapsed
    optimizer.zero_grad(set_to_none=True)
    while epoch < epochs and not stopped_early:
        wrapped.train()
        batches = _epoch_batches(len(train_ds), batch_size, epoch, config.seed, rank, world)
        batches = batches[: steps_per_epoch * accumulate][batch_done * accumulate :]
        loader = DataLoader(train_ds, batch_sampler=batches, collate_fn=collate_fn, num_workers=int(settings.workers))
        averages = RunningMeans()
        bar = tqdm(loader, total=len(batches), desc=f"epoch {epoch + 1}/{epochs}", disable=None if rank == 0 else True)
        for index, (images, targets) in enumerate(bar):
            images = [i.to(dev, non_blocking=True) for i in images] if mask_rcnn else images.to(dev, non_blocking=True)
            if mask_rcnn:
                targets = _to_device(targets, dev)
            steps_now = (index + 1) % accumulate == 0
            with wrapped.no_sync() if world > 1 and not steps_now else nullcontext():
                total, values = _losses(
                    model, wrapped, images, targets, settings, image_size, alpha if spa_on else None
                )
                scaler.scale(total / accumulate if accumulate > 1 else total).backward()
            ratios = keep_ratios(model) if spa_on else []
            averages.add(**values, **{f"keep_{layer}": r for layer, r in ratios})
            if not steps_now:
                continue
            lr = _lr_at(epoch * steps_per_epoch + batch_done, total_steps, settings)
            for group in optimizer.param_groups:
                group["lr"] = lr * group["lr_scale"]
            _optimizer_step(model, optimizer, scaler, settings)
            batch_done += 1
            if rank == 0:
                means = averages.means()
                bar.set_postfix(
                    task=f"{means['loss_task']:.3f}",
                    select=f"{means['loss_select']:.3f}" if spa_on else "-",
                    keep=f"{sum(r for _, r in ratios) / len(ratios):.2f}" if ratios else "-",
                )
                if batch_done % int(settings.log_every) == 0:
                    log.info(
                        "epoch %d step %d/%d lr %.2e L_task %.4f L_select %s keep %s",
                        epoch + 1,
                        batch_done,
                        steps_per_epoch,
                        lr,
                        means["loss_task"],
                        f"{means['loss_select']:.4f}" if spa_on else "-",
                        " ".join(f"L{k[5:]}={v:.3f}" for k, v in means.items() if k.startswith("keep_")) or "-",
                    )
            over_budget = budget is not None and time.perf_counter() - clock > 60 * float(budget)
            if _any_rank(over_budget, dev, world):
                stopped_early = batch_done < steps_per_epoch or epoch + 1 < epochs
                break
        bar.close()
        epoch_done = batch_done >= steps_per_epoch
        means = averages.means()
        entry: dict[str, Any] = {
            "epoch": epoch + 1,
            "steps": batch_done,
            "complete": epoch_done,
            "lr": lr,
            **{k: v for k, v in means.items() if not k.startswith("keep_")},
            "keep_ratio_train": {k[5:]: v for k, v in means.items() if k.startswith("keep_")},
        }
        if epoch_done:
            epoch, batch_done = epoch + 1, 0
        if rank == 0:
            entry.update(_validate(model, val_ds, image_size), elapsed_min=(time.perf_counter() - clock) / 60)
            history.append(entry)
            log.info(
                "epoch %d: L_task %.4f L_select %s val AP50 %.4f%s keep %.3f (%.1f min)",
                entry["epoch"],
                entry["loss_task"],
                f"{entry['loss_select']:.4f}" if spa_on else "-",
                entry["val_AP50"],
                f" mask AP50 {entry['val_mask_AP50']:.4f}" if entry.get("val_mask_AP50") is not None else "",
                entry["val_keep_ratio"],
                entry["elapsed_min"],
            )
            state = {
                "epoch": epoch,
                "batch": batch_done,
                "elapsed_s": time.perf_counter() - clock,
                "history": history,
                "config": config.to_dict(),
            }
            save_resume_state(last, model, optimizer, state)
            save_checkpoint(model, out, saved_config(model, config, classes), overwrite=True)
            write_record(
                out, {"status": "training", "command": command, "history": history}, model_card, overwrite=True
            )
        if world > 1:
            dist.barrier()

    metrics: dict[str, Any] = {}
    if rank == 0:
        metrics = _final_metrics(
            model, config, history, image_size, stopped_early, (time.perf_counter() - clock) / 60, data_minutes
        )
        metrics["command"] = command
        save_checkpoint(model, out, saved_config(model, config, classes), overwrite=True)
        write_record(out, metrics, model_card, overwrite=True)
        log.info("wrote %s", out)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return metrics


def _final_metrics(
    model: Model,
    config: Recipe,
    history: list[dict[str, Any]],
    image_size: int,
    stopped_early: bool,
    train_minutes: float,
    data_minutes: float,
) -> dict[str, Any]:
    """Test-split metrics (with timing), the fixed CI subset, and the learning curves.

    CenterNet detectors are timed on the CPU; Mask R-CNN on the device it trained on.
    """
    settings = config.eval
    if isinstance(model, SPAMaskRCNN):
        model.eval()
        test = load_split(config.data, "test", None)
        result = evaluate_mask_rcnn(
            model,
            test,
            timing_batch=int(settings.timing_batch),
            timing_repeats=int(settings.timing_repeats),
            progress=sys.stderr.isatty(),
        )
        ci_set = torch.utils.data.Subset(test, range(min(int(settings.ci_num), len(test))))
        ci = evaluate_mask_rcnn(model, ci_set, timing_batch=0)
        device = str(next(model.parameters()).device)
    else:
        model = model.cpu().eval()
        grids = model.selection_grids((image_size, image_size))
        test = load_split(config.data, "test", image_size, select_grids=grids)
        result = evaluate(
            model,
            test,
            image_size,
            timing_batch=int(settings.timing_batch),
            timing_repeats=int(settings.timing_repeats),
            progress=sys.stderr.isatty(),
        )
        ci = evaluate(
            model, load_split(config.data, "test", image_size, num=int(settings.ci_num)), image_size, timing_batch=0
        )
        device = "cpu"
    return {
        "status": "stopped early (time budget)" if stopped_early else "complete",
        "split": "test",
        "test": result,
        "ci_subset": {"split": "test", "num": int(settings.ci_num), **ci},
        "history": history,
        "train_minutes": train_minutes,
        "data_minutes": data_minutes,
        "machine": {"device": device, "threads": torch.get_num_threads(), "torch": torch.__version__},
    }


# ------------------------------------------------------------------------------------------ CLI
def _parse_sets(items: Sequence[str]) -> dict[str, Any]:
    """``["train.accumulate=8", "data.hflip=0.5"]`` -> overrides; a VALUE that is not JSON stays a string."""
    overrides: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise TrainingError(f"--set takes KEY=VALUE (e.g. train.accumulate=8), got {item!r}")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    return overrides


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """CLI entry point of ``spa-viz train detection``."""
    parser = argparse.ArgumentParser(prog="spa-viz train detection", description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, required=True, help="JSON config (see configs/)")
    parser.add_argument(
        "--out", type=Path, default=None, help="output folder (default: config 'out' or checkpoints/NAME)"
    )
    parser.add_argument("--resume", action="store_true", help="continue from OUT/last")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint in OUT")
    parser.add_argument(
        "--minutes", type=float, default=None, help="training time budget (stops early, then evaluates)"
    )
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:1")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe key, VALUE as JSON (e.g. --set train.accumulate=8); repeatable",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    overrides = {
        k: v
        for k, v in {"train.minutes": args.minutes, "train.epochs": args.epochs, "seed": args.seed}.items()
        if v is not None
    }
    try:
        overrides.update(_parse_sets(args.set))
        config = load_config(args.config, overrides)
        out = args.out or Path(config.out or Path("checkpoints") / config.name)
        command = "spa-viz train detection " + " ".join(
            shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)
        )
        return train(config, out, resume=args.resume, overwrite=args.overwrite, command=command, device=args.device)
    except (TrainingError, ResumeError, CheckpointError) as err:
        parser.exit(2, f"error: {err}\n")
