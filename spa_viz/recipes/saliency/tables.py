"""The saliency model's targets and the tables its evaluation prints and its model card shows."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from spa_viz.viz.tables import markdown_table

__all__ = ["MASK_TOLERANCE", "TARGETS", "interpolate", "meets", "peer_table", "results_table", "sweep_table"]

#: The model's targets (issue 13): first-layer keep at most, its recall at least, MAE at most,
#: backbone MACs saved at least, SPA / teacher latency at most.
TARGETS: dict[str, float] = {
    "keep_first": 0.35,
    "recall_first": 0.9,
    "mae": 0.03,
    "mac_saving": 0.45,
    "latency_ratio": 0.75,
}


#: How far below the dense teacher's max F-measure and IoU at 0.5 (against exact object masks) the
#: operating point may fall (issue 18).
MASK_TOLERANCE = 0.02


def interpolate(points: Sequence[Mapping[str, float]], gmacs: float, metric: str = "mae") -> float | None:
    """``metric`` of a curve at ``gmacs`` (linear between its measured points; None outside their range)."""
    ordered = sorted(points, key=lambda p: p["gmacs"])
    for low, high in zip(ordered, ordered[1:]):
        if low["gmacs"] <= gmacs <= high["gmacs"]:
            span = high["gmacs"] - low["gmacs"]
            weight = 0.0 if span == 0 else (gmacs - low["gmacs"]) / span
            return low[metric] + weight * (high[metric] - low[metric])
    return None


def meets(point: Mapping[str, float]) -> dict[str, bool]:
    """Which targets an operating point meets (latency only when it was measured)."""
    checks = {
        "keep_first": point["keep_first"] <= TARGETS["keep_first"],
        "recall_first": point["recall_first"] >= TARGETS["recall_first"],
        "mae": point["mae"] <= TARGETS["mae"],
        "mac_saving": point["mac_saving"] >= TARGETS["mac_saving"],
    }
    if "latency_ratio" in point:
        checks["latency_ratio"] = point["latency_ratio"] <= TARGETS["latency_ratio"]
    return checks


def peer_table(
    curves: Mapping[str, Sequence[Mapping[str, float]]], budgets: Sequence[float], metric: str = "mae"
) -> tuple[list[str], list[list[str]]]:
    """Rows of ``metric`` (``mae``, lower is better, or ``max_f``, higher) at each budget (GMACs,
    interpolated along each curve) per method; ``-`` outside a curve."""
    label, pick = ("MAE", min) if metric == "mae" else ("max F", max)
    header = ["method"] + [f"{label} at {b:.2f} GMACs" for b in budgets] + [f"best {label} (at GMACs)"]
    rows = []
    for name, points in curves.items():
        cells = [name]
        for budget in budgets:
            value = interpolate(points, budget, metric)
            cells.append("-" if value is None else f"{value:.4f}")
        best = pick(points, key=lambda p: p[metric])
        cells.append(f"{best[metric]:.4f} ({best['gmacs']:.2f})")
        rows.append(cells)
    return header, rows


def _operating_row(name: str, point: Mapping[str, Any]) -> list[str]:
    latency_cells = (
        [f"{point['spa_ms']:.0f} / {point['dense_ms']:.0f} = {point['latency_ratio']:.2f}x"]
        if "latency_ratio" in point
        else ["-"]
    )
    objects = f"{point['object_recall_first']:.3f}" if "object_recall_first" in point else "-"
    return [
        name,
        str(point["views"]),
        f"{point['keep_first']:.3f}",
        f"{point['keep_mean']:.3f}",
        f"{point['recall_first']:.3f}",
        objects,
        f"{point['mae']:.4f}",
        f"{point['mac_saving']:.3f} ({point['gmacs']:.2f} of {point['gmacs_dense']:.2f})",
        *latency_cells,
    ]


def results_table(results: Mapping[str, Any]) -> str:
    """The targets on every check at the operating threshold, then each check's sweep and peer table."""
    header = [
        "check",
        "views",
        "keep (first SPA layer)",
        "keep (mean over SPA layers)",
        "recall of teacher labels",
        "recall of object tokens",
        "saliency MAE",
        "backbone MACs saved (GMACs)",
        "latency SPA / teacher (ms, batch 1, 1 thread)",
    ]
    rows = [_operating_row(name, check["operating"]) for name, check in results["checks"].items()]
    target = results["targets"]
    text = f"At the operating threshold {results['operating_threshold']}:\n\n" + markdown_table(header, rows)
    text += (
        f"\n\nTargets: keep <= {target['keep_first']:.2f} with recall >= {target['recall_first']:.2f}, MAE <= {target['mae']:.2f}, "
        f"MACs saved >= {target['mac_saving']:.2f}, latency <= {target['latency_ratio']:.2f}x.\n"
    )
    for name in results["meets"]:
        text += (
            f"\n{name}: "
            + ", ".join(f"{k} {'met' if ok else 'NOT met'}" for k, ok in results["meets"][name].items())
            + "\n"
        )
    for name, check in results["checks"].items():
        text += f"\nThreshold sweep, {name}:\n\n" + sweep_table(check["sweep"]) + "\n"
        budget = check["operating"]["peer_subset"]["gmacs"]
        head, peer_rows = peer_table(check["peers"], [budget, check["operating"]["peer_subset"]["gmacs_dense"] * 0.6])
        text += f"\nPeers at equal compute, {name} ({check['peer_views']} views, 1 in {max(1, round(check['views'] / max(check['peer_views'], 1)))}):\n\n"
        text += markdown_table(head, peer_rows) + "\n"
        if "teacher_masks" in check:
            teacher = check["teacher_masks"]
            point = check["operating"]
            text += (
                f"\nAgainst the exact object masks, {name}: max F-measure {point['max_f']:.4f} and IoU at 0.5 "
                f"{point['iou_half']:.4f} at the operating threshold; the dense teacher {teacher['max_f']:.4f} and "
                f"{teacher['iou_half']:.4f}. Max F-measure at equal compute:\n\n"
            )
            head, peer_rows = peer_table(
                check["peers"], [budget, check["operating"]["peer_subset"]["gmacs_dense"] * 0.6], metric="max_f"
            )
            text += markdown_table(head, peer_rows) + "\n"
    return text


def sweep_table(sweep: Sequence[Mapping[str, Any]]) -> str:
    header = ["threshold", "keep (first)", "keep (mean)", "recall", "MAE", "MACs saved", "latency ratio"]
    rows = [
        [
            f"{r['threshold']:g}",
            f"{r['keep_first']:.3f}",
            f"{r['keep_mean']:.3f}",
            f"{r['recall_first']:.3f}",
            f"{r['mae']:.4f}",
            f"{r['mac_saving']:.3f}",
            f"{r['latency_ratio']:.2f}x" if "latency_ratio" in r else "-",
        ]
        for r in sweep
    ]
    return markdown_table(header, rows)
