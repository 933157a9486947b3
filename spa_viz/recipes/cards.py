"""The one model-card writer: a checkpoint's README.md from a template in ``cards/`` and its numbers.

A template is markdown with ``{name}`` fields (``str.format_map``); the prose lives in the template
files, the code only computes the fields (numbers, tables, the sentences that depend on them).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["TEMPLATES", "fmt", "render_card"]

TEMPLATES = Path(__file__).resolve().parent / "cards"


def render_card(template: str, fields: Mapping[str, Any]) -> str:
    """``cards/<template>.md`` with its ``{fields}`` filled in, ending in one newline.

    A missing field raises KeyError naming it. Section templates are joined by their callers with
    a blank line after each (``render_card(...) + "\n"``).
    """
    return (TEMPLATES / f"{template}.md").read_text().format_map(fields).rstrip("\n") + "\n"


def fmt(value: Any, digits: int = 3) -> str:
    """A table cell: floats to ``digits`` decimals, None as ``-``, anything else as it prints."""
    return f"{value:.{digits}f}" if isinstance(value, float) else ("-" if value is None else str(value))
