"""The one timer: the stopwatch measures the block it wraps; the paired timer alternates its candidates
after an untimed warm-up and reports medians, ratio, spread and conditions from the runs it timed."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
import torch

from spa_viz.io import timer
from spa_viz.io.timer import PairedTiming, QuietGuard, stopwatch, time_paired


class FakeClock:
    """A stand-in for the ``time`` module whose clocks advance only when a candidate says so."""

    def __init__(self) -> None:
        self.now = 0.0
        self.cpu = 0.0

    def advance(self, seconds: float, cpu: float = 0.0) -> None:
        self.now += seconds
        self.cpu += cpu

    def module(self) -> SimpleNamespace:
        return SimpleNamespace(perf_counter=lambda: self.now, process_time=lambda: self.cpu)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(timer, "time", fake.module())
    return fake


def test_stopwatch_fills_in_wall_and_cpu_time() -> None:
    with stopwatch() as timing:
        time.sleep(0.02)
    assert timing.wall >= 0.02 and 0.0 <= timing.cpu < timing.wall


def test_candidates_alternate_after_an_alternating_warmup() -> None:
    calls: list[str] = []
    work = {name: (lambda name=name: calls.append(name)) for name in ("a", "b", "c")}
    result = time_paired(work, repeats=3, warmup=2)
    assert calls == ["a", "b", "c"] * 2 + ["a", "b", "c"] * 3
    assert result.repeats == 3 and result.warmup == 2 and set(result.runs) == {"a", "b", "c"}


def test_rotation_starts_each_round_one_candidate_later() -> None:
    calls: list[str] = []
    work = {name: (lambda name=name: calls.append(name)) for name in ("a", "b", "c")}
    time_paired(work, repeats=4, warmup=1, rotate=True, before=lambda name: calls.append(f"before {name}"))
    runs = [call for call in calls if not call.startswith("before")]
    assert runs == ["a", "b", "c"] + ["a", "b", "c", "b", "c", "a", "c", "a", "b", "a", "b", "c"]
    assert calls[:2] == ["before a", "a"], "before() runs ahead of every run, warm-up included"


def test_medians_ratio_and_spread_come_from_the_timed_runs_only(clock: FakeClock) -> None:
    dense = iter([100.0, 5.0, 3.0, 4.0, 2.0])  # the first run is the warm-up: excluded
    sparse = iter([50.0, 1.0, 2.0, 1.5, 1.0])
    result = time_paired(
        {"dense": lambda: clock.advance(next(dense)), "spa": lambda: clock.advance(next(sparse))},
        repeats=4,
        warmup=1,
    )
    assert result.runs == {"dense": (5.0, 3.0, 4.0, 2.0), "spa": (1.0, 2.0, 1.5, 1.0)}
    assert result.median("dense") == 3.5 and result.median("spa") == 1.25
    assert result.baseline == "dense" and result.ratio("spa") == pytest.approx(1.25 / 3.5)
    assert result.ratio("dense", baseline="spa") == pytest.approx(3.5 / 1.25)
    # inclusive quartiles of (2, 3, 4, 5): 2.75 and 4.25
    assert result.iqr("dense") == pytest.approx(1.5) and result.iqr("spa") == pytest.approx(0.625)
    record = result.to_dict()
    assert record["median_ms"] == {"dense": 3500.0, "spa": 1250.0}
    assert record["ratio"] == {"spa": pytest.approx(1.25 / 3.5)}
    assert (record["repeats"], record["warmup"], record["device"], record["clock"]) == (4, 1, "cpu", "wall")
    assert record["threads"] == torch.get_num_threads()


def test_cpu_clock_times_process_time(clock: FakeClock) -> None:
    result = time_paired({"work": lambda: clock.advance(2.0, cpu=0.5)}, repeats=3, warmup=0, clock="cpu")
    assert result.runs == {"work": (0.5, 0.5, 0.5)} and result.clock == "cpu" and result.iqr("work") == 0.0


def test_real_sleeps_give_their_medians_and_ratio() -> None:
    result = time_paired({"slow": lambda: time.sleep(0.02), "fast": lambda: time.sleep(0.005)}, repeats=5, warmup=1)
    assert 0.02 <= result.median("slow") < 0.2 and 0.005 <= result.median("fast") < result.median("slow")
    assert result.ratio("fast") < 1.0


def test_cuda_queue_is_drained_around_every_timed_run(monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[str] = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: events.append("sync"))
    result = time_paired({"a": lambda: events.append("a"), "b": lambda: events.append("b")}, 2, device="cuda")
    assert events == ["a", "b"] + ["sync", "a", "sync", "sync", "b", "sync"] * 2, "warm-up unsynchronised"
    assert result.device == "cuda"


def test_one_run_has_no_spread() -> None:
    assert PairedTiming({"a": (0.1,)}, warmup=0, threads=1, device="cpu").iqr("a") == 0.0


def test_invalid_requests_are_refused() -> None:
    with pytest.raises(ValueError, match="repeats"):
        time_paired({"a": lambda: None}, repeats=0)
    with pytest.raises(ValueError, match="repeats"):
        time_paired({}, repeats=3)
    with pytest.raises(ValueError, match="unknown clock"):
        time_paired({"a": lambda: None}, repeats=1, clock="gpu")
    with pytest.raises(ValueError, match="cpu clock"):
        time_paired({"a": lambda: None}, repeats=1, device="cuda", clock="cpu")


def test_guard_reruns_disturbed_runs_within_its_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    """Others take a core during every run: each run is retried, then kept as disturbed once the budget is spent."""
    busy = [0.0]

    def machine_busy() -> float:
        busy[0] += 1.0  # every reading: one more second used by other processes
        return busy[0]

    monkeypatch.setattr(timer, "_machine_busy_seconds", machine_busy)
    guard = QuietGuard(budget=0.3, per_run_wait=0.01, retries=2)
    result = time_paired({"a": lambda: None, "b": lambda: None}, repeats=2, warmup=0, guard=guard)
    assert guard.active and guard.reruns >= 1 and guard.remaining <= 0
    assert result.disturbed == 4, "every timed run stayed disturbed"


def test_inactive_guard_times_once() -> None:
    guard = QuietGuard(budget=0.0)
    calls: list[int] = []
    result = time_paired({"a": lambda: calls.append(1)}, repeats=3, warmup=0, guard=guard)
    assert not guard.active and len(calls) == 3 and result.disturbed == 0 and guard.reruns == 0
