"""The one timer of spa-viz: wall-clock (and process CPU) seconds of a piece of work, and paired medians.

Every latency in the project (evaluation, the benchmarks, ``spa-viz analyze``, the app) is measured
with :func:`stopwatch`, which synchronizes CUDA around the work so GPU time is counted where it is
spent. Every comparison of speeds (dense against SPA, one variant against another) is measured with
:func:`time_paired`: the candidates alternate in one loop after a warm-up, so load drift on a shared
machine hits them alike, and the result (:class:`PairedTiming`) keeps every run, so the medians,
their ratio and spread come with the repeats, threads and device they were measured with.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["CLOCKS", "PairedTiming", "QuietGuard", "Timing", "stopwatch", "time_paired"]

CLOCKS = ("wall", "cpu")
"""``wall``: ``perf_counter`` seconds. ``cpu``: this process's CPU seconds (``process_time``), which
time slices taken by other processes do not inflate; meaningful with one torch thread only (with more
it sums all threads, spin-waits included), and on the CPU only."""

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


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


@dataclass(frozen=True)
class PairedTiming:
    """Every timed run of candidates measured in one alternating loop, and how they were measured.

    ``runs`` maps each candidate to its timed seconds in run order (warm-up runs excluded); the first
    candidate is the ``baseline`` that :meth:`ratio` divides by. ``disturbed``: timed runs that other
    processes still disturbed after a :class:`QuietGuard` re-ran them (0 without a guard).
    """

    runs: Mapping[str, tuple[float, ...]]
    warmup: int
    threads: int
    device: str
    clock: str = "wall"
    disturbed: int = 0

    @property
    def baseline(self) -> str:
        """The candidate the ratios are taken against: the first one timed (by convention the dense one)."""
        return next(iter(self.runs))

    @property
    def repeats(self) -> int:
        """Timed runs per candidate."""
        return len(self.runs[self.baseline])

    def median(self, name: str) -> float:
        """Median seconds of candidate ``name``."""
        return statistics.median(self.runs[name])

    @property
    def medians(self) -> dict[str, float]:
        """Median seconds of every candidate."""
        return {name: self.median(name) for name in self.runs}

    def iqr(self, name: str) -> float:
        """Interquartile range of candidate ``name``'s seconds (0 for a single run): the spread of the median."""
        values = self.runs[name]
        if len(values) < 2:
            return 0.0
        lower, _, upper = statistics.quantiles(values, n=4, method="inclusive")
        return upper - lower

    def ratio(self, name: str, baseline: str | None = None) -> float:
        """Median time of ``name`` over that of ``baseline`` (default: the first candidate); < 1: faster."""
        return self.median(name) / self.median(baseline or self.baseline)

    def to_dict(self) -> dict[str, Any]:
        """Medians and IQRs in milliseconds, the ratio of each candidate to the baseline, and the conditions."""
        return {
            "median_ms": {name: 1e3 * value for name, value in self.medians.items()},
            "iqr_ms": {name: 1e3 * self.iqr(name) for name in self.runs},
            "ratio": {name: self.ratio(name) for name in self.runs if name != self.baseline},
            "baseline": self.baseline,
            "repeats": self.repeats,
            "warmup": self.warmup,
            "threads": self.threads,
            "device": self.device,
            "clock": self.clock,
            "disturbed": self.disturbed,
        }


def _machine_busy_seconds() -> float | None:
    """Busy CPU seconds of the whole machine since boot, all cores (/proc/stat); None off Linux."""
    try:
        with open("/proc/stat", encoding="ascii") as handle:
            ticks = [int(v) for v in handle.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    return (sum(ticks) - ticks[3] - ticks[4]) / _CLOCK_TICKS


@dataclass
class QuietGuard:
    """Keeps other processes out of CPU timings, within a budget of seconds shared by every run it guards.

    On a shared CPU, OpenMP threads slow down several-fold when another process takes a core. Each
    guarded run first waits (up to ``per_run_wait`` s) until other processes use under ``threshold``
    cores, and a run during which they took more CPU than that is run again (up to ``retries`` times).
    Runs still disturbed when the budget is spent count as disturbed. Inactive with no budget or off
    Linux (no /proc/stat).
    """

    budget: float
    per_run_wait: float = 10.0
    retries: int = 3
    threshold: float = 0.3
    waited: float = field(default=0.0, init=False)
    reruns: int = field(default=0, init=False)
    remaining: float = field(init=False)
    active: bool = field(init=False)

    def __post_init__(self) -> None:
        self.remaining = self.budget
        self.active = self.budget > 0 and _machine_busy_seconds() is not None

    def _others(self, since: tuple[float, float]) -> float:
        """CPU seconds other processes used since ``since`` = (machine busy, own process time)."""
        return (_machine_busy_seconds() or 0.0) - since[0] - (time.process_time() - since[1])

    def _wait_idle(self, window: float = 0.1) -> None:
        start = time.monotonic()
        deadline = start + min(self.per_run_wait, max(self.remaining, 0.0))
        while time.monotonic() < deadline:
            mark = (_machine_busy_seconds() or 0.0, time.process_time())
            time.sleep(window)
            if self._others(mark) < self.threshold * window:
                break
        spent = time.monotonic() - start
        self.remaining -= spent
        self.waited += spent

    def __call__(self, timed_run: Callable[[], Timing]) -> tuple[Timing, bool]:
        """(timing, disturbed) of ``timed_run``, re-run while others disturbed it and budget is left."""
        if not self.active:
            return timed_run(), False
        for _ in range(self.retries + 1):
            self._wait_idle()
            mark = (_machine_busy_seconds() or 0.0, time.process_time())
            timing = timed_run()
            disturbed = self._others(mark) > max(self.threshold * timing.wall, 3 / _CLOCK_TICKS)
            if not disturbed or self.remaining <= 0:
                return timing, disturbed
            self.remaining -= timing.wall
            self.reruns += 1
        return timing, disturbed


def time_paired(
    work: Mapping[str, Callable[[], object]],
    repeats: int,
    warmup: int = 1,
    device: torch.device | str | None = None,
    *,
    clock: str = "wall",
    rotate: bool = False,
    before: Callable[[str], None] | None = None,
    guard: QuietGuard | None = None,
) -> PairedTiming:
    """Time the callables of ``work`` alternating in one loop: ``warmup`` untimed rounds, then
    ``repeats`` timed rounds, each round running every callable once in ``work``'s order.

    A busy spell on the machine thus slows every candidate, not the one that happened to run then;
    each candidate's median is taken over its ``repeats`` runs. ``rotate``: each timed round starts
    one candidate later (round r runs candidate r mod n first), so no candidate always follows the
    same one. ``before(name)`` runs untimed before each run of ``name`` (e.g. resetting gradients);
    ``guard`` keeps other processes out of the timed runs on the CPU. On CUDA the queue is drained
    around every timed run. The threads recorded are torch's CPU threads during the loop.
    """
    if repeats < 1 or warmup < 0 or not work:
        raise ValueError(f"need candidates, repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    if clock not in CLOCKS:
        raise ValueError(f"unknown clock {clock!r}; choose one of {CLOCKS}")
    if clock == "cpu" and device is not None and torch.device(device).type != "cpu":
        raise ValueError("the cpu clock times CPU work only; use clock='wall' on an accelerator")
    names = list(work)

    def timed_run(name: str) -> Timing:
        if before is not None:
            before(name)
        with stopwatch(device) as timing:
            work[name]()
        return timing

    for _ in range(warmup):
        for name in names:
            if before is not None:
                before(name)
            work[name]()
    runs: dict[str, list[float]] = {name: [] for name in names}
    disturbed = 0
    for round_index in range(repeats):
        start = round_index % len(names) if rotate else 0
        for name in names[start:] + names[:start]:
            if guard is None:
                timing, busy = timed_run(name), False
            else:
                timing, busy = guard(lambda name=name: timed_run(name))
            runs[name].append(timing.cpu if clock == "cpu" else timing.wall)
            disturbed += busy
    return PairedTiming(
        runs={name: tuple(values) for name, values in runs.items()},
        warmup=warmup,
        threads=torch.get_num_threads(),
        device=str(torch.device(device)) if device is not None else "cpu",
        clock=clock,
        disturbed=disturbed,
    )
