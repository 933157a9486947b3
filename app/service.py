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
import threading
import time
import uuid
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
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
from spa_viz.analysis.compare import LEARNED_GATE as GATE_METHOD
from spa_viz.analysis.compare import TOKEN_MERGING, Setting, available_methods, match_compute, run_setting
from spa_viz.analysis.compare import tradeoff as tradeoff_sweep
from spa_viz.analysis.metrics import SelectionCounts
from spa_viz.analysis.token import BlockInputs, inspect_token, record_block_inputs
from spa_viz.analysis.trace import LayerTrace, Trace, find_backbone
from spa_viz.io.checkpoint import CheckpointError
from spa_viz.io.images import ImageInputError, InputImage, load_image
from spa_viz.io.timer import PairedTiming, stopwatch, time_paired
from spa_viz.layers.config import UNKEPT_MODES
from spa_viz.layers.gate import FUSION_MODES
from spa_viz.layers.packing import POLICIES
from spa_viz.models.saliency.labels import SALIENT
from spa_viz.models.twin import dense_twin
from spa_viz.selection.labels import labels_from_masks
from spa_viz.selection.merging import TokenMerging, merging_forward
from spa_viz.selection.selectors import SELECTORS, applicable_selectors, install_selector, remove_selector
from spa_viz.viz import inspection, panels
from spa_viz.viz.views import VIEW_NAMES, SelectionLabels, Views, compose_views

from .examples import Examples
from .files import AppFiles, UploadSweeper
from .models import LoadedModel, ModelError, ModelRegistry, selector_amount, selector_names
from .settings import AppSettings

__all__ = [
    "MAX_COLUMNS",
    "SAVED_FUSION",
    "Analysis",
    "AnalysisService",
    "AttributionView",
    "Column",
    "ColumnView",
    "Comparison",
    "SPASettings",
    "TokenView",
    "TradeoffView",
    "UserError",
    "WallClock",
]

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


MAX_COLUMNS = 4
"""Columns a comparison shows at most (and 2 at least)."""
TRADEOFF_SKIPPED = ("random", "uniform_topk")
"""Methods the trade-off leaves out unless asked for (baselines without a score of their own)."""


@dataclass(frozen=True)
class Column:
    """One column of a comparison as requested: a model and how its backbone runs.

    ``method``: ``learned_gate``, a training-free selector or ``token_merging`` (see
    :func:`~spa_viz.analysis.compare.available_methods`); ``amount``: the gate's threshold, the
    selector's ratio or p, or ToMe's tokens merged per SPA layer (None: the model's saved threshold,
    the selector's default, or 8 merges); ``fusion`` / ``unkept``: :data:`SAVED_FUSION` = as saved.
    """

    model: str
    method: str = GATE_METHOD
    amount: float | None = None
    policy: str = "image"
    container_len: int = 49
    fusion: str = SAVED_FUSION
    unkept: str = SAVED_FUSION

    @classmethod
    def from_dict(cls, value: Mapping[str, Any], default_model: str) -> Column:
        """A column from the API's JSON (unknown keys refused, so a typo is not silently ignored)."""
        if not isinstance(value, Mapping):
            raise UserError(f"a column is an object like {{'model': ..., 'method': ...}}, got {value!r}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise UserError(f"unknown column keys {unknown}; a column takes {sorted(known)}")
        method = value.get("method") or GATE_METHOD
        amount = value.get("amount")
        try:
            return cls(
                model=str(value.get("model") or default_model),
                method="learned_gate" if method in ("learned gate", GATE_METHOD) else str(method),
                amount=None if amount in (None, "") else float(amount),
                policy=str(value.get("policy") or "image"),
                container_len=int(value.get("container_len") or 49),
                fusion=str(value.get("fusion") or SAVED_FUSION),
                unkept=str(value.get("unkept") or SAVED_FUSION),
            )
        except (TypeError, ValueError) as err:
            raise UserError(f"column {dict(value)}: {err}") from err


@dataclass
class ColumnView:
    """One column of a comparison: its title, its pictures and its table row (JSON-ready)."""

    title: str
    tokens: np.ndarray
    """Kept tokens at the shown layer, or ToMe's merge groups."""
    output: np.ndarray
    """The model's output drawn by its task adapter."""
    difference: np.ndarray
    """|output - dense twin| as a map (or a note where the output is not a map)."""
    row: dict[str, Any]


@dataclass
class Comparison:
    """A comparison of 2-4 columns on one batch: a status line, the columns, the table and the summary."""

    status: str
    columns: list[ColumnView]
    table: list[list[Any]]
    summary: dict[str, Any]


COMPARE_HEADERS = [
    "column",
    "model",
    "setting (as run)",
    "GMACs / image",
    "MACs saved",
    "ms dense → column",
    "tokens kept",
    "output error",
    "error measure",
    "label precision",
    "label recall",
]
"""The comparison table's columns."""


@dataclass
class TokenView:
    """One clicked token: its picture (attention per head, or ToMe's group) and its facts as JSON."""

    image: np.ndarray
    info: dict[str, Any]


@dataclass
class TradeoffView:
    """The trade-off plot and its points."""

    figure: go.Figure
    info: dict[str, Any]


@dataclass
class _Merged:
    """A token-merging run of a batch: output (CPU), compute, and each patch's merge group (B, gh, gw)."""

    output: Any
    macs: float
    dense_macs: float
    kept: float
    groups: Tensor
    seconds: float


@dataclass
class _ColumnRun:
    """A column resolved and run: what it ran as, its output and compute, and its trace or merge groups."""

    entry: LoadedModel
    batch: _Prepared
    setting: Setting
    output: Any
    dense: _Dense
    macs: float
    dense_macs: float
    kept: float
    trace: Trace | None = None
    spa: SPASettings | None = None
    merged: _Merged | None = None


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
        self._merged: LRUCache[tuple[Any, ...], _Merged] = LRUCache(settings.result_cache_size)
        self._matches: LRUCache[tuple[Any, ...], Setting] = LRUCache(settings.result_cache_size)
        # every SPA block's input of one SPA and one dense run (a click on a token reads them): large, few kept
        self._block_inputs: LRUCache[tuple[Any, ...], tuple[Trace, BlockInputs]] = LRUCache(4)
        self._tradeoffs: LRUCache[tuple[Any, ...], TradeoffView] = LRUCache(8)
        self.forward_count = 0  # traced SPA + dense forward passes run (tests and the benchmark read it)
        self.timing_count = 0  # wall-clock measurements run
        self._sweep_uploads = UploadSweeper(self.settings.cache_check_s, self.settings.cache_age_s)

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
        return self._truth_of(run.entry, run.batch.images[run.index])

    def _truth_of(self, entry: LoadedModel, image: InputImage) -> Tensor | None:
        """Ground-truth boxes of ``image`` in ``entry``'s input pixels (the digit examples), or None."""
        annotation = self.annotations.get(image.digest)
        if annotation is None:
            return None
        boxes = np.asarray(annotation.boxes, dtype=np.float32).reshape(-1, 4)
        if annotation.masks.ndim == 3 and annotation.masks.shape[-2:] != image.pixels.shape[:2]:
            (mh, mw), (h, w) = annotation.masks.shape[-2:], image.pixels.shape[:2]
            boxes = boxes * np.array([w / mw, h / mh, w / mw, h / mh], dtype=np.float32)
        return entry.adapter.map_boxes(image.pixels.shape[:2], boxes)

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
        return self._labels_of(run.entry, run.batch, run.dense, run.index, run.trace)

    def _labels_of(
        self, entry: LoadedModel, batch: _Prepared, dense: _Dense, index: int, trace: Trace
    ) -> SelectionLabels | None:
        """The selection labels of image ``index`` on the token grids of ``trace``, or None when it has none."""
        key = (entry.key, batch.images[index].digest)
        cached = self._labels.get(key)
        if cached is None:
            mask, source = self._label_mask(entry, batch, dense, index)
            if mask is None:
                return None
            grids = {t.grid for t in trace.layers}
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

    # ------------------------------------------------------------------------------- compare

    def _setting(self, entry: LoadedModel, column: Column) -> Setting:
        """``column`` as a :class:`~spa_viz.analysis.compare.Setting` for ``entry``: method and settings
        checked, defaults and the saved fusion mode / unkept path filled in."""
        methods = available_methods(entry.model)
        if column.method not in methods:
            raise UserError(f"method {column.method!r} does not run on {entry.key}; methods that do: {methods}")
        if column.policy not in POLICIES:
            raise UserError(f"unknown packing policy {column.policy!r}; choose one of {list(POLICIES)}")
        if column.fusion not in (*FUSION_MODES, SAVED_FUSION):
            raise UserError(f"unknown fusion mode {column.fusion!r}; choose one of {[*FUSION_MODES, SAVED_FUSION]}")
        if column.unkept not in (*UNKEPT_MODES, SAVED_FUSION):
            raise UserError(f"unknown unkept path {column.unkept!r}; choose one of {[*UNKEPT_MODES, SAVED_FUSION]}")
        amount = column.amount
        if column.method == GATE_METHOD:
            amount = entry.saved_threshold if amount is None else amount
            if not 0.0 <= amount <= 1.0:
                raise UserError(f"the learned gate's threshold must lie in [0, 1], got {amount}")
        elif column.method == TOKEN_MERGING:
            amount = 8.0 if amount is None else float(round(amount))
            if amount < 0:
                raise UserError(f"token merging needs r >= 0 tokens merged per layer, got {amount:g}")
        else:
            amount = selector_amount(column.method).default if amount is None else amount
            if not 0.0 < amount <= 1.0:
                raise UserError(f"{column.method} keeps an amount in (0, 1], got {amount}")
        return Setting(
            method=column.method,
            amount=float(amount),
            policy=column.policy,
            container_len=int(column.container_len) if column.policy == "container" else None,
            fusion=entry.saved_fusion if column.fusion == SAVED_FUSION else column.fusion,
            unkept=entry.saved_unkept if column.unkept == SAVED_FUSION else column.unkept,
        )

    @staticmethod
    def _spa_of(entry: LoadedModel, setting: Setting) -> SPASettings:
        """The :class:`SPASettings` that run a gate or selector ``setting`` through the cached forwards."""
        selector = None if setting.method == GATE_METHOD else setting.method
        return SPASettings(
            selector=selector,
            selector_amount=setting.amount if selector else 0.5,
            threshold=setting.amount if selector is None else entry.saved_threshold,
            policy=setting.policy,
            container_len=setting.container_len or 49,
            fusion=setting.fusion or entry.saved_fusion,
            unkept=setting.unkept or entry.saved_unkept,
        )

    @staticmethod
    def _first_guess(setting: Setting, first: _ColumnRun) -> Setting:
        """Where the search for equal compute starts: a selector that keeps a ratio starts at the first
        column's kept share (compute follows the kept share closely, so one run often lands within 2%);
        other methods start at the amount asked for."""
        if setting.method in SELECTORS and SELECTORS[setting.method].amount == "ratio":
            return replace(setting, amount=min(max(first.kept, 0.01), 1.0))
        return setting

    def _matched(self, entry: LoadedModel, batch: _Prepared, setting: Setting, target: float) -> Setting:
        """``setting`` with its amount moved to spend ``target`` backbone MACs per image (within 2%; the
        closest reachable amount otherwise), cached per model, images, setting and target."""
        key = (entry.key, batch.digests, setting, round(target))
        cached = self._matches.get(key)
        if cached is not None:
            return cached
        with entry.lock:
            run = match_compute(entry.model, batch.inputs.to(self.device), setting, target, tolerance=0.02)
        return self._matches.put(key, run.setting)

    def _merging(self, entry: LoadedModel, batch: _Prepared, setting: Setting) -> _Merged:
        """A token-merging run of ``batch`` (cached per model, images and r)."""
        key = (entry.key, batch.digests, int(setting.amount))
        cached = self._merged.get(key)
        if cached is not None:
            return cached
        with entry.lock:
            with stopwatch(self.device) as timing:
                run = run_setting(entry.model, batch.inputs.to(self.device), setting)
            self.forward_count += 1
        backbone = find_backbone(entry.model)
        grid = tuple(int(v) for v in backbone.patch_embed.grid_size)
        prefix = int(backbone.num_prefix_tokens)
        groups = run.groups[:, prefix:].reshape(-1, *grid)
        merged = _Merged(_to_cpu(run.output), run.macs, run.dense_macs, run.kept, groups, timing.wall)
        return self._merged.put(key, merged)

    def _merging_clock(self, entry: LoadedModel, batch: _Prepared, merged: _Merged, r: int) -> WallClock:
        """Median wall-clock of the dense twin and token merging on ``batch``, alternating (cached)."""
        key = (entry.key, batch.digests, (TOKEN_MERGING, r))
        cached = self._timings.get(key)
        if cached is not None:
            return cached
        model, x = entry.model, batch.inputs.to(self.device)
        backbone = find_backbone(model)
        merging = TokenMerging(r, entry.spa_layers)

        def dense() -> None:
            with dense_twin(model):
                model(x)

        def merge() -> None:
            with merging_forward(model, backbone, merging):
                model(x)

        with entry.lock:
            with torch.no_grad():
                timing = time_paired(
                    {"dense": dense, "spa": merge}, self._timing_repeats(merged.seconds), warmup=1, device=self.device
                )
            self.timing_count += 1
        return self._timings.put(key, WallClock.of(timing, len(batch.images)))

    def _run_column(self, entry: LoadedModel, batch: _Prepared, setting: Setting) -> _ColumnRun:
        dense = self._dense_forward(entry, batch)
        if setting.method == TOKEN_MERGING:
            merged = self._merging(entry, batch, setting)
            return _ColumnRun(
                entry, batch, setting, merged.output, dense, merged.macs, merged.dense_macs, merged.kept, merged=merged
            )
        spa = self._spa_of(entry, setting)
        forward = self._spa_forward(entry, batch, spa)
        trace = forward.trace
        size = trace.batch_size
        return _ColumnRun(
            entry,
            batch,
            setting,
            forward.output,
            dense,
            trace.backbone_macs_run / size,
            trace.backbone_macs_dense / size,
            trace.mean_keep_ratio,
            trace=trace,
            spa=spa,
        )

    def _column_error(self, run: _ColumnRun) -> tuple[str, float]:
        """The column's output error vs its dense twin, averaged over the batch."""
        adapter = run.entry.adapter
        values = [adapter.output_error(run.output, run.dense.output, i) for i in range(len(run.batch.images))]
        return values[0][0], float(np.mean([value for _, value in values]))

    def _column_labels(self, run: _ColumnRun, record: LayerTrace | None) -> SelectionCounts | None:
        """Kept tokens at the shown layer vs the selection labels, pooled over the images that have labels."""
        if record is None or run.trace is None:
            return None
        keep, truth = [], []
        for i in range(len(run.batch.images)):
            labels = self._labels_of(run.entry, run.batch, run.dense, i, run.trace)
            if labels is not None:
                keep.append(record.keep[i])
                truth.append(labels.by_grid[record.grid])
        if not keep:
            return None
        return SelectionCounts.of(torch.cat(keep), torch.cat(truth))

    def _column_view(
        self, number: int, run: _ColumnRun, layer: int | None, index: int, clock: WallClock | None
    ) -> ColumnView:
        """One column's pictures of image ``index`` and its table row."""
        entry, batch = run.entry, run.batch
        display, name = batch.displays[index], batch.images[index].name
        record = None
        if run.merged is not None:
            tokens = inspection.merge_groups_panel(
                display, run.merged.groups[index], f"ToMe merge groups · r = {int(run.setting.amount)} per layer"
            )
        else:
            record = self._pick_layer(run.trace, layer)
            tokens = panels.kept_panel(display, record, index, name)
        output = entry.adapter.draw(display, run.output, index, self._truth_of(entry, batch.images[index]))
        difference = inspection.difference_panel(
            display, entry.adapter.output_difference(run.output, run.dense.output, index), "|output - dense twin|"
        )
        measure, error = self._column_error(run)
        counts = self._column_labels(run, record)
        saving = 1.0 - run.macs / run.dense_macs if run.dense_macs else 0.0
        ms = "measuring…" if clock is None else f"{clock.dense_s * 1000:.0f} → {clock.spa_s * 1000:.0f}"
        row = {
            "column": number,
            "model": entry.key,
            "method": run.setting.method,
            "amount": round(run.setting.amount, 4),
            "setting": run.setting.label(),
            "run_as": asdict(run.setting),
            "layer": None if record is None else record.layer,
            "gmacs_per_image": round(run.macs / 1e9, 4),
            "dense_gmacs_per_image": round(run.dense_macs / 1e9, 4),
            "macs_saved": round(saving, 4),
            "latency_ms": None if clock is None else clock.to_dict(),
            "tokens_kept": round(run.kept, 4),
            "output_error": {"measure": measure, "value": round(error, 5)},
            "label_precision": None if counts is None else round(float(counts.precision), 4),
            "label_recall": None if counts is None else round(float(counts.recall), 4),
            "table": [
                number,
                entry.key,
                run.setting.label(),
                round(run.macs / 1e9, 3),
                f"{saving:.1%}",
                ms,
                f"{run.kept:.1%}",
                round(error, 4),
                measure,
                "–" if counts is None else round(float(counts.precision), 3),
                "–" if counts is None else round(float(counts.recall), 3),
            ],
        }
        title = f"**{number}. {entry.key}** · {run.setting.label()} · {run.macs / 1e9:.2f} GMACs ({saving:.0%} saved)"
        return ColumnView(title, tokens, output, difference, row)

    def compare(
        self,
        paths: Sequence[str | Path] | None,
        columns: Sequence[Column],
        equal_compute: bool = False,
        layer: int | None = None,
        image_index: int = 0,
        *,
        measure: bool = True,
    ) -> Comparison:
        """2-4 columns (model + setting) on the same images: per column the kept tokens at ``layer`` (the
        nearest SPA layer of its model) or ToMe's merge groups, the output, |output - dense twin| and a
        table row. ``equal_compute``: every column after the first has its amount moved so that its
        backbone MACs per image match the first column's within 2%. ``measure`` False leaves the
        paired wall-clock of each column to a later call unless it is cached (the page shows the
        pictures first)."""
        if not 2 <= len(columns) <= MAX_COLUMNS:
            raise UserError(f"compare 2 to {MAX_COLUMNS} columns, got {len(columns)}")
        runs: list[_ColumnRun] = []
        notes: list[str] = []
        target: float | None = None
        for column in columns:
            entry = self.model(column.model)
            batch = self._prepare(entry, paths)
            setting = self._setting(entry, column)
            if equal_compute and runs:
                setting = self._matched(entry, batch, self._first_guess(setting, runs[0]), runs[0].macs)
            run = self._run_column(entry, batch, setting)
            if target is None:
                target = run.macs
            elif equal_compute and abs(run.macs / target - 1.0) > 0.02:
                notes.append(
                    f"column {len(runs) + 1} ({run.setting.label()}) cannot reach the first column's compute: "
                    f"closest {run.macs / 1e9:.2f} vs {target / 1e9:.2f} GMACs per image"
                )
            runs.append(run)
        first = runs[0].batch
        index, note = _image_index(image_index, len(first.images))
        notes = ([note] if note else []) + first.warnings + notes
        views = []
        for number, run in enumerate(runs, start=1):
            if run.merged is not None:
                key = (run.entry.key, run.batch.digests, (TOKEN_MERGING, int(run.setting.amount)))
                clock = (
                    self._merging_clock(run.entry, run.batch, run.merged, int(run.setting.amount))
                    if measure
                    else self._timings.get(key)
                )
            else:
                key = self._timing_key(run.entry, run.batch, run.spa)
                clock = self._wall_clock(run.entry, run.batch, run.spa) if measure else self._timings.get(key)
            views.append(self._column_view(number, run, layer, index, clock))
        status = (
            f"{len(first.images)} image(s): "
            + ", ".join(f"{i}: {im.name}" for i, im in enumerate(first.images))
            + f" · showing image {index}"
            + (" · equal compute: every column at the first column's backbone MACs (±2%)" if equal_compute else "")
        )
        if notes:
            status += "  \n⚠ " + "  \n⚠ ".join(notes)
        summary = {
            "images": [im.name for im in first.images],
            "image_index": index,
            "equal_compute": equal_compute,
            "target_gmacs_per_image": None if target is None else round(target / 1e9, 4),
            "device": str(self.device),
            "columns": [{k: v for k, v in view.row.items() if k != "table"} for view in views],
            "notes": notes,
        }
        return Comparison(status, views, [view.row["table"] for view in views], summary)

    def default_tradeoff_methods(self, model: str) -> list[str]:
        """The methods the trade-off sweeps unless asked otherwise: every method the model runs but the
        score-less baselines (:data:`TRADEOFF_SKIPPED`)."""
        return [m for m in available_methods(self.model(model).model) if m not in TRADEOFF_SKIPPED]

    def tradeoff(
        self,
        paths: Sequence[str | Path] | None,
        model: str,
        methods: Sequence[str] | None = None,
        points: int = 5,
        base: Column | None = None,
        progress: Progress | None = None,
    ) -> TradeoffView:
        """Output error vs backbone MACs on the user's images: ``points`` amounts of every method in
        ``methods`` (None: :meth:`default_tradeoff_methods`), with ``base``'s policy, fusion and unkept
        path; ``progress(fraction, text)`` after every run. Cached per model, images and request."""
        entry = self.model(model)
        available = available_methods(entry.model)
        methods = list(methods) if methods else self.default_tradeoff_methods(model)
        unknown = [m for m in methods if m not in available]
        if unknown:
            raise UserError(f"methods {unknown} do not run on {entry.key}; methods that do: {available}")
        if not 2 <= int(points) <= 12:
            raise UserError(f"the trade-off takes 2 to 12 points per method, got {points}")
        batch = self._prepare(entry, paths)
        base_setting = self._setting(entry, replace(base or Column(model), model=model, method=GATE_METHOD))
        key = (entry.key, batch.digests, tuple(methods), int(points), base_setting)
        cached = self._tradeoffs.get(key)
        if cached is not None:
            return cached
        dense = self._dense_forward(entry, batch)
        adapter = entry.adapter
        measure_name = adapter.output_error(dense.output, dense.output, 0)[0]

        def error(output: Any) -> float:
            output = _to_cpu(output)
            return float(np.mean([adapter.output_error(output, dense.output, i)[1] for i in range(len(batch.images))]))

        started = time.perf_counter()
        with entry.lock:
            curve = tradeoff_sweep(
                entry.model, batch.inputs.to(self.device), methods, error, int(points), base_setting, progress
            )
        seconds = time.perf_counter() - started
        dense_macs = curve[0].dense_macs if curve else None
        by_method = {m: [p for p in curve if p.setting.method == m] for m in methods}
        figure = inspection.tradeoff_figure(by_method, measure_name, dense_macs)
        info = {
            "model": entry.key,
            "images": [im.name for im in batch.images],
            "error_measure": measure_name,
            "dense_gmacs_per_image": None if dense_macs is None else round(dense_macs / 1e9, 4),
            "seconds": round(seconds, 2),
            "points": [
                {
                    "method": p.setting.method,
                    "amount": round(p.setting.amount, 4),
                    "setting": p.setting.label(),
                    "gmacs_per_image": round(p.macs / 1e9, 4),
                    "error": round(p.error, 5),
                    "tokens_kept": round(p.kept, 4),
                }
                for p in curve
            ],
        }
        return self._tradeoffs.put(key, TradeoffView(figure, info))

    # ---------------------------------------------------------------------------------- token

    def token_at(
        self, paths: Sequence[str | Path] | None, model: str, spa: SPASettings, layer: int | None, x: float, y: float
    ) -> tuple[int, int] | None:
        """The (row, column) of the token under pixel (``x``, ``y``) of the gate or kept panel of
        ``layer`` (their pictures sit below a title bar), or None outside the picture."""
        run = self._run(paths, model, spa, layer, 0)
        size = self.settings.display_size
        return inspection.token_at(x, y, (size, size), run.record.grid, inspection.title_height(size))

    def _block_inputs_of(self, entry: LoadedModel, batch: _Prepared, spa: SPASettings) -> tuple[Trace, BlockInputs]:
        """Every SPA block's input in one SPA and one dense run (cached per model, images and settings)."""
        key = (entry.key, batch.digests, spa.key())
        cached = self._block_inputs.get(key)
        if cached is not None:
            return cached
        with entry.lock:
            self._apply(entry, spa)
            _, record, inputs = record_block_inputs(entry.model, batch.inputs.to(self.device))
            self.forward_count += 2
        return self._block_inputs.put(key, (record, inputs))

    def token(
        self,
        paths: Sequence[str | Path] | None,
        model: str,
        spa: SPASettings,
        layer: int | None,
        image_index: int,
        row: int,
        column: int,
    ) -> TokenView:
        """One token of one image at one SPA layer (the nearest to ``layer``): per head, its attention over
        the tokens it could see in its packed run beside the dense twin's, its gate score, whether fusion
        decided, its packed row and slot. The first click on a batch and settings records every SPA
        block's input (one SPA and one dense forward); later clicks read that cache."""
        started = time.perf_counter()
        entry, spa = self._settle(model, spa)
        batch = self._prepare(entry, paths)
        index, note = _image_index(image_index, len(batch.images))
        record, inputs = self._block_inputs_of(entry, batch, spa)
        decision = self._pick_layer(record, layer)
        with entry.lock:
            self._apply(entry, spa)
            try:
                view = inspect_token(entry.model, record, inputs, decision.layer, index, int(row), int(column))
            except ValueError as err:
                raise UserError(str(err)) from err
        picture = inspection.token_attention_panel(batch.displays[index], view, decision)
        info = {
            "model": entry.key,
            "settings": asdict(spa),
            "image": batch.images[index].name,
            **view.summary(),
            "tau": decision.tau,
            "score_source": panels.score_source(decision, index),
            "seconds": round(time.perf_counter() - started, 4),
            "notes": [note] if note else [],
        }
        return TokenView(picture, info)

    def column_token(
        self,
        paths: Sequence[str | Path] | None,
        column: Column,
        layer: int | None,
        image_index: int,
        x: float,
        y: float,
    ) -> TokenView:
        """A click at pixel (``x``, ``y``) of a comparison column's token picture: for a gate or selector
        the token's attention (:meth:`token`), for ToMe the patches merged into the same token."""
        entry = self.model(column.model)
        setting = self._setting(entry, column)
        batch = self._prepare(entry, paths)
        index, _ = _image_index(image_index, len(batch.images))
        size = self.settings.display_size
        top = inspection.title_height(size)
        if setting.method != TOKEN_MERGING:
            spa = self._spa_of(entry, setting)
            record = self._pick_layer(self._spa_forward(entry, batch, spa).trace, layer)
            position = inspection.token_at(x, y, (size, size), record.grid, top)
            if position is None:
                raise UserError("click on the picture of the tokens, below its title")
            return self.token(paths, entry.key, spa, record.layer, index, *position)
        merged = self._merging(entry, batch, setting)
        groups = merged.groups[index]
        position = inspection.token_at(x, y, (size, size), tuple(groups.shape), top)
        if position is None:
            raise UserError("click on the picture of the tokens, below its title")
        members = (groups == groups[position]).nonzero().tolist()
        picture = inspection.merge_groups_panel(
            batch.displays[index], groups, f"ToMe · r = {int(setting.amount)} per layer", highlight=position
        )
        info = {
            "model": entry.key,
            "method": TOKEN_MERGING,
            "r": int(setting.amount),
            "image": batch.images[index].name,
            "row": position[0],
            "column": position[1],
            "merged_patches": len(members),
            "patches": [list(member) for member in members],
        }
        return TokenView(picture, info)

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
