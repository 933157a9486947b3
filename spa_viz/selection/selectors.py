"""Training-free token selectors: baselines that replace the learned SPA gate of any patched timm ViT.

A selector plugs in as ``block.gate`` (the one gate protocol of :mod:`spa_viz.layers.block`): it is
called as ``selector(tokens, num_prefix)`` on the block input and returns (B, N) patch-token scores,
``learned`` is False, and ``selector.select(scores, config)`` turns the scores into the keep mask.
The block then packs, attends and traces exactly as with the learned gate. Selector scores are not
fused across blocks, so each SPA block chooses afresh. The same selectors run on SPA-ViT and SPT;
those that need a class token (``cls_attention``) are refused up front on models without one
(:func:`applicable_selectors` lists what a model supports).

Selectors (``SELECTORS``):

* ``cls_attention`` (EViT-style): attention of the class token to every patch token, computed with
  the block's own ``norm1`` and ``attn.qkv`` (+ ``q_norm``/``k_norm``) on the block input, softmax
  over all tokens, averaged over heads. Default: top-p, the smallest set of patch tokens whose share
  of the class token's attention to patch tokens reaches ``p`` (so the count varies per image).
* ``feature_norm``: the L2 norm of each patch token. Default: top-k by ``ratio``.
* ``random``: uniform random scores from a generator seeded with ``seed + layer``, so every call on
  the same batch shape gives the same masks. Default: top-k by ``ratio``.
* ``uniform_topk``: the paper's "uniform top-50%" baseline: exactly ``ceil(ratio * N)`` tokens per
  image, ranked by class-token attention (``score="cls_attention"``, the standard training-free
  importance; EViT) or by ``score="feature_norm"``; the default ``score="auto"`` ranks by class-token
  attention where the model has a class token and by feature norm where it has none (SPT).

Every selector takes exactly one of ``ratio`` (keep ``ceil(ratio * N)`` highest-scoring tokens) or
``p`` (keep the smallest top set holding a share ``p`` of the total score), and keeps at least the
config's ``min_keep`` tokens per image. Selectors hold their block in a plain attribute (outside the
module tree), so the model's state dict and parameters are unchanged; :func:`install_selector` keeps
the learned gates aside and :func:`remove_selector` puts the very same modules back.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from spa_viz.layers.block import find_context, spa_blocks
from spa_viz.layers.config import SPAConfig

__all__ = [
    "SELECTORS",
    "TokenSelector",
    "applicable_selectors",
    "ClsAttentionSelector",
    "FeatureNormSelector",
    "RandomSelector",
    "UniformTopKSelector",
    "cls_attention_scores",
    "install_selector",
    "remove_selector",
    "installed_selector",
    "keep_counts",
    "top_counts_mask",
]

_LEARNED_GATE = "_spa_learned_gate"  # plain attribute of a block holding its stashed learned gate


def keep_counts(scores: Tensor, ratio: float | None, p: float | None, min_keep: int) -> Tensor:
    """(B,) number of tokens to keep per image by ``ratio`` (top-k) or ``p`` (top score mass)."""
    batch, n = scores.shape
    if ratio is not None:
        # the epsilon makes ratio = k / N give exactly k despite float rounding
        counts = torch.full((batch,), math.ceil(ratio * n - 1e-6), dtype=torch.long, device=scores.device)
    else:
        mass = scores.clamp(min=0).sort(dim=1, descending=True).values
        total = mass.sum(1, keepdim=True)
        share = mass.cumsum(1) / total.clamp(min=torch.finfo(mass.dtype).tiny)
        counts = (share < p).sum(1) + 1
        counts = torch.where(total.squeeze(1) > 0, counts, n)  # no score mass at all: keep everything
    return counts.clamp(min=min(min_keep, n), max=n)


def top_counts_mask(scores: Tensor, counts: Tensor) -> Tensor:
    """(B, N) bool: the ``counts[b]`` highest scores of each row (ties broken by token order)."""
    order = scores.argsort(dim=1, descending=True, stable=True)
    ranks = torch.empty_like(order).scatter_(
        1, order, torch.arange(scores.shape[1], device=scores.device).expand_as(order)
    )
    return ranks < counts[:, None]


class TokenSelector(nn.Module):
    """Base class: a training-free ``block.gate`` that scores tokens and keeps a top set.

    ``block`` is the SPA block the selector serves; it is held outside the module tree so the
    selector adds no parameters and no state-dict entries.
    """

    name = ""
    learned = False
    needs_class_token = False
    amount = "ratio"
    """The keep-amount parameter of the defaults: ``ratio`` (top-k share) or ``p`` (top score mass)."""
    default_params: dict[str, Any] = {"ratio": 0.5}

    def __init__(self, block: nn.Module, ratio: float | None = None, p: float | None = None) -> None:
        super().__init__()
        if (ratio is None) == (p is None):
            raise ValueError(f"selector {self.name!r} takes exactly one of ratio= or p=, got ratio={ratio}, p={p}")
        for label, value in (("ratio", ratio), ("p", p)):
            if value is not None and not 0.0 <= value <= 1.0:
                raise ValueError(f"{label} must lie in [0, 1], got {value}")
        object.__setattr__(self, "block", block)
        self.ratio = ratio
        self.p = p

    @property
    def layer(self) -> int:
        return int(self.block.spa_layer)

    @property
    def macs_per_token(self) -> int:
        """Multiply-adds the scoring costs per patch token (the core FLOP model counts 0 for it)."""
        return 0

    def scores(self, patch_tokens: Tensor, prefix_tokens: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, tokens: Tensor, num_prefix: int) -> Tensor:
        """(B, N) non-negative scores of the patch tokens of ``tokens`` (B, num_prefix + N, C).

        No gradient: selection is discrete.
        """
        with torch.no_grad():
            return self.scores(tokens[:, num_prefix:], tokens[:, :num_prefix])

    def select(self, scores: Tensor, config: SPAConfig) -> Tensor:
        """(B, N) bool keep mask: top ``ratio`` or top-``p`` mass, at least ``config.min_keep``."""
        return top_counts_mask(scores, keep_counts(scores, self.ratio, self.p, config.min_keep))

    def extra_repr(self) -> str:
        setting = f"ratio={self.ratio}" if self.ratio is not None else f"p={self.p}"
        return f"layer={self.layer}, {setting}"


def cls_attention_scores(block: nn.Module, patch_tokens: Tensor, prefix_tokens: Tensor) -> Tensor:
    """(B, N) head-averaged attention of the class token (prefix token 0) to each patch token.

    Uses the block's ``norm1`` and ``attn`` weights on the block input, as the block's own attention
    would (softmax over all prefix and patch tokens); only the class query and the keys are computed.
    """
    if prefix_tokens.shape[1] == 0:
        raise ValueError("cls_attention needs a class token; this model has no prefix tokens")
    attn = block.attn
    x = block.norm1(torch.cat([prefix_tokens, patch_tokens], dim=1))
    batch, seq_len, _ = x.shape
    heads = attn.num_heads
    inner = attn.qkv.out_features // 3
    weight, bias = attn.qkv.weight, attn.qkv.bias
    q_bias = None if bias is None else bias[:inner]
    k_bias = None if bias is None else bias[inner : 2 * inner]
    q = nn.functional.linear(x[:, :1], weight[:inner], q_bias).reshape(batch, 1, heads, -1).transpose(1, 2)
    k = nn.functional.linear(x, weight[inner : 2 * inner], k_bias).reshape(batch, seq_len, heads, -1).transpose(1, 2)
    q, k = attn.q_norm(q), attn.k_norm(k)
    probs = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # (B, H, 1, T)
    return probs.mean(1)[:, 0, prefix_tokens.shape[1] :]


class ClsAttentionSelector(TokenSelector):
    """EViT-style: keep the patch tokens the class token attends to most (default top-p 0.9)."""

    name = "cls_attention"
    needs_class_token = True
    amount = "p"
    default_params = {"p": 0.9}

    @property
    def macs_per_token(self) -> int:
        # the key projection of every token (the class query is one token per image)
        return self.block.attn.qkv.in_features * self.block.attn.qkv.out_features // 3

    def scores(self, patch_tokens: Tensor, prefix_tokens: Tensor) -> Tensor:
        return cls_attention_scores(self.block, patch_tokens, prefix_tokens)


class FeatureNormSelector(TokenSelector):
    """Keep the patch tokens with the largest L2 norm (default top 50%)."""

    name = "feature_norm"

    @property
    def macs_per_token(self) -> int:
        return self.block.attn.qkv.in_features

    def scores(self, patch_tokens: Tensor, prefix_tokens: Tensor) -> Tensor:
        return patch_tokens.float().norm(dim=-1).to(patch_tokens.dtype)


class RandomSelector(TokenSelector):
    """Keep random patch tokens; scores come from a CPU generator seeded with ``seed + layer``."""

    name = "random"

    def __init__(self, block: nn.Module, ratio: float | None = None, p: float | None = None, seed: int = 0) -> None:
        super().__init__(block, ratio, p)
        self.seed = int(seed)

    def scores(self, patch_tokens: Tensor, prefix_tokens: Tensor) -> Tensor:
        generator = torch.Generator(device="cpu").manual_seed(self.seed + self.layer)
        draws = torch.rand(patch_tokens.shape[:2], generator=generator)
        return draws.to(device=patch_tokens.device, dtype=patch_tokens.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, seed={self.seed}"


class UniformTopKSelector(TokenSelector):
    """The paper's uniform baseline: exactly ``ceil(ratio * N)`` tokens per image (default 50%)."""

    name = "uniform_topk"
    SCORES = ("auto", "cls_attention", "feature_norm")

    def __init__(self, block: nn.Module, ratio: float | None = 0.5, score: str = "auto") -> None:
        super().__init__(block, ratio=ratio)
        if score not in self.SCORES:
            raise ValueError(f"uniform_topk ranks by one of {self.SCORES}, got score={score!r}")
        if score == "auto":
            score = "cls_attention" if block.spa_context.num_prefix > 0 else "feature_norm"
        if score == "cls_attention" and block.spa_context.num_prefix < 1:
            raise ValueError("uniform_topk with score='cls_attention' needs a class token; use score='feature_norm'")
        self.score = score
        ranker = ClsAttentionSelector if score == "cls_attention" else FeatureNormSelector
        self.ranker = ranker(block, ratio=ratio)

    @property
    def macs_per_token(self) -> int:
        return self.ranker.macs_per_token

    def scores(self, patch_tokens: Tensor, prefix_tokens: Tensor) -> Tensor:
        return self.ranker.scores(patch_tokens, prefix_tokens)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, score={self.score}"


SELECTORS: dict[str, type[TokenSelector]] = {
    cls.name: cls for cls in (ClsAttentionSelector, FeatureNormSelector, RandomSelector, UniformTopKSelector)
}


def applicable_selectors(model: nn.Module) -> list[str]:
    """Names of the selectors that can run on ``model`` (those needing a class token only where it has one)."""
    has_class_token = find_context(model).num_prefix > 0
    return [name for name, cls in SELECTORS.items() if has_class_token or not cls.needs_class_token]


def installed_selector(model: nn.Module) -> str | None:
    """Name of the selector installed in ``model``'s SPA blocks, or None when the learned gates run."""
    gate = spa_blocks(model)[0].gate
    return gate.name if isinstance(gate, TokenSelector) else None


def install_selector(model: nn.Module, name: str | type[TokenSelector], **params: Any) -> list[TokenSelector]:
    """Replace every SPA block's gate of ``model`` by selector ``name`` (one instance per block).

    ``name`` is a key of :data:`SELECTORS` or a :class:`TokenSelector` subclass. ``params`` override
    the selector's defaults (``ratio`` or ``p``, plus ``seed`` for ``random`` and ``score`` for
    ``uniform_topk``). The learned gates are kept aside (not in the state dict while a selector is
    installed) until :func:`remove_selector`. Installing over a selector replaces it.
    """
    if isinstance(name, type) and issubclass(name, TokenSelector):
        cls = name
    elif name in SELECTORS:
        cls = SELECTORS[name]
    else:
        raise ValueError(f"unknown selector {name!r}; choose one of {sorted(SELECTORS)}")
    if cls.needs_class_token and find_context(model).num_prefix < 1:
        raise ValueError(
            f"selector {cls.name!r} needs a class token and this model has none; "
            f"selectors that apply: {applicable_selectors(model)}"
        )
    settings = dict(params) if {"ratio", "p"} & set(params) else {**cls.default_params, **params}
    blocks = spa_blocks(model)
    selectors = []
    for block in blocks:
        try:
            selectors.append(cls(block, **settings))
        except TypeError as err:
            raise ValueError(f"bad parameters {sorted(settings)} for selector {cls.name!r}: {err}") from err
    for block, selector in zip(blocks, selectors):
        if not isinstance(block.gate, TokenSelector):
            object.__setattr__(block, _LEARNED_GATE, block.gate)
        block.gate = selector
    return selectors


def remove_selector(model: nn.Module) -> None:
    """Put the learned gates back (the same modules, moved to the block's device and dtype)."""
    for block in spa_blocks(model):
        learned = block.__dict__.pop(_LEARNED_GATE, None)
        if learned is None:
            continue
        reference = next(block.attn.parameters())
        block.gate = learned.to(device=reference.device, dtype=reference.dtype)
