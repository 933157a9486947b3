"""The Live tab: the webcam streamed through SPA (or its dense twin) frame by frame, and uploaded videos
annotated into an mp4 and a per-frame CSV.

Endpoints (``gradio_client``; see app/README.md): ``/live_frame`` (one frame, through the same handler
the page streams the webcam through; gradio_client cannot follow a stream event) and ``/live_video``. All logic lives in :mod:`app.live_service`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import gradio as gr
import numpy as np

from .live_service import LiveService
from .models import LoadedModel

__all__ = ["build_live_tab"]

INTRO = (
    "Point the **webcam** at something (or upload a **video**): every frame runs through the model and "
    "comes back with the kept tokens of one SPA layer beside the model's output, and the running figures "
    "(frames per second, tokens kept, backbone MACs saved). Tick **dense twin** to run every token of every "
    "layer instead and compare the frames per second. The gate runs at the threshold the model was saved with."
)
SMOOTHING_HELP = (
    "Off (0) by default. Smoothing averages the shown layer's gate values across frames (a moving average "
    "with this weight on the past) and draws the mask from the average: it calms a flickering overlay. It "
    "changes only the drawing: the model still selects every frame from that frame alone, so the figures "
    "(kept, MACs saved, time) stay the frame's own."
)


def _figures(result: Any) -> str:
    mode = "dense twin" if result.dense else f"SPA · layer {result.layer}"
    return (
        f"**{result.fps:.1f} frames/s** ({mode}) · kept {result.keep:.0%} (mean {result.mean_keep:.0%}) · "
        f"MACs saved {result.macs_saved:.0%} (mean {result.mean_macs_saved:.0%}) · forward "
        f"{result.forward_ms:.0f} ms, whole frame {result.frame_ms:.0f} ms"
    )


def build_live_tab(
    service: LiveService,
    default_entry: LoadedModel,
    guard: Callable[[Callable[..., Any]], Callable[..., Any]],
) -> None:
    """The Live tab's layout and events (call inside ``gr.Tab``); ``guard`` turns errors into messages."""
    default = default_entry.key
    choices = service.analysis.registry.choices()
    if default not in choices:
        choices.append(default)
    layers = default_entry.spa_layers
    limits = service.limits

    gr.Markdown(INTRO)
    with gr.Row():
        model = gr.Dropdown(choices=choices, value=default, label="Model", allow_custom_value=True)
        layer = gr.Dropdown(layers, value=layers[-1], label="SPA layer shown", elem_id="live-layer")
        dense = gr.Checkbox(value=False, label="Dense twin (every token; compare the fps)", elem_id="live-dense")
        smoothing = gr.Slider(0.0, 0.95, value=0.0, step=0.05, label="Temporal smoothing of the drawn mask")
    with gr.Accordion("What smoothing changes", open=False):
        gr.Markdown(SMOOTHING_HELP)
    with gr.Row(equal_height=False):
        with gr.Column(scale=1):
            webcam = gr.Image(sources=["webcam"], streaming=True, type="numpy", label="Webcam", elem_id="live-webcam")
        with gr.Column(scale=2):
            shown = gr.Image(
                type="numpy", interactive=False, show_label=False, label="Kept tokens and output", elem_id="live-output"
            )
            figures = gr.Markdown(elem_id="live-figures")
    with gr.Accordion("A video file", open=True), gr.Row(equal_height=False):
        with gr.Column(scale=1):
            video = gr.Video(sources=["upload"], label="Video (mp4 or webm)", elem_id="live-video-in")
            max_frames = gr.Slider(
                1, limits.max_frames, value=min(150, limits.max_frames), step=1, label="Frames at most"
            )
            annotate_button = gr.Button("Annotate the video", variant="primary", elem_id="live-annotate")
        with gr.Column(scale=2):
            annotated = gr.Video(label="Annotated (webm copy)", interactive=False, elem_id="live-video-out")
            report = gr.Markdown(elem_id="live-video-report")
            with gr.Row():
                mp4_file = gr.File(label="Annotated mp4 (mp4v)", elem_id="live-mp4")
                csv_file = gr.File(label="Per-frame CSV", elem_id="live-csv")

    def live_frame(
        frame: np.ndarray | None,
        model: str = default,
        layer: float | None = None,
        dense: bool = False,
        smoothing: float = 0.0,
        request: gr.Request = None,
    ) -> tuple[np.ndarray, str]:
        """One RGB frame through SPA (or the dense twin when ``dense``): the frame with the kept tokens of SPA
        layer ``layer`` (nearest) beside the model's output under a bar of figures, and the figures as text
        (fps, kept, MACs saved, ms; running over this session's last 30 frames). ``smoothing`` in [0, 1):
        moving average of the drawn gate values across frames (display only; 0 = off)."""
        session = request.session_hash if request is not None else ""
        result = service.frame(session or "", frame, model or default, layer, bool(dense), float(smoothing))
        return result.annotated, _figures(result)

    def live_video(
        video: str | None,
        model: str = default,
        layer: float | None = None,
        dense: bool = False,
        smoothing: float = 0.0,
        max_frames: float = min(150, limits.max_frames),
        progress: gr.Progress = gr.Progress(track_tqdm=True),  # noqa: B008  (gradio injects progress)
    ) -> tuple[Any, str, str, str]:
        """Annotate an uploaded mp4/webm frame by frame (at most ``max_frames``): a browser-playable webm copy,
        the report (frames, frames/s, keep, MACs saved, notes), the annotated mp4 (mp4v) and the per-frame CSV
        (frame, keep, macs_saved, forward_ms, frame_ms)."""
        result = service.annotate(video, model or default, layer, bool(dense), float(smoothing), int(max_frames))
        preview = str(result.preview) if result.preview else None
        return preview, result.text(), str(result.mp4), str(result.csv)

    def pick_model(name: str) -> Any:
        spa = service.analysis.model(name or default).spa_layers
        return gr.Dropdown(choices=spa, value=spa[-1])

    model.input(guard(pick_model), [model], [layer], api_visibility="private")
    webcam.stream(
        guard(live_frame),
        [webcam, model, layer, dense, smoothing],
        [shown, figures],
        api_name="live_stream",
        api_visibility="private",  # gradio_client cannot follow a stream event: /live_frame below takes one frame
        stream_every=0.1,
        time_limit=600,
        concurrency_limit=2,
        concurrency_id="live",
        show_progress="hidden",
    )
    api_frame = gr.Button(visible=False)
    api_picture = gr.Image(type="numpy", visible=False)
    api_frame.click(
        guard(live_frame),
        [api_picture, model, layer, dense, smoothing],
        [shown, figures],
        api_name="live_frame",
        concurrency_limit=2,
        concurrency_id="live",
    )
    annotate_button.click(
        guard(live_video),
        [video, model, layer, dense, smoothing, max_frames],
        [annotated, report, mp4_file, csv_file],
        api_name="live_video",
        concurrency_limit=1,
        concurrency_id="live_video",
    )
