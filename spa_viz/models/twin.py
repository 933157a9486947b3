"""The dense twin: the same model with SPA switched off, every SPA block computing densely.

It is the reference every SPA number is measured against (FLOPs, latency, the saliency teacher,
the app's dense timing), and the one way spa-viz switches it on.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from spa_viz.models.spa_vit import spa_context

__all__ = ["dense_twin"]


@contextmanager
def dense_twin(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` (or the model its SPA backbone belongs to) as its dense twin inside the block.

    The previous ``enabled`` setting is restored afterwards, also when the block raises.
    """
    config = spa_context(model).config
    enabled = config.enabled
    config.update(enabled=False)
    try:
        yield model
    finally:
        config.update(enabled=enabled)
