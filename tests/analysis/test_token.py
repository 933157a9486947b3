"""The token view: one token's attention as the packed layer ran, against brute force and the dense twin."""

from __future__ import annotations

import math

import pytest
import torch

import spa_viz
from spa_viz.analysis.token import inspect_token, record_block_inputs
from tests.layers.small_models import random_gates, small_spt, small_vit

# float32 on the CPU: the same softmax computed from the same tokens in another op order agrees to ~1e-7
ATOL = 1e-5


def _brute_force(block: torch.nn.Module, tokens: torch.Tensor, query: int) -> torch.Tensor:
    """(heads, m) softmax(q k^T * scale) of token ``query`` over ``tokens`` (m, C), written out."""
    attn = block.attn
    normed = block.norm1(tokens)
    heads = attn.num_heads
    qkv = attn.qkv(normed).reshape(tokens.shape[0], 3, heads, -1)
    q, k = qkv[query, 0], qkv[:, 1]
    return torch.stack([(k[:, h] @ q[h] * attn.scale).softmax(0) for h in range(heads)])


def test_kept_token_attends_to_its_images_kept_tokens_exactly_as_brute_force() -> None:
    model = small_vit()
    random_gates(model, seed=1)
    images = torch.randn(3, 3, 32, 32)
    _, record, inputs = record_block_inputs(model, images)
    layer = record.layers[1]
    image = 1
    index = int(layer.keep[image].nonzero()[-1])
    width = layer.grid[1]
    view = inspect_token(model, record, inputs, layer.layer, image, index // width, index % width)
    assert view.kept and view.packed_row is not None and view.slot is not None
    assert torch.equal(view.visible, layer.keep[image])  # image policy: its whole image is one run
    tokens, _ = inputs.spa[layer.layer]
    prefix = layer.num_prefix
    members = torch.cat([torch.arange(prefix), prefix + layer.keep[image].nonzero().squeeze(1)])
    block = next(b for b in spa_viz.spa_blocks(model) if b.spa_layer == layer.layer)
    expected = _brute_force(block, tokens[image, members], prefix + int((layer.keep[image].nonzero() < index).sum()))
    got = torch.cat([view.spa_prefix_attention, view.spa_attention[:, layer.keep[image]]], 1)
    assert torch.allclose(got, expected, atol=ATOL)
    assert torch.isnan(view.spa_attention[:, ~layer.keep[image]]).all()
    dense_expected = _brute_force(block, inputs.dense[layer.layer][image], prefix + index)
    dense_got = torch.cat([view.dense_prefix_attention, view.dense_attention], 1)
    assert torch.allclose(dense_got, dense_expected, atol=ATOL)


@pytest.mark.parametrize("build, shape", [(small_vit, (2, 3, 32, 32)), (small_spt, (2, 3, 64, 64))])
def test_with_every_token_kept_the_packed_attention_is_the_dense_twins(build, shape) -> None:
    model = build(threshold=0.0, soft_gating="off")
    random_gates(model, seed=2)
    _, record, inputs = record_block_inputs(model, torch.randn(*shape))
    for layer in record.layers:
        height, width = layer.grid
        for row, column in [(0, 0), (height - 1, width - 1)]:
            view = inspect_token(model, record, inputs, layer.layer, 1, row, column)
            same = torch.isnan(view.spa_attention) == torch.isnan(view.dense_attention)
            assert same.all()
            seen = ~torch.isnan(view.dense_attention)
            assert torch.allclose(view.spa_attention[seen], view.dense_attention[seen], atol=ATOL)


def test_containers_limit_what_a_token_sees_and_unkept_tokens_show_their_source() -> None:
    model = small_vit(policy="container", container_len=6, unkept="refresh")
    random_gates(model, seed=3)
    _, record, inputs = record_block_inputs(model, torch.randn(2, 3, 32, 32))
    layer = record.layers[0]
    width = layer.grid[1]
    kept = layer.keep[0].nonzero().squeeze(1)
    view = inspect_token(model, record, inputs, layer.layer, 0, int(kept[0]) // width, int(kept[0]) % width)
    assert view.kept_elsewhere.any() and not (view.kept_elsewhere & view.visible).any()
    assert int(view.visible.sum()) + view.spa_prefix_attention.shape[1] <= 6
    sums = view.spa_attention.nan_to_num().sum(1) + view.spa_prefix_attention.sum(1)
    assert torch.allclose(sums, torch.ones_like(sums), atol=ATOL)

    dropped = int((~layer.keep[0]).nonzero()[0])
    view = inspect_token(model, record, inputs, layer.layer, 0, dropped // width, dropped % width)
    assert not view.kept and view.spa_attention is None and view.slot is None
    source = int(layer.refreshed_from[0, dropped])
    assert view.refreshed_from == divmod(source, width) and layer.keep[0, source]
    summary = view.summary()
    assert summary["kept"] is False and summary["saw_tokens"] == 0 and not math.isnan(summary["gate_logit"])


def test_out_of_range_requests_name_the_valid_range() -> None:
    model = small_vit()
    random_gates(model)
    _, record, inputs = record_block_inputs(model, torch.randn(2, 3, 32, 32))
    with pytest.raises(ValueError, match=r"outside the batch of 2 \(0-1\)"):
        inspect_token(model, record, inputs, record.layers[0].layer, 2, 0, 0)
    with pytest.raises(ValueError, match="grid"):
        inspect_token(model, record, inputs, record.layers[0].layer, 0, 99, 0)
    with pytest.raises(ValueError, match="SPA layers"):
        inspect_token(model, record, inputs, 0, 0, 0, 0)
