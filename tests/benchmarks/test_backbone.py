"""The whole-backbone benchmark: SPA and its dense twin on the same images, MACs from a trace, ratios."""

from __future__ import annotations

import pytest
import torch

import spa_viz
from spa_viz.benchmarks.backbone import BackboneResult, bench_backbone, format_backbone_table
from tests.conftest import tiny_vit


def _model() -> torch.nn.Module:
    model = spa_viz.patch(tiny_vit(depth=3, global_pool="avg"), 1).eval()
    for block in spa_viz.spa_blocks(model):
        torch.nn.init.normal_(block.gate.proj.weight, std=1.0)
        torch.nn.init.constant_(block.gate.proj.bias, -0.5)
    return model


def test_backbone_bench_reports_consistent_ratios() -> None:
    model = _model()
    images = torch.randn(4, 3, 32, 32)
    results = bench_backbone("tiny", model, images, batches=(1, 4), repeats=2, paths=("copy", "refresh"))
    assert [(r.batch, r.unkept) for r in results] == [(1, "copy"), (1, "refresh"), (4, "copy"), (4, "refresh")]
    for r in results:
        assert r.macs_dense > r.macs_run > 0
        assert r.mac_ratio == pytest.approx(r.macs_dense / r.macs_run)
        assert r.realized == pytest.approx(r.dense_ms / r.spa_ms / r.mac_ratio)
        assert 0 < r.keep_ratio < 1
        assert r.ideal_spa_ms is not None and r.over_ideal == pytest.approx(r.spa_ms / r.ideal_spa_ms)
        assert r.dense_block_ms is not None and r.dense_block_ms > 0
    by_path = {(r.batch, r.unkept): r for r in results}
    assert by_path[(4, "copy")].dense_ms == by_path[(4, "refresh")].dense_ms, "one dense twin per loop"
    assert by_path[(4, "refresh")].macs_run > by_path[(4, "copy")].macs_run - 10**6
    config = spa_viz.spa_context(model).config
    assert config.enabled and config.unkept == "copy", "the dense twin is switched back off, the path restored"
    table = format_backbone_table(results)
    assert "| tiny | copy | 1 |" in table and "| tiny | refresh | 4 |" in table


def test_backbone_bench_checks_its_inputs() -> None:
    model = _model()
    with pytest.raises(ValueError, match="need 4 images"):
        bench_backbone("tiny", model, torch.randn(2, 3, 32, 32), batches=(1, 4), repeats=1)
    spa_viz.configure(model, enabled=False)
    with pytest.raises(ValueError, match="SPA is disabled"):
        bench_backbone("tiny", model, torch.randn(4, 3, 32, 32), batches=(1,), repeats=1)


def test_result_targets_in_the_table() -> None:
    row = BackboneResult(
        "spa-vit-digits", 1, dense_ms=10.0, spa_ms=5.0, macs_dense=200, macs_run=100, keep_ratio=0.2, repeats=3
    )
    assert row.realized == pytest.approx(1.0)
    assert ">= 0.8: met" in format_backbone_table([row])
    bounded = BackboneResult(
        "spa-vit-digits", 4, 10.0, 6.0, 200, 100, 0.2, 3, ideal_spa_ms=5.0, unkept="copy", dense_block_ms=1.0
    )
    refresh = BackboneResult(
        "spa-vit-digits",
        4,
        10.0,
        6.36,
        200,
        99,
        0.2,
        3,
        ideal_spa_ms=5.0,
        unkept="refresh",
        dense_block_ms=1.0,
        spa_blocks=4,
    )
    table = format_backbone_table([bounded, refresh])
    assert "<= 1.1x zero-overhead: MISSED" in table and "1.20x" in table
    assert "+0.36 (+0.090)" in table and "refresh <= 0.10 dense block per SPA block over copy: met" in table
    slow = BackboneResult(
        "spt-digits", 1, dense_ms=10.0, spa_ms=11.0, macs_dense=200, macs_run=150, keep_ratio=0.3, repeats=3
    )
    assert "faster than dense: MISSED" in format_backbone_table([slow])
