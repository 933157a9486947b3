"""Multi-head self-attention over packed rows, restricted to same-image tokens.

The projections are those of an existing timm ``Attention`` module (``qkv``, ``q_norm``,
``k_norm``, ``norm``, optional ``gate``, ``proj``), so a patched model keeps its weights. Only
the attention kernel changes, through one of these backends:

* ``sdpa``: ``F.scaled_dot_product_attention`` on the packed rows. Forward and backward on CPU and
  CUDA; the default. A row holding one image's tokens runs without a mask (the fast kernel); rows
  that mix images get the block mask, or, when the batch has at most ``SEGMENT_LOOP_MAX``
  same-image runs (small batches), one unmasked call per run, which is faster on CPU than one
  masked call (reported as ``sdpa_runs``).
* ``flex``: FlexAttention with a block mask built from the plan. Backward needs CUDA.
* ``varlen``: ``torch.nn.attention.varlen.varlen_attn`` over the same-image runs, no padding
  computed at all. CUDA only, half precision (fp32 inputs are cast to bf16 and back).
* ``reference``: a plain loop over (row, image) runs; slow, exact, used by the tests.

An optional additive ``attn_bias`` (e.g. Swin's relative position bias and shifted-window mask, as
SPT uses) is added to the scores on top of the same-image mask; ``sdpa`` and ``reference`` take it.
"""

from __future__ import annotations

import logging
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from spa_viz.layers.packing import PackPlan

__all__ = ["BACKENDS", "resolve_backend", "packed_attention", "check_attention_module"]

BACKENDS = ("auto", "sdpa", "flex", "varlen", "reference")
SEGMENT_LOOP_MAX = 8
"""Most same-image runs for which ``sdpa`` loops over runs instead of building a block mask."""
_HALF = (torch.float16, torch.bfloat16)
_log = logging.getLogger(__name__)


def _varlen_available() -> bool:
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def resolve_backend(requested: str, device: torch.device, dtype: torch.dtype, needs_grad: bool) -> str:
    """The backend that will run for this device, dtype and grad mode; ValueError if impossible."""
    if requested not in BACKENDS:
        raise ValueError(f"unknown attention backend {requested!r}; choose one of {BACKENDS}")
    if requested == "auto":
        if device.type == "cuda" and dtype in _HALF and _varlen_available():
            return "varlen"
        return "sdpa"
    if requested == "varlen" and (device.type != "cuda" or not _varlen_available()):
        raise ValueError("the varlen backend needs a CUDA device; use backend='sdpa' on this device")
    if requested == "flex" and needs_grad and device.type != "cuda":
        raise ValueError(
            "FlexAttention has no backward on CPU; use backend='sdpa' for training on CPU "
            "(flex works here for inference under torch.no_grad())"
        )
    return requested


def check_attention_module(attn: nn.Module) -> None:
    """Raise ValueError unless ``attn`` looks like timm's standard ``Attention``."""
    needed = ("qkv", "proj", "num_heads")
    missing = [name for name in needed if not hasattr(attn, name)]
    if missing:
        raise ValueError(
            f"{type(attn).__name__} lacks {missing}: SPA needs timm's standard Attention "
            "(fused qkv projection); rotary or windowed attention modules are not supported here"
        )


def _sdpa(q: Tensor, k: Tensor, v: Tensor, plan: PackPlan, scale: float, dropout: float, bias: Tensor | None) -> tuple[Tensor, str]:
    """Packed SDPA: unmasked on single-image rows, per run for few mixed runs, else block-masked."""
    if not plan.mixed_rows and not plan.has_padding:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout, scale=scale), "sdpa"
    segments = plan.segments
    if plan.mixed_rows and segments.shape[0] <= SEGMENT_LOOP_MAX:
        return _sdpa_runs(q, k, v, segments, scale, dropout, bias), "sdpa_runs"
    mask = plan.attention_mask
    if bias is not None:
        mask = torch.where(mask, bias.to(q.dtype), float("-inf"))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scale), "sdpa"


def _sdpa_runs(q: Tensor, k: Tensor, v: Tensor, segments: Tensor, scale: float, dropout: float, bias: Tensor | None) -> Tensor:
    """One unmasked SDPA call per same-image run (row, start, length); padding outputs stay zero."""
    out = torch.zeros_like(q)
    for row, start, size, _ in segments.tolist():
        part = slice(start, start + size)
        run_bias = None
        if bias is not None:
            run_bias = bias[row if bias.shape[0] > 1 else 0, :, part, part].unsqueeze(0)
        out[row : row + 1, :, part] = F.scaled_dot_product_attention(
            q[row : row + 1, :, part], k[row : row + 1, :, part], v[row : row + 1, :, part],
            attn_mask=run_bias, dropout_p=dropout, scale=scale,
        )
    return out


def _flex(q: Tensor, k: Tensor, v: Tensor, plan: PackPlan, scale: float) -> Tensor:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    seg = plan.slot_image

    def same_image(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return seg[b, q_idx] == seg[b, kv_idx]

    rows, _, length, _ = q.shape
    block_mask = create_block_mask(same_image, rows, None, length, length, device=q.device)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        return flex_attention(q, k, v, block_mask=block_mask, scale=scale)


def _cumulative_runs(plan: PackPlan, device: torch.device) -> tuple[Tensor, int]:
    """Cumulative same-image run lengths (int32) over the valid slots, and the longest run."""
    lengths = plan.segments[:, 2]
    cu = torch.zeros(lengths.numel() + 1, dtype=torch.int32, device=device)
    cu[1:] = torch.cumsum(lengths, 0).to(torch.int32)
    return cu, int(lengths.max())


def _varlen(q: Tensor, k: Tensor, v: Tensor, plan: PackPlan, scale: float) -> Tensor:
    from torch.nn.attention.varlen import varlen_attn

    rows, heads, length, head_dim = q.shape
    dtype = q.dtype
    work = dtype if dtype in _HALF else torch.bfloat16
    if work != dtype:
        _log.debug("varlen attention runs in bf16; casting %s inputs", dtype)

    def flat(t: Tensor) -> Tensor:
        t = t.transpose(1, 2).reshape(rows * length, heads, head_dim)
        return t.index_select(0, plan.valid_slots).to(work).contiguous()

    cu, longest = _cumulative_runs(plan, q.device)
    out = varlen_attn(flat(q), flat(k), flat(v), cu, cu, longest, longest, scale=scale)
    full = out.new_zeros(rows * length, heads, head_dim).index_copy(0, plan.valid_slots, out)
    return full.view(rows, length, heads, head_dim).transpose(1, 2).to(dtype)


def _reference(q: Tensor, k: Tensor, v: Tensor, plan: PackPlan, scale: float, bias: Tensor | None) -> Tensor:
    rows, heads, length, head_dim = q.shape
    if bias is not None:
        bias = torch.broadcast_to(bias.to(q.dtype), (rows, heads, length, length))
    pieces, slots = [], []
    for row, start, size, _ in plan.segments.tolist():
        sl = slice(start, start + size)
        logits = q[row, :, sl] @ k[row, :, sl].transpose(-2, -1) * scale
        if bias is not None:
            logits = logits + bias[row, :, sl, sl]
        weights = logits.softmax(-1)
        pieces.append((weights @ v[row, :, sl]).transpose(0, 1))
        slots.append(torch.arange(row * length + start, row * length + start + size, device=q.device))
    out = q.new_zeros(rows * length, heads, head_dim)
    out = out.index_copy(0, torch.cat(slots), torch.cat(pieces))
    return out.view(rows, length, heads, head_dim).transpose(1, 2)


def packed_attention(
    attn: nn.Module, x: Tensor, plan: PackPlan, backend: str = "auto", *, attn_bias: Tensor | None = None
) -> tuple[Tensor, str]:
    """Run ``attn``'s projections on packed rows ``x`` (B', L, C) with same-image attention.

    ``attn_bias``: optional additive float bias broadcastable to (B', heads, L, L), added to the
    scaled scores in addition to the same-image mask (``sdpa`` and ``reference`` only; ``auto``
    then picks ``sdpa``).
    Returns the output (B', L, C_out) and the name of the backend that ran.
    """
    rows, length, _ = x.shape
    heads = attn.num_heads
    head_dim = getattr(attn, "head_dim", attn.qkv.out_features // (3 * heads))
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    qkv = attn.qkv(x).reshape(rows, length, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    scale = getattr(attn, "scale", head_dim**-0.5)
    dropout = attn.attn_drop.p if attn.training and hasattr(attn, "attn_drop") else 0.0
    if attn_bias is not None and backend == "auto":
        backend = "sdpa"
    chosen = resolve_backend(backend, x.device, q.dtype, torch.is_grad_enabled() and x.requires_grad)
    if attn_bias is not None and chosen in ("flex", "varlen"):
        raise ValueError(f"the {chosen} backend takes no attn_bias; use backend='sdpa' or 'reference'")
    if chosen == "sdpa":
        out, chosen = _sdpa(q, k, v, plan, scale, dropout, attn_bias)
    elif chosen == "flex":
        out = _flex(q, k, v, plan, scale)
    elif chosen == "varlen":
        out = _varlen(q, k, v, plan, scale)
    else:
        out = _reference(q, k, v, plan, scale, attn_bias)
    out = out.transpose(1, 2).reshape(rows, length, heads * head_dim)
    out = attn.norm(out) if hasattr(attn, "norm") else out
    if gate is not None:
        out = out * gate
    out = attn.proj(out)
    if hasattr(attn, "proj_drop"):
        out = attn.proj_drop(out)
    return out, chosen
