"""The Dataset tab's logic without any UI: a model over a whole image set, in bounded batches.

A run (:meth:`DatasetService.run`) opens a source (a built-in split, a folder under the allowed folders,
or an uploaded zip extracted safely), analyses it batch by batch with
:func:`spa_viz.analysis.dataset.analyse_dataset` (the model's lock is held for one batch at a time, so
other requests interleave) and yields a :class:`DatasetView` after every batch: the partial results
stream to the page. At the end it measures the wall-clock of the dense twin and SPA on one batch
(paired, :func:`spa_viz.io.timer.time_paired`), optionally sweeps the learned gate's threshold and peer
methods (:func:`~spa_viz.analysis.dataset.dataset_sweep`), and writes the rows as CSV and the summary
as JSON into a bounded folder.

Memory stays bounded: images are read one batch at a time and only the rows are kept (at most
``max_images``, default 500); finished runs are kept for re-rendering and opening images, a few at a
time (least recently used dropped, with their files).
"""

from __future__ import annotations

import hashlib
import logging
import re
import shutil
import stat
import threading
import uuid
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import plotly.graph_objects as go
import torch
from PIL import Image

import spa_viz
from spa_viz.analysis.compare import LEARNED_GATE, available_methods
from spa_viz.analysis.dataset import (
    DEFAULT_MAX_IMAGES,
    DatasetSummary,
    ImageRow,
    SweepPoint,
    analyse_dataset,
    dataset_sweep,
    rows_to_csv,
    summarise,
    summary_to_json,
)
from spa_viz.data.sources import BUILTIN_SOURCES, FolderSource, ImageSource, SourceUnavailableError, builtin_source
from spa_viz.io.timer import time_paired
from spa_viz.models.twin import dense_twin
from spa_viz.selection.selectors import remove_selector

from .files import BoundedFolder, UploadSweeper
from .models import LoadedModel
from .service import AnalysisService, UserError, WallClock

__all__ = [
    "SOURCE_FOLDER",
    "SOURCE_ZIP",
    "WORST_KINDS",
    "DatasetLimits",
    "DatasetRequest",
    "DatasetService",
    "DatasetView",
    "apply_gate",
    "extract_images",
]

_log = logging.getLogger(__name__)

SOURCE_FOLDER = "folder (under the allowed folders)"
SOURCE_ZIP = "uploaded zip of images"
SOURCE_CHOICES = (*BUILTIN_SOURCES, SOURCE_FOLDER, SOURCE_ZIP)
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"})
WORST_KINDS = {
    "recall": "lowest recall of the kept tokens against the labels",
    "output_error": "furthest output from the dense twin's",
    "keep": "most tokens kept (least compute saved)",
}
"""The worst-k lists (:attr:`DatasetSummary.worst`) and what each ranks by."""
DEFAULT_SWEEP = (0.1, 0.3, 0.5, 0.7, 0.9)
_CHUNK = 1 << 16


@dataclass(frozen=True)
class DatasetLimits:
    """What one dataset run may use: images, batch size, the uploaded zip, and the files and runs kept."""

    max_images: int = DEFAULT_MAX_IMAGES
    batch_size: int = 32
    max_batch_size: int = 64
    zip_bytes: int = 50_000_000
    """Largest uploaded zip (compressed) accepted."""
    zip_files: int = 2_000
    """Image files extracted from one zip at most (the rest are left out, with a note)."""
    zip_extracted_bytes: int = 200_000_000
    """Bytes one zip may extract to (counted while writing: a zip bomb stops here)."""
    uploads: int = 4
    """Extracted zips kept on disk (least recently used dropped)."""
    runs: int = 4
    """Finished runs kept (rows for re-rendering, exports, thumbnails; least recently used dropped)."""
    worst_k: int = 8
    thumbnail: int = 112
    timing_repeats: int = 3


@dataclass(frozen=True)
class DatasetRequest:
    """One run's choices (the ``/dataset`` endpoint's arguments)."""

    source: str
    model: str
    threshold: float
    folder: str = ""
    archive: str | None = None
    max_images: int | None = None
    """Images read at most (None: the service's cap, :attr:`DatasetLimits.max_images`)."""
    batch_size: int = 32
    layer: int | None = None
    sweep: bool = True
    thresholds: Sequence[float] = DEFAULT_SWEEP
    peers: Sequence[str] = ()


@dataclass
class DatasetView:
    """What the tab shows after a batch (``done``: the run is over, with exports and galleries)."""

    run_id: str
    status: str
    summary: str
    scatter: go.Figure | None
    boxes: go.Figure | None
    sweep: go.Figure | None = None
    worst: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    csv: str | None = None
    json: str | None = None
    done: bool = False
    images: int = 0


@dataclass
class _Run:
    """A run's state: kept while it is among the last few, for re-rendering and opening its images."""

    run_id: str
    request: DatasetRequest
    entry: LoadedModel
    source: ImageSource
    folder: Path
    rows: list[ImageRow] = field(default_factory=list)
    summary: DatasetSummary | None = None
    wall: WallClock | None = None
    points: list[SweepPoint] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def apply_gate(entry: LoadedModel, threshold: float) -> None:
    """The model's learned gate at ``threshold`` with the fusion mode and unkept path it was saved with,
    SPA on, no selector installed (caller holds ``entry.lock``: other tabs change these settings too)."""
    remove_selector(entry.model)
    try:
        spa_viz.configure(
            entry.model,
            threshold=float(threshold),
            policy="image",
            container_len=None,
            fusion=entry.saved_fusion,
            unkept=entry.saved_unkept,
            enabled=True,
        )
    except ValueError as err:
        raise UserError(f"invalid SPA setting: {err}") from err


def _safe_name(name: str) -> str:
    """The last part of an archive member's name, reduced to safe characters (never a path)."""
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", name.replace("\\", "/").rsplit("/", 1)[-1]).strip("._")
    return base[:80] or "image"


def extract_images(archive: Path, target: Path, max_files: int, max_bytes: int) -> tuple[list[Path], list[str]]:
    """Extract the image files of the zip ``archive`` flat into ``target`` and return them with notes.

    Safe by construction: no member's folder part is used (each file is written as ``NNNNN_name``
    inside ``target``, so ``../`` or absolute names cannot leave it), links and folders are skipped,
    at most ``max_files`` images are extracted and at most ``max_bytes`` written in all, counted while
    writing (the sizes a zip declares are not trusted). Raises :class:`UserError` for a file that is
    no zip, an archive without images, or one that expands past ``max_bytes``.
    """
    try:
        bundle = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as err:
        raise UserError(f"{archive.name} is not a readable zip archive ({err})") from err
    target.mkdir(parents=True, exist_ok=True)
    written, files, notes, skipped = 0, [], [], 0
    with bundle:
        members = [m for m in bundle.infolist() if not m.is_dir()]
        for member in members:
            mode = member.external_attr >> 16
            if stat.S_ISLNK(mode) or Path(member.filename).suffix.lower() not in IMAGE_SUFFIXES:
                skipped += 1
                continue
            if len(files) >= max_files:
                notes.append(f"only the first {max_files} images of the zip were extracted (the limit)")
                break
            path = target / f"{len(files):05d}_{_safe_name(member.filename)}"
            try:
                with bundle.open(member) as source, open(path, "wb") as sink:
                    while chunk := source.read(_CHUNK):
                        written += len(chunk)
                        if written > max_bytes:
                            raise UserError(
                                f"{archive.name} expands to more than {max_bytes / 1e6:.0f} MB; upload fewer or "
                                "smaller images"
                            )
                        sink.write(chunk)
            except (zipfile.BadZipFile, OSError, RuntimeError, EOFError) as err:  # corrupt or encrypted member
                path.unlink(missing_ok=True)
                notes.append(f"skipped {_safe_name(member.filename)}: {err}")
                continue
            files.append(path)
    if skipped:
        notes.append(f"{skipped} entries of the zip are no image file (or a link) and were left out")
    if not files:
        raise UserError(f"{archive.name} holds no image file ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return files, notes


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{value:.1%}"


def _number(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


class DatasetService:
    """Dataset runs on top of the app's :class:`~app.service.AnalysisService` (its models and files)."""

    def __init__(self, analysis: AnalysisService, limits: DatasetLimits | None = None) -> None:
        self.analysis = analysis
        self.limits = limits or DatasetLimits()
        root = analysis.files.root
        self.uploads = BoundedFolder(root / "dataset_uploads", self.limits.uploads)
        self.outputs = BoundedFolder(root / "dataset_runs", self.limits.runs)
        self.opened = BoundedFolder(root / "dataset_opened", 16)
        settings = analysis.settings
        self.sweep_uploads = UploadSweeper(settings.cache_check_s, settings.cache_age_s)
        self.allowed = tuple(p.resolve() for p in (*settings.allow_dirs, settings.examples_dir))
        self._runs: OrderedDict[str, _Run] = OrderedDict()
        self._cancel: dict[str, threading.Event] = {}
        self._builtin: dict[tuple[str, str], ImageSource] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------------------- sources

    def _folder(self, folder: str) -> ImageSource:
        if not folder.strip():
            raise UserError("name a folder of images (inside one of the allowed folders)")
        path = Path(folder).expanduser().resolve()
        if not any(path == root or path.is_relative_to(root) for root in self.allowed):
            names = ", ".join(str(p) for p in self.allowed)
            raise UserError(f"{folder} is outside the folders this app may read ({names}); start it with --allow-dir")
        if not path.is_dir():
            raise UserError(f"{folder} is not a folder")
        source = FolderSource.from_folder(path)
        if not len(source):
            raise UserError(f"{folder} holds no file")
        return source

    def _archive(self, archive: str | None) -> tuple[ImageSource, list[str]]:
        if not archive:
            raise UserError("upload a zip of images")
        path = Path(archive)
        try:
            size = path.stat().st_size
        except OSError as err:
            raise UserError(f"the uploaded zip is gone ({err.strerror}); upload it again") from err
        if size > self.limits.zip_bytes:
            raise UserError(f"the zip is {size / 1e6:.1f} MB; the limit is {self.limits.zip_bytes / 1e6:.0f} MB")
        digest = hashlib.sha1()
        with open(path, "rb") as handle:
            while chunk := handle.read(_CHUNK):
                digest.update(chunk)
        name = digest.hexdigest()[:16]
        folder = self.uploads.reuse(name)
        notes: list[str] = []
        if folder is None or not any(folder.iterdir()):
            folder = self.uploads.claim(name)
            shutil.rmtree(folder, ignore_errors=True)
            try:
                files, notes = extract_images(path, folder, self.limits.zip_files, self.limits.zip_extracted_bytes)
            except UserError:
                shutil.rmtree(folder, ignore_errors=True)
                raise
        else:
            files = sorted(folder.iterdir())
        return FolderSource(files, name=f"zip/{path.stem}"), notes

    def open_source(self, request: DatasetRequest, entry: LoadedModel) -> tuple[ImageSource, list[str]]:
        """The image source a request names, with notes (e.g. what a zip left out)."""
        if request.source in BUILTIN_SOURCES:
            key = (request.source, entry.key)
            with self._lock:
                cached = self._builtin.get(key)
            if cached is None:
                try:
                    cached = builtin_source(request.source, entry.config)
                except SourceUnavailableError as err:
                    raise UserError(str(err)) from err
                with self._lock:
                    self._builtin = {k: v for k, v in self._builtin.items() if k[0] != request.source}
                    self._builtin[key] = cached
            return cached, []
        if request.source == SOURCE_FOLDER:
            return self._folder(request.folder), []
        if request.source == SOURCE_ZIP:
            return self._archive(request.archive)
        raise UserError(f"unknown source {request.source!r}; choose one of {list(SOURCE_CHOICES)}")

    # ----------------------------------------------------------------------------------- runs

    def cancel(self, session: str) -> bool:
        """Ask the session's running analysis to stop before its next batch (True when one was running)."""
        event = self._cancel.get(session)
        if event is None:
            return False
        event.set()
        return True

    def _keep(self, run: _Run) -> None:
        with self._lock:
            self._runs[run.run_id] = run
            self._runs.move_to_end(run.run_id)
            while len(self._runs) > self.limits.runs:
                self._runs.popitem(last=False)

    def get_run(self, run_id: str) -> _Run:
        with self._lock:
            run = self._runs.get(run_id)
        if run is None:
            raise UserError("this dataset run is no longer kept (the app keeps the last few); run it again")
        return run

    def _validate(self, request: DatasetRequest) -> DatasetRequest:
        limits = self.limits
        if request.max_images is None:
            request = replace(request, max_images=limits.max_images)
        if not 1 <= int(request.max_images) <= limits.max_images:
            raise UserError(f"max_images must lie in 1..{limits.max_images}, got {request.max_images}")
        if not 1 <= int(request.batch_size) <= limits.max_batch_size:
            raise UserError(f"batch_size must lie in 1..{limits.max_batch_size}, got {request.batch_size}")
        if not 0.0 <= float(request.threshold) <= 1.0:
            raise UserError(f"threshold must lie in [0, 1], got {request.threshold}")
        if any(not 0.0 <= float(t) <= 1.0 for t in request.thresholds):
            raise UserError(f"sweep thresholds must lie in [0, 1], got {list(request.thresholds)}")
        if request.sweep and not request.thresholds and not request.peers:
            raise UserError("the sweep needs thresholds or peer methods")
        return request

    def run(
        self,
        request: DatasetRequest,
        session: str = "",
        progress: Callable[[float, str], None] | None = None,
    ) -> Iterator[DatasetView]:
        """Analyse the request's source batch by batch, yielding the partial view after each batch and the
        finished one (summary, wall-clock, sweep, worst images, exports) last. :meth:`cancel` with the same
        ``session`` stops it before the next batch; what was analysed is then summarised and exported."""
        self.sweep_uploads()
        request = self._validate(request)
        entry = self.analysis.model(request.model)
        if not entry.spa_layers:
            raise UserError(f"{entry.key} has no SPA layer to analyse")
        unknown = [p for p in request.peers if p not in available_methods(entry.model) or p == LEARNED_GATE]
        if unknown:
            peers = [m for m in available_methods(entry.model) if m != LEARNED_GATE]
            raise UserError(f"peer methods {unknown} cannot run on {entry.key}; choose from {peers}")
        source, notes = self.open_source(request, entry)
        run_id = uuid.uuid4().hex[:12]
        run = _Run(run_id, request, entry, source, self.outputs.claim(run_id), notes=notes)
        run.folder.mkdir(parents=True, exist_ok=True)
        self._keep(run)
        cancel = threading.Event()
        self._cancel[session] = cancel
        try:
            yield from self._analyse(run, cancel, progress)
            if cancel.is_set():
                run.notes.append(f"cancelled after {len(run.rows)} images")
            if not run.rows:
                raise UserError("no image was analysed" + (" (cancelled)" if cancel.is_set() else ""))
            if not cancel.is_set():
                if progress:
                    progress(1.0, "timing the dense twin and SPA on one batch")
                run.wall = self._wall_clock(run)
            if request.sweep and not cancel.is_set():
                run.points = self._sweep(run, cancel, progress)
            yield self._finish(run)
        finally:
            if self._cancel.get(session) is cancel:
                del self._cancel[session]

    def _analyse(
        self, run: _Run, cancel: threading.Event, progress: Callable[[float, str], None] | None
    ) -> Iterator[DatasetView]:
        request, entry, source = run.request, run.entry, run.source
        expected = min(len(source), int(request.max_images))
        stream = analyse_dataset(
            entry.model,
            entry.adapter,
            source.batches(entry.adapter, int(request.batch_size), int(request.max_images)),
            max_images=int(request.max_images),
            total=len(source),
            cancel=cancel.is_set,
        )
        while True:
            with entry.lock:  # one batch at a time: other requests run between batches
                apply_gate(entry, request.threshold)
                with torch.no_grad():
                    rows = next(stream, None)
            if rows is None:
                break
            run.rows.extend(rows)
            if progress:
                progress(len(run.rows) / max(expected, 1), f"{len(run.rows)} of {expected} images")
            yield self._partial(run, expected)

    def _wall_clock(self, run: _Run) -> WallClock:
        """Median wall-clock of the dense twin and SPA on the set's first batch, alternating, no tracing."""
        entry, request = run.entry, run.request
        batch = next(iter(run.source.batches(entry.adapter, int(request.batch_size), int(request.batch_size))))
        x = batch.images.to(self.analysis.device)

        def dense() -> None:
            with dense_twin(entry.model):
                entry.model(x)

        def sparse() -> None:
            entry.model(x)

        with entry.lock, torch.no_grad():
            apply_gate(entry, request.threshold)
            timing = time_paired({"dense": dense, "spa": sparse}, self.limits.timing_repeats, warmup=1)
        return WallClock.of(timing, len(batch))

    def _sweep(
        self, run: _Run, cancel: threading.Event, progress: Callable[[float, str], None] | None
    ) -> list[SweepPoint]:
        """The threshold sweep and peers over the analysed images; the model's lock is held per batch."""
        entry, request = run.entry, run.request
        lock = entry.lock

        def locked(batches: Iterator[Any]) -> Iterator[Any]:
            for batch in batches:
                with lock:
                    apply_gate(entry, request.threshold)
                    yield batch

        batches = locked(iter(run.source.batches(entry.adapter, int(request.batch_size), len(run.rows))))
        try:
            with torch.no_grad():
                return dataset_sweep(
                    entry.model,
                    entry.adapter,
                    batches,
                    [float(t) for t in request.thresholds],
                    peers=list(request.peers),
                    points=len(request.thresholds) or 5,
                    max_images=len(run.rows),
                    total=len(run.rows),
                    progress=(lambda f, text: progress(f, f"sweep: {text}")) if progress else None,
                    cancel=cancel.is_set,
                )
        finally:
            batches.close()  # a sweep stopped early leaves the generator inside its lock: release it

    # ------------------------------------------------------------------------------- the view

    def _layer(self, run: _Run, layer: int | None) -> int:
        layers = run.entry.spa_layers
        return layers[0] if layer is None else min(layers, key=lambda candidate: abs(candidate - float(layer)))

    def _partial(self, run: _Run, expected: int) -> DatasetView:
        layer = self._layer(run, run.request.layer)
        return DatasetView(
            run.run_id,
            f"⏳ {len(run.rows)} of {expected} images of {run.source.name} analysed with {run.entry.key} …",
            self._summary_text(run, summarise(run.rows, layer=layer)),
            self.scatter(run.run_id, layer),
            self._boxes(run),
            images=len(run.rows),
        )

    def _finish(self, run: _Run) -> DatasetView:
        layer = self._layer(run, run.request.layer)
        run.summary = summarise(run.rows, worst_k=self.limits.worst_k, layer=layer)
        csv_path, json_path = run.folder / "dataset_rows.csv", run.folder / "dataset_summary.json"
        rows_to_csv(run.rows, csv_path)
        meta = {
            "model": run.entry.key,
            "source": run.source.name,
            "threshold": float(run.request.threshold),
            "fusion": run.entry.saved_fusion,
            "unkept": run.entry.saved_unkept,
            "wall_clock_ms": run.wall.to_dict() if run.wall else None,
            "sweep": [point.to_dict() for point in run.points],
            "notes": run.notes,
            "skipped": [{"input": p, "reason": r} for p, r in getattr(run.source, "skipped", [])],
        }
        summary_to_json(run.summary, run.rows, json_path, meta)
        status = f"✅ {len(run.rows)} images of {run.source.name} analysed with {run.entry.key}"
        if run.notes:
            status += "  \n" + "  \n".join(f"⚠ {note}" for note in run.notes)
        return DatasetView(
            run.run_id,
            status,
            self._summary_text(run, run.summary),
            self.scatter(run.run_id, layer),
            self._boxes(run),
            self._sweep_figure(run),
            {kind: self._gallery(run, kind) for kind in WORST_KINDS},
            str(csv_path),
            str(json_path),
            done=True,
            images=len(run.rows),
        )

    def _summary_text(self, run: _Run, summary: DatasetSummary) -> str:
        rows = run.rows
        spa_ms, dense_ms = summary.ms_spa_per_image, summary.ms_dense_per_image
        throughput = 1e3 / (spa_ms + dense_ms) if spa_ms and dense_ms else None
        labels = ", ".join(f"{k} ({v})" for k, v in summary.label_sources.items())
        lines = [
            f"**{summary.images} images** · model {run.entry.key} · learned gate at threshold "
            f"{float(run.request.threshold):g} · labels: {labels}",
            f"**Kept** {summary.mean_keep:.1%} of the tokens on average · **backbone MACs saved** "
            f"{summary.macs_saved_pooled:.1%} over the set ({summary.macs_dense_mean / 1e9:.3f} → "
            f"{summary.macs_run_mean / 1e9:.3f} GMACs per image)",
            f"Keep vs object share: Pearson r = {_number(summary.keep_object_correlation, 2)}",
        ]
        if summary.output_gap is not None:
            lines.append(f"Output vs the dense twin ({summary.output_gap_name}): mean {summary.output_gap.mean:.3f}")
        if throughput:
            lines.append(
                f"Analysis speed: {throughput:.1f} images/s (one traced SPA and one dense forward per image; "
                f"traced SPA {spa_ms:.1f} ms, dense {dense_ms:.1f} ms per image)"
            )
        if run.wall is not None:
            lines.append(run.wall.line(summary.macs_saved_pooled))
        per_layer = " · ".join(
            f"L{s.layer}: keep {s.keep.mean:.2f}, recall {_number(s.recall.mean if s.recall else None, 2)}"
            for s in summary.layers
        )
        lines.append(f"Per layer (means): {per_layer}")
        if rows and rows[0].label_source is None:
            lines.append("No labels: precision / recall / IoU are not available for this set and model.")
        return "  \n".join(lines)

    def scatter(self, run_id: str, layer: int | None = None) -> go.Figure:
        """One dot per image: keep ratio at SPA layer ``layer`` (nearest) against the object share, colour =
        recall; hover names the image and its index (the number "Open image" takes)."""
        run = self.get_run(run_id)
        chosen = self._layer(run, layer)
        rows = [row for row in run.rows if chosen in row.layers]
        share = [row.object_share for row in rows]
        keep = [row.at(chosen, row.keep) for row in rows]
        recall = [row.at(chosen, row.recall) for row in rows]
        has_recall = all(r is not None for r in recall) and rows
        label = rows[0].label_source if rows else None
        figure = go.Figure(
            go.Scatter(
                x=[s if s is not None else float("nan") for s in share],
                y=keep,
                mode="markers",
                marker={
                    "size": 7,
                    "color": recall if has_recall else "#1f77b4",
                    "colorscale": "Viridis",
                    "cmin": 0,
                    "cmax": 1,
                    "showscale": bool(has_recall),
                    "colorbar": {"title": {"text": "recall"}},
                },
                customdata=[
                    [row.index, row.name, r if r is not None else float("nan")] for row, r in zip(rows, recall)
                ],
                hovertemplate="image %{customdata[0]}: %{customdata[1]}<br>object share %{x:.2f}<br>"
                "keep %{y:.2f}<br>recall %{customdata[2]:.2f}<extra></extra>",
            )
        )
        top = max([1.0, *(k for k in keep if k is not None)])
        figure.add_trace(
            go.Scatter(x=[0, 1], y=[0, 1], mode="lines", line={"dash": "dot", "color": "grey"}, name="keep = share")
        )
        figure.update_layout(
            title=f"Keep at SPA layer {chosen} vs object share ({len(rows)} images)",
            xaxis_title=f"object share ({label or 'no labels'})",
            yaxis_title=f"share of tokens kept at layer {chosen}",
            xaxis_range=[0, 1],
            yaxis_range=[0, top * 1.02],
            showlegend=False,
            height=420,
            margin={"l": 60, "r": 20, "t": 50, "b": 50},
        )
        return figure

    def _boxes(self, run: _Run) -> go.Figure:
        """Per SPA layer, the distribution over images of precision, recall and IoU (keep without labels)."""
        figure = go.Figure()
        labelled = [row for row in run.rows if row.recall is not None]
        measures = ("precision", "recall", "iou") if labelled else ("keep",)
        rows = labelled or run.rows
        for name in measures:
            x, y = [], []
            for row in rows:
                values = getattr(row, name)
                for layer, value in zip(row.layers, values):
                    x.append(f"L{layer}")
                    y.append(value)
            figure.add_trace(go.Box(x=x, y=y, name=name, boxmean=True))
        figure.update_layout(
            boxmode="group",
            title="Kept tokens vs the labels, per SPA layer (distribution over images)"
            if labelled
            else "Keep per SPA layer (no labels for this set)",
            yaxis_title="value",
            yaxis_range=[0, 1.02],
            height=380,
            margin={"l": 60, "r": 20, "t": 50, "b": 40},
        )
        return figure

    @staticmethod
    def _metric(points: Sequence[SweepPoint]) -> tuple[str, str]:
        """The metric the sweep plot shows and its axis title."""
        present = set().union(*(point.metrics for point in points))
        if "AP50" in present:
            return "AP50", "AP50 (ground-truth boxes)"
        if "max_f_measure" in present:
            return "max_f_measure", "max F-measure (beta² = 0.3) against the object masks"
        name = next((p.output_gap_name for p in points if p.output_gap_name), "output gap")
        return "output_gap", f"{name} (vs the dense twin)"

    def _sweep_figure(self, run: _Run) -> go.Figure | None:
        if not run.points:
            return None
        metric, title = self._metric(run.points)
        figure = go.Figure()
        methods = list(dict.fromkeys(point.method for point in run.points))
        for method in methods:
            points = sorted((p for p in run.points if p.method == method), key=lambda p: p.macs)
            figure.add_trace(
                go.Scatter(
                    x=[p.macs / 1e9 for p in points],
                    y=[p.metrics.get(metric) for p in points],
                    mode="markers" if method == "dense" else "lines+markers",
                    marker={
                        "size": 12 if method == "dense" else 8,
                        "symbol": "star" if method == "dense" else "circle",
                    },
                    name="dense twin" if method == "dense" else method,
                    text=[p.label for p in points],
                    hovertemplate="%{text}<br>%{x:.3f} GMACs<br>" + metric + " %{y:.3f}<extra></extra>",
                )
            )
        figure.update_layout(
            title=f"{metric} vs backbone MACs on this set ({run.points[0].images} images)",
            xaxis_title="backbone GMACs per image",
            yaxis_title=title,
            height=420,
            margin={"l": 60, "r": 20, "t": 50, "b": 50},
        )
        return figure

    def _thumbnail(self, run: _Run, index: int) -> str:
        path = run.folder / f"thumb_{index:06d}.png"
        if not path.exists():
            image = Image.fromarray(np.ascontiguousarray(run.source.pixels(index)))
            image.thumbnail((self.limits.thumbnail, self.limits.thumbnail))
            image.save(path, format="PNG", compress_level=1)
        return str(path)

    def _gallery(self, run: _Run, kind: str) -> list[tuple[str, str]]:
        ranked = run.summary.worst.get(kind, []) if run.summary else []
        label = {"output_error": "error"}.get(kind, kind)
        return [(self._thumbnail(run, r.index), f"#{r.index} {label} {r.value:.2f} · {r.name}") for r in ranked]

    def worst_index(self, run_id: str, kind: str, position: int) -> int:
        """The source index of entry ``position`` of the run's worst-k list ``kind``."""
        run = self.get_run(run_id)
        if kind not in WORST_KINDS:
            raise UserError(f"unknown list {kind!r}; choose one of {list(WORST_KINDS)}")
        ranked = run.summary.worst.get(kind, []) if run.summary else []
        if not 0 <= position < len(ranked):
            raise UserError(f"the {kind} list has {len(ranked)} images; no entry {position}")
        return ranked[position].index

    def open_image(self, run_id: str, index: int) -> tuple[str, str, float]:
        """Image ``index`` of the run's source as a PNG file for the Analyze tab, with the run's model and
        threshold (the same settings)."""
        run = self.get_run(run_id)
        index = int(index)
        if not 0 <= index < len(run.source):
            raise UserError(f"{run.source.name} has images 0..{len(run.source) - 1}; no image {index}")
        stem = Path(next((row.name for row in run.rows if row.index == index), f"image_{index}")).stem
        name = f"{run.run_id}_{index:06d}"
        folder = self.opened.reuse(name)
        if folder is None:
            folder = self.opened.claim(name)
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.ascontiguousarray(run.source.pixels(index))).save(folder / f"{_safe_name(stem)}.png")
        path = next(folder.glob("*.png"))
        return str(path), run.entry.key, float(run.request.threshold)
