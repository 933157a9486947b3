"""The one SPA kernel on both backbones: selectors everywhere, per-stage fusion, L_select on every
gate's own logit, soft gating that acts, the evaluation threshold, and plan reuse."""

from __future__ import annotations

import pytest
import torch

import spa_viz
from spa_viz.layers.gate import threshold_logit
from spa_viz.models.spt import SPT
from spa_viz.selection.labels import multiscale_labels
from spa_viz.selection.selectors import SELECTORS, applicable_selectors, install_selector, remove_selector
from tests.layers.small_models import random_gates as _random_gates
from tests.layers.small_models import small_spt as _spt
from tests.layers.small_models import small_vit as _vit

MODELS = {"vit": (_vit, (2, 3, 32, 32)), "spt": (_spt, (2, 3, 64, 64))}


@pytest.mark.parametrize("kind", sorted(MODELS))
@pytest.mark.parametrize("name", sorted(SELECTORS))
def test_every_applicable_selector_runs_on_every_backbone(kind: str, name: str) -> None:
    build, shape = MODELS[kind]
    model = build()
    images = torch.randn(*shape)
    if name not in applicable_selectors(model):
        with pytest.raises(ValueError, match="needs a class token.*selectors that apply"):
            install_selector(model, name)
        return
    install_selector(model, name)
    _, tr = spa_viz.trace(model, images)
    assert all(layer.selector == name and not layer.learned for layer in tr.layers)
    assert all(layer.kept_counts.min() > 0 for layer in tr.layers)
    remove_selector(model)
    _, tr = spa_viz.trace(model, images)
    assert all(layer.selector == "learned" for layer in tr.layers)


def test_spt_lists_the_selectors_that_need_no_class_token() -> None:
    assert "cls_attention" not in applicable_selectors(_spt())
    assert set(applicable_selectors(_vit())) == set(SELECTORS)


def test_fusion_mode_is_validated_with_the_allowed_values() -> None:
    with pytest.raises(ValueError, match=r"unknown fusion mode 'max'.*\('stage', 'chain', 'none'\)"):
        spa_viz.configure(_vit(), fusion="max")
    with pytest.raises(ValueError, match="unknown fusion mode"):
        _spt(fusion="sideways")


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_selection_loss_reaches_every_token_of_every_gate(kind: str) -> None:
    """L_select on each gate's own logit: every gate gets gradient on every token (the fused score of
    "chain" fusion would only pass it to the tokens where that gate won the max)."""
    build, shape = MODELS[kind]
    model = build(fusion="chain").train()
    _random_gates(model)
    images = torch.randn(*shape)
    model(images)
    gates = spa_viz.spa_context(model).gates
    targets = [{"boxes": torch.tensor([[2.0, 3.0, 20.0, 25.0]])}, {"boxes": torch.zeros(0, 4)}]
    grids = sorted({g.grid for g in gates}, reverse=True)
    labels = dict(zip(grids, multiscale_labels(targets, tuple(shape[-2:]), grids), strict=True))
    raw = [g.raw for g in gates]
    fused = [g.fused for g in gates]
    loss = spa_viz.model_selection_loss(model, labels, alpha=1.0)
    grads = torch.autograd.grad(loss, raw, retain_graph=True)
    assert all((grad != 0).all() for grad in grads), "every token of every gate gets gradient"
    # the chain-fused score of a later gate is a max: the loss on it would miss the tokens it lost
    later = [i for i in range(1, len(gates)) if gates[i].grid == gates[i - 1].grid]
    assert later
    lost = [bool((fused[i] > raw[i]).any()) for i in later]
    assert any(lost), "with random gates some later logits lose the max"


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_task_loss_alone_moves_every_gate(kind: str) -> None:
    """Soft gating scales the kept tokens' branch outputs, so a task loss with no L_select changes the
    gate weights (before v2 a scale before norm1 was normalised away)."""
    build, shape = MODELS[kind]
    model = build().train()
    _random_gates(model, std=0.3, bias=1.0)
    before = [block.gate.proj.weight.detach().clone() for block in spa_viz.spa_blocks(model)]
    optimizer = torch.optim.SGD([p for n, p in model.named_parameters() if ".gate." in n], lr=1.0)
    features = model.forward_features(torch.randn(*shape))
    features.square().mean().backward()
    optimizer.step()
    for block, old in zip(spa_viz.spa_blocks(model), before, strict=True):
        assert not torch.equal(block.gate.proj.weight, old), block.spa_layer


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_soft_gating_changes_the_output(kind: str) -> None:
    build, shape = MODELS[kind]
    model = build(threshold=0.0)  # keep everything, so only the soft gate differs
    _random_gates(model, std=0.5)
    images = torch.randn(*shape)
    with torch.no_grad():
        gated = model.forward_features(images)
        spa_viz.configure(model, soft_gating=False)
        plain = model.forward_features(images)
    assert (gated - plain).abs().max() > 1e-2


@pytest.mark.parametrize("tau", [0.5, 2.0])
def test_model_evaluation_uses_the_noise_free_training_rule(tau: float) -> None:
    model = _vit(tau=tau, threshold=0.6, min_keep=0)
    _random_gates(model, std=0.5)
    _, tr = spa_viz.trace(model, torch.randn(3, 3, 32, 32))
    for layer in tr.layers:
        assert torch.equal(layer.keep, torch.sigmoid(layer.scores / tau) > 0.6)
        assert torch.equal(layer.keep, layer.scores > threshold_logit(0.6, tau))
    assert any(not torch.equal(layer.keep, torch.sigmoid(layer.scores) > 0.6) for layer in tr.layers)


def test_a_block_that_keeps_the_same_tokens_reuses_the_plan() -> None:
    """Keep-all blocks in a row: the later ones reuse the first plan and packed rows, same output."""
    model = _vit(threshold=0.0, soft_gating=False)
    images = torch.randn(2, 3, 32, 32)
    _, tr = spa_viz.trace(model, images)
    assert [layer.reused_plan for layer in tr.layers] == [False, True, True]
    with torch.no_grad():
        spa = model.forward_features(images)
        spa_viz.configure(model, enabled=False)
        dense = model.forward_features(images)
    assert torch.allclose(spa, dense, atol=1e-5)


def test_reuse_is_refused_when_the_input_is_not_the_last_output() -> None:
    model = _vit(threshold=0.0, soft_gating=False)
    block = spa_viz.spa_blocks(model)[1]
    ctx = spa_viz.spa_context(model)
    x = torch.randn(2, 17, 32)
    with torch.no_grad():
        ctx.begin((4, 4))
        block(x)
        other = torch.randn(2, 17, 32)
        expected = block(other)
        ctx.begin((4, 4))
        block(x)
        assert torch.equal(block(other), expected), "a fresh input is packed again, not read from the last output"


def test_stage_fusion_starts_a_stage_by_its_index_not_by_a_new_grid() -> None:
    """At 16 px SPT's stages 3 and 4 share the 1x1 grid: stage 4 still fuses stage 3's score in, and the
    blocks of stage 3 fuse nothing (they are the first SPA stage)."""
    torch.manual_seed(0)
    model = SPT(img_size=16, embed_dim=16, depths=(1, 1, 2, 2), num_heads=(1, 2, 2, 4), window_size=4, num_classes=0)
    _, tr = spa_viz.trace(model.eval(), torch.randn(2, 3, 16, 16))
    assert {layer.grid for layer in tr.layers} == {(1, 1)}
    assert [layer.fused_input for layer in tr.layers] == [False, False, True, True]
