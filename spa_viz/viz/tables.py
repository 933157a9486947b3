"""The one table printer: rows of cells -> a markdown table (the CLIs, benchmarks and model cards)."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["markdown_table"]

_RULES = {None: "---", "left": ":---", "right": "---:"}


def markdown_table(
    header: Sequence[str], rows: Sequence[Sequence[object]], align: Sequence[str | None] | None = None
) -> str:
    """A GitHub markdown table; ``align`` per column: None (default), ``"left"`` or ``"right"``.

    Cells are written with ``str``: format numbers before passing them.
    """
    align = list(align) if align is not None else [None] * len(header)
    if len(align) != len(header) or any(a not in _RULES for a in align):
        raise ValueError(f"align needs one of {sorted(k for k in _RULES if k)} or None per column")
    for row in rows:
        if len(row) != len(header):
            raise ValueError(f"row {list(row)} has {len(row)} cells for {len(header)} columns")
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(_RULES[a] for a in align) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)
