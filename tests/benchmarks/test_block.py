"""The per-block benchmark at a tiny size: result structure and the correctness of its variants."""

from __future__ import annotations

import json
import statistics
from dataclasses import replace

import pytest
import torch

from spa_viz.benchmarks import block as bench
from spa_viz.io.timer import QuietGuard

TINY = bench.BenchConfig(
    dim=64,
    heads=2,
    grid=(4, 4),
    batches=(2,),
    keeps=(0.3,),
    container_lens=(7,),
    soft_gating=False,
    warmup=0,
    repeats=1,
)
VARIANTS = {"dense", "masked", "pad", "spa-c7", "spa-image"}


@pytest.mark.parametrize("mode", bench.MODES)
def test_run_benchmark_structure(mode: str) -> None:
    config = replace(TINY, modes=(mode,))
    results = bench.run_benchmark(config, progress=False)
    assert {m.variant for m in results} == VARIANTS
    dense = next(m for m in results if m.variant == "dense")
    for m in results:
        assert (m.mode, m.batch, m.keep) == (mode, 2, 0.3)
        assert m.time_ms > 0 and len(m.times_ms) == 1 and m.flops > 0
        assert m.dense_time_ms == dense.time_ms and m.dense_flops == dense.flops
        expected = (dense.time_ms / m.time_ms) / (dense.flops / m.flops)
        assert m.realized_fraction == pytest.approx(expected)
        json.dumps(m.to_dict())
    for m in results:
        if m.variant.startswith("spa") or m.variant == "pad":
            assert m.flops < dense.flops
    assert next(m for m in results if m.variant == "masked").flops == dense.flops
    assert 0.2 <= dense.keep_real <= 0.4


def test_inputs_keep_spread_and_gate_logits() -> None:
    config = replace(TINY, grid=(10, 10))
    x, keep = bench.make_inputs(config, 5, 0.5)
    assert keep[:, 0].all()
    counts = keep[:, 1:].sum(1)
    assert sorted(counts.tolist()) == [40, 45, 50, 55, 60]
    assert torch.equal(x[:, 1:, 0] > 0, keep[:, 1:])
    x2, keep2 = bench.make_inputs(config, 5, 0.5)
    assert torch.equal(x, x2) and torch.equal(keep, keep2)


def test_variant_outputs_agree_on_kept_tokens() -> None:
    """masked, pad-to-max and SPA image packing compute exact per-image attention over kept tokens."""
    block = bench.make_block(TINY).eval()
    x, keep = bench.make_inputs(TINY, 3, 0.3)
    variants = bench.build_variants(block, x, keep, TINY)
    with torch.no_grad():
        out = {name: v.forward(x) for name, v in variants.items()}
    reference = out["masked"]
    for name in ("pad", "spa-image"):
        torch.testing.assert_close(out[name][keep], reference[keep], atol=1e-5, rtol=0)
    for name in ("masked", "pad", "spa-c7", "spa-image"):
        assert torch.equal(out[name][~keep], x[~keep]), name
    # with every token kept, masked selection is the dense block
    full = torch.ones_like(keep)
    torch.testing.assert_close(bench.masked_forward(block, x, full), out["dense"], atol=1e-5, rtol=0)


def test_training_selection_is_deterministic() -> None:
    """Large gate logits make the Gumbel keep mask of the SPA block equal the intended mask."""
    block = bench.make_block(TINY)
    x, keep = bench.make_inputs(TINY, 2, 0.3)
    spa, ctx = bench._spa_block(block, TINY, "image", None)
    spa.train()
    ctx.records = []
    for _ in range(5):
        ctx.begin(TINY.grid)
        spa(x).sum().backward()
    assert all(torch.equal(d.keep, keep[:, 1:].cpu()) for d in ctx.records)


def test_targets_and_table() -> None:
    results = bench.run_benchmark(TINY, progress=False)
    checks = bench.check_targets(results, spa="spa-c7", batch=2)
    assert {c.verdict for c in checks} <= {"PASS", "MISS", "N/A"}
    assert any(c.passed is None for c in checks)  # keep 0.9 was not measured
    table = bench.format_table(results)
    assert "| spa-image |" in table and "training, batch 2" in table


def test_cli_json(tmp_path, capsys) -> None:
    path = tmp_path / "bench.json"
    argv = [
        "--batch",
        "2",
        "--keep",
        "0.3",
        "--mode",
        "inference",
        "--repeats",
        "1",
        "--warmup",
        "0",
        "--container-len",
        "49",
        "--threads",
        "1",
        "--quiet-budget",
        "0",
        "--no-progress",
        "--json",
        str(path),
        "--backbones",
    ]
    threads = torch.get_num_threads()
    try:
        assert bench.main(argv) == 0
    finally:
        torch.set_num_threads(threads)
    payload = json.loads(path.read_text())
    assert {r["variant"] for r in payload["results"]} == {"dense", "masked", "pad", "spa-c49", "spa-image"}
    assert payload["environment"]["torch_threads"] == 1
    assert payload["backbones"]["results"] == [], "--backbones with no names skips the whole-backbone section"
    assert "Targets" in capsys.readouterr().out


def test_cell_times_are_the_medians_of_its_alternating_runs() -> None:
    config = replace(TINY, modes=("inference",), repeats=3)
    cell = bench.run_cell(config, bench.make_block(config), "inference", 2, 0.3)
    dense = next(m for m in cell if m.variant == "dense")
    for m in cell:
        assert len(m.times_ms) == 3 and m.time_ms == pytest.approx(statistics.median(m.times_ms))
        assert m.dense_time_ms == dense.time_ms and m.disturbed_runs == 0


def test_cpu_clock_and_quiet_guard_in_a_cell() -> None:
    config = replace(TINY, modes=("training",), clock="cpu", repeats=2)
    block = bench.make_block(config)
    guard = QuietGuard(budget=0.5, per_run_wait=0.05, retries=1)
    cell = bench.run_cell(config, block, "training", 2, 0.3, guard)
    assert {m.variant for m in cell} == VARIANTS and all(m.time_ms >= 0 and len(m.times_ms) == 2 for m in cell)
    assert guard.remaining <= 0.5
    with pytest.raises(ValueError, match="unknown clock"):
        bench.run_cell(replace(config, clock="gpu"), block, "training", 2, 0.3)
