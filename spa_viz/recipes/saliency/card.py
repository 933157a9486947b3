"""The model card (README.md) of the saliency checkpoint: ``cards/saliency.md`` filled from its
config.json and metrics.json."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from spa_viz.recipes.cards import render_card
from spa_viz.recipes.saliency.evaluate import results_table
from spa_viz.viz.tables import markdown_table

__all__ = ["comparison_verdict", "model_card"]


def comparison_verdict(held_out: Mapping[str, Any]) -> str:
    """One sentence: does the learned gate beat every training-free selector at equal keep ratio?"""
    learned = held_out["learned"]
    rivals = held_out["equal_keep"]
    best_iou = max(rivals, key=lambda name: rivals[name]["iou"])
    best_mae = min(rivals, key=lambda name: rivals[name]["saliency_mae"])
    beats = learned["iou"] > rivals[best_iou]["iou"] and learned["saliency_mae"] < rivals[best_mae]["saliency_mae"]
    return (
        f"{'the learned gate beats' if beats else 'the learned gate does NOT beat'} every training-free selector "
        f"at equal keep ratio: IoU {learned['iou']:.3f} vs {rivals[best_iou]['iou']:.3f} (best: {best_iou}), "
        f"saliency MAE {learned['saliency_mae']:.4f} vs {rivals[best_mae]['saliency_mae']:.4f} (best: {best_mae})"
    )


def model_card(config: Mapping[str, Any], metrics: Mapping[str, Any]) -> str:
    """README.md of the saliency checkpoint from its config.json (with its ``tensors`` list: the gates)
    and metrics.json."""
    held_out, training = metrics["held_out"], metrics["training"]
    spa, settings, data, labels = config["spa"], config["training"], config["data"], config["labels"]
    layers = config["spa_layers"]
    per_photo = markdown_table(
        ["photo", "keep ratio", "saliency MAE", "backbone FLOP saving", "IoU with labels"],
        [
            [
                name,
                f"{m['keep_ratio']:.3f}",
                f"{m['saliency_mae']:.4f}",
                f"{m['backbone_saving']:.3f}",
                f"{m['iou']:.3f}",
            ]
            for name, m in held_out["learned"]["per_photo"].items()
        ],
    )
    sweep_rows = held_out.get("threshold_sweep", [])
    sweep = markdown_table(
        ["threshold", "keep ratio", "saliency MAE", "backbone FLOP saving", "IoU"],
        [
            [
                r["threshold"],
                f"{r['keep_ratio']:.3f}",
                f"{r['saliency_mae']:.4f}",
                f"{r['backbone_saving']:.3f}",
                f"{r['iou']:.3f}",
            ]
            for r in sweep_rows
        ],
    )
    closest = (
        min(sweep_rows, key=lambda r: r["saliency_mae"])
        if sweep_rows
        else held_out["learned"] | {"threshold": spa["threshold"]}
    )
    oracle = held_out["label_oracle"]
    fields = {
        "name": config["name"],
        "first_layer": layers[0],
        "last_layer": layers[-1],
        "policy": spa["policy"],
        "threshold": spa["threshold"],
        "soft_gating": "on" if spa["soft_gating"] else "off",
        "num_gates": len(layers),
        "gate_parameters": sum(math.prod(shape) for shape in config["tensors"].values()) // len(layers),
        "command": config["command"],
        "threads": training["threads"],
        "selection_weight": settings["selection_weight"],
        "distill_weight": settings["distill_weight"],
        "gate_init_bias": spa["gate_init_bias"],
        "logit_step": settings["logit_step"],
        "final_lr_ratio": settings["final_lr_ratio"],
        "tau": spa["tau"],
        "steps_run": training["steps_run"],
        "select_steps": settings["select_steps"],
        "select_batch": settings["select_batch"],
        "distill_steps": settings["distill_steps"],
        "distill_batch": settings["distill_batch"],
        "label_reduce": labels["reduce"],
        "patch": labels["patch"],
        "label_threshold": labels["threshold"],
        "images": training["images"],
        "views_per_photo": data["views_per_photo"],
        "num_train_photos": len(data["train_photos"]),
        "train_photos": ", ".join(data["train_photos"]),
        "num_digits": data["num_digits"],
        "held_out": ", ".join(data["held_out"]),
        "precompute_seconds": f"{training['precompute_seconds']:.0f}",
        "precompute_cached": " (read back from the teacher cache in this run)" if training["precompute_cached"] else "",
        "train_seconds": f"{training['train_seconds']:.0f}",
        "results": results_table(held_out),
        "per_photo": per_photo,
        "sweep": sweep,
        "targets": "\n".join(f"- {name}: {'met' if ok else 'NOT met'}" for name, ok in metrics["targets"].items()),
        "verdict": comparison_verdict(held_out),
        "oracle_keep": f"{oracle['keep_ratio']:.1%}",
        "oracle_mae": f"{oracle['saliency_mae']:.4f}",
        "closest_threshold": closest["threshold"],
        "closest_keep": f"{closest['keep_ratio']:.1%}",
        "closest_mae": f"{closest['saliency_mae']:.4f}",
    }
    return render_card("saliency", fields)
