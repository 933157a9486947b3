import pytest
import timm
import torch

import spa_viz
from spa_viz.layers.block import SPABlockMixin
from tests.conftest import tiny_vit


def _reference(model, images):
    with torch.no_grad():
        return model(images)


def test_patch_keeps_weights_and_adds_gates(images) -> None:
    model = tiny_vit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    spa_viz.patch(model, 2)
    after = model.state_dict()
    assert set(after) - set(before) == {f"blocks.{i}.gate.proj.{p}" for i in (2, 3) for p in ("weight", "bias")}
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [b.spa_layer for b in spa_viz.spa_blocks(model)] == [2, 3]
    assert not isinstance(model.blocks[1], SPABlockMixin)


@pytest.mark.parametrize("policy, row_len", [("image", None), ("container", 17), ("container", 34)])
def test_keep_all_without_soft_gating_reproduces_timm(images, policy, row_len) -> None:
    model = tiny_vit(depth=3)
    expected = _reference(model, images)
    spa_viz.patch(model, 0, policy=policy, container_len=row_len, threshold=0.0, soft_gating=False)
    assert torch.allclose(_reference(model, images), expected, atol=1e-5)


def test_keep_all_reproduces_dinov2_style_vit_with_registers_and_layer_scale() -> None:
    model = tiny_vit(reg_tokens=2, init_values=0.1, no_embed_class=True)
    images = torch.randn(2, 3, 32, 32)
    expected = _reference(model, images)
    spa_viz.patch(model, 1, threshold=0.0, soft_gating=False)
    assert spa_viz.spa_context(model).num_prefix == 3
    assert torch.allclose(_reference(model, images), expected, atol=1e-5)


def test_disabled_spa_is_exactly_the_dense_model(images) -> None:
    model = tiny_vit()
    expected = _reference(model, images)
    spa_viz.patch(model, 1)
    spa_viz.configure(model, enabled=False)
    assert torch.equal(_reference(model, images), expected)


def test_prefix_tokens_are_always_kept(images) -> None:
    model = spa_viz.patch(tiny_vit(reg_tokens=1), 1, threshold=1.0, min_keep=0)
    _, tr = spa_viz.trace(model, images)
    for layer in tr.layers:
        assert int(layer.kept_counts.sum()) == 0
        assert sorted(layer.plan.slot_token[layer.plan.valid].tolist()) == [0, 0, 0, 1, 1, 1]


def test_unkept_tokens_pass_unchanged(images) -> None:
    model = spa_viz.patch(tiny_vit(depth=1), 0, threshold=0.5)
    block = model.blocks[0]
    torch.nn.init.normal_(block.gate.proj.weight, std=1.0)
    torch.nn.init.zeros_(block.gate.proj.bias)
    tokens = model._pos_embed(model.patch_embed(images))
    spa_viz.spa_context(model).begin((4, 4))
    with torch.no_grad():
        out = block(tokens)
    keep = spa_viz.spa_context(model).gates[0].keep
    assert 0 < int(keep.sum()) < keep.numel()
    patches_in, patches_out = tokens[:, 1:], out[:, 1:]
    assert torch.equal(patches_out[~keep], patches_in[~keep])
    assert not torch.allclose(patches_out[keep], patches_in[keep])


def test_dense_mlp_option_updates_unkept_tokens(images) -> None:
    model = spa_viz.patch(tiny_vit(depth=1), 0, threshold=1.0, min_keep=0, sparse_mlp=False)
    tokens = model._pos_embed(model.patch_embed(images))
    spa_viz.spa_context(model).begin((4, 4))
    with torch.no_grad():
        out = model.blocks[0](tokens)
    assert not torch.allclose(out[:, 1:], tokens[:, 1:])


def test_gradients_reach_every_gate_through_the_task_loss(images) -> None:
    """Soft gating scales the kept tokens' branch outputs, so a task loss that reads the patch tokens
    (here average pooling) reaches every gate without L_select."""
    model = spa_viz.patch(tiny_vit(drop_path_rate=0.1, global_pool="avg"), 1, threshold=0.5).train()
    for block in spa_viz.spa_blocks(model):
        torch.nn.init.zeros_(block.gate.proj.bias)
    model(images).logsumexp(-1).sum().backward()
    for block in spa_viz.spa_blocks(model):
        assert block.gate.proj.weight.grad is not None
        assert block.gate.proj.weight.grad.abs().sum() > 0


def test_configure_changes_threshold_live(images) -> None:
    model = spa_viz.patch(tiny_vit(), 1)
    for block in spa_viz.spa_blocks(model):
        torch.nn.init.normal_(block.gate.proj.weight, std=1.0)
        torch.nn.init.zeros_(block.gate.proj.bias)
    kept = []
    for threshold in (0.2, 0.5, 0.8):
        spa_viz.configure(model, threshold=threshold)
        kept.append(spa_viz.trace(model, images)[1].mean_keep_ratio)
    assert kept[0] > kept[1] > kept[2]
    with pytest.raises(ValueError, match="unknown SPA settings"):
        spa_viz.configure(model, treshold=0.1)
    with pytest.raises(ValueError, match="threshold"):
        spa_viz.configure(model, threshold=2.0)
    assert spa_viz.spa_context(model).config.threshold == 0.8, "a rejected change leaves the config as it was"


def test_registered_with_timm() -> None:
    model = timm.create_model("spa_vit_tiny_patch16_224", num_classes=3)
    assert spa_viz.is_spa_model(model)
    assert [b.spa_layer for b in spa_viz.spa_blocks(model)] == list(range(3, 12))
    digits = timm.create_model("spa_vit_digits", spa=dict(policy="container", container_len=64))
    assert spa_viz.spa_context(digits).config.container_len == 64
    assert digits(torch.randn(1, 3, 128, 128)).shape == (1, 192)


@pytest.mark.parametrize(
    "images, message",
    [
        (torch.randn(3, 32, 32), r"\(B, C, H, W\)"),
        (torch.randn(1, 3, 30, 32), "not divisible by the patch size"),
        (torch.randn(1, 3, 40, 40), "takes 32x32 images"),
    ],
)
def test_bad_images_raise(images, message) -> None:
    model = spa_viz.patch(tiny_vit(), 1)
    with pytest.raises(ValueError, match=message):
        model(images)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(start_layer=4), r"start_layer must be in \[0, 3\]"),
        (dict(start_layer=0, policy="pack"), "unknown packing policy"),
        (dict(start_layer=0, backend="fast"), "unknown attention backend"),
        (dict(start_layer=0, policy="container", container_len=0), "L must be >= 1"),
    ],
)
def test_bad_patch_arguments_raise(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        spa_viz.patch(tiny_vit(), **kwargs)


def test_patch_rejects_non_vit_and_double_patch() -> None:
    with pytest.raises(ValueError, match="VisionTransformer"):
        spa_viz.patch(torch.nn.Linear(2, 2), 0)
    model = spa_viz.patch(tiny_vit(), 0)
    with pytest.raises(ValueError, match="already patched"):
        spa_viz.patch(model, 0)
