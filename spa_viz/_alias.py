"""How the old top-level modules (``spa_viz.train``, ``spa_viz.bench``, ...) stay valid after the move."""

from __future__ import annotations

import importlib
import sys


def alias(name: str, target: str) -> None:
    """Make module ``name`` an alias of module ``target``.

    Run as a script (``python -m spa_viz.train``), it runs ``target.main()`` and exits with its code
    when that is an int; imported, ``sys.modules[name]`` becomes ``target`` itself, so attribute access
    and monkeypatching reach the real module.
    """
    module = importlib.import_module(target)
    if name == "__main__":
        result = module.main()
        if isinstance(result, int):
            sys.exit(result)
    else:
        sys.modules[name] = module
