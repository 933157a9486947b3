"""The SPA block: gate -> select -> pack -> attend -> unpack, with timm ``Block`` semantics.

A timm block is converted in place (ToMe-style): its class becomes a subclass whose ``forward``
runs SPA, and a ``gate`` module is added, so its weights and state-dict keys stay as they were.
Kept tokens go through ``norm1 -> attn -> ls1 -> drop_path`` and (with ``sparse_mlp``)
``norm2 -> mlp -> ls2 -> drop_path`` on the packed rows only; unkept tokens pass unchanged.

``block.gate`` is a learned :class:`~spa_viz.layers.gate.TokenGate` or a training-free selector:
a module called as ``gate(patch_tokens, prefix_tokens)`` that returns (B, N) scores and has a
``select(scores, config) -> keep`` method; selector scores are neither fused nor used for soft
gating.

The blocks of one model share an :class:`SPAContext`: the per-forward state that carries the
previous block's fused score (for max-fusion), the scores the selection loss needs, and, while
tracing, a record of every decision. When a stale-token refresher is attached (**[ours]**,
:mod:`spa_viz.layers.refresh`), the context also counts per patch token how many SPA blocks skipped
it, and the block at ``refresh_layer`` (the model's last block) runs the refresher on its output,
so it runs once before the final norm in ``forward_features`` and ``forward_intermediates`` alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from spa_viz.layers.attention import packed_attention
from spa_viz.layers.config import SPAConfig
from spa_viz.layers.gate import fuse_scores, select_tokens
from spa_viz.layers.packing import PackPlan, pack, plan_packing, unpack
from spa_viz.layers.refresh import RefreshDecision, StaleTokenRefresh

__all__ = [
    "BlockDecision",
    "BlockCosts",
    "SPAContext",
    "SPABlockMixin",
    "convert_block",
    "find_context",
    "packed_drop_path",
    "spa_block_forward",
]


@dataclass(frozen=True)
class BlockCosts:
    """Multiply-adds per token of a block's dense parts, read off its weights (for FLOP counts)."""

    dim: int
    attn_dim: int
    qkv_macs: int
    proj_macs: int
    mlp_macs: int
    gate_macs: int

    @classmethod
    def of(cls, block: nn.Module) -> "BlockCosts":
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
            gate_macs=_gate_macs(gate),
        )


def _gate_macs(gate: nn.Module | None) -> int:
    """Scoring multiply-adds per token: a selector states its own, a learned gate is its linears."""
    if gate is None:
        return 0
    stated = getattr(gate, "macs_per_token", None)
    if stated is not None:
        return int(stated)
    return sum(m.weight.numel() for m in gate.modules() if isinstance(m, nn.Linear))


@dataclass
class BlockDecision:
    """What one SPA block decided in one forward pass (tensors on the CPU)."""

    layer: int
    grid: tuple[int, int]
    num_prefix: int
    scores: Tensor
    keep: Tensor
    plan: PackPlan
    backend: str
    sparse_mlp: bool
    costs: BlockCosts
    dense_window: int | None = None
    """Tokens each token attends in the dense twin (Swin windows); None means global attention."""


@dataclass
class SPAContext:
    """State shared by the SPA blocks of one model during one forward pass."""

    config: SPAConfig
    num_prefix: int
    grid: tuple[int, int] = (0, 0)
    previous_scores: Tensor | None = None
    previous_grid: tuple[int, int] | None = None
    scores: list[tuple[int, tuple[int, int], Tensor]] = field(default_factory=list)
    records: list[BlockDecision] | None = None
    refresh: StaleTokenRefresh | None = None
    """Stale-token refresher run on the output of block ``refresh_layer`` ([ours]; None: off)."""
    refresh_layer: int | None = None
    skipped: Tensor | None = None
    """(B, N) SPA blocks that did not select each patch token so far (counted while ``refresh`` is set)."""
    refresh_record: RefreshDecision | None = None

    def begin(self, grid: tuple[int, int]) -> None:
        """Reset the per-forward state before the first block runs."""
        self.grid = tuple(grid)
        self.previous_scores = None
        self.previous_grid = None
        self.scores = []
        self.skipped = None
        self.refresh_record = None


def packed_drop_path(y: Tensor, plan: PackPlan, module: nn.Module, training: bool) -> Tensor:
    """timm's per-sample drop path, applied per source image rather than per packed row."""
    prob = float(getattr(module, "drop_prob", 0.0))
    if not training or prob == 0.0:
        return y
    keep = torch.rand(plan.batch_size, device=y.device, dtype=y.dtype) >= prob
    scale = keep.to(y.dtype)
    if getattr(module, "scale_by_keep", True):
        scale = scale / (1.0 - prob)
    return y * scale[plan.slot_image.clamp(min=0)].unsqueeze(-1)


def spa_block_forward(block: nn.Module, x: Tensor, ctx: SPAContext, layer: int) -> Tensor:
    """One SPA block on tokens ``x`` (B, T, C) whose last ``T - num_prefix`` form ``ctx.grid``."""
    cfg = ctx.config
    batch, seq_len, _ = x.shape
    prefix = ctx.num_prefix
    if seq_len - prefix != ctx.grid[0] * ctx.grid[1]:
        raise ValueError(
            f"SPA block {layer} got {seq_len - prefix} patch tokens but the grid is {ctx.grid}; "
            "run the model through its own forward so the grid is set"
        )
    gate = block.gate
    custom_select = getattr(gate, "select", None)
    if custom_select is None:
        # scoring all tokens then slicing avoids copying the non-contiguous patch slice
        scores = fuse_scores(gate(x)[:, prefix:], ctx.previous_scores, ctx.grid, ctx.previous_grid)
        ctx.previous_scores, ctx.previous_grid = scores, ctx.grid
        ctx.scores.append((layer, ctx.grid, scores))
        keep_patch, straight_through = select_tokens(
            scores, threshold=cfg.threshold, tau=cfg.tau, min_keep=cfg.min_keep, training=block.training
        )
    else:
        scores = gate(x[:, prefix:], x[:, :prefix])
        keep_patch = custom_select(scores, cfg)
    keep = torch.cat([keep_patch.new_ones(batch, prefix), keep_patch], dim=1)
    plan = plan_packing(keep, cfg.policy, cfg.container_len)
    packed = pack(x, plan)
    if custom_select is None and (cfg.soft_gating or block.training):
        factor = straight_through * torch.sigmoid(scores) if cfg.soft_gating else straight_through
        factor = torch.cat([factor.new_ones(batch, prefix), factor], dim=1).reshape(-1)
        packed = packed * factor[plan.slot_source.clamp(min=0)].unsqueeze(-1)

    attn_out, backend = packed_attention(block.attn, block.norm1(packed), plan, cfg.backend)
    packed = packed + packed_drop_path(block.ls1(attn_out), plan, block.drop_path1, block.training)
    if cfg.sparse_mlp:
        mlp_out = block.ls2(block.mlp(block.norm2(packed)))
        out = unpack(packed + packed_drop_path(mlp_out, plan, block.drop_path2, block.training), plan, x)
    else:
        out = unpack(packed, plan, x)
        out = out + block.drop_path2(block.ls2(block.mlp(block.norm2(out))))

    if ctx.records is not None:
        ctx.records.append(
            BlockDecision(
                layer=layer,
                grid=ctx.grid,
                num_prefix=prefix,
                scores=scores.detach().float().cpu(),
                keep=keep_patch.cpu(),
                plan=plan.to("cpu"),
                backend=backend,
                sparse_mlp=cfg.sparse_mlp,
                costs=BlockCosts.of(block),
            )
        )
    if ctx.refresh is not None:
        skipped = (~keep_patch).to(torch.int32)
        ctx.skipped = skipped if ctx.skipped is None else ctx.skipped + skipped
        if layer == ctx.refresh_layer:
            out = ctx.refresh(out, ctx.skipped, prefix)
            if ctx.records is not None:
                ran = bool((ctx.skipped > 0).any()) and ctx.refresh.uses_context(prefix)
                ctx.refresh_record = RefreshDecision(
                    ctx.skipped.cpu(), ctx.refresh.macs_per_token, ctx.refresh.macs_per_image if ran else 0
                )
    return out


class SPABlockMixin:
    """Mixed in front of a timm block class: ``forward`` runs SPA unless the config disables it."""

    spa_context: SPAContext
    spa_layer: int

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        if not self.spa_context.config.enabled:
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        if attn_mask is not None or is_causal:
            raise ValueError("SPA blocks build their own attention mask; do not pass attn_mask/is_causal")
        return spa_block_forward(self, x, self.spa_context, self.spa_layer)


_BLOCK_CLASSES: dict[type, type] = {}


def convert_block(block: nn.Module, gate: nn.Module, ctx: SPAContext, layer: int) -> nn.Module:
    """Turn a timm ``Block`` into an SPA block in place (weights kept, ``gate`` added)."""
    missing = [n for n in ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2") if not hasattr(block, n)]
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
