"""The model card (README.md) of a detection checkpoint: ``cards/detection*.md`` (CenterNet detectors) or
``cards/mask_rcnn*.md`` (Mask R-CNN) filled from its config.json and metrics.json."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from spa_viz.models.detection.mask_rcnn import MASK_RCNN_ARCHITECTURES
from spa_viz.recipes.cards import fmt, render_card
from spa_viz.viz.tables import markdown_table

__all__ = ["model_card"]


def _results_fields(test: Mapping[str, Any], accuracy: list[tuple[str, str]]) -> dict[str, Any]:
    """The results section's fields: one table row of ``accuracy`` (header, value) pairs followed by the
    keep ratio, backbone MACs and wall-clock; the per-layer table; how the wall-clock was measured."""
    keep, latency = test["keep_ratio"], test.get("latency", {})
    columns = [
        *accuracy,
        (
            "keep ratio mean (p10/p50/p90)",
            f"{keep['mean']:.3f} ({keep['p10']:.3f}/{keep['p50']:.3f}/{keep['p90']:.3f})",
        ),
        ("backbone GMACs/img dense -> run", f"{test['backbone_gmacs_dense']:.4f} -> {test['backbone_gmacs_run']:.4f}"),
        ("MAC saving", f"{100 * test['mac_saving']:.1f}%"),
        ("ms/img dense", fmt(latency.get("dense_ms_per_image"), 2)),
        ("ms/img SPA", fmt(latency.get("spa_ms_per_image"), 2)),
    ]
    return {
        "num_images": test["num_images"],
        "table": markdown_table([name for name, _ in columns], [[value for _, value in columns]]),
        "layers": _layer_table(test),
        "batch": latency.get("batch"),
        "threads": latency.get("threads"),
        "device": latency.get("device", "cpu"),
    }


def _results(test: Mapping[str, Any]) -> str:
    fields = _results_fields(test, [("AP50", f"{test['AP50']:.4f}"), ("AP", f"{test['AP']:.4f}")])
    return render_card("detection_results", fields) + "\n"


def _learning_curve(history: list[Mapping[str, Any]], masks: bool = False) -> str:
    rows = []
    for h in history:
        keep_train = h.get("keep_ratio_train") or {}
        mean_keep = sum(keep_train.values()) / len(keep_train) if keep_train else None
        rows.append(
            [
                f"{h['epoch']}{'' if h['complete'] else ' (part)'}",
                fmt(h.get("loss_task")),
                fmt(h.get("loss_select")),
                fmt(mean_keep),
                fmt(h.get("val_AP50")),
                *([fmt(h.get("val_mask_AP50"))] if masks else []),
                fmt(h.get("val_keep_ratio")),
                fmt(h.get("elapsed_min"), 1),
            ]
        )
    header = [
        "epoch",
        "L_task",
        "L_select",
        "train keep",
        "val box AP50" if masks else "val AP50",
        *(["val mask AP50"] if masks else []),
        "val keep",
        "min",
    ]
    return render_card("detection_curve", {"table": markdown_table(header, rows)}) + "\n"


def _layer_table(test: Mapping[str, Any]) -> str:
    if not test.get("layers"):
        return ""
    rows = [
        [
            k,
            f"{v['keep_ratio']:.3f}",
            f"{v['label_ratio']:.3f}",
            f"{v['precision']:.3f}",
            f"{v['recall']:.3f}",
            f"{v['iou']:.3f}",
            fmt(v.get("iou_with_previous_layer")),
        ]
        for k, v in test["layers"].items()
    ]
    header = ["layer", "keep", "label share", "precision", "recall", "IoU", "IoU with the layer before"]
    table = markdown_table(header, rows)
    return render_card("detection_layers", {"table": table}) + "\n"


def _mask_rcnn_results(test: Mapping[str, Any]) -> str:
    accuracy = [
        ("box AP50", fmt(test["AP50"], 4)),
        ("box AP", fmt(test["AP"], 4)),
        ("mask AP50", fmt(test.get("mask_AP50"), 4)),
        ("mask AP", fmt(test.get("mask_AP"), 4)),
    ]
    return render_card("mask_rcnn_results", _results_fields(test, accuracy)) + "\n"


def _mask_rcnn_card(config: Mapping[str, Any], metrics: Mapping[str, Any], command: str) -> str:
    backbone = config["backbone"]
    spa = backbone.get("spa") or backbone.get("timm_kwargs", {}).get("spa", {})
    enabled = spa.get("enabled", True)
    machine = metrics.get("machine", {})
    fields = {
        "name": config["name"],
        "description": config.get("description") or "",
        "twin_note": "SPA is on: stages/blocks past the start are SPA blocks with learned gates."
        if enabled
        else "SPA is disabled: this is the dense twin (every block computes on every token; for SPT, Swin exactly).",
        "command": command or f"spa-viz train detection --config configs/{config['name']}.json",
        "architecture": config["architecture"],
        "timm_name": backbone["timm_name"],
        "timm_kwargs": json.dumps({k: v for k, v in backbone.get("timm_kwargs", {}).items() if k != "spa"}),
        "enabled": enabled,
        "threshold": spa.get("threshold"),
        "policy": spa.get("policy"),
        "container_len": spa.get("container_len"),
        "start_layer": spa.get("start_layer", "(SPT stages)"),
        **_v3_fields(spa),
        "head": json.dumps(config.get("head", {})),
        "transform": json.dumps(config.get("transform", {})),
        "init_from": config.get("init_from") or "scratch (random init)",
        "init_backbone_from": config.get("init_backbone_from") or "-",
        "recipe": json.dumps(config["train"]),
        "data": json.dumps(config["data"]),
        "results": _mask_rcnn_results(metrics["test"]) if metrics.get("test") else "",
        "learning_curve": _learning_curve(metrics["history"], masks=True) if metrics.get("history") else "",
        "status": metrics.get("status"),
        "device_note": f"{machine.get('device', 'cpu')} ({machine.get('threads', '?')} torch threads)",
    }
    return render_card("mask_rcnn", fields)


def _v3_fields(spa: Mapping[str, Any]) -> dict[str, Any]:
    """What unkept tokens become and where soft gating acts (configs saved before v3: copy, bool)."""
    soft = spa.get("soft_gating", True)
    return {
        "unkept": spa.get("unkept", "copy"),
        "soft_gating": ("always" if soft else "off") if isinstance(soft, bool) else soft,
    }


def model_card(config: Mapping[str, Any], metrics: Mapping[str, Any], command: str | None = None) -> str:
    """README.md of a detection checkpoint: what it is, how it was made (exact command), what it scores.

    ``config`` is the checkpoint's config.json, ``metrics`` its metrics.json; ``command`` defaults to
    the training command metrics.json records (the card renderer of
    :func:`~spa_viz.recipes.record.write_record`).
    """
    command = metrics.get("command", "") if command is None else command
    if config["architecture"] in MASK_RCNN_ARCHITECTURES:
        return _mask_rcnn_card(config, metrics, command)
    backbone = config["backbone"]
    spa = backbone.get("spa") or backbone.get("timm_kwargs", {}).get("spa", {})
    stem = backbone.get("stem")
    fields = {
        "name": config["name"],
        "description": config.get("description") or "",
        "command": command or f"spa-viz train detection --config configs/{config['name']}.json",
        "architecture": config["architecture"],
        "timm_name": backbone["timm_name"],
        "timm_kwargs": json.dumps(backbone.get("timm_kwargs", {})),
        "stem": f"- patch embedding: conv stem of widths {stem} (`ConvStemEmbed`) + 1x1 projection\n" if stem else "",
        "enabled": spa.get("enabled"),
        "threshold": spa.get("threshold"),
        "policy": spa.get("policy"),
        "start_layer": spa.get("start_layer", "(SPT stages)"),
        **_v3_fields(spa),
        "image_size": config["image_size"],
        "canvas_size": config["data"].get("canvas_size", "?"),
        "init_from": config.get("init_from") or "scratch (random init)",
        "recipe": json.dumps(config["train"]),
        "data": json.dumps(config["data"]),
        "results": _results(metrics["test"]) if metrics.get("test") else "",
        "learning_curve": _learning_curve(metrics["history"]) if metrics.get("history") else "",
        "status": metrics.get("status"),
    }
    return render_card("detection", fields)
