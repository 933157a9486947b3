"""The Compare tab: 2-4 columns (model + way of spending less compute) on the Analyze tab's images, side
by side, with an equal-compute switch, a clickable token per column and the trade-off plot.

Endpoints (``gradio_client``; see app/README.md): ``/compare`` (columns as JSON) and ``/tradeoff``.
All logic lives in :meth:`app.service.AnalysisService.compare`, ``tradeoff`` and ``column_token``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import gradio as gr

from spa_viz.analysis.compare import LEARNED_GATE, TOKEN_MERGING, available_methods
from spa_viz.layers.gate import FUSION_MODES
from spa_viz.layers.packing import POLICIES
from spa_viz.selection.selectors import SELECTORS

from .models import LoadedModel, selector_amount
from .service import (
    COMPARE_HEADERS,
    MAX_COLUMNS,
    SAVED_FUSION,
    UNKEPT_HELP,
    AnalysisService,
    Column,
    Comparison,
    UserError,
)

__all__ = ["build_compare_tab"]

_log = logging.getLogger(__name__)
METHODS = [LEARNED_GATE, *SELECTORS, TOKEN_MERGING]
"""Every method a column can name (the service says which run on a model)."""
INTRO = (
    "Run the **Analyze tab's images** through 2-4 settings side by side: a model's learned gate at a threshold, a "
    "training-free selector keeping an amount, or token merging (ToMe, r tokens merged per SPA layer). "
    "**Equal compute** moves every later column's amount until its backbone MACs match the first column's "
    "(within 2%). Click a token on a column's top picture to see what it attended to (for ToMe: the patches "
    "merged into it). Amount: the gate's threshold, the selector's ratio or p, or ToMe's r."
)


def _default_methods(entry: LoadedModel) -> list[str]:
    """The columns the tab opens on: the learned gate, then the selectors and ToMe the model runs."""
    runs = available_methods(entry.model)
    preferred = [m for m in (LEARNED_GATE, "feature_norm", "cls_attention", TOKEN_MERGING) if m in runs]
    spare = [m for m in runs if m not in preferred]
    return (preferred + spare + [LEARNED_GATE] * MAX_COLUMNS)[:MAX_COLUMNS]


def default_amount(method: str, entry: LoadedModel) -> float:
    """The amount a column opens on for ``method``: the model's saved threshold, the selector's default
    ratio or p, or 8 tokens merged per SPA layer."""
    if method == LEARNED_GATE:
        return entry.saved_threshold
    if method == TOKEN_MERGING:
        return 8.0
    return selector_amount(method).default


class _ColumnControls:
    """One column's controls (model, method, amount, packing, fusion, unkept) and its outputs."""

    def __init__(self, number: int, choices: list[str], model: str, method: str, amount: float, enabled: bool) -> None:
        with gr.Column(min_width=260):
            self.enabled = gr.Checkbox(
                value=enabled,
                label=f"Column {number}",
                interactive=number > 2,  # two columns at least
                elem_id=f"compare-use-{number}",
            )
            self.model = gr.Dropdown(choices=choices, value=model, label="Model", allow_custom_value=True)
            self.method = gr.Dropdown(choices=METHODS, value=method, label="Method", elem_id=f"compare-method-{number}")
            self.amount = gr.Number(
                value=amount, label="Amount (threshold, ratio / p, or r)", elem_id=f"compare-amount-{number}"
            )
            with gr.Accordion("Packing, fusion, unkept", open=False):
                self.policy = gr.Radio(list(POLICIES), value="image", label="Packing policy")
                self.container_len = gr.Number(value=49, precision=0, label="Container length L")
                self.fusion = gr.Radio([SAVED_FUSION, *FUSION_MODES], value=SAVED_FUSION, label="Score fusion")
                self.unkept = gr.Radio([SAVED_FUSION, *UNKEPT_HELP], value=SAVED_FUSION, label="Unkept tokens")
            self.title = gr.Markdown(elem_id=f"compare-title-{number}")
            self.tokens = gr.Image(
                type="filepath", interactive=False, show_label=False, elem_id=f"compare-tokens-{number}"
            )
            self.output = gr.Image(
                type="filepath", interactive=False, show_label=False, elem_id=f"compare-output-{number}"
            )
            self.difference = gr.Image(
                type="filepath", interactive=False, show_label=False, elem_id=f"compare-difference-{number}"
            )

    @property
    def inputs(self) -> list[Any]:
        return [
            self.enabled,
            self.model,
            self.method,
            self.amount,
            self.policy,
            self.container_len,
            self.fusion,
            self.unkept,
        ]

    @property
    def outputs(self) -> list[Any]:
        return [self.title, self.tokens, self.output, self.difference]


def _columns_from_controls(values: Sequence[Any], default: str) -> list[Column]:
    """The enabled columns of the page's controls (8 values per column, in :attr:`_ColumnControls.inputs` order)."""
    columns = []
    for start in range(0, len(values), 8):
        enabled, model, method, amount, policy, container_len, fusion, unkept = values[start : start + 8]
        if enabled:
            columns.append(
                Column.from_dict(
                    {
                        "model": model,
                        "method": method,
                        "amount": amount,
                        "policy": policy,
                        "container_len": container_len,
                        "fusion": fusion,
                        "unkept": unkept,
                    },
                    default,
                )
            )
    return columns


def build_compare_tab(
    service: AnalysisService,
    files: gr.File,
    default_entry: LoadedModel,
    png: Callable[[Any], str | None],
    guard: Callable[[Callable[..., Any]], Callable[..., Any]],
) -> None:
    """The Compare tab's layout and events (call inside ``gr.Tab``); ``files`` is the Analyze tab's
    upload field, ``png`` writes a picture as a served PNG, ``guard`` turns errors into messages."""
    default = default_entry.key
    choices = service.registry.choices()
    if default not in choices:
        choices.append(default)
    methods = _default_methods(default_entry)

    gr.Markdown(INTRO)
    with gr.Row():
        equal = gr.Checkbox(
            value=False, label="Equal compute (match the first column's backbone MACs)", elem_id="equal"
        )
        layer = gr.Slider(0, 64, value=default_entry.spa_layers[0], step=1, label="SPA layer (nearest per model)")
        image_index = gr.Number(value=0, precision=0, label="Image of the batch (index)")
        run_button = gr.Button("Compare", variant="primary", elem_id="compare-button")
    status = gr.Markdown(elem_id="compare-status")
    with gr.Row(equal_height=False):
        controls = [
            _ColumnControls(
                number, choices, default, methods[number - 1], default_amount(methods[number - 1], default_entry), True
            )
            for number in range(1, MAX_COLUMNS + 1)
        ]
    table = gr.Dataframe(headers=COMPARE_HEADERS, label="Per column", interactive=False, elem_id="compare-table")
    with gr.Row():
        token_image = gr.Image(type="filepath", interactive=False, label="Clicked token", elem_id="compare-token-image")
        token_info = gr.JSON(label="Clicked token")
    with gr.Accordion("Trade-off: output error vs compute on these images", open=True):
        with gr.Row():
            tradeoff_methods = gr.CheckboxGroup(
                METHODS, value=service.default_tradeoff_methods(default), label="Methods", elem_id="tradeoff-methods"
            )
            points = gr.Slider(2, 12, value=5, step=1, label="Points per method")
            tradeoff_button = gr.Button("Compute trade-off", variant="primary", elem_id="tradeoff-button")
        tradeoff_plot = gr.Plot(label="Output error vs backbone GMACs", elem_id="tradeoff-plot")
        tradeoff_info = gr.JSON(label="Trade-off points")
    with gr.Accordion("Raw numbers", open=False):
        summary = gr.JSON(label="Comparison summary")
    columns_json = gr.JSON(visible=False)
    api_compare = gr.Button(visible=False)

    column_outputs = [component for control in controls for component in control.outputs]
    outputs = [status, *column_outputs, table, summary]

    def shown(result: Comparison) -> tuple[Any, ...]:
        pictures: list[Any] = []
        for number in range(MAX_COLUMNS):
            if number < len(result.columns):
                view = result.columns[number]
                pictures += [view.title, png(view.tokens), png(view.output), png(view.difference)]
            else:
                pictures += ["", None, None, None]
        return (result.status, *pictures, result.table, result.summary)

    def compare(
        files: list[str] | None,
        columns: list[dict[str, Any]],
        equal_compute: bool = False,
        layer: float = 0,
        image_index: float = 0,
    ) -> tuple[Any, ...]:
        """2-4 columns on one batch. ``columns``: a list of objects with ``model``, ``method``
        (learned_gate, a selector or token_merging), ``amount`` (threshold, ratio / p, or r; null = default),
        ``policy``, ``container_len``, ``fusion``, ``unkept``. Returns the status, per column (4, empty past
        the last) its title, kept-tokens / merge-groups picture, output and |output - dense| pictures,
        then the table (with the paired wall-clock measured) and the summary JSON."""
        if not isinstance(columns, list):
            raise UserError("columns must be a list of 2-4 column objects")
        parsed = [Column.from_dict(column, default) for column in columns]
        return shown(service.compare(files, parsed, bool(equal_compute), int(layer), int(image_index)))

    def page_compare(
        files: list[str] | None, equal_compute: bool, layer: float, image_index: float, *values: Any
    ) -> tuple[Any, ...]:
        columns = _columns_from_controls(values, default)
        return shown(service.compare(files, columns, bool(equal_compute), int(layer), int(image_index), measure=False))

    def page_measure(
        files: list[str] | None, equal_compute: bool, layer: float, image_index: float, *values: Any
    ) -> tuple[Any, Any]:
        columns = _columns_from_controls(values, default)
        result = service.compare(files, columns, bool(equal_compute), int(layer), int(image_index))
        return result.table, result.summary

    def tradeoff(
        files: list[str] | None,
        model: str,
        methods: list[str] | None = None,
        points: float = 5,
        policy: str = "image",
        fusion: str = SAVED_FUSION,
        unkept: str = SAVED_FUSION,
        progress: gr.Progress = gr.Progress(),  # noqa: B008  (gradio injects progress through this default)
    ) -> tuple[Any, dict[str, Any]]:
        """Output error vs backbone GMACs per image on these images: ``points`` amounts of each method
        (learned_gate's threshold sweep, training-free selectors, token_merging; empty = every method the
        model runs but random and uniform_topk), with ``policy``, ``fusion``, ``unkept``. Returns the plotly
        figure and the points (JSON)."""
        base = Column(
            model or default, policy=policy or "image", fusion=fusion or SAVED_FUSION, unkept=unkept or SAVED_FUSION
        )
        view = service.tradeoff(
            files,
            model or default,
            methods or None,
            int(points),
            base,
            progress=lambda fraction, message: progress(fraction, desc=message),
        )
        return view.figure, view.info

    def page_tradeoff(
        files: list[str] | None,
        methods: list[str],
        points: float,
        model: str,
        policy: str,
        fusion: str,
        unkept: str,
        progress: gr.Progress = gr.Progress(),  # noqa: B008
    ) -> tuple[Any, dict[str, Any]]:
        return tradeoff(files, model, methods, points, policy, fusion, unkept, progress)

    def click(number: int) -> Callable[..., tuple[Any, dict[str, Any]]]:
        def clicked(
            files: list[str] | None, layer: float, image_index: float, summary: dict[str, Any], evt: gr.SelectData
        ) -> tuple[Any, dict[str, Any]]:
            columns = (summary or {}).get("columns") or []
            if number > len(columns):
                raise UserError("run the comparison first, then click a token of a column")
            run_as = dict(columns[number - 1]["run_as"])
            column = Column.from_dict({"model": columns[number - 1]["model"], **run_as}, default)
            x, y = evt.index
            view = service.column_token(files, column, int(layer), int(image_index), float(x), float(y))
            return png(view.image), view.info

        return clicked

    page_inputs = [files, equal, layer, image_index, *[c for control in controls for c in control.inputs]]
    event = run_button.click(guard(page_compare), page_inputs, outputs, api_visibility="private")
    event.success(
        guard(page_measure),
        page_inputs,
        [table, summary],
        api_visibility="private",
        concurrency_limit=1,
        concurrency_id="timing",
        show_progress="minimal",
        trigger_mode="always_last",
    )
    api_compare.click(guard(compare), [files, columns_json, equal, layer, image_index], outputs, api_name="compare")
    for number, control in enumerate(controls, start=1):
        control.method.change(
            lambda method, model: default_amount(method, service.model(model or default)) if method else None,
            [control.method, control.model],
            [control.amount],
            api_visibility="private",
        )
        control.tokens.select(
            guard(click(number)),
            [files, layer, image_index, summary],
            [token_image, token_info],
            api_visibility="private",
        )
    first = controls[0]
    tradeoff_button.click(
        guard(page_tradeoff),
        [files, tradeoff_methods, points, first.model, first.policy, first.fusion, first.unkept],
        [tradeoff_plot, tradeoff_info],
        api_visibility="private",
        concurrency_limit=1,
        concurrency_id="attribution",  # one long sweep at a time, like attributions
    )
    api_tradeoff = gr.Button(visible=False)
    # the API's own arguments (the page takes them from the first column)
    tradeoff_model = gr.Textbox(value=default, visible=False)
    tradeoff_policy = gr.Textbox(value="image", visible=False)
    tradeoff_fusion = gr.Textbox(value=SAVED_FUSION, visible=False)
    tradeoff_unkept = gr.Textbox(value=SAVED_FUSION, visible=False)
    api_tradeoff.click(
        guard(tradeoff),
        [files, tradeoff_model, tradeoff_methods, points, tradeoff_policy, tradeoff_fusion, tradeoff_unkept],
        [tradeoff_plot, tradeoff_info],
        api_name="tradeoff",
        concurrency_limit=1,
        concurrency_id="attribution",
    )
