"""Which way the task loss alone pushes the gates: the measurement behind the no-``L_select`` ablations.

``spa-viz evaluate gate-probe --config configs/NAME.json`` builds the recipe's model (fresh gates at
its ``gate_init_bias``, weights from ``init_from``) in training mode and, for each ``unkept`` path,
runs a few training batches with the *task loss only* (no ``L_select``, no optimizer step). Per SPA
layer it records the gradient on each gate's bias and, per token, the sign of the gradient on the
selection score ``s``: gradient descent moves ``s`` against it, so a negative gradient pushes the
token towards *keep*. Kept and unkept tokens are counted apart: with ``unkept="copy"`` an unkept
token's score receives exactly zero from the task loss, so only kept tokens speak and a gate hears
"open" whenever the kept tokens' updates help; the paths where the task loss reaches every gate
logit add what the unkept tokens say.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from spa_viz.layers.block import find_context
from spa_viz.layers.config import UNKEPT_MODES
from spa_viz.models.spa_vit import configure, spa_blocks
from spa_viz.recipes.detection.config import load_config
from spa_viz.recipes.detection.train import build_model
from spa_viz.viz.tables import markdown_table

__all__ = ["GateSignal", "format_probe", "main", "probe_gates"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GateSignal:
    """One SPA layer under one unkept path, over the probe's batches: what the task loss says."""

    unkept: str
    layer: int
    keep: float
    """Share of tokens kept (training-mode Gumbel selection)."""
    bias_grad: float
    """Mean gradient of the task loss on the gate's bias (negative: descent opens the gate)."""
    bias_open_share: float
    """Share of batches whose bias gradient was negative."""
    kept_open_share: float
    """Share of kept tokens whose score gradient is negative (descent raises their score)."""
    unkept_open_share: float | None
    """The same for unkept tokens (None: every token was kept)."""
    unkept_zero_share: float | None
    """Share of unkept tokens whose score gradient is exactly zero (the task loss does not reach them)."""


def _share(values: Tensor) -> float | None:
    return None if values.numel() == 0 else float(values.float().mean())


def probe_gates(
    config_path: Path,
    paths: Sequence[str] = UNKEPT_MODES,
    batches: int = 8,
    batch_size: int = 32,
    seed: int = 0,
) -> list[GateSignal]:
    """The task loss's push on every gate of the recipe's freshly built model, per unkept path."""
    from spa_viz.data.coco import collate
    from spa_viz.data.splits import load_split

    recipe = load_config(config_path)
    image_size = int(recipe.image_size)
    dataset = load_split(recipe.data, "train", image_size, num=batches * batch_size)
    signals: list[GateSignal] = []
    for path in paths:
        torch.manual_seed(seed)
        model = build_model(recipe).train()
        configure(model, unkept=path)
        ctx = find_context(model)
        per_layer: dict[int, dict[str, list[Any]]] = {}
        for start in range(0, batches * batch_size, batch_size):
            images, targets = collate([dataset[i] for i in range(start, start + batch_size)])
            outputs = model(images)
            task = model.loss(outputs, targets)["task"]
            gates, blocks = ctx.gates, spa_blocks(model)
            grads = torch.autograd.grad(task, [g.fused for g in gates] + [b.gate.proj.bias for b in blocks])
            score_grads, bias_grads = grads[: len(gates)], grads[len(gates) :]
            for gate, grad, bias_grad in zip(gates, score_grads, bias_grads, strict=True):
                stats = per_layer.setdefault(gate.layer, {k: [] for k in ("keep", "bias", "kept", "unkept", "zero")})
                kept = gate.keep
                stats["keep"].append(float(kept.float().mean()))
                stats["bias"].append(float(bias_grad))
                stats["kept"].append(grad[kept] < 0)
                stats["unkept"].append(grad[~kept] < 0)
                stats["zero"].append(grad[~kept] == 0)
        for layer, stats in sorted(per_layer.items()):
            signals.append(
                GateSignal(
                    unkept=path,
                    layer=layer,
                    keep=statistics.fmean(stats["keep"]),
                    bias_grad=statistics.fmean(stats["bias"]),
                    bias_open_share=statistics.fmean(float(b < 0) for b in stats["bias"]),
                    kept_open_share=_share(torch.cat(stats["kept"])) or 0.0,
                    unkept_open_share=_share(torch.cat(stats["unkept"])),
                    unkept_zero_share=_share(torch.cat(stats["zero"])),
                )
            )
        log.info("probed %s under unkept=%s on %d batches", recipe.name, path, batches)
    return signals


def format_probe(signals: Sequence[GateSignal]) -> str:
    """A markdown table of the probe (shares as percentages)."""

    def pct(value: float | None) -> str:
        return "-" if value is None else f"{value:.0%}"

    rows = [
        [
            s.unkept,
            str(s.layer),
            f"{s.keep:.2f}",
            f"{s.bias_grad:+.2e}",
            pct(s.bias_open_share),
            pct(s.kept_open_share),
            pct(s.unkept_open_share),
            pct(s.unkept_zero_share),
        ]
        for s in signals
    ]
    header = [
        "unkept",
        "layer",
        "keep",
        "bias gradient (mean)",
        "batches pushing the bias open",
        "kept tokens pushed to keep",
        "unkept tokens pushed to keep",
        "unkept tokens with zero gradient",
    ]
    return markdown_table(header, rows)


def main(argv: Sequence[str] | None = None) -> list[GateSignal]:
    """CLI: ``spa-viz evaluate gate-probe --config configs/NAME.json [--batches 8] [--json out.json]``."""
    parser = argparse.ArgumentParser(prog="spa-viz evaluate gate-probe", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, required=True, help="a detection recipe (configs/*.json)")
    parser.add_argument("--unkept", nargs="+", choices=UNKEPT_MODES, default=list(UNKEPT_MODES))
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None, help="also write the signals here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    signals = probe_gates(args.config, args.unkept, args.batches, args.batch_size)
    print(format_probe(signals))
    if args.json is not None:
        args.json.write_text(json.dumps([asdict(s) for s in signals], indent=2) + "\n")
    return signals


if __name__ == "__main__":
    main()
