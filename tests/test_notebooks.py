"""The notebooks run top to bottom without errors (small sizes: ``SPA_VIZ_SMALL=1``), and the outputs
stored with them (a full-size run, ``make notebooks-outputs``) stay small enough to read on a code host."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
CELL_TIMEOUT_S = 120
MAX_BYTES = 2_000_000  # a notebook with its stored outputs


def test_notebooks_found() -> None:
    assert [p.name for p in NOTEBOOKS] == [
        "01_selection_tour.ipynb",
        "02_packing.ipynb",
        "03_training_and_ablation.ipynb",
        "04_attribution.ipynb",
    ]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_stored_outputs_are_small_and_error_free(path: Path) -> None:
    book = nbformat.read(path, as_version=4)
    assert path.stat().st_size <= MAX_BYTES, f"{path.name} is {path.stat().st_size / 1e6:.1f} MB with its outputs"
    errors = [o for cell in book.cells for o in cell.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    book = nbformat.read(path, as_version=4)
    for cell in book.cells:  # run from a clean state whatever outputs are stored
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    monkeypatch.setenv("SPA_VIZ_SMALL", "1")
    client = NotebookClient(
        book, timeout=CELL_TIMEOUT_S, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    )
    client.execute()  # the kernel inherits SPA_VIZ_SMALL; raises CellExecutionError on the first failing cell
    errors = [o for cell in book.cells for o in cell.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
