"""The SPA kernel: gate -> fuse -> select -> pack -> attend -> unpack, shared by every backbone.

:func:`spa_block_forward` is the one SPA block forward. A backbone plugs into it through a
:class:`TokenLayout`: how the kept tokens are ordered into packed rows and what attention adds on
top of the same-image mask. A plain ViT uses :class:`RasterLayout` (raster order, global attention);
SPT uses its window layout (Swin window order, relative position bias, shifted-window mask).

The kept tokens run *flat*, (n, C) in slot order (:func:`~spa_viz.layers.packing.gather_kept`):
norms, projections and the MLP see no padding; only the attention kernel uses the plan's rows.
Per kept token, with ``m`` the gate factor (below)::

    x' = x  + m * drop_path(ls1(attn(norm1(x))))        attention among kept tokens only
    y  = x' + m * drop_path(ls2(mlp(norm2(x'))))         with sparse_mlp (default): kept tokens only

**[ours]** The gate factor ``m`` scales the *branch outputs*: a LayerNorm follows the block input,
so a per-token scale of the input (where the paper writes ``sigmoid(s) * r``) would be normalised
away and the task loss would never reach the gate. ``m`` is ``sigmoid(s)`` while soft gating is
active (``SPAConfig.soft_gating``: ``"always"``, ``"train"`` = training only, ``"off"``), times the
straight-through multiplier of the Gumbel-sigmoid in training (value 1, gradient of the noisy soft
gate); otherwise ``m = 1``. ``"gradient"`` **[ours]** uses ``1 + sigmoid(s) - sg(sigmoid(s))`` in
training (``sg``: no gradient) and 1 in evaluation: the value of no soft gating, the gradient of
soft gating, so the task loss reaches the gate without a train/evaluation mismatch. With ``sparse_mlp=False`` the MLP runs on every token and is not gated.

What an *unkept* token becomes is ``SPAConfig.unkept`` (``u`` is its own gate factor, ``sigmoid(s)``
while soft gating is active, else 1; no straight-through term, the token's path is fixed by the
mask)::

    copy      y = x                                   passes unchanged (v1-v2)
    paper     y = x + u * ls1(W_o(norm1(x)))          the output projection of its own token
    refresh   y = x + u * (y_j - x_j)                 the update of the most similar kept token j

``paper`` **[ours]** is our reading of the paper's equations: ``r_g = sigmoid(s) * r`` is defined
for every token and its cost formula charges the gate and the output projection ``W_o`` to all N
tokens, Q/K/V and the attention product to the packed ones only. With no Q/K/V an unkept token's
attention branch is ``W_o`` of its (normalised) token, scaled on the output like the kept tokens'
branches; unkept tokens skip the MLP (the paper is silent; its cost formula covers attention only).
``refresh`` **[ours]**, after ToMe's unmerge for dense outputs, Expedite's reconstruction and
SViT's reactivation: ``j`` is the kept patch token of the same image whose block input is most
similar by cosine, so an unkept token stays current at the cost of one similarity look-up
(``N x K_max x C`` multiply-adds per image, ``K_max`` the batch's largest kept count). With
``paper`` and ``refresh`` the task loss reaches every gate logit through ``u``; with ``copy`` an
unkept token's logit gets none. Every path keeps the invariant: all tokens kept and soft gating off
is the dense twin.

``block.gate`` is a learned :class:`~spa_viz.layers.gate.TokenGate` or a training-free selector;
both follow one protocol: ``gate(tokens, num_prefix) -> (B, N) scores`` on the block input, a
``learned`` flag (learned logits are fused, soft-gated and supervised by ``L_select``; selector
scores are not), a ``name``, ``macs_per_token`` (scoring cost), and for selectors
``select(scores, config) -> keep``.

The blocks of one model share an :class:`SPAContext`: the per-forward state (the token grid, the
fusion state, every gate's raw logit for ``L_select``, the last pack plan for reuse) and, while
tracing, a :class:`BlockDecision` per block.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from spa_viz.layers.attention import packed_attention
from spa_viz.layers.config import SPAConfig
from spa_viz.layers.gate import ensure_min_keep, fuse_scores, gumbel_keep, pool_scores, straight_through
from spa_viz.layers.packing import PackPlan, gather_kept, plan_packing, scatter_kept

__all__ = [
    "BlockCosts",
    "BlockDecision",
    "GateOutput",
    "RasterLayout",
    "SPABlockMixin",
    "SPAContext",
    "TokenLayout",
    "convert_block",
    "nearest_kept",
    "find_backbone",
    "find_context",
    "drop_path_scale",
    "packed_drop_path",
    "spa_block_forward",
    "spa_blocks",
]

Grid = tuple[int, int]


def _extra_macs(module: nn.Module) -> int:
    """Multiply-adds per token a linear spends beyond its weight (e.g. an adapter run apart from it)."""
    return sum(int(getattr(m, "extra_macs_per_token", 0)) for m in module.modules())


@dataclass(frozen=True)
class BlockCosts:
    """Multiply-adds per token of a block's dense parts, read off its weights (for MAC counts).

    ``extra_attn_macs`` / ``extra_mlp_macs``: what the block's linears spend beyond their weights as
    they run now (drop-scaled adapters, :mod:`spa_viz.models.saliency.adapters`); the dense twin's
    count leaves them out."""

    dim: int
    attn_dim: int
    qkv_macs: int
    proj_macs: int
    mlp_macs: int
    gate_macs: int
    extra_attn_macs: int = 0
    extra_mlp_macs: int = 0

    @classmethod
    def of(cls, block: nn.Module) -> BlockCosts:
        attn = block.attn
        linears = [m for m in block.mlp.modules() if isinstance(m, nn.Linear)]
        gate = getattr(block, "gate", None)
        attn_gate = getattr(attn, "gate", None)
        return cls(
            dim=attn.qkv.in_features,
            attn_dim=attn.qkv.out_features // 3,
            qkv_macs=attn.qkv.weight.numel() + (attn_gate.weight.numel() if attn_gate is not None else 0),
            proj_macs=attn.proj.weight.numel(),
            mlp_macs=sum(m.weight.numel() for m in linears),
            gate_macs=0 if gate is None else int(gate.macs_per_token),
            extra_attn_macs=_extra_macs(attn),
            extra_mlp_macs=_extra_macs(block.mlp),
        )


class TokenLayout(Protocol):
    """How one SPA block orders kept tokens into rows and what its attention adds (a backbone hook).

    ``key``: layouts with equal keys pack equal keep masks identically (so a plan can be reused).
    ``dense_window``: tokens each token attends in the dense twin (Swin windows); None = global.
    ``stage``: index of the backbone stage the block belongs to (score fusion changes between stages).
    """

    grid: Grid
    key: Hashable
    dense_window: int | None
    stage: int

    def plan(self, keep: Tensor, config: SPAConfig, counts: list[int] | None = None) -> PackPlan:
        """The pack plan of a (B, T) keep mask (prefix tokens first); ``counts``: its row sums, if known."""
        ...

    def attention_bias(self, plan: PackPlan) -> Tensor | None:
        """Additive bias broadcastable to (B', heads, L, L) on top of the same-image mask, or None."""
        ...


@dataclass(frozen=True)
class RasterLayout:
    """A plain ViT: tokens in raster order (prefix tokens first), global attention, no bias."""

    grid: Grid
    key: Hashable = "raster"
    dense_window: int | None = None
    stage: int = 0

    def plan(self, keep: Tensor, config: SPAConfig, counts: list[int] | None = None) -> PackPlan:
        return plan_packing(keep, config.policy, config.container_len, counts=counts)

    def attention_bias(self, plan: PackPlan) -> Tensor | None:
        return None


@dataclass(frozen=True)
class GateOutput:
    """A learned gate's output in one forward: what ``L_select`` and the training logs read.

    ``raw``: the gate's own logits (``L_select`` is applied to these); ``fused``: after fusion, what
    selection used; ``keep``: the hard decision (detached). All (B, N) on the model's device.
    """

    layer: int
    grid: Grid
    raw: Tensor
    fused: Tensor
    keep: Tensor
    fused_input: bool = False
    """Whether an earlier score was fused in (False: ``fused`` is the gate's own logit)."""


@dataclass
class BlockDecision:
    """What one SPA block decided in one forward pass (tensors on the CPU): the one decision record.

    ``scores`` are what selection used (fused logits of a learned gate, a selector's scores);
    ``raw_scores`` the learned gate's own logits before fusion (equal to ``scores`` for selectors).
    """

    layer: int
    grid: Grid
    num_prefix: int
    selector: str
    learned: bool
    fusion: str
    raw_scores: Tensor
    scores: Tensor
    keep: Tensor
    plan: PackPlan
    backend: str
    sparse_mlp: bool
    costs: BlockCosts
    dense_window: int | None = None
    reused_plan: bool = False
    fused_input: bool = False
    """Whether the selection scores fused an earlier score in (a learned gate with fusion)."""
    unkept: str = "copy"
    """What unkept tokens became (``SPAConfig.unkept``)."""
    threshold: float = 0.5
    tau: float = 1.0
    soft_gating: bool = False
    """Whether ``sigmoid(s)`` scaled the token updates in this run (the mode and train/eval decide)."""
    refreshed_from: Tensor | None = None
    """With ``unkept="refresh"``: (B, N) the patch token whose update each unkept token took."""


@dataclass
class _PackState:
    """The last block's keep mask, plan and kept output tokens, so an identical next decision reuses them."""

    keep: Tensor
    layout_key: Hashable
    plan: PackPlan
    packed_out: Tensor
    """(n, C) the last block's kept tokens after the block."""
    output: Tensor

    def holds_output_of(self, x: Tensor) -> bool:
        """Whether ``x`` is (a same-shaped view of) the last block's output, unmodified since."""
        out = self.output
        if x is out:
            return True
        if x.is_inference() or out.is_inference():  # inference tensors have no version counter to compare
            return False
        return (x.data_ptr(), x.shape, x.stride(), x._version) == (
            out.data_ptr(),
            out.shape,
            out.stride(),
            out._version,
        )


@dataclass
class SPAContext:
    """State shared by the SPA blocks of one model during one forward pass."""

    config: SPAConfig
    num_prefix: int
    grid: Grid = (0, 0)
    gates: list[GateOutput] = field(default_factory=list)
    records: list[BlockDecision] | None = None
    inputs: dict[int, tuple[Tensor, TokenLayout]] | None = None
    """When a dict: each SPA block stores its input tokens (B, T, C, detached) and layout under its
    layer (what the token view recomputes one token's attention from)."""
    _stage: int | None = None
    _stage_input: Tensor | None = None
    _last_fused: Tensor | None = None
    _last_grid: Grid | None = None
    _pack_state: _PackState | None = None
    last_plan: PackPlan | None = None
    """The pack plan of the SPA block running now (or of the last one that ran in this forward)."""

    def begin(self, grid: Grid) -> None:
        """Reset the per-forward state before the first block runs."""
        self.grid = tuple(grid)
        self.gates = []
        self._stage = self._stage_input = self._last_fused = self._last_grid = None
        self._pack_state = None
        self.last_plan = None

    def fuse(self, raw: Tensor, grid: Grid, stage: int = 0) -> tuple[Tensor, bool]:
        """This block's selection score from its raw logits by the config's fusion mode, and whether an
        earlier score was fused in. ``stage`` is the block's stage index: the first block of a stage
        takes the previous stage's last fused score (pooled to ``grid``)."""
        mode = self.config.fusion
        incoming = None
        if mode == "chain":
            incoming = None if self._last_fused is None else pool_scores(self._last_fused, self._last_grid, grid)
        elif mode == "stage":
            if self._stage != stage:  # the first block of a stage takes the previous stage's score
                self._stage = stage
                self._stage_input = (
                    None if self._last_fused is None else pool_scores(self._last_fused, self._last_grid, grid)
                )
            incoming = self._stage_input
        fused = fuse_scores(raw, incoming)
        self._last_fused, self._last_grid = fused, tuple(grid)
        return fused, incoming is not None

    def pack(self, x: Tensor, keep: Tensor, layout: TokenLayout, counts: list[int]) -> tuple[PackPlan, Tensor, bool]:
        """Plan ``keep`` (B, T) and gather the kept tokens of ``x`` (B, T, C) flat (n, C); reuse the last
        plan when the previous block kept the same tokens with the same layout, and (in inference) its
        kept output tokens when ``x`` is that block's output."""
        state = self._pack_state
        if (
            state is not None
            and state.layout_key == layout.key
            and state.keep.shape == keep.shape
            and torch.equal(state.keep, keep)
        ):
            # the packed output itself is reused only without autograd: under activation checkpointing a
            # re-run must build its own graph from ``x``
            reuse = not torch.is_grad_enabled() and state.holds_output_of(x)
            return state.plan, state.packed_out if reuse else gather_kept(x, state.plan), True
        plan = layout.plan(keep, self.config, counts)
        return plan, gather_kept(x, plan), False

    def remember(self, keep: Tensor, layout: TokenLayout, plan: PackPlan, packed_out: Tensor, out: Tensor) -> None:
        """Keep this block's plan and packed output for the next block."""
        self._pack_state = _PackState(keep, layout.key, plan, packed_out, out)


def drop_path_scale(module: nn.Module, batch: int, training: bool, like: Tensor) -> Tensor | None:
    """timm's per-sample drop path of one branch as a (B,) factor per image (0, or ``1 / (1 - p)`` with
    ``scale_by_keep``), drawn once per block so every token of an image (kept or not) shares it; None
    when nothing is dropped."""
    prob = float(getattr(module, "drop_prob", 0.0))
    if not training or prob == 0.0:
        return None
    scale = (torch.rand(batch, device=like.device, dtype=like.dtype) >= prob).to(like.dtype)
    return scale / (1.0 - prob) if getattr(module, "scale_by_keep", True) else scale


def packed_drop_path(y: Tensor, scale: Tensor | None, sources: Tensor, seq_len: int) -> Tensor:
    """Flat tokens (n, C) times their image's drop-path factor (:func:`drop_path_scale`); ``sources``
    are their ``image * seq_len + token`` indices."""
    return y if scale is None else y * scale[sources // seq_len].unsqueeze(-1)


@dataclass
class _Selection:
    """One block's decision before packing: scores, patch keep mask and counts, and the gate factors
    of kept (``factor``) and unkept (``unkept_factor``) tokens (None: 1 everywhere)."""

    raw: Tensor
    scores: Tensor
    keep: Tensor
    counts: list[int]
    factor: Tensor | None
    unkept_factor: Tensor | None = None
    fused_input: bool = False
    soft_gating: bool = False


def _decide(block: nn.Module, x: Tensor, ctx: SPAContext, layer: int, grid: Grid, stage: int) -> _Selection:
    """Score, fuse and select the patch tokens of one block (``min_keep`` enforced on the counts)."""
    cfg = ctx.config
    gate = block.gate
    raw = gate(x, ctx.num_prefix)
    if not gate.learned:
        keep = gate.select(raw, cfg)
        return _Selection(raw, raw, keep, keep.sum(1).tolist(), None)
    scores, fused_input = ctx.fuse(raw, grid, stage)
    keep, soft = gumbel_keep(scores, threshold=cfg.threshold, tau=cfg.tau, training=block.training)
    counts = keep.sum(1).tolist()
    if min(counts) < min(cfg.min_keep, scores.shape[1]):
        keep = ensure_min_keep(keep, scores, cfg.min_keep, counts)
        counts = keep.sum(1).tolist()
    ctx.gates.append(GateOutput(layer, tuple(grid), raw, scores, keep, fused_input))
    multiplier = None if soft is None else straight_through(keep, soft)
    soft_gating = cfg.soft_gating_active(block.training)
    if not soft_gating:
        return _Selection(raw, scores, keep, counts, multiplier, None, fused_input)
    gate = torch.sigmoid(scores)
    if cfg.soft_gating == "gradient":
        gate = gate - gate.detach() + 1.0
    factor = gate if multiplier is None else gate * multiplier
    return _Selection(raw, scores, keep, counts, factor, gate, fused_input, True)


def _add_branch(packed: Tensor, branch: Tensor, factor: Tensor | None, plan: PackPlan, drop: Tensor | None) -> Tensor:
    """``packed + drop * factor * branch`` on the flat kept tokens (one fused op when nothing is dropped);
    ``drop``: the branch's (B,) drop-path factors."""
    branch = packed_drop_path(branch, drop, plan.sources, plan.seq_len)
    return packed + branch if factor is None else torch.addcmul(packed, branch, factor)


def _project_unkept(
    block: nn.Module, x: Tensor, out: Tensor, keep: Tensor, factor: Tensor | None, prefix: int, drop: Tensor | None
) -> Tensor:
    """``unkept="paper"``: add ``u * ls1(W_o(norm1(x)))`` to every unkept token of ``out`` (B, T, C);
    ``drop``: the attention branch's (B,) drop-path factors, the same the kept tokens got."""
    batch, seq_len, dim = x.shape
    attn = block.attn
    if attn.proj.in_features != dim:
        raise ValueError(
            f"unkept='paper' applies the output projection to the token itself, which needs the "
            f"attention width ({attn.proj.in_features}) to equal the token width ({dim})"
        )
    sources = (~keep).reshape(-1).nonzero().squeeze(1)
    if sources.numel() == 0:
        return out
    tokens = x.reshape(batch * seq_len, dim).index_select(0, sources)
    branch = block.ls1(attn.proj_drop(attn.proj(block.norm1(tokens))))
    if factor is not None:
        full = F.pad(factor, (prefix, 0), value=1.0) if prefix else factor
        branch = branch * full.reshape(-1).index_select(0, sources).unsqueeze(-1)
    branch = packed_drop_path(branch, drop, sources, seq_len)
    return out.reshape(batch * seq_len, dim).index_add(0, sources, branch).view(batch, seq_len, dim)


def nearest_kept(features: Tensor, keep: Tensor, counts: list[int]) -> Tensor:
    """(B, N) index of the kept token of the same image most similar (cosine) to every token.

    ``features`` (B, N, C), ``keep`` (B, N) bool with ``counts`` kept per image. Similarities are
    taken against the first ``max(counts)`` kept slots of each image (the batch's ``K_max``), which is
    what the MAC count charges. Only the kept side is normalised: the argmax over one token's row does
    not depend on that token's own norm. An image that keeps nothing points at one of its own unkept
    tokens.
    """
    longest = max(counts, default=0)
    if longest == 0:
        return torch.zeros(keep.shape, dtype=torch.long, device=keep.device)
    with torch.no_grad():
        order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :longest]
        kept = F.normalize(features.gather(1, order.unsqueeze(-1).expand(-1, -1, features.shape[-1])), dim=-1)
        similarity = torch.bmm(features, kept.transpose(1, 2))
        if min(counts) < longest:  # the slots past an image's own count hold its unkept tokens
            similarity.masked_fill_(~keep.gather(1, order).unsqueeze(1), float("-inf"))
        return order.gather(1, similarity.argmax(-1))


def _refresh_unkept(
    x: Tensor, out: Tensor, keep: Tensor, counts: list[int], factor: Tensor | None, prefix: int
) -> tuple[Tensor, Tensor]:
    """``unkept="refresh"``: every unkept patch token of ``out`` (B, T, C) adds ``u`` times the update of its
    most similar kept patch token (:func:`nearest_kept` on the block input ``x``).

    ``keep`` (B, N) and ``counts`` are the patch keep mask and counts, ``factor`` (B, N) the unkept
    tokens' ``u`` (None: 1). The update is ``out - x`` on the token grid, which is the block's update
    on kept tokens and exactly 0 on unkept ones (they were copied), so one gather and one fused
    multiply-add over the grid (in place) refresh every unkept token without index arithmetic; an image that kept
    no patch token borrows from one of its own unkept tokens, i.e. nothing. Returns the refreshed output
    and the (B, N) patch index each token took its update from."""
    nearest = nearest_kept(x[:, prefix:], keep, counts)
    if max(counts, default=0) == 0 or min(counts) == keep.shape[1]:
        return out, nearest
    patches = out[:, prefix:]
    update = patches - x[:, prefix:]
    borrowed = update.gather(1, nearest.unsqueeze(-1).expand(-1, -1, out.shape[-1]))
    weight = (~keep).to(out.dtype) if factor is None else factor.to(out.dtype).masked_fill(keep, 0.0)
    patches.addcmul_(borrowed, weight.unsqueeze(-1))  # ``out`` is this block's own new tensor
    return out, nearest


def spa_block_forward(block: nn.Module, x: Tensor, ctx: SPAContext, layer: int, layout: TokenLayout) -> Tensor:
    """One SPA block on tokens ``x`` (B, T, C) whose last ``T - num_prefix`` form ``layout.grid``.

    ``block`` has timm ``Block`` parts: ``gate``, ``norm1``, ``attn``, ``ls1``, ``drop_path1``,
    ``norm2``, ``mlp``, ``ls2``, ``drop_path2``.
    """
    cfg = ctx.config
    batch, seq_len, _ = x.shape
    prefix = ctx.num_prefix
    grid = tuple(layout.grid)
    if seq_len - prefix != grid[0] * grid[1]:
        raise ValueError(
            f"SPA block {layer} got {seq_len - prefix} patch tokens but the grid is {grid}; "
            "run the model through its own forward so the grid is set"
        )
    if ctx.inputs is not None:
        ctx.inputs[layer] = (x.detach(), layout)
    chosen = _decide(block, x, ctx, layer, grid, layout.stage)
    keep = F.pad(chosen.keep, (prefix, 0), value=True) if prefix else chosen.keep
    plan, packed, reused = ctx.pack(x, keep, layout, [count + prefix for count in chosen.counts])
    ctx.last_plan = plan
    factor = None
    if chosen.factor is not None:
        full = F.pad(chosen.factor, (prefix, 0), value=1.0) if prefix else chosen.factor
        factor = gather_kept(full.unsqueeze(-1), plan)

    attn_out, backend = packed_attention(
        block.attn, block.norm1(packed), plan, cfg.backend, attn_bias=layout.attention_bias(plan)
    )
    drop1 = drop_path_scale(block.drop_path1, batch, block.training, x)
    packed = _add_branch(packed, block.ls1(attn_out), factor, plan, drop1)
    if cfg.sparse_mlp:
        mlp_out = block.ls2(block.mlp(block.norm2(packed)))
        drop2 = drop_path_scale(block.drop_path2, batch, block.training, x)
        packed = _add_branch(packed, mlp_out, factor, plan, drop2)
    out = scatter_kept(packed, plan, x)
    nearest = None
    if cfg.unkept == "paper":
        out = _project_unkept(block, x, out, keep, chosen.unkept_factor, prefix, drop1)
    elif cfg.unkept == "refresh":
        out, nearest = _refresh_unkept(x, out, chosen.keep, chosen.counts, chosen.unkept_factor, prefix)
    if not cfg.sparse_mlp:
        out = out + block.drop_path2(block.ls2(block.mlp(block.norm2(out))))
    ctx.remember(keep, layout, plan, packed, out)

    if ctx.records is not None:
        ctx.records.append(
            BlockDecision(
                layer=layer,
                grid=grid,
                num_prefix=prefix,
                selector=block.gate.name,
                learned=bool(block.gate.learned),
                fusion=cfg.fusion,
                raw_scores=chosen.raw.detach().float().cpu(),
                scores=chosen.scores.detach().float().cpu(),
                keep=chosen.keep.cpu(),
                plan=plan.to("cpu"),
                backend=backend,
                sparse_mlp=cfg.sparse_mlp,
                costs=BlockCosts.of(block),
                dense_window=layout.dense_window,
                reused_plan=reused,
                fused_input=chosen.fused_input,
                unkept=cfg.unkept,
                threshold=cfg.threshold,
                tau=cfg.tau,
                soft_gating=chosen.soft_gating,
                refreshed_from=None if nearest is None else nearest.cpu(),
            )
        )
    return out


class SPABlockMixin:
    """Mixed in front of a timm ViT block class: ``forward`` runs SPA unless the config disables it."""

    spa_context: SPAContext
    spa_layer: int

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        ctx = self.spa_context
        if not ctx.config.enabled:
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        if attn_mask is not None or is_causal:
            raise ValueError("SPA blocks build their own attention mask; do not pass attn_mask/is_causal")
        return spa_block_forward(self, x, ctx, self.spa_layer, RasterLayout(ctx.grid))


_BLOCK_CLASSES: dict[type, type] = {}


def convert_block(block: nn.Module, gate: nn.Module, ctx: SPAContext, layer: int) -> nn.Module:
    """Turn a timm ``Block`` into an SPA block in place (weights kept, ``gate`` added)."""
    parts = ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2")
    missing = [n for n in parts if not hasattr(block, n)]
    if missing:
        raise ValueError(f"{type(block).__name__} lacks {missing}: SPA converts timm Block-style blocks only")
    base = type(block)
    if not issubclass(base, SPABlockMixin):
        if base not in _BLOCK_CLASSES:
            _BLOCK_CLASSES[base] = type(f"SPA{base.__name__}", (SPABlockMixin, base), {})
        block.__class__ = _BLOCK_CLASSES[base]
    block.gate = gate
    block.spa_context = ctx
    block.spa_layer = layer
    return block


def find_context(model: nn.Module) -> SPAContext:
    """The SPA context of ``model`` or of the first submodule that has one (e.g. a detector's backbone)."""
    for module in model.modules():
        ctx = getattr(module, "spa_context", None)
        if isinstance(ctx, SPAContext):
            return ctx
    raise ValueError("this model has no SPA blocks; convert it with spa_viz.patch(model, start_layer)")


def find_backbone(model: nn.Module) -> nn.Module:
    """The module that owns the SPA context (the model itself, or e.g. a detector's backbone)."""
    ctx = find_context(model)
    for module in model.modules():
        if getattr(module, "spa_context", None) is ctx and not hasattr(module, "spa_layer"):
            return module
    raise ValueError("found SPA blocks but no backbone that owns them")


def spa_blocks(model: nn.Module) -> list[nn.Module]:
    """The SPA blocks of a model (or of its SPA backbone), in forward order."""
    ctx = find_context(model)
    return [m for m in model.modules() if getattr(m, "spa_context", None) is ctx and hasattr(m, "spa_layer")]
