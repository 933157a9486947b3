"""The app's logic without any UI: load inputs, run (cached) forward passes, render every view.

Speed: decoded images, preprocessed inputs, SPA forward passes (per model, images and the settings
that change the forward), dense forward passes (per model and images: the dense twin ignores SPA
settings) and wall-clock measurements (per model, images and SPA settings) are LRU-cached. Moving
the layer slider or picking another image of the batch only re-renders; changing the threshold
re-runs the SPA forward only.

The wall-clock line is a measurement of its own (:meth:`AnalysisService.measure`): the median of
several runs of the dense twin and of SPA, alternating, without tracing. The UI asks for it right
after the views are shown, so the views never wait for it.

Every user-facing problem raises :class:`UserError` with a message to show; problems with single
files of a batch become ``warnings`` of the result while the rest is analysed.
"""

from __future__ import annotations

import io
import json
import logging
import math
import threading
import time
import uuid
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Generic, TypeVar

import cv2
import numpy as np
import plotly.graph_objects as go
import torch
from PIL import Image
from torch import Tensor

import spa_viz
from spa_viz.analysis import attribution
from spa_viz.analysis.trace import LayerTrace, Trace
from spa_viz.io.checkpoint import CheckpointError
from spa_viz.io.images import ImageInputError, InputImage, load_image
from spa_viz.io.timer import PairedTiming, stopwatch, time_paired
from spa_viz.layers.config import UNKEPT_MODES
from spa_viz.layers.gate import FUSION_MODES
from spa_viz.models.saliency.labels import SALIENT
from spa_viz.models.twin import dense_twin
from spa_viz.selection.labels import labels_from_masks
from spa_viz.selection.selectors import SELECTORS, applicable_selectors, install_selector, remove_selector
from spa_viz.viz import panels
from spa_viz.viz.views import VIEW_NAMES, SelectionLabels, Views, compose_views

from .examples import Examples
from .files import AppFiles, gradio_cache_dir, sweep_upload_leftovers
from .models import LoadedModel, ModelError, ModelRegistry, selector_amount, selector_names
from .settings import AppSettings

__all__ = ["SAVED_FUSION", "Analysis", "AnalysisService", "AttributionView", "SPASettings", "UserError", "WallClock"]

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


UNKEPT_HELP = {
    "copy": "passed on unchanged",
    "paper": "the paper's soft-gated output projection",
    "refresh": "take the update of their most similar kept token",
}
"""One line per unkept path, for the cost text."""


def _image_index(requested: float, batch: int) -> tuple[int, str | None]:
    """The image of the batch to show, and a note when ``requested`` lies outside it (the nearest is shown)."""
    index = int(requested)
    shown = min(max(index, 0), batch - 1)
    if shown == index:
        return shown, None
    return shown, f"image index {index} is outside the batch of {batch} (0-{batch - 1}): showing image {shown}"


def _not_current(trace: Trace) -> float:
    """Share of tokens at the backbone output that a block last updated before the last SPA layer."""
    age = trace.output_age()
    return 0.0 if age is None else float((age > 0).float().mean())


SAVED_FUSION = "saved"
"""The ``fusion`` (and ``unkept``) value that means "as this model was saved" (the app's default)."""


@dataclass(frozen=True)
class SPASettings:
    """The inference settings that change an SPA forward pass.

    ``selector`` None runs the model's learned gates (with ``threshold`` and the score ``fusion``
    mode, one of :data:`~spa_viz.layers.gate.FUSION_MODES`, or :data:`SAVED_FUSION`: the mode the
    model was saved with, so a model trained with chain fusion is shown as it was trained); a name of
    :data:`~spa_viz.selection.selectors.SELECTORS` runs that training-free selector, keeping
    ``selector_amount`` (its ratio or p, see :func:`app.models.selector_amount`); selector scores
    are not fused. ``unkept`` is what tokens SPA does not keep become (one of
    :data:`~spa_viz.layers.config.UNKEPT_MODES`, or :data:`SAVED_FUSION`: the path it was saved with),
    for the learned gate and selectors alike.
    """

    selector: str | None = None
    selector_amount: float = 0.5
    threshold: float = 0.5
    policy: str = "image"
    container_len: int = 49
    fusion: str = SAVED_FUSION
    unkept: str = SAVED_FUSION

    def key(self) -> tuple[Any, ...]:
        """Cache key: only what matters for the chosen selector and policy."""
        if self.selector is None:
            gate: tuple[Any, ...] = (None, round(self.threshold, 4), self.fusion)
        else:
            gate = (self.selector, round(self.selector_amount, 4))
        return (*gate, self.policy, self.container_len if self.policy == "container" else None, self.unkept)


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
    """A dense-twin forward pass: its output on the CPU (predictions and teacher labels)."""

    output: Any


@dataclass
class _Sparse(_Dense):
    """A traced SPA forward pass: its trace, how long it took (tracing included: only an estimate
    for sizing later work), and its MAC figure (the same for every layer and image)."""

    trace: Trace
    traced_seconds: float
    macs_figure: go.Figure | None = None


@dataclass(frozen=True)
class WallClock:
    """Median wall-clock of the dense twin and of SPA on one batch, measured alternately without tracing."""

    dense_s: float
    spa_s: float
    repeats: int
    batch: int
    threads: int
    device: str

    @classmethod
    def of(cls, timing: PairedTiming, batch: int) -> WallClock:
        """The dense and SPA medians of a paired timing of one batch, with how they were measured."""
        return cls(timing.median("dense"), timing.median("spa"), timing.repeats, batch, timing.threads, timing.device)

    @property
    def saving(self) -> float:
        """Share of the dense twin's time SPA did not take (negative: SPA was slower)."""
        return 1.0 - self.spa_s / self.dense_s if self.dense_s else 0.0

    def line(self, macs_saving: float) -> str:
        """The stats line: conditions, both medians, the change, and the MACs saved next to it."""
        threads = f"{self.threads} thread{'s' if self.threads != 1 else ''}"
        return (
            f"**Wall-clock** ({self.device}, batch of {self.batch}, {threads}; median of {self.repeats} runs each, "
            f"dense twin and SPA alternating, no tracing): dense {_ms(self.dense_s)} → SPA {_ms(self.spa_s)}, "
            f"**{_change(self.saving)}** · MACs saved {macs_saving:.1%}"
            + (self.why_slower(macs_saving) if self.saving < 0 else "")
        )

    def why_slower(self, macs_saving: float) -> str:
        """Plain words for a run where SPA took longer than the dense twin."""
        return (
            f"  \n*Why SPA is slower here*: it skips {macs_saving:.0%} of the multiply-adds, but every SPA layer "
            "also pays a fixed cost (scoring the tokens, deciding, gathering the kept tokens into packed rows "
            f"and scattering them back). On a batch of {self.batch} on {self.device} the skipped work is "
            "smaller than that cost; more images per batch, more dropped tokens or a larger model turn it "
            "into a saving."
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "dense": round(self.dense_s * 1000, 2),
            "spa": round(self.spa_s * 1000, 2),
            "saving": round(self.saving, 4),
            "statistic": f"median of {self.repeats} runs each, alternating, no tracing",
            "batch": self.batch,
            "threads": self.threads,
            "device": self.device,
        }


@dataclass
class _Run:
    """One request resolved: the model, the batch, both forward passes, and the layer and image to show."""

    entry: LoadedModel
    batch: _Prepared
    spa: SPASettings
    forward: _Sparse
    dense: _Dense
    record: LayerTrace
    index: int
    notes: list[str] = field(default_factory=list)
    """Warnings about the request itself (e.g. an image index past the batch)."""

    @property
    def trace(self) -> Trace:
        return self.forward.trace


@dataclass(frozen=True, kw_only=True)
class Analysis(Views):
    """Every view of one analysis (:class:`~spa_viz.viz.views.Views`, with the app's settings and
    wall-clock in ``summary``) plus the app's own text: the status line, the cost text and warnings."""

    status: str
    stats: str
    warnings: list[str] = field(default_factory=list)


_SHOWN_VIEWS = tuple(name for name in VIEW_NAMES if name not in ("macs", "layout_picture"))
"""The views the service renders per request: the MAC figure is rendered once per forward pass, the
layout picture is for files (the app shows the interactive layout)."""


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
    return f"{seconds * 1000:.1f} ms" if seconds < 0.01 else f"{seconds * 1000:.0f} ms"


def _change(saving: float) -> str:
    """A saving share as words: 'saving 12.3%', 'overhead 4.0%' or 'no change' (never '-0.0%')."""
    if abs(saving) < 0.0005:
        return "no change"
    return f"saving {saving:.1%}" if saving > 0 else f"overhead {-saving:.1%}"


class AnalysisService:
    """Loads inputs and models, runs and caches forward passes, and renders the views."""

    def __init__(
        self,
        settings: AppSettings,
        registry: ModelRegistry | None = None,
        examples: Examples | None = None,
        files: AppFiles | None = None,
    ) -> None:
        self.settings = settings
        self.device = settings.torch_device
        self.registry = registry or ModelRegistry(
            self.device, settings.allow_dirs, settings.model_cache_size, max_params=settings.max_params
        )
        self.annotations = examples.annotations if examples is not None else {}
        self.files = files or AppFiles(panel_capacity=settings.panel_files, report_capacity=settings.report_files)
        self._images: LRUCache[tuple[str, float, int], InputImage] = LRUCache(settings.image_cache_size)
        self._prepared: LRUCache[tuple[str, str], tuple[Tensor, np.ndarray]] = LRUCache(settings.image_cache_size)
        self._spa: LRUCache[tuple[Any, ...], _Sparse] = LRUCache(settings.result_cache_size)
        self._dense: LRUCache[tuple[Any, ...], _Dense] = LRUCache(settings.result_cache_size)
        self._labels: LRUCache[tuple[str, str], SelectionLabels] = LRUCache(settings.image_cache_size)
        self._attributions: LRUCache[tuple[Any, ...], attribution.Attribution] = LRUCache(16)
        self._timings: LRUCache[tuple[Any, ...], WallClock] = LRUCache(settings.result_cache_size)
        self.forward_count = 0  # traced SPA + dense forward passes run (tests and the benchmark read it)
        self.timing_count = 0  # wall-clock measurements run
        self._last_sweep = -math.inf

    def close(self) -> None:
        """Remove the files the app wrote (panels, reports)."""
        self.files.close()

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
            minutes = max(1, round(self.settings.cache_age_s / 60))
            raise ImageInputError(
                "unreadable",
                f"{path.name}: the file is missing ({err.strerror}); the server keeps uploads for about "
                f"{minutes} min, upload it again",
            ) from err
        key = (str(path), stat.st_mtime, stat.st_size)
        cached = self._images.get(key)
        if cached is None:
            cached = self._images.put(
                key, load_image(path, max_pixels=self.settings.max_image_pixels, max_side=self.settings.max_image_side)
            )
        return cached

    def _sweep_uploads(self) -> None:
        """At most every ``cache_check_s``: remove gradio's empty upload leftovers older than ``cache_age_s``."""
        now = time.monotonic()
        if now - self._last_sweep < self.settings.cache_check_s:
            return
        self._last_sweep = now
        sweep_upload_leftovers(gradio_cache_dir(), self.settings.cache_age_s)

    def _prepare(self, entry: LoadedModel, paths: Sequence[str | Path] | None) -> _Prepared:
        self._sweep_uploads()
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
            raise UserError(f"unknown selector {spa.selector!r}; this app offers {selector_names(entry.model)}")
        elif spa.selector not in applicable_selectors(entry.model):
            raise UserError(
                f"selector {spa.selector} cannot run on {entry.key}: it needs a class token and this model has "
                f"none; selectors for this model: {entry.selectors}"
            )
        else:
            amount = selector_amount(spa.selector)
            try:
                install_selector(entry.model, spa.selector, **{amount.param: float(spa.selector_amount)})
            except ValueError as err:
                raise UserError(f"selector {spa.selector}: {err}") from err
        container = int(spa.container_len) if spa.policy == "container" else None
        try:
            spa_viz.configure(
                entry.model,
                threshold=float(spa.threshold),
                policy=spa.policy,
                container_len=container,
                fusion=spa.fusion,
                unkept=spa.unkept,
                enabled=True,
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
        return self._spa.put(key, _Sparse(_to_cpu(output), record, timing.wall))

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
            with dense_twin(entry.model), torch.no_grad():
                output = entry.model(x)
            self.forward_count += 1
        return self._dense.put(key, _Dense(_to_cpu(output)))

    @staticmethod
    def _timing_key(entry: LoadedModel, batch: _Prepared, spa: SPASettings) -> tuple[Any, ...]:
        return (entry.key, batch.digests, spa.key())

    def _timing_repeats(self, traced_seconds: float) -> int:
        """Timed runs per candidate: the configured number, fewer (not under 3) when a pair of runs is
        slow enough that the measurement would pass the time budget."""
        pair = max(2 * traced_seconds, 1e-6)
        affordable = int(self.settings.timing_budget_s / pair) - 1  # one warm-up pair
        return max(3, min(self.settings.timing_repeats, affordable))

    def _wall_clock(self, entry: LoadedModel, batch: _Prepared, spa: SPASettings) -> WallClock:
        """Median wall-clock of the dense twin and SPA on ``batch``, alternating, without tracing (cached)."""
        key = self._timing_key(entry, batch, spa)
        cached = self._timings.get(key)
        if cached is not None:
            return cached
        repeats = self._timing_repeats(self._spa_forward(entry, batch, spa).traced_seconds)
        model, x = entry.model, batch.inputs.to(self.device)

        def dense() -> None:
            with dense_twin(model):
                model(x)

        def sparse() -> None:
            model(x)

        with entry.lock:
            cached = self._timings.get(key)
            if cached is not None:
                return cached
            self._apply(entry, spa)
            with torch.no_grad():
                timing = time_paired({"dense": dense, "spa": sparse}, repeats, warmup=1, device=self.device)
            self.timing_count += 1
        return self._timings.put(key, WallClock.of(timing, len(batch.images)))

    # ------------------------------------------------------------------------------ analysis

    def _truth_boxes(self, run: _Run) -> Tensor | None:
        """Ground-truth boxes of the shown image in the model's input pixels (the digit examples), or None."""
        image = run.batch.images[run.index]
        annotation = self.annotations.get(image.digest)
        if annotation is None:
            return None
        boxes = np.asarray(annotation.boxes, dtype=np.float32).reshape(-1, 4)
        if annotation.masks.ndim == 3 and annotation.masks.shape[-2:] != image.pixels.shape[:2]:
            (mh, mw), (h, w) = annotation.masks.shape[-2:], image.pixels.shape[:2]
            boxes = boxes * np.array([w / mw, h / mh, w / mw, h / mh], dtype=np.float32)
        return run.entry.adapter.map_boxes(image.pixels.shape[:2], boxes)

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

    def _selection_labels(self, run: _Run) -> SelectionLabels | None:
        """The selection labels of the run's image (per token grid), or None when it has none."""
        key = (run.entry.key, run.batch.images[run.index].digest)
        cached = self._labels.get(key)
        if cached is None:
            mask, source = self._label_mask(run.entry, run.batch, run.dense, run.index)
            if mask is None:
                return None
            grids = {t.grid for t in run.trace.layers}
            cached = self._labels.put(
                key, SelectionLabels(source, {grid: labels_from_masks(mask, grid) for grid in grids})
            )
        return cached

    @staticmethod
    def _pick_layer(record: Trace, layer: int | None) -> LayerTrace:
        layers = [t.layer for t in record.layers]
        if not layers:
            raise UserError("this model ran no SPA layer (is SPA disabled in its config?)")
        chosen = layers[0] if layer is None else min(layers, key=lambda candidate: abs(candidate - int(layer)))
        return record.layer(chosen)

    def _settle(self, model: str, spa: SPASettings) -> tuple[LoadedModel, SPASettings]:
        """The loaded model and ``spa`` with :data:`SAVED_FUSION` replaced by the fusion mode and unkept
        path it was saved with; settings no model could run are refused before the model is loaded."""
        allowed = [*FUSION_MODES, SAVED_FUSION]
        if spa.fusion not in allowed:
            raise UserError(f"unknown fusion mode {spa.fusion!r}; choose one of {allowed}")
        paths = [*UNKEPT_MODES, SAVED_FUSION]
        if spa.unkept not in paths:
            raise UserError(f"unknown unkept path {spa.unkept!r}; choose one of {paths}")
        entry = self.model(model)
        if spa.fusion == SAVED_FUSION:
            spa = replace(spa, fusion=entry.saved_fusion)
        if spa.unkept == SAVED_FUSION:
            spa = replace(spa, unkept=entry.saved_unkept)
        return entry, spa

    def _run(
        self, paths: Sequence[str | Path] | None, model: str, spa: SPASettings, layer: int | None, image_index: int
    ) -> _Run:
        entry, spa = self._settle(model, spa)
        batch = self._prepare(entry, paths)
        forward = self._spa_forward(entry, batch, spa)
        dense = self._dense_forward(entry, batch)
        record = self._pick_layer(forward.trace, layer)
        index, note = _image_index(image_index, len(batch.images))
        return _Run(entry, batch, spa, forward, dense, record, index, [note] if note else [])

    def _stats(self, run: _Run, wall: WallClock | None) -> str:
        """The cost text: backbone MACs dense -> SPA, the wall-clock line, kept tokens and packing."""
        trace, record = run.trace, run.record
        plan = record.plan
        clock = (
            wall.line(trace.backbone_saving)
            if wall is not None
            else (
                f"**Wall-clock** ({self.device.type}): measuring the dense twin and SPA (median of up to "
                f"{self.settings.timing_repeats} runs each, alternating, no tracing)…"
            )
        )
        gap = run.entry.adapter.output_gap(run.forward.output, run.dense.output, run.index)
        output_line = (
            "" if gap is None else f"**Output vs the dense twin** (image {run.index + 1}): {gap[0]} {gap[1]:.4f}  \n"
        )
        return (
            f'**Backbone GMACs** (multiply-adds, the SPA paper\'s "GFLOPs"; 1 MAC = 2 FLOPs; batch of '
            f"{trace.batch_size}): dense {trace.backbone_macs_dense / 1e9:.3f} → SPA "
            f"{trace.backbone_macs_run / 1e9:.3f}, **MACs saved {trace.backbone_saving:.1%}**  \n"
            f"{output_line}"
            f"{clock}  \n"
            f"**Kept tokens**: {trace.mean_keep_ratio:.1%} on average over SPA layers and images · "
            f"layer {record.layer}: B′ = {plan.num_rows} row{'s' if plan.num_rows != 1 else ''} × L = {plan.row_len}, "
            f"fill {plan.fill_ratio:.1%} ({plan.policy} policy) · selection score: {panels.score_source(record)}  \n"
            f"**Unkept tokens** ({record.unkept}: {UNKEPT_HELP[record.unkept]}): at the backbone output "
            f"{_not_current(trace):.0%} of tokens are not current"
        )

    def _views(self, run: _Run, only: tuple[str, ...] = _SHOWN_VIEWS) -> Views:
        """The ``only`` views of the run's image and layer (:func:`~spa_viz.viz.views.compose_views`)."""
        return compose_views(
            run.trace,
            run.batch.displays,
            run.entry.adapter,
            run.forward.output,
            dense_output=run.dense.output,
            index=run.index,
            layer=run.record.layer,
            names=[image.name for image in run.batch.images],
            truth=self._truth_boxes(run),
            labels=self._selection_labels(run),
            only=only,
        )

    def _summary(self, run: _Run, wall: WallClock | None, views: Views) -> dict[str, Any]:
        """The JSON summary of one view: the model and settings, the image's summary (predictions,
        selection labels, per-layer trace with each layer's score source), and the wall-clock."""
        entry = run.entry
        return {
            "model": entry.key,
            "trained_gates": entry.trained_gates,
            "trained_weights": entry.trained_weights,
            "saved_fusion": entry.saved_fusion,
            "saved_unkept": entry.saved_unkept,
            "device": str(self.device),
            "settings": asdict(run.spa),
            "images": [im.name for im in run.batch.images],
            "image_index": run.index,
            "layer": run.record.layer,
            "latency_ms": wall.to_dict() if wall is not None else None,
            **views.summary,
        }

    def analyze(
        self,
        paths: Sequence[str | Path] | None,
        model: str,
        spa: SPASettings,
        layer: int | None = None,
        image_index: int = 0,
        *,
        measure: bool = True,
    ) -> Analysis:
        """Run (or reuse) the forward passes for a batch and render every view of one layer and image.

        ``measure`` False leaves the wall-clock line to a later :meth:`timing` call unless it is cached
        (the UI shows the views first).
        """
        run = self._run(paths, model, spa, layer, image_index)
        entry, batch, spa = run.entry, run.batch, run.spa  # the fusion mode resolved for this model
        views = self._views(run)
        if run.forward.macs_figure is None:
            run.forward.macs_figure = self._views(run, ("macs",)).macs
        wall = (
            self._wall_clock(entry, batch, spa) if measure else self._timings.get(self._timing_key(entry, batch, spa))
        )
        status = f"{entry.badge}  \n{len(batch.images)} image(s): " + ", ".join(
            f"{i}: {im.name}" for i, im in enumerate(batch.images)
        )
        warnings = [*batch.warnings, *run.notes]
        if warnings:
            status += "  \n⚠ " + "  \n⚠ ".join(warnings)
        shown = {name: getattr(views, name) for name in VIEW_NAMES}
        shown |= {"macs": run.forward.macs_figure, "summary": self._summary(run, wall, views)}
        return Analysis(**shown, status=status, stats=self._stats(run, wall), warnings=warnings)

    def measure(self, paths: Sequence[str | Path] | None, model: str, spa: SPASettings) -> WallClock:
        """The wall-clock of the dense twin vs SPA for a batch and settings (measured once, then cached)."""
        entry, spa = self._settle(model, spa)
        return self._wall_clock(entry, self._prepare(entry, paths), spa)

    def timing(
        self, paths: Sequence[str | Path] | None, model: str, spa: SPASettings, layer: int | None, image_index: int
    ) -> tuple[str, dict[str, Any]]:
        """The cost text and the JSON summary of one view, with the wall-clock measured (cached)."""
        run = self._run(paths, model, spa, layer, image_index)
        wall = self._wall_clock(run.entry, run.batch, run.spa)
        return self._stats(run, wall), self._summary(run, wall, self._views(run, ("summary",)))

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
        why_not = attribution.method_support(self.model(model).model)[method]
        if why_not is not None:
            raise UserError(
                f"{method} does not run on {model}: {why_not}; methods that do: {self.model(model).methods}"
            )
        entry, spa = self._settle(model, spa)
        batch = self._prepare(entry, paths)
        forward = self._spa_forward(entry, batch, spa)
        index, _ = _image_index(image_index, len(batch.images))
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
                        forward_seconds=forward.traced_seconds / len(batch.images),
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
        """A zip of the PNG panels, the figures (plotly JSON) and the summary (JSON, wall-clock measured).

        Reports are kept in the app's bounded ``reports/`` folder (the oldest is removed beyond its cap).
        """
        result = self.analyze(paths, model, spa, layer, image_index)
        folder = self.files.reports.claim(uuid.uuid4().hex)
        folder.mkdir()
        path = folder / f"spa-report-layer{result.summary['layer']}.zip"
        pictures = {
            "gate_scores": result.gate,
            "kept_tokens": result.kept,
            "selection_labels": result.labels,
            "all_layers": result.strip,
            "token_age": result.age,
            "predictions": result.predictions,
        }
        with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            for name, panel in pictures.items():
                if panel is not None:
                    buffer = io.BytesIO()
                    Image.fromarray(panel).save(buffer, format="PNG")
                    archive.writestr(f"{name}.png", buffer.getvalue())
            for name, figure in (
                ("packed_layout", result.layout),
                ("macs_per_layer", result.macs),
                ("kept_histogram", result.histogram),
            ):
                archive.writestr(f"{name}.plotly.json", figure.to_json())
            archive.writestr("summary.json", json.dumps(result.summary, indent=2))
        return path
