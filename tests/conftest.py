"""Shared fixtures: small deterministic models and inputs."""

from __future__ import annotations

import pytest
import torch
from timm.models import VisionTransformer

import spa_viz

# Tests run as parallel xdist workers on a small CPU: one torch thread each, so no worker waits on
# a core another process holds (oversubscribed OpenMP regions are orders of magnitude slower).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def tiny_vit(**overrides) -> VisionTransformer:
    """A 4-block ViT on 32 px images with 8 px patches (16 tokens + class token)."""
    settings = dict(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, num_classes=5)
    settings.update(overrides)
    return VisionTransformer(**settings).eval()


def mixed_gate_tiny_vit() -> VisionTransformer:
    """:func:`tiny_vit` with SPA from block 1 (containers of 6) and random gates, so each image keeps
    a different mix of tokens."""
    model = spa_viz.patch(tiny_vit(), 1, policy="container", container_len=6)
    for block in spa_viz.spa_blocks(model):
        torch.nn.init.normal_(block.gate.proj.weight, std=1.0)
        torch.nn.init.zeros_(block.gate.proj.bias)
    return model


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(3, 3, 32, 32)
