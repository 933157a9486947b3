"""The settings of SPA in a model, shared by all its SPA blocks and saved with checkpoints."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from spa_viz.io.config import from_dict
from spa_viz.layers.attention import BACKENDS
from spa_viz.layers.gate import check_fusion
from spa_viz.layers.packing import POLICIES

__all__ = ["SPAConfig", "DEFAULT_CONTAINER_LEN", "SOFT_GATING_MODES", "UNKEPT_MODES"]

DEFAULT_CONTAINER_LEN = 49  # the paper's L = M^2 for Swin windows of M = 7
UNKEPT_MODES = ("copy", "paper", "refresh")
"""What an unkept token becomes in an SPA block (see :mod:`spa_viz.layers.block`)."""
SOFT_GATING_MODES = ("always", "train", "gradient", "off")
"""Where ``sigmoid(s)`` scales the token updates: training and evaluation, training only, never."""


@dataclass
class SPAConfig:
    """What every SPA block of one model does; mutable so inference settings can change live.

    ``enabled=False`` makes every SPA block run its original dense computation (the dense twin).
    ``fusion`` is how a gate's logit is fused with earlier scores (``"stage"``, ``"chain"``,
    ``"none"``; see :mod:`spa_viz.layers.gate`). ``soft_gating`` scales the attention (and, with
    ``sparse_mlp``, the MLP) branch of each kept token by ``sigmoid(s)``, so the task loss reaches
    the gate: ``"always"``, ``"train"`` (training only: evaluation runs the hard decision alone),
    ``"gradient"`` (**[ours]** straight-through: the factor's value is 1, in training its gradient is
    sigmoid(s)'s, so training and evaluation run the same function and keep-all is the dense twin) or
    ``"off"``; ``True``/``False`` read as ``"always"``/``"off"`` (configs saved before v3).
    ``unkept`` is what a token the gate did not keep becomes: ``"copy"`` (unchanged), ``"paper"``
    (the paper's soft-gated output projection) or ``"refresh"`` (the update of its most similar kept
    token); see :mod:`spa_viz.layers.block`.
    """

    start_layer: int = 0
    policy: str = "image"
    container_len: int | None = None
    threshold: float = 0.5
    tau: float = 1.0
    min_keep: int = 1
    sparse_mlp: bool = True
    soft_gating: str | bool = "always"
    backend: str = "auto"
    gate_init_bias: float = 3.0
    fusion: str = "stage"
    unkept: str = "copy"
    enabled: bool = True

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError with a fix for any out-of-range setting."""
        check_fusion(self.fusion)
        if isinstance(self.soft_gating, bool):
            self.soft_gating = "always" if self.soft_gating else "off"
        if self.soft_gating not in SOFT_GATING_MODES:
            raise ValueError(f"unknown soft gating mode {self.soft_gating!r}; choose one of {SOFT_GATING_MODES}")
        if self.unkept not in UNKEPT_MODES:
            raise ValueError(f"unknown unkept mode {self.unkept!r}; choose one of {UNKEPT_MODES}")
        if self.policy not in POLICIES:
            raise ValueError(f"unknown packing policy {self.policy!r}; choose one of {POLICIES}")
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown attention backend {self.backend!r}; choose one of {BACKENDS}")
        if self.policy == "container" and self.container_len is None:
            self.container_len = DEFAULT_CONTAINER_LEN
        if self.container_len is not None and self.container_len < 1:
            raise ValueError(f"container length L must be >= 1, got {self.container_len}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must lie in [0, 1], got {self.threshold}")
        if self.tau <= 0:
            raise ValueError(f"tau must be > 0, got {self.tau}")
        if self.min_keep < 0:
            raise ValueError(f"min_keep must be >= 0, got {self.min_keep}")
        if self.start_layer < 0:
            raise ValueError(f"start_layer must be >= 0, got {self.start_layer}")

    def soft_gating_active(self, training: bool) -> bool:
        """Whether ``sigmoid(s)`` scales the token updates in this mode (training or evaluation)."""
        return self.soft_gating == "always" or (training and self.soft_gating in ("train", "gradient"))

    def update(self, **changes: Any) -> None:
        """Change settings in place (validated); unknown names raise ValueError."""
        names = {f.name for f in fields(self)}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise ValueError(f"unknown SPA settings {unknown}; known: {sorted(names)}")
        old = asdict(self)
        for name, value in changes.items():
            setattr(self, name, value)
        try:
            self.validate()
        except ValueError:
            for name, value in old.items():
                setattr(self, name, value)
            raise

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SPAConfig:
        """The settings of a config.json ``spa`` object, strictly (:func:`spa_viz.io.config.from_dict`)."""
        return from_dict(cls, data, where="SPA settings")
