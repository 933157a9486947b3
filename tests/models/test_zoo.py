"""The checkpoint search path: ``$SPA_VIZ_CHECKPOINTS`` folders, then the project's own checkpoints;
the first folder holding a name wins, and a name found nowhere is refused with the folders searched."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

import spa_viz
from spa_viz.io import paths
from spa_viz.io.checkpoint import CheckpointError
from spa_viz.models import zoo


def _checkpoint(root: Path, name: str, architecture: str = "timm_spa_vit") -> Path:
    """A folder the search path counts as a checkpoint (a config.json; nothing is built from it here)."""
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"format": "spa-viz/1", "architecture": architecture}))
    return folder


@pytest.fixture
def roots(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path, Path]:
    """Two $SPA_VIZ_CHECKPOINTS folders and a stand-in for the project's own checkpoints/."""
    first, second, builtin = tmp_path / "first", tmp_path / "second", tmp_path / "builtin"
    for folder in (first, second, builtin):
        folder.mkdir()
    monkeypatch.setenv(paths.CHECKPOINTS_ENV_VAR, os.pathsep.join([str(first), str(second)]))
    monkeypatch.setattr(paths, "BUILTIN_CHECKPOINT_DIRS", (builtin,))
    return first, second, builtin


def test_the_search_path_is_the_variable_then_the_project_checkpoints(roots: tuple[Path, Path, Path]) -> None:
    first, second, builtin = roots
    assert paths.checkpoint_search_path() == (first, second, builtin)
    _checkpoint(builtin, "shared")
    _checkpoint(builtin, "only-builtin")
    _checkpoint(second, "shared")
    (first / "no-config").mkdir()  # a folder without config.json is not a checkpoint
    assert zoo.find_checkpoint("shared") == second / "shared", "the first folder holding the name wins"
    assert zoo.find_checkpoint("only-builtin") == builtin / "only-builtin"
    assert zoo.find_checkpoint("no-config") is None and zoo.find_checkpoint("../builtin/shared") is None
    assert spa_viz.available() == ["only-builtin", "shared"]


def test_checkpoints_option_goes_first(roots: tuple[Path, Path, Path], tmp_path: Path) -> None:
    first, second, builtin = roots
    given = tmp_path / "given"
    _checkpoint(given, "mine")
    paths.add_checkpoint_dirs([given])
    assert paths.checkpoint_search_path() == (given.resolve(), first, second, builtin)
    assert zoo.find_checkpoint("mine") == given.resolve() / "mine"


def test_a_name_found_nowhere_names_the_folders_searched(roots: tuple[Path, Path, Path]) -> None:
    first, second, builtin = roots
    with pytest.raises(CheckpointError, match="neither a checkpoint nor a timm model name") as refused:
        spa_viz.load("spa-vit-nowhere")
    message = str(refused.value)
    assert all(str(folder) in message for folder in (first, second, builtin))
    assert "$SPA_VIZ_CHECKPOINTS" in message and "--checkpoints DIR" in message
    with pytest.raises(CheckpointError, match=re.escape(str(first))):
        zoo.describe("spa-vit-nowhere")


def test_the_default_model_is_the_first_preferred_one_that_can_be_built(
    roots: tuple[Path, Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, _, builtin = roots
    photos, digits = zoo.PREFERRED_MODELS
    _checkpoint(builtin, digits)
    assert zoo.default_model() == digits
    _checkpoint(builtin, photos, architecture="img_focus_spa")
    monkeypatch.setattr(zoo, "NEEDS_PACKAGE", {"img_focus_spa": "spa_viz_no_such_package"})
    assert zoo.default_model() == digits, "a checkpoint whose optional package is missing is not the default"
    monkeypatch.setattr(zoo, "NEEDS_PACKAGE", {"img_focus_spa": "json"})
    assert zoo.default_model() == photos
