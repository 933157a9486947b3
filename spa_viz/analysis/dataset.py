"""A model over a whole image set: one row per image, a summary of the set, and the trade-off curve on it.

:func:`analyse_dataset` runs a source's batches (:mod:`spa_viz.data.sources`) through one traced SPA
forward and one dense-twin forward each and yields each batch's :class:`ImageRow` s as they are done
(a caller streams partial results; only rows are kept, never images). A row holds, per SPA layer,
the keep ratio and the precision / recall / IoU of the kept tokens against the image's selection
labels; the share of tokens labelled as object; backbone MACs as run and dense; how far the output is
from the dense twin's; and where the image sits in its source (``source``, ``index``: the source
re-reads it for a thumbnail or the main analysis).

Selection labels (the project's: a token is positive when an object pixel falls in its cell,
:mod:`spa_viz.selection.labels`) come from the source's object masks, else its boxes; without
annotations they come from the dense twin's output, as in the app: the saliency teacher's salient
pixels (:meth:`~spa_viz.viz.tasks.TaskAdapter.teacher_mask`) or, for detectors, the boxes of the dense
twin's detections. ``label_source`` says which.

:func:`summarise` turns rows into a :class:`DatasetSummary` (distributions, correlation of keep with
object share, worst images); :func:`rows_to_csv` / :func:`summary_to_json` write them atomically.
:func:`dataset_sweep` scores the learned gate's threshold sweep and the peers
(:mod:`spa_viz.analysis.compare`) by the task's metric against backbone MACs on the set: AP50 (and AP)
for detectors with ground-truth boxes, saliency MAE vs the dense twin and max F-measure against
object masks for saliency models.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from spa_viz.analysis.compare import LEARNED_GATE, TOKEN_MERGING, Setting, amount_range, run_setting
from spa_viz.analysis.flops import static_macs
from spa_viz.analysis.metrics import SelectionCounts, coco_ap, f_measure_curve, mask_iou
from spa_viz.analysis.trace import Trace, find_backbone
from spa_viz.analysis.trace import trace as traced_forward
from spa_viz.data.sources import DatasetBatch, ImageSource
from spa_viz.io.files import refuse_overwrite, write_atomic, write_text_atomic
from spa_viz.io.timer import stopwatch
from spa_viz.models.saliency.labels import SALIENT
from spa_viz.models.twin import dense_twin
from spa_viz.selection.labels import labels_from_boxes, labels_from_masks
from spa_viz.viz.tasks import DETECTION_AGREEMENT, DetectionTask, SaliencyTask, TaskAdapter

__all__ = [
    "DEFAULT_MAX_IMAGES",
    "DatasetSummary",
    "Distribution",
    "ImageRow",
    "LayerSummary",
    "Ranked",
    "SweepPoint",
    "analyse_dataset",
    "dataset_sweep",
    "load_rows",
    "rows_to_csv",
    "summarise",
    "summary_to_json",
    "sweep_settings",
    "write_dataset_summary",
]

log = logging.getLogger(__name__)

#: The default cap on the images one analysis reads (memory and time stay bounded).
DEFAULT_MAX_IMAGES = 500
#: Where each kind of selection label comes from (:attr:`ImageRow.label_source`).
LABEL_MASKS = "object masks"
LABEL_BOXES = "object boxes"
LABEL_TEACHER = f"dense teacher's saliency > {SALIENT:g}"
LABEL_DETECTIONS = "dense twin's detections"
#: Output gaps that measure agreement (1 = same output): their error is 1 - gap.
AGREEMENTS = frozenset({DETECTION_AGREEMENT})
SUMMARY_JSON = "dataset_summary.json"
ROWS_CSV = "dataset_rows.csv"

Progress = Callable[[float, str], None]
Cancel = Callable[[], bool]


# --------------------------------------------------------------------------------------------------
# Rows
# --------------------------------------------------------------------------------------------------


@dataclass
class ImageRow:
    """Everything the dataset view shows of one image. Per-layer lists follow ``layers`` (the SPA
    layers' indices); ``precision`` / ``recall`` / ``iou`` are None where the image has no labels."""

    source: str
    index: int
    """Position of the image in its source (``ImageSource.pixels(index)`` reads it again)."""
    name: str
    layers: list[int]
    keep: list[float]
    """Share of patch tokens kept, per SPA layer."""
    label_source: str | None = None
    object_share: float | None = None
    """Share of the first SPA layer's tokens labelled positive (object, or the dense output's salient area)."""
    precision: list[float] | None = None
    recall: list[float] | None = None
    iou: list[float] | None = None
    macs_run: int = 0
    """Backbone MACs of this image as SPA ran it (row padding belongs to no image and is left out)."""
    macs_dense: int = 0
    output_gap_name: str | None = None
    output_gap: float | None = None
    """How far the output is from the dense twin's (:meth:`TaskAdapter.output_gap`)."""
    ms_spa: float | None = None
    """Wall-clock of the batch's traced SPA forward divided by the batch size (ms)."""
    ms_dense: float | None = None
    """Wall-clock of the batch's dense-twin forward divided by the batch size (ms)."""

    @property
    def macs_saved(self) -> float:
        """Share of the dense twin's backbone MACs this image did not spend."""
        return 1.0 - self.macs_run / self.macs_dense if self.macs_dense else 0.0

    @property
    def mean_keep(self) -> float:
        """Keep ratio averaged over the SPA layers (1.0 without SPA layers)."""
        return float(np.mean(self.keep)) if self.keep else 1.0

    @property
    def output_error(self) -> float | None:
        """The output gap as an error (higher = further from the dense twin): 1 - agreement for agreements."""
        if self.output_gap is None:
            return None
        return 1.0 - self.output_gap if self.output_gap_name in AGREEMENTS else self.output_gap

    def at(self, layer: int, values: list[float] | None) -> float | None:
        """The entry of a per-layer list (``keep``, ``recall``, ...) for SPA layer ``layer``."""
        if values is None or layer not in self.layers:
            return None
        return values[self.layers.index(layer)]

    def to_dict(self) -> dict[str, Any]:
        """A flat JSON/CSV-ready dict: scalar fields, derived ``macs_saved`` / ``mean_keep`` /
        ``output_error``, and one ``<name>_L<layer>`` column per layer of each per-layer list."""
        row: dict[str, Any] = {
            "source": self.source,
            "index": self.index,
            "name": self.name,
            "label_source": self.label_source,
            "object_share": self.object_share,
            "macs_run": self.macs_run,
            "macs_dense": self.macs_dense,
            "macs_saved": self.macs_saved,
            "mean_keep": self.mean_keep,
            "output_gap_name": self.output_gap_name,
            "output_gap": self.output_gap,
            "output_error": self.output_error,
            "ms_spa": self.ms_spa,
            "ms_dense": self.ms_dense,
        }
        for name in _PER_LAYER:
            values = getattr(self, name)
            for position, layer in enumerate(self.layers):
                row[f"{name}_L{layer}"] = None if values is None else values[position]
        return row

    @classmethod
    def from_dict(cls, row: Mapping[str, Any]) -> ImageRow:
        """The row :meth:`to_dict` (or a CSV line of it, all strings) came from."""

        def value(key: str, kind: type) -> Any:
            raw = row.get(key)
            if raw is None or raw == "":
                return None
            return kind(raw)

        layers = sorted({int(m.group(1)) for key in row if (m := re.fullmatch(r"keep_L(\d+)", key))})
        per_layer: dict[str, list[float] | None] = {}
        for name in _PER_LAYER:
            values = [value(f"{name}_L{layer}", float) for layer in layers]
            per_layer[name] = None if any(v is None for v in values) else values
        return cls(
            source=str(row["source"]),
            index=value("index", int),
            name=str(row["name"]),
            layers=layers,
            keep=per_layer["keep"] or [],
            label_source=value("label_source", str),
            object_share=value("object_share", float),
            precision=per_layer["precision"],
            recall=per_layer["recall"],
            iou=per_layer["iou"],
            macs_run=value("macs_run", int) or 0,
            macs_dense=value("macs_dense", int) or 0,
            output_gap_name=value("output_gap_name", str),
            output_gap=value("output_gap", float),
            ms_spa=value("ms_spa", float),
            ms_dense=value("ms_dense", float),
        )


_PER_LAYER = ("keep", "precision", "recall", "iou")


# --------------------------------------------------------------------------------------------------
# Selection labels of a batch
# --------------------------------------------------------------------------------------------------


def _grid_strides(
    model: nn.Module, image_size: tuple[int, int], grids: Iterable[tuple[int, int]]
) -> dict[tuple[int, int], tuple[int, int]]:
    """The pixel stride of each token grid: the model's own (``selection_grids``, e.g. an SPT stage over a
    padded image), else the stride that tiles the image (rounded up where the grid does not tile it)."""
    known: dict[tuple[int, int], tuple[int, int]] = {}
    selection_grids = getattr(model, "selection_grids", None)
    if callable(selection_grids):
        known = {tuple(g.shape): tuple(g.stride) for g in selection_grids(image_size)}
    height, width = image_size
    return {grid: known.get(grid, (-(-height // grid[0]), -(-width // grid[1]))) for grid in grids}


def _dense_detection_boxes(task: DetectionTask, dense_output: Any, index: int) -> Tensor:
    """(K, 4) boxes of the dense twin's detections of image ``index`` (score > ``task.min_score``), input pixels."""
    found = task.predictions(dense_output, index)["detections"]
    return torch.tensor([d["box_xyxy"] for d in found], dtype=torch.float32).reshape(-1, 4)


def _label_pixels(
    task: TaskAdapter, batch: DatasetBatch, dense_output: Any
) -> tuple[list[Tensor | None], list[Tensor | None], str] | None:
    """Per image the object mask or the boxes (input pixels) the labels are made of, and where they come
    from: the source's masks, else its boxes, else the dense twin's salient pixels or detections."""
    count = len(batch)
    if batch.masks is not None:
        return list(batch.masks), [None] * count, LABEL_MASKS
    if batch.boxes is not None:
        return [None] * count, list(batch.boxes), LABEL_BOXES
    teachers = [task.teacher_mask(dense_output, i) for i in range(count)]
    if all(mask is not None for mask in teachers):
        return teachers, [None] * count, LABEL_TEACHER
    if isinstance(task, DetectionTask):
        boxes = [_dense_detection_boxes(task, dense_output, i) for i in range(count)]
        return [None] * count, boxes, f"{LABEL_DETECTIONS} (score > {task.min_score:g})"
    return None


def _batch_labels(
    model: nn.Module, task: TaskAdapter, batch: DatasetBatch, dense_output: Any, record: Trace
) -> tuple[dict[tuple[int, int], Tensor] | None, str | None]:
    """Selection labels of the batch per token grid ((B, N) bool each) and where they come from (or None)."""
    found = _label_pixels(task, batch, dense_output)
    if found is None:
        return None, None
    masks, boxes, source = found
    size = record.image_size
    grids = list(dict.fromkeys(tuple(t.grid) for t in record.layers))
    strides = _grid_strides(model, size, grids)
    labels = {}
    for grid in grids:
        per_image = [
            labels_from_masks(mask.cpu(), grid, strides[grid])
            if mask is not None
            else labels_from_boxes(box.cpu(), size, grid, strides[grid])
            for mask, box in zip(masks, boxes)
        ]
        labels[grid] = torch.stack(per_image)
    return labels, source


# --------------------------------------------------------------------------------------------------
# The analysis
# --------------------------------------------------------------------------------------------------


def _device(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _analyse_batch(model: nn.Module, task: TaskAdapter, batch: DatasetBatch) -> list[ImageRow]:
    """One traced SPA forward and one dense-twin forward of ``batch``, and its rows."""
    device = _device(model)
    images = batch.images.to(device)
    with stopwatch(device) as spa_time:
        output, record = traced_forward(model, images)
    with stopwatch(device) as dense_time, dense_twin(model), torch.no_grad():
        dense_output = model(images)
    labels, label_source = _batch_labels(model, task, batch, dense_output, record)
    count = len(batch)
    keep = [t.keep_ratio.tolist() for t in record.layers]
    scores: dict[str, list[list[float]]] = {"precision": [], "recall": [], "iou": []}
    if labels is not None:
        for layer in record.layers:
            counts = SelectionCounts.of(layer.keep, labels[tuple(layer.grid)])
            for name in scores:
                scores[name].append(getattr(counts, name).tolist())
    first_grid = tuple(record.layers[0].grid) if record.layers else None
    object_share = labels[first_grid].float().mean(1).tolist() if labels is not None and first_grid else [None] * count
    macs_run = torch.full((count,), record.static_macs, dtype=torch.long)
    macs_dense = torch.full((count,), record.static_macs, dtype=torch.long)
    for layer in record.layers:
        macs_run += layer.cost.per_image_macs_run.long()
        macs_dense += int(layer.cost.per_image_macs_dense)
    rows = []
    for i in range(count):
        gap = task.output_gap(output, dense_output, i)
        rows.append(
            ImageRow(
                source=batch.source,
                index=batch.indices[i],
                name=batch.names[i],
                layers=[t.layer for t in record.layers],
                keep=[k[i] for k in keep],
                label_source=label_source,
                object_share=object_share[i],
                precision=[v[i] for v in scores["precision"]] if labels is not None else None,
                recall=[v[i] for v in scores["recall"]] if labels is not None else None,
                iou=[v[i] for v in scores["iou"]] if labels is not None else None,
                macs_run=int(macs_run[i]),
                macs_dense=int(macs_dense[i]),
                output_gap_name=None if gap is None else gap[0],
                output_gap=None if gap is None else float(gap[1]),
                ms_spa=1e3 * spa_time.wall / count,
                ms_dense=1e3 * dense_time.wall / count,
            )
        )
    return rows


def _bounded(
    batches: Iterable[DatasetBatch],
    max_images: int,
    total: int | None,
    progress: Progress | None,
    cancel: Cancel | None,
    desc: str,
) -> Iterator[DatasetBatch]:
    """``batches`` cut at ``max_images`` images and stopped when ``cancel()`` says so, both checked before
    the next batch is read; a tqdm bar and ``progress(fraction, text)`` after each batch."""
    expected = max_images if total is None else min(total, max_images)
    remaining = iter(batches)
    done = 0
    with tqdm(total=expected, desc=desc, unit="image", leave=False) as bar:
        while done < max_images:
            if cancel is not None and cancel():
                log.info("%s cancelled after %d images", desc, done)
                return
            batch = next(remaining, None)
            if batch is None:
                return
            if done + len(batch) > max_images:
                batch = batch.head(max_images - done)
            yield batch
            done += len(batch)
            bar.update(len(batch))
            if progress is not None:
                progress(min(done / expected, 1.0) if expected else 1.0, f"{done} images")
    if total is not None and total > max_images:
        log.info("%s stopped at the cap of %d images (of %d)", desc, max_images, total)


def analyse_dataset(
    model: nn.Module,
    task: TaskAdapter,
    batches: Iterable[DatasetBatch],
    *,
    max_images: int = DEFAULT_MAX_IMAGES,
    total: int | None = None,
    progress: Progress | None = None,
    cancel: Cancel | None = None,
) -> Iterator[list[ImageRow]]:
    """Yield the :class:`ImageRow` s of each batch as it is analysed (one traced SPA forward and one
    dense-twin forward per batch), at most ``max_images`` images in all.

    Stops cleanly before the next batch when ``cancel()`` returns True. ``total``: how many images the
    source holds (for the progress fraction); ``progress(fraction, text)`` is called after each batch.
    The model runs in the mode it is in (the app's models are in eval mode).
    """
    for batch in _bounded(batches, max_images, total, progress, cancel, "dataset"):
        yield _analyse_batch(model, task, batch)


# --------------------------------------------------------------------------------------------------
# The summary
# --------------------------------------------------------------------------------------------------


@dataclass
class Distribution:
    """Quantiles and mean of a set of values (over images)."""

    count: int
    mean: float
    min: float
    p10: float
    p25: float
    p50: float
    p75: float
    p90: float
    max: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Distribution | None:
        """The distribution of ``values`` (None when there are none)."""
        if not len(values):
            return None
        data = np.asarray(values, dtype=np.float64)
        q = np.quantile(data, [0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0])
        return cls(len(data), float(data.mean()), *(float(v) for v in q))


@dataclass
class LayerSummary:
    """One SPA layer over the set: keep, selection quality (images with labels) and keep vs object share."""

    layer: int
    keep: Distribution
    precision: Distribution | None
    recall: Distribution | None
    iou: Distribution | None
    keep_object_correlation: float | None
    """Pearson correlation over images of this layer's keep ratio with the object share."""


@dataclass
class Ranked:
    """One entry of a worst-k list: which image and its value."""

    source: str
    index: int
    name: str
    value: float


@dataclass
class DatasetSummary:
    """The whole set at a glance: distributions per layer, compute, output error, the worst images."""

    images: int
    sources: list[str]
    label_sources: dict[str, int]
    layers: list[LayerSummary]
    mean_keep: float
    """Keep ratio averaged over SPA layers and images."""
    macs_saved_mean: float
    """Per-image share of backbone MACs saved, averaged over images."""
    macs_saved_pooled: float
    """1 - all MACs run / all dense MACs."""
    macs_run_mean: float
    macs_dense_mean: float
    ms_spa_per_image: float | None
    ms_dense_per_image: float | None
    keep_object_correlation: float | None
    """Pearson correlation over images of the mean keep (over layers) with the object share."""
    output_gap_name: str | None
    output_gap: Distribution | None
    worst_layer: int | None
    """The SPA layer the worst-k lists by recall and by keep are taken at."""
    worst: dict[str, list[Ranked]] = field(default_factory=dict)
    """``recall`` (lowest first), ``output_error`` (highest first), ``keep`` (highest first: least saved)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _correlation(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Pearson correlation, None with fewer than two points or a constant side."""
    if len(x) < 2:
        return None
    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if a.std() == 0 or b.std() == 0:
        return None
    return float(np.corrcoef(a, b)[0, 1])


def _worst(rows: Sequence[ImageRow], value: Callable[[ImageRow], float | None], highest: bool, k: int) -> list[Ranked]:
    scored = [(v, row) for row in rows if (v := value(row)) is not None]
    scored.sort(key=lambda pair: (-pair[0] if highest else pair[0], pair[1].source, pair[1].index))
    return [Ranked(row.source, row.index, row.name, float(v)) for v, row in scored[:k]]


def _layer_summary(rows: Sequence[ImageRow], layer: int) -> LayerSummary:
    present = [row for row in rows if layer in row.layers]
    labelled = [row for row in present if row.recall is not None]
    keep = [row.at(layer, row.keep) for row in present]
    shared = [row for row in present if row.object_share is not None]
    return LayerSummary(
        layer=layer,
        keep=Distribution.of(keep),
        precision=Distribution.of([row.at(layer, row.precision) for row in labelled]),
        recall=Distribution.of([row.at(layer, row.recall) for row in labelled]),
        iou=Distribution.of([row.at(layer, row.iou) for row in labelled]),
        keep_object_correlation=_correlation(
            [row.at(layer, row.keep) for row in shared], [row.object_share for row in shared]
        ),
    )


def summarise(rows: Sequence[ImageRow], *, worst_k: int = 12, layer: int | None = None) -> DatasetSummary:
    """The :class:`DatasetSummary` of ``rows``; worst-k lists by recall and keep at SPA layer ``layer``
    (default: the first)."""
    if not rows:
        raise ValueError("no rows to summarise: the analysis read no image")
    layers = sorted({layer for row in rows for layer in row.layers})
    chosen = layers[0] if layer is None and layers else layer
    if chosen is not None and chosen not in layers:
        raise ValueError(f"layer {chosen} is not an SPA layer of these rows; SPA layers: {layers}")
    label_sources: dict[str, int] = {}
    for row in rows:
        key = row.label_source or "none"
        label_sources[key] = label_sources.get(key, 0) + 1
    shared = [row for row in rows if row.object_share is not None]
    gaps = [row.output_gap for row in rows if row.output_gap is not None]
    spa_ms = [row.ms_spa for row in rows if row.ms_spa is not None]
    dense_ms = [row.ms_dense for row in rows if row.ms_dense is not None]
    macs_dense = sum(row.macs_dense for row in rows)
    return DatasetSummary(
        images=len(rows),
        sources=list(dict.fromkeys(row.source for row in rows)),
        label_sources=label_sources,
        layers=[_layer_summary(rows, index) for index in layers],
        mean_keep=float(np.mean([row.mean_keep for row in rows])),
        macs_saved_mean=float(np.mean([row.macs_saved for row in rows])),
        macs_saved_pooled=1.0 - sum(row.macs_run for row in rows) / macs_dense if macs_dense else 0.0,
        macs_run_mean=float(np.mean([row.macs_run for row in rows])),
        macs_dense_mean=float(np.mean([row.macs_dense for row in rows])),
        ms_spa_per_image=float(np.mean(spa_ms)) if spa_ms else None,
        ms_dense_per_image=float(np.mean(dense_ms)) if dense_ms else None,
        keep_object_correlation=_correlation([row.mean_keep for row in shared], [row.object_share for row in shared]),
        output_gap_name=next((row.output_gap_name for row in rows if row.output_gap_name), None),
        output_gap=Distribution.of(gaps),
        worst_layer=chosen,
        worst={
            "recall": _worst(rows, lambda row: row.at(chosen, row.recall), highest=False, k=worst_k),
            "output_error": _worst(rows, lambda row: row.output_error, highest=True, k=worst_k),
            "keep": _worst(rows, lambda row: row.at(chosen, row.keep), highest=True, k=worst_k),
        },
    )


# --------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------


def _columns(rows: Sequence[ImageRow]) -> list[str]:
    columns: dict[str, None] = {}
    for row in rows:
        columns.update(dict.fromkeys(row.to_dict()))
    return list(columns)


def rows_to_csv(rows: Sequence[ImageRow], path: Path | str) -> None:
    """Every row as one CSV line (columns of :meth:`ImageRow.to_dict`; empty cell = None), written atomically."""
    path = Path(path)
    columns = _columns(rows)

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            for row in rows:
                writer.writerow({k: "" if v is None else v for k, v in row.to_dict().items()})

    write_atomic(path, write)


def summary_to_json(
    summary: DatasetSummary, rows: Sequence[ImageRow], path: Path | str, meta: Mapping[str, Any] | None = None
) -> None:
    """``{"meta", "summary", "rows"}`` as JSON, written atomically (``meta``: e.g. model and settings)."""
    document = {"meta": dict(meta or {}), "summary": summary.to_dict(), "rows": [row.to_dict() for row in rows]}
    write_text_atomic(Path(path), json.dumps(document, indent=1) + "\n")


def load_rows(path: Path | str) -> list[ImageRow]:
    """The rows of a file :func:`rows_to_csv` (``.csv``) or :func:`summary_to_json` (``.json``) wrote."""
    path = Path(path)
    if path.suffix == ".json":
        return [ImageRow.from_dict(row) for row in json.loads(path.read_text())["rows"]]
    with open(path, newline="") as handle:
        return [ImageRow.from_dict(row) for row in csv.DictReader(handle)]


def write_dataset_summary(
    model: nn.Module,
    task: TaskAdapter,
    source: ImageSource,
    out: Path,
    *,
    overwrite: bool = False,
    batch_size: int = 32,
    max_images: int = DEFAULT_MAX_IMAGES,
    meta: Mapping[str, Any] | None = None,
) -> DatasetSummary:
    """Analyse ``source`` and write ``OUT/dataset_summary.json`` and ``OUT/dataset_rows.csv`` (what
    ``spa-viz analyze --summary`` does); refuses to replace them unless ``overwrite``."""
    targets = [out / SUMMARY_JSON, out / ROWS_CSV]
    if not overwrite:
        refuse_overwrite(targets, where=out)
    rows = [
        row
        for batch_rows in analyse_dataset(
            model, task, source.batches(task, batch_size, max_images), max_images=max_images, total=len(source)
        )
        for row in batch_rows
    ]
    summary = summarise(rows)
    out.mkdir(parents=True, exist_ok=True)
    skipped = [{"input": p, "reason": r} for p, r in getattr(source, "skipped", [])]
    summary_to_json(summary, rows, targets[0], {"source": source.name, **(meta or {}), "skipped": skipped})
    rows_to_csv(rows, targets[1])
    return summary


# --------------------------------------------------------------------------------------------------
# The trade-off sweep on a dataset
# --------------------------------------------------------------------------------------------------


@dataclass
class SweepPoint:
    """One point of a trade-off curve on the set: a setting (None: the dense twin), its backbone MACs per
    image and keep (means over images), and the task's metrics (see :func:`dataset_sweep`)."""

    label: str
    method: str
    amount: float | None
    macs: float
    dense_macs: float
    kept: float
    images: int
    metrics: dict[str, float]
    output_gap_name: str | None = None
    """What ``metrics["output_gap"]`` measures (:meth:`TaskAdapter.output_gap`)."""

    @property
    def saving(self) -> float:
        return 1.0 - self.macs / self.dense_macs if self.dense_macs else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "saving": self.saving}


@dataclass
class _Scores:
    """Running sums of one setting over the set."""

    macs: float = 0.0
    dense_macs: float = 0.0
    kept: float = 0.0
    images: int = 0
    gap: float = 0.0
    gap_name: str | None = None
    gaps: int = 0
    f_curve: Tensor | None = None
    iou: float = 0.0
    masked: int = 0
    detections: list[dict[str, Any]] = field(default_factory=list)


def _decoded(model: nn.Module, output: Any) -> list[tuple[Tensor, Tensor, Tensor]]:
    """Per image (boxes xyxy input pixels, scores, 0-based labels), as the detection evaluation decodes them."""
    if isinstance(output, Mapping):
        return [(b.cpu(), s.cpu(), c.cpu()) for b, s, c in model.decode(output)]
    return [(o["boxes"].cpu(), o["scores"].cpu(), o["labels"].cpu()) for o in output]


def _score_output(
    scores: _Scores,
    model: nn.Module,
    task: TaskAdapter,
    batch: DatasetBatch,
    output: Any,
    dense_output: Any,
    first_image_id: int,
    with_truth: bool,
) -> None:
    """Add one batch's output of one setting to its running sums."""
    for i in range(len(batch)):
        gap = task.output_gap(output, dense_output, i)
        if gap is not None:
            scores.gap_name, scores.gap, scores.gaps = gap[0], scores.gap + float(gap[1]), scores.gaps + 1
    if isinstance(task, SaliencyTask) and batch.masks is not None:
        for i, mask in enumerate(batch.masks):
            saliency = task.output_map(output, i)
            curve = f_measure_curve(saliency, mask)
            scores.f_curve = curve if scores.f_curve is None else scores.f_curve + curve
            scores.iou += mask_iou(saliency, mask)
            scores.masked += 1
    if with_truth:
        for i, (boxes, confidences, labels) in enumerate(_decoded(model, output)):
            for box, confidence, label in zip(boxes.tolist(), confidences.tolist(), labels.tolist()):
                scores.detections.append(
                    {
                        "image_id": first_image_id + i,
                        "category_id": int(label) + 1,
                        "score": float(confidence),
                        "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]],
                    }
                )


def _truth(batch: DatasetBatch, first_image_id: int, gt: dict[str, Any]) -> None:
    """Add the batch's ground-truth boxes (input pixels) to a COCO ground-truth dict."""
    height, width = (int(s) for s in batch.images.shape[-2:])
    for i, (boxes, classes) in enumerate(zip(batch.boxes, batch.classes)):
        image_id = first_image_id + i
        gt["images"].append({"id": image_id, "height": height, "width": width})
        for box, label in zip(boxes.tolist(), classes.tolist()):
            w, h = box[2] - box[0], box[3] - box[1]
            gt["annotations"].append(
                {
                    "id": len(gt["annotations"]) + 1,
                    "image_id": image_id,
                    "category_id": int(label) + 1,
                    "bbox": [box[0], box[1], w, h],
                    "area": w * h,
                    "iscrowd": 0,
                }
            )


def _metrics(scores: _Scores, gt: dict[str, Any] | None) -> dict[str, float]:
    metrics: dict[str, float] = {}
    if scores.gaps:
        metrics["output_gap"] = scores.gap / scores.gaps
    if scores.f_curve is not None:
        metrics["max_f_measure"] = float((scores.f_curve / scores.masked).max())
        metrics["iou_at_half"] = scores.iou / scores.masked
    if gt is not None:
        ap = coco_ap(gt, scores.detections)
        metrics.update(AP50=ap["AP50"], AP=ap["AP"])
    return metrics


def sweep_settings(
    model: nn.Module,
    image_size: tuple[int, int],
    thresholds: Sequence[float],
    peers: Sequence[str] = (),
    points: int = 5,
    base: Setting | None = None,
) -> list[Setting]:
    """The learned gate at each threshold (ascending), then each peer method at ``points`` amounts spread
    over its range without the degenerate ends (as :func:`~spa_viz.analysis.compare.tradeoff` spreads them)."""
    base = base or Setting()
    plan = [replace(base, method=LEARNED_GATE, amount=float(t)) for t in sorted(thresholds)]
    for method in peers:
        cheap, costly = amount_range(model, method, image_size)
        for i in range(points):
            amount = cheap + (costly - cheap) * (i + 1) / (points + 1)
            plan.append(
                replace(base, method=method, amount=float(round(amount)) if method == TOKEN_MERGING else amount)
            )
    return plan


def dataset_sweep(
    model: nn.Module,
    task: TaskAdapter,
    batches: Iterable[DatasetBatch],
    thresholds: Sequence[float],
    *,
    peers: Sequence[str] = (),
    points: int = 5,
    base: Setting | None = None,
    max_images: int = DEFAULT_MAX_IMAGES,
    total: int | None = None,
    progress: Progress | None = None,
    cancel: Cancel | None = None,
) -> list[SweepPoint]:
    """The task metric against backbone MACs on the set, for the learned gate at each of ``thresholds``
    and each method in ``peers`` (:func:`~spa_viz.analysis.compare.available_methods`) at ``points``
    amounts, plus the dense twin as the first point.

    Each batch runs once densely and once per setting (:func:`~spa_viz.analysis.compare.run_setting`;
    the model's own settings are restored after each). Metrics per point: ``output_gap``, the mean gap to
    the dense twin's output (saliency: MAE; detectors: the share of agreeing detections); ``max_f_measure`` (mean
    F-measure curve over images, beta^2 = 0.3, its maximum) and ``iou_at_half`` (mean IoU of the map
    at 0.5 with the mask) for saliency models where the set has object masks; ``AP50`` and ``AP`` (pycocotools, in input pixels) for detectors where the set has
    ground-truth boxes and classes. A cancelled sweep scores the images read so far.
    """
    device = _device(model)
    plan: list[Setting] | None = None
    dense = _Scores()
    per_setting: list[_Scores] = []
    gt: dict[str, Any] | None = None
    image_id = 1
    for batch in _bounded(batches, max_images, total, progress, cancel, "dataset sweep"):
        images = batch.images.to(device)
        size = (int(images.shape[-2]), int(images.shape[-1]))
        if plan is None:
            plan = sweep_settings(model, size, thresholds, peers, points, base)
            per_setting = [_Scores() for _ in plan]
        with_truth = isinstance(task, DetectionTask) and batch.boxes is not None and batch.classes is not None
        if with_truth:
            gt = gt or {"images": [], "annotations": [], "categories": []}
            _truth(batch, image_id, gt)
        with dense_twin(model), torch.no_grad():
            dense_output = model(images)
            dense_macs = float(static_macs(find_backbone(model), size))
        count = len(batch)
        dense.macs += dense_macs * count
        dense.dense_macs += dense_macs * count
        dense.kept += count
        dense.images += count
        _score_output(dense, model, task, batch, dense_output, dense_output, image_id, with_truth)
        for setting, scores in zip(plan, per_setting):
            run = run_setting(model, images, setting)
            scores.macs += run.macs * count
            scores.dense_macs += run.dense_macs * count
            scores.kept += run.kept * count
            scores.images += count
            _score_output(scores, model, task, batch, run.output, dense_output, image_id, with_truth)
        image_id += count
    if plan is None:
        return []
    if gt is not None:
        categories = getattr(task, "class_names", None) or []
        gt["categories"] = [{"id": k + 1, "name": str(name)} for k, name in enumerate(categories)]
    points_out = [_point("dense twin", "dense", None, dense, gt)]
    for setting, scores in zip(plan, per_setting):
        points_out.append(_point(setting.label(), setting.method, setting.amount, scores, gt))
    return points_out


def _point(label: str, method: str, amount: float | None, scores: _Scores, gt: dict[str, Any] | None) -> SweepPoint:
    images = max(scores.images, 1)
    return SweepPoint(
        label=label,
        method=method,
        amount=amount,
        macs=scores.macs / images,
        dense_macs=scores.dense_macs / images,
        kept=scores.kept / images,
        images=scores.images,
        metrics={k: v for k, v in _metrics(scores, gt).items() if math.isfinite(v)},
        output_gap_name=scores.gap_name,
    )
