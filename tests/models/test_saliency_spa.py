"""The trained saliency architecture on a tiny stand-in: adapters and the tuned decoder act only while
SPA runs (so the dense twin is the imported model), a dense tail stays dense, and the partial
checkpoint holds exactly the trained tensors."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
from timm.models import VisionTransformer
from torch import Tensor

from spa_viz.analysis.flops import spa_block_macs
from spa_viz.analysis.token import inspect_token, record_block_inputs
from spa_viz.analysis.trace import trace
from spa_viz.io.checkpoint import check_state_dict
from spa_viz.layers.block import BlockCosts
from spa_viz.models.saliency.adapters import AdapterSwitch, DeltaLinear, LowRankLinear, adapter_parameters
from spa_viz.models.saliency.decoder import DecoderConfig, DinoSaliency, SaliencyDecoder
from spa_viz.models.saliency.spa import adapter_mode, spa_saliency, trained_tensors
from spa_viz.models.spa_vit import configure, spa_blocks
from spa_viz.models.twin import dense_twin
from spa_viz.selection.merging import TokenMerging, merging_forward

SPA = {"start_layer": 1, "threshold": 0.5, "soft_gating": True}


def tiny_saliency(seed: int = 0) -> DinoSaliency:
    torch.manual_seed(seed)
    backbone = VisionTransformer(
        img_size=56, patch_size=14, embed_dim=32, depth=4, num_heads=2, num_classes=0, init_values=1e-5
    )
    return DinoSaliency(backbone, SaliencyDecoder(DecoderConfig(in_dim=32, channels=(8, 4, 2)))).eval()


def tiny_student(seed: int = 0, **kwargs) -> tuple[DinoSaliency, DinoSaliency]:
    """(the imported stand-in, its SPA student with perturbed adapters, deltas and tuned decoder)."""
    reference = tiny_saliency(seed)
    settings = {
        "dense_tail": 1,
        "adapters": {"rank": 4, "alpha": 4.0, "full_layers": [3]},
        "tuned_decoder": True,
        **kwargs,
    }
    student = spa_saliency(copy.deepcopy(reference), SPA, **settings)
    with torch.no_grad():
        for param in adapter_parameters(student):
            param.normal_(0, 0.05)
        for param in student.tuned_decoder.parameters():
            param.add_(0.05)
    return reference, student


def test_dense_twin_is_the_unadapted_model_exactly() -> None:
    reference, student = tiny_student()
    images = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        expected = reference(images)
        with dense_twin(student.backbone):
            twin = student(images)
        adapted = student(images)
    assert torch.equal(twin, expected)
    assert (adapted - expected).abs().max() > 1e-3  # the adapters and tuned decoder do act under SPA


def test_adapter_modes_switch_the_updates_independently_of_spa() -> None:
    reference, student = tiny_student()
    images = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        with adapter_mode(student, "on"), dense_twin(student.backbone):
            dense_adapted = student(images)
        with adapter_mode(student, "off"):
            spa_imported = student(images)
        with dense_twin(student.backbone):
            imported = student(images)
        spa_adapted = student(images)
    assert not torch.allclose(dense_adapted, imported)
    assert not torch.allclose(spa_imported, spa_adapted)
    assert student.adapter_switch.mode == "spa"
    with pytest.raises(ValueError, match="unknown adapter mode"):
        AdapterSwitch(student.adapter_switch.context, "sometimes")


def test_merged_weight_follows_training_updates() -> None:
    _, student = tiny_student()
    linear = student.backbone.blocks[1].attn.qkv
    assert isinstance(linear, LowRankLinear)
    x = torch.randn(3, 32)
    with torch.no_grad():
        before = linear(x)
        torch.testing.assert_close(
            before, x @ (linear.weight + linear.scale * linear.lora_b @ linear.lora_a).T + linear.bias
        )
        linear.lora_b.add_(0.1)  # an optimizer step changes the parameter in place
        after = linear(x)
    torch.testing.assert_close(
        after, x @ (linear.weight + linear.scale * linear.lora_b @ linear.lora_a).T + linear.bias
    )
    full = student.backbone.blocks[3].mlp.fc1
    assert isinstance(full, DeltaLinear)
    with torch.no_grad():
        y = torch.randn(2, 32)
        torch.testing.assert_close(full(y), y @ (full.weight + full.delta).T + full.bias)


def test_gradients_reach_adapters_gates_and_tuned_decoder_only_through_spa() -> None:
    _, student = tiny_student()
    for param in student.parameters():
        param.requires_grad_(False)
    trained = [*adapter_parameters(student), *student.tuned_decoder.parameters()]
    trained += [p for b in spa_blocks(student.backbone) for p in b.gate.parameters()]
    for param in trained:
        param.requires_grad_(True)
    student.train()
    student(torch.randn(2, 3, 56, 56)).mean().backward()
    assert all(p.grad is not None for p in adapter_parameters(student))
    assert all(p.grad is not None for p in student.tuned_decoder.parameters())
    assert not student.decoder.training and not student.tuned_decoder.training  # batch norms stay in eval


def test_dense_tail_stays_dense_and_is_counted_as_dense() -> None:
    _, student = tiny_student()
    assert [b.spa_layer for b in spa_blocks(student.backbone)] == [1, 2]
    assert not hasattr(student.backbone.blocks[3], "spa_layer")
    with torch.no_grad():
        _, tr = trace(student, torch.randn(1, 3, 56, 56))
    assert [layer.layer for layer in tr.layers] == [1, 2]
    dense_blocks = tr.static_macs
    _, no_tail = tiny_student(dense_tail=0)
    with torch.no_grad():
        _, tr_all = trace(no_tail, torch.randn(1, 3, 56, 56))
    assert dense_blocks > tr_all.static_macs  # the tail block is in the static (dense) part


def test_dense_tail_must_leave_an_spa_block() -> None:
    with pytest.raises(ValueError, match="dense_tail"):
        spa_saliency(tiny_saliency(), SPA, dense_tail=3)


def test_trained_tensors_round_trip_in_half_precision() -> None:
    _, student = tiny_student()
    stored = trained_tensors(student, dtype=torch.float16)
    assert all(".gate." in k or v.dtype == torch.float16 for k, v in stored.items())
    assert all(v.dtype == torch.float32 for k, v in stored.items() if ".gate." in k)
    assert any(k.endswith(".delta") for k in stored) and any(k.endswith(".lora_b") for k in stored)
    assert any(k.startswith("tuned_decoder.") for k in stored)
    trained = (".gate.", ".lora_a", ".lora_b", ".delta")
    assert all(any(part in k for part in trained) or k.startswith("tuned_decoder.") for k in stored)
    _, fresh = tiny_student(seed=0)
    check_state_dict(fresh.state_dict(), stored, partial=True)
    fresh.load_state_dict(stored, strict=False)
    images = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        torch.testing.assert_close(fresh(images), student(images), atol=2e-3, rtol=0)


# Drop-scaled adapters (SPA v3): each image's updates scale with the share of its tokens SPA dropped.
V3 = {"start_layer": 1, "threshold": 0.5, "soft_gating": "gradient", "unkept": "refresh"}


def drop_scaled_student(seed: int = 0) -> tuple[DinoSaliency, DinoSaliency]:
    """(the imported stand-in, its v3 student: refresh, gradient soft gating, drop-scaled adapters,
    random gates that drop about half the tokens)."""
    reference = tiny_saliency(seed)
    student = spa_saliency(
        copy.deepcopy(reference),
        V3,
        dense_tail=1,
        adapters={"rank": 4, "alpha": 4.0, "full_layers": [3], "drop_scaled": True},
        tuned_decoder=True,
    )
    with torch.no_grad():
        for param in adapter_parameters(student):
            param.normal_(0, 0.05)
        for param in student.tuned_decoder.parameters():
            param.add_(0.05)
        for block in spa_blocks(student.backbone):
            block.gate.proj.weight.normal_(0, 1.0)
            block.gate.proj.bias.zero_()
    return reference, student


def test_drop_scaled_adapters_leave_a_keep_all_image_at_the_teacher() -> None:
    reference, student = drop_scaled_student()
    images = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        teacher = reference(images)
        configure(student.backbone, threshold=0.0)  # every token kept: nothing dropped, no update
        keep_all = student(images)
        configure(student.backbone, threshold=0.5)
        dropping, tr = trace(student, images)
        with adapter_mode(student, "off"):
            imported = student(images)
    torch.testing.assert_close(keep_all, teacher, atol=1e-5, rtol=0)
    assert all(float(layer.keep_ratio.max()) < 1.0 for layer in tr.layers)  # the gates drop tokens
    assert (dropping - imported).abs().max() > 1e-3  # where tokens were dropped the adapters act


def test_drop_scaled_updates_follow_each_images_own_share() -> None:
    _, student = drop_scaled_student()
    images = torch.randn(3, 3, 56, 56)
    with torch.no_grad():
        alone = torch.cat([student(images[i : i + 1]) for i in range(3)])
        together, tr = trace(student, images)
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=0)  # no image's update depends on another's
    switch = student.adapter_switch
    expected = 1.0 - tr.layers[-1].keep_ratio
    assert float(expected.max() - expected.min()) > 0  # the images dropped different shares
    torch.testing.assert_close(switch.dropped_share(), expected)
    plan = student.backbone.spa_context.last_plan
    rows = switch.strength(torch.zeros(plan.num_kept, 32))
    assert rows.shape == (plan.num_kept, 1)
    torch.testing.assert_close(rows[:, 0], expected[plan.sources // plan.seq_len])
    torch.testing.assert_close(switch.strength(torch.zeros(3, plan.seq_len, 32)).flatten(), expected)
    with pytest.raises(ValueError, match="cannot tell which image"):
        switch.strength(torch.zeros(plan.num_kept + 1000, 32))


def test_drop_scaled_adapter_macs_are_counted_on_the_tokens_they_touch() -> None:
    _, student = drop_scaled_student()
    block = spa_blocks(student.backbone)[0]
    qkv = block.attn.qkv
    assert qkv.extra_macs_per_token == qkv.rank * (qkv.in_features + qkv.out_features)
    with torch.no_grad():
        _, tr = trace(student, torch.randn(1, 3, 56, 56))
    layer = tr.layers[0]
    costs = layer.costs
    assert costs.extra_attn_macs == qkv.extra_macs_per_token + block.attn.proj.extra_macs_per_token
    assert costs.extra_mlp_macs == sum(m.extra_macs_per_token for m in (block.mlp.fc1, block.mlp.fc2)) > 0
    plain = replace(layer, costs=replace(costs, extra_attn_macs=0, extra_mlp_macs=0))
    assert spa_block_macs(layer) - spa_block_macs(plain) == layer.plan.num_kept * (
        costs.extra_attn_macs + costs.extra_mlp_macs
    )
    with adapter_mode(student, "off"):
        assert BlockCosts.of(block).extra_attn_macs == 0  # off: the weight's MACs only
    with dense_twin(student.backbone):
        assert BlockCosts.of(block).extra_mlp_macs == 0  # the dense twin runs the imported weights


def test_drop_scaled_adapters_stay_off_where_no_spa_block_ran() -> None:
    """Token merging runs the backbone's blocks without SPA: nothing was dropped, so the adapters of a
    drop-scaled model do not act there (even right after an SPA forward left its plan behind)."""
    _, student = drop_scaled_student()
    images = torch.randn(2, 3, 56, 56)
    merging = TokenMerging(2, [1, 2])
    with torch.no_grad():
        student(images)  # an SPA forward: the context holds its last plan
        with merging_forward(student, student.backbone, merging):
            merged = student(images)
        with adapter_mode(student, "off"), merging_forward(student, student.backbone, merging):
            imported = student(images)
    torch.testing.assert_close(merged, imported, atol=0, rtol=0)


def test_token_view_recomputes_attention_with_the_layers_own_adapter_strength() -> None:
    """The token view's recomputed attention of a kept token equals the weights the SPA block used,
    which for drop-scaled adapters depend on that layer's plan (not the last layer's)."""
    _, student = drop_scaled_student()
    images = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        _, record, inputs = record_block_inputs(student, images)
    first = record.layers[0]
    image, index = 1, int(first.keep[1].nonzero()[0])
    row, column = divmod(index, first.grid[1])
    seen = inspect_token(student, record, inputs, first.layer, image, row, column)
    assert seen.kept
    block = spa_blocks(student.backbone)[0]
    captured: list[Tensor] = []
    hook = block.attn.qkv.register_forward_hook(lambda m, args, out: captured.append(out))
    try:
        with torch.no_grad():
            student(images)
    finally:
        hook.remove()
    plan = first.plan
    flat = int(plan.flat_position[image * plan.seq_len + first.num_prefix + index])
    run = next(r for r in plan.runs if r[0] <= flat < r[0] + r[3])
    heads = block.attn.num_heads
    q, k, _ = captured[0].view(plan.num_kept, 3, heads, -1).unbind(1)
    q, k = q[flat : flat + 1], k[run[0] : run[0] + run[3]]
    expected = (torch.einsum("qhd,khd->hk", q, k) * block.attn.scale).softmax(-1)
    visible = seen.spa_attention[:, ~seen.spa_attention[0].isnan()]
    recomputed = torch.cat([seen.spa_prefix_attention, visible], -1)
    torch.testing.assert_close(recomputed.sort(-1).values, expected.sort(-1).values, atol=1e-5, rtol=0)
