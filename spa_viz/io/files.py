"""Writing files safely: atomic replacement, and a guard that never overwrites what a user has."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

__all__ = ["OutputExistsError", "refuse_overwrite", "write_atomic", "write_text_atomic"]


class OutputExistsError(ValueError):
    """Writing would replace files the user already has; the message names them and the flag to pass."""


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temporary file in the same folder so a crash never leaves half a file.

    ``write`` receives the temporary path; on success it replaces ``path`` with mode 0644 (mkstemp
    creates 0600, and querying the umask would briefly change it for every thread), on failure the
    temporary file is removed and ``path`` is untouched.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text_atomic(path: Path, text: str) -> None:
    """:func:`write_atomic` for a text file."""
    write_atomic(path, lambda tmp: tmp.write_text(text))


def refuse_overwrite(paths: Sequence[Path], *, flag: str = "--overwrite", where: Path | None = None) -> None:
    """Raise :class:`OutputExistsError` when any of ``paths`` is a file or a non-empty folder.

    The one output guard of spa-viz: training, evaluation and ``spa-viz analyze`` call it before
    writing, so nothing the user had is replaced unless they pass ``flag``.
    """
    taken = [p for p in paths if p.is_file() or (p.is_dir() and any(p.iterdir()))]
    if taken:
        shown = ", ".join(str(p) for p in taken[:3]) + (f" and {len(taken) - 3} more" if len(taken) > 3 else "")
        place = f" in {where}" if where is not None else ""
        raise OutputExistsError(f"refusing to overwrite existing output{place}: {shown}; pass {flag} to replace it")
