"""The Dataset tab: a model over a whole image set, streamed batch by batch, with its summary and exports.

Endpoints (``gradio_client``; see app/README.md): ``/dataset`` (a generator: partial results after every
batch, the finished view last), ``/dataset_cancel``, ``/dataset_layer`` (the scatter at another layer)
and ``/dataset_open`` (an image of a run, with its settings, for the Analyze tab). All logic lives in
:mod:`app.dataset_service`.

gradio 6's ``gr.Plot`` reports no click on a plotly point, so the scatter's hover names each dot's image
number and "Open image" takes it; a click on a worst-k gallery picture opens that image directly.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import gradio as gr

from spa_viz.analysis.compare import LEARNED_GATE, available_methods

from .dataset_service import (
    DEFAULT_SWEEP,
    SOURCE_CHOICES,
    SOURCE_FOLDER,
    SOURCE_ZIP,
    WORST_KINDS,
    DatasetRequest,
    DatasetService,
    DatasetView,
)
from .models import LEARNED_GATE as GATE_LABEL
from .models import LoadedModel
from .service import UserError

__all__ = ["AnalyzeTargets", "build_dataset_tab", "parse_thresholds"]

_log = logging.getLogger(__name__)
INTRO = (
    "Run a model over **a whole image set** in batches: the digits test split, the photo corpus (when "
    "prepared), a folder under the allowed folders, or a zip of images. Partial results appear after every "
    "batch; **Cancel** stops before the next one and keeps what was analysed. One dot per image: the share "
    "of tokens the learned gate kept against the share of the image that is object (labels: the source's "
    "masks or boxes, else the dense twin's output). Hover a dot for its image number, then **Open image** "
    "shows it in the Analyze tab with the same model and threshold (gradio's plot reports no clicks); a "
    "click on a picture of the worst-k lists opens it directly."
)
_GALLERY_TITLES = {
    "recall": "Worst by recall (kept tokens missing the object)",
    "output_error": "Worst by output error vs the dense twin",
    "keep": "Worst by keep (least compute saved)",
}


@dataclass
class AnalyzeTargets:
    """The Analyze tab's components an opened image goes to, and the tabs to switch (``analyze_id``)."""

    tabs: gr.Tabs
    files: gr.File
    model: gr.Dropdown
    selector: gr.Dropdown
    threshold: gr.Slider
    analyze_id: str = "analyze"


def parse_thresholds(text: str | list[float] | None) -> list[float]:
    """``"0.1, 0.3 0.5"`` (or a list) -> sorted unique thresholds; UserError for anything else."""
    if isinstance(text, list):
        values = [float(v) for v in text]
    else:
        parts = [p for p in re.split(r"[,;\s]+", text or "") if p]
        try:
            values = [float(p) for p in parts]
        except ValueError as err:
            raise UserError(f"thresholds: a list of numbers in [0, 1] separated by commas, got {text!r}") from err
    return sorted(set(values))


def _stream_guard(fn: Callable[..., Iterator[Any]]) -> Callable[..., Iterator[Any]]:
    """:func:`app.ui._guard` for a generator handler: user errors raised while iterating become messages."""

    @functools.wraps(fn)
    def wrapped(*args: Any, **kwargs: Any) -> Iterator[Any]:
        try:
            yield from fn(*args, **kwargs)
        except gr.Error:
            raise
        except UserError as err:
            raise gr.Error(str(err), print_exception=False) from err
        except Exception as err:  # the app keeps serving whatever a run does
            _log.exception("dataset run failed")
            raise gr.Error(f"internal error ({type(err).__name__}: {err}); the app keeps running") from err

    return wrapped


def _peers(entry: LoadedModel) -> list[str]:
    return [m for m in available_methods(entry.model) if m != LEARNED_GATE]


def _default_peers(entry: LoadedModel) -> list[str]:
    """The peers the sweep opens with: feature_norm where it runs (one peer keeps the 500-image digits
    run with its sweep near a minute on 2 cores; tick more for the whole model-card curve)."""
    return [m for m in _peers(entry) if m == "feature_norm"]


def build_dataset_tab(
    service: DatasetService,
    default_entry: LoadedModel,
    guard: Callable[[Callable[..., Any]], Callable[..., Any]],
    targets: AnalyzeTargets | None = None,
) -> None:
    """The Dataset tab's layout and events (call inside ``gr.Tab``). ``guard`` turns errors into messages;
    ``targets``: where "Open image" puts the image and settings (None: the opened file is only offered)."""
    registry = service.analysis.registry
    default = default_entry.key
    choices = registry.choices()
    if default not in choices:
        choices.append(default)
    limits = service.limits
    layers = default_entry.spa_layers

    gr.Markdown(INTRO)
    with gr.Row():
        source = gr.Dropdown(list(SOURCE_CHOICES), value=SOURCE_CHOICES[0], label="Images", elem_id="dataset-source")
        folder = gr.Textbox(label="Folder (for the folder source)", placeholder="/data/my-images", visible=False)
        archive = gr.File(
            label=f"Zip of images (at most {limits.zip_bytes / 1e6:.0f} MB, {limits.zip_files} images)",
            file_types=[".zip"],
            type="filepath",
            visible=False,
            elem_id="dataset-zip",
        )
        model = gr.Dropdown(choices=choices, value=default, label="Model", allow_custom_value=True)
        threshold = gr.Slider(
            0.0,
            1.0,
            value=default_entry.saved_threshold,
            step=0.01,
            label="Gate threshold",
            elem_id="dataset-threshold",
        )
    with gr.Row():
        max_images = gr.Slider(
            1, limits.max_images, value=limits.max_images, step=1, label="Images at most", elem_id="dataset-max"
        )
        batch_size = gr.Slider(1, limits.max_batch_size, value=limits.batch_size, step=1, label="Batch size")
        layer = gr.Dropdown(layers, value=layers[0], label="SPA layer of the scatter", elem_id="dataset-layer")
        sweep = gr.Checkbox(value=True, label="Trade-off sweep (task metric vs MACs)", elem_id="dataset-sweep")
        thresholds = gr.Textbox(
            value=", ".join(f"{t:g}" for t in DEFAULT_SWEEP), label="Sweep thresholds (learned gate)"
        )
        peers = gr.CheckboxGroup(
            _peers(default_entry), value=_default_peers(default_entry), label="Peers in the sweep (5 points each)"
        )
    with gr.Row():
        run_button = gr.Button("Analyse the set", variant="primary", elem_id="dataset-run")
        cancel_button = gr.Button("Cancel", variant="stop", elem_id="dataset-cancel")
    status = gr.Markdown(elem_id="dataset-status")
    summary = gr.Markdown(elem_id="dataset-summary")
    with gr.Row():
        scatter = gr.Plot(label="Keep vs object share", elem_id="dataset-scatter")
        boxes = gr.Plot(label="Precision / recall / IoU per layer", elem_id="dataset-boxes")
    sweep_plot = gr.Plot(label="Task metric vs MACs", elem_id="dataset-sweep-plot")
    with gr.Row():
        open_index = gr.Number(value=0, precision=0, label="Image number (hover a dot)", elem_id="dataset-open-index")
        open_button = gr.Button("Open image in the Analyze tab", elem_id="dataset-open")
        opened = gr.File(label="Opened image", height=90, elem_id="dataset-opened")
    galleries = {
        kind: gr.Gallery(
            label=_GALLERY_TITLES[kind],
            columns=8,
            height=180,
            object_fit="contain",
            allow_preview=False,
            elem_id=f"dataset-worst-{kind}",
        )
        for kind in WORST_KINDS
    }
    with gr.Row():
        csv_file = gr.File(label="Rows (CSV)", elem_id="dataset-csv")
        json_file = gr.File(label="Summary and rows (JSON)", elem_id="dataset-json")
        run_id = gr.Textbox(label="Run id (for /dataset_open)", interactive=False, elem_id="dataset-run-id")

    outputs = [run_id, status, summary, scatter, boxes, sweep_plot, *galleries.values(), csv_file, json_file]

    def shown(view: DatasetView) -> tuple[Any, ...]:
        worst = [view.worst.get(kind) if view.done else None for kind in WORST_KINDS]
        return (
            view.run_id,
            view.status,
            view.summary,
            view.scatter,
            view.boxes,
            view.sweep,
            *worst,
            view.csv,
            view.json,
        )

    def dataset(
        source: str,
        folder: str | None = None,
        archive: str | None = None,
        model: str = default,
        threshold: float = default_entry.saved_threshold,
        max_images: float = limits.max_images,
        batch_size: float = limits.batch_size,
        layer: float | None = None,
        sweep: bool = True,
        thresholds: str = ", ".join(f"{t:g}" for t in DEFAULT_SWEEP),
        peers: list[str] | None = None,
        request: gr.Request = None,
        progress: gr.Progress = gr.Progress(),  # noqa: B008  (gradio injects progress through this default)
    ) -> Iterator[tuple[Any, ...]]:
        """Analyse an image set with a model's learned gate at ``threshold``. ``source``: ``digits/test``,
        ``photo_corpus/test``, ``photo_corpus/second_check``, the folder source (``folder``: a path under
        the allowed folders) or the zip source (``archive``: a zip of images). Yields after every batch:
        the run id, status, summary text, the keep-vs-object-share scatter at SPA layer ``layer``, the
        per-layer precision/recall/IoU box plots; the last answer adds the ``sweep`` plot (task metric vs
        backbone MACs for the learned gate at ``thresholds`` and the ``peers``), the worst-k galleries (by
        recall, output error, keep) and the CSV and JSON exports."""
        req = DatasetRequest(
            source=source,
            model=model or default,
            threshold=float(threshold),
            folder=folder or "",
            archive=archive,
            max_images=int(max_images),
            batch_size=int(batch_size),
            layer=None if layer is None else int(layer),
            sweep=bool(sweep),
            thresholds=parse_thresholds(thresholds),
            peers=list(peers or []),
        )
        session = request.session_hash if request is not None else ""
        report = lambda fraction, text: progress(fraction, desc=text)  # noqa: E731
        for view in service.run(req, session or "", report):
            yield shown(view)

    def cancel(request: gr.Request = None) -> str:
        """Stop this session's running dataset analysis before its next batch (what was analysed is kept)."""
        if service.cancel(request.session_hash if request is not None else ""):
            return "⏹ cancelling: the analysis stops before its next batch and summarises what it read"
        return "nothing is running"

    def relayer(run: str, layer: float) -> Any:
        """The scatter of run ``run`` at SPA layer ``layer`` (the nearest SPA layer)."""
        if not run:
            return None
        return service.scatter(run, int(layer))

    def pick_source(choice: str) -> tuple[Any, Any]:
        return gr.Textbox(visible=choice == SOURCE_FOLDER), gr.File(visible=choice == SOURCE_ZIP)

    def pick_model(name: str) -> tuple[Any, Any, Any]:
        entry = service.analysis.model(name or default)
        spa = entry.spa_layers
        return (
            gr.Dropdown(choices=spa, value=spa[0]),
            gr.CheckboxGroup(choices=_peers(entry), value=_default_peers(entry)),
            gr.Slider(value=entry.saved_threshold),
        )

    def open_image(run: str, index: float) -> tuple[Any, ...]:
        """Image ``index`` of run ``run`` as a file, with the run's model, selector (learned gate) and
        threshold: the Analyze tab's inputs (the page switches to that tab)."""
        if not run:
            raise UserError("run an analysis first")
        path, model_key, gate_threshold = service.open_image(run, int(index))
        if targets is None:
            return (path,)
        return path, gr.Tabs(selected=targets.analyze_id), [path], model_key, GATE_LABEL, gate_threshold

    def open_worst(kind: str) -> Callable[..., tuple[Any, ...]]:
        def clicked(run: str, evt: gr.SelectData) -> tuple[Any, ...]:
            return open_image(run, service.worst_index(run, kind, int(evt.index)))

        return clicked

    open_outputs: list[Any] = [opened]
    if targets is not None:
        open_outputs += [targets.tabs, targets.files, targets.model, targets.selector, targets.threshold]

    source.change(pick_source, [source], [folder, archive], api_visibility="private", queue=False)
    model.input(guard(pick_model), [model], [layer, peers, threshold], api_visibility="private")
    run_button.click(
        _stream_guard(dataset),
        [source, folder, archive, model, threshold, max_images, batch_size, layer, sweep, thresholds, peers],
        outputs,
        api_name="dataset",
        concurrency_limit=1,  # one long run at a time; the page's analyses keep their own slots
        concurrency_id="dataset",
    )
    cancel_button.click(guard(cancel), None, [status], api_name="dataset_cancel", queue=False)
    layer.input(guard(relayer), [run_id, layer], [scatter], api_name="dataset_layer")
    open_button.click(guard(open_image), [run_id, open_index], open_outputs, api_name="dataset_open")
    for kind, gallery in galleries.items():
        gallery.select(guard(open_worst(kind)), [run_id], open_outputs, api_visibility="private")
