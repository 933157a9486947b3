"""compose_views: every field of Views rendered from one traced batch, consistent with the trace."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
import pytest
import torch

import spa_viz
from spa_viz.analysis.metrics import SelectionCounts
from spa_viz.viz import panels
from spa_viz.viz.tasks import adapter_for
from spa_viz.viz.views import NO_LABELS, RENDERERS, VIEW_NAMES, SelectionLabels, Views, compose_views
from tests.conftest import mixed_gate_tiny_vit

PICTURES = ("gate", "kept", "labels", "strip", "age", "predictions", "layout_picture")
FIGURES = ("layout", "macs", "histogram")


@pytest.fixture(scope="module")
def traced():
    model = mixed_gate_tiny_vit()
    task = adapter_for(model, {"task": "classification", "image_size": 32})
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    output, tr = spa_viz.trace(model, x)
    displays = [np.ascontiguousarray(task.display(image).repeat(2, 0).repeat(2, 1)) for image in x]
    return tr, displays, task, output


def test_every_field_has_a_renderer() -> None:
    assert list(RENDERERS) == list(VIEW_NAMES) and "gate" in VIEW_NAMES and "summary" in VIEW_NAMES


def test_compose_views_renders_every_view_of_the_shown_image_and_layer(traced) -> None:
    tr, displays, task, output = traced
    record = tr.layers[1]
    labels = SelectionLabels("test", {record.grid: torch.arange(record.keep.shape[1]) % 2 == 0})
    views = compose_views(
        tr, displays, task, output, dense_output=output, index=2, layer=record.layer, names=list("abc"), labels=labels
    )
    assert isinstance(views, Views)
    for name in PICTURES:
        picture = getattr(views, name)
        assert picture.dtype == np.uint8 and picture.ndim == 3 and picture.shape[2] == 3, name
    for name in ("gate", "kept", "labels"):
        assert getattr(views, name).shape[1] == displays[2].shape[1], f"{name} is drawn at the display width"
    for name in FIGURES:
        assert isinstance(getattr(views, name), go.Figure), name
    # the shown layer and image
    assert np.array_equal(views.gate, panels.gate_panel(displays[2], record, 2))
    assert np.array_equal(views.kept, panels.kept_panel(displays[2], record, 2, "c"))
    counts = SelectionCounts.of(record.keep[2], labels.by_grid[record.grid]).to_dict()
    assert (
        f"precision **{counts['precision']:.2f}**" in views.labels_text and f"layer {record.layer}" in views.labels_text
    )
    assert [caption for _, caption in views.gallery] == [
        f"{i}: {name} · {float(record.keep_ratio[i]):.0%} kept" for i, name in enumerate("abc")
    ]
    # the summary follows the trace
    summary = views.summary
    assert summary["task"] == "classification" and summary["predictions"] == task.predictions(output, 2)
    assert [layer["kept_per_image"] for layer in summary["trace"]["layers"]] == [
        t.kept_counts.tolist() for t in tr.layers
    ]
    assert [layer["score_source"] for layer in summary["trace"]["layers"]] == ["own logit"] * len(tr.layers)
    per_layer = summary["selection_labels"]["per_layer"]
    assert summary["selection_labels"]["source"] == "test" and per_layer[str(record.layer)] == counts
    assert list(per_layer) == [str(t.layer) for t in tr.layers], "every layer on the labels' grid"
    assert summary["output_vs_dense"] is None, "classification has no gap measure"


def test_without_labels_or_dense_output(traced) -> None:
    tr, displays, task, output = traced
    views = compose_views(tr, displays, task, output)
    assert views.labels is None and views.labels_text == NO_LABELS and views.summary["selection_labels"] is None
    assert views.gallery[0][1].startswith("0: image 0 · ")
    framed = compose_views(tr, displays, task, output, layer=tr.layers[0].layer, only=["strip"])
    assert views.strip.shape == framed.strip.shape and not np.array_equal(views.strip, framed.strip), (
        "layer None frames no layer in the strip"
    )


def test_only_renders_the_named_views(traced) -> None:
    tr, displays, task, output = traced
    views = compose_views(tr, displays, task, output, only=("kept", "macs"))
    assert views.kept is not None and isinstance(views.macs, go.Figure)
    assert all(getattr(views, name) is None for name in VIEW_NAMES if name not in ("kept", "macs"))
    with pytest.raises(ValueError, match="unknown views"):
        compose_views(tr, displays, task, output, only=("kept", "flops"))


def test_refuses_a_batch_that_is_not_the_traced_one(traced) -> None:
    tr, displays, task, output = traced
    with pytest.raises(ValueError, match="2 images for a traced batch of 3"):
        compose_views(tr, displays[:2], task, output)
    with pytest.raises(ValueError, match="outside the batch"):
        compose_views(tr, displays, task, output, index=3)
    with pytest.raises(ValueError, match="not an SPA layer"):
        compose_views(tr, displays, task, output, layer=0)
