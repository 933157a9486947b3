"""Token merging (ToMe): bipartite soft matching, size-weighted merges, proportional attention, unmerge."""

from __future__ import annotations

import pytest
import torch
from timm.models import VisionTransformer

from spa_viz.analysis.flops import dense_block_macs
from spa_viz.layers.block import BlockCosts
from spa_viz.selection.merging import TokenMerging, bipartite_soft_matching, merge_tokens


@pytest.fixture(scope="module")
def vit() -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, num_classes=0).eval()


def test_no_merging_is_the_dense_forward(vit) -> None:
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        dense = vit.forward_features(images)
        merged, result = TokenMerging(0, [0, 1, 2]).forward_features(vit, images)
    torch.testing.assert_close(merged, dense, atol=1e-5, rtol=1e-5)
    assert result.tokens_per_block == [17, 17, 17]
    assert result.block_macs == sum(dense_block_macs(BlockCosts.of(b), 17) for b in vit.blocks)


def test_matching_merges_the_most_similar_pairs_and_protects_prefix_tokens() -> None:
    # tokens 0..5; A = 0, 2, 4; B = 1, 3, 5; token 2 equals token 5, token 4 is close to token 1
    metric = torch.tensor([[[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 1], [0, 1, 0.1], [0, 0, 1]]])
    protected = torch.tensor([[True, False, False, False, False, False]])
    matching = bipartite_soft_matching(metric, 2, protected)
    assert matching.sources.tolist() == [[1, 2]]  # A indices of tokens 2 and 4
    assert matching.destinations.tolist() == [[2, 0]]  # into B tokens 5 and 1
    assert matching.unmerged.tolist() == [[0]]  # the protected class token stays
    x = torch.arange(6, dtype=torch.float).reshape(1, 6, 1)
    merged, size = merge_tokens(x, torch.ones(1, 6), matching)
    assert merged.flatten().tolist() == [0.0, 2.5, 3.0, 3.5]  # class, (1+4)/2, 3, (5+2)/2
    assert size.flatten().tolist() == [1.0, 2.0, 1.0, 2.0]


def test_merging_keeps_sizes_unmerges_to_the_full_grid_and_counts_fewer_macs(vit) -> None:
    images = torch.randn(2, 3, 32, 32)
    merging = TokenMerging(3, [0, 1])
    with torch.no_grad():
        tokens, result = merging.forward_features(vit, images)
    assert tokens.shape == (2, 17, 32)
    assert result.tokens_per_block == [17, 14, 11] and result.merged_per_block == [3, 3, 0]
    dense = sum(dense_block_macs(BlockCosts.of(b), 17) for b in vit.blocks)
    assert result.block_macs < dense
    # patches merged together share one value after unmerging; the class token keeps its own
    values = tokens[0, 1:]
    distinct = torch.unique(values.round(decimals=5), dim=0)
    assert len(distinct) == 11 - 1
    assert not any(torch.allclose(tokens[0, 0], v) for v in values)


def test_r_is_capped_by_what_a_block_can_merge(vit) -> None:
    with torch.no_grad():
        tokens, result = TokenMerging(100, [0, 1, 2]).forward_features(vit, torch.randn(1, 3, 32, 32))
    assert result.merged_per_block[0] == 8  # 9 A tokens, one of them the class token
    assert tokens.shape == (1, 17, 32) and torch.isfinite(tokens).all()


def test_bad_schedules_are_refused() -> None:
    with pytest.raises(ValueError, match="one per layer"):
        TokenMerging([1, 2], [0, 1, 2])
    with pytest.raises(ValueError, match=">= 0"):
        TokenMerging(-1, [0])
