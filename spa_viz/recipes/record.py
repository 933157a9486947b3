"""The record of a checkpoint: ``metrics.json`` and the model card ``README.md``, written one way.

Every recipe (CenterNet and Mask R-CNN detection, saliency) writes its checkpoint's numbers and card
through :func:`write_record`, after :func:`~spa_viz.io.checkpoint.save_checkpoint` wrote the tensors
and ``config.json``. The card is rendered from the folder's own ``config.json``, so a card always
describes the checkpoint next to it, and a test can re-render it from the two JSON files.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from spa_viz.io.checkpoint import read_config
from spa_viz.io.files import refuse_overwrite, write_text_atomic

__all__ = ["CardRenderer", "write_record"]

#: ``render(config, metrics) -> markdown``: a recipe's model card from config.json and metrics.json.
CardRenderer = Callable[[Mapping[str, Any], Mapping[str, Any]], str]


def write_record(
    folder: str | Path,
    metrics: Mapping[str, Any],
    render_card: CardRenderer | None,
    *,
    overwrite: bool = False,
    indent: int = 2,
) -> None:
    """Write ``metrics.json`` and the model card ``README.md`` of the checkpoint in ``folder``.

    The card is ``render_card(config, metrics)`` with ``config`` read from the folder's
    ``config.json``; ``render_card`` None writes ``metrics.json`` alone (a checkpoint saved before
    its evaluation, whose card needs the evaluation's numbers). Refuses to replace an existing
    record unless ``overwrite`` (a training that rewrites its own record every epoch, an evaluation
    asked to update it). The card is rendered before anything is written, and each file is replaced
    atomically. ``indent`` is the JSON indent of ``metrics.json`` (each recipe keeps its own).
    """
    folder = Path(folder)
    targets = {"metrics.json": json.dumps(metrics, indent=indent) + "\n"}
    if render_card is not None:
        targets["README.md"] = render_card(read_config(folder), metrics)
    if not overwrite:
        refuse_overwrite([folder / name for name in targets], flag="overwrite=True", where=folder)
    for name, text in targets.items():
        write_text_atomic(folder / name, text)
