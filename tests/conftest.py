"""Shared fixtures: small deterministic models and inputs."""

from __future__ import annotations

import pytest
import torch
from timm.models import VisionTransformer


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def tiny_vit(**overrides) -> VisionTransformer:
    """A 4-block ViT on 32 px images with 8 px patches (16 tokens + class token)."""
    settings = dict(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, num_classes=5)
    settings.update(overrides)
    return VisionTransformer(**settings).eval()


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(3, 3, 32, 32)
