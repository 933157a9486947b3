"""The app's logic without any UI: load inputs, run (cached) forward passes, render every view.

Speed: decoded images, preprocessed inputs, SPA forward passes (per model, images and the settings
that change the forward) and dense forward passes (per model and images: the dense twin ignores
SPA settings) are LRU-cached. Moving the layer slider or picking another image of the batch only
re-renders; changing the threshold re-runs the SPA forward only.

Every user-facing problem raises :class:`UserError` with a message to show; problems with single
files of a batch become ``warnings`` of the result while the rest is analysed.
"""

from __future__ import annotations

import io
import json
import logging
import shutil
import tempfile
import threading
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import cv2
import numpy as np
import plotly.graph_objects as go
import torch
from PIL import Image
from torch import Tensor

import spa_viz
from app.examples import Examples
from app.models import LoadedModel, ModelError, ModelRegistry, selector_amount, selector_names
from app.settings import AppSettings
from spa_viz.analysis import attribution
from spa_viz.analysis.metrics import SelectionCounts
from spa_viz.analysis.trace import LayerTrace, Trace
from spa_viz.io.checkpoint import CheckpointError
from spa_viz.io.images import ImageInputError, InputImage, load_image
from spa_viz.io.timer import stopwatch
from spa_viz.models.saliency.labels import SALIENT
from spa_viz.models.twin import dense_twin
from spa_viz.selection.labels import labels_from_masks
from spa_viz.selection.selectors import SELECTORS, install_selector, remove_selector
from spa_viz.viz import figures, panels

__all__ = ["Analysis", "AnalysisService", "AttributionView", "SPASettings", "UserError"]

_log = logging.getLogger(__name__)
K = TypeVar("K", bound=Hashable)
V = TypeVar("V")
Progress = Callable[[float, str], None]


class UserError(ValueError):
    """A request the app cannot serve as given; the message is shown to the user as is."""


class LRUCache(Generic[K, V]):
    """A thread-safe dict that forgets its least recently used entries beyond ``capacity``."""

    def __init__(self, capacity: int) -> None:
        self.capacity = max(1, capacity)
        self._data: OrderedDict[K, V] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: K) -> V | None:
        with self._lock:
            if key not in self._data:
                return None
            self._data.move_to_end(key)
            return self._data[key]

    def put(self, key: K, value: V) -> V:
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self.capacity:
                self._data.popitem(last=False)
        return value


@dataclass(frozen=True)
class SPASettings:
    """The inference settings that change an SPA forward pass.

    ``selector`` None runs the model's learned gates (with ``threshold``); a name of
    :data:`~spa_viz.selection.selectors.SELECTORS` runs that training-free selector, keeping
    ``selector_amount`` (its ratio or p, see :func:`app.models.selector_amount`).
    """

    selector: str | None = None
    selector_amount: float = 0.5
    threshold: float = 0.5
    policy: str = "image"
    container_len: int = 49

    def key(self) -> tuple[Any, ...]:
        """Cache key: only what matters for the chosen selector and policy."""
        gate = (None, round(self.threshold, 4)) if self.selector is None else (self.selector, round(self.selector_amount, 4))
        return (*gate, self.policy, self.container_len if self.policy == "container" else None)


@dataclass
class _Prepared:
    """A batch as one model sees it."""

    images: list[InputImage]
    inputs: Tensor  # (B, 3, h, w), CPU
    displays: list[np.ndarray]  # the model's view of each image, display_size square, uint8
    warnings: list[str]

    @property
    def digests(self) -> tuple[str, ...]:
        return tuple(i.digest for i in self.images)


@dataclass
class _Dense:
    """A dense-twin forward pass: output on the CPU and its wall-clock."""

    output: Any
    seconds: float


@dataclass
class _Sparse(_Dense):
    """An SPA forward pass, with its trace and its FLOP figure (the same for every layer and image)."""

    trace: Trace
    macs_figure: go.Figure | None = None


@dataclass
class Analysis:
    """Every view of one analysis, ready for any front end (numpy images, plotly figures, text)."""

    gate: np.ndarray
    kept: np.ndarray
    labels: np.ndarray | None
    labels_text: str
    strip: np.ndarray
    predictions: np.ndarray
    layout: go.Figure
    flops: go.Figure
    histogram: go.Figure
    stats: str
    status: str
    summary: dict[str, Any]
    gallery: list[tuple[np.ndarray, str]]
    warnings: list[str] = field(default_factory=list)


@dataclass
class AttributionView:
    """An attribution map drawn over the image, with what it explains and what it cost."""

    image: np.ndarray
    text: str
    info: dict[str, Any]


def _to_cpu(output: Any) -> Any:
    if isinstance(output, Tensor):
        return output.detach().cpu()
    if isinstance(output, dict):
        return {k: _to_cpu(v) for k, v in output.items()}
    if isinstance(output, (list, tuple)):
        return type(output)(_to_cpu(v) for v in output)
    return output


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"


def _change(saving: float) -> str:
    """A saving share as words: 'saving 12.3%', 'overhead 4.0%' or 'no change' (never '-0.0%')."""
    if abs(saving) < 0.0005:
        return "no change"
    return f"saving {saving:.1%}" if saving > 0 else f"overhead {-saving:.1%}"


class AnalysisService:
    """Loads inputs and models, runs and caches forward passes, and renders the views."""

    def __init__(
        self, settings: AppSettings, registry: ModelRegistry | None = None, examples: Examples | None = None
    ) -> None:
        self.settings = settings
        self.device = settings.torch_device
        self.registry = registry or ModelRegistry(self.device, settings.allow_dirs, settings.model_cache_size)
        self.annotations = examples.annotations if examples is not None else {}
        self._images: LRUCache[tuple[str, float, int], InputImage] = LRUCache(settings.image_cache_size)
        self._prepared: LRUCache[tuple[str, str], tuple[Tensor, np.ndarray]] = LRUCache(settings.image_cache_size)
        self._spa: LRUCache[tuple[Any, ...], _Sparse] = LRUCache(settings.result_cache_size)
        self._dense: LRUCache[tuple[Any, ...], _Dense] = LRUCache(settings.result_cache_size)
        self._labels: LRUCache[tuple[str, str], tuple[str, dict[tuple[int, int], Tensor]]] = LRUCache(
            settings.image_cache_size
        )
        self._attributions: LRUCache[tuple[Any, ...], attribution.Attribution] = LRUCache(16)
        self._reports: list[Path] = []
        self.forward_count = 0  # SPA + dense forward passes run (tests and the benchmark read it)

    # -------------------------------------------------------------------------------- inputs

    def model(self, source: str) -> LoadedModel:
        """A loaded model, or :class:`UserError` saying why it cannot be used."""
        try:
            return self.registry.get(source)
        except (ModelError, CheckpointError) as err:
            raise UserError(str(err)) from err

    def _image(self, path: Path) -> InputImage:
        try:
            stat = path.stat()
        except OSError as err:
            raise ImageInputError(f"{path.name}: the file is missing ({err.strerror})") from err
        key = (str(path), stat.st_mtime, stat.st_size)
        cached = self._images.get(key)
        if cached is None:
            cached = self._images.put(
                key, load_image(path, max_pixels=self.settings.max_image_pixels, max_side=self.settings.max_image_side)
            )
        return cached

    def _prepare(self, entry: LoadedModel, paths: Sequence[str | Path] | None) -> _Prepared:
        if not paths:
            raise UserError("no image: upload one or more images (several make one batch), or click an example")
        paths = [Path(p) for p in paths]
        warnings = []
        if len(paths) > self.settings.max_batch:
            warnings.append(
                f"{len(paths)} images given; analysing the first {self.settings.max_batch} (the batch limit)"
            )
            paths = paths[: self.settings.max_batch]
        images, errors = [], []
        for path in paths:
            try:
                image = self._image(path)
            except ImageInputError as err:
                errors.append(str(err))
                continue
            images.append(image)
            if image.notes:
                warnings.append(f"{image.name}: " + "; ".join(image.notes))
        if not images:
            raise UserError(" | ".join(errors))
        warnings = [f"skipped {e}" for e in errors] + warnings
        inputs, displays = [], []
        size = self.settings.display_size
        for image in images:
            key = (entry.key, image.digest)
            cached = self._prepared.get(key)
            if cached is None:
                x = entry.adapter.preprocess(image.pixels)
                view = cv2.resize(entry.adapter.display(x), (size, size), interpolation=cv2.INTER_CUBIC)
                cached = self._prepared.put(key, (x, view))
            inputs.append(cached[0])
            displays.append(cached[1])
        return _Prepared(images, torch.stack(inputs), displays, warnings)

    # ------------------------------------------------------------------------------ forwards

    def _apply(self, entry: LoadedModel, spa: SPASettings) -> None:
        """Put ``spa`` into the model (caller holds ``entry.lock``)."""
        if spa.selector is None:
            remove_selector(entry.model)
        elif spa.selector not in SELECTORS:
            raise UserError(f"unknown selector {spa.selector!r}; this app offers {selector_names()}")
        else:
            amount = selector_amount(spa.selector)
            try:
                install_selector(entry.model, spa.selector, **{amount.param: float(spa.selector_amount)})
            except ValueError as err:
                raise UserError(f"selector {spa.selector}: {err}") from err
        container = int(spa.container_len) if spa.policy == "container" else None
        try:
            spa_viz.configure(
                entry.model, threshold=float(spa.threshold), policy=spa.policy, container_len=container, enabled=True
            )
        except ValueError as err:
            raise UserError(f"invalid SPA setting: {err}") from err

    def _spa_forward(self, entry: LoadedModel, batch: _Prepared, spa: SPASettings) -> _Sparse:
        key = (entry.key, batch.digests, spa.key())
        cached = self._spa.get(key)
        if cached is not None:
            return cached
        with entry.lock:
            cached = self._spa.get(key)  # a concurrent request may have run it meanwhile
            if cached is not None:
                return cached
            self._apply(entry, spa)
            x = batch.inputs.to(self.device)
            with stopwatch(self.device) as timing:
                output, record = spa_viz.trace(entry.model, x)
            self.forward_count += 1
        return self._spa.put(key, _Sparse(_to_cpu(output), timing.wall, record))

    def _dense_forward(self, entry: LoadedModel, batch: _Prepared) -> _Dense:
        key = (entry.key, batch.digests)
        cached = self._dense.get(key)
        if cached is not None:
            return cached
        with entry.lock:
            cached = self._dense.get(key)
            if cached is not None:
                return cached
            x = batch.inputs.to(self.device)
            with dense_twin(entry.model), torch.no_grad(), stopwatch(self.device) as timing:
                output = entry.model(x)
            self.forward_count += 1
        return self._dense.put(key, _Dense(_to_cpu(output), timing.wall))

    # ------------------------------------------------------------------------------ analysis

    def _label_mask(self, entry: LoadedModel, batch: _Prepared, dense: _Dense, index: int) -> tuple[Tensor | None, str]:
        """Object pixels of image ``index`` in input geometry, and where they come from."""
        image = batch.images[index]
        annotation = self.annotations.get(image.digest)
        if annotation is not None and len(annotation.masks):
            masks = annotation.masks
            if masks.shape[-2:] != image.pixels.shape[:2]:
                size = image.pixels.shape[1], image.pixels.shape[0]
                masks = np.stack(
                    [cv2.resize(m.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST) for m in masks]
                ).astype(bool)
            return entry.adapter.map_masks(masks), "object masks of the example"
        teacher = entry.adapter.teacher_mask(dense.output, index)
        if teacher is not None:
            return teacher, f"dense teacher's saliency > {SALIENT:g}"
        return None, ""

    def _selection_labels(
        self, entry: LoadedModel, batch: _Prepared, dense: _Dense, index: int, grids: Sequence[tuple[int, int]]
    ) -> tuple[str, dict[tuple[int, int], Tensor]] | None:
        """(source, labels (N,) per token grid) of image ``index``, or None when it has no labels."""
        key = (entry.key, batch.images[index].digest)
        cached = self._labels.get(key)
        if cached is None:
            mask, source = self._label_mask(entry, batch, dense, index)
            if mask is None:
                return None
            cached = self._labels.put(key, (source, {grid: labels_from_masks(mask, grid) for grid in set(grids)}))
        return cached

    @staticmethod
    def _pick_layer(record: Trace, layer: int | None) -> LayerTrace:
        layers = [t.layer for t in record.layers]
        if not layers:
            raise UserError("this model ran no SPA layer (is SPA disabled in its config?)")
        chosen = layers[0] if layer is None else min(layers, key=lambda candidate: abs(candidate - int(layer)))
        return record.layer(chosen)

    def analyze(
        self,
        paths: Sequence[str | Path] | None,
        model: str,
        spa: SPASettings,
        layer: int | None = None,
        image_index: int = 0,
    ) -> Analysis:
        """Run (or reuse) the forward passes for a batch and render every view of one layer and image."""
        entry = self.model(model)
        batch = self._prepare(entry, paths)
        forward = self._spa_forward(entry, batch, spa)
        dense = self._dense_forward(entry, batch)
        trace = forward.trace
        record = self._pick_layer(trace, layer)
        index = min(max(int(image_index), 0), len(batch.images) - 1)
        learned = spa.selector is None
        display = batch.displays[index]
        name = batch.images[index].name

        gate = panels.gate_panel(display, record, index, spa.threshold if learned else None, spa.selector)
        kept = panels.kept_panel(display, record, index, name)
        found = self._selection_labels(entry, batch, dense, index, [t.grid for t in trace.layers])
        metrics_by_layer: dict[int, dict[str, float]] = {}
        labels_img = None
        labels_text = (
            "No selection labels for this image (they exist for the digit examples, and come from the dense "
            "teacher for saliency models)."
        )
        if found is not None:
            source, by_grid = found
            for t in trace.layers:
                metrics_by_layer[t.layer] = SelectionCounts.of(t.keep[index], by_grid[t.grid]).to_dict()
            m = metrics_by_layer[record.layer]
            labels_img = panels.labels_panel(display, record, index, by_grid[record.grid])
            labels_text = (
                f"**Selection labels** ({source}) at layer {record.layer}: precision **{m['precision']:.2f}**, "
                f"recall **{m['recall']:.2f}**, IoU **{m['iou']:.2f}** (TP {m['tp']}, FP {m['fp']}, FN {m['fn']}). "
                "White outline: label-positive tokens."
            )

        strip = panels.strip_panel(display, trace.layers, index, name, highlight=record.layer)
        predictions = entry.adapter.draw(display, forward.output, index)

        names = [f"{i}: {im.name}" for i, im in enumerate(batch.images)]
        scores = record.soft_gate if learned else record.scores
        layout = figures.packed_layout_figure(
            record.plan, grid=record.grid, num_prefix=record.num_prefix, scores=scores, image_names=names
        )
        if forward.macs_figure is None:
            forward.macs_figure = figures.macs_figure(trace)
        flops = forward.macs_figure
        histogram = figures.kept_histogram_figure(trace, record.layer)

        saving_t = 1.0 - forward.seconds / dense.seconds if dense.seconds else 0.0
        stats = (
            f"**Backbone FLOPs** (batch of {trace.batch_size}): dense {trace.backbone_flops_dense / 1e9:.2f} G → "
            f"SPA {trace.backbone_flops_run / 1e9:.2f} G, **{_change(trace.backbone_saving)}**  \n"
            f"**Wall-clock on {self.device.type}** (same input, one run each, SPA timing includes tracing): dense "
            f"{_ms(dense.seconds)} → SPA {_ms(forward.seconds)}, **{_change(saving_t)}**  \n"
            f"**Kept tokens**: {trace.mean_keep_ratio:.1%} on average over SPA layers and images · "
            f"layer {record.layer}: B′ = {record.plan.num_rows} rows × L = {record.plan.row_len}, "
            f"fill {record.plan.fill_ratio:.1%} ({record.plan.policy} policy)"
        )
        status = f"{entry.badge}  \n{len(batch.images)} image(s): " + ", ".join(names)
        if batch.warnings:
            status += "  \n⚠ " + "  \n⚠ ".join(batch.warnings)
        summary = {
            "model": entry.key,
            "task": entry.adapter.task,
            "trained_gates": entry.trained_gates,
            "trained_weights": entry.trained_weights,
            "device": str(self.device),
            "settings": asdict(spa),
            "images": [im.name for im in batch.images],
            "image_index": index,
            "layer": record.layer,
            "latency_ms": {"dense": round(dense.seconds * 1000, 1), "spa": round(forward.seconds * 1000, 1)},
            "predictions": entry.adapter.predictions(forward.output, index),
            "selection_labels": {"source": found[0], "per_layer": {str(k): v for k, v in metrics_by_layer.items()}}
            if found is not None
            else None,
            "trace": trace.summary(),
        }
        gallery = [
            (d, f"{i}: {im.name} · {float(record.keep_ratio[i]):.0%} kept")
            for i, (d, im) in enumerate(zip(batch.displays, batch.images))
        ]
        return Analysis(
            gate,
            kept,
            labels_img,
            labels_text,
            strip,
            predictions,
            layout,
            flops,
            histogram,
            stats,
            status,
            summary,
            gallery,
            batch.warnings,
        )

    # --------------------------------------------------------------------------- attribution

    def attribute(
        self,
        paths: Sequence[str | Path] | None,
        model: str,
        spa: SPASettings,
        image_index: int,
        method: str,
        progress: Progress | None = None,
    ) -> AttributionView:
        """Per-token attribution of the model's output for one image of the batch, drawn over it."""
        if method not in attribution.METHODS:
            raise UserError(f"unknown attribution method {method!r}; choose one of {list(attribution.METHODS)}")
        entry = self.model(model)
        batch = self._prepare(entry, paths)
        forward = self._spa_forward(entry, batch, spa)
        index = min(max(int(image_index), 0), len(batch.images) - 1)
        target, described = entry.adapter.target(forward.output, index)
        key = (entry.key, batch.digests[index], spa.key(), method, described)
        result = self._attributions.get(key)
        if result is None:
            with entry.lock:
                self._apply(entry, spa)
                try:
                    result = attribution.attribute(
                        entry.model,
                        batch.inputs[index : index + 1].to(self.device),
                        target,
                        method,
                        progress=progress,
                        budget_s=self.settings.attribution_budget_s,
                        forward_seconds=forward.seconds / len(batch.images),
                    )
                except (ValueError, RuntimeError) as err:
                    raise UserError(f"{method} failed on this model: {err}") from err
            self._attributions.put(key, result)
        title = method.replace("_", " ").capitalize()
        image = panels.attribution_panel(
            batch.displays[index], result.maps[0], f"{title} · {batch.images[index].name}", described
        )
        settings = ", ".join(f"{k} {v}" for k, v in result.settings.items())
        text = f"**{title}** of {described}: {result.seconds:.1f} s on {self.device.type}" + (
            f" ({settings})" if settings else ""
        )
        return AttributionView(
            image,
            text,
            {
                "method": method,
                "target": described,
                "seconds": round(result.seconds, 3),
                "settings": result.settings,
                "map": result.maps[0].tolist(),
            },
        )

    # -------------------------------------------------------------------------------- report

    def report(
        self, paths: Sequence[str | Path] | None, model: str, spa: SPASettings, layer: int | None, image_index: int
    ) -> Path:
        """A zip of the PNG panels, the figures (plotly JSON) and the trace summary (JSON)."""
        result = self.analyze(paths, model, spa, layer, image_index)
        folder = Path(tempfile.mkdtemp(prefix="spa-viz-report-"))
        self._reports.append(folder)
        while len(self._reports) > 8:
            shutil.rmtree(self._reports.pop(0), ignore_errors=True)
        path = folder / f"spa-report-layer{result.summary['layer']}.zip"
        panels = {
            "gate_scores": result.gate,
            "kept_tokens": result.kept,
            "selection_labels": result.labels,
            "all_layers": result.strip,
            "predictions": result.predictions,
        }
        with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            for name, panel in panels.items():
                if panel is not None:
                    buffer = io.BytesIO()
                    Image.fromarray(panel).save(buffer, format="PNG")
                    archive.writestr(f"{name}.png", buffer.getvalue())
            for name, figure in (
                ("packed_layout", result.layout),
                ("flops", result.flops),
                ("kept_histogram", result.histogram),
            ):
                archive.writestr(f"{name}.plotly.json", figure.to_json())
            archive.writestr("summary.json", json.dumps(result.summary, indent=2))
        return path
