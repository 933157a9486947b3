"""Pack the kept tokens of a whole batch into a few dense rows, and scatter them back.

Two policies:

* ``container`` (the paper's): rows ("containers") of fixed length L are filled one after
  another with the kept tokens of the batch, in raster order within an image and images in batch
  order. A container may hold the tail of one image and the head of the next; only the last
  container is padded. Attention is restricted to same-image tokens of the same container.
* ``image`` (after NaViT's Patch n' Pack): whole images are bin-packed first-fit-decreasing into
  rows of capacity ``max(L, largest image)``, so attention is exactly per image.

A :class:`PackPlan` records where every packed slot comes from; it is what the app draws.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

__all__ = ["POLICIES", "PackPlan", "plan_packing", "pack", "unpack"]

POLICIES = ("container", "image")


@dataclass(frozen=True, eq=False)
class PackPlan:
    """Where each slot of the packed (rows x row_len) batch comes from.

    ``slot_source`` holds ``image * seq_len + token`` for every slot, or -1 for padding.
    """

    policy: str
    batch_size: int
    seq_len: int
    row_len: int
    slot_source: Tensor
    kept_counts: Tensor

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
    def valid_slots(self) -> Tensor:
        """Flat indices of the non-padding slots, in slot order."""
        return self.valid.reshape(-1).nonzero().squeeze(1)

    @cached_property
    def valid_sources(self) -> Tensor:
        """Flat source indices (image * seq_len + token) of the non-padding slots."""
        return self.slot_source.reshape(-1)[self.valid_slots]

    @cached_property
    def attention_mask(self) -> Tensor:
        """(B', 1, L, L) bool: query may attend key (same image, same row; padding sees padding).

        Padding slots attend only to padding so that no query row is empty (SDPA would give NaN);
        their outputs are dropped by :func:`unpack`.
        """
        seg = self.slot_image
        return (seg[:, :, None] == seg[:, None, :]).unsqueeze(1)

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

    def to(self, device: torch.device | str) -> "PackPlan":
        """A copy with its tensors on ``device``."""
        return PackPlan(
            self.policy,
            self.batch_size,
            self.seq_len,
            self.row_len,
            self.slot_source.to(device),
            self.kept_counts.to(device),
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


def plan_packing(keep: Tensor, policy: str = "image", row_len: int | None = None) -> PackPlan:
    """Build the pack plan of a (B, T) boolean keep mask.

    ``row_len`` is the container length L for ``container`` (required) and the minimum row capacity
    for ``image`` (default: the largest image's kept count).
    """
    if keep.dim() != 2 or keep.dtype != torch.bool:
        raise ValueError(f"keep must be a (B, T) bool tensor, got {keep.dtype} {tuple(keep.shape)}")
    if policy not in POLICIES:
        raise ValueError(f"unknown packing policy {policy!r}; choose one of {POLICIES}")
    if row_len is not None and row_len < 1:
        raise ValueError(f"container length L must be >= 1, got {row_len}")
    batch, seq_len = keep.shape
    device = keep.device
    counts = keep.sum(1)
    sources = keep.reshape(-1).nonzero().squeeze(1)
    total = sources.numel()

    if policy == "container":
        if row_len is None:
            raise ValueError("the container policy needs a container length L (row_len), e.g. 49")
        rows = max(-(-total // row_len), 1)
        length = row_len
        slots = torch.arange(total, device=device)
    else:
        counts_list = counts.tolist()
        length = max(row_len or 0, max(counts_list, default=0), 1)
        place = _first_fit_decreasing(counts_list, length)
        rows = max((r for r, _ in place), default=0) + 1
        start = torch.tensor([r * length + o for r, o in place], device=device, dtype=torch.long)
        first = torch.cumsum(counts, 0) - counts
        image = sources // seq_len
        slots = start[image] + torch.arange(total, device=device) - first[image]

    slot_source = torch.full((rows * length,), -1, dtype=torch.long, device=device)
    slot_source[slots] = sources
    return PackPlan(policy, batch, seq_len, length, slot_source.view(rows, length), counts)


def pack(x: Tensor, plan: PackPlan) -> Tensor:
    """Gather the kept tokens of ``x`` (B, T, C) into (B', L, C); padding slots are zero."""
    batch, seq_len, dim = x.shape
    if (batch, seq_len) != (plan.batch_size, plan.seq_len):
        raise ValueError(f"x has shape {tuple(x.shape)} but the plan is for ({plan.batch_size}, {plan.seq_len}, C)")
    flat = x.reshape(batch * seq_len, dim)
    packed = flat.new_zeros(plan.num_slots, dim)
    packed = packed.index_copy(0, plan.valid_slots, flat.index_select(0, plan.valid_sources))
    return packed.view(plan.num_rows, plan.row_len, dim)


def unpack(packed: Tensor, plan: PackPlan, base: Tensor) -> Tensor:
    """Scatter packed tokens back into a copy of ``base`` (B, T, C); unkept tokens keep ``base``."""
    batch, seq_len, dim = base.shape
    flat = packed.reshape(-1, dim).index_select(0, plan.valid_slots)
    out = base.reshape(batch * seq_len, dim).index_copy(0, plan.valid_sources, flat)
    return out.view(batch, seq_len, dim)
