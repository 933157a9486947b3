"""What SPA backbones need to honour timm's model contract beyond timm's own building blocks.

* **Shape-only forwards on the meta device** (timm builds and checks models there) run the dense
  twin: choosing tokens needs their values, and an SPA block returns its input's shape whatever it
  keeps, so the dense twin gives exactly the shapes and dtypes SPA would.
* **Activation checkpointing** re-runs a block's forward during backward. An SPA block reads and
  writes its model's shared :class:`~spa_viz.layers.block.SPAContext` (the previous block's fused
  scores, the score list the selection loss reads, trace records), so a plain re-run would start
  from the state the whole forward pass left behind and choose other tokens. A
  :class:`RecomputeGuard` hands every re-run the state its first run started from and puts the
  state back afterwards, so gradients and what the context holds after ``backward`` are those of
  a run without checkpointing.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import fields
from typing import Any

from timm.layers import use_reentrant_ckpt
from torch import Tensor, nn

from spa_viz.layers.block import SPAContext

__all__ = ["RecomputeGuard", "dense_on_meta", "set_spa_grad_checkpointing"]

_State = dict[str, tuple[Any, Any]]


@contextmanager
def dense_on_meta(ctx: SPAContext, x: Tensor) -> Iterator[None]:
    """Run the SPA blocks as their dense twin while ``x`` lives on the meta device (shapes only)."""
    if x.device.type != "meta" or not ctx.config.enabled:
        yield
        return
    ctx.config.enabled = False
    try:
        yield
    finally:
        ctx.config.enabled = True


def _snapshot(ctx: SPAContext) -> _State:
    """Every field of ``ctx`` with a copy of the contents of its lists and dicts (blocks append in place)."""
    state: _State = {}
    for spec in fields(ctx):
        value = getattr(ctx, spec.name)
        contents = list(value) if isinstance(value, list) else dict(value) if isinstance(value, dict) else None
        state[spec.name] = (value, contents)
    return state


def _restore(ctx: SPAContext, state: _State) -> None:
    """Put ``ctx`` back to ``state``, refilling the same list and dict objects (callers may hold them)."""
    for name, (value, contents) in state.items():
        if isinstance(value, list):
            value[:] = contents
        elif isinstance(value, dict):
            value.clear()
            value.update(contents)
        setattr(ctx, name, value)


class RecomputeGuard:
    """Forward hooks on the SPA blocks that make checkpoint re-runs see the context of their first run.

    A re-run is recognised by its input: activation checkpointing calls the block again with the very
    tensor object it saved from the first call. The state saved for an input is dropped when that
    tensor is freed, so nothing piles up across steps, and several forward passes before one
    ``backward`` each re-run on their own state.
    """

    def __init__(self, ctx: SPAContext, blocks: list[nn.Module]) -> None:
        self.ctx = ctx
        self._first_runs: dict[int, tuple[nn.Module, _State]] = {}
        self._outside: _State | None = None
        self._handles = []
        for block in blocks:
            self._handles.append(block.register_forward_pre_hook(self._before_block))
            self._handles.append(block.register_forward_hook(self._after_block, always_call=True))

    def remove(self) -> None:
        """Detach the hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._first_runs.clear()

    def _before_block(self, block: nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0]
        key = id(x)
        first = self._first_runs.get(key)
        if first is None or first[0] is not block:
            self._first_runs[key] = (block, _snapshot(self.ctx))
            weakref.finalize(x, self._first_runs.pop, key, None)
            return
        self._outside = _snapshot(self.ctx)
        _restore(self.ctx, first[1])

    def _after_block(self, block: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        # always_call: also runs when checkpointing stops a re-run early (it raises to stop)
        if self._outside is not None:
            outside, self._outside = self._outside, None
            _restore(self.ctx, outside)


def set_spa_grad_checkpointing(model: nn.Module, ctx: SPAContext, blocks: list[nn.Module], enable: bool) -> None:
    """Install (``enable``) or remove the :class:`RecomputeGuard` of ``model``'s SPA ``blocks``.

    SPA scores leave a block through the context rather than its output; only non-reentrant
    checkpointing keeps their gradient, so timm's reentrant mode (``TIMM_REENTRANT_CKPT``) is refused.
    """
    if enable and use_reentrant_ckpt():
        raise ValueError(
            "SPA blocks need non-reentrant activation checkpointing (their scores reach the selection loss "
            "through the shared context, which reentrant checkpointing cuts off); unset TIMM_REENTRANT_CKPT "
            "or call timm.layers.set_reentrant_ckpt(False)"
        )
    guard = getattr(model, "_spa_recompute_guard", None)
    if guard is not None:
        guard.remove()
    model._spa_recompute_guard = RecomputeGuard(ctx, blocks) if enable else None
