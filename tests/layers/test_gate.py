import math

import pytest
import torch

from spa_viz.layers.gate import TokenGate, fuse_scores, select_tokens, threshold_logit


def test_gate_shape_and_init_keeps_everything() -> None:
    gate = TokenGate(16, init_bias=3.0)
    scores = gate(torch.randn(2, 10, 16))
    assert scores.shape == (2, 10)
    keep, _ = select_tokens(scores, threshold=0.5)
    assert keep.all()


def test_fusion_is_elementwise_max() -> None:
    a, b = torch.randn(2, 6), torch.randn(2, 6)
    fused = fuse_scores(a, b, (2, 3), (2, 3))
    assert torch.equal(fused, torch.maximum(a, b))
    assert fuse_scores(a, None, (2, 3)) is a


def test_fusion_pools_2x2_when_resolution_halves() -> None:
    fine = torch.arange(16.0).reshape(1, 16)
    coarse = torch.full((1, 4), -100.0)
    fused = fuse_scores(coarse, fine, (2, 2), (4, 4))
    assert fused.tolist() == [[5.0, 7.0, 13.0, 15.0]]


def test_fusion_rejects_unrelated_grids() -> None:
    with pytest.raises(ValueError, match="2x downsampling"):
        fuse_scores(torch.zeros(1, 4), torch.zeros(1, 64), (2, 2), (8, 8))


def test_eval_selection_is_deterministic_threshold() -> None:
    scores = torch.tensor([[-2.0, -0.1, 0.1, 3.0]])
    keep, mult = select_tokens(scores, threshold=0.5, min_keep=0)
    assert keep.tolist() == [[False, False, True, True]]
    assert torch.equal(mult, torch.ones_like(scores))
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
