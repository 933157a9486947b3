"""Side by side: one batch through several ways of spending less compute, at equal compute if asked.

A :class:`Setting` is one way to run a model's backbone: its learned gate at a threshold, a
training-free selector keeping an amount (:data:`~spa_viz.selection.selectors.SELECTORS`), or token
merging (ToMe, :mod:`spa_viz.selection.merging`) of ``r`` tokens in every SPA layer, each with the
packing policy, score fusion and unkept path of SPA. :func:`run_setting` runs it and reports the
backbone MACs per image from the same counter as the trace. :func:`match_compute` moves a setting's
amount until its backbone MACs match a target within a tolerance (the "equal compute" switch).
:func:`tradeoff` sweeps each method over its amount range (output error vs backbone MACs).

The model's SPA settings and installed selector are restored after every run.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from spa_viz.analysis.flops import embed_macs, static_macs
from spa_viz.analysis.trace import Trace, find_backbone
from spa_viz.analysis.trace import trace as traced_forward
from spa_viz.layers.block import find_context, spa_blocks
from spa_viz.models.twin import dense_twin
from spa_viz.selection.merging import TokenMerging, merging_forward
from spa_viz.selection.selectors import (
    SELECTORS,
    applicable_selectors,
    install_selector,
    installed_selector,
    remove_selector,
)

__all__ = [
    "LEARNED_GATE",
    "TOKEN_MERGING",
    "ColumnRun",
    "Setting",
    "amount_range",
    "available_methods",
    "match_compute",
    "run_setting",
    "tradeoff",
]

LEARNED_GATE = "learned_gate"
TOKEN_MERGING = "token_merging"


@dataclass(frozen=True)
class Setting:
    """One way to run the backbone. ``amount``: the gate's threshold, a selector's ``ratio`` or ``p``, or
    ToMe's tokens merged per SPA layer ``r``. ``fusion`` / ``unkept`` None: as the model was saved."""

    method: str = LEARNED_GATE
    amount: float = 0.5
    policy: str = "image"
    container_len: int | None = None
    fusion: str | None = None
    unkept: str | None = None

    def label(self) -> str:
        """A short column title, e.g. ``learned_gate t=0.50`` or ``token_merging r=12``."""
        if self.method == LEARNED_GATE:
            amount = f"t={self.amount:.2f}"
        elif self.method == TOKEN_MERGING:
            amount = f"r={int(self.amount)}"
        else:
            amount = f"{SELECTORS[self.method].amount}={self.amount:.2f}"
        extras = [p for p in (self.unkept, None if self.policy == "image" else self.policy) if p]
        return " ".join([self.method, amount, *extras])


@dataclass
class ColumnRun:
    """What one setting did to the batch: its output, trace (None for ToMe) and compute."""

    setting: Setting
    output: Any
    trace: Trace | None
    macs: float
    """Backbone MACs per image (mean over the batch), as run."""
    dense_macs: float
    """Backbone MACs per image of the dense twin."""
    kept: float
    """Share of patch tokens kept (mean over SPA layers and images); for ToMe, the share of patch
    tokens left as separate tokens after its merges, averaged over the same layers."""
    groups: Tensor | None = None
    """ToMe only: (B, P + N) the merged token each input token ended in."""

    @property
    def saving(self) -> float:
        """Share of the dense twin's backbone MACs not spent."""
        return 1.0 - self.macs / self.dense_macs if self.dense_macs else 0.0


def available_methods(model: nn.Module) -> list[str]:
    """The methods that can run on ``model``: its learned gate, the selectors it allows and, where the
    backbone is a plain timm ViT (global attention), token merging."""
    methods = [LEARNED_GATE, *applicable_selectors(model)]
    if _merging_backbone(model) is not None:
        methods.append(TOKEN_MERGING)
    return methods


def _merging_backbone(model: nn.Module) -> nn.Module | None:
    from timm.models.vision_transformer import VisionTransformer

    backbone = find_backbone(model)
    return backbone if isinstance(backbone, VisionTransformer) else None


def amount_range(model: nn.Module, method: str, image_size: tuple[int, int]) -> tuple[float, float]:
    """The (least-compute, most-compute) ends of ``method``'s amount on ``model`` at ``image_size``."""
    if method == LEARNED_GATE:
        return 1.0, 0.0
    if method == TOKEN_MERGING:
        backbone = _merging_backbone(model)
        patch_h, patch_w = backbone.patch_embed.patch_size
        tokens = (image_size[0] // patch_h) * (image_size[1] // patch_w)
        layers = len(spa_blocks(model))
        return float(max((tokens - 1) // max(layers, 1), 1)), 0.0
    if method in SELECTORS:
        return 0.0, 1.0
    raise ValueError(f"unknown method {method!r}; choose one of {available_methods(model)}")


@contextmanager
def _applied(model: nn.Module, setting: Setting) -> Iterator[None]:
    """``setting``'s gate or selector and SPA settings in ``model``; the previous ones restored after."""
    config = find_context(model).config
    saved = config.to_dict()
    selector = installed_selector(model)
    previous_selector = None
    if selector is not None:
        gate = spa_blocks(model)[0].gate
        previous_selector = (selector, {"ratio": gate.ratio} if gate.ratio is not None else {"p": gate.p})
    try:
        if setting.method in SELECTORS:
            if setting.method not in applicable_selectors(model):
                raise ValueError(f"selector {setting.method} cannot run on this model (it needs a class token)")
            install_selector(model, setting.method, **{SELECTORS[setting.method].amount: float(setting.amount)})
        else:
            remove_selector(model)
        changes: dict[str, Any] = {"policy": setting.policy, "container_len": setting.container_len, "enabled": True}
        if setting.method == LEARNED_GATE:
            changes["threshold"] = float(setting.amount)
        if setting.fusion is not None:
            changes["fusion"] = setting.fusion
        if setting.unkept is not None:
            changes["unkept"] = setting.unkept
        config.update(**changes)
        yield
    finally:
        if previous_selector is None:
            remove_selector(model)
        else:
            install_selector(model, previous_selector[0], **previous_selector[1])
        config.update(**saved)


def _dense_macs(model: nn.Module, image_size: tuple[int, int]) -> float:
    backbone = find_backbone(model)
    with dense_twin(model):
        return float(static_macs(backbone, image_size))


@torch.no_grad()
def run_setting(model: nn.Module, images: Tensor, setting: Setting) -> ColumnRun:
    """Run ``images`` through ``model`` as ``setting`` says; the model's own settings are restored after."""
    size = (int(images.shape[-2]), int(images.shape[-1]))
    dense = _dense_macs(model, size)
    if setting.method == TOKEN_MERGING:
        backbone = _merging_backbone(model)
        if backbone is None:
            raise ValueError("token merging runs on plain ViT backbones only (global attention)")
        layers = [block.spa_layer for block in spa_blocks(model)]
        merging = TokenMerging(int(setting.amount), layers)
        with merging_forward(model, backbone, merging) as results:
            output = model(images)
        result = results[-1]
        macs = float(embed_macs(backbone.patch_embed, size) + result.block_macs)
        prefix = int(backbone.num_prefix_tokens)
        patches = result.tokens_per_block[0] - prefix
        remaining = [(t - r - prefix) / patches for t, r in zip(result.tokens_per_block, result.merged_per_block)]
        kept = sum(remaining[i] for i in layers) / len(layers) if layers else 1.0
        return ColumnRun(setting, output, None, macs, dense, kept, result.groups.cpu())
    with _applied(model, setting):
        output, record = traced_forward(model, images)
    macs = record.backbone_macs_run / record.batch_size
    return ColumnRun(setting, output, record, float(macs), dense, record.mean_keep_ratio)


def match_compute(
    model: nn.Module,
    images: Tensor,
    setting: Setting,
    target_macs: float,
    tolerance: float = 0.02,
    max_runs: int = 12,
) -> ColumnRun:
    """``setting`` with its amount moved so that its backbone MACs per image lie within ``tolerance``
    (relative) of ``target_macs``: bisection on the amount (compute falls monotonically from one end
    of :func:`amount_range` to the other), integers for ToMe. Returns the closest run found; its
    ``macs`` say how close it came when the method cannot reach the target (e.g. a gate that keeps
    more than the target allows even at threshold 1)."""
    size = (int(images.shape[-2]), int(images.shape[-1]))
    cheap, costly = amount_range(model, setting.method, size)
    integer = setting.method == TOKEN_MERGING

    def attempt(amount: float) -> ColumnRun:
        return run_setting(model, images, replace(setting, amount=round(amount) if integer else amount))

    best = attempt(setting.amount)
    runs = 1
    low, high = cheap, costly  # compute grows from low to high
    while abs(best.macs / target_macs - 1.0) > tolerance and runs < max_runs:
        middle = (low + high) / 2
        if integer and round(middle) in (round(low), round(high)):
            break
        candidate = attempt(middle)
        runs += 1
        if abs(candidate.macs - target_macs) < abs(best.macs - target_macs):
            best = candidate
        if candidate.macs > target_macs:
            high = middle
        else:
            low = middle
    return best


@dataclass
class TradeoffPoint:
    """One point of a trade-off curve."""

    setting: Setting
    macs: float
    dense_macs: float
    error: float
    kept: float


def tradeoff(
    model: nn.Module,
    images: Tensor,
    methods: Sequence[str],
    error: Callable[[Any], float],
    points: int = 5,
    base: Setting | None = None,
    progress: Callable[[float, str], None] | None = None,
) -> list[TradeoffPoint]:
    """Output error vs backbone MACs for each method over ``points`` amounts spread over its range
    (ends excluded where they are degenerate: nothing kept). ``error(output)`` scores one output
    (e.g. MAE of the saliency map vs the dense twin's); ``base`` gives policy, fusion and unkept;
    ``progress(fraction, text)`` is called after each run (a tqdm bar is shown too)."""
    base = base or Setting()
    size = (int(images.shape[-2]), int(images.shape[-1]))
    plan: list[Setting] = []
    for method in methods:
        cheap, costly = amount_range(model, method, size)
        for i in range(points):
            amount = cheap + (costly - cheap) * (i + 1) / (points + 1)
            plan.append(
                replace(base, method=method, amount=float(round(amount)) if method == TOKEN_MERGING else amount)
            )
    curve: list[TradeoffPoint] = []
    for done, setting in enumerate(tqdm(plan, desc="trade-off", unit="run", leave=False), start=1):
        run = run_setting(model, images, setting)
        curve.append(TradeoffPoint(setting, run.macs, run.dense_macs, float(error(run.output)), run.kept))
        if progress is not None:
            progress(done / len(plan), setting.label())
    return [point for point in curve if math.isfinite(point.error)]
