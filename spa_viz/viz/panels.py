"""The panels a reader sees: titled overlays with their legends, composed once for every front end.

:func:`spa_viz.viz.views.compose_views` builds every view of the app, ``spa-viz analyze`` and the
notebooks from these functions, so a gate map, a keep mask or an attribution looks the same in the
browser, in the files the CLI writes and in the notebooks.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor

from spa_viz.analysis.metrics import SelectionCounts
from spa_viz.analysis.trace import LayerTrace, Trace
from spa_viz.viz import overlays
from spa_viz.viz.style import (
    DROPPED_COLOR,
    FN_COLOR,
    FP_COLOR,
    KEPT_COLOR,
    OKABE_ITO,
    PADDING_COLOR,
    TP_COLOR,
    image_color,
)

__all__ = [
    "age_panel",
    "attribution_panel",
    "fused_share",
    "gate_panel",
    "gate_values",
    "kept_panel",
    "labels_panel",
    "layout_panel",
    "score_source",
    "strip_panel",
]


def fused_share(record: LayerTrace, index: int | None = None) -> float | None:
    """Share of patch tokens whose selection score came from an earlier score through fusion
    (``max(own logit, incoming) > own logit``), for image ``index`` or the whole batch; None for a
    selector or a layer that fused nothing in."""
    if not record.learned or not record.fused_input:
        return None
    raw, scores = (
        (record.raw_scores, record.scores) if index is None else (record.raw_scores[index], record.scores[index])
    )
    return float((scores > raw).float().mean()) if scores.numel() else 0.0


def score_source(record: LayerTrace, index: int | None = None) -> str:
    """What a layer selected by: ``own logit``, ``fused: N% earlier`` (tokens where an earlier score won)
    or ``selector <name>``."""
    if not record.learned:
        return f"selector {record.selector}"
    share = fused_share(record, index)
    if share is None:
        return "own logit"
    return f"fused: {share:.0%} earlier" if share == 0.0 else f"fused: {max(share, 0.005):.0%} earlier"


def gate_values(record: LayerTrace, index: int) -> Tensor:
    """(gh, gw) values to draw in [0, 1]: a learned gate's keep probability ``sigmoid(s / tau)`` with the
    record's tau (what its threshold was compared with), or a selector's scores min-max normalized."""
    if record.learned:
        return torch.sigmoid(record.scores[index] / record.tau).reshape(record.grid)
    scores = record.scores[index].float()
    low, high = scores.min(), scores.max()
    return ((scores - low) / (high - low).clamp(min=1e-12)).reshape(record.grid)


def gate_panel(display: np.ndarray, record: LayerTrace, index: int) -> np.ndarray:
    """Gate scores of image ``index`` at one layer, titled, with a colour bar.

    A learned gate draws ``sigmoid(s / tau)`` of the selection score with the tokens above the
    threshold outlined (the keep rule the record ran with); a training-free selector draws its scores.
    """
    width = display.shape[1]
    values = gate_values(record, index)
    if record.learned:
        threshold, tau = record.threshold, record.tau
        picture = overlays.score_overlay(display, values, threshold=threshold)
        scaled = "s" if tau == 1.0 else f"s / {tau:g}"
        source = score_source(record, index)
        picture = overlays.add_title(
            picture,
            f"Gate score · layer {record.layer}",
            f"sigmoid({scaled}), s = {source}; outline: > {threshold:.2f}",
        )
        bar = overlays.colorbar(width, 0.0, 1.0, "keep probability", marker=threshold)
    else:
        picture = overlays.add_title(
            overlays.score_overlay(display, values),
            f"{record.selector} scores · layer {record.layer}",
            "min-max normalized per image",
        )
        bar = overlays.colorbar(width, 0.0, 1.0, "selector score (normalized)")
    return overlays.vstack([picture, bar], gap=0)


def kept_panel(display: np.ndarray, record: LayerTrace, index: int, name: str) -> np.ndarray:
    """Kept tokens of image ``index`` (``name``) at one layer: dropped ones dimmed, with a legend."""
    keep = record.keep_map(index)
    kept, total = int(keep.sum()), keep.numel()
    picture = overlays.add_title(
        overlays.keep_overlay(display, keep),
        f"Kept tokens · layer {record.layer}",
        f"{kept} of {total} ({kept / total:.0%}) · {name}",
    )
    legend = overlays.legend(display.shape[1], [(KEPT_COLOR, "kept (outline)"), (DROPPED_COLOR, "dropped (dimmed)")])
    return overlays.vstack([picture, legend], gap=0)


def labels_panel(display: np.ndarray, record: LayerTrace, index: int, labels: Tensor) -> np.ndarray:
    """Kept tokens vs selection ``labels`` (N,) of image ``index``: hits, false keeps and misses, with the scores."""
    counts = SelectionCounts.of(record.keep[index], labels)
    picture = overlays.add_title(
        overlays.selection_overlay(display, record.keep_map(index), labels.reshape(record.grid)),
        f"Selection labels vs kept · layer {record.layer}",
        f"precision {float(counts.precision):.2f} · recall {float(counts.recall):.2f} · IoU {float(counts.iou):.2f}",
    )
    legend = overlays.legend(
        display.shape[1],
        [(TP_COLOR, "kept, labelled"), (FP_COLOR, "kept, not labelled"), (FN_COLOR, "dropped, labelled")],
    )
    return overlays.vstack([picture, legend], gap=0)


def strip_panel(
    display: np.ndarray, layers: list[LayerTrace], index: int, name: str, highlight: int | None = None
) -> np.ndarray:
    """Kept tokens of image ``index`` at every SPA layer, the ``highlight`` layer framed; under each
    layer's title, what it selected by (:func:`score_source`)."""
    captions = [score_source(record, index) for record in layers]
    learned = [record for record in layers if record.learned]
    how = f"score source (fusion: {learned[0].fusion})" if learned else "selector"
    return overlays.add_title(
        overlays.layer_strip(display, layers, index, highlight=highlight, captions=captions),
        f"Every SPA layer · {name}",
        f"kept tokens and {how}" + ("" if highlight is None else " · red frame: layer above"),
    )


def attribution_panel(display: np.ndarray, values: Tensor | np.ndarray, title: str, explains: str) -> np.ndarray:
    """A per-token attribution map over the image, titled with what it explains, with a legend."""
    picture = overlays.add_title(overlays.attribution_overlay(display, values), title, f"explains: {explains}")
    legend = overlays.legend(
        display.shape[1], [(OKABE_ITO["vermillion"], "raises the output"), (OKABE_ITO["blue"], "lowers it")]
    )
    return overlays.vstack([picture, legend], gap=0)


def layout_panel(record: LayerTrace, cell: int = 14, min_width: int = 360) -> np.ndarray:
    """The packed layout of one SPA layer as a picture, in the colours of ``packed_layout_figure``.

    One row per packed row, one cell per slot coloured by its image; padding crossed out, prefix
    tokens dotted. For files, where an interactive figure cannot go.
    """
    plan = record.plan
    slot_image, slot_token = plan.slot_image.numpy(), plan.slot_token.numpy()
    rows, length = slot_image.shape
    canvas = Image.new("RGB", (length * cell + 2, rows * (cell + 3) + 2), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for r in range(rows):
        for c in range(length):
            x0, y0 = 1 + c * cell, 1 + r * (cell + 3)
            box = [x0, y0, x0 + cell - 2, y0 + cell - 1]
            image = int(slot_image[r, c])
            draw.rectangle(box, fill=PADDING_COLOR if image < 0 else image_color(image))
            if image < 0:
                draw.line(box, fill=(68, 68, 68), width=2)
                draw.line([box[0], box[3], box[2], box[1]], fill=(68, 68, 68), width=2)
            elif slot_token[r, c] < record.num_prefix:
                draw.ellipse([x0 + 3, y0 + 3, x0 + cell - 5, y0 + cell - 4], fill=(255, 255, 255), outline=(0, 0, 0))
    subtitle = (
        f"{rows} row(s) x {length} slots · fill {plan.fill_ratio:.1%} · "
        f"{plan.num_slots - plan.num_kept} padding slots (crossed) · prefix tokens dotted"
    )
    picture = np.asarray(canvas)
    if picture.shape[1] < min_width:
        picture = np.pad(picture, ((0, 0), (0, min_width - picture.shape[1]), (0, 0)), constant_values=255)
    return overlays.add_title(picture, f"Packed batch · layer {record.layer} · {plan.policy} policy", subtitle)


def age_panel(
    display: np.ndarray,
    trace: Trace,
    index: int,
    name: str,
    difference: tuple[Tensor, str] | None = None,
    panel_size: int = 160,
) -> np.ndarray:
    """Token age of image ``index``: after every SPA layer and at the backbone output, how many SPA
    layers ago each token was last updated (0 = current), beside |SPA - dense| of the model's output.

    ``difference``: the (h, w) map and what it is of (:meth:`~spa_viz.viz.tasks.TaskAdapter.output_difference`).
    """
    ages = trace.token_ages()
    if not ages:
        raise ValueError("no SPA layers to draw")
    output_age = trace.output_age(ages)
    oldest = max(int(max(age[index].max() for age in ages)), 1)
    small = np.ascontiguousarray(
        np.asarray(Image.fromarray(display).resize((panel_size, panel_size), Image.Resampling.BILINEAR))
    )
    size = max(12, panel_size // 9)
    tiles = []
    for record, age in zip(trace.layers, ages, strict=True):
        mean = float(age[index].float().mean())
        stale = float(record.stale[index].float().mean())
        tile = overlays.age_overlay(small, age[index].reshape(record.grid), oldest)
        tiles.append(overlays.add_title(tile, f"L{record.layer} · age {mean:.1f}", f"{stale:.0%} stale", size=size))
    grid = trace.layers[-1].grid
    out_age = output_age[index]
    note = "dense tail refreshed all" if trace.dense_after else f"{float((out_age > 0).float().mean()):.0%} not current"
    tile = overlays.age_overlay(small, out_age.reshape(grid), oldest)
    tiles.append(overlays.add_title(tile, f"output · age {float(out_age.float().mean()):.1f}", note, size=size))
    if difference is not None:
        values, what = difference
        limit = max(float(values.max()), 1e-6)
        heat = overlays.score_overlay(small, values.float(), vmax=limit, alpha=0.75, cmap="magma")
        tiles.append(overlays.add_title(heat, "|SPA - dense|", f"{what}: mean {float(values.mean()):.3f}", size=size))
    rows = [overlays.hstack(tiles[i : i + 8]) for i in range(0, len(tiles), 8)]
    unkept = trace.layers[0].unkept
    picture = overlays.add_title(
        overlays.vstack(rows),
        f"Token age · {name}",
        f"SPA layers since each token was last updated (unkept = {unkept}); darker = older",
    )
    bar = overlays.colorbar(
        picture.shape[1], 0.0, float(oldest), "layers since the last update", cmap=overlays.AGE_CMAP
    )
    return overlays.vstack([picture, bar], gap=0)
