"""Side-by-side runs: settings applied and restored, equal compute reached, ToMe columns, trade-off sweeps."""

from __future__ import annotations

import pytest
import torch

import spa_viz
from spa_viz.analysis.compare import (
    LEARNED_GATE,
    TOKEN_MERGING,
    Setting,
    available_methods,
    match_compute,
    run_setting,
    tradeoff,
)
from spa_viz.selection.selectors import install_selector, installed_selector, remove_selector
from tests.conftest import tiny_vit
from tests.layers.small_models import random_gates, small_spt


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    """A ViT with 256 patch tokens (fine enough MAC steps for a 2% match) and SPA in blocks 1-3."""
    torch.manual_seed(0)
    vit = spa_viz.patch(tiny_vit(img_size=64, patch_size=4), 1)
    random_gates(vit, seed=4)
    return vit


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def test_a_run_restores_the_models_own_settings(model, images) -> None:
    install_selector(model, "feature_norm", ratio=0.3)
    spa_viz.configure(model, threshold=0.4, unkept="copy")
    before = spa_viz.spa_context(model).config.to_dict()
    run = run_setting(model, images, Setting(LEARNED_GATE, 0.7, policy="container", container_len=20, unkept="refresh"))
    assert run.trace.layers[0].threshold == 0.7 and run.trace.layers[0].unkept == "refresh"
    assert spa_viz.spa_context(model).config.to_dict() == before
    assert installed_selector(model) == "feature_norm" and spa_viz.spa_blocks(model)[0].gate.ratio == 0.3
    remove_selector(model)


@pytest.mark.parametrize("method", ["feature_norm", "cls_attention", TOKEN_MERGING])
def test_equal_compute_matches_the_first_columns_macs_within_2_percent(model, images, method) -> None:
    # ToMe merges after attention, so it cannot go as low as the gate at 0.5: compare it at a milder gate
    first = run_setting(model, images, Setting(LEARNED_GATE, 0.5 if method != TOKEN_MERGING else 0.1))
    assert 0.05 < first.saving < 0.95
    start = Setting(method, 0.9 if method != TOKEN_MERGING else 0)
    matched = match_compute(model, images, start, first.macs, tolerance=0.02)
    assert abs(matched.macs / first.macs - 1) <= 0.02, (matched.setting, matched.macs, first.macs)


def test_an_unreachable_target_gives_the_closest_end(model, images) -> None:
    cheapest = run_setting(model, images, Setting(TOKEN_MERGING, 84))
    matched = match_compute(model, images, Setting(TOKEN_MERGING, 0), cheapest.macs * 0.5)
    assert matched.macs == cheapest.macs


def test_token_merging_without_merges_is_the_dense_twin_and_reports_its_groups(model, images) -> None:
    assert TOKEN_MERGING in available_methods(model)
    plain = run_setting(model, images, Setting(TOKEN_MERGING, 0))
    with spa_viz.dense_twin(model), torch.no_grad():
        dense = model(images)
    assert torch.allclose(plain.output, dense, atol=1e-5) and plain.macs == plain.dense_macs
    merged = run_setting(model, images, Setting(TOKEN_MERGING, 20))
    assert merged.macs < plain.macs and merged.kept < 1.0
    groups = merged.groups
    assert groups.shape == (2, 257) and groups.unique().numel() < 257


def test_spt_offers_no_token_merging() -> None:
    assert TOKEN_MERGING not in available_methods(small_spt())


def test_tradeoff_sweeps_every_method_and_compute_follows_the_amount(model, images) -> None:
    with spa_viz.dense_twin(model), torch.no_grad():
        dense = model(images)
    seen = []
    curve = tradeoff(
        model,
        images,
        [LEARNED_GATE, "feature_norm", TOKEN_MERGING],
        error=lambda out: float((out - dense).abs().mean()),
        points=3,
        progress=lambda fraction, text: seen.append(fraction),
    )
    assert len(curve) == 9 and seen[-1] == 1.0
    for method in (LEARNED_GATE, "feature_norm", TOKEN_MERGING):
        macs = [p.macs for p in curve if p.setting.method == method]
        assert macs == sorted(macs) and macs[0] < macs[-1]  # cheap end first
        assert all(p.macs < p.dense_macs for p in curve if p.setting.method == method)
