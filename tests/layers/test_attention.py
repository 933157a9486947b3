import pytest
import torch
from timm.layers import Attention

from spa_viz.layers.attention import BACKENDS, packed_attention, resolve_backend
from spa_viz.layers.packing import gather_kept, plan_packing, scatter_kept

CPU_BACKENDS = ["sdpa", "flex", "reference"]


def _setup(policy: str, row_len: int | None, qk_norm: bool = False):
    torch.manual_seed(0)
    attn = Attention(32, num_heads=4, qkv_bias=True, qk_norm=qk_norm, norm_layer=torch.nn.LayerNorm).eval()
    x = torch.randn(5, 23, 32)
    keep = torch.rand(5, 23) < torch.tensor([0.1, 0.5, 0.9, 0.3, 1.0])[:, None]
    keep[0] = False
    keep[0, 7] = True  # an image with a single kept token
    return attn, x, keep, plan_packing(keep, policy, row_len)


def _per_image_reference(attn, x, keep) -> torch.Tensor:
    """Plain timm attention on each image's kept tokens alone."""
    out = torch.zeros_like(x)
    for image in range(x.shape[0]):
        idx = keep[image].nonzero().squeeze(1)
        out[image, idx] = attn(x[image, idx][None])[0]
    return out


def _per_container_reference(attn, x, plan) -> torch.Tensor:
    """timm attention on each (container, image) group of tokens alone."""
    out = torch.zeros_like(x)
    for row, start, size, image in plan.segments.tolist():
        tokens = plan.slot_token[row, start : start + size]
        out[image, tokens] = attn(x[image, tokens][None])[0]
    return out


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("qk_norm", [False, True])
def test_image_policy_backends_match_per_image_attention(backend: str, qk_norm: bool) -> None:
    attn, x, keep, plan = _setup("image", None, qk_norm)
    with torch.no_grad():
        packed, ran = packed_attention(attn, gather_kept(x, plan), plan, backend)
        out = scatter_kept(packed, plan, torch.zeros_like(x))
        ref = _per_image_reference(attn, x, keep)
    assert ran == ("sdpa_runs" if backend == "sdpa" else backend), "5 same-image runs: sdpa loops over them"
    assert torch.allclose(out[keep], ref[keep], atol=1e-5)


@pytest.mark.parametrize("policy, row_len", [("image", None), ("container", 7), ("container", 23)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_sdpa_paths_agree(monkeypatch, policy: str, row_len: int | None, with_bias: bool) -> None:
    """The unmasked per-run loop, the block-masked call and the reference loop give the same output."""
    import spa_viz.layers.attention as attention

    attn, x, keep, plan = _setup(policy, row_len)
    bias = torch.randn(plan.num_rows, 4, plan.row_len, plan.row_len) if with_bias else None
    outputs = {}
    with torch.no_grad():
        for loop_max, name in ((1000, "sdpa_runs"), (0, "sdpa")):
            monkeypatch.setattr(attention, "SEGMENT_LOOP_MAX", loop_max)
            out, ran = packed_attention(attn, gather_kept(x, plan), plan, "sdpa", attn_bias=bias)
            assert ran == name
            outputs[name] = scatter_kept(out, plan, torch.zeros_like(x))
        ref, _ = packed_attention(attn, gather_kept(x, plan), plan, "reference", attn_bias=bias)
        ref = scatter_kept(ref, plan, torch.zeros_like(x))
    assert torch.allclose(outputs["sdpa_runs"][keep], ref[keep], atol=1e-5)
    assert torch.allclose(outputs["sdpa"][keep], ref[keep], atol=1e-5)


def test_single_image_rows_need_no_mask() -> None:
    keep = torch.rand(1, 30) < 0.5
    keep[0, 0] = True
    plan = plan_packing(keep, "image")
    assert not plan.mixed_rows and not plan.has_padding and plan.attention_mask is None
    plan = plan_packing(keep, "image", row_len=40)
    assert not plan.mixed_rows and plan.has_padding and plan.attention_mask.shape == (1, 1, 1, 40)
    two = plan_packing(torch.ones(2, 6, dtype=torch.bool), "container", 6)
    assert not two.mixed_rows and not two.has_padding and two.attention_mask is None
    shared = plan_packing(torch.ones(2, 6, dtype=torch.bool), "container", 4)
    assert shared.mixed_rows and shared.attention_mask.shape == (3, 1, 4, 4)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("row_len", [4, 16, 49])
def test_container_policy_backends_match_per_container_attention(backend: str, row_len: int) -> None:
    attn, x, keep, plan = _setup("container", row_len)
    with torch.no_grad():
        packed, _ = packed_attention(attn, gather_kept(x, plan), plan, backend)
        out = scatter_kept(packed, plan, torch.zeros_like(x))
        ref = _per_container_reference(attn, x, plan)
    assert torch.allclose(out[keep], ref[keep], atol=1e-5)
    if row_len == 4:
        # containers split images, so this is NOT global per-image attention
        assert not torch.allclose(out[keep], _per_image_reference(attn, x, keep)[keep], atol=1e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="varlen attention is CUDA-only; no GPU here")
def test_varlen_matches_reference_on_cuda() -> None:
    attn, x, keep, plan = _setup("container", 16)
    attn, x, plan = attn.cuda().half(), x.cuda().half(), plan.to("cuda")
    with torch.no_grad():
        fast, ran = packed_attention(attn, gather_kept(x, plan), plan, "varlen")
        ref, _ = packed_attention(attn, gather_kept(x, plan), plan, "reference")
    assert ran == "varlen"
    assert torch.allclose(fast, ref, atol=2e-3)


def test_gradcheck_through_gather_attention_scatter() -> None:
    torch.manual_seed(0)
    attn = Attention(8, num_heads=2).double().eval()
    keep = torch.tensor([[True, False, True, True, False], [False, True, True, False, False]])
    plan = plan_packing(keep, "container", row_len=3)
    x = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)

    def run(inp: torch.Tensor) -> torch.Tensor:
        out, _ = packed_attention(attn, gather_kept(inp, plan), plan, "sdpa")
        return scatter_kept(out, plan, inp)

    assert torch.autograd.gradcheck(run, (x,))


def test_sdpa_backward_matches_reference_backward() -> None:
    attn, x, keep, plan = _setup("image", None)
    grads = []
    for backend in ("sdpa", "reference"):
        inp = x.clone().requires_grad_(True)
        out, _ = packed_attention(attn, gather_kept(inp, plan), plan, backend)
        (scatter_kept(out, plan, torch.zeros_like(inp)) ** 2).sum().backward()
        grads.append(inp.grad)
    assert torch.allclose(grads[0], grads[1], atol=1e-5)


def test_backend_resolution() -> None:
    cpu = torch.device("cpu")
    assert resolve_backend("auto", cpu, torch.float32, True) == "sdpa"
    assert resolve_backend("flex", cpu, torch.float32, False) == "flex"
    with pytest.raises(ValueError, match="no backward on CPU"):
        resolve_backend("flex", cpu, torch.float32, True)
    with pytest.raises(ValueError, match="needs a CUDA device"):
        resolve_backend("varlen", cpu, torch.float16, False)
    with pytest.raises(ValueError, match="unknown attention backend"):
        resolve_backend("xformers", cpu, torch.float32, False)
    assert set(CPU_BACKENDS) < set(BACKENDS)
