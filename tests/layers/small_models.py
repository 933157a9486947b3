"""Small SPA models on both backbones with random gates, shared by the kernel tests."""

from __future__ import annotations

import torch

import spa_viz
from spa_viz.models.spt import SPT
from tests.conftest import tiny_vit


def small_spt(**spa) -> SPT:
    """A 4-stage SPT on 64 px images (SPA in stages 3-4: 4x4 and 2x2 grids)."""
    torch.manual_seed(0)
    return SPT(
        img_size=64, embed_dim=16, depths=(1, 1, 2, 2), num_heads=(1, 2, 2, 4), window_size=4, num_classes=0, spa=spa
    ).eval()


def small_vit(**spa) -> torch.nn.Module:
    """:func:`tests.conftest.tiny_vit` (4 blocks, average pooling) with SPA from block 1."""
    return spa_viz.patch(tiny_vit(depth=4, global_pool="avg"), 1, **spa).eval()


def random_gates(model: torch.nn.Module, std: float = 1.0, bias: float = 0.0, seed: int = 0) -> None:
    """Gate weights ~ N(0, std^2) from ``seed``, biases ``bias``: each image keeps its own mix of tokens."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in spa_viz.spa_blocks(model):
            block.gate.proj.weight.copy_(torch.randn(block.gate.proj.weight.shape, generator=generator) * std)
            block.gate.proj.bias.fill_(bias)
