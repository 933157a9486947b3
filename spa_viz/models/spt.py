"""SPT: a Swin Transformer whose later stages are SPA blocks (the paper's backbone, arXiv 2410.23608).

Layout: patch embedding at stride 4, four stages joined by patch merging. Stages before
``spa_start_stage`` (default 3) are timm's own ``SwinTransformerStage``; the later stages hold
:class:`SPTBlock` s, which keep Swin's weights and state-dict keys (``norm1``, ``attn`` with its
``relative_position_bias_table``, ``norm2``, ``mlp``) and add a ``gate``.

An SPT block runs the one SPA kernel (:func:`~spa_viz.layers.block.spa_block_forward`: gate -> fuse
-> select -> pack -> attend -> unpack) through its :class:`SwinWindowLayout` hook, with three
Swin-specific choices that make "keep every token" reproduce Swin exactly:

* Tokens are packed in Swin's window-partition order (after the cyclic shift of M//2 on odd blocks),
  so with every token kept each container of L = M^2 slots is exactly one Swin window. The pack plan
  stores raster token indices (``slot_token`` = row * W + col), so traces read in raster order.
* Attention adds Swin's relative position bias, looked up from the true 2D offset of two packed
  tokens. **[ours]** Same-image tokens that share a container but lie farther apart than a window
  allows use the offset clamped to +-(M-1).
* Shifted blocks add Swin's shifted-window region mask (-100 between tokens of different regions of
  the rolled map), so wrapped-around tokens never attend to each other.

Scores fuse across stages (``fusion="stage"``, the default): every stage-4 block fuses its logit
with the last fused score of stage 3, 2x2 max-pooled; stage-3 blocks (the first SPA stage) select
with their own logits.

Further **[ours]** choices: windows shrink to the grid when a stage's grid is smaller than M (as
timm's Swin does at its construction size, here decided per forward from the actual grid) and the
container shrinks with them; window padding is never packed, so SPA attends to real tokens only (on
sizes that need window padding the dense twin, like Swin, also attends to the zero padding).
"""

from __future__ import annotations

import functools
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import (
    ClassifierHead,
    DropPath,
    Mlp,
    PatchEmbed,
    calculate_drop_path_rates,
    get_device_dtype,
    trunc_normal_,
)
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models.swin_transformer import (
    PatchMerging,
    SwinTransformer,
    SwinTransformerStage,
    WindowAttention,
    window_partition,
    window_reverse,
)
from torch import Tensor, nn

from spa_viz.io.config import from_dict
from spa_viz.layers.block import SPAContext, spa_block_forward
from spa_viz.layers.config import SPAConfig
from spa_viz.layers.gate import TokenGate
from spa_viz.layers.packing import PackPlan, plan_packing, to_rows
from spa_viz.models.timm_contract import dense_on_meta, set_spa_grad_checkpointing
from spa_viz.selection.labels import TokenGrid

__all__ = [
    "SPTConfig",
    "SPT",
    "SPTStage",
    "SPTBlock",
    "load_swin_weights",
    "spt_from_swin",
]

_REGION_MASK = -100.0  # Swin's additive mask between shifted-window regions

Grid = tuple[int, int]


@dataclass
class SPTConfig:
    """Architecture of an SPT (JSON-serialisable via :meth:`to_dict` / :meth:`from_dict`).

    ``spa_start_stage`` (1-based) is the first stage made of SPA blocks; ``plus4`` adds the paper's
    4 extra blocks to stage 3; ``spa`` holds :class:`SPAConfig` settings (policy ``container`` with
    L = M^2 unless overridden).
    """

    img_size: int = 224
    patch_size: int = 4
    in_chans: int = 3
    num_classes: int = 1000
    global_pool: str = "avg"
    embed_dim: int = 96
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (3, 6, 12, 24)
    window_size: int = 7
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_rate: float = 0.0
    drop_path_rate: float = 0.1
    spa_start_stage: int = 3
    plus4: bool = False
    spa: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.depths = tuple(int(d) for d in self.depths)
        self.num_heads = tuple(int(h) for h in self.num_heads)
        self.validate()

    def validate(self) -> None:
        """Raise ValueError with a fix for any inconsistent setting."""
        stages = len(self.depths)
        if stages < 1 or len(self.num_heads) != stages:
            raise ValueError(f"depths {self.depths} and num_heads {self.num_heads} need one entry per stage")
        if any(d < 1 for d in self.depths):
            raise ValueError(f"every stage needs at least one block, got depths {self.depths}")
        if not 1 <= self.spa_start_stage <= stages:
            raise ValueError(f"spa_start_stage must be in [1, {stages}], got {self.spa_start_stage}")
        if self.plus4 and stages < 3:
            raise ValueError("plus4 adds blocks to stage 3; this config has fewer than 3 stages")
        if self.window_size < 1 or self.patch_size < 1 or self.img_size < 1:
            raise ValueError("img_size, patch_size and window_size must be >= 1")
        for stage, (dim, heads) in enumerate(zip(self.dims, self.num_heads)):
            if dim % heads:
                raise ValueError(f"stage {stage + 1}: width {dim} is not divisible by {heads} heads")
        unknown = sorted(set(self.spa) - {f.name for f in fields(SPAConfig)})
        if unknown:
            raise ValueError(f"unknown SPA settings {unknown} in SPTConfig.spa")

    @property
    def dims(self) -> tuple[int, ...]:
        """Channel width of each stage (doubling after every patch merging)."""
        return tuple(self.embed_dim * 2**i for i in range(len(self.depths)))

    @property
    def stage_depths(self) -> tuple[int, ...]:
        """Blocks per stage, with the ``plus4`` extra stage-3 blocks."""
        if not self.plus4:
            return self.depths
        return tuple(d + 4 if i == 2 else d for i, d in enumerate(self.depths))

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["depths"], data["num_heads"] = list(self.depths), list(self.num_heads)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SPTConfig:
        """An SPT architecture from its JSON object, strictly (:func:`spa_viz.io.config.from_dict`)."""
        return from_dict(cls, data, where="SPT settings")


_PAIR_INDEX_MAX_TOKENS = 1024  # above this many tokens per image the (N, N) bias index is not cached


@dataclass(frozen=True)
class _WindowLayout:
    """Swin's window partition of one (H, W) grid for one window and shift, on one device.

    ``order``: raster token index at every window-order position of the rolled, padded map (-1 for
    window padding). ``region``: Swin's shift region of every window-order position;
    ``token_region``: the same per raster token. ``pair_index``:
    for grids of at most ``_PAIR_INDEX_MAX_TOKENS`` tokens, the (N, N) row of the relative position
    bias table for every pair of raster tokens, pointing one past the table (the region mask) for
    pairs in different shift regions; None for larger grids.
    """

    order: Tensor
    region: Tensor
    token_region: Tensor
    shifted: bool
    window_padding: bool
    pair_index: Tensor | None


def _bands(length: int, window: int, shift: int) -> Tensor:
    """Swin's region band (0, 1, 2) of every row of a rolled, padded axis."""
    band = torch.zeros(length, dtype=torch.long)
    if shift:
        band[length - window : length - shift] = 1
        band[length - shift :] = 2
    return band


def _offset_index(rows: Tensor, cols: Tensor, window_size: int) -> Tensor:
    """Row of the relative position bias table for every pair of (..., L) positions -> (..., L, L).

    Offsets beyond a window (possible inside an SPA container) are clamped to +-(window_size - 1).
    """
    limit = window_size - 1
    dy = (rows[..., :, None] - rows[..., None, :]).clamp(-limit, limit)
    dx = (cols[..., :, None] - cols[..., None, :]).clamp(-limit, limit)
    return (dy + limit) * (2 * window_size - 1) + dx + limit


@functools.lru_cache(maxsize=256)
def _window_layout(grid: Grid, window: Grid, shift: Grid, window_size: int, device: str) -> _WindowLayout:
    """The (cached) window layout of a grid on ``device``."""
    height, width = grid
    (wh, ww), (sh, sw) = window, shift
    with torch.inference_mode(False):  # cached tensors must stay usable in autograd
        index = torch.roll(torch.arange(height * width).view(height, width), (-sh, -sw), (0, 1))
        pad_h, pad_w = (-height) % wh, (-width) % ww
        index = F.pad(index, (0, pad_w, 0, pad_h), value=-1)
        hp, wp = height + pad_h, width + pad_w
        region = _bands(hp, wh, sh)[:, None] * 3 + _bands(wp, ww, sw)[None, :]

        def partition(t: Tensor) -> Tensor:
            return t.view(hp // wh, wh, wp // ww, ww).permute(0, 2, 1, 3).reshape(-1)

        order, region = partition(index), partition(region)
        real = order >= 0
        token_region = torch.empty(height * width, dtype=torch.long).index_copy_(0, order[real], region[real])
        pair_index = None
        if height * width <= _PAIR_INDEX_MAX_TOKENS:
            tokens = torch.arange(height * width)
            pair_index = _offset_index(tokens // width, tokens % width, window_size)
            if sh or sw:
                masked = token_region[:, None] != token_region[None, :]
                pair_index = pair_index.masked_fill(masked, (2 * window_size - 1) ** 2)
        return _WindowLayout(
            order.to(device),
            region.to(device),
            token_region.to(device),
            bool(sh or sw),
            bool(pad_h or pad_w),
            None if pair_index is None else pair_index.to(device),
        )


def _batch_order(layout: _WindowLayout, batch: int, tokens: int) -> Tensor:
    """(B * P,) raster source index (image * N + token) of every window-order position of a batch."""
    return (torch.arange(batch, device=layout.order.device)[:, None] * tokens + layout.order.clamp(min=0)).reshape(-1)


def _raster_plan(
    keep: Tensor, layout: _WindowLayout, policy: str, row_len: int | None, counts: list[int] | None = None
) -> PackPlan:
    """Pack plan in window order whose slots point at raster tokens (image * N + row * W + col)."""
    batch, tokens = keep.shape
    order = layout.order
    window_keep = keep[:, order.clamp(min=0)] & (order >= 0) if layout.window_padding else keep[:, order]
    source_map = _batch_order(layout, batch, tokens)
    return plan_packing(window_keep, policy, row_len, counts=counts, source_map=source_map, seq_len=tokens)


@dataclass(frozen=True)
class SwinWindowLayout:
    """SPT's hook into the SPA kernel: Swin window order, relative position bias, shifted-window mask.

    With every token kept, each container of L = M^2 slots is exactly one Swin window, so the
    kernel reproduces Swin's (shifted) window attention.
    """

    grid: Grid
    window: Grid
    shift: Grid
    window_size: int
    bias_table: Tensor
    container_len: int | None
    stage: int = 0
    """Index of the stage (the fusion state changes between stages, not within one)."""

    @property
    def key(self) -> tuple:
        return ("swin", self.grid, self.window, self.shift, self.container_len)

    @property
    def dense_window(self) -> int:
        return self.window[0] * self.window[1]

    def _layout(self, device: torch.device) -> _WindowLayout:
        return _window_layout(self.grid, self.window, self.shift, self.window_size, str(device))

    def plan(self, keep: Tensor, config: SPAConfig, counts: list[int] | None = None) -> PackPlan:
        return _raster_plan(keep, self._layout(keep.device), config.policy, self.container_len, counts)

    def attention_bias(self, plan: PackPlan) -> Tensor:
        """(B', heads, L, L): Swin's relative position bias of every packed pair, -100 across shift regions."""
        token = to_rows(plan.sources % plan.seq_len, plan)  # (B', L) raster token per slot; padding reads token 0
        table = self.bias_table
        layout = self._layout(token.device)
        if layout.pair_index is not None:
            index = layout.pair_index[token[:, :, None], token[:, None, :]]
            table = torch.cat([table, table.new_full((1, table.shape[1]), _REGION_MASK)])
            return table[index].permute(0, 3, 1, 2)
        width = self.grid[1]
        bias = table[_offset_index(token // width, token % width, self.window_size)].permute(0, 3, 1, 2)
        if layout.shifted:
            region = layout.token_region[token]
            bias = bias.masked_fill((region[:, :, None] != region[:, None, :]).unsqueeze(1), _REGION_MASK)
        return bias


class SPTWindowAttention(WindowAttention):
    """timm's Swin ``WindowAttention`` with the identity q/k norms :func:`packed_attention` expects."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.q_norm = nn.Identity()
        self.k_norm = nn.Identity()


class SPTBlock(nn.Module):
    """A Swin block that runs the SPA kernel (or, with SPA disabled, dense Swin window attention).

    Takes and returns (B, H, W, C) maps like timm's ``SwinTransformerBlock``; ``shifted`` blocks use
    the cyclic shift of M//2 where the grid is larger than the window. ``ls1``/``ls2`` are identities
    (Swin has no layer scale) so the block has the parts :func:`spa_block_forward` expects.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int,
        shifted: bool,
        context: SPAContext,
        layer: int,
        *,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path: float = 0.0,
        gate_init_bias: float = 3.0,
    ) -> None:
        super().__init__()
        self.window_size = window_size
        self.shifted = shifted
        self.spa_context = context
        self.spa_layer = layer
        self.spa_stage = 0  # set by the stage that holds the block
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SPTWindowAttention(dim, num_heads=num_heads, window_size=window_size, qkv_bias=qkv_bias)
        self.ls1 = nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=nn.GELU)
        self.ls2 = nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.gate = TokenGate(dim, init_bias=gate_init_bias)

    def window_and_shift(self, grid: Grid) -> tuple[Grid, Grid]:
        """Swin's rule: the window shrinks to a smaller grid, and such an axis is not shifted."""
        size, half = self.window_size, self.window_size // 2
        window = (min(grid[0], size), min(grid[1], size))
        if not self.shifted:
            return window, (0, 0)
        return window, (half if grid[0] > size else 0, half if grid[1] > size else 0)

    def window_area(self, grid: Grid) -> int:
        """Tokens per attention window on ``grid``."""
        (wh, ww), _ = self.window_and_shift(grid)
        return wh * ww

    def layout(self, grid: Grid) -> SwinWindowLayout:
        """This block's token layout on ``grid`` (window order, bias, shift mask) for the SPA kernel."""
        window, shift = self.window_and_shift(grid)
        return SwinWindowLayout(
            tuple(grid),
            window,
            shift,
            self.window_size,
            self.attn.relative_position_bias_table,
            self._container_len(window),
            self.spa_stage,
        )

    def forward(self, x: Tensor) -> Tensor:
        batch, height, width, dim = x.shape
        ctx = self.spa_context
        if not ctx.config.enabled:
            window, shift = self.window_and_shift((height, width))
            return self._dense(x, window, shift)
        ctx.grid = (height, width)
        tokens = x.reshape(batch, height * width, dim)
        out = spa_block_forward(self, tokens, ctx, self.spa_layer, self.layout((height, width)))
        return out.view(batch, height, width, dim)

    def _container_len(self, window: Grid) -> int | None:
        config = self.spa_context.config
        if config.policy != "container" or config.container_len is None:
            return config.container_len
        return max(1, config.container_len * window[0] * window[1] // self.window_size**2)

    def _dense(self, x: Tensor, window: Grid, shift: Grid) -> Tensor:
        """The dense twin: Swin (shifted) window attention, window padding attended as in timm's Swin."""
        batch, height, width, dim = x.shape
        (wh, ww), shifted = window, any(shift)
        y = self.norm1(x)
        if shifted:
            y = torch.roll(y, (-shift[0], -shift[1]), (1, 2))
        pad_h, pad_w = (-height) % wh, (-width) % ww
        y = F.pad(y, (0, 0, 0, pad_w, 0, pad_h))
        windows = window_partition(y, window).view(batch, -1, wh * ww, dim)

        area = torch.arange(wh * ww, device=x.device)
        table = self.attn.relative_position_bias_table
        bias = table[_offset_index(area // ww, area % ww, self.window_size)].permute(2, 0, 1)[None]
        if shifted:
            region = _window_layout((height, width), window, shift, self.window_size, str(x.device)).region
            region = region.view(-1, wh * ww)
            bias = bias.masked_fill((region[:, :, None] != region[:, None, :]).unsqueeze(1), _REGION_MASK)
        attn = self.attn
        qkv = attn.qkv(windows).reshape(*windows.shape[:3], 3, attn.num_heads, -1).permute(3, 0, 1, 4, 2, 5)
        q, k, v = qkv.unbind(0)
        dropout = attn.attn_drop.p if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout, scale=attn.scale)
        y = attn.proj_drop(attn.proj(y.transpose(2, 3).reshape(-1, wh, ww, q.shape[2] * q.shape[4])))
        y = window_reverse(y, window, height + pad_h, width + pad_w)[:, :height, :width]
        if shifted:
            y = torch.roll(y, shift, (1, 2))
        x = x + self.drop_path1(y)
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class SPTStage(nn.Module):
    """An SPA stage: optional patch merging, then SPT blocks with the shift on every second block."""

    def __init__(
        self,
        dim: int,
        out_dim: int,
        depth: int,
        downsample: bool,
        num_heads: int,
        window_size: int,
        context: SPAContext,
        first_layer: int,
        *,
        mlp_ratio: float,
        qkv_bias: bool,
        drop_path: list[float],
        gate_init_bias: float,
    ) -> None:
        super().__init__()
        self.downsample = PatchMerging(dim=dim, out_dim=out_dim) if downsample else nn.Identity()
        self.blocks = nn.Sequential(
            *[
                SPTBlock(
                    out_dim,
                    num_heads,
                    window_size,
                    shifted=i % 2 == 1,
                    context=context,
                    layer=first_layer + i,
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    drop_path=drop_path[i],
                    gate_init_bias=gate_init_bias,
                )
                for i in range(depth)
            ]
        )
        for block in self.blocks:
            block.spa_stage = first_layer  # one stage, one index: the layer its first block has

    def forward(self, x: Tensor) -> Tensor:
        return self.blocks(self.downsample(x))


class SPT(nn.Module):
    """Select and Pack Transformer: Swin stages 1..s-1, SPA stages s..4 (s = ``spa_start_stage``).

    Maps are NHWC inside (like timm's Swin); :meth:`forward_pyramid` returns NCHW maps at strides
    4, 8, 16, 32 with every token present.
    """

    output_fmt = "NHWC"  # of forward_features, as timm's Swin
    grad_checkpointing = False

    def __init__(self, config: SPTConfig | None = None, **settings: Any) -> None:
        super().__init__()
        cfg = SPTConfig.from_dict({**(config.to_dict() if config else {}), **settings})
        self.config = cfg
        depths, dims = cfg.stage_depths, cfg.dims
        start = cfg.spa_start_stage - 1
        spa = {"policy": "container", "container_len": cfg.window_size**2, **cfg.spa}
        spa["start_layer"] = sum(depths[:start])
        self.spa_context = SPAContext(config=SPAConfig.from_dict(spa), num_prefix=0)

        self.num_classes = cfg.num_classes
        self.num_features = self.head_hidden_size = dims[-1]
        self.patch_embed = PatchEmbed(
            img_size=cfg.img_size,
            patch_size=cfg.patch_size,
            in_chans=cfg.in_chans,
            embed_dim=cfg.embed_dim,
            norm_layer=nn.LayerNorm,
            strict_img_size=False,
            output_fmt="NHWC",
        )
        grid = self.patch_embed.grid_size
        drop_path = calculate_drop_path_rates(cfg.drop_path_rate, list(depths), stagewise=True)
        stages: list[nn.Module] = []
        self.feature_info: list[dict[str, Any]] = []
        for i, depth in enumerate(depths):
            scale = 2 ** max(i - 1, 0)
            in_dim, out_dim = dims[max(i - 1, 0)], dims[i]
            if i < start:
                stage = SwinTransformerStage(
                    dim=in_dim,
                    out_dim=out_dim,
                    input_resolution=(-(-grid[0] // scale), -(-grid[1] // scale)),
                    depth=depth,
                    downsample=i > 0,
                    num_heads=cfg.num_heads[i],
                    window_size=cfg.window_size,
                    dynamic_mask=True,
                    mlp_ratio=cfg.mlp_ratio,
                    qkv_bias=cfg.qkv_bias,
                    drop_path=drop_path[i],
                )
            else:
                stage = SPTStage(
                    in_dim,
                    out_dim,
                    depth,
                    i > 0,
                    cfg.num_heads[i],
                    cfg.window_size,
                    self.spa_context,
                    sum(depths[:i]),
                    mlp_ratio=cfg.mlp_ratio,
                    qkv_bias=cfg.qkv_bias,
                    drop_path=drop_path[i],
                    gate_init_bias=self.spa_context.config.gate_init_bias,
                )
            stages.append(stage)
            self.feature_info.append(dict(num_chs=out_dim, reduction=cfg.patch_size * 2**i, module=f"layers.{i}"))
        self.layers = nn.Sequential(*stages)
        self.norm = nn.LayerNorm(self.num_features)
        self.head = ClassifierHead(
            self.num_features, cfg.num_classes, pool_type=cfg.global_pool, drop_rate=cfg.drop_rate, input_fmt="NHWC"
        )
        self._init_weights()

    def _init_weights(self) -> None:
        """Swin's init (truncated normal Linear weights, zero biases); gates start at their init bias."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for block in self.spa_blocks():
            nn.init.constant_(block.gate.proj.bias, self.spa_context.config.gate_init_bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Parameters timm's optimizer factory exempts from weight decay (Swin's bias tables)."""
        return {name for name, _ in self.named_parameters() if "relative_position_bias_table" in name}

    @property
    def in_chans(self) -> int:
        return self.config.in_chans

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Parameter groups for layer-wise learning rates: the stem, then stage by stage (or block by block)."""
        return dict(
            stem=r"^patch_embed",
            blocks=r"^layers\.(\d+)"
            if coarse
            else [(r"^layers\.(\d+)\.downsample", (0,)), (r"^layers\.(\d+)\.\w+\.(\d+)", None), (r"^norm", (99999,))],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing block by block; SPA blocks re-run on the context state their first run saw."""
        set_spa_grad_checkpointing(self, self.spa_context, self.spa_blocks(), enable)
        self.grad_checkpointing = enable
        for stage in self.layers:
            if isinstance(stage, SwinTransformerStage):
                stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the classifier head (e.g. ``num_classes=0`` for a headless backbone)."""
        self.num_classes = num_classes
        self.head.reset(num_classes, pool_type=global_pool, in_features=self.num_features, **get_device_dtype(self))
        self.head_hidden_size = self.head.num_features

    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the stages after the last of ``indices`` (timm's ``features_only`` does); return the indices kept."""
        take, last = feature_take_indices(len(self.layers), indices)
        prune_end = last < len(self.layers) - 1
        if prune_norm or prune_end:
            self.norm = nn.Identity()  # the final norm belongs to the last stage's width
        self.layers = self.layers[: last + 1]
        if prune_end:
            self.num_features = self.head_hidden_size = self.feature_info[last]["num_chs"]
        if prune_head or prune_end:
            self.reset_classifier(0, "")
        return take

    def spa_blocks(self) -> list[SPTBlock]:
        """The SPA blocks in forward order."""
        return [m for m in self.modules() if isinstance(m, SPTBlock)]

    def _embed(self, x: Tensor) -> Tensor:
        """Validate the input, embed patches (NHWC) and reset the per-forward SPA state."""
        patch = self.config.patch_size
        if x.dim() != 4 or x.shape[1] != self.config.in_chans:
            raise ValueError(
                f"expected images (B, {self.config.in_chans}, H, W), got a tensor of shape {tuple(x.shape)}"
            )
        height, width = x.shape[-2:]
        if height % patch or width % patch or height == 0 or width == 0:
            raise ValueError(
                f"SPT takes images whose sides are positive multiples of the patch size {patch}, got "
                f"{height}x{width}; resize or pad the image (e.g. to {-(-height // patch) * patch}x{-(-width // patch) * patch})"
            )
        x = self.patch_embed(x)
        self.spa_context.begin(tuple(x.shape[1:3]))
        return x

    def _run_stage(self, stage: nn.Module, x: Tensor) -> Tensor:
        """One stage; with grad checkpointing an SPA stage runs as SPTStage.forward does, block by block
        under non-reentrant checkpoints (Swin stages checkpoint their own blocks)."""
        if self.grad_checkpointing and isinstance(stage, SPTStage) and not torch.jit.is_scripting():
            return checkpoint_seq(stage.blocks, stage.downsample(x), use_reentrant=False)
        return stage(x)

    def forward_features(self, x: Tensor) -> Tensor:
        """Final (B, H/32, W/32, C) map after the last norm (NHWC, as timm's Swin)."""
        with dense_on_meta(self.spa_context, x):
            x = self._embed(x)
            for stage in self.layers:
                x = self._run_stage(stage, x)
            return self.norm(x)

    def forward_intermediates(
        self,
        x: Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
        """timm's ``forward_intermediates``: NCHW stage outputs (all tokens, unpacked) and the final map."""
        if output_fmt != "NCHW":
            raise ValueError(f"SPT returns intermediates as NCHW, got output_fmt={output_fmt!r}")
        take, last = feature_take_indices(len(self.layers), indices)
        stages = self.layers[: last + 1] if stop_early or intermediates_only else self.layers
        intermediates = []
        with dense_on_meta(self.spa_context, x):
            x = self._embed(x)
            for i, stage in enumerate(stages):
                x = self._run_stage(stage, x)
                if i in take:
                    y = self.norm(x) if norm and i == len(self.layers) - 1 else x
                    intermediates.append(y.permute(0, 3, 1, 2).contiguous())
        if intermediates_only:
            return intermediates
        return self.norm(x) if len(stages) == len(self.layers) else x, intermediates

    def token_grids(self, image_size: tuple[int, int]) -> list[TokenGrid]:
        """Every stage's token grid and pixel stride for an input of ``image_size`` (patch merging pads
        odd grids at the bottom/right, so a grid may cover a padded image: ceil halving)."""
        patch = self.config.patch_size
        if image_size[0] % patch or image_size[1] % patch:
            raise ValueError(f"image size {tuple(image_size)} is not a multiple of the patch size {patch}")
        grid = (image_size[0] // patch, image_size[1] // patch)
        grids = []
        for stage in range(len(self.layers)):
            if stage > 0:
                grid = (-(-grid[0] // 2), -(-grid[1] // 2))
            stride = patch * 2**stage
            grids.append(TokenGrid(grid, (stride, stride)))
        return grids

    def forward_pyramid(self, x: Tensor) -> list[Tensor]:
        """One NCHW map per stage (strides 4, 8, 16, 32) for dense heads."""
        return self.forward_intermediates(x, intermediates_only=True)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def _config_from_swin(swin: SwinTransformer) -> dict[str, Any]:
    """SPTConfig fields read off a timm ``SwinTransformer``."""
    img_h, img_w = swin.patch_embed.img_size
    patch_h, patch_w = swin.patch_embed.patch_size
    if img_h != img_w or patch_h != patch_w:
        raise ValueError("spt_from_swin supports square image and patch sizes")
    first = swin.layers[0].blocks[0]
    return dict(
        img_size=img_h,
        patch_size=patch_h,
        in_chans=swin.in_chans,
        num_classes=swin.num_classes,
        global_pool=swin.global_pool,
        embed_dim=swin.embed_dim,
        depths=tuple(len(stage.blocks) for stage in swin.layers),
        num_heads=tuple(stage.blocks[0].attn.num_heads for stage in swin.layers),
        window_size=max(stage.blocks[0].attn.window_size[0] for stage in swin.layers),
        mlp_ratio=first.mlp.fc1.out_features / first.mlp.fc1.in_features,
        qkv_bias=first.attn.qkv.bias is not None,
        drop_path_rate=round(max((m.drop_prob for m in swin.modules() if isinstance(m, DropPath)), default=0.0), 6),
    )


def load_swin_weights(spt: SPT, swin_state_dict: dict[str, Tensor]) -> list[str]:
    """Copy a timm Swin state dict into ``spt`` where the layers coincide; return the keys left as they were.

    The left keys are the gates, the ``plus4`` extra blocks and a head of another class count.
    Original Microsoft checkpoints are converted with timm's ``checkpoint_filter_fn`` first.
    """
    from timm.models.swin_transformer import checkpoint_filter_fn

    state = checkpoint_filter_fn(swin_state_dict, spt)
    own = spt.state_dict()
    unexpected = sorted(k for k in state if k not in own)
    if unexpected:
        raise ValueError(f"Swin weights {unexpected[:5]}... have no place in this SPT; build it with spt_from_swin")
    mismatched = sorted(k for k in state if state[k].shape != own[k].shape and not k.startswith("head."))
    if mismatched:
        raise ValueError(f"Swin weights {mismatched[:5]} differ in shape from this SPT's; check widths and window size")
    state = {k: v for k, v in state.items() if v.shape == own[k].shape}
    return spt.load_state_dict(state, strict=False).missing_keys


def spt_from_swin(swin: SwinTransformer, **settings: Any) -> SPT:
    """An SPT with the architecture and weights of a timm ``SwinTransformer`` and fresh gates.

    ``settings`` override :class:`SPTConfig` fields (e.g. ``spa_start_stage``, ``plus4``, ``spa``).
    """
    if not isinstance(swin, SwinTransformer):
        raise ValueError(f"spt_from_swin takes a timm SwinTransformer, got {type(swin).__name__}")
    spt = SPT(SPTConfig(**{**_config_from_swin(swin), **settings}))
    load_swin_weights(spt, swin.state_dict())
    return spt.to(next(swin.parameters()).device)


_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24)),
    "small": dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24)),
    "base": dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32)),
    "digits": dict(
        img_size=128,
        embed_dim=48,
        depths=(1, 1, 2, 2),
        num_heads=(3, 6, 12, 24),
        window_size=4,
        num_classes=0,
        drop_path_rate=0.0,
    ),
}

_SWIN_WEIGHTS_HOWTO = (
    "start from ImageNet Swin weights with spt_from_swin(timm.create_model('swin_tiny_patch4_window7_224', "
    "pretrained=True)) (swin_small_/swin_base_patch4_window7_224 for spt_small/spt_base; add plus4=True for "
    "the _plus4 presets)"
)


def _spt_cfg(**overrides: Any) -> dict[str, Any]:
    """A ``pretrained_cfg`` without weights (224 px ImageNet-style input by default)."""
    defaults = dict(
        input_size=(3, 224, 224),
        pool_size=(7, 7),
        interpolation="bicubic",
        crop_pct=0.9,
        mean=IMAGENET_DEFAULT_MEAN,
        std=IMAGENET_DEFAULT_STD,
        num_classes=1000,
        first_conv="patch_embed.proj",
        classifier="head.fc",
        paper_ids="arXiv:2410.23608",
        notes=("no hub weights: " + _SWIN_WEIGHTS_HOWTO,),
    )
    return {**defaults, **overrides}


default_cfgs = generate_default_cfgs(
    {
        **{name: _spt_cfg() for name in ("spt_tiny", "spt_small", "spt_base")},
        **{f"{name}_plus4": _spt_cfg() for name in ("spt_tiny", "spt_small", "spt_base")},
        "spt_digits": _spt_cfg(
            input_size=(3, 128, 128),
            pool_size=(4, 4),
            num_classes=0,
            notes=("no hub weights: train it (spa-viz train) or load the spt-digits checkpoint with spa_viz.load",),
        ),
    }
)

_CONFIG_FIELDS = frozenset(f.name for f in fields(SPTConfig))


def _build_spt(device: torch.device | str | None = None, dtype: torch.dtype | None = None, **settings: Any) -> SPT:
    """An SPT from :class:`SPTConfig` fields, created on ``device`` in ``dtype`` (timm's factory arguments)."""
    unknown = sorted(set(settings) - _CONFIG_FIELDS)
    if unknown:
        raise TypeError(
            f"SPT got unexpected arguments {unknown}; it takes the SPTConfig fields {sorted(_CONFIG_FIELDS)}"
        )
    with torch.device(device) if device is not None else nullcontext():
        model = SPT(SPTConfig(**settings))
    return model if dtype is None else model.to(dtype=dtype)


def _create(name: str, preset: str, pretrained: bool, plus4: bool, kwargs: dict[str, Any]) -> SPT:
    """Build a preset through timm's builder (pretrained_cfg, ``features_only`` via forward_intermediates)."""
    if pretrained:
        raise ValueError(f"{name} has no hub weights; {_SWIN_WEIGHTS_HOWTO}")
    out_indices = kwargs.pop("out_indices", (0, 1, 2, 3))
    return build_model_with_cfg(
        _build_spt,
        name,
        pretrained,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        **{**_PRESETS[preset], "plus4": plus4, **kwargs},
    )


@register_model
def spt_tiny(pretrained: bool = False, **kwargs: Any) -> SPT:
    """SPT-T: Swin-T widths (96, depths 2-2-6-2, heads 3-6-12-24), SPA in stages 3-4."""
    return _create("spt_tiny", "tiny", pretrained, False, kwargs)


@register_model
def spt_small(pretrained: bool = False, **kwargs: Any) -> SPT:
    """SPT-S: Swin-S widths (96, depths 2-2-18-2, heads 3-6-12-24), SPA in stages 3-4."""
    return _create("spt_small", "small", pretrained, False, kwargs)


@register_model
def spt_base(pretrained: bool = False, **kwargs: Any) -> SPT:
    """SPT-B: Swin-B widths (128, depths 2-2-18-2, heads 4-8-16-32), SPA in stages 3-4."""
    return _create("spt_base", "base", pretrained, False, kwargs)


@register_model
def spt_tiny_plus4(pretrained: bool = False, **kwargs: Any) -> SPT:
    """SPT-T with the paper's 4 extra stage-3 blocks (depths 2-2-10-2)."""
    return _create("spt_tiny_plus4", "tiny", pretrained, True, kwargs)


@register_model
def spt_small_plus4(pretrained: bool = False, **kwargs: Any) -> SPT:
    """SPT-S with 4 extra stage-3 blocks (depths 2-2-22-2)."""
    return _create("spt_small_plus4", "small", pretrained, True, kwargs)


@register_model
def spt_base_plus4(pretrained: bool = False, **kwargs: Any) -> SPT:
    """SPT-B with 4 extra stage-3 blocks (depths 2-2-22-2)."""
    return _create("spt_base_plus4", "base", pretrained, True, kwargs)


@register_model
def spt_digits(pretrained: bool = False, **kwargs: Any) -> SPT:
    """A small SPT for 128 px cluttered-digit images that trains on a CPU (width 48, window 4,
    grids 32/16/8/4, depths 1-1-2-2, no classifier head)."""
    return _create("spt_digits", "digits", pretrained, False, kwargs)
