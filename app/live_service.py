"""The Live tab's logic without any UI: webcam frames and uploaded videos through SPA or its dense twin.

Each browser session streams through a :class:`~spa_viz.analysis.live.FrameAnalyser` of its own (its
running figures are per stream; at most ``LiveLimits.streams`` are kept, least recently used dropped).
Every frame runs under the model's lock with the model's saved gate settings put back first, since
the other tabs change a shared model's settings per request. An uploaded video goes through
:func:`~spa_viz.analysis.live.annotate_video` into a bounded folder: the annotated mp4 (codec mp4v,
which browsers may not play inline), a VP8 webm copy for the page's player, and the per-frame CSV.
"""

from __future__ import annotations

import logging
import os
import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from spa_viz.analysis.live import FrameAnalyser, FrameResult, VideoError, VideoReport, annotate_video

from .dataset_service import apply_gate
from .files import BoundedFolder, UploadSweeper
from .models import LoadedModel
from .service import AnalysisService, UserError

__all__ = ["LiveLimits", "LiveService", "VideoResult", "webm_preview"]

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LiveLimits:
    """What the Live tab may hold: streams (one analyser each), videos kept on disk, and a video's size."""

    streams: int = 8
    videos: int = 4
    """Annotated videos kept (each a folder: mp4, webm preview, CSV; least recently used dropped)."""
    max_frames: int = 300
    """Frames of an uploaded video analysed at most (12 s at 25 fps; about a minute at 5 frames/s)."""
    max_side: int = 960
    video_bytes: int = 50_000_000


@dataclass(frozen=True)
class VideoResult:
    """An annotated video: the report, the mp4, the page's webm copy and the per-frame CSV."""

    report: VideoReport
    mp4: Path
    preview: Path | None
    csv: Path

    def text(self) -> str:
        """The report as a few lines of markdown."""
        r = self.report
        mode = "dense twin" if r.dense else f"SPA, layer {r.layer}"
        lines = [
            f"**{r.frames} frames** ({r.analysed_size[0]}×{r.analysed_size[1]}, {r.source_fps:.0f} frames/s source) "
            f"through the {mode}: **{r.fps:.1f} frames/s** analysed, mean forward {r.mean_forward_ms:.0f} ms, "
            f"kept {r.mean_keep:.0%}, backbone MACs saved {r.mean_macs_saved:.0%}",
            *(f"⚠ {note}" for note in r.notes),
        ]
        if self.preview is None:
            lines.append("The page's player could not get a webm copy: download the mp4.")
        return "  \n".join(lines)


class _LockedAnalyser(FrameAnalyser):
    """A frame analyser that runs every frame under the model's lock, with its saved gate settings."""

    def __init__(self, entry: LoadedModel, layer: int, dense: bool, smoothing: float) -> None:
        super().__init__(entry.model, entry.adapter, layer, dense=dense, smoothing=smoothing)
        self.entry = entry

    def analyse(self, frame: np.ndarray) -> FrameResult:
        with self.entry.lock:
            apply_gate(self.entry, self.entry.saved_threshold)
            return super().analyse(frame)


@dataclass
class _Stream:
    settings: tuple[str, int, float]
    analyser: _LockedAnalyser


def webm_preview(video: Path, target: Path) -> Path | None:
    """A VP8 webm copy of ``video`` that browsers play inline (None when opencv cannot write one)."""
    capture = cv2.VideoCapture(str(video))
    fps = capture.get(cv2.CAP_PROP_FPS) or 25.0
    writer: cv2.VideoWriter | None = None
    staging = target.with_name(f".{target.name}")
    try:
        while True:
            ok, frame = capture.read()
            if not ok:
                break
            if writer is None:
                size = (frame.shape[1], frame.shape[0])
                writer = cv2.VideoWriter(str(staging), cv2.VideoWriter_fourcc(*"VP80"), fps, size)
                if not writer.isOpened():
                    return None
            writer.write(frame)
    finally:
        capture.release()
        if writer is not None:
            writer.release()
    if writer is None or not staging.exists() or staging.stat().st_size == 0:
        staging.unlink(missing_ok=True)
        return None
    os.replace(staging, target)
    return target


class LiveService:
    """Webcam frames and video files for the Live tab, on top of the app's models and files."""

    def __init__(self, analysis: AnalysisService, limits: LiveLimits | None = None) -> None:
        self.analysis = analysis
        self.limits = limits or LiveLimits()
        self.videos = BoundedFolder(analysis.files.root / "live_videos", self.limits.videos)
        self.sweep_uploads = UploadSweeper(analysis.settings.cache_check_s, analysis.settings.cache_age_s)
        self._streams: OrderedDict[str, _Stream] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def nearest_layer(entry: LoadedModel, layer: float | None) -> int:
        """The SPA layer of ``entry`` nearest to ``layer`` (None: the last SPA layer, as the analyser's default)."""
        layers = entry.spa_layers
        if not layers:
            raise UserError(f"{entry.key} has no SPA layer to show")
        return layers[-1] if layer is None else min(layers, key=lambda candidate: abs(candidate - float(layer)))

    def _analyser(self, entry: LoadedModel, layer: float | None, dense: bool, smoothing: float) -> _LockedAnalyser:
        if not 0.0 <= float(smoothing) < 1.0:
            raise UserError(f"smoothing must lie in [0, 1) (0 = off), got {smoothing}")
        return _LockedAnalyser(entry, self.nearest_layer(entry, layer), bool(dense), float(smoothing))

    def stream_count(self) -> int:
        with self._lock:
            return len(self._streams)

    def frame(
        self,
        session: str,
        frame: np.ndarray | None,
        model: str,
        layer: float | None = None,
        dense: bool = False,
        smoothing: float = 0.0,
    ) -> FrameResult:
        """One webcam frame of ``session``'s stream: its analyser carries the running figures; a new model,
        layer or smoothing starts a new one, the dense switch restarts its figures."""
        if frame is None:
            raise UserError("no frame: allow the camera and start the stream")
        entry = self.analysis.model(model)
        settings = (entry.key, self.nearest_layer(entry, layer), float(smoothing))
        with self._lock:
            stream = self._streams.get(session)
            if stream is None or stream.settings != settings:
                stream = _Stream(settings, self._analyser(entry, layer, dense, smoothing))
                self._streams[session] = stream
            self._streams.move_to_end(session)
            while len(self._streams) > self.limits.streams:
                self._streams.popitem(last=False)
        stream.analyser.dense = bool(dense)
        try:
            return stream.analyser.analyse(frame)
        except ValueError as err:
            raise UserError(str(err)) from err

    def annotate(
        self,
        path: str | Path | None,
        model: str,
        layer: float | None = None,
        dense: bool = False,
        smoothing: float = 0.0,
        max_frames: int | None = None,
    ) -> VideoResult:
        """Analyse an uploaded video frame by frame (at most ``max_frames``, the limit by default) into an
        annotated mp4, its webm copy and a per-frame CSV in the bounded video folder."""
        self.sweep_uploads()
        if not path:
            raise UserError("upload a video (mp4 or webm)")
        path = Path(path)
        limit = self.limits.max_frames if max_frames is None else int(max_frames)
        if not 1 <= limit <= self.limits.max_frames:
            raise UserError(f"max_frames must lie in 1..{self.limits.max_frames}, got {max_frames}")
        try:
            size = path.stat().st_size
        except OSError as err:
            raise UserError(f"the uploaded video is gone ({err.strerror}); upload it again") from err
        if size > self.limits.video_bytes:
            raise UserError(f"the video is {size / 1e6:.1f} MB; the limit is {self.limits.video_bytes / 1e6:.0f} MB")
        entry = self.analysis.model(model)
        analyser = self._analyser(entry, layer, dense, smoothing)
        folder = self.videos.claim(uuid.uuid4().hex[:12])
        folder.mkdir(parents=True, exist_ok=True)
        stem = "".join(c if c.isalnum() or c in "-_" else "_" for c in path.stem)[:60] or "video"
        target = folder / f"{stem}_{'dense' if dense else 'spa'}.mp4"
        try:
            report = annotate_video(path, target, analyser, max_frames=limit, max_side=self.limits.max_side)
        except VideoError as err:
            raise UserError(str(err)) from err
        preview = webm_preview(report.video, target.with_suffix(".webm"))
        _log.info("annotated %s: %d frames at %.1f frames/s", path.name, report.frames, report.fps)
        return VideoResult(report, report.video, preview, report.csv)
