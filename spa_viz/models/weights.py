"""Model import: start a freshly built model from trained weights (a checkpoint folder or a timm file).

A training recipe builds its model through the architecture registry
(:func:`~spa_viz.io.checkpoint.build_architecture`), then starts it from other weights: the whole
model from a checkpoint of the same architecture (:func:`init_from_checkpoint`), or only its SPA
backbone from a checkpoint's backbone or a timm weights file (:func:`init_backbone`). The gates of
a dense-twin source (SPA disabled) were never trained and are not copied: the new gates keep their
init, as the recipe's ``gate_init_bias`` says.
"""

from __future__ import annotations

import logging
from pathlib import Path

from timm.models.vision_transformer import checkpoint_filter_fn
from torch import Tensor, nn

from spa_viz.io.checkpoint import CheckpointError, check_state_dict, load_checkpoint, load_torch_weights
from spa_viz.layers.block import find_backbone, find_context
from spa_viz.models.spt import SPT, load_swin_weights

__all__ = ["init_backbone", "init_from_checkpoint", "trained_state"]

log = logging.getLogger(__name__)

_GATE = ".gate."


def trained_state(loaded: nn.Module, part: nn.Module) -> dict[str, Tensor]:
    """``part``'s state dict (``part`` is ``loaded`` or a module of it), without the gates when
    ``loaded`` is a dense twin: its gates were never trained."""
    state = part.state_dict()
    if find_context(loaded).config.enabled:
        return state
    return {k: v for k, v in state.items() if _GATE not in k}


def init_from_checkpoint(model: nn.Module, source: str | Path) -> None:
    """Load every tensor of the checkpoint folder ``source`` into ``model`` (same architecture).

    Only the gates may be missing (a dense-twin source); anything else missing raises
    :class:`~spa_viz.io.checkpoint.CheckpointError`.
    """
    loaded = load_checkpoint(source)
    check_state_dict(model.state_dict(), loaded.state_dict(), source=str(source))
    missing = model.load_state_dict(trained_state(loaded, loaded), strict=False).missing_keys
    if any(_GATE not in k for k in missing):
        raise CheckpointError(f"{source} lacks {[k for k in missing if _GATE not in k][:5]}")
    log.info("initialised from %s%s", source, " (fresh gates: the source is a dense twin)" if missing else "")


def init_backbone(model: nn.Module, source: str | Path) -> None:
    """Load backbone weights into ``model``'s SPA backbone from a checkpoint folder (its backbone's
    tensors; e.g. a CenterNet detector's SPT for a Mask R-CNN) or a timm weights file (Swin weights
    for an SPT via :func:`~spa_viz.models.spt.load_swin_weights`, ViT weights for an SPA-ViT).

    Tensors the source lacks (SPA gates, the ``plus4`` extra blocks, a classifier) keep their init.
    """
    backbone = find_backbone(model)
    if Path(source).is_dir():
        loaded = load_checkpoint(source)
        state = trained_state(loaded, find_backbone(loaded))
        check_state_dict(backbone.state_dict(), state, partial=True, source=f"{source} (its backbone)")
        missing = backbone.load_state_dict(state, strict=False).missing_keys
    else:
        state = {k: v for k, v in load_torch_weights(source).items() if not k.startswith("head")}  # no classifier
        if isinstance(backbone, SPT):
            missing = load_swin_weights(backbone, state)
        else:
            state = checkpoint_filter_fn(state, backbone)
            check_state_dict(backbone.state_dict(), state, partial=True, source=str(source))
            missing = backbone.load_state_dict(state, strict=False).missing_keys
    log.info(
        "backbone initialised from %s; %d tensors kept their init (%s)",
        source,
        len(missing),
        ", ".join(sorted({k.split(".")[0] + "..." + k.rsplit(".", 2)[-2] for k in missing})[:6]) or "none",
    )
