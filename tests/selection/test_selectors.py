"""Training-free selectors: masks, min_keep, determinism, tracing, and learned gates kept bit-exact."""

from __future__ import annotations

import math

import pytest
import torch

import spa_viz
from spa_viz.selection.selectors import (
    SELECTORS,
    TokenSelector,
    cls_attention_scores,
    install_selector,
    installed_selector,
    keep_counts,
    remove_selector,
)
from tests.conftest import tiny_vit

N = 16  # patch tokens of the tiny ViT (32 px, patch 8)


@pytest.fixture
def model() -> torch.nn.Module:
    return spa_viz.patch(tiny_vit(depth=4), 1)


def _keeps(model: torch.nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    _, tr = spa_viz.trace(model, images)
    return [layer.keep for layer in tr.layers]


@pytest.mark.parametrize("name", sorted(SELECTORS))
def test_masks_have_the_right_shape_and_count(model, images, name) -> None:
    install_selector(model, name)
    keeps = _keeps(model, images)
    assert len(keeps) == 3
    for keep in keeps:
        assert keep.dtype == torch.bool and keep.shape == (3, N)
        counts = keep.sum(1)
        if SELECTORS[name].default_params.get("ratio") is not None:
            assert counts.tolist() == [math.ceil(0.5 * N)] * 3
        else:
            assert ((counts >= 1) & (counts <= N)).all()


@pytest.mark.parametrize("name", sorted(SELECTORS))
@pytest.mark.parametrize("setting", [{"ratio": 0.0}, {"p": 0.0}])
def test_min_keep_is_honoured(model, images, name, setting) -> None:
    if name == "uniform_topk" and "p" in setting:
        pytest.skip("uniform_topk keeps a fixed ratio")
    spa_viz.configure(model, min_keep=5)
    install_selector(model, name, **setting)
    assert all(keep.sum(1).tolist() == [5, 5, 5] for keep in _keeps(model, images))


def test_ratio_matching_a_count_keeps_exactly_that_count(model, images) -> None:
    for k in (0, 1, 5, 11, N):
        install_selector(model, "feature_norm", ratio=k / N)
        spa_viz.configure(model, min_keep=0)
        assert _keeps(model, images)[0].sum(1).tolist() == [k] * 3


def test_top_p_keeps_the_smallest_set_reaching_the_mass() -> None:
    scores = torch.tensor([[0.1, 0.5, 0.1, 0.3], [0.0, 0.0, 0.0, 0.0]])
    assert keep_counts(scores, None, 0.75, 1).tolist() == [2, 4]  # no mass at all: keep everything
    assert keep_counts(scores, None, 0.85, 1).tolist() == [3, 4]
    assert keep_counts(scores, None, 1.0, 1).tolist() == [4, 4]
    assert keep_counts(scores, 0.3, None, 1).tolist() == [2, 2]


def test_random_is_deterministic_per_seed_and_differs_by_layer(model, images) -> None:
    install_selector(model, "random", seed=3)
    first, again = _keeps(model, images), _keeps(model, images)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], first[1])
    install_selector(model, "random", seed=4)
    assert not torch.equal(_keeps(model, images)[0], first[0])


@pytest.mark.parametrize("qk_norm", [False, True])
def test_cls_attention_equals_timm_attention(qk_norm) -> None:
    model = spa_viz.patch(tiny_vit(depth=2, qk_norm=qk_norm), 1)
    block = model.blocks[1]
    x = torch.randn(2, 1 + N, 32)
    captured = []
    block.attn.fused_attn = False  # timm's fused path skips attn_drop, where the probabilities are seen
    hook = block.attn.attn_drop.register_forward_hook(lambda module, args, out: captured.append(args[0]))
    with torch.no_grad():
        block.attn(block.norm1(x))
        ours = cls_attention_scores(block, x[:, 1:], x[:, :1])
    hook.remove()
    expected = captured[0][:, :, 0, 1:].mean(1)
    torch.testing.assert_close(ours, expected, atol=1e-6, rtol=1e-5)


def test_trace_works_with_a_selector(model, images) -> None:
    install_selector(model, "uniform_topk", ratio=0.25)
    out, tr = spa_viz.trace(model, images)
    assert out.shape == (3, 5)
    assert [layer.layer for layer in tr.layers] == [1, 2, 3]
    assert tr.mean_keep_ratio == pytest.approx(0.25)
    assert all(layer.plan.kept_counts.tolist() == [1 + 4] * 3 for layer in tr.layers)  # + class token
    assert 0 < tr.backbone_saving < 1


def test_keep_all_selector_reproduces_the_dense_model(model, images) -> None:
    with torch.no_grad():
        spa_viz.configure(model, enabled=False)
        expected = model(images)
        spa_viz.configure(model, enabled=True)
        install_selector(model, "random", ratio=1.0)
        torch.testing.assert_close(model(images), expected, atol=1e-5, rtol=1e-5)


def test_install_and_remove_keep_learned_gates_bit_exact(model, images) -> None:
    for param in model.parameters():
        torch.nn.init.normal_(param)  # make the gates distinctive
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gates = [block.gate for block in spa_viz.spa_blocks(model)]
    gate_keys = {k for k in before if ".gate." in k}
    selectors = install_selector(model, "cls_attention")
    assert installed_selector(model) == "cls_attention"
    during = model.state_dict()
    assert set(during) == set(before) - gate_keys  # nothing duplicated, nothing added
    assert all(list(s.parameters()) == [] and s.state_dict() == {} for s in selectors)
    assert all(isinstance(s, TokenSelector) for s in selectors)
    spa_viz.trace(model, images)
    install_selector(model, "random")  # replacing a selector keeps the learned gates aside
    remove_selector(model)
    assert installed_selector(model) is None
    assert [block.gate for block in spa_viz.spa_blocks(model)] == gates
    after = model.state_dict()
    assert set(after) == set(before)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_bad_names_and_parameters_raise(model) -> None:
    with pytest.raises(ValueError, match="unknown selector"):
        install_selector(model, "nope")
    with pytest.raises(ValueError, match="exactly one of"):
        install_selector(model, "feature_norm", ratio=0.5, p=0.5)
    with pytest.raises(ValueError, match="bad parameters"):
        install_selector(model, "feature_norm", seed=1)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        install_selector(model, "random", ratio=1.5)
    with pytest.raises(ValueError, match="ranks by"):
        install_selector(model, "uniform_topk", score="magic")
    assert installed_selector(model) is None  # a failed install changes nothing


def test_cls_attention_needs_a_class_token() -> None:
    model = spa_viz.patch(tiny_vit(class_token=False, global_pool="avg"), 1)
    with pytest.raises(ValueError, match="class token"):
        install_selector(model, "cls_attention")
    install_selector(model, "uniform_topk", score="feature_norm")
    assert _keeps(model, torch.randn(2, 3, 32, 32))[0].sum(1).tolist() == [8, 8]
