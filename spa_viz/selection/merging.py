"""Token merging (ToMe; Bolya et al., "Token Merging: Your ViT But Faster", ICLR 2023): a peer of SPA.

Where SPA *selects* tokens (unkept tokens skip a block and keep their value), ToMe *merges* them:
in each merging block, after attention and before the MLP, it pairs similar tokens by **bipartite
soft matching** and averages each pair, so every later layer runs on fewer tokens. Written from the
paper:

1. Split the tokens alternately into sets A and B (A: positions 0, 2, 4, ...; B: 1, 3, 5, ...).
2. Similarity: cosine similarity of the attention *keys* of the block (averaged over heads).
3. Each A token draws one edge to its most similar B token; the ``r`` most similar edges are kept.
4. Merge along those edges: a size-weighted mean of the features; sizes add (a token's size is how
   many patches it stands for). The remaining tokens of A and all of B form the new sequence.
5. **Proportional attention** in every block after a merge: ``softmax(q k^T / sqrt(d) + log s)``,
   so a merged token counts as the ``s`` patches it replaces.

Prefix tokens (class, registers) are never merged. A dense output (here a saliency map) needs every
patch token back: :meth:`TokenMerging.unmerge` copies each merged token's final value to every patch
it absorbed (the "unmerge" of ToMe for dense prediction), before the final norm and the decoder.

:class:`TokenMerging` runs a timm ``VisionTransformer``'s blocks itself (their ``norm1``, ``attn``
parts, ``ls1``, ``norm2``, ``mlp``, ``ls2``), merging ``r`` tokens in each block of ``layers`` and
running the blocks after the first merge on the merged tokens, and counts the multiply-adds it ran
(:meth:`TokenMerging.block_macs`, the same per-token costs as the SPA MAC counter, plus the matching).
SPA blocks of a patched model are run through their parts too, so SPA selection never runs here.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from spa_viz.layers.block import BlockCosts

__all__ = ["MergeResult", "TokenMerging", "bipartite_soft_matching", "merge_tokens", "merging_forward"]


@dataclass
class _Matching:
    """One merge step: which A tokens stay, which merge into which B token."""

    unmerged: Tensor  # (B, Ta - r) indices into A, ascending
    sources: Tensor  # (B, r) indices into A
    destinations: Tensor  # (B, r) indices into B


def bipartite_soft_matching(metric: Tensor, r: int, protected: Tensor) -> _Matching:
    """Choose ``r`` merges from ``metric`` (B, T, c) by bipartite soft matching (steps 1-3 above).

    ``protected`` (B, T) bool marks tokens that must neither merge nor absorb (prefix tokens).
    """
    metric = metric / metric.norm(dim=-1, keepdim=True).clamp(min=1e-6)
    a, b = metric[:, ::2], metric[:, 1::2]
    scores = a @ b.transpose(-1, -2)  # (B, Ta, Tb)
    scores = scores.masked_fill(protected[:, ::2, None], -torch.inf).masked_fill(protected[:, None, 1::2], -torch.inf)
    best, destination = scores.max(dim=-1)
    order = best.argsort(dim=-1, descending=True, stable=True)
    sources = order[:, :r]
    return _Matching(order[:, r:].sort(dim=-1).values, sources, destination.gather(1, sources))


def merge_tokens(x: Tensor, size: Tensor, matching: _Matching) -> tuple[Tensor, Tensor]:
    """Apply a matching (step 4): size-weighted means; returns the new tokens (B, T - r, C) and sizes (B, T - r)."""
    channels = x.shape[-1]
    xa, xb = x[:, ::2], x[:, 1::2]
    sa, sb = size[:, ::2], size[:, 1::2]
    src = matching.sources
    dst = matching.destinations
    moved = (xa * sa[..., None]).gather(1, src[..., None].expand(-1, -1, channels))
    moved_size = sa.gather(1, src)
    b_size = sb.scatter_add(1, dst, moved_size)
    b_sum = (xb * sb[..., None]).scatter_add(1, dst[..., None].expand(-1, -1, channels), moved)
    kept = xa.gather(1, matching.unmerged[..., None].expand(-1, -1, channels))
    merged = torch.cat([kept, b_sum / b_size[..., None]], dim=1)
    return merged, torch.cat([sa.gather(1, matching.unmerged), b_size], dim=1)


def _positions(tokens: int, matching: _Matching) -> Tensor:
    """(B, T) new position of every current token after the matching."""
    batch, kept = matching.unmerged.shape
    a_count, b_count = (tokens + 1) // 2, tokens // 2
    device = matching.unmerged.device
    a_pos = torch.empty(batch, a_count, dtype=torch.long, device=device)
    a_pos.scatter_(1, matching.unmerged, torch.arange(kept, device=device).expand(batch, -1))
    a_pos.scatter_(1, matching.sources, kept + matching.destinations)
    positions = torch.empty(batch, tokens, dtype=torch.long, device=device)
    positions[:, ::2] = a_pos
    positions[:, 1::2] = kept + torch.arange(b_count, device=device)
    return positions


@dataclass
class MergeResult:
    """What one merged forward ran: tokens entering each block and the MACs per image of the blocks."""

    tokens_per_block: list[int] = field(default_factory=list)
    merged_per_block: list[int] = field(default_factory=list)
    block_macs: int = 0
    groups: Tensor | None = None
    """(B, P + N) the final (merged) token each input token ended in: its merge group."""


class TokenMerging(nn.Module):
    """ToMe for a timm ViT: merge ``r`` tokens in each block of ``layers``; unmerge for dense outputs.

    ``r`` is one count for every merging block, or one per block of ``layers``. It never exceeds what
    a block can merge (the unprotected A tokens). The module holds no weights: it runs the backbone's.
    """

    name = "token_merging"
    learned = False

    def __init__(self, r: int | list[int], layers: list[int]) -> None:
        super().__init__()
        counts = [int(r)] * len(layers) if isinstance(r, int) else [int(v) for v in r]
        if len(counts) != len(layers):
            raise ValueError(f"got {len(counts)} merge counts for {len(layers)} layers; pass one r or one per layer")
        if any(v < 0 for v in counts):
            raise ValueError(f"merge counts must be >= 0, got {counts}")
        self.schedule = dict(zip([int(layer) for layer in layers], counts))

    @staticmethod
    def block_macs(block: nn.Module, tokens: int, merged: int) -> int:
        """MACs per image of one block on ``tokens`` tokens that merges ``merged`` of them before its MLP."""
        costs = BlockCosts.of(block)
        macs = tokens * (costs.qkv_macs + costs.proj_macs) + 2 * tokens * tokens * costs.attn_dim
        if merged:
            head_dim = costs.attn_dim // block.attn.num_heads
            macs += ((tokens + 1) // 2) * (tokens // 2) * head_dim  # the A x B key similarities
        return macs + (tokens - merged) * costs.mlp_macs

    def _block(
        self, block: nn.Module, x: Tensor, size: Tensor, r: int, protected: Tensor
    ) -> tuple[Tensor, Tensor, _Matching | None]:
        attn = block.attn
        batch, tokens, _ = x.shape
        h = block.norm1(x)
        qkv = attn.qkv(h).reshape(batch, tokens, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = attn.q_norm(q), attn.k_norm(k)
        bias = size.log()[:, None, None, :].to(q.dtype)  # proportional attention
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=attn.scale)
        out = attn.norm(out.transpose(1, 2).reshape(batch, tokens, -1))
        if getattr(attn, "gate", None) is not None:  # timm's optional per-token output gate
            out = out * attn.gate(h).sigmoid()
        out = attn.proj(out)
        x = x + block.ls1(out)
        matching = None
        if r > 0:
            matching = bipartite_soft_matching(k.mean(dim=1), r, protected)
            x, size = merge_tokens(x, size, matching)
        return x + block.ls2(block.mlp(block.norm2(x))), size, matching

    def forward_features(self, backbone: nn.Module, images: Tensor) -> tuple[Tensor, MergeResult]:
        """The backbone's final tokens (B, P + N, C), unmerged to the full grid, and what it ran.

        Runs ``backbone``'s embedding, its blocks (merging in ``layers``) and its final norm. No SPA
        block runs, so an SPA backbone's context forgets the last pack plan (nothing was dropped).
        """
        spa = getattr(backbone, "spa_context", None)
        if spa is not None:
            spa.last_plan = None
        x = backbone.patch_embed(images)
        x = backbone._pos_embed(x)
        x = backbone.norm_pre(backbone.patch_drop(x))
        batch, tokens, _ = x.shape
        prefix = int(backbone.num_prefix_tokens)
        size = torch.ones(batch, tokens, device=x.device, dtype=x.dtype)
        protected = torch.zeros(batch, tokens, dtype=torch.bool, device=x.device)
        protected[:, :prefix] = True
        source = torch.arange(tokens, device=x.device).expand(batch, -1)
        result = MergeResult()
        for layer, block in enumerate(backbone.blocks):
            current = x.shape[1]
            mergeable = (current + 1) // 2 - int(protected[0, ::2].sum())  # prefix positions agree across the batch
            r = min(self.schedule.get(layer, 0), max(mergeable, 0), current // 2)
            x, size, matching = self._block(block, x, size, r, protected)
            if matching is not None:
                positions = _positions(current, matching)
                source = positions.gather(1, source)
                # protected tokens never merge, so their new positions are theirs alone
                protected = torch.zeros(batch, x.shape[1], dtype=torch.bool, device=x.device).scatter_(
                    1, positions, protected
                )
            result.tokens_per_block.append(current)
            result.merged_per_block.append(r)
            result.block_macs += self.block_macs(block, current, r)
        result.groups = source
        return backbone.norm(self.unmerge(x, source)), result

    @staticmethod
    def unmerge(x: Tensor, source: Tensor) -> Tensor:
        """(B, N0, C): every original token takes the value of the merged token it ended in."""
        return x.gather(1, source[..., None].expand(-1, -1, x.shape[-1]))

    def extra_repr(self) -> str:
        return f"schedule={self.schedule}"


@contextmanager
def merging_forward(model: nn.Module, backbone: nn.Module, merging: TokenMerging) -> Iterator[list[MergeResult]]:
    """Inside the block, ``model``'s forward runs ``backbone`` through ``merging`` (unmerged output).

    Works for any model that calls ``backbone.forward_features`` (timm classifiers, the saliency and
    detection models of spa-viz): the backbone's ``forward_features`` is shadowed on the instance.
    Yields the list each forward appends its :class:`MergeResult` to.
    """
    results: list[MergeResult] = []

    def forward_features(images: Tensor, **unused: object) -> Tensor:
        if any(value is not None and value is not False for value in unused.values()):
            raise ValueError(f"token merging runs the plain forward; got {sorted(unused)}")
        tokens, result = merging.forward_features(backbone, images)
        results.append(result)
        return tokens

    backbone.forward_features = forward_features
    try:
        yield results
    finally:
        del backbone.forward_features
