"""The one timer of spa-viz: wall-clock (and process CPU) seconds of a piece of work, and medians.

Every latency in the project (evaluation, the benchmarks, ``spa-viz analyze``, the app) is measured
with :func:`stopwatch`, which synchronizes CUDA around the work so GPU time is counted where it is
spent, or with :func:`median_seconds`, which interleaves the candidates so load drift on a shared
machine hits them alike.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch

__all__ = ["Timing", "median_seconds", "stopwatch"]


@dataclass
class Timing:
    """Seconds one piece of work took: ``wall`` (perf_counter) and ``cpu`` (this process, all threads)."""

    wall: float = 0.0
    cpu: float = 0.0


def _sync(device: torch.device | str | None) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def stopwatch(device: torch.device | str | None = None) -> Iterator[Timing]:
    """Time the ``with`` block; the yielded :class:`Timing` is filled in when the block ends.

    On a CUDA ``device`` the queue is drained before and after, so the time is the GPU's too.
    """
    timing = Timing()
    _sync(device)
    start, cpu = time.perf_counter(), time.process_time()
    try:
        yield timing
    finally:
        _sync(device)
        timing.wall = time.perf_counter() - start
        timing.cpu = time.process_time() - cpu


def median_seconds(
    work: Mapping[str, Callable[[], object]],
    repeats: int,
    warmup: int = 1,
    device: torch.device | str | None = None,
) -> dict[str, float]:
    """Median wall-clock seconds of each callable over ``repeats`` runs after ``warmup`` runs each.

    The candidates alternate run by run (round robin), so a busy spell on the machine slows all of
    them, not the one that happened to run then.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    for fn in work.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in work}
    for _ in range(repeats):
        for name, fn in work.items():
            with stopwatch(device) as timing:
                fn()
            times[name].append(timing.wall)
    return {name: statistics.median(values) for name, values in times.items()}
