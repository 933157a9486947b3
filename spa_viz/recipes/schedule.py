"""The one learning-rate schedule of spa-viz: linear warm-up, then a cosine decay."""

from __future__ import annotations

import math

__all__ = ["cosine_schedule"]


def cosine_schedule(step: int, total: int, start: float, end: float, warmup: int = 0) -> float:
    """The value at ``step``: linear warm-up to ``start`` over ``warmup`` steps, then cosine decay to
    ``end``, reached at step ``total`` (and held after it).

    Detection training decays the learning rate itself (``start=lr, end=min_lr``); the saliency
    gates decay a factor (``start=1, end=final ratio``) and reach it on their last step
    (``total = steps - 1``).
    """
    if step < warmup:
        return start * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return end + 0.5 * (start - end) * (1 + math.cos(math.pi * progress))
