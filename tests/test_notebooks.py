"""The notebooks run top to bottom without errors (small sizes: ``SPA_VIZ_SMALL=1``)."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
CELL_TIMEOUT_S = 120


def test_notebooks_found() -> None:
    assert [p.name for p in NOTEBOOKS] == [
        "01_selection_tour.ipynb",
        "02_packing.ipynb",
        "03_training_and_ablation.ipynb",
        "04_attribution.ipynb",
    ]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    book = nbformat.read(path, as_version=4)
    assert all(not cell.get("outputs") for cell in book.cells if cell.cell_type == "code"), "outputs not cleared"
    monkeypatch.setenv("SPA_VIZ_SMALL", "1")
    client = NotebookClient(
        book, timeout=CELL_TIMEOUT_S, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    )
    client.execute()  # the kernel inherits SPA_VIZ_SMALL; raises CellExecutionError on the first failing cell
    errors = [o for cell in book.cells for o in cell.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
