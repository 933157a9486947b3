import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.func import functional_call

import spa_viz
from spa_viz.layers.gate import select_tokens
from spa_viz.layers.packing import pack, plan_packing, unpack
from tests.conftest import tiny_vit


def test_straight_through_gradient_is_the_gumbel_sigmoid_gradient() -> None:
    """The forward value is the hard mask; the backward is exactly that of the noisy soft gate."""
    scores = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)
    values = torch.randn(2, 6, dtype=torch.float64)
    keep, multiplier = select_tokens(scores, training=True, generator=torch.Generator().manual_seed(3), min_keep=0)
    assert torch.equal(multiplier.detach(), keep.double())
    (grad_ste,) = torch.autograd.grad((multiplier * values).sum(), scores)

    u = torch.rand(scores.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64).clamp(1e-6, 1 - 1e-6)
    noisy = lambda s: torch.sigmoid(s + torch.log(u) - torch.log1p(-u))  # noqa: E731
    assert torch.autograd.gradcheck(lambda s: (noisy(s) * values).sum(), (scores,))
    (grad_soft,) = torch.autograd.grad((noisy(scores) * values).sum(), scores)
    assert torch.allclose(grad_ste, grad_soft)


def test_gradcheck_whole_spa_block_wrt_tokens_and_gate() -> None:
    model = spa_viz.patch(tiny_vit(depth=1, embed_dim=8, num_heads=2).double(), 0)
    block = model.blocks[0]
    torch.nn.init.normal_(block.gate.proj.weight, std=1.0)
    torch.nn.init.zeros_(block.gate.proj.bias)
    ctx = spa_viz.spa_context(model)
    x = torch.randn(2, 17, 8, dtype=torch.float64, requires_grad=True)

    def run(tokens: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.begin((4, 4))
        return functional_call(block, {"gate.proj.weight": weight}, (tokens,))

    with torch.no_grad():
        run(x, block.gate.proj.weight)
    keep = ctx.gates[0].keep
    assert 0 < int(keep.sum()) < keep.numel(), "the check must cover kept and dropped tokens"
    weight = block.gate.proj.weight.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(run, (x, weight), fast_mode=True)


@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(1, 5),
    grid=st.sampled_from([(1, 1), (2, 3), (4, 4), (7, 5)]),
    min_keep=st.integers(1, 3),
    scale=st.sampled_from([-50.0, 0.0, 50.0]),
    policy=st.sampled_from(["image", "container"]),
    seed=st.integers(0, 1000),
)
def test_selection_then_pack_unpack_is_identity(batch, grid, min_keep, scale, policy, seed) -> None:
    """Empty gates (all scores very negative), full gates and mixed ones, with min_keep."""
    gen = torch.Generator().manual_seed(seed)
    tokens = grid[0] * grid[1]
    scores = torch.randn(batch, tokens, generator=gen) * 3 + scale
    keep, _ = select_tokens(scores, min_keep=min_keep)
    assert torch.all(keep.sum(1) >= min(min_keep, tokens))
    x = torch.randn(batch, tokens, 4, generator=gen)
    plan = plan_packing(keep, policy, 5 if policy == "container" else None)
    out = unpack(pack(x, plan), plan, torch.zeros_like(x))
    assert torch.equal(out[keep], x[keep])
    assert torch.all(out[~keep] == 0)
