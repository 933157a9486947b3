"""Every spa_vit_* / spt_* preset honours timm's model contract (built through timm.create_model).

Small images keep these fast; timm's own test-suite on the presets at their real sizes runs with
``make test-timm`` (tests/timm_upstream.py).
"""

from __future__ import annotations

import pytest
import timm
import torch
from timm.layers import set_reentrant_ckpt
from timm.models import VisionTransformer
from timm.models._manipulate import group_parameters

import spa_viz
from spa_viz.models.spa_vit import SPAVisionTransformer
from spa_viz.models.spt import SPT

#: preset -> image side used here (a multiple of the patch size; SPT also gets a wider second side)
SPA_VIT = {
    "spa_vit_tiny_patch16_224": 64,
    "spa_vit_small_patch16_224": 64,
    "spa_vit_base_patch16_224": 64,
    "spa_vit_small_patch14_dinov2": 56,
    "spa_vit_digits": 64,
}
SPT_PRESETS = ["spt_tiny", "spt_small", "spt_base", "spt_tiny_plus4", "spt_small_plus4", "spt_base_plus4", "spt_digits"]
PRESETS = [*SPA_VIT, *SPT_PRESETS]
HUB_WEIGHTS = {
    "spa_vit_tiny_patch16_224": "timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k",
    "spa_vit_small_patch16_224": "timm/vit_small_patch16_224.augreg_in21k_ft_in1k",
    "spa_vit_base_patch16_224": "timm/vit_base_patch16_224.augreg2_in21k_ft_in1k",
    "spa_vit_small_patch14_dinov2": "timm/vit_small_patch14_dinov2.lvd142m",
}


def _create(name: str, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, img_size=SPA_VIT.get(name, 64), **kwargs)


def _images(name: str, batch: int = 2) -> torch.Tensor:
    side = SPA_VIT.get(name, 64)
    return torch.randn(
        batch, 3, side, side if name in SPA_VIT else side + 32, generator=torch.Generator().manual_seed(1)
    )


def _spread_gates(model: torch.nn.Module) -> None:
    """Gates with spread-out logits, so images keep different shares of their tokens."""
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for block in spa_viz.spa_blocks(model):
            block.gate.proj.weight.copy_(torch.randn(block.gate.proj.weight.shape, generator=generator))
            block.gate.proj.bias.zero_()


@pytest.mark.parametrize("name", PRESETS)
def test_pretrained_cfg_is_complete_and_meta_forward_gives_its_shapes(name: str) -> None:
    model = timm.create_model(name, device="meta")
    cfg = model.pretrained_cfg
    assert model.default_cfg is cfg and cfg["architecture"] == name
    for key in ("input_size", "interpolation", "crop_pct", "mean", "std", "first_conv", "num_classes", "paper_ids"):
        assert cfg.get(key) is not None, key
    state = model.state_dict()
    assert cfg["input_size"][0] == model.in_chans and f"{cfg['first_conv']}.weight" in state
    assert model.num_classes == cfg["num_classes"]
    if cfg["num_classes"]:
        assert f"{cfg['classifier']}.weight" in state
    assert cfg.get("hf_hub_id") == HUB_WEIGHTS.get(name)
    assert (name in timm.list_models(pretrained=True, include_tags=False)) == (name in HUB_WEIGHTS)
    if name not in HUB_WEIGHTS:
        assert "no hub weights" in cfg["notes"][0]

    features = model.forward_features(torch.randn(1, *cfg["input_size"], device="meta"))
    assert features.device.type == "meta" and features.shape[-1] == model.num_features
    if isinstance(model, SPT):
        assert features.shape[1:3] == cfg["pool_size"]
    assert spa_viz.spa_context(model).config.enabled, "the meta forward leaves SPA switched on"


@pytest.mark.parametrize("name", PRESETS)
def test_features_only_forward_intermediates_and_reset_classifier(name: str) -> None:
    out_indices = (1, 3, 5) if name in SPA_VIT else (1, 2, 3)
    backbone = _create(name, features_only=True, out_indices=out_indices).eval()
    model = _create(name).eval()
    x = _images(name)
    with torch.no_grad():
        features = backbone(x)
        expected = model.forward_intermediates(x, indices=list(out_indices), intermediates_only=True)
        final, intermediates = model.forward_intermediates(x)
        forward_features = model.forward_features(x)

    info = backbone.feature_info
    assert backbone.pretrained_cfg["architecture"] == name
    assert len(features) == len(out_indices) == len(info.channels())
    for feature, channels, reduction, reference in zip(
        features, info.channels(), info.reduction(), expected, strict=True
    ):
        assert feature.shape == (2, channels, x.shape[2] // reduction, x.shape[3] // reduction)
        torch.testing.assert_close(feature, reference)
    assert info.channels() == [model.feature_info[i]["num_chs"] for i in out_indices]
    assert len(intermediates) == len(model.feature_info)
    torch.testing.assert_close(final, forward_features)
    assert len(spa_viz.spa_context(model).gates) == len(spa_viz.spa_blocks(model)), "the SPA blocks ran"

    with torch.no_grad():
        model.reset_classifier(7)
        assert model(x).shape == (2, 7) and model.get_classifier().out_features == 7
        model.reset_classifier(0)
        pooled = model(x)
        assert pooled.shape == (2, model.num_features) == (2, model.head_hidden_size)
        torch.testing.assert_close(pooled, model.forward_head(forward_features, pre_logits=True))
        model.reset_classifier(0, "")
        unpooled = model(x)
    if isinstance(model, SPT):
        assert unpooled.shape == (2, x.shape[2] // 32, x.shape[3] // 32, model.num_features)
    else:
        assert unpooled.shape == (2, model.patch_embed.num_patches + model.num_prefix_tokens, model.num_features)


def _train_step(model: torch.nn.Module, images: list[torch.Tensor]) -> tuple[dict, list[torch.Tensor], list]:
    """Task loss plus a loss on the gate scores (which leave the blocks through the SPA context)."""
    ctx = spa_viz.spa_context(model)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(3)  # Gumbel noise and drop path draw the same numbers in both runs
    ctx.records = []
    loss = torch.zeros(())
    for x in images:
        loss = loss + model(x).square().mean() + sum(torch.sigmoid(g.raw).mean() for g in ctx.gates)
    loss.backward()
    records, ctx.records = ctx.records, None
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return grads, [g.raw.detach().clone() for g in ctx.gates], records


@pytest.mark.parametrize("name", PRESETS)
def test_grad_checkpointing_gives_the_same_forward_and_gradients(name: str) -> None:
    model = _create(name, num_classes=5).train()
    _spread_gates(model)
    x = _images(name)
    plain_grads, plain_scores, plain_records = _train_step(model, [x])
    model.set_grad_checkpointing(True)
    grads, scores, records = _train_step(model, [x])

    num_blocks = len(spa_viz.spa_blocks(model))
    assert len(plain_grads) == len(list(model.parameters()))
    assert len(records) == len(plain_records) == num_blocks, "re-runs in backward leave no extra records"
    assert any(not bool(r.keep.all()) for r in records), "some tokens were dropped, so packing is exercised"
    assert len(scores) == len(plain_scores) == num_blocks
    for got, want in zip(scores, plain_scores, strict=True):
        torch.testing.assert_close(got, want)
    assert grads.keys() == plain_grads.keys()
    for key in grads:
        torch.testing.assert_close(grads[key], plain_grads[key], rtol=1e-4, atol=1e-6, msg=key)


@pytest.mark.parametrize("name", ["spa_vit_digits", "spt_digits"])
def test_grad_checkpointing_features_only_two_passes_before_backward(name: str) -> None:
    backbone = _create(name, features_only=True).train()
    _spread_gates(backbone)
    images = [_images(name), _images(name).flip(-1)]

    def step() -> dict:
        backbone.zero_grad(set_to_none=True)
        torch.manual_seed(3)
        sum(f.square().mean() for x in images for f in backbone(x)).backward()
        return {n: p.grad.clone() for n, p in backbone.named_parameters() if p.grad is not None}

    plain = step()
    backbone.model.set_grad_checkpointing(True)  # timm's FeatureGetterNet leaves it to the wrapped model
    checkpointed = step()
    assert checkpointed.keys() == plain.keys() and len(plain) == len(list(backbone.parameters()))
    for key in plain:
        torch.testing.assert_close(checkpointed[key], plain[key], rtol=1e-4, atol=1e-6, msg=key)
    backbone.model.set_grad_checkpointing(False)
    assert step().keys() == plain.keys()


def test_reentrant_checkpointing_is_refused() -> None:
    model = _create("spa_vit_digits")
    set_reentrant_ckpt(True)
    try:
        with pytest.raises(ValueError, match="non-reentrant"):
            model.set_grad_checkpointing(True)
    finally:
        set_reentrant_ckpt(False)


@pytest.mark.parametrize("name", ["spa_vit_digits", "spt_digits"])
def test_unknown_arguments_raise_type_error(name: str) -> None:
    with pytest.raises(TypeError, match="not_a_model_arg"):
        timm.create_model(name, not_a_model_arg=1)


def test_pretrained_loads_vit_weights_and_keeps_fresh_gates() -> None:
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32)
    model = timm.create_model(
        "spa_vit_tiny_patch16_224",
        pretrained=True,
        img_size=32,
        pretrained_cfg_overlay=dict(state_dict=vit.state_dict()),
    )
    assert isinstance(model, SPAVisionTransformer)
    state = model.state_dict()
    for key, value in vit.state_dict().items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=0, msg=key)
    gates = sorted(k for k in state if k not in vit.state_dict())
    assert gates == sorted(f"blocks.{i}.gate.proj.{p}" for i in range(3, 12) for p in ("weight", "bias"))
    assert all(bool((state[f"blocks.{i}.gate.proj.bias"] == 3.0).all()) for i in range(3, 12))


def test_patch_and_presets_share_one_class() -> None:
    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2)
    keys = set(vit.state_dict())
    patched = spa_viz.patch(vit, 2)
    assert type(patched) is SPAVisionTransformer and type(_create("spa_vit_digits")) is SPAVisionTransformer
    assert set(patched.state_dict()) - keys == {f"blocks.{i}.gate.proj.{p}" for i in (2, 3) for p in ("weight", "bias")}


def test_spt_group_matcher_and_pruning() -> None:
    model = _create("spt_digits", num_classes=3)
    groups = group_parameters(model, model.group_matcher(coarse=False), reverse=True)
    assert len(set(groups.values())) > 2
    assert model.prune_intermediate_layers([1]) == [1]
    assert len(model.layers) == 2 and model.num_features == model.feature_info[1]["num_chs"] and model.num_classes == 0
    assert not spa_viz.spa_blocks(model) and model.forward_features(_images("spt_digits")).shape == (2, 8, 12, 96)
