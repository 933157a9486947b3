"""The trained saliency architecture on a tiny stand-in: adapters and the tuned decoder act only while
SPA runs (so the dense twin is the imported model), a dense tail stays dense, and the partial
checkpoint holds exactly the trained tensors."""

from __future__ import annotations

import copy

import pytest
import torch
from timm.models import VisionTransformer

from spa_viz.analysis.trace import trace
from spa_viz.io.checkpoint import check_state_dict
from spa_viz.models.saliency.adapters import AdapterSwitch, DeltaLinear, LowRankLinear, adapter_parameters
from spa_viz.models.saliency.decoder import DecoderConfig, DinoSaliency, SaliencyDecoder
from spa_viz.models.saliency.spa import adapter_mode, spa_saliency, trained_tensors
from spa_viz.models.spa_vit import spa_blocks
from spa_viz.models.twin import dense_twin

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
        AdapterSwitch(student.adapter_switch.config, "sometimes")


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
