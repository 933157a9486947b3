"""Atomic writes and the output guard: nothing half-written, nothing the user had replaced silently."""

from __future__ import annotations

from pathlib import Path

import pytest

from spa_viz.io.files import OutputExistsError, refuse_overwrite, write_atomic, write_text_atomic


def test_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "a.txt"
    write_text_atomic(target, "old")

    def crash(tmp: Path) -> None:
        tmp.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_atomic(target, crash)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]
    assert target.stat().st_mode & 0o777 == 0o644


def test_refuse_overwrite_names_what_exists_and_the_flag(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    refuse_overwrite([tmp_path / "missing", tmp_path / "empty"])  # nothing to lose
    (tmp_path / "file.json").write_text("{}")
    with pytest.raises(OutputExistsError, match=r"file\.json; pass --force to replace it"):
        refuse_overwrite([tmp_path / "file.json", tmp_path / "empty"], flag="--force")
