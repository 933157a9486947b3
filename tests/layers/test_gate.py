import math

import pytest
import torch

import spa_viz
from spa_viz.layers.gate import (
    TokenGate,
    detach_gate_inputs,
    fuse_scores,
    pool_scores,
    select_tokens,
    threshold_logit,
)
from tests.layers.small_models import random_gates, small_vit


def test_gate_shape_and_init_keeps_everything() -> None:
    gate = TokenGate(16, init_bias=3.0)
    scores = gate(torch.randn(2, 11, 16), num_prefix=1)
    assert scores.shape == (2, 10)
    keep, _ = select_tokens(scores, threshold=0.5)
    assert keep.all()


def test_fusion_is_elementwise_max() -> None:
    a, b = torch.randn(2, 6), torch.randn(2, 6)
    assert torch.equal(fuse_scores(a, b), torch.maximum(a, b))
    assert fuse_scores(a, None) is a


def test_pooling_is_2x2_max_when_resolution_halves() -> None:
    fine = torch.arange(16.0).reshape(1, 16)
    assert pool_scores(fine, (4, 4), (2, 2)).tolist() == [[5.0, 7.0, 13.0, 15.0]]
    assert pool_scores(fine, (4, 4), (4, 4)) is fine
    odd = torch.arange(9.0).reshape(1, 9)
    assert pool_scores(odd, (3, 3), (2, 2)).tolist() == [[4.0, 5.0, 7.0, 8.0]], "ceil mode keeps the border"


def test_pooling_rejects_unrelated_grids() -> None:
    with pytest.raises(ValueError, match="2x downsampling"):
        pool_scores(torch.zeros(1, 64), (8, 8), (2, 2))


def test_eval_selection_is_deterministic_threshold() -> None:
    scores = torch.tensor([[-2.0, -0.1, 0.1, 3.0]])
    keep, mult = select_tokens(scores, threshold=0.5, min_keep=0)
    assert keep.tolist() == [[False, False, True, True]]
    assert mult is None
    keep, _ = select_tokens(scores, threshold=torch.sigmoid(torch.tensor(2.0)).item(), min_keep=0)
    assert keep.tolist() == [[False, False, False, True]]


def test_threshold_ends_keep_all_or_nothing() -> None:
    scores = torch.tensor([[-200.0, 0.0, 200.0]])
    assert select_tokens(scores, threshold=0.0, min_keep=0)[0].all()
    assert not select_tokens(scores, threshold=1.0, min_keep=0)[0].any()
    assert threshold_logit(0.5) == 0.0
    assert threshold_logit(0.0) == -math.inf
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        threshold_logit(1.5)


def test_min_keep_keeps_top_tokens_of_an_empty_image() -> None:
    scores = torch.tensor([[-5.0, -1.0, -3.0, -2.0], [4.0, 5.0, 6.0, 7.0]])
    keep, _ = select_tokens(scores, threshold=0.5, min_keep=2)
    assert keep[0].tolist() == [False, True, False, True]
    assert keep[1].all()


def test_training_straight_through_has_value_one_and_gate_gradient() -> None:
    scores = torch.randn(4, 50, requires_grad=True)
    gen = torch.Generator().manual_seed(0)
    keep, mult = select_tokens(scores, training=True, generator=gen, min_keep=0)
    assert torch.allclose(mult[keep], torch.ones(int(keep.sum())))
    assert torch.allclose(mult[~keep], torch.zeros(int((~keep).sum())))
    (mult * torch.arange(50.0)).sum().backward()
    assert scores.grad is not None and scores.grad.abs().sum() > 0


def test_training_noise_is_seeded() -> None:
    scores = torch.zeros(2, 100)
    a = select_tokens(scores, training=True, generator=torch.Generator().manual_seed(1))[0]
    b = select_tokens(scores, training=True, generator=torch.Generator().manual_seed(1))[0]
    assert torch.equal(a, b)
    assert 20 < int(a.sum()) < 180


@pytest.mark.parametrize("kwargs", [dict(tau=0.0), dict(min_keep=-1)])
def test_bad_settings_raise(kwargs) -> None:
    with pytest.raises(ValueError):
        select_tokens(torch.zeros(1, 3), **kwargs)


def test_bad_rank_raises() -> None:
    with pytest.raises(ValueError, match=r"\(B, N\)"):
        select_tokens(torch.zeros(3))


@pytest.mark.parametrize("tau", [0.25, 0.5, 2.0, 4.0])
@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.7])
def test_eval_rule_is_the_noise_free_training_rule(tau: float, threshold: float) -> None:
    """Evaluation keeps sigmoid(s / tau) > t: the training rule with zero noise (u = 1/2), not sigmoid(s) > t."""
    scores = torch.linspace(-6, 6, 241).unsqueeze(0)
    keep, _ = select_tokens(scores, threshold=threshold, tau=tau, min_keep=0)
    assert torch.equal(keep, torch.sigmoid(scores / tau) > threshold)
    # the training path with its noise at the median (logit(u) = 0) takes the same decisions
    half = torch.Generator()
    u_half = torch.full_like(scores, 0.5)
    soft = torch.sigmoid((scores + torch.log(u_half) - torch.log1p(-u_half)) / tau)
    assert torch.equal(keep, soft > threshold)
    if threshold != 0.5:
        assert not torch.equal(keep, torch.sigmoid(scores) > threshold), "tau must matter away from t = 0.5"
    assert threshold_logit(threshold, tau) == pytest.approx(tau * math.log(threshold / (1 - threshold)))
    del half


@pytest.mark.parametrize("detach", [False, True])
def test_detached_gate_inputs_stop_l_select_at_the_gate(detach: bool) -> None:
    """The ablation switch: L_select still trains every gate, but reaches the backbone only when the
    gates read the live block input."""
    model = small_vit().train()
    random_gates(model)
    assert detach_gate_inputs(model, detach) == len(spa_viz.spa_blocks(model))
    images = torch.randn(2, 3, model.patch_embed.img_size[0], model.patch_embed.img_size[1])
    model.forward_features(images)
    grid = tuple(model.patch_embed.grid_size)
    labels = (torch.rand(2, grid[0] * grid[1], generator=torch.Generator().manual_seed(1)) > 0.5).float()
    spa_viz.model_selection_loss(model, labels, alpha=1.0).backward()
    assert all(block.gate.proj.weight.grad.abs().sum() > 0 for block in spa_viz.spa_blocks(model))
    stem = model.patch_embed.proj.weight.grad
    if detach:
        assert stem is None or not stem.any()
    else:
        assert stem is not None and stem.abs().sum() > 0
