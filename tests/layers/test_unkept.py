"""What an unkept token becomes (``SPAConfig.unkept``): copy, the paper's output projection, or the
refresh from its most similar kept token; the invariant, the gradient each path claims, its MACs,
soft gating per mode, and token ages."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import spa_viz
from spa_viz.layers.block import nearest_kept
from spa_viz.layers.config import UNKEPT_MODES, SPAConfig
from tests.conftest import tiny_vit
from tests.layers.small_models import random_gates
from tests.layers.small_models import small_spt as _spt
from tests.layers.small_models import small_vit as _vit

# float32 on the CPU: a block computed twice with the same weights agrees to ~1e-6; 1e-5 leaves
# headroom for the different op order of packed and dense execution (the suite's twin tolerance)
TWIN_ATOL = 1e-5


def _random_gates(model: torch.nn.Module) -> None:
    random_gates(model, seed=1)


MODELS = {"vit": (_vit, (3, 3, 32, 32)), "spt": (_spt, (2, 3, 64, 64))}


def test_unkept_mode_is_validated_and_saved_with_the_config() -> None:
    with pytest.raises(ValueError, match=r"unknown unkept mode 'drop'.*\('copy', 'paper', 'refresh'\)"):
        SPAConfig(unkept="drop")
    config = SPAConfig(unkept="refresh", soft_gating="train")
    assert SPAConfig.from_dict(config.to_dict()) == config
    assert SPAConfig(soft_gating=True).soft_gating == "always" and SPAConfig(soft_gating=False).soft_gating == "off"
    assert SPAConfig(soft_gating="gradient").soft_gating_active(True)
    assert not SPAConfig(soft_gating="gradient").soft_gating_active(False)
    with pytest.raises(ValueError, match="unknown soft gating mode"):
        SPAConfig(soft_gating="sometimes")


@pytest.mark.parametrize("kind", sorted(MODELS))
@pytest.mark.parametrize("unkept", UNKEPT_MODES)
def test_keep_all_without_soft_gating_equals_the_dense_twin(kind: str, unkept: str) -> None:
    build, shape = MODELS[kind]
    model = build(threshold=0.0, soft_gating=False, unkept=unkept)
    _random_gates(model)
    images = torch.randn(*shape)
    with torch.no_grad():
        spa = model.forward_features(images)
        spa_viz.configure(model, enabled=False)
        dense = model.forward_features(images)
    assert torch.allclose(spa, dense, atol=TWIN_ATOL)


def _block_io(unkept: str, soft_gating: str = "always"):
    """One SPA block of a tiny ViT on real tokens: (block, input, output, patch keep mask, gate logits)."""
    torch.manual_seed(0)
    model = spa_viz.patch(tiny_vit(depth=1), 0, unkept=unkept, soft_gating=soft_gating)
    _random_gates(model)
    block = model.blocks[0]
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    tokens = model._pos_embed(model.patch_embed(images))
    ctx = spa_viz.spa_context(model)
    ctx.begin((4, 4))
    with torch.no_grad():
        out = block(tokens)
    gate = ctx.gates[0]
    assert 0 < int(gate.keep.sum()) < gate.keep.numel()
    return block, tokens, out, gate.keep, gate.fused


def test_copy_passes_unkept_tokens_unchanged() -> None:
    _, tokens, out, keep, _ = _block_io("copy")
    assert torch.equal(out[:, 1:][~keep], tokens[:, 1:][~keep])


def test_paper_adds_the_soft_gated_output_projection_of_the_token() -> None:
    block, tokens, out, keep, scores = _block_io("paper")
    with torch.no_grad():
        projected = block.ls1(block.attn.proj(block.norm1(tokens[:, 1:])))
        expected = tokens[:, 1:] + torch.sigmoid(scores).unsqueeze(-1) * projected
    assert torch.allclose(out[:, 1:][~keep], expected[~keep], atol=1e-6)
    _, _, copied, _, _ = _block_io("copy")
    assert torch.allclose(out[:, 1:][keep], copied[:, 1:][keep], atol=1e-6), "kept tokens do not change"


def test_refresh_adds_the_update_of_the_most_similar_kept_token() -> None:
    """Brute force: for every unkept token, the kept token of its image with the highest cosine
    similarity of block inputs, and that token's update scaled by the unkept token's sigmoid(s)."""
    _, tokens, out, keep, scores = _block_io("refresh")
    patches_in, patches_out = tokens[:, 1:], out[:, 1:]
    unit = F.normalize(patches_in, dim=-1)
    for image in range(keep.shape[0]):
        kept = keep[image].nonzero().squeeze(1)
        for token in (~keep[image]).nonzero().squeeze(1).tolist():
            nearest = kept[(unit[image, kept] @ unit[image, token]).argmax()]
            update = patches_out[image, nearest] - patches_in[image, nearest]
            expected = patches_in[image, token] + torch.sigmoid(scores[image, token]) * update
            assert torch.allclose(patches_out[image, token], expected, atol=1e-5)


def test_nearest_kept_stays_in_the_image_and_handles_an_image_that_keeps_nothing() -> None:
    features = torch.randn(2, 6, 4)
    keep = torch.tensor([[True, False, False, True, False, False], [False] * 6])
    nearest = nearest_kept(features, keep, [2, 0])
    assert set(nearest[0].tolist()) <= {0, 3} and nearest[0, 0] == 0 and nearest[0, 3] == 3
    assert not keep[1, nearest[1]].any(), "an image without kept tokens points at its own tokens (zero update)"


@pytest.mark.parametrize("kind", sorted(MODELS))
@pytest.mark.parametrize("unkept", UNKEPT_MODES)
def test_task_loss_reaches_every_gate_logit_where_the_path_claims_it(kind: str, unkept: str) -> None:
    """``paper`` and ``refresh`` scale an unkept token's update by its sigmoid(s): the task loss alone
    reaches the score of every token of every gate. ``copy`` gives an unkept token's score exactly 0
    (fusion off: with stage fusion a later stage's max could pass gradient back to an earlier score)."""
    build, shape = MODELS[kind]
    model = build(unkept=unkept, fusion="none").train()
    for module in model.modules():  # stochastic depth would drop whole images' branches (zero gradient)
        if hasattr(module, "drop_prob"):
            module.drop_prob = 0.0
    _random_gates(model)
    features = model.forward_features(torch.randn(*shape))
    gates = spa_viz.spa_context(model).gates
    grads = torch.autograd.grad(features.square().mean(), [g.fused for g in gates])
    for gate, grad in zip(gates, grads, strict=True):
        unkept_tokens = ~gate.keep
        assert unkept_tokens.any() and gate.keep.any()
        assert (grad[gate.keep] != 0).all()
        if unkept == "copy":
            assert (grad[unkept_tokens] == 0).all()
        else:
            assert (grad[unkept_tokens] != 0).all(), (gate.layer, unkept)


@pytest.mark.parametrize("kind", sorted(MODELS))
@pytest.mark.parametrize("unkept", UNKEPT_MODES)
def test_counted_macs_match_torch_flop_counter(kind: str, unkept: str) -> None:
    build, shape = MODELS[kind]
    model = build(unkept=unkept)
    _random_gates(model)
    images = torch.randn(*shape)
    _, tr = spa_viz.trace(model, images)
    assert 0.0 < tr.mean_keep_ratio < 1.0
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model.forward_features(images)
    # exact for ViT; SPT: the count leaves out nothing the counter sees either, so equality holds too
    assert counter.get_total_flops() == tr.backbone_flops_run
    for layer in tr.layers:
        assert layer.cost.macs_run == int(layer.cost.per_image_macs_run.sum()) + layer.cost.padding_macs


def test_unkept_paths_cost_what_they_add() -> None:
    images = torch.randn(3, 3, 32, 32)
    model = _vit()
    _random_gates(model)
    runs = {}
    for unkept in UNKEPT_MODES:  # switched live on one model
        spa_viz.configure(model, unkept=unkept)
        _, runs[unkept] = spa_viz.trace(model, images)
    copy = runs["copy"]
    assert all(torch.equal(copy.layers[0].keep, runs[unkept].layers[0].keep) for unkept in UNKEPT_MODES)
    first_paper, first_copy = runs["paper"].layers[0], copy.layers[0]
    unkept_tokens = int((~first_copy.keep).sum())
    assert first_paper.cost.macs_run - first_copy.cost.macs_run == unkept_tokens * first_copy.costs.proj_macs
    first_refresh = runs["refresh"].layers[0]
    longest = int(first_copy.kept_counts.max())
    look_up = 3 * first_copy.keep.shape[1] * longest * first_copy.costs.dim
    assert first_refresh.cost.macs_run - first_copy.cost.macs_run == look_up


@pytest.mark.parametrize("unkept", ["copy", "refresh"])
def test_soft_gating_in_training_only_leaves_evaluation_ungated(unkept: str) -> None:
    images = torch.randn(2, 3, 32, 32)
    outputs = {}
    model = _vit(unkept=unkept)
    _random_gates(model)
    for mode in ("always", "train", "off"):
        spa_viz.configure(model, soft_gating=mode)
        with torch.no_grad():
            outputs[mode] = model.forward_features(images)
        _, tr = spa_viz.trace(model, images)
        assert all(layer.soft_gating == (mode == "always") for layer in tr.layers)
    assert torch.equal(outputs["train"], outputs["off"])
    assert (outputs["always"] - outputs["off"]).abs().max() > 1e-3


@pytest.mark.parametrize("unkept", ["copy", "refresh"])
def test_gradient_soft_gating_trains_the_function_it_evaluates(unkept: str) -> None:
    """``"gradient"``: in training the same forward values as soft gating off (same Gumbel draw), the
    gate logits get the gradient soft gating gives them; in evaluation it is soft gating off."""
    images = torch.randn(2, 3, 32, 32)
    model = _vit(unkept=unkept, fusion="none").train()
    for module in model.modules():
        if hasattr(module, "drop_prob"):
            module.drop_prob = 0.0
    _random_gates(model)
    outputs, grads = {}, {}
    for mode in ("gradient", "off"):
        spa_viz.configure(model, soft_gating=mode)
        torch.manual_seed(3)
        outputs[mode] = model.forward_features(images)
        gates = spa_viz.spa_context(model).gates
        grads[mode] = torch.autograd.grad(outputs[mode].square().mean(), [g.fused for g in gates])
        model.eval()
        with torch.no_grad():
            outputs[mode + " eval"] = model.forward_features(images)
        model.train()
    assert torch.allclose(outputs["gradient"], outputs["off"], atol=TWIN_ATOL)
    assert torch.equal(outputs["gradient eval"], outputs["off eval"])
    for with_factor, without, gate in zip(grads["gradient"], grads["off"], gates, strict=True):
        kept_extra = (with_factor - without)[gate.keep]
        assert (kept_extra != 0).all()  # sigmoid(s)'s gradient on top of the Gumbel straight-through one
        if unkept == "refresh":
            assert (with_factor[~gate.keep] != 0).all()


def test_token_age_counts_layers_since_the_last_update() -> None:
    images = torch.randn(2, 3, 32, 32)
    model = _vit(unkept="copy")
    _random_gates(model)
    _, tr = spa_viz.trace(model, images)
    ages = tr.token_ages()
    assert len(ages) == 3
    previous = torch.zeros_like(ages[0])
    for layer, age in zip(tr.layers, ages, strict=True):
        assert torch.equal(age[layer.keep], torch.zeros_like(age[layer.keep]))
        assert torch.equal(age[~layer.keep], previous[~layer.keep] + 1)
        previous = age
    assert torch.equal(tr.output_age(), ages[-1]) and int(ages[-1].max()) >= 2
    summary = tr.summary()
    assert summary["layers"][0]["share_stale"] == pytest.approx(float((~tr.layers[0].keep).float().mean()), abs=1e-4)
    assert summary["output_mean_age"] > 0

    spa_viz.configure(model, unkept="refresh")
    _, refreshed = spa_viz.trace(model, images)
    assert all(int(age.max()) == 0 for age in refreshed.token_ages())
    assert refreshed.summary()["layers"][0]["share_refreshed"] > 0


def test_a_dense_tail_makes_every_output_token_current() -> None:
    from spa_viz.models.saliency.spa import _patch_with_dense_tail

    model = tiny_vit(depth=4)
    _patch_with_dense_tail(model, {"start_layer": 1}, dense_tail=1)
    _random_gates(model)
    _, tr = spa_viz.trace(model, torch.randn(2, 3, 32, 32))
    assert tr.dense_after and int(tr.output_age().max()) == 0 and int(tr.token_ages()[-1].max()) > 0


def test_spt_ages_cross_patch_merging_by_the_oldest_token() -> None:
    model = _spt(unkept="copy")
    _random_gates(model)
    _, tr = spa_viz.trace(model, torch.randn(2, 3, 64, 64))
    ages = tr.token_ages()
    grids = [layer.grid for layer in tr.layers]
    change = next(i for i in range(1, len(grids)) if grids[i] != grids[i - 1])
    before = ages[change - 1].reshape(2, 1, *grids[change - 1]).float()
    pooled = F.max_pool2d(before, 2, 2, ceil_mode=True).reshape(2, -1).long()
    stale = tr.layers[change].stale
    assert torch.equal(ages[change][stale], pooled[stale] + 1)


def test_paper_drops_an_images_attention_branch_for_kept_and_unkept_tokens_together() -> None:
    """Stochastic depth is per image: the draw that drops an image's attention branch for its kept tokens
    drops the unkept tokens' output projection too (one draw per block, not one per token group)."""
    torch.manual_seed(0)
    model = spa_viz.patch(tiny_vit(depth=1), 0, unkept="paper", soft_gating="off").train()
    random_gates(model, seed=1)
    block = model.blocks[0]
    block.drop_path1 = timm.layers.DropPath(0.5, scale_by_keep=False)
    with torch.no_grad():  # no MLP update: a kept token changes only through its attention branch
        block.mlp.fc2.weight.zero_()
        block.mlp.fc2.bias.zero_()
    tokens = model._pos_embed(model.patch_embed(torch.randn(8, 3, 32, 32)))
    ctx = spa_viz.spa_context(model)
    ctx.begin((4, 4))
    with torch.no_grad():
        out = block(tokens)
    keep = ctx.gates[0].keep
    changed = (out[:, 1:] - tokens[:, 1:]).abs().amax(-1) > 0
    kept_changed = torch.stack([changed[i][keep[i]].any() for i in range(8)])
    unkept_changed = torch.stack([changed[i][~keep[i]].any() for i in range(8)])
    assert keep.any(1).all() and (~keep).any(1).all()
    assert kept_changed.any() and not kept_changed.all(), "the seed drops some images and keeps others"
    assert torch.equal(kept_changed, unkept_changed)
