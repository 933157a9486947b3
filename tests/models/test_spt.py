"""SPT: container attention, keep-all == Swin, shapes, gates, selection loss, timm registry, trace."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from timm.layers import Attention
from timm.models.swin_transformer import SwinTransformer
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import spa_viz
from spa_viz.analysis.flops import dense_block_macs, static_macs
from spa_viz.benchmarks.spt import force_keep_ratio
from spa_viz.layers.attention import packed_attention
from spa_viz.layers.block import BlockCosts
from spa_viz.layers.packing import gather_kept, plan_packing
from spa_viz.models.spt import SPT, SPTBlock, SPTConfig, load_swin_weights, spt_from_swin
from spa_viz.selection.labels import multiscale_labels

KEEP_ALL = {"threshold": 0.0, "soft_gating": False}


def _swin(img_size: int, window: int) -> SwinTransformer:
    torch.manual_seed(0)
    return SwinTransformer(
        img_size=img_size, embed_dim=24, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), window_size=window, num_classes=0
    ).eval()


def _small_spt(**settings) -> SPT:
    torch.manual_seed(0)
    base = dict(img_size=64, embed_dim=16, depths=(1, 1, 2, 2), num_heads=(1, 2, 2, 4), window_size=4, num_classes=0)
    return SPT(**{**base, **settings}).eval()


def _random_gates(model: SPT, seed: int = 0) -> None:
    """Gates with spread-out logits, so each image keeps a different share of its tokens."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in model.spa_blocks():
            block.gate.proj.weight.copy_(torch.randn(block.gate.proj.weight.shape, generator=generator))
            block.gate.proj.bias.zero_()


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))


def test_attn_bias_sdpa_equals_reference_and_loop() -> None:
    torch.manual_seed(0)
    attn = Attention(32, num_heads=4).eval()
    keep = torch.rand(3, 20) > 0.4
    plan = plan_packing(keep, "container", 16)
    x = gather_kept(torch.randn(3, 20, 32), plan)
    bias = torch.randn(plan.num_rows, 4, 16, 16)
    with torch.no_grad():
        sdpa, _ = packed_attention(attn, x, plan, "sdpa", attn_bias=bias)
        ref, _ = packed_attention(attn, x, plan, "reference", attn_bias=bias)
        q, k, v = attn.qkv(x).reshape(-1, 3, 4, 8).permute(1, 2, 0, 3)  # (3, heads, n, d)
        for flat, row, start, size, _ in plan.runs:
            run = slice(flat, flat + size)
            part = slice(start, start + size)
            weights = (q[:, run] @ k[:, run].transpose(-2, -1) * attn.scale + bias[row, :, part, part]).softmax(-1)
            expected = attn.proj((weights @ v[:, run]).transpose(0, 1).reshape(size, 32))
            assert torch.allclose(sdpa[run], expected, atol=1e-5)
    assert torch.allclose(sdpa, ref, atol=1e-5)
    with pytest.raises(ValueError, match="attn_bias"), torch.no_grad():
        packed_attention(attn, x, plan, "flex", attn_bias=bias)


@pytest.mark.parametrize("policy", ["container", "image"])
def test_container_attention_matches_reference_backend(policy: str) -> None:
    # SPA from stage 2; 96 px gives grids 24, 12, 6, 3: shifted blocks, window padding, a clipped window
    model = _small_spt(img_size=128, depths=(1, 2, 2, 2), spa_start_stage=2, spa={"policy": policy})
    _random_gates(model)
    images = torch.randn(3, 3, 96, 96)
    with torch.no_grad():
        fast = model.forward_pyramid(images)
        kept = torch.cat([g.keep.float().flatten() for g in model.spa_context.gates]).mean()
        spa_viz.configure(model, backend="reference")
        ref = model.forward_pyramid(images)
    assert 0.2 < kept < 0.8
    assert _max_diff(fast, ref) < 1e-5


@pytest.mark.parametrize(("img_size", "window", "start"), [(224, 7, 3), (224, 7, 1), (128, 4, 1), (128, 4, 4)])
def test_keep_all_equals_timm_swin(img_size: int, window: int, start: int) -> None:
    swin = _swin(img_size, window)
    spt = spt_from_swin(swin, spa_start_stage=start, spa=KEEP_ALL).eval()
    images = torch.randn(2, 3, img_size, img_size)
    with torch.no_grad():
        expected = swin.forward_intermediates(images, intermediates_only=True)
        got = spt.forward_pyramid(images)
        final = (swin.forward_features(images) - spt.forward_features(images)).abs().max()
        spa_viz.configure(spt, enabled=False)
        dense = spt.forward_pyramid(images)
    assert _max_diff(expected, got) < 1e-5
    assert final < 1e-5
    assert _max_diff(expected, dense) < 1e-5


def test_swin_tiny_weights_keep_all() -> None:
    swin = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=0).eval()
    spt = spt_from_swin(swin, spa=KEEP_ALL).eval()
    images = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert (swin.forward_features(images) - spt.forward_features(images)).abs().max() < 1e-5


def test_dense_twin_equals_swin_with_window_padding() -> None:
    swin = _swin(160, 4)  # grids 40, 20, 10, 5: stages 3-4 pad their windows, stage 4 still shifts
    spt = spt_from_swin(swin, spa_start_stage=1).eval()
    spa_viz.configure(spt, enabled=False)
    images = torch.randn(2, 3, 160, 160)
    with torch.no_grad():
        assert (
            _max_diff(swin.forward_intermediates(images, intermediates_only=True), spt.forward_pyramid(images)) < 1e-5
        )


@pytest.fixture(scope="module")
def digits() -> SPT:
    """One eval-mode ``spt_digits`` with spread-out gates, shared by the read-only tests."""
    torch.manual_seed(0)
    model = timm.create_model("spt_digits").eval()
    _random_gates(model)
    return model


@pytest.mark.parametrize("size", [(128, 128), (96, 96), (100, 132), (64, 200), (4, 8)])
def test_pyramid_shapes(digits: SPT, size: tuple[int, int]) -> None:
    model = digits
    with torch.no_grad():
        pyramid = model.forward_pyramid(torch.randn(2, 3, *size))
        final = model.forward_features(torch.randn(2, 3, *size))
    height, width = size[0] // 4, size[1] // 4
    for level, (feature, dim) in enumerate(zip(pyramid, model.config.dims, strict=True)):
        assert feature.shape == (2, dim, height, width), level
        assert torch.isfinite(feature).all()
        height, width = -(-height // 2), -(-width // 2)
    assert final.shape == (2, pyramid[-1].shape[2], pyramid[-1].shape[3], 384)


@pytest.mark.parametrize("shape", [(1, 3, 130, 128), (1, 3, 128, 6), (1, 1, 128, 128), (3, 128, 128)])
def test_unusable_input_raises(digits: SPT, shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="SPT takes|expected images"):
        digits(torch.randn(*shape))


def test_gates_get_gradients_and_selection_loss_covers_both_stages() -> None:
    torch.manual_seed(0)
    model = timm.create_model("spt_digits", spa={"threshold": 0.3}).train()
    _random_gates(model, seed=1)
    for block in model.spa_blocks():
        block.gate.proj.weight.data.mul_(0.05)  # keep logits moderate so Gumbel noise makes varied masks
    images = torch.randn(2, 3, 128, 128)
    targets = [
        {"boxes": torch.tensor([[10.0, 20.0, 60.0, 90.0]])},
        {"boxes": torch.tensor([[70.0, 5.0, 120.0, 40.0], [0.0, 100.0, 30.0, 128.0]])},
    ]
    grids = [(8, 8), (4, 4)]
    labels = dict(zip(grids, multiscale_labels(targets, (128, 128), grids), strict=True))
    features = model.forward_features(images)
    assert sorted({g.grid for g in model.spa_context.gates}) == sorted(grids)
    loss_select = spa_viz.model_selection_loss(model, labels)
    (features.mean() + loss_select).backward()
    assert torch.isfinite(loss_select) and loss_select > 0
    for block in model.spa_blocks():
        grad = block.gate.proj.weight.grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, block.spa_layer
        assert block.attn.relative_position_bias_table.grad is not None


def test_stage_fusion_hands_the_last_stage3_score_to_every_stage4_block(digits: SPT) -> None:
    """fusion="stage": stage 3 (the first SPA stage) selects with its own logits; each stage-4 block
    fuses with the same 2x2-pooled last fused score of stage 3, never with the block before it."""
    model = digits
    _random_gates(model)
    with torch.no_grad():
        model(torch.randn(2, 3, 128, 128))
    gates = model.spa_context.gates
    assert [g.grid for g in gates] == [(8, 8), (8, 8), (4, 4), (4, 4)]
    assert all(torch.equal(g.fused, g.raw) for g in gates[:2])
    incoming = torch.nn.functional.max_pool2d(gates[1].fused.view(2, 1, 8, 8), 2).view(2, -1)
    for gate in gates[2:]:
        assert torch.equal(gate.fused, torch.maximum(gate.raw, incoming))
    assert not torch.equal(gates[3].fused, torch.maximum(gates[3].raw, gates[2].fused)), "no chaining inside a stage"


@pytest.mark.parametrize("mode", ["chain", "none"])
def test_other_fusion_modes(digits: SPT, mode: str) -> None:
    model = digits
    _random_gates(model)
    spa_viz.configure(model, fusion=mode)
    with torch.no_grad():
        model(torch.randn(2, 3, 128, 128))
    gates = model.spa_context.gates
    if mode == "none":
        assert all(torch.equal(g.fused, g.raw) for g in gates)
        return
    assert torch.equal(gates[0].fused, gates[0].raw)
    assert torch.equal(gates[1].fused, torch.maximum(gates[1].raw, gates[0].fused))
    pooled = torch.nn.functional.max_pool2d(gates[1].fused.view(2, 1, 8, 8), 2).view(2, -1)
    assert torch.equal(gates[2].fused, torch.maximum(gates[2].raw, pooled))
    assert torch.equal(gates[3].fused, torch.maximum(gates[3].raw, gates[2].fused))


def test_create_model_presets() -> None:
    model = timm.create_model("spt_digits")
    assert isinstance(model, SPT) and model.spa_context.config.container_len == 16
    assert [b.spa_layer for b in model.spa_blocks()] == [2, 3, 4, 5]
    assert [b.shifted for b in model.spa_blocks()] == [False, True, False, True]
    assert "layers.3.blocks.1.attn.relative_position_bias_table" in model.no_weight_decay()
    model.reset_classifier(5)
    assert model.eval()(torch.randn(1, 3, 128, 128)).shape == (1, 5)
    plus4 = timm.create_model("spt_tiny_plus4", num_classes=0)
    assert [len(stage.blocks) for stage in plus4.layers] == [2, 2, 10, 2]
    with pytest.raises(ValueError, match="no hub weights"):
        timm.create_model("spt_digits", pretrained=True)


def test_config_json_roundtrip_and_validation() -> None:
    config = SPTConfig(depths=(2, 2, 6, 2), plus4=True, spa_start_stage=2, spa={"threshold": 0.3})
    assert SPTConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert config.stage_depths == (2, 2, 10, 2)
    with pytest.raises(ValueError, match="spa_start_stage"):
        SPTConfig(spa_start_stage=5)
    with pytest.raises(ValueError, match="unknown SPA settings"):
        SPTConfig(spa={"thresh": 0.3})


def test_load_swin_weights_reports_fresh_parameters() -> None:
    swin = _swin(224, 7)
    spt = SPT(img_size=224, embed_dim=24, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), num_classes=0, plus4=True)
    missing = load_swin_weights(spt, swin.state_dict())
    assert all(
        ".gate." in k
        or k.startswith(("layers.2.blocks.2.", "layers.2.blocks.3.", "layers.2.blocks.4.", "layers.2.blocks.5."))
        for k in missing
    )
    assert any(k.startswith("layers.2.blocks.5.") for k in missing)
    assert torch.equal(spt.layers[3].blocks[1].attn.qkv.weight, swin.layers[3].blocks[1].attn.qkv.weight)


def test_trace_records_raster_order_and_flops() -> None:
    model = _small_spt(img_size=128)
    _random_gates(model)
    images = torch.randn(2, 3, 128, 128)
    inputs: list[torch.Tensor] = []
    first = model.spa_blocks()[0]
    handle = first.register_forward_pre_hook(lambda _, args: inputs.append(args[0]))
    out, tr = spa_viz.trace(model, images)
    handle.remove()

    assert [t.layer for t in tr.layers] == [b.spa_layer for b in model.spa_blocks()]
    record = tr.layers[0]
    assert record.grid == (8, 8)
    with torch.no_grad():
        raster_scores = first.gate(inputs[0].flatten(1, 2), 0)  # (B, H*W) in raster order
    assert torch.allclose(record.scores, raster_scores, atol=1e-6)
    assert torch.equal(record.keep, raster_scores > 0) and 0.2 < record.keep.float().mean() < 0.8
    assert record.plan.row_len == 16 and record.plan.policy == "container"
    kept_tokens = record.plan.slot_token[record.plan.valid]
    assert torch.equal(kept_tokens.sort().values, record.keep.nonzero()[:, 1].sort().values)

    for t, block in zip(tr.layers, model.spa_blocks(), strict=True):
        tokens = t.grid[0] * t.grid[1]
        dense = dense_block_macs(BlockCosts.of(block), tokens, 2, window=block.window_area(t.grid))
        assert t.cost.macs_dense == dense
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model.forward_features(images)
    assert counter.get_total_flops() == tr.backbone_flops_run
    spa_viz.configure(model, enabled=False)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model.forward_features(images)
    assert counter.get_total_flops() == tr.backbone_flops_dense


def test_keep_all_containers_are_swin_windows() -> None:
    model = _small_spt(img_size=128, spa=KEEP_ALL)
    _, tr = spa_viz.trace(model, torch.randn(1, 3, 128, 128))
    unshifted, shifted = tr.layers[0], tr.layers[1]
    assert unshifted.plan.fill_ratio == 1.0 and unshifted.plan.num_rows == 4
    first_window = torch.tensor([0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27])
    assert torch.equal(unshifted.plan.slot_token[0], first_window)
    assert torch.equal(shifted.plan.slot_token[0], first_window + 2 * 8 + 2)  # rolled by M//2 = 2


def test_spt_block_attributes(digits: SPT) -> None:
    model = digits
    ctx = model.spa_context
    assert spa_viz.spa_context(model) is ctx and ctx.num_prefix == 0
    for block in spa_viz.spa_blocks(model):
        assert isinstance(block, SPTBlock) and block.spa_context is ctx
    assert static_macs(model, (128, 128)) > 0


def test_bench_forces_keep_ratio_in_both_stages() -> None:
    model = timm.create_model("spt_digits").eval()
    force_keep_ratio(model, 4, (128, 128), 0.3)
    _, tr = spa_viz.trace(model, torch.randn(4, 3, 128, 128))
    ratios = torch.stack([t.keep_ratio for t in tr.layers])  # (blocks, images)
    assert (ratios.mean(1) - 0.3).abs().max() < 0.05  # 16 stage-4 tokens: 3-6 kept, 0.2-0.4 per image
    assert (ratios == ratios[0]).all() and ratios[0].unique().numel() > 1  # same map per stage, varied per image
