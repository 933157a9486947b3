import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import spa_viz
from spa_viz.analysis.flops import paper_dense_flops, paper_spa_flops
from tests.conftest import tiny_vit


def _measured(model, images) -> int:
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.no_grad():
        model.forward_features(images)
    return counter.get_total_flops()


def _randomize_gates(model) -> None:
    for block in spa_viz.spa_blocks(model):
        torch.nn.init.normal_(block.gate.proj.weight, std=1.0)
        torch.nn.init.zeros_(block.gate.proj.bias)


def test_dense_count_matches_torch_flop_counter() -> None:
    model = tiny_vit(embed_dim=64, depth=3, num_heads=4)
    images = torch.randn(2, 3, 32, 32)
    expected = _measured(model, images)
    spa_viz.patch(model, 1, threshold=0.0)
    _, tr = spa_viz.trace(model, images)
    assert tr.backbone_flops_dense == pytest.approx(expected, rel=0.02)


@pytest.mark.parametrize("policy, row_len, backend", [("image", None, "sdpa"), ("container", 7, "sdpa"), ("container", 7, "reference")])
@pytest.mark.parametrize("sparse_mlp", [True, False])
def test_packed_count_matches_torch_flop_counter(policy, row_len, backend, sparse_mlp) -> None:
    model = spa_viz.patch(
        tiny_vit(embed_dim=64, depth=3, num_heads=4), 1, policy=policy, container_len=row_len, backend=backend, sparse_mlp=sparse_mlp
    )
    _randomize_gates(model)
    images = torch.randn(3, 3, 32, 32)
    _, tr = spa_viz.trace(model, images)
    assert 0.0 < tr.mean_keep_ratio < 1.0
    assert tr.backbone_flops_run == pytest.approx(_measured(model, images), rel=0.02)
    assert tr.backbone_flops_run < tr.backbone_flops_dense


def test_per_image_run_flops_add_up_with_padding() -> None:
    model = spa_viz.patch(tiny_vit(), 0, policy="container", container_len=5)
    _randomize_gates(model)
    _, tr = spa_viz.trace(model, torch.randn(4, 3, 32, 32))
    for layer in tr.layers:
        flops = layer.flops
        assert flops.run == int(flops.per_image_run.sum()) + flops.padding
        assert flops.padding >= 0
        assert flops.dense == flops.per_image_dense * 4


def test_paper_formulas() -> None:
    assert paper_dense_flops(196, 384) == 4 * 196 * 384**2 + 2 * 196**2 * 384
    assert paper_spa_flops(196, 384, rows=2, row_len=49) == 196 * 384 + 196 * 384**2 + 2 * (3 * 49 * 384**2 + 2 * 49**2 * 384)


def test_selector_scoring_cost_is_counted() -> None:
    """A training-free selector's own scoring MACs enter the run FLOPs (the learned gate's do too)."""
    import timm

    import spa_viz
    from spa_viz.selection.selectors import install_selector

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=64, depth=3).eval()
    spa_viz.patch(model, start_layer=1)
    images = torch.randn(2, 3, 64, 64)
    install_selector(model, "random")
    _, free = spa_viz.trace(model, images)
    install_selector(model, "feature_norm")
    _, costly = spa_viz.trace(model, images)
    assert [int(layer.kept_counts.sum()) for layer in costly.layers] == [int(layer.kept_counts.sum()) for layer in free.layers]
    dim, tokens = model.embed_dim, images.shape[0] * (1 + 4 * 4)
    scoring = sum(2 * dim * tokens for _ in costly.layers)  # feature_norm: one pass over C per token
    assert costly.backbone_flops_run - free.backbone_flops_run == scoring
