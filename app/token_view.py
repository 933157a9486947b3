"""The token view of the Analyze tab: click a token on the gate or kept panel (or call ``/token``) to see,
per head, its attention over the tokens it could see as the layer ran beside the dense twin's, its gate
score, whether fusion decided, and its packed row and slot. All logic lives in
:meth:`app.service.AnalysisService.token` (from a cached forward after the first click)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import gradio as gr

from .service import SAVED_FUSION, AnalysisService, SPASettings

__all__ = ["build_token_view"]

HELP = (
    "Click a token on the **gate** or **kept** panel above (or type its row and column): per head, its attention "
    "weights over the tokens it could see as the layer ran (its container's tokens of its image; grey: tokens it "
    "could not see; white lines: container boundaries) above the dense twin's attention of the same token, with "
    "its gate score, whether a fused score decided it, and its packed row and slot."
)


def build_token_view(
    service: AnalysisService,
    settings_inputs: Sequence[Any],
    layer: Any,
    image_index: Any,
    fusion: Any,
    unkept: Any,
    clickable: Sequence[gr.Image],
    spa_settings: Callable[..., SPASettings],
    default: str,
    png: Callable[[Any], str | None],
    guard: Callable[[Callable[..., Any]], Callable[..., Any]],
) -> None:
    """The token view's layout and events (call where it should appear). ``settings_inputs``: files, model,
    selector, amount, threshold, policy, container_len (the Analyze tab's order); ``clickable``: the
    panels a click on selects a token of."""
    gr.Markdown(HELP)
    with gr.Row():
        row = gr.Number(value=0, precision=0, label="Token row", elem_id="token-row", min_width=100)
        column = gr.Number(value=0, precision=0, label="Token column", elem_id="token-column", min_width=100)
        button = gr.Button("Inspect token", elem_id="token-button")
    with gr.Row(equal_height=False):
        picture = gr.Image(type="filepath", interactive=False, show_label=False, elem_id="token-image", scale=3)
        info = gr.JSON(label="Token", elem_id="token-info", scale=1)

    def token(
        files: list[str] | None,
        model: str,
        selector: str,
        selector_amount: float,
        threshold: float,
        policy: str,
        container_len: float,
        layer: float,
        image_index: float,
        row: float,
        column: float,
        fusion: str = SAVED_FUSION,
        unkept: str = SAVED_FUSION,
    ) -> tuple[Any, dict[str, Any]]:
        """One token (``row``, ``column`` of the layer's grid) of one image at the nearest SPA layer to
        ``layer``, with the settings of ``/analyze``: its attention per head (SPA as run vs the dense twin)
        as a picture, and its gate score, fusion's say, packed row and slot as JSON."""
        spa = spa_settings(selector, selector_amount, threshold, policy, container_len, fusion, unkept)
        view = service.token(files, model or default, spa, int(layer), int(image_index), int(row), int(column))
        return png(view.image), view.info

    def clicked(
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
        evt: gr.SelectData,
    ) -> tuple[Any, ...]:
        """A click at pixel ``evt.index`` of a gate or kept panel -> that token's view (and its row, column)."""
        spa = spa_settings(selector, selector_amount, threshold, policy, container_len, fusion, unkept)
        x, y = evt.index
        position = service.token_at(files, model or default, spa, int(layer), float(x), float(y))
        if position is None:
            raise gr.Error("click on the picture of the tokens, below its title", print_exception=False)
        view = service.token(files, model or default, spa, int(layer), int(image_index), *position)
        return position[0], position[1], png(view.image), view.info

    inputs = [*settings_inputs, layer, image_index]
    button.click(guard(token), [*inputs, row, column, fusion, unkept], [picture, info], api_name="token")
    for panel in clickable:
        panel.select(guard(clicked), [*inputs, fusion, unkept], [row, column, picture, info], api_visibility="private")
