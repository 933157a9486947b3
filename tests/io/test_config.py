"""The one strict config loader: unknown keys fail with the known ones, nested sections and tuples are typed;
recipe files are read with dotted overrides."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest

from spa_viz.io.config import ConfigError, from_dict, read_json, to_dict


@dataclass(frozen=True)
class Inner:
    size: int = 3
    widths: tuple[int, ...] = (1, 2)


@dataclass(frozen=True)
class Outer:
    name: str
    inner: Inner = field(default_factory=Inner)
    note: str | None = None


def test_round_trip_with_nested_sections_and_tuples() -> None:
    config = from_dict(Outer, {"name": "a", "inner": {"widths": [4, 5]}})
    assert config == Outer("a", Inner(3, (4, 5)))
    assert to_dict(config) == {"name": "a", "inner": {"size": 3, "widths": [4, 5]}, "note": None}
    assert from_dict(Outer, to_dict(config)) == config


def test_unknown_keys_name_the_place_and_the_known_keys() -> None:
    with pytest.raises(ConfigError, match=r"recipe: unknown keys \['nmae'\]; known: \['inner', 'name', 'note'\]"):
        from_dict(Outer, {"nmae": "a"}, where="recipe")
    with pytest.raises(ConfigError, match=r"recipe\.inner: unknown keys \['sise'\]"):
        from_dict(Outer, {"name": "a", "inner": {"sise": 2}}, where="recipe")


def test_missing_required_key_and_wrong_type_fail_clearly() -> None:
    with pytest.raises(ConfigError, match="name"):
        from_dict(Outer, {})
    with pytest.raises(ConfigError, match="must be a JSON object"):
        from_dict(Outer, ["name"])  # type: ignore[arg-type]


def test_read_json_applies_dotted_overrides_and_names_the_file(tmp_path) -> None:
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps({"name": "a", "inner": {"size": 1, "widths": [2]}}))
    raw = read_json(path, {"inner.size": 3, "extra.deep.key": True, "name": "b"})
    assert raw == {"name": "b", "inner": {"size": 3, "widths": [2]}, "extra": {"deep": {"key": True}}}
    with pytest.raises(ConfigError, match="cannot set name.size: name is not an object"):
        read_json(path, {"name.size": 1})
    path.write_text("[1, 2]")
    with pytest.raises(ConfigError, match=r"recipe.json must hold a JSON object"):
        read_json(path)
    path.write_text("{oops")
    with pytest.raises(ConfigError, match=r"cannot read config .*recipe.json"):
        read_json(path)
