"""Pack the kept tokens of a whole batch into a few dense rows, and scatter them back.

Two policies:

* ``container`` (the paper's): rows ("containers") of fixed length L are filled one after
  another with the kept tokens of the batch, in raster order within an image and images in batch
  order. A container may hold the tail of one image and the head of the next; only the last
  container is padded. Attention is restricted to same-image tokens of the same container.
* ``image`` (after NaViT's Patch n' Pack): whole images are bin-packed first-fit-decreasing into
  rows of capacity ``max(L, largest image)``, so attention is exactly per image.

A :class:`PackPlan` records where every packed slot comes from; it is what the app draws. Planning
also notes, in plain Python, whether any row holds more than one image and whether any slot is
padding, so attention can skip the mask (and its slower kernel) when a row is one image's tokens.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

__all__ = ["POLICIES", "PackPlan", "plan_packing", "pack", "unpack", "gather_kept", "scatter_kept"]

POLICIES = ("container", "image")


@dataclass(frozen=True, eq=False)
class PackPlan:
    """Where each slot of the packed (rows x row_len) batch comes from.

    ``slot_source`` holds ``image * seq_len + token`` for every slot, or -1 for padding.
    ``mixed_rows``: some row holds tokens of more than one image; ``has_padding``: some slot is empty.
    """

    policy: str
    batch_size: int
    seq_len: int
    row_len: int
    slot_source: Tensor
    kept_counts: Tensor
    mixed_rows: bool = True
    has_padding: bool = True

    @property
    def num_rows(self) -> int:
        """B': the number of packed rows (containers)."""
        return int(self.slot_source.shape[0])

    @property
    def num_slots(self) -> int:
        return self.num_rows * self.row_len

    @property
    def num_kept(self) -> int:
        return int(self.kept_counts.sum())

    @property
    def fill_ratio(self) -> float:
        """Share of packed slots holding a real token (1 - padding share)."""
        return self.num_kept / max(self.num_slots, 1)

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
    def runs(self) -> list[tuple[int, int, int, int]]:
        """``(flat_start, row, start, length)`` of every same-image run, in slot order; ``flat_start``
        is the run's offset among the kept tokens (:func:`gather_kept` order). Plain Python ints."""
        if not self.mixed_rows:
            length, total = self.row_len, self.num_kept
            if not self.has_padding or self.policy == "container":  # full rows, only the last one short
                sizes = [min(length, total - r * length) for r in range(self.num_rows)]
                return [(r * length, r, 0, size) for r, size in enumerate(sizes) if size > 0]
        runs, flat = [], 0
        for row, start, size, _ in self.segments.tolist():
            runs.append((flat, row, start, size))
            flat += size
        return runs

    @cached_property
    def valid_slots(self) -> Tensor:
        """Flat indices of the non-padding slots, in slot order."""
        return self.valid.reshape(-1).nonzero().squeeze(1)

    @cached_property
    def valid_sources(self) -> Tensor:
        """Flat source indices (image * seq_len + token) of the non-padding slots, in slot order."""
        if not self.has_padding:
            return self.slot_source.reshape(-1)
        return self.slot_source.reshape(-1)[self.valid_slots]

    @cached_property
    def gather_index(self) -> Tensor:
        """(B' * L,) source index of every slot; padding reads token 0 of image 0 (then zeroed)."""
        flat = self.slot_source.reshape(-1)
        return flat.clamp(min=0) if self.has_padding else flat

    @cached_property
    def attention_mask(self) -> Tensor | None:
        """Bool mask broadcastable to (B', heads, L, L): query may attend key; None if all may.

        Rows mixing images get the full same-image mask (B', 1, L, L), where padding slots attend
        only to padding so that no query row is empty (SDPA would give NaN); rows of one image with
        padding get a key mask (B', 1, 1, L). Padding outputs are dropped by :func:`unpack`.
        """
        if self.mixed_rows:
            seg = self.slot_image
            return (seg[:, :, None] == seg[:, None, :]).unsqueeze(1)
        if self.has_padding:
            return self.valid[:, None, None, :]
        return None

    @cached_property
    def segments(self) -> Tensor:
        """(S, 4) long rows ``(row, start, length, image)``: maximal same-image runs per row."""
        seg = self.slot_image
        length = seg.shape[1]
        flat = seg.reshape(-1)
        pos = torch.arange(flat.numel(), device=flat.device)
        new_run = torch.ones_like(flat, dtype=torch.bool)
        new_run[1:] = (flat[1:] != flat[:-1]) | (pos[1:] % length == 0)
        run_starts = pos[new_run]
        run_ends = torch.cat([run_starts[1:], pos.new_tensor([flat.numel()])])
        real = flat[run_starts] >= 0
        starts = run_starts[real]
        lengths = (run_ends - run_starts)[real]
        return torch.stack([starts // length, starts % length, lengths, flat[starts]], dim=1)

    def to(self, device: torch.device | str) -> PackPlan:
        """A copy with its tensors on ``device``."""
        return PackPlan(
            self.policy,
            self.batch_size,
            self.seq_len,
            self.row_len,
            self.slot_source.to(device),
            self.kept_counts.to(device),
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
    ``source_map`` (B * T,) optionally maps each of those positions to the source index the slots
    record (``image * seq_len + token``), for backbones that pack in another order than they store
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
    device = keep.device
    if counts is None:
        counts_list = keep.sum(1).tolist()
    elif len(counts) != batch:
        raise ValueError(f"got {len(counts)} counts for a batch of {batch}")
    else:
        counts_list = list(counts)
    counts = torch.tensor(counts_list, dtype=torch.long, device=device)
    total = sum(counts_list)
    sources = keep.reshape(-1).nonzero().squeeze(1)
    if source_map is not None:
        if source_map.shape != (batch * positions,) or seq_len is None:
            raise ValueError("source_map must be (B * T,) and comes with the stored seq_len")
        sources = source_map[sources]
    seq_len = positions if seq_len is None else seq_len

    if policy == "container":
        rows = max(-(-total // row_len), 1)
        length = row_len
        ends = itertools.accumulate(counts_list)
        mixed = any(end % length for end in list(ends)[:-1] if 0 < end < total)
        has_padding = rows * length != total
        if not has_padding:
            return PackPlan(policy, batch, seq_len, length, sources.view(rows, length), counts, mixed, False)
        slots = torch.arange(total, device=device)
    else:
        length = max(row_len or 0, max(counts_list, default=0), 1)
        if batch == 1 and length == total:  # one image filling one row: the plan is its kept tokens
            return PackPlan(policy, batch, seq_len, length, sources.view(1, length), counts, False, False)
        place = _first_fit_decreasing(counts_list, length)
        rows = max((r for r, _ in place), default=0) + 1
        per_row = [0] * rows
        filled = [0] * rows
        for (row, _), count in zip(place, counts_list):
            per_row[row] += count > 0
            filled[row] += count
        mixed = any(n > 1 for n in per_row)
        has_padding = any(f != length for f in filled)
        start = torch.tensor([r * length + o for r, o in place], device=device, dtype=torch.long)
        first = torch.cumsum(counts, 0) - counts
        image = sources // seq_len
        slots = start[image] + torch.arange(total, device=device) - first[image]

    slot_source = torch.full((rows * length,), -1, dtype=torch.long, device=device)
    slot_source[slots] = sources
    return PackPlan(policy, batch, seq_len, length, slot_source.view(rows, length), counts, mixed, has_padding)


def pack(x: Tensor, plan: PackPlan) -> Tensor:
    """Gather the kept tokens of ``x`` (B, T, C) into (B', L, C); padding slots are zero."""
    batch, seq_len, dim = x.shape
    if (batch, seq_len) != (plan.batch_size, plan.seq_len):
        raise ValueError(f"x has shape {tuple(x.shape)} but the plan is for ({plan.batch_size}, {plan.seq_len}, C)")
    packed = x.reshape(batch * seq_len, dim).index_select(0, plan.gather_index)
    packed = packed.view(plan.num_rows, plan.row_len, dim)
    if plan.has_padding:
        packed = packed.masked_fill(~plan.valid.unsqueeze(-1), 0.0)
    return packed


def gather_kept(x: Tensor, plan: PackPlan) -> Tensor:
    """The kept tokens of ``x`` (B, T, C) as a flat (n, C) tensor in slot order (no padding)."""
    batch, seq_len, dim = x.shape
    if (batch, seq_len) != (plan.batch_size, plan.seq_len):
        raise ValueError(f"x has shape {tuple(x.shape)} but the plan is for ({plan.batch_size}, {plan.seq_len}, C)")
    return x.reshape(batch * seq_len, dim).index_select(0, plan.valid_sources)


def scatter_kept(tokens: Tensor, plan: PackPlan, base: Tensor) -> Tensor:
    """Write flat kept tokens (n, C) back into a copy of ``base`` (B, T, C); unkept tokens keep ``base``."""
    batch, seq_len, dim = base.shape
    out = base.reshape(batch * seq_len, dim).index_copy(0, plan.valid_sources, tokens)
    return out.view(batch, seq_len, dim)


def unpack(packed: Tensor, plan: PackPlan, base: Tensor) -> Tensor:
    """Scatter packed tokens back into a copy of ``base`` (B, T, C); unkept tokens keep ``base``."""
    batch, seq_len, dim = base.shape
    flat = packed.reshape(-1, dim)
    if plan.has_padding:
        flat, sources = flat.index_select(0, plan.valid_slots), plan.valid_sources
    else:
        sources = plan.slot_source.reshape(-1)
    out = base.reshape(batch * seq_len, dim).index_copy(0, sources, flat)
    return out.view(batch, seq_len, dim)
