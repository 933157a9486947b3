"""The stale-token refresher ([ours]): identity at init, touches only skipped tokens, counted in FLOPs."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import spa_viz
from spa_viz.layers.refresh import StaleTokenRefresh
from spa_viz.models.spa_vit import attach_refresh
from tests.conftest import tiny_vit


@contextmanager
def without_refresh(model):
    """The model without its refresher inside the block (the scripts that offered this are gone)."""
    ctx = spa_viz.spa_context(model)
    saved, ctx.refresh = ctx.refresh, None
    try:
        yield model
    finally:
        ctx.refresh = saved


def _randomize(refresh: StaleTokenRefresh) -> StaleTokenRefresh:
    torch.nn.init.normal_(refresh.up.weight, std=0.5)
    torch.nn.init.normal_(refresh.up.bias, std=0.5)
    return refresh


def _spa_model(refresh: StaleTokenRefresh | None = None, **overrides):
    """A tiny SPA-ViT (blocks 1-3 SPA) with random gates, so some tokens are skipped."""
    model = spa_viz.patch(tiny_vit(**overrides), 1, soft_gating=False)
    for block in spa_viz.spa_blocks(model):
        torch.nn.init.normal_(block.gate.proj.weight, std=1.0)
        torch.nn.init.zeros_(block.gate.proj.bias)
    if refresh is not None:
        attach_refresh(model, refresh)
    return model


def test_fresh_refresher_is_the_identity() -> None:
    refresh = StaleTokenRefresh(32, rank=8, max_skipped=3)
    x = torch.randn(2, 17, 32)
    skipped = torch.randint(0, 4, (2, 16))
    assert torch.equal(refresh(x, skipped, num_prefix=1), x)


def test_only_skipped_patch_tokens_change_and_only_they_are_computed() -> None:
    refresh = _randomize(StaleTokenRefresh(32, rank=8, max_skipped=3, context=True))
    x = torch.randn(2, 18, 32)
    skipped = torch.randint(0, 5, (2, 16))  # counts above max_skipped share the last embedding
    skipped[0, 0], skipped[1, 5] = 0, 2
    rows: list[int] = []
    hook = refresh.down.register_forward_hook(lambda module, args, out: rows.append(args[0].shape[0]))
    out = refresh(x, skipped, num_prefix=2)
    hook.remove()
    assert rows == [int((skipped > 0).sum())]
    assert torch.equal(out[:, :2], x[:, :2])
    patches_in, patches_out = x[:, 2:], out[:, 2:]
    assert torch.equal(patches_out[skipped == 0], patches_in[skipped == 0])
    assert torch.all((patches_out[skipped > 0] - patches_in[skipped > 0]).abs().sum(-1) > 0)
    context = refresh.context(refresh.context_norm(x[1, 0]))
    expected = x[1, 7] + refresh.up(torch.nn.functional.gelu(refresh.down(refresh.norm(x[1, 7])) + refresh.embed.weight[1] + context))
    assert torch.allclose(out[1, 7], expected, atol=1e-6)
    plain = _randomize(StaleTokenRefresh(32, rank=8, max_skipped=3))
    expected = x[1, 7] + plain.up(torch.nn.functional.gelu(plain.down(plain.norm(x[1, 7])) + plain.embed.weight[1]))
    assert torch.allclose(plain(x, skipped, num_prefix=2)[1, 7], expected, atol=1e-6)


def test_no_skipped_token_returns_the_input() -> None:
    refresh = _randomize(StaleTokenRefresh(32, rank=8))
    x = torch.randn(2, 17, 32)
    assert refresh(x, torch.zeros(2, 16, dtype=torch.int32), num_prefix=1) is x


def test_patched_model_counts_skips_and_refreshes_before_the_final_norm(images) -> None:
    refresh = _randomize(StaleTokenRefresh(32, rank=8, max_skipped=3))
    model = _spa_model(refresh)
    _, tr = spa_viz.trace(model, images)
    with torch.no_grad(), without_refresh(model):
        plain = model.forward_features(images)
    skipped = sum((~layer.keep).int() for layer in tr.layers)
    assert torch.equal(tr.refresh.skipped, skipped)
    assert 0 < int((skipped > 0).sum()) < skipped.numel()
    # the refresher runs on the last block's output, before the final norm
    with torch.no_grad():
        spa_viz.spa_context(model).begin((4, 4))
        tokens = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))
        for block in model.blocks[:-1]:
            tokens = block(tokens)
        with without_refresh(model):
            last = model.blocks[-1](tokens)
        expected = model.norm(refresh(last, skipped, num_prefix=1))
    assert torch.allclose(model.forward_features(images).detach(), expected, atol=1e-5)
    assert not torch.allclose(model.forward_features(images).detach(), plain, atol=1e-3)


def test_disabled_spa_with_a_refresher_is_exactly_the_dense_model(images) -> None:
    model = tiny_vit()
    with torch.no_grad():
        expected = model(images)
    spa_viz.patch(model, 1)
    attach_refresh(model, _randomize(StaleTokenRefresh(32, rank=8, max_skipped=3)))
    spa_viz.configure(model, enabled=False)
    with torch.no_grad():
        assert torch.equal(model(images), expected)
    _, tr = spa_viz.trace(model, images)
    assert tr.refresh is None and tr.refresh_flops == 0


def test_refresher_needs_the_last_block_to_be_an_spa_block() -> None:
    model = spa_viz.patch(tiny_vit(), 1)
    with pytest.raises(ValueError, match="patched backbone"):
        attach_refresh(torch.nn.Sequential(model), StaleTokenRefresh(32))
    attach_refresh(model, StaleTokenRefresh(32))
    assert "spa_refresh.up.weight" in model.state_dict()
    assert model.spa_refresh.settings() == {"rank": 64, "max_skipped": 8, "context": False}
    attach_refresh(model, None)
    assert spa_viz.spa_context(model).refresh is None
    assert not any(k.startswith("spa_refresh.") for k in model.state_dict())


def test_refresher_flops_are_counted_and_match_torch_flop_counter(images) -> None:
    refresh = _randomize(StaleTokenRefresh(64, rank=16, max_skipped=3, context=True))
    model = _spa_model(refresh, embed_dim=64, num_heads=4)
    _, tr = spa_viz.trace(model, images)
    refreshed = int(tr.refresh.refreshed_counts.sum())
    assert refreshed > 0
    assert tr.refresh_flops == 2 * refreshed * 2 * 64 * 16 + 2 * len(images) * 64 * 16  # tokens + class-token context
    with without_refresh(model):
        _, plain = spa_viz.trace(model, images)
    assert tr.backbone_flops_run == plain.backbone_flops_run + tr.refresh_flops
    assert tr.backbone_flops_dense == plain.backbone_flops_dense
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.no_grad():
        model.forward_features(images)
    assert tr.backbone_flops_run == pytest.approx(counter.get_total_flops(), rel=0.02)
    assert tr.summary()["refresh"]["flops"] == tr.refresh_flops
