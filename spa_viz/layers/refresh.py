"""Stale-token refresher **[ours, not in the SPA paper]**: a cheap update for tokens SPA skipped.

In SPA an unselected token passes a block unchanged, so a token that no SPA block selected reaches
the final norm with the features of the layer where it was dropped ("stale"). A dense head that
reads every token (the saliency decoder mixes neighbouring tokens) then decodes features from the
wrong depth; better gates cannot fix that. The refresher runs once, after the last block and before
the backbone's final norm, on the patch tokens that skipped ``k >= 1`` SPA blocks::

    x <- x + up(GELU(down(LayerNorm(x)) + embed[k] [+ context(LayerNorm'(x_cls))]))

with a low rank ``r`` and ``up`` zero-initialised, so a fresh refresher is the identity. ``x_cls``
is the image's first prefix token (the class token), which every SPA block keeps, so it is fresh
and summarises the whole image; this optional term (``context=True``; left out by default and
for models without prefix tokens) did not help consistently in our pilots. Tokens
that every SPA block selected (``k = 0``) are neither touched nor computed on. Cost: ``2 C r``
multiply-adds per refreshed token (``macs_per_token``), plus ``C r`` per image with the context
(``macs_per_image``), which the FLOP accounting adds to the SPA model's run cost
(:func:`spa_viz.analysis.flops.refresh_flops`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["RefreshDecision", "StaleTokenRefresh"]


class StaleTokenRefresh(nn.Module):
    """Low-rank residual update of the patch tokens that skipped ``k >= 1`` SPA blocks.

    ``max_skipped``: number of SPA blocks (skip counts above it share the last embedding).
    ``context``: also condition the update on the image's class token.
    """

    def __init__(self, dim: int, rank: int = 64, max_skipped: int = 8, context: bool = False) -> None:
        super().__init__()
        if rank < 1 or max_skipped < 1:
            raise ValueError(f"rank and max_skipped must be >= 1, got rank={rank}, max_skipped={max_skipped}")
        self.dim, self.rank, self.max_skipped = dim, rank, max_skipped
        self.norm = nn.LayerNorm(dim)
        self.down = nn.Linear(dim, rank)
        self.embed = nn.Embedding(max_skipped, rank)  # row k - 1 for a token that skipped k blocks
        self.up = nn.Linear(rank, dim)
        self.context_norm = nn.LayerNorm(dim) if context else None
        self.context = nn.Linear(dim, rank, bias=False) if context else None
        nn.init.trunc_normal_(self.embed.weight, std=0.02)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    @property
    def macs_per_token(self) -> int:
        """Multiply-adds of the two projections per refreshed token (norms and GELU not counted)."""
        return self.down.weight.numel() + self.up.weight.numel()

    @property
    def macs_per_image(self) -> int:
        """Multiply-adds of the class-token context projection, once per image (0 without context)."""
        return 0 if self.context is None else self.context.weight.numel()

    def settings(self) -> dict[str, Any]:
        """Constructor arguments, as recorded in a checkpoint's config.json."""
        return {"rank": self.rank, "max_skipped": self.max_skipped, "context": self.context is not None}

    def forward(self, x: Tensor, skipped: Tensor, num_prefix: int) -> Tensor:
        """Tokens ``x`` (B, T, C) with the stale patch tokens updated; ``skipped`` (B, T - num_prefix) counts.

        Only the rows with ``skipped > 0`` are gathered, updated and added back (out of place, so
        gradients reach both ``x`` and the refresher).
        """
        batch, seq_len, dim = x.shape
        patches = seq_len - num_prefix
        if skipped.shape != (batch, patches):
            raise ValueError(f"skip counts {tuple(skipped.shape)} do not match {patches} patch tokens of {batch} images")
        flat_skipped = skipped.reshape(-1)
        index = flat_skipped.nonzero().squeeze(1)
        if index.numel() == 0:
            return x
        level = flat_skipped[index].clamp(max=self.max_skipped).long() - 1
        image = index // patches
        rows = image * seq_len + num_prefix + index % patches
        flat = x.reshape(-1, dim)
        hidden = self.down(self.norm(flat[rows])) + self.embed(level)
        if self.uses_context(num_prefix):
            hidden = hidden + self.context(self.context_norm(x[:, 0]))[image]
        return flat.index_add(0, rows, self.up(F.gelu(hidden)).to(flat.dtype)).view_as(x)

    def uses_context(self, num_prefix: int) -> bool:
        """Whether the class-token context runs for tokens with ``num_prefix`` prefix tokens."""
        return self.context is not None and num_prefix > 0


@dataclass(frozen=True)
class RefreshDecision:
    """What the refresher did in one traced forward pass (tensors on the CPU)."""

    skipped: Tensor
    """(B, N) SPA blocks that did not select each patch token."""
    macs_per_token: int
    macs_per_image: int
    """Context multiply-adds per image of the batch (0 when no token was refreshed: nothing ran)."""

    @property
    def refreshed_counts(self) -> Tensor:
        """(B,) patch tokens the refresher updated per image."""
        return (self.skipped > 0).sum(1)
