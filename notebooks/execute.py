"""Execute notebooks at full size and store their outputs in place (``make notebooks-outputs``).

The stored outputs let the notebooks read on a code host without running them. The tests execute a
copy with the outputs cleared at small size (``SPA_VIZ_SMALL=1``) and check that stored outputs stay
small (:data:`MAX_BYTES`, in tests/test_notebooks.py).

``python notebooks/execute.py [NOTEBOOK ...]`` (default: every notebook in this folder).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

CELL_TIMEOUT_S = 1800
log = logging.getLogger("notebooks")


def execute(path: Path) -> int:
    """Run ``path`` top to bottom at full size and write it back with its outputs; returns its size in bytes."""
    book = nbformat.read(path, as_version=4)
    for cell in book.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    os.environ.pop("SPA_VIZ_SMALL", None)  # the kernel inherits the environment: full size
    os.environ["TQDM_DISABLE"] = "1"  # progress bars would be stored as output noise
    start = time.perf_counter()
    NotebookClient(
        book, timeout=CELL_TIMEOUT_S, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    ).execute()
    for cell in book.cells:  # execution timestamps would make every refresh a diff
        cell.metadata.pop("execution", None)
    nbformat.write(book, path)
    size = path.stat().st_size
    log.info("%s: executed in %.0f s, %.0f kB with outputs", path.name, time.perf_counter() - start, size / 1e3)
    return size


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    paths = [Path(a) for a in argv] or sorted(Path(__file__).resolve().parent.glob("*.ipynb"))
    for path in paths:
        execute(path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
