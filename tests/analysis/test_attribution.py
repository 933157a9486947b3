"""Every attribution method gives a finite token map; ablation and rollout see only what the output uses."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import spa_viz
from spa_viz.analysis.attribution import METHODS, attention_rollout, attribute
from tests.conftest import tiny_vit


def _spa_model(start_layer: int = 1, bias: float = 0.0) -> nn.Module:
    model = spa_viz.patch(tiny_vit(), start_layer, policy="container", container_len=6)
    for block in spa_viz.spa_blocks(model):
        nn.init.normal_(block.gate.proj.weight, std=1.0)
        nn.init.constant_(block.gate.proj.bias, bias)
    return model


class TopHalf(nn.Module):
    """Depends only on the top half of the image (token rows 0-1 of a 4x4 grid of 8 px patches)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x[:, :, :16] ** 2).mean((1, 2, 3))


@pytest.mark.parametrize("method", METHODS)
def test_each_method_returns_a_finite_token_map(method: str) -> None:
    model = _spa_model()
    images = torch.randn(2, 3, 32, 32)
    calls: list[float] = []
    result = attribute(
        model,
        images,
        lambda out: out[:, 0],
        method,
        n_steps=4,
        token_group=1,
        progress=lambda fraction, _message: calls.append(fraction),
    )
    assert result.maps.shape == (2, 4, 4) and result.method == method
    assert torch.isfinite(result.maps).all()
    assert result.maps.abs().sum() > 0
    assert calls and calls[-1] == pytest.approx(1.0), "progress reaches 100%"
    assert not model.training


def test_feature_ablation_of_an_unused_token_is_zero() -> None:
    images = torch.randn(1, 3, 32, 32)
    result = attribute(TopHalf(), images, lambda out: out, "feature_ablation", patch_size=(8, 8), token_group=1)
    maps = result.maps[0]
    assert torch.allclose(maps[2:], torch.zeros(2, 4), atol=1e-7), "the bottom tokens do not reach the output"
    assert (maps[:2].abs() > 1e-4).all()


def test_occlusion_of_an_unused_region_is_zero() -> None:
    images = torch.randn(1, 3, 32, 32)
    maps = attribute(TopHalf(), images, lambda out: out, "occlusion", patch_size=(8, 8), token_group=1).maps[0]
    assert torch.allclose(maps[3], torch.zeros(4), atol=1e-7), (
        "windows over the last token row never touch the top half"
    )


def test_integrated_gradients_completeness() -> None:
    """IG attributions sum to f(x) - f(baseline) (the baseline output is 0 here)."""
    images = torch.randn(1, 3, 32, 32)
    result = attribute(TopHalf(), images, lambda out: out, "integrated_gradients", patch_size=(8, 8), n_steps=32)
    assert result.maps.sum() == pytest.approx(float(TopHalf()(images)), rel=1e-3)
    assert torch.allclose(result.maps[0, 2:], torch.zeros(2, 4))


@pytest.mark.parametrize("unkept", ["copy", "refresh"])
def test_rollout_ignores_tokens_spa_dropped_everywhere(unkept: str) -> None:
    """A token no layer keeps is attended by nobody: refreshed or not, it carries no class-token mass."""
    model = _spa_model(start_layer=0, bias=-20.0)  # every gate drops everything but min_keep = 1 token
    spa_viz.configure(model, unkept=unkept)
    images = torch.randn(2, 3, 32, 32)
    _, record = spa_viz.trace(model, images)
    ever_kept = torch.stack([t.keep for t in record.layers]).any(0).reshape(2, 4, 4)
    maps = attention_rollout(model, images)
    assert maps.shape == (2, 4, 4)
    assert (maps[~ever_kept] == 0).all(), "the class token never attends to a dropped token"
    assert (maps[ever_kept] > 0).all()


def test_rollout_of_a_dense_model_spreads_over_all_tokens() -> None:
    maps = attention_rollout(tiny_vit(), torch.randn(1, 3, 32, 32))
    assert maps.shape == (1, 4, 4) and (maps > 0).all()


def test_budget_coarsens_ablation_and_integration() -> None:
    model = _spa_model()
    images = torch.randn(1, 3, 32, 32)
    slow = attribute(model, images, lambda out: out[:, 0], "feature_ablation", budget_s=4.0, forward_seconds=1.0)
    assert slow.settings["token_group"] == 2 and slow.maps.shape == (1, 4, 4)
    fast = attribute(model, images, lambda out: out[:, 0], "feature_ablation", budget_s=100.0, forward_seconds=1.0)
    assert fast.settings["token_group"] == 1
    steps = attribute(model, images, lambda out: out[:, 0], "integrated_gradients", budget_s=20.0, forward_seconds=1.0)
    assert steps.settings["n_steps"] == 10


def test_unknown_method_and_bad_size_are_rejected() -> None:
    model = _spa_model()
    with pytest.raises(ValueError, match="unknown attribution method"):
        attribute(model, torch.randn(1, 3, 32, 32), lambda out: out[:, 0], "gradcam")
    with pytest.raises(ValueError, match="multiple of the patch size"):
        attribute(model, torch.randn(1, 3, 30, 32), lambda out: out[:, 0], "occlusion")


def test_method_support_follows_the_backbone() -> None:
    from spa_viz.analysis.attribution import METHODS, method_support
    from spa_viz.models.spt import SPT

    assert method_support(_spa_model()) == dict.fromkeys(METHODS)
    spt = SPT(img_size=64, embed_dim=16, depths=(1, 1, 2, 2), num_heads=(1, 2, 2, 4), window_size=4, num_classes=3)
    support = method_support(spt)
    assert support["attention_rollout"] is not None and "plain ViT" in support["attention_rollout"]
    assert [name for name, why in support.items() if why is None] == [
        "integrated_gradients",
        "feature_ablation",
        "occlusion",
    ]
