"""Pack the kept tokens of a whole batch into a few dense rows, and scatter them back.

Two policies:

* ``container`` (the paper's): rows ("containers") of fixed length L are filled one after
  another with the kept tokens of the batch, in raster order within an image and images in batch
  order. A container may hold the tail of one image and the head of the next; only the last
  container is padded. Attention is restricted to same-image tokens of the same container.
* ``image`` (after NaViT's Patch n' Pack): whole images are bin-packed first-fit-decreasing into
  rows of capacity ``max(L, largest image)``, so attention is exactly per image.

A :class:`PackPlan` records where every kept token goes; it is what the app draws. The SPA kernel
runs the kept tokens *flat*, image by image (``gather_kept``: (n, C), no padding), and only its
attention looks at the rows: per same-image *run* (the plan lists them as plain Python tuples) or
on the padded rows with the block mask (``to_rows`` / ``from_rows``). Planning also notes whether
any row mixes images and whether any slot is padding, so attention can skip the mask when it can.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

__all__ = [
    "POLICIES",
    "PackPlan",
    "Run",
    "from_rows",
    "gather_kept",
    "pack",
    "plan_packing",
    "scatter_kept",
    "to_rows",
    "unpack",
]

POLICIES = ("container", "image")

Run = tuple[int, int, int, int, int]
"""``(flat_start, row, start, length, image)``: one same-image run of kept tokens in one row."""


@dataclass(frozen=True, eq=False)
class PackPlan:
    """Where each kept token of a batch sits in the packed (rows x row_len) layout.

    ``sources`` (n,) holds ``image * seq_len + token`` of every kept token in *flat order* (image by
    image, in the packing order within an image); ``slots`` (n,) the slot (``row * row_len + col``)
    of each, or None when flat token i sits in slot i (containers). ``counts`` are the kept tokens
    per image, ``runs`` the same-image runs (:data:`Run`). ``mixed_rows``: some row holds tokens of
    more than one image; ``has_padding``: some slot is empty.
    """

    policy: str
    batch_size: int
    seq_len: int
    row_len: int
    num_rows: int
    sources: Tensor
    slots: Tensor | None
    counts: tuple[int, ...]
    runs: tuple[Run, ...]
    mixed_rows: bool
    has_padding: bool

    @property
    def num_slots(self) -> int:
        return self.num_rows * self.row_len

    @property
    def num_kept(self) -> int:
        return int(self.sources.numel())

    @property
    def fill_ratio(self) -> float:
        """Share of packed slots holding a real token (1 - padding share)."""
        return self.num_kept / max(self.num_slots, 1)

    @cached_property
    def kept_counts(self) -> Tensor:
        """(B,) kept tokens per image."""
        return torch.tensor(self.counts, dtype=torch.long, device=self.sources.device)

    @cached_property
    def valid_slots(self) -> Tensor:
        """(n,) the slot of every kept token, in flat order (pairs with :attr:`valid_sources`)."""
        if self.slots is None:
            return torch.arange(self.num_kept, device=self.sources.device)
        return self.slots

    @property
    def valid_sources(self) -> Tensor:
        """(n,) flat source indices (image * seq_len + token) of the kept tokens, in flat order."""
        return self.sources

    @cached_property
    def flat_position(self) -> Tensor:
        """(B * seq_len,) long: where each ``image * seq_len + token`` sits in the flat kept order, -1 if
        not kept (the inverse of :attr:`sources`)."""
        position = torch.full((self.batch_size * self.seq_len,), -1, dtype=torch.long, device=self.sources.device)
        position[self.sources] = torch.arange(self.num_kept, device=self.sources.device)
        return position

    @cached_property
    def slot_source(self) -> Tensor:
        """(B', L) long: ``image * seq_len + token`` of every slot, -1 for padding."""
        slot_source = torch.full((self.num_slots,), -1, dtype=torch.long, device=self.sources.device)
        slot_source[self.valid_slots] = self.sources
        return slot_source.view(self.num_rows, self.row_len)

    @cached_property
    def valid(self) -> Tensor:
        """(B', L) bool: slot holds a token."""
        return self.slot_source >= 0

    @cached_property
    def slot_image(self) -> Tensor:
        """(B', L) long: source image of each slot, -1 for padding."""
        return torch.where(self.valid, self.slot_source // self.seq_len, -1)

    @cached_property
    def slot_token(self) -> Tensor:
        """(B', L) long: token index (prefix tokens included) of each slot, -1 for padding."""
        return torch.where(self.valid, self.slot_source % self.seq_len, -1)

    @cached_property
    def segments(self) -> Tensor:
        """(S, 4) long rows ``(row, start, length, image)``: the same-image runs in slot order."""
        ordered = sorted(self.runs, key=lambda run: (run[1], run[2]))
        rows = [(row, start, length, image) for _, row, start, length, image in ordered]
        return torch.tensor(rows, dtype=torch.long).reshape(-1, 4)

    @cached_property
    def attention_mask(self) -> Tensor | None:
        """Bool mask broadcastable to (B', heads, L, L) over the rows: query may attend key; None if all may.

        Rows mixing images get the full same-image mask (B', 1, L, L), where padding slots attend
        only to padding so that no query row is empty (SDPA would give NaN); rows of one image with
        padding get a key mask (B', 1, 1, L). Padding outputs are dropped by :func:`from_rows`.
        """
        if self.mixed_rows:
            seg = self.slot_image
            return (seg[:, :, None] == seg[:, None, :]).unsqueeze(1)
        if self.has_padding:
            return self.valid[:, None, None, :]
        return None

    def to(self, device: torch.device | str) -> PackPlan:
        """A copy with its tensors on ``device``."""
        return PackPlan(
            self.policy,
            self.batch_size,
            self.seq_len,
            self.row_len,
            self.num_rows,
            self.sources.to(device),
            None if self.slots is None else self.slots.to(device),
            self.counts,
            self.runs,
            self.mixed_rows,
            self.has_padding,
        )


def _first_fit_decreasing(counts: list[int], capacity: int) -> list[tuple[int, int]]:
    """(row, offset) for every image, packing whole images first-fit-decreasing."""
    order = sorted(range(len(counts)), key=lambda i: (-counts[i], i))
    free: list[int] = []
    place: list[tuple[int, int]] = [(0, 0)] * len(counts)
    for i in order:
        c = counts[i]
        for row, room in enumerate(free):
            if room >= c:
                place[i] = (row, capacity - room)
                free[row] = room - c
                break
        else:
            place[i] = (len(free), 0)
            free.append(capacity - c)
    return place


def _container_runs(counts: list[int], length: int) -> list[Run]:
    """The runs of images poured one after another into containers of ``length`` slots."""
    runs: list[Run] = []
    flat = 0
    for image, count in enumerate(counts):
        end = flat + count
        while flat < end:
            row, start = divmod(flat, length)
            size = min(length - start, end - flat)
            runs.append((flat, row, start, size, image))
            flat += size
    return runs


def plan_packing(
    keep: Tensor,
    policy: str = "image",
    row_len: int | None = None,
    *,
    counts: list[int] | None = None,
    source_map: Tensor | None = None,
    seq_len: int | None = None,
) -> PackPlan:
    """Build the pack plan of a (B, T) boolean keep mask.

    ``row_len`` is the container length L for ``container`` (required) and the minimum row capacity
    for ``image`` (default: the largest image's kept count). Tokens are packed in ``keep``'s order;
    ``source_map`` (B * T,) optionally maps each of those positions to the source index the plan
    records (``image * seq_len + token``), for backbones that pack in another order than they store
    (SPT packs in window order, stores raster order). ``counts``: the kept tokens per image, when the
    caller already has them (saves a pass and a host sync).
    """
    if keep.dim() != 2 or keep.dtype != torch.bool:
        raise ValueError(f"keep must be a (B, T) bool tensor, got {keep.dtype} {tuple(keep.shape)}")
    if policy not in POLICIES:
        raise ValueError(f"unknown packing policy {policy!r}; choose one of {POLICIES}")
    if row_len is not None and row_len < 1:
        raise ValueError(f"container length L must be >= 1, got {row_len}")
    if policy == "container" and row_len is None:
        raise ValueError("the container policy needs a container length L (row_len), e.g. 49")
    batch, positions = keep.shape
    if counts is None:
        counts = keep.sum(1).tolist()
    elif len(counts) != batch:
        raise ValueError(f"got {len(counts)} counts for a batch of {batch}")
    sources = keep.reshape(-1).nonzero().squeeze(1)
    if source_map is not None:
        if source_map.shape != (batch * positions,) or seq_len is None:
            raise ValueError("source_map must be (B * T,) and comes with the stored seq_len")
        sources = source_map[sources]
    seq_len = positions if seq_len is None else seq_len
    total = sum(counts)

    if policy == "container":
        rows = max(-(-total // row_len), 1)
        ends = list(itertools.accumulate(counts))[:-1]
        mixed = any(0 < end < total and end % row_len for end in ends)
        runs = _container_runs(counts, row_len)
        return PackPlan(
            policy,
            batch,
            seq_len,
            row_len,
            rows,
            sources,
            None,
            tuple(counts),
            tuple(runs),
            mixed,
            rows * row_len != total,
        )

    length = max(row_len or 0, max(counts, default=0), 1)
    if batch == 1 and length == total:  # one image filling one row: the plan is its kept tokens (the app's case)
        return PackPlan(
            policy, 1, seq_len, length, 1, sources, None, tuple(counts), ((0, 0, 0, total, 0),), False, False
        )
    place = _first_fit_decreasing(counts, length)
    rows = max((r for r, _ in place), default=0) + 1
    images_per_row = [0] * rows
    filled = [0] * rows
    runs = []
    flat = 0
    for image, ((row, offset), count) in enumerate(zip(place, counts)):
        if count:
            runs.append((flat, row, offset, count, image))
            images_per_row[row] += 1
            filled[row] += count
        flat += count
    mixed = any(n > 1 for n in images_per_row)
    has_padding = any(f != length for f in filled)
    slots = None
    if any(row * length + offset != flat_start for flat_start, row, offset, _, _ in runs):
        starts = torch.tensor([r * length + o - f for f, r, o, _, _ in runs], dtype=torch.long, device=keep.device)
        sizes = torch.tensor([size for _, _, _, size, _ in runs], dtype=torch.long, device=keep.device)
        slots = torch.arange(total, device=keep.device) + starts.repeat_interleave(sizes, output_size=total)
    return PackPlan(
        policy, batch, seq_len, length, rows, sources, slots, tuple(counts), tuple(runs), mixed, has_padding
    )


def gather_kept(x: Tensor, plan: PackPlan) -> Tensor:
    """The kept tokens of ``x`` (B, T, C) as a flat (n, C) tensor in the plan's flat order (no padding)."""
    batch, seq_len, dim = x.shape
    if (batch, seq_len) != (plan.batch_size, plan.seq_len):
        raise ValueError(f"x has shape {tuple(x.shape)} but the plan is for ({plan.batch_size}, {plan.seq_len}, C)")
    return x.reshape(batch * seq_len, dim).index_select(0, plan.sources)


def scatter_kept(tokens: Tensor, plan: PackPlan, base: Tensor) -> Tensor:
    """Write flat kept tokens (n, C) back into a copy of ``base`` (B, T, C); unkept tokens keep ``base``."""
    batch, seq_len, dim = base.shape
    out = base.reshape(batch * seq_len, dim).index_copy(0, plan.sources, tokens)
    return out.view(batch, seq_len, dim)


def to_rows(tokens: Tensor, plan: PackPlan) -> Tensor:
    """Flat kept tokens (n, *F) -> the padded rows (B', L, *F); padding is zero."""
    feature = tokens.shape[1:]
    if plan.slots is None:
        padding = plan.num_slots - plan.num_kept
        rows = torch.cat([tokens, tokens.new_zeros(padding, *feature)]) if padding else tokens
    else:
        rows = tokens.new_zeros(plan.num_slots, *feature).index_copy(0, plan.slots, tokens)
    return rows.view(plan.num_rows, plan.row_len, *feature)


def from_rows(rows: Tensor, plan: PackPlan) -> Tensor:
    """The padded rows (B', L, *F) -> flat kept tokens (n, *F) (padding dropped)."""
    flat = rows.reshape(plan.num_slots, *rows.shape[2:])
    if plan.slots is None:
        return flat[: plan.num_kept]
    return flat.index_select(0, plan.slots)


def pack(x: Tensor, plan: PackPlan) -> Tensor:
    """Gather the kept tokens of ``x`` (B, T, C) into the padded rows (B', L, C); padding slots are zero."""
    return to_rows(gather_kept(x, plan), plan)


def unpack(packed: Tensor, plan: PackPlan, base: Tensor) -> Tensor:
    """Scatter the rows (B', L, C) back into a copy of ``base`` (B, T, C); unkept tokens keep ``base``."""
    return scatter_kept(from_rows(packed, plan), plan, base)
