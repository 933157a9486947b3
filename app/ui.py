"""The Gradio interface: layout, event wiring and error display. All logic lives in :mod:`app.service`.

Public API endpoints (``gradio_client``; see app/README.md):

* ``/analyze``: every view of one batch, layer and image (images, figures, text, trace summary JSON),
  with the wall-clock of the dense twin vs SPA measured;
* ``/timing``: the cost text and summary with the wall-clock measured (the page calls it right after
  showing the views, so they never wait for the measurement);
* ``/attribute``: a per-token attribution map of one image;
* ``/token``: one token's attention per head (packed vs the dense twin), gate score, packed row and slot
  (:mod:`app.token_view`; the page answers a click on the gate or kept panel);
* ``/compare`` and ``/tradeoff``: the Compare tab (:mod:`app.compare_tab`);
* ``/report``: a zip of PNG panels, plotly figures and the trace summary;
* ``/load_model``: load a model by name, checkpoint folder or timm name and describe it;
* ``/models``: the model sources and selectors this app offers.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np
from gradio.data_classes import FileData
from gradio.utils import NamedString
from PIL import Image

from spa_viz.analysis.attribution import METHODS
from spa_viz.layers.gate import FUSION_MODES
from spa_viz.layers.packing import POLICIES

from .compare_tab import build_compare_tab
from .dataset_service import DatasetService
from .dataset_tab import AnalyzeTargets, build_dataset_tab
from .examples import Examples
from .files import BoundedFolder
from .live_service import LiveService
from .live_tab import build_live_tab
from .models import LEARNED_GATE, LoadedModel, selector_names
from .models import selector_amount as amount_of
from .service import SAVED_FUSION, UNKEPT_HELP, AnalysisService, SPASettings, UserError
from .token_view import build_token_view

__all__ = ["CSS", "THEME", "build_ui"]

_log = logging.getLogger(__name__)
THEME = gr.themes.Default(primary_hue="blue", text_size="lg")
CSS = """
.gradio-container {max-width: 1600px !important}
#status-box {font-size: 0.95rem}
"""
INTRO = (
    "# SPA microscope: Select and Pack Attention\n"
    "A cheap gate scores every token, each image keeps its own number of tokens, and the kept tokens of "
    "the whole batch are packed into a few dense rows for attention (Zhang et al., arXiv 2410.23608). "
    "Upload one or several images (several = one batch), then move the threshold, the layer or the packing policy. "
    "Compute is counted in MACs (multiply-adds, what the SPA and Swin papers call FLOPs); 1 MAC = 2 FLOPs."
)
GLOSSARY = (
    "- **sigmoid(s / tau)**: the gate's keep probability for a token (s: its score, tau: the temperature); "
    "a token is kept where it exceeds the threshold.\n"
    "- **B′ rows × L**: the kept tokens of the whole batch are packed into B′ rows of L slots each; "
    "attention runs on these rows only.\n"
    "- **fill**: the share of packed slots holding a real token (the rest is padding).\n"
    "- **fused: N% earlier**: with score fusion, N% of this layer's tokens were decided by a score carried "
    "over from an earlier stage (the max of the two), not by this layer's own gate.\n"
    "- **MACs**: multiply-adds (what the SPA and Swin papers call FLOPs); 1 MAC = 2 FLOPs.\n"
    "- **token age**: how many SPA layers ago a token was last updated; 0 = current.\n"
    "- **unkept**: what a token the gate does not keep becomes: copy (unchanged), paper (the output "
    "projection of itself), refresh (the update of its most similar kept token)."
)
UNKEPT_CHOICES = list(UNKEPT_HELP)
MAX_LAYER = 64
"""Widest layer index the API takes (deeper than any model the app serves); the page shows the model's range."""
UNKEPT_TEXT = "; ".join(f"{mode} = {help}" for mode, help in UNKEPT_HELP.items())
FUSION_HELP = (
    "stage = the paper's (fuse the previous stage's score), chain = each block with the one before, none = own logit"
)


def _guard(fn: Callable[..., Any]) -> Callable[..., Any]:
    """User errors become a gr.Error with their message; anything else is logged and reported briefly."""

    @functools.wraps(fn)  # keeps the name, docstring and parameter names for the API docs
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except UserError as err:
            raise gr.Error(str(err), print_exception=False) from err
        except Exception as err:  # the app must keep serving whatever a request does
            _log.exception("request failed")
            raise gr.Error(
                f"internal error ({type(err).__name__}: {err}); the app keeps running, please try other settings"
            ) from err

    return wrapped


class PanelFiles:
    """Panels as PNG files named by their content, written once with fast compression.

    Gradio's own encoding of numpy outputs (default PNG compression, metadata) took about 0.4 s of a
    0.9 s layer-slider request; this takes a few ms per new panel and nothing for one already sent.
    The files live in the app's bounded panel folder (a static path of gradio: served without a copy).
    """

    def __init__(self, folder: BoundedFolder) -> None:
        self.folder = folder

    def __call__(self, panel: np.ndarray | None) -> str | None:
        if panel is None:
            return None
        name = hashlib.sha1(panel.tobytes() + str(panel.shape).encode()).hexdigest() + ".png"
        path = self.folder.reuse(name)
        if path is not None:
            return str(path)
        path = self.folder.claim(name)
        staging = path.with_name(f".{uuid.uuid4().hex}.png")  # concurrent requests may write the same panel
        try:
            Image.fromarray(panel).save(staging, format="PNG", compress_level=1)
            os.replace(staging, path)  # a reader never sees half a file
        finally:
            staging.unlink(missing_ok=True)
        return str(path)


def _image_files(files: gr.File) -> gr.File:
    """``files`` (a ``gr.File(type="filepath")``) minus a leak of gradio 6.31: its preprocess creates an
    empty temporary file in gradio's cache for every file of every event (one per image per slider
    move) and nothing ever removes them. Patched on the instance: a subclass of a gradio component
    makes gradio write a ``.pyi`` stub next to this module."""
    original = files._process_single_file

    def process_single_file(f: FileData) -> NamedString | bytes:
        if files.type != "filepath" or files.file_types:
            return original(f)
        return NamedString(f.path)

    files._process_single_file = process_single_file
    return files


def _first_loadable(service: AnalysisService) -> tuple[LoadedModel, list[str]]:
    """The default model, or the first choice that loads when it does not (with what went wrong)."""
    registry = service.registry
    problems = []
    for name in dict.fromkeys([registry.default(), *registry.choices()]):
        try:
            return service.model(name), problems
        except UserError as err:
            _log.warning("cannot open on %s: %s", name, err)
            problems.append(f"⚠ {name} could not be loaded: {err}")
    raise UserError("no model could be loaded:\n" + "\n".join(problems))


def _output_image(label: str, elem_id: str | None = None) -> gr.Image:
    """A read-only image view filled by the analysis (a rendered PNG path)."""
    return gr.Image(label=label, type="filepath", elem_id=elem_id, interactive=False, show_label=False)


def build_ui(service: AnalysisService, examples: Examples | None) -> gr.Blocks:
    """The Blocks app on top of ``service``; ``examples`` fill the example table.

    Gradio's cache (uploads) is swept every ``cache_check_s`` of files older than ``cache_age_s``
    (:class:`~app.settings.AppSettings`); the app's own files are bounded by ``service.files``.
    """
    registry = service.registry
    settings = service.settings
    default_entry, problems = _first_loadable(service)
    default = default_entry.key
    layers = default_entry.spa_layers
    selectors = default_entry.selectors
    # untrained gates keep almost everything: open on a training-free selector so the first view shows selection
    first_selector = next(
        (name for name in ("cls_attention", "feature_norm") if not default_entry.trained_gates and name in selectors),
        LEARNED_GATE,
    )
    first_amount = amount_of(first_selector) if first_selector != LEARNED_GATE else None
    png = PanelFiles(service.files.panels)
    photo_paths = [str(p) for p in examples.photos] if examples else []
    digit_paths = [str(p) for p in examples.digits] if examples else []

    def spa_settings(
        selector: str,
        amount: float,
        threshold: float,
        policy: str,
        container_len: float,
        fusion: str,
        unkept: str = SAVED_FUSION,
    ) -> SPASettings:
        """The API's arguments -> :class:`SPASettings` (the picker's "learned gate" label is selector None)."""
        chosen = None if selector in (None, "", LEARNED_GATE) else selector
        return SPASettings(
            chosen,
            float(amount),
            float(threshold),
            policy or "image",
            int(container_len),
            fusion or SAVED_FUSION,
            unkept or SAVED_FUSION,
        )

    def views(
        files: list[str] | None,
        model: str,
        selector: str,
        selector_amount: float,
        threshold: float,
        policy: str,
        container_len: float,
        layer: float,
        image_index: float,
        fusion: str,
        unkept: str,
        measure: bool,
    ) -> tuple[Any, ...]:
        result = service.analyze(
            files,
            model or default,
            spa_settings(selector, selector_amount, threshold, policy, container_len, fusion, unkept),
            int(layer),
            int(image_index),
            measure=measure,
        )
        for warning in result.warnings:
            gr.Warning(warning)
        # view_components (built with the layout below): one component per field of the analysis
        return tuple(as_shown(component, getattr(result, name)) for name, component in view_components.items())

    def as_shown(component: Any, value: Any) -> Any:
        """A view as its component takes it: pictures as PNG files (a gallery: each picture), the rest as is."""
        if isinstance(component, gr.Image):
            return png(value)
        if isinstance(component, gr.Gallery):
            return [(png(image), caption) for image, caption in value]
        return value

    def analyze(
        files: list[str] | None,
        model: str,
        selector: str,
        selector_amount: float,
        threshold: float,
        policy: str,
        container_len: float,
        layer: float,
        image_index: float,
        fusion: str = SAVED_FUSION,
        unkept: str = SAVED_FUSION,
    ) -> tuple[Any, ...]:
        """All views of a batch at one SPA layer and image: status, cost text (backbone MACs dense vs SPA;
        the wall-clock when already measured for these images and settings, else call ``/timing``), gate
        heat-map, kept mask, selection labels (image + text), all-layer strip, token age with
        |SPA - dense| of the output, packed layout, MACs per layer, kept-token histogram, predictions,
        batch gallery, summary JSON. ``fusion``: how a learned gate's logit is fused with earlier scores
        (stage, chain, none); ``unkept``: what tokens SPA does not keep become (copy, paper, refresh);
        ``saved`` for either: as the model was saved."""
        return views(
            files,
            model,
            selector,
            selector_amount,
            threshold,
            policy,
            container_len,
            layer,
            image_index,
            fusion,
            unkept,
            False,
        )

    def show(*args: Any) -> tuple[Any, ...]:
        """The page's analysis: every view at once, the wall-clock from the cache or left to ``timing``."""
        return views(*args, False)

    def timing(
        files: list[str] | None,
        model: str,
        selector: str,
        selector_amount: float,
        threshold: float,
        policy: str,
        container_len: float,
        layer: float,
        image_index: float,
        fusion: str = SAVED_FUSION,
        unkept: str = SAVED_FUSION,
    ) -> tuple[str, dict[str, Any]]:
        """The cost text and the summary JSON with the wall-clock measured: the median of several runs of
        the dense twin and of SPA, alternating, without tracing (cached per images and settings)."""
        spa = spa_settings(selector, selector_amount, threshold, policy, container_len, fusion, unkept)
        return service.timing(files, model or default, spa, int(layer), int(image_index))

    def attribute(
        files: list[str] | None,
        model: str,
        selector: str,
        selector_amount: float,
        threshold: float,
        policy: str,
        container_len: float,
        image_index: float,
        method: str,
        fusion: str = SAVED_FUSION,
        unkept: str = SAVED_FUSION,
        progress: gr.Progress = gr.Progress(),  # noqa: B008  (gradio injects progress through this default)
    ) -> tuple[Any, str]:
        """Per-token attribution (integrated_gradients, feature_ablation, occlusion, attention_rollout)
        of the model's output for one image: the map over the image, and a line saying what it explains."""
        view = service.attribute(
            files,
            model or default,
            spa_settings(selector, selector_amount, threshold, policy, container_len, fusion, unkept),
            int(image_index),
            method,
            progress=lambda fraction, message: progress(fraction, desc=message),
        )
        return png(view.image), view.text

    def report(
        files: list[str] | None,
        model: str,
        selector: str,
        selector_amount: float,
        threshold: float,
        policy: str,
        container_len: float,
        layer: float,
        image_index: float,
        fusion: str = SAVED_FUSION,
        unkept: str = SAVED_FUSION,
    ) -> str:
        """A zip with the PNG panels, the plotly figures (JSON) and the summary (JSON, wall-clock measured)."""
        spa = spa_settings(selector, selector_amount, threshold, policy, container_len, fusion, unkept)
        return str(service.report(files, model or default, spa, int(layer), int(image_index)))

    def preferred_method(entry: LoadedModel) -> str:
        """The attribution method the page opens on: attention rollout (fast) where it runs."""
        methods = entry.methods
        return next((name for name in ("attention_rollout", "feature_ablation") if name in methods), methods[0])

    def fusion_label(entry: LoadedModel) -> str:
        return f"Score fusion (learned gate; saved = {entry.saved_fusion}, the mode {entry.key} was saved with)"

    def unkept_label(entry: LoadedModel) -> str:
        return f"Unkept tokens become (saved = {entry.saved_unkept}, the path {entry.key} was saved with)"

    def pick_model(source: str, selector: str) -> tuple[Any, ...]:
        """UI: load a model and set the picker, the layer slider, the selectors it can run, the fusion and
        unkept labels and the model's operating threshold."""
        entry = service.model(source or default)
        spa_layers = entry.spa_layers
        choices = registry.choices()
        if entry.key not in choices:
            choices.append(entry.key)
        chosen = selector if selector in entry.selectors else LEARNED_GATE
        return (
            entry.badge,
            gr.Dropdown(choices=choices, value=entry.key),
            gr.Slider(minimum=spa_layers[0], maximum=spa_layers[-1], value=spa_layers[0], step=1),
            gr.Dropdown(choices=entry.selectors, value=chosen),
            gr.Radio(label=fusion_label(entry), value=SAVED_FUSION),
            gr.Radio(label=unkept_label(entry), value=SAVED_FUSION),
            gr.Slider(value=entry.saved_threshold),
            gr.Radio(choices=entry.methods, value=preferred_method(entry)),
        )

    def load_model(source: str) -> dict[str, Any]:
        """Load a model (checkpoint name, checkpoint folder inside the allowed folders, or timm ViT
        name) and describe it: its name, task, SPA layers, the selectors that can run on it, the fusion
        mode it was saved with, and whether its gates and weights are trained."""
        entry = service.model(source or default)
        return {
            "model": entry.key,
            "task": entry.adapter.task,
            "spa_layers": entry.spa_layers,
            "selectors": entry.selectors,
            "saved_fusion": entry.saved_fusion,
            "saved_unkept": entry.saved_unkept,
            "saved_threshold": entry.saved_threshold,
            "attribution_methods": entry.methods,
            "trained_gates": entry.trained_gates,
            "trained_weights": entry.trained_weights,
            "badge": entry.badge,
        }

    def list_models() -> dict[str, list[str]]:
        """Model sources (checkpoints and stand-ins), token selectors (``/load_model`` says which run on a
        model), fusion modes, attribution methods and policies."""
        return {
            "models": registry.choices(),
            "selectors": selector_names(),
            "fusion_modes": [*FUSION_MODES, SAVED_FUSION],
            "unkept_paths": [*UNKEPT_CHOICES, SAVED_FUSION],
            "attribution_methods": list(METHODS),
            "policies": list(POLICIES),
        }

    def selector_controls(selector: str) -> tuple[Any, Any, Any]:
        """UI: the threshold and fusion apply to the learned gate, the amount slider to a selector."""
        if selector in (None, "", LEARNED_GATE):
            return gr.Slider(interactive=True), gr.Slider(visible=False), gr.Radio(interactive=True)
        amount = amount_of(selector)
        return (
            gr.Slider(interactive=False),
            gr.Slider(visible=True, label=amount.label, value=amount.default),
            gr.Radio(interactive=False),
        )

    with gr.Blocks(title="SPA microscope", delete_cache=(settings.cache_check_s, settings.cache_age_s)) as demo:
        gr.Markdown(INTRO)
        with gr.Tabs() as tabs:
            with gr.Tab("Analyze", id="analyze"), gr.Row(equal_height=False):
                with gr.Column(scale=1, min_width=340):
                    files = _image_files(
                        gr.File(
                            value=photo_paths[:1] or None,
                            file_count="multiple",
                            type="filepath",
                            label="Images (several = one batch)",
                            height=160,
                        )
                    )
                    if examples:
                        gr.Examples(
                            examples=[[[p]] for p in photo_paths]
                            + [[digit_paths], [[photo_paths[0], photo_paths[2], digit_paths[0]]]],
                            inputs=[files],
                            example_labels=[Path(p).stem for p in photo_paths]
                            + ["digits batch (boxes)", "mixed batch"],
                            label="Examples (photos from skimage/sklearn/matplotlib/gradio; cluttered digits with boxes)",
                            examples_per_page=12,
                        )
                    model = gr.Dropdown(
                        choices=registry.choices(), value=default, label="Model", allow_custom_value=True
                    )
                    with gr.Row():
                        source = gr.Textbox(
                            label="…or a checkpoint folder / timm ViT name",
                            placeholder="checkpoints/my-run or vit_tiny_patch16_224",
                            scale=3,
                        )
                        load_button = gr.Button("Load", scale=1)
                    # every selector is a valid API value (a request for another model gets the app's own
                    # message when that model cannot run it); the page lists what the shown model can run
                    selector = gr.Dropdown(
                        choices=selector_names(), value=first_selector, label="Token selector", elem_id="selector"
                    )
                    learned = first_selector == LEARNED_GATE
                    amount = gr.Slider(
                        0.05,
                        1.0,
                        value=first_amount.default if first_amount else 0.5,
                        step=0.05,
                        visible=not learned,
                        label=first_amount.label if first_amount else "Amount to keep",
                    )
                    threshold = gr.Slider(
                        0.0,
                        1.0,
                        value=default_entry.saved_threshold,  # the operating threshold saved with the model
                        step=0.01,
                        label="Gate threshold (learned gate): keep where sigmoid(s / tau) > threshold",
                        elem_id="threshold",
                        interactive=learned,
                    )
                    fusion = gr.Radio(
                        [SAVED_FUSION, *FUSION_MODES],
                        value=SAVED_FUSION,
                        label=fusion_label(default_entry),
                        info=FUSION_HELP,
                        elem_id="fusion",
                        interactive=learned,
                    )
                    unkept = gr.Radio(
                        [SAVED_FUSION, *UNKEPT_CHOICES],
                        value=SAVED_FUSION,
                        label=unkept_label(default_entry),
                        info=UNKEPT_TEXT,
                        elem_id="unkept",
                    )
                    policy = gr.Radio(
                        list(POLICIES),
                        value="image",
                        label="Packing policy (container = the paper's, image = exact per image)",
                    )
                    container_len = gr.Slider(8, 256, value=49, step=1, label="Container length L (container policy)")
                    # the API accepts any layer of any model (the nearest SPA layer is shown); the page narrows
                    # the slider to the loaded model's SPA layers on load and on every model change
                    layer = gr.Slider(0, MAX_LAYER, value=layers[0], step=1, label="SPA layer")
                    image_index = gr.Slider(
                        0, settings.max_batch - 1, value=0, step=1, label="Image of the batch (index)"
                    )
                with gr.Column(scale=3):
                    # status and cost first: where the eye starts on the page
                    status = gr.Markdown(
                        "  \n".join([default_entry.badge, *problems]), elem_id="status-box", label="Status"
                    )
                    stats = gr.Markdown(elem_id="stats", label="Cost")
                    with gr.Accordion("What the numbers mean", open=False):
                        gr.Markdown(GLOSSARY)
                    with gr.Row():
                        gate = _output_image("Gate scores", "gate-image")
                        kept = _output_image("Kept tokens", "kept-image")
                        labels = _output_image("Selection labels", "labels-image")
                    labels_text = gr.Markdown(label="Selection label metrics")
                    with gr.Accordion("Token: click one on the gate or kept panel", open=True):
                        build_token_view(
                            service,
                            [files, model, selector, amount, threshold, policy, container_len],
                            layer,
                            image_index,
                            fusion,
                            unkept,
                            [gate, kept],
                            spa_settings,
                            default,
                            png,
                            _guard,
                        )
                    strip = _output_image("All SPA layers", "strip-image")
                    age = _output_image("Token age and |SPA - dense| of the output", "age-image")
                    layout = gr.Plot(label="Packed batch layout")
                    with gr.Row():
                        macs = gr.Plot(label="MACs per layer")
                        histogram = gr.Plot(label="Kept tokens per image")
                    with gr.Row():
                        predictions = _output_image("Predictions")
                        gallery = gr.Gallery(
                            label="The batch as the model sees it", columns=4, height=300, object_fit="contain"
                        )
                    with gr.Accordion("Attribution: which tokens the output depends on", open=False):
                        with gr.Row():
                            method = gr.Radio(
                                default_entry.methods,
                                value=preferred_method(default_entry),
                                label="Method (those that run on the loaded model)",
                                elem_id="method",
                            )
                            attribute_button = gr.Button("Compute attribution", variant="primary")
                        attribution_image = _output_image("Attribution")
                        attribution_text = gr.Markdown(label="Attribution details")
                    with gr.Accordion("Report and raw numbers", open=False):
                        report_button = gr.Button("Build report (zip: PNG panels + figures + JSON)")
                        report_file = gr.File(label="Report")
                        summary = gr.JSON(label="Trace summary")
                    api_analyze = gr.Button(visible=False)  # the /analyze endpoint (views and wall-clock in one answer)
            with gr.Tab("Compare", id="compare"):
                build_compare_tab(service, files, default_entry, png, _guard)
            with gr.Tab("Dataset", id="dataset"):
                targets = AnalyzeTargets(tabs, files, model, selector, threshold)
                build_dataset_tab(DatasetService(service), default_entry, _guard, targets)
            with gr.Tab("Live", id="live"):
                build_live_tab(LiveService(service), default_entry, _guard)

        settings_inputs = [files, model, selector, amount, threshold, policy, container_len]
        view_inputs = [*settings_inputs, layer, image_index, fusion, unkept]
        # field of the analysis (app.service.Analysis) -> its component; /analyze answers in this order
        view_components = {
            "status": status,
            "stats": stats,
            "gate": gate,
            "kept": kept,
            "labels": labels,
            "labels_text": labels_text,
            "strip": strip,
            "age": age,
            "layout": layout,
            "macs": macs,
            "histogram": histogram,
            "predictions": predictions,
            "gallery": gallery,
            "summary": summary,
        }
        view_outputs = list(view_components.values())

        def then_measure(event: Any, api_name: str | None = None) -> None:
            """After the views are shown, measure the wall-clock (one measurement at a time)."""
            event.success(
                _guard(timing),
                view_inputs,
                [stats, summary],
                api_name=api_name,
                api_visibility="public" if api_name else "private",
                concurrency_limit=1,
                concurrency_id="timing",
                show_progress="minimal",
                trigger_mode="always_last",
            )

        shown = gr.on(
            triggers=[
                files.change,
                selector.change,
                amount.change,
                threshold.change,
                fusion.change,
                unkept.change,
                policy.change,
                container_len.change,
                layer.change,
                image_index.change,
                demo.load,
            ],
            fn=_guard(show),
            inputs=view_inputs,
            outputs=view_outputs,
            api_visibility="private",
            trigger_mode="always_last",
        )
        then_measure(shown, api_name="timing")
        api_analyze.click(_guard(analyze), view_inputs, view_outputs, api_name="analyze")
        selector.change(
            selector_controls, [selector], [threshold, amount, fusion], api_visibility="private", queue=False
        )
        demo.load(
            lambda: (gr.Dropdown(choices=selectors), gr.Slider(minimum=layers[0], maximum=layers[-1])),
            None,
            [selector, layer],
            api_visibility="private",
            queue=False,
        )
        # the image slider spans the batch that is loaded (the service names an index past it)
        files.change(
            lambda chosen: gr.Slider(maximum=max(len(chosen or []) - 1, 1)),
            [files],
            [image_index],
            api_visibility="private",
            queue=False,
        )
        # a new model first updates the picker, the layer slider and the selectors it can run, then shows
        model_outputs = [status, model, layer, selector, fusion, unkept, threshold, method]
        picked = gr.on(
            triggers=[load_button.click, source.submit],
            fn=_guard(pick_model),
            inputs=[source, selector],
            outputs=model_outputs,
            api_visibility="private",
        )
        chosen = model.input(_guard(pick_model), [model, selector], model_outputs, api_visibility="private")
        for event in (picked, chosen):
            then_measure(
                event.success(
                    _guard(show), view_inputs, view_outputs, api_visibility="private", trigger_mode="always_last"
                )
            )
        attribute_button.click(
            _guard(attribute),
            [*settings_inputs, image_index, method, fusion, unkept],
            [attribution_image, attribution_text],
            api_name="attribute",
            concurrency_limit=1,  # one long attribution at a time leaves the other slot to analyses
            concurrency_id="attribution",
        )
        report_button.click(_guard(report), view_inputs, [report_file], api_name="report")
        gr.api(_guard(load_model), api_name="load_model")
        gr.api(list_models, api_name="models")
    return demo
