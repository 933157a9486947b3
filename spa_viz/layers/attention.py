"""Multi-head self-attention over the packed kept tokens, restricted to same-image tokens.

The kept tokens arrive *flat*: (n, C), the non-padding slots of a :class:`PackPlan` in slot order
(:func:`~spa_viz.layers.packing.gather_kept`). Projections (and, in the block, the MLP) run on these
n tokens only, so container padding costs nothing there; only the attention kernel sees the rows.
The projections are those of an existing timm ``Attention`` module (``qkv``, ``q_norm``,
``k_norm``, ``norm``, optional ``gate``, ``proj``), so a patched model keeps its weights. The
kernel is one of these backends:

* ``sdpa``: ``F.scaled_dot_product_attention``. Forward and backward on CPU and CUDA; the default.
  Where the batch has at most ``SEGMENT_LOOP_MAX`` same-image runs (small batches), it runs one
  unmasked call per run on the flat tokens (reported as ``sdpa_runs``: no mask, no padding, the
  fast kernel); otherwise it scatters the tokens into the plan's padded rows and runs one call with
  the block mask, or with none where every row is one image without padding (reported as ``sdpa``).
* ``flex``: FlexAttention on the padded rows with a block mask built from the plan. Backward needs CUDA.
* ``varlen``: ``torch.nn.attention.varlen.varlen_attn`` over the same-image runs of the flat
  tokens. CUDA only, half precision (fp32 inputs are cast to bf16 and back).
* ``reference``: a plain loop over the runs; slow, exact, used by the tests.

An optional additive ``attn_bias`` (B', heads, L, L) over the plan's slots (e.g. Swin's relative
position bias and shifted-window mask, as SPT uses) is added to the scores on top of the same-image
mask; ``sdpa`` and ``reference`` take it.
"""

from __future__ import annotations

import logging
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from spa_viz.layers.packing import PackPlan, from_rows, to_rows

__all__ = [
    "BACKENDS",
    "SEGMENT_LOOP_MAX",
    "attention_weights",
    "check_attention_module",
    "packed_attention",
    "resolve_backend",
]

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


def _run_bias(bias: Tensor | None, row: int, start: int, size: int) -> Tensor | None:
    """The (1, heads, size, size) block of a slot bias for one run."""
    if bias is None:
        return None
    part = slice(start, start + size)
    return bias[row if bias.shape[0] > 1 else 0, :, part, part].unsqueeze(0)


def _sdpa_runs(
    q: Tensor, k: Tensor, v: Tensor, plan: PackPlan, scale: float, dropout: float, bias: Tensor | None
) -> Tensor:
    """One unmasked SDPA call per same-image run of the flat (n, heads, d) tokens."""
    runs = plan.runs
    if len(runs) == 1 and bias is None:
        heads_first = [t.transpose(0, 1).unsqueeze(0) for t in (q, k, v)]
        return F.scaled_dot_product_attention(*heads_first, dropout_p=dropout, scale=scale)[0].transpose(0, 1)
    out = torch.empty_like(q)
    for flat, row, start, size, _ in runs:
        part = slice(flat, flat + size)
        heads_first = [t[part].transpose(0, 1).unsqueeze(0) for t in (q, k, v)]
        attended = F.scaled_dot_product_attention(
            *heads_first, attn_mask=_run_bias(bias, row, start, size), dropout_p=dropout, scale=scale
        )
        out[part] = attended[0].transpose(0, 1)
    return out


def _to_rows(t: Tensor, plan: PackPlan) -> Tensor:
    """Flat (n, heads, d) tokens -> padded rows (B', heads, L, d) (padding zero)."""
    return to_rows(t, plan).transpose(1, 2)


def _from_rows(t: Tensor, plan: PackPlan) -> Tensor:
    """Padded rows (B', heads, L, d) -> flat (n, heads, d) tokens."""
    return from_rows(t.transpose(1, 2), plan)


def _sdpa_rows(
    q: Tensor, k: Tensor, v: Tensor, plan: PackPlan, scale: float, dropout: float, bias: Tensor | None
) -> Tensor:
    """One block-masked SDPA call over the plan's padded rows."""
    mask = plan.attention_mask
    if bias is not None:
        mask = bias.to(q.dtype) if mask is None else torch.where(mask, bias.to(q.dtype), float("-inf"))
    out = F.scaled_dot_product_attention(
        _to_rows(q, plan), _to_rows(k, plan), _to_rows(v, plan), attn_mask=mask, dropout_p=dropout, scale=scale
    )
    return _from_rows(out, plan)


def _flex(q: Tensor, k: Tensor, v: Tensor, plan: PackPlan, scale: float) -> Tensor:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    seg = plan.slot_image

    def same_image(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return seg[b, q_idx] == seg[b, kv_idx]

    rows = plan.num_rows
    length = plan.row_len
    block_mask = create_block_mask(same_image, rows, None, length, length, device=q.device)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        out = flex_attention(
            _to_rows(q, plan), _to_rows(k, plan), _to_rows(v, plan), block_mask=block_mask, scale=scale
        )
    return _from_rows(out, plan)


def _varlen(q: Tensor, k: Tensor, v: Tensor, plan: PackPlan, scale: float) -> Tensor:
    from torch.nn.attention.varlen import varlen_attn

    dtype = q.dtype
    work = dtype if dtype in _HALF else torch.bfloat16
    if work != dtype:
        _log.debug("varlen attention runs in bf16; casting %s inputs", dtype)
    lengths = [size for _, _, _, size, _ in plan.runs]
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32, device=q.device)
    cu[1:] = torch.tensor(lengths, device=q.device).cumsum(0).to(torch.int32)
    longest = max(lengths)
    out = varlen_attn(*(t.to(work).contiguous() for t in (q, k, v)), cu, cu, longest, longest, scale=scale)
    return out.to(dtype)


def _reference(q: Tensor, k: Tensor, v: Tensor, plan: PackPlan, scale: float, bias: Tensor | None) -> Tensor:
    out = torch.empty_like(q)
    for flat, row, start, size, _ in plan.runs:
        part = slice(flat, flat + size)
        qs, ks, vs = (t[part].transpose(0, 1) for t in (q, k, v))  # (heads, size, d)
        logits = qs @ ks.transpose(-2, -1) * scale
        run_bias = _run_bias(bias, row, start, size)
        if run_bias is not None:
            logits = logits + run_bias[0].to(q.dtype)
        out[part] = (logits.softmax(-1) @ vs).transpose(0, 1)
    return out


def packed_attention(
    attn: nn.Module, x: Tensor, plan: PackPlan, backend: str = "auto", *, attn_bias: Tensor | None = None
) -> tuple[Tensor, str]:
    """Run ``attn``'s projections on the flat kept tokens ``x`` (n, C) with same-image attention.

    ``attn_bias``: optional additive float bias broadcastable to (B', heads, L, L) over the plan's
    slots, added to the scaled scores in addition to the same-image mask (``sdpa`` and ``reference``
    only; ``auto`` then picks ``sdpa``).
    Returns the output (n, C_out) and the name of the kernel that ran (``sdpa_runs``, ``sdpa``,
    ``flex``, ``varlen`` or ``reference``).
    """
    tokens = x.shape[0]
    if tokens != plan.num_kept:
        raise ValueError(f"x holds {tokens} tokens but the plan keeps {plan.num_kept}; pass gather_kept(x, plan)")
    heads = attn.num_heads
    head_dim = getattr(attn, "head_dim", attn.qkv.out_features // (3 * heads))
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    q, k, v = attn.qkv(x).view(tokens, 3, heads, head_dim).unbind(1)
    q, k = attn.q_norm(q), attn.k_norm(k)
    scale = getattr(attn, "scale", head_dim**-0.5)
    dropout = attn.attn_drop.p if attn.training and hasattr(attn, "attn_drop") else 0.0
    if attn_bias is not None and backend == "auto":
        backend = "sdpa"
    chosen = resolve_backend(backend, x.device, q.dtype, torch.is_grad_enabled() and x.requires_grad)
    if attn_bias is not None and chosen in ("flex", "varlen"):
        raise ValueError(f"the {chosen} backend takes no attn_bias; use backend='sdpa' or 'reference'")
    if chosen == "sdpa":
        if len(plan.runs) <= SEGMENT_LOOP_MAX:
            out, chosen = _sdpa_runs(q, k, v, plan, scale, dropout, attn_bias), "sdpa_runs"
        else:
            out = _sdpa_rows(q, k, v, plan, scale, dropout, attn_bias)
    elif chosen == "flex":
        out = _flex(q, k, v, plan, scale)
    elif chosen == "varlen":
        out = _varlen(q, k, v, plan, scale)
    else:
        out = _reference(q, k, v, plan, scale, attn_bias)
    out = out.reshape(tokens, heads * head_dim)
    out = attn.norm(out) if hasattr(attn, "norm") else out
    if gate is not None:
        out = out * gate
    out = attn.proj(out)
    if hasattr(attn, "proj_drop"):
        out = attn.proj_drop(out)
    return out, chosen


def attention_weights(
    attn: nn.Module, tokens: Tensor, query: int, bias: Tensor | None = None, window: slice | None = None
) -> Tensor:
    """(heads, m) softmax attention weights of token ``query`` over the m tokens in ``window`` of ``tokens``
    (n, C; None: all), the normalised tokens one attention call saw together (``window``: the run of
    the packed tokens ``tokens`` that call saw), computed with ``attn``'s own projections and scale;
    ``bias`` (heads, m, m) is the additive bias that call added (e.g. Swin's relative positions)."""
    heads = attn.num_heads
    head_dim = getattr(attn, "head_dim", attn.qkv.out_features // (3 * heads))
    q, k, _ = attn.qkv(tokens).view(tokens.shape[0], 3, heads, head_dim).unbind(1)
    if window is not None:
        q, k, query = q[window], k[window], query - (window.start or 0)
    q, k = attn.q_norm(q[query : query + 1]), attn.k_norm(k)
    logits = torch.einsum("qhd,khd->hk", q, k) * getattr(attn, "scale", head_dim**-0.5)
    if bias is not None:
        logits = logits + bias[:, query].to(logits.dtype)
    return logits.float().softmax(-1)
