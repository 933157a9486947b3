"""Live analysis: one video frame at a time through SPA (or its dense twin), drawn for a presenter.

:class:`FrameAnalyser` turns an RGB frame (a webcam picture, a decoded video frame) into a
:class:`FrameResult`: the frame with the kept tokens of one SPA layer and the model's output drawn on
it, the frame's keep ratio, backbone MACs saved and forward milliseconds, and running figures over a
sliding window (frames per second, mean keep, mean MACs saved). :func:`annotate_video` runs it over a
video file and writes an annotated mp4 and a per-frame CSV beside it. The Live tab of the app and
``benchmarks`` call these; nothing here knows about the UI.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from spa_viz.analysis.trace import LayerTrace, trace
from spa_viz.io.files import refuse_overwrite, write_text_atomic
from spa_viz.io.timer import stopwatch
from spa_viz.layers.block import spa_blocks
from spa_viz.models.spa_vit import spa_context
from spa_viz.models.twin import dense_twin
from spa_viz.viz import overlays
from spa_viz.viz.panels import gate_values
from spa_viz.viz.tasks import TaskAdapter, adapter_for

__all__ = [
    "CSV_COLUMNS",
    "DEFAULT_MAX_FRAMES",
    "DEFAULT_MAX_SIDE",
    "FrameAnalyser",
    "FrameResult",
    "VideoError",
    "VideoReport",
    "annotate_video",
]

_log = logging.getLogger(__name__)

DEFAULT_MAX_FRAMES = 600
"""Frames :func:`annotate_video` analyses at most (24 s of a 25 fps video; about 2 minutes on 2 cores)."""
DEFAULT_MAX_SIDE = 1280
"""Frames with a longer side than this are downscaled before analysis (the model sees 224-ish pixels)."""
CSV_COLUMNS = ("frame", "keep", "macs_saved", "forward_ms", "frame_ms")
"""Columns of the per-frame CSV: frame index, kept share at the shown layer, share of the dense backbone's
MACs not spent, milliseconds of the model's forward, milliseconds of the whole frame (with drawing)."""
_FALLBACK_FPS = 25.0


class VideoError(ValueError):
    """A video that cannot be analysed: missing, unreadable or corrupt, without frames, or not writable."""


@dataclass(frozen=True)
class FrameResult:
    """One analysed frame and the running figures after it.

    ``keep`` is the share of patch tokens the shown SPA layer kept in this frame's own forward (1.0 for
    the dense twin); ``macs_saved`` the share of the dense twin's backbone MACs this forward did not spend
    (0.0 for the dense twin). ``fps``, ``mean_keep`` and ``mean_macs_saved`` cover the analyser's last
    ``window`` frames; ``fps`` counts the whole :meth:`FrameAnalyser.analyse` call (preprocessing,
    forward, drawing), not the time between frames arriving.
    """

    annotated: np.ndarray
    """(H, W, 3) uint8 RGB: kept tokens beside the model's output, under a bar with the figures."""
    dense: bool
    layer: int
    keep: float
    macs_saved: float
    forward_ms: float
    frame_ms: float
    fps: float
    mean_keep: float
    mean_macs_saved: float
    keep_mask: np.ndarray | None
    """(gh, gw) bool: what SPA kept at the shown layer in this forward (None for the dense twin)."""
    shown_scores: np.ndarray | None
    """(gh, gw) gate values in [0, 1] the shown mask comes from: this frame's, or their moving average."""
    shown_mask: np.ndarray | None
    """(gh, gw) bool: the drawn keep mask (``keep_mask`` itself when smoothing is off)."""

    def row(self, frame: int) -> dict[str, float | int]:
        """The CSV row of this result as frame ``frame`` (:data:`CSV_COLUMNS`)."""
        return {
            "frame": frame,
            "keep": round(self.keep, 6),
            "macs_saved": round(self.macs_saved, 6),
            "forward_ms": round(self.forward_ms, 3),
            "frame_ms": round(self.frame_ms, 3),
        }


def _as_rgb(frame: np.ndarray) -> np.ndarray:
    """An (H, W, 3) uint8 RGB frame from RGB, RGBA or grey uint8 input (ValueError otherwise)."""
    frame = np.asarray(frame)
    if frame.dtype != np.uint8 or frame.ndim not in (2, 3) or frame.shape[0] == 0 or frame.shape[1] == 0:
        raise ValueError(f"expected an (H, W, 3) uint8 RGB frame, got {frame.dtype} {frame.shape}")
    if frame.ndim == 2:
        return np.repeat(frame[:, :, None], 3, axis=2)
    if frame.shape[2] == 4:
        return np.ascontiguousarray(frame[:, :, :3])
    if frame.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) uint8 RGB frame, got {frame.dtype} {frame.shape}")
    return frame


def _percent(share: float) -> str:
    """``share`` as a whole percentage, without the sign of a rounding-size negative (``-0%``)."""
    text = f"{share:.0%}"
    return "0%" if text == "-0%" else text


def _stretches_frame(adapter: TaskAdapter) -> bool:
    """Whether the adapter's input is the whole frame stretched to a rectangle (the base plain resize), so
    the token grid spans the frame and can be drawn on it at its own aspect ratio; letterboxing adapters
    (the detectors) draw on the square picture the model saw instead."""
    return type(adapter).preprocess is TaskAdapter.preprocess


class FrameAnalyser:
    """Analyses one RGB frame at a time with an SPA model, or with its dense twin when ``dense``.

    Each frame is preprocessed by the model's task adapter (:func:`~spa_viz.viz.tasks.adapter_for`), run
    through :func:`spa_viz.trace` (SPA) or :func:`spa_viz.dense_twin` (every token of every layer), and
    drawn: the kept tokens of SPA layer ``layer`` (default: the last SPA layer) beside the output drawn
    by the adapter, under a bar with this frame's figures and the running ones.

    ``smoothing`` in [0, 1) (0 = off, the default) smooths what is *displayed*, not what is computed: the
    shown layer's gate values (a learned gate's keep probability ``sigmoid(s / tau)``, a selector's
    normalized scores) are averaged across frames, ``ema = smoothing * ema + (1 - smoothing) * values``
    (the first frame starts it), and the drawn mask is ``ema > threshold`` for a learned gate, or the
    ``k`` highest averaged values for a selector, ``k`` being what it kept in this frame. The model still
    selects every frame from that frame alone, so ``keep``, ``macs_saved``, the timings and
    ``keep_mask`` are the frame's own: smoothing calms a flickering overlay without hiding what SPA
    computed. Switching ``dense`` or calling :meth:`reset` restarts the average and the running figures.

    The model runs in its own train/eval mode (:func:`spa_viz.load` gives eval) on ``device`` (default:
    where its parameters are). One analyser per stream: its running state is not shared across threads.
    """

    def __init__(
        self,
        model: nn.Module,
        task: TaskAdapter | None = None,
        layer: int | None = None,
        *,
        dense: bool = False,
        smoothing: float = 0.0,
        device: torch.device | str | None = None,
        window: int = 30,
        display_height: int = 360,
    ) -> None:
        if not 0.0 <= smoothing < 1.0:
            raise ValueError(f"smoothing must lie in [0, 1) (0 = off), got {smoothing}")
        if window < 1 or display_height < 32:
            raise ValueError(f"need window >= 1 and display_height >= 32, got {window} and {display_height}")
        layers = [int(block.spa_layer) for block in spa_blocks(model)]
        if not layers:
            raise ValueError("this model has no SPA layers to show")
        layer = layers[-1] if layer is None else int(layer)
        if layer not in layers:
            raise ValueError(f"layer {layer} is not an SPA layer; SPA layers: {layers}")
        self.model = model
        self.task = adapter_for(model) if task is None else task
        self.layer = layer
        self.smoothing = float(smoothing)
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.display_height = int(display_height)
        self._dense = bool(dense)
        self._window: deque[tuple[float, float, float]] = deque(maxlen=int(window))
        self._average: np.ndarray | None = None

    @property
    def dense(self) -> bool:
        """Whether frames run through the dense twin; setting it restarts the running figures."""
        return self._dense

    @dense.setter
    def dense(self, value: bool) -> None:
        if bool(value) != self._dense:
            self._dense = bool(value)
            self.reset()

    def reset(self) -> None:
        """Forget the running figures and the smoothed gate values (a new stream or video)."""
        self._window.clear()
        self._average = None

    def _display(self, frame: np.ndarray, x: Tensor) -> np.ndarray:
        """The picture both panels are drawn on, ``display_height`` pixels high."""
        height = self.display_height
        if _stretches_frame(self.task):
            width = max(1, round(frame.shape[1] * height / frame.shape[0]))
            return cv2.resize(frame, (width, height), interpolation=cv2.INTER_AREA)
        return cv2.resize(self.task.display(x), (height, height), interpolation=cv2.INTER_LINEAR)

    def _shown(self, record: LayerTrace) -> tuple[np.ndarray, np.ndarray]:
        """(gate values, keep mask) to draw for the shown layer: this frame's, or smoothed across frames."""
        values = gate_values(record, 0).numpy().astype(np.float64)
        keep = record.keep_map(0).numpy().astype(bool)
        if self.smoothing == 0.0:
            return values, keep
        if self._average is None or self._average.shape != values.shape:
            self._average = values
        else:
            self._average = self.smoothing * self._average + (1.0 - self.smoothing) * values
        average = self._average
        if record.learned:
            return average, average > record.threshold
        mask = np.zeros(average.size, dtype=bool)
        mask[np.argsort(-average, axis=None, kind="stable")[: int(keep.sum())]] = True
        return average, mask.reshape(average.shape)

    def _forward(self, x: Tensor) -> tuple[Any, LayerTrace | None, float, float]:
        """(output, the shown layer's record or None, keep, MACs saved) of one forward of ``x`` (1, 3, h, w)."""
        if self._dense:
            with dense_twin(self.model), torch.no_grad():
                return self.model(x), None, 1.0, 0.0
        if not spa_context(self.model).config.enabled:
            raise ValueError("SPA is switched off in this model (config enabled=False); set dense=True instead")
        output, record = trace(self.model, x)
        shown = record.layer(self.layer)
        return output, shown, float(shown.keep_ratio[0]), record.backbone_saving

    def analyse(self, frame: np.ndarray) -> FrameResult:
        """Analyse one (H, W, 3) uint8 RGB frame (RGBA and grey are accepted) and update the running figures."""
        start = time.perf_counter()
        frame = _as_rgb(frame)
        x = self.task.preprocess(frame)
        with stopwatch(self.device) as forward:
            output, record, keep, saved = self._forward(x[None].to(self.device))
        display = self._display(frame, x)
        if record is None:
            values = mask = None
            kept = overlays.add_title(display, "Dense twin", "SPA off: every token of every layer computed")
        else:
            values, mask = self._shown(record)
            shown = int(mask.sum())
            how = f" · drawn: moving average {self.smoothing:g}" if self.smoothing else ""
            kept = overlays.add_title(
                overlays.keep_overlay(display, mask),
                f"Kept tokens · layer {self.layer}",
                f"{shown} of {mask.size} ({shown / mask.size:.0%}){how}",
            )
        drawn = overlays.hstack([kept, self.task.draw(display, output, 0)])
        frame_seconds = time.perf_counter() - start
        self._window.append((frame_seconds, keep, saved))
        fps = len(self._window) / max(sum(s for s, _, _ in self._window), 1e-9)
        mean_keep = sum(k for _, k, _ in self._window) / len(self._window)
        mean_saved = sum(m for _, _, m in self._window) / len(self._window)
        mode = "Dense twin" if record is None else f"SPA · layer {self.layer}"
        annotated = overlays.add_title(
            drawn,
            f"{mode} · kept {_percent(keep)} · MACs saved {_percent(saved)} · {1e3 * forward.wall:.0f} ms",
            f"{fps:.1f} frames/s · mean kept {_percent(mean_keep)} · mean MACs saved {_percent(mean_saved)} "
            f"(last {len(self._window)} frames)",
        )
        return FrameResult(
            annotated=annotated,
            dense=record is None,
            layer=self.layer,
            keep=keep,
            macs_saved=saved,
            forward_ms=1e3 * forward.wall,
            frame_ms=1e3 * frame_seconds,
            fps=fps,
            mean_keep=mean_keep,
            mean_macs_saved=mean_saved,
            keep_mask=None if record is None else record.keep_map(0).numpy().astype(bool),
            shown_scores=values,
            shown_mask=mask,
        )


@dataclass(frozen=True)
class VideoReport:
    """What :func:`annotate_video` wrote and measured."""

    video: Path
    csv: Path
    frames: int
    """Frames analysed (and written)."""
    source_fps: float
    """Frame rate of the input (also the output's); 25 when the container does not say."""
    source_size: tuple[int, int]
    """(width, height) of the input's frames."""
    analysed_size: tuple[int, int]
    """(width, height) of the frames as analysed (smaller than the source when downscaled)."""
    output_size: tuple[int, int]
    """(width, height) of the annotated frames."""
    truncated: bool
    """Whether the video had more frames than ``max_frames`` (the rest were not analysed)."""
    dense: bool
    layer: int
    mean_keep: float
    mean_macs_saved: float
    mean_forward_ms: float
    fps: float
    """Frames analysed per second of analysis (frames / summed frame time)."""
    rows: tuple[dict[str, float | int], ...] = field(repr=False)
    """The CSV's rows (:data:`CSV_COLUMNS`)."""
    notes: tuple[str, ...] = ()
    """What was changed or cut short (downscaling, the frame cap, frames that did not decode)."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready figures of the video (without the per-frame rows)."""
        return {
            "video": str(self.video),
            "csv": str(self.csv),
            "frames": self.frames,
            "source_fps": round(self.source_fps, 3),
            "source_size": list(self.source_size),
            "analysed_size": list(self.analysed_size),
            "output_size": list(self.output_size),
            "truncated": self.truncated,
            "dense": self.dense,
            "layer": self.layer,
            "mean_keep": round(self.mean_keep, 4),
            "mean_macs_saved": round(self.mean_macs_saved, 4),
            "mean_forward_ms": round(self.mean_forward_ms, 2),
            "fps": round(self.fps, 3),
            "notes": list(self.notes),
        }


def _csv_text(rows: list[dict[str, float | int]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def _open_video(path: Path) -> tuple[cv2.VideoCapture, np.ndarray]:
    """An opened capture and its first frame (BGR), or a :class:`VideoError` that says what is wrong."""
    if not path.is_file():
        raise VideoError(f"no video file at {path}")
    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        capture.release()
        raise VideoError(f"cannot read {path.name}: opencv cannot decode it as a video (corrupt, or not mp4/webm)")
    ok, first = capture.read()
    if not ok or first is None or first.size == 0:
        capture.release()
        raise VideoError(f"{path.name} has no frames that opencv can decode (empty or corrupt video)")
    return capture, first


def annotate_video(
    path_in: str | Path,
    path_out: str | Path,
    analyser: FrameAnalyser,
    *,
    max_frames: int = DEFAULT_MAX_FRAMES,
    max_side: int = DEFAULT_MAX_SIDE,
    progress: bool = True,
    overwrite: bool = False,
) -> VideoReport:
    """Analyse every frame of the mp4/webm ``path_in`` (up to ``max_frames``) and write the annotated frames
    to the mp4 ``path_out`` (codec mp4v, the input's frame rate) and their figures to ``path_out`` with the
    suffix ``.csv`` (:data:`CSV_COLUMNS`).

    Frames longer than ``max_side`` pixels are downscaled first. Both files appear whole or not at all
    (written beside their place, then renamed), and existing files are never replaced unless
    ``overwrite``. ``progress`` shows a tqdm bar (which ``gradio.Progress(track_tqdm=True)`` follows).
    The analyser's running figures restart for the video. Raises :class:`VideoError` for a missing,
    unreadable, corrupt or empty video, ValueError for bad arguments and
    :class:`~spa_viz.io.files.OutputExistsError` for existing outputs.
    """
    path_in, path_out = Path(path_in), Path(path_out)
    if max_frames < 1 or max_side < 32:
        raise ValueError(f"need max_frames >= 1 and max_side >= 32, got {max_frames} and {max_side}")
    if path_out.suffix.lower() != ".mp4":
        raise ValueError(f"the annotated video is written as mp4: name it *.mp4, got {path_out.name}")
    if not path_out.parent.is_dir():
        raise ValueError(f"output folder {path_out.parent} does not exist")
    csv_path = path_out.with_suffix(".csv")
    if not overwrite:
        refuse_overwrite([path_out, csv_path], flag="overwrite=True")
    capture, frame = _open_video(path_in)
    source_fps = capture.get(cv2.CAP_PROP_FPS)
    if not math.isfinite(source_fps) or not 0 < source_fps <= 240:
        source_fps = _FALLBACK_FPS
    declared = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
    source_size = (frame.shape[1], frame.shape[0])
    scale = min(1.0, max_side / max(source_size))
    analysed_size = (max(1, round(source_size[0] * scale)), max(1, round(source_size[1] * scale)))
    notes = []
    if scale < 1.0:
        notes.append(
            f"frames downscaled from {source_size[0]}x{source_size[1]} to {analysed_size[0]}x{analysed_size[1]}"
        )
    analyser.reset()
    fd, tmp_name = tempfile.mkstemp(dir=path_out.parent, prefix=f".{path_out.name}.", suffix=".mp4")
    os.close(fd)
    tmp = Path(tmp_name)
    writer: cv2.VideoWriter | None = None
    rows: list[dict[str, float | int]] = []
    output_size = (0, 0)
    truncated = False
    total = min(declared, max_frames) if declared > 0 else None
    bar = tqdm(total=total, unit="frame", desc=path_in.name, disable=not progress)
    try:
        while frame is not None:
            if scale < 1.0:
                frame = cv2.resize(frame, analysed_size, interpolation=cv2.INTER_AREA)
            result = analyser.analyse(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
            picture = cv2.cvtColor(result.annotated, cv2.COLOR_RGB2BGR)
            if writer is None:
                output_size = (picture.shape[1], picture.shape[0])
                writer = cv2.VideoWriter(str(tmp), cv2.VideoWriter_fourcc(*"mp4v"), source_fps, output_size)
                if not writer.isOpened():
                    raise VideoError(f"opencv cannot write an mp4v video to {path_out.parent}")
            elif (picture.shape[1], picture.shape[0]) != output_size:
                picture = cv2.resize(picture, output_size, interpolation=cv2.INTER_AREA)
            writer.write(picture)
            rows.append(result.row(len(rows)))
            bar.update(1)
            if len(rows) >= max_frames:
                truncated = capture.grab()
                break
            ok, frame = capture.read()
            frame = frame if ok else None
        writer.release()
        if truncated:
            notes.append(f"stopped at the frame cap: the first {max_frames} frames analysed")
        elif declared > len(rows):
            notes.append(f"{declared - len(rows)} of the {declared} frames the container lists did not decode")
        write_text_atomic(csv_path, _csv_text(rows))
        os.chmod(tmp, 0o644)
        os.replace(tmp, path_out)
    finally:
        bar.close()
        capture.release()
        if writer is not None:
            writer.release()
        if tmp.exists():
            tmp.unlink()
    for note in notes:
        _log.info("%s: %s", path_in.name, note)
    frame_seconds = sum(float(r["frame_ms"]) for r in rows) / 1e3
    return VideoReport(
        video=path_out,
        csv=csv_path,
        frames=len(rows),
        source_fps=float(source_fps),
        source_size=source_size,
        analysed_size=analysed_size,
        output_size=output_size,
        truncated=truncated,
        dense=analyser.dense,
        layer=analyser.layer,
        mean_keep=sum(float(r["keep"]) for r in rows) / len(rows),
        mean_macs_saved=sum(float(r["macs_saved"]) for r in rows) / len(rows),
        mean_forward_ms=sum(float(r["forward_ms"]) for r in rows) / len(rows),
        fps=len(rows) / max(frame_seconds, 1e-9),
        rows=tuple(rows),
        notes=tuple(notes),
    )
