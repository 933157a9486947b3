"""Live frames per second of SPA against its dense twin: what the Live tab shows, measured in one loop.

Frames are a camera pan over a real photo (crops of ``--frame`` size sliding across it). Two
:class:`~spa_viz.analysis.live.FrameAnalyser` run on the same model, one with SPA and one with the
dense twin, each stepping through the same frames; :func:`~spa_viz.io.timer.time_paired` alternates
them frame by frame after an untimed warm-up, so load on the machine hits both alike. A timed run
is one whole frame as the Live tab runs it: preprocessing, the forward (traced for SPA), and drawing
the kept tokens and the output. Frames per second = 1 / median frame time; the forward alone is
reported beside it.

Targets (issue 21, photo model at 224 px, 2 threads): SPA >= 4 frames/s, and SPA's frames/s above
the dense twin's.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import statistics
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from spa_viz.analysis.live import FrameAnalyser, FrameResult
from spa_viz.io.files import write_text_atomic
from spa_viz.io.timer import CLOCKS, time_paired
from spa_viz.models.zoo import load

__all__ = ["TARGET_FPS", "main", "markdown", "pan_frames", "run"]

_log = logging.getLogger(__name__)

TARGET_FPS = 4.0
"""Frames per second SPA must reach live (issue 21)."""
DEFAULT_CHECKPOINT = "spa-dinov2-s14-saliency"


def pan_frames(photo: np.ndarray, count: int, size: tuple[int, int] = (640, 480)) -> list[np.ndarray]:
    """``count`` (height, width) = ``size[::-1]`` RGB crops panning diagonally across ``photo`` (enlarged
    to 1.5x the crop first), like a camera sweeping over a scene."""
    width, height = size
    scale = 1.5 * max(width / photo.shape[1], height / photo.shape[0])
    scene = cv2.resize(photo, (round(photo.shape[1] * scale), round(photo.shape[0] * scale)), cv2.INTER_LINEAR)
    steps = np.linspace(0.0, 1.0, count)
    return [
        np.ascontiguousarray(
            scene[
                round(t * (scene.shape[0] - height)) : round(t * (scene.shape[0] - height)) + height,
                round(t * (scene.shape[1] - width)) : round(t * (scene.shape[1] - width)) + width,
            ]
        )
        for t in steps
    ]


def _stepper(analyser: FrameAnalyser, frames: list[np.ndarray], results: list[FrameResult]) -> Callable[[], None]:
    """A callable that analyses the next frame (cycling) and keeps its result."""
    source: Iterator[np.ndarray] = itertools.cycle(frames)

    def step() -> None:
        results.append(analyser.analyse(next(source)))

    return step


def run(
    checkpoint: str = DEFAULT_CHECKPOINT,
    *,
    threads: int = 2,
    repeats: int = 20,
    warmup: int = 3,
    frames: int = 16,
    frame_size: tuple[int, int] = (640, 480),
    photo: str = "astronaut",
    layer: int | None = None,
    device: str = "cpu",
    clock: str = "wall",
) -> dict[str, Any]:
    """Time SPA and dense frames alternating and return every number (times in ms)."""
    from spa_viz.data.photos import load_photo  # the photos need the [data] extra

    torch.set_num_threads(threads)
    load_before = os.getloadavg()
    model = load(checkpoint, device=device)
    pictures = pan_frames(load_photo(photo), frames, frame_size)
    spa = FrameAnalyser(model, layer=layer, device=device, window=repeats)
    dense = FrameAnalyser(model, layer=layer, dense=True, device=device, window=repeats)
    results: dict[str, list[FrameResult]] = {"dense": [], "spa": []}
    _log.info(
        "%s: %d frames of %dx%d from %r, %d threads, %d warm-up + %d timed frames each",
        checkpoint,
        frames,
        *frame_size,
        photo,
        torch.get_num_threads(),
        warmup,
        repeats,
    )
    with torch.no_grad():
        timing = time_paired(
            {"dense": _stepper(dense, pictures, results["dense"]), "spa": _stepper(spa, pictures, results["spa"])},
            repeats,
            warmup=warmup,
            device=device,
            clock=clock,
        )
    timed = {name: values[warmup:] for name, values in results.items()}
    frame_ms = {name: 1e3 * timing.median(name) for name in timing.runs}
    fps = {name: 1e3 / ms for name, ms in frame_ms.items()}
    return {
        "checkpoint": checkpoint,
        "input_size": list(spa.task.input_size),
        "frame_size": list(frame_size),
        "photo": photo,
        "layer": spa.layer,
        "frames": frames,
        "timing": timing.to_dict(),
        "frame_ms": frame_ms,
        "forward_ms": {name: statistics.median(r.forward_ms for r in values) for name, values in timed.items()},
        "fps": fps,
        "fps_ratio": fps["spa"] / fps["dense"],
        "mean_keep": statistics.mean(r.keep for r in timed["spa"]),
        "mean_macs_saved": statistics.mean(r.macs_saved for r in timed["spa"]),
        "target_fps": TARGET_FPS,
        "meets_target": fps["spa"] >= TARGET_FPS and fps["spa"] > fps["dense"],
        "load_average": {"before": list(load_before), "after": list(os.getloadavg())},
        "cpus": len(os.sched_getaffinity(0)),
    }


def markdown(report: dict[str, Any]) -> str:
    """The results as a short markdown table with the conditions they were measured under."""
    timing = report["timing"]
    load = report["load_average"]
    lines = [
        f"Live frames: {report['checkpoint']} at {report['input_size'][0]} px, frames "
        f"{report['frame_size'][0]}x{report['frame_size'][1]}, layer {report['layer']} drawn, "
        f"{timing['threads']} threads on {report['cpus']} CPUs ({timing['device']}, {timing['clock']} clock), median of "
        f"{timing['repeats']} alternating frames after {timing['warmup']} warm-up",
        f"load average (1/5/15 min) before {load['before'][0]:.2f}/{load['before'][1]:.2f}/{load['before'][2]:.2f}, "
        f"after {load['after'][0]:.2f}/{load['after'][1]:.2f}/{load['after'][2]:.2f}",
        "",
        "| run | frames/s | frame ms (IQR) | forward ms | keep | backbone MACs saved |",
        "|---|---|---|---|---|---|",
    ]
    for name, keep, saved in (
        ("dense", 1.0, 0.0),
        ("spa", report["mean_keep"], report["mean_macs_saved"]),
    ):
        lines.append(
            f"| {'dense twin' if name == 'dense' else 'SPA'} | {report['fps'][name]:.2f} | "
            f"{report['frame_ms'][name]:.0f} ({timing['iqr_ms'][name]:.0f}) | {report['forward_ms'][name]:.0f} | "
            f"{keep:.0%} | {saved:.0%} |"
        )
    verdict = "met" if report["meets_target"] else "NOT met"
    lines += [
        "",
        f"SPA / dense frames per second: {report['fps_ratio']:.2f}x; target (SPA >= {report['target_fps']:g} "
        f"frames/s and above dense): {verdict}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="spa-viz bench live", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help=f"model to run (default {DEFAULT_CHECKPOINT})")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--repeats", type=int, default=20, help="timed frames per run (default 20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed frames per run first (default 3)")
    parser.add_argument("--frames", type=int, default=16, help="distinct frames in the pan (default 16)")
    parser.add_argument("--photo", default="astronaut", help="photo the camera pans over (default astronaut)")
    parser.add_argument("--layer", type=int, help="SPA layer drawn (default: the last)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument(
        "--clock",
        choices=CLOCKS,
        default="wall",
        help="wall: seconds as a viewer waits them (default); cpu: this process's CPU seconds, which other "
        "processes do not inflate (use with --threads 1 on a busy machine)",
    )
    parser.add_argument("--json", metavar="PATH", help="also write all numbers to this JSON file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    report = run(
        args.checkpoint,
        threads=args.threads,
        repeats=args.repeats,
        warmup=args.warmup,
        frames=args.frames,
        photo=args.photo,
        layer=args.layer,
        device=args.device,
        clock=args.clock,
    )
    print(markdown(report))
    if args.json:
        write_text_atomic(Path(args.json), json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
