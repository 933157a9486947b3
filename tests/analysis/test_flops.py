import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import spa_viz
from spa_viz.analysis.flops import paper_dense_macs, paper_spa_macs
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


@pytest.mark.parametrize(
    "policy, row_len, backend", [("image", None, "sdpa"), ("container", 7, "sdpa"), ("container", 7, "reference")]
)
@pytest.mark.parametrize("sparse_mlp", [True, False])
def test_packed_count_matches_torch_flop_counter(policy, row_len, backend, sparse_mlp) -> None:
    model = spa_viz.patch(
        tiny_vit(embed_dim=64, depth=3, num_heads=4),
        1,
        policy=policy,
        container_len=row_len,
        backend=backend,
        sparse_mlp=sparse_mlp,
    )
    _randomize_gates(model)
    images = torch.randn(3, 3, 32, 32)
    _, tr = spa_viz.trace(model, images)
    assert 0.0 < tr.mean_keep_ratio < 1.0
    assert tr.backbone_flops_run == pytest.approx(_measured(model, images), rel=0.02)
    assert tr.backbone_flops_run < tr.backbone_flops_dense


def test_per_image_run_macs_add_up_with_padding() -> None:
    model = spa_viz.patch(tiny_vit(), 0, policy="container", container_len=5)
    _randomize_gates(model)
    _, tr = spa_viz.trace(model, torch.randn(4, 3, 32, 32))
    for layer in tr.layers:
        cost = layer.cost
        assert cost.macs_run == int(cost.per_image_macs_run.sum()) + cost.padding_macs
        assert cost.padding_macs >= 0
        assert cost.macs_dense == cost.per_image_macs_dense * 4
        assert cost.flops_run == 2 * cost.macs_run and cost.flops_dense == 2 * cost.macs_dense


def test_units_are_named_and_flops_are_twice_the_macs() -> None:
    model = spa_viz.patch(tiny_vit(), 1)
    _randomize_gates(model)
    _, tr = spa_viz.trace(model, torch.randn(2, 3, 32, 32))
    summary = tr.summary()
    assert summary["backbone_flops_dense"] == 2 * summary["backbone_macs_dense"]
    assert summary["backbone_flops_run"] == 2 * summary["backbone_macs_run"]
    assert "multiply-adds" in summary["units"]
    for layer in summary["layers"]:
        assert layer["flops_run"] == 2 * layer["macs_run"]


def test_conv_stem_embedding_is_counted() -> None:
    """A convolutional patch embedding (conv stem) enters the static count by its real convolutions."""
    from spa_viz.analysis.flops import embed_macs
    from spa_viz.models.detection import ConvStemEmbed

    embed = ConvStemEmbed(img_size=32, patch_size=8, in_chans=3, embed_dim=16, channels=(4, 8, 16))
    expected = 16 * 16 * 4 * 3 * 9 + 8 * 8 * 8 * 4 * 9 + 4 * 4 * 16 * 8 * 9 + 4 * 4 * 16 * 16
    assert embed_macs(embed, (32, 32)) == expected
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.no_grad():
        embed.eval()(torch.zeros(1, 3, 32, 32))
    assert 2 * expected == counter.get_total_flops()


def test_paper_formulas() -> None:
    assert paper_dense_macs(196, 384) == 4 * 196 * 384**2 + 2 * 196**2 * 384
    assert paper_spa_macs(196, 384, rows=2, row_len=49) == 196 * 384 + 196 * 384**2 + 2 * (
        3 * 49 * 384**2 + 2 * 49**2 * 384
    )


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
    assert [int(layer.kept_counts.sum()) for layer in costly.layers] == [
        int(layer.kept_counts.sum()) for layer in free.layers
    ]
    dim, tokens = model.embed_dim, images.shape[0] * (1 + 4 * 4)
    scoring = sum(2 * dim * tokens for _ in costly.layers)  # feature_norm: one pass over C per token
    assert costly.backbone_flops_run - free.backbone_flops_run == scoring
