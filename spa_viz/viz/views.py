"""Every view of one image at one SPA layer, composed in one place for the app, ``spa-viz analyze`` and
the notebooks.

A view is one field of :class:`Views` and one renderer in :data:`RENDERERS` (drawn from a
:class:`Scene`: the trace, the batch's images, the task adapter and the outputs); front ends show
the fields by name (the app maps each field to a component, the CLI to a file name), so adding a
view is one field, one renderer and one component.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import plotly.graph_objects as go
from torch import Tensor

from spa_viz.analysis.metrics import SelectionCounts
from spa_viz.analysis.trace import LayerTrace, Trace
from spa_viz.viz import figures, overlays, panels
from spa_viz.viz.tasks import TaskAdapter

__all__ = ["NO_LABELS", "RENDERERS", "VIEW_NAMES", "Scene", "SelectionLabels", "Views", "compose_views"]

NO_LABELS = (
    "No selection labels for this image (they exist for the digit examples, and come from the dense "
    "teacher for saliency models)."
)
"""The labels text of an image without selection labels."""


@dataclass(frozen=True)
class SelectionLabels:
    """Which tokens of one image should be kept, per token grid of the model, and where that comes from."""

    source: str
    by_grid: Mapping[tuple[int, int], Tensor]
    """(N,) bool labels of the image's tokens, per (gh, gw) grid of its SPA layers."""


@dataclass(frozen=True)
class Scene:
    """What the views are drawn from: a traced batch, and the image and SPA layer to show."""

    trace: Trace
    images: Sequence[np.ndarray]
    """The batch as the model saw it (:meth:`TaskAdapter.display`), each (H, W, 3) uint8 at display size."""
    task: TaskAdapter
    output: Any
    """The SPA model's output for the batch (on the CPU)."""
    dense_output: Any | None
    """The dense twin's output for the batch, or None (no |SPA - dense| map, no side-by-side detections)."""
    index: int
    record: LayerTrace
    names: Sequence[str]
    truth: Tensor | None
    """Ground-truth xyxy boxes of the shown image in input pixels, drawn under detections."""
    labels: SelectionLabels | None
    highlight: int | None
    """The SPA layer framed in the strip of every layer (None: none framed)."""

    @property
    def image(self) -> np.ndarray:
        return self.images[self.index]

    @property
    def name(self) -> str:
        return self.names[self.index]

    @property
    def numbered_names(self) -> list[str]:
        """``"i: name"`` of every image of the batch (the layout's hover text and the gallery's captions)."""
        return [f"{i}: {name}" for i, name in enumerate(self.names)]


@dataclass(frozen=True)
class Views:
    """Every view of one image at one SPA layer: pictures as (H, W, 3) uint8 arrays, plotly figures,
    markdown text and a JSON-ready summary.

    A field is None when it was not asked for (``only`` of :func:`compose_views`) or does not exist
    for this image (``labels`` without selection labels).
    """

    gate: np.ndarray | None = None
    """Gate scores (or a selector's scores) at the shown layer, the keep rule outlined."""
    kept: np.ndarray | None = None
    """Kept and dropped tokens at the shown layer."""
    labels: np.ndarray | None = None
    """Kept tokens vs the selection labels at the shown layer."""
    labels_text: str | None = None
    """Precision, recall and IoU of the kept tokens vs the selection labels (markdown)."""
    strip: np.ndarray | None = None
    """Kept tokens at every SPA layer, with what each selected by."""
    age: np.ndarray | None = None
    """Token age after every SPA layer and at the output, beside |SPA - dense| of the output."""
    predictions: np.ndarray | None = None
    """The predictions; detectors show SPA's and the dense twin's side by side."""
    layout: go.Figure | None = None
    """The packed batch at the shown layer (interactive)."""
    layout_picture: np.ndarray | None = None
    """The packed batch at the shown layer as a picture (for files)."""
    macs: go.Figure | None = None
    """Backbone MACs per layer, dense vs SPA (the same for every layer and image of a trace)."""
    histogram: go.Figure | None = None
    """Kept tokens per image at the shown layer (one image: per layer)."""
    gallery: list[tuple[np.ndarray, str]] | None = None
    """Every image of the batch with its kept share at the shown layer."""
    summary: dict[str, Any] | None = None
    """JSON of the image: task, predictions, output vs the dense twin, selection-label metrics per
    layer, and the trace summary with each layer's score source."""


def _gate(scene: Scene) -> np.ndarray:
    return panels.gate_panel(scene.image, scene.record, scene.index)


def _kept(scene: Scene) -> np.ndarray:
    return panels.kept_panel(scene.image, scene.record, scene.index, scene.name)


def _labels(scene: Scene) -> np.ndarray | None:
    if scene.labels is None:
        return None
    return panels.labels_panel(scene.image, scene.record, scene.index, scene.labels.by_grid[scene.record.grid])


def _labels_text(scene: Scene) -> str:
    if scene.labels is None:
        return NO_LABELS
    record = scene.record
    m = SelectionCounts.of(record.keep[scene.index], scene.labels.by_grid[record.grid]).to_dict()
    return (
        f"**Selection labels** ({scene.labels.source}) at layer {record.layer}: precision **{m['precision']:.2f}**, "
        f"recall **{m['recall']:.2f}**, IoU **{m['iou']:.2f}** (TP {m['tp']}, FP {m['fp']}, FN {m['fn']}). "
        "White outline: label-positive tokens."
    )


def _strip(scene: Scene) -> np.ndarray:
    return panels.strip_panel(scene.image, scene.trace.layers, scene.index, scene.name, highlight=scene.highlight)


def _age(scene: Scene) -> np.ndarray:
    difference = (
        None
        if scene.dense_output is None
        else scene.task.output_difference(scene.output, scene.dense_output, scene.index)
    )
    return panels.age_panel(scene.image, scene.trace, scene.index, scene.name, difference)


def _predictions(scene: Scene) -> np.ndarray:
    task = scene.task
    drawn = task.draw(scene.image, scene.output, scene.index, scene.truth)
    if task.task != "detection" or scene.dense_output is None:
        return drawn
    dense = task.draw(scene.image, scene.dense_output, scene.index, scene.truth)
    return overlays.hstack([overlays.add_title(drawn, "SPA"), overlays.add_title(dense, "dense twin")])


def _layout(scene: Scene) -> go.Figure:
    record = scene.record
    return figures.packed_layout_figure(
        record.plan,
        grid=record.grid,
        num_prefix=record.num_prefix,
        scores=record.soft_gate if record.learned else record.scores,
        image_names=scene.numbered_names,
    )


def _layout_picture(scene: Scene) -> np.ndarray:
    return panels.layout_panel(scene.record)


def _macs(scene: Scene) -> go.Figure:
    return figures.macs_figure(scene.trace)


def _histogram(scene: Scene) -> go.Figure:
    return figures.kept_histogram_figure(scene.trace, scene.record.layer)


def _gallery(scene: Scene) -> list[tuple[np.ndarray, str]]:
    ratios = scene.record.keep_ratio
    return [
        (image, f"{name} · {float(ratios[i]):.0%} kept")
        for i, (image, name) in enumerate(zip(scene.images, scene.numbered_names, strict=True))
    ]


def _summary(scene: Scene) -> dict[str, Any]:
    trace, task, index = scene.trace, scene.task, scene.index
    trace_summary = trace.summary()
    for layer_summary, record in zip(trace_summary["layers"], trace.layers, strict=True):
        share = panels.fused_share(record)
        # what selection used: a selector, the gate's own logit, or a score an earlier one was fused into
        # (share: tokens where the earlier score won)
        layer_summary["score_source"] = "selector" if not record.learned else "own logit" if share is None else "fused"
        layer_summary["fused_share"] = None if share is None else round(share, 4)
    gap = None if scene.dense_output is None else task.output_gap(scene.output, scene.dense_output, index)
    labels = scene.labels
    return {
        "task": task.task,
        "predictions": task.predictions(scene.output, index),
        "output_vs_dense": None if gap is None else {"measure": gap[0], "value": round(gap[1], 5)},
        "selection_labels": None
        if labels is None
        else {
            "source": labels.source,
            "per_layer": {
                str(t.layer): SelectionCounts.of(t.keep[index], labels.by_grid[t.grid]).to_dict() for t in trace.layers
            },
        },
        "trace": trace_summary,
    }


RENDERERS: dict[str, Callable[[Scene], Any]] = {
    "gate": _gate,
    "kept": _kept,
    "labels": _labels,
    "labels_text": _labels_text,
    "strip": _strip,
    "age": _age,
    "predictions": _predictions,
    "layout": _layout,
    "layout_picture": _layout_picture,
    "macs": _macs,
    "histogram": _histogram,
    "gallery": _gallery,
    "summary": _summary,
}
"""The renderer of each field of :class:`Views`."""
VIEW_NAMES: tuple[str, ...] = tuple(f.name for f in fields(Views))


def compose_views(
    trace: Trace,
    images: Sequence[np.ndarray],
    task: TaskAdapter,
    output: Any,
    *,
    dense_output: Any | None = None,
    index: int = 0,
    layer: int | None = None,
    names: Sequence[str] | None = None,
    truth: Tensor | None = None,
    labels: SelectionLabels | None = None,
    only: Collection[str] | None = None,
) -> Views:
    """The views of image ``index`` of a traced batch at SPA layer ``layer``.

    ``images``: the batch as the model saw it, at display size; ``names``: one per image (default
    ``image i``); ``layer`` None shows the first SPA layer and frames none in the strip; ``only``
    renders just the named views (the others stay None), e.g. the per-layer files of the CLI.
    """
    if not trace.layers:
        raise ValueError("the trace has no SPA layer to show")
    if len(images) != trace.batch_size:
        raise ValueError(f"got {len(images)} images for a traced batch of {trace.batch_size}")
    if not 0 <= index < trace.batch_size:
        raise ValueError(f"image index {index} is outside the batch of {trace.batch_size}")
    wanted = VIEW_NAMES if only is None else tuple(only)
    unknown = sorted(set(wanted) - set(VIEW_NAMES))
    if unknown:
        raise ValueError(f"unknown views {unknown}; views: {list(VIEW_NAMES)}")
    scene = Scene(
        trace=trace,
        images=images,
        task=task,
        output=output,
        dense_output=dense_output,
        index=index,
        record=trace.layers[0] if layer is None else trace.layer(layer),
        names=list(names) if names is not None else [f"image {i}" for i in range(len(images))],
        truth=truth,
        labels=labels,
        highlight=layer,
    )
    return Views(**{name: RENDERERS[name](scene) for name in VIEW_NAMES if name in wanted})
