"""The house stands: imports run only downward in the order docs/architecture.md writes down, no
module imports itself through a circle, and every third-party import is a declared dependency."""

from __future__ import annotations

import ast
import re
import sys
from functools import cache
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("spa_viz", "app")


def import_order() -> list[str]:
    """The units of the ``import-order`` block of docs/architecture.md, lowest first."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    block = re.search(r"```import-order\n(.*?)```", text, re.S)
    assert block, "docs/architecture.md has no ```import-order block"
    return block.group(1).split()


@cache
def modules() -> dict[str, Path]:
    """Every module of the packages, by dotted name (packages by their own name)."""
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def unit_of(module: str, order: list[str]) -> str:
    """The line of the import order a module belongs to: the longest one that prefixes it."""
    matches = [u for u in order if module == u or module.startswith(u + ".")]
    assert matches, f"{module} belongs to no line of the import order in docs/architecture.md"
    return max(matches, key=len)


def _resolve(module: str, node: ast.ImportFrom) -> str:
    """The absolute module a ``from ... import`` names (relative imports resolved from ``module``)."""
    if not node.level:
        return node.module or ""
    package = module if modules()[module].name == "__init__.py" else module.rpartition(".")[0]
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{node.module}" if node.module else package


@cache
def imports() -> dict[str, set[str]]:
    """module -> the internal modules it imports anywhere in its file (function-level imports too)."""
    known = modules()
    edges: dict[str, set[str]] = {m: set() for m in known}
    for module, path in known.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(module, node)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
            else:
                continue
            for target in targets:
                if target.split(".")[0] in PACKAGES:
                    while target not in known:  # `import spa_viz.models.spt` names a module; attributes do not
                        target = target.rpartition(".")[0]
                    if target != module:
                        edges[module].add(target)
    return edges


def test_the_documented_order_names_every_package() -> None:
    order = import_order()
    assert len(order) == len(set(order)), "a unit is listed twice"
    for module in modules():
        unit_of(module, order)


def test_imports_only_go_down() -> None:
    order = import_order()
    upward = [
        f"{module} imports {target} ({unit_of(target, order)} is above {unit_of(module, order)})"
        for module, targets in sorted(imports().items())
        for target in sorted(targets)
        if order.index(unit_of(target, order)) > order.index(unit_of(module, order))
    ]
    assert not upward, "imports that run upward:\n" + "\n".join(upward)


def test_no_import_circles() -> None:
    graph = imports()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for node in graph:
        if node not in index:
            visit(node)
    assert not circles, "import circles:\n" + "\n".join(" <-> ".join(c) for c in circles)


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _declared() -> tuple[set[str], dict[str, set[str]]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

    def names(requirements: list[str]) -> set[str]:
        return {_normalize(re.match(r"[A-Za-z0-9_.-]+", r).group(0)) for r in requirements}

    return names(project["dependencies"]), {k: names(v) for k, v in project["optional-dependencies"].items()}


def _third_party(path: Path) -> list[tuple[str, bool]]:
    """(top-level import name, imported at module level) of every non-stdlib, non-internal import."""
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level:
            names = [node.module or ""]
        else:
            continue
        for name in names:
            root = name.split(".")[0]
            if root not in sys.stdlib_module_names and root not in PACKAGES and root != "__future__":
                found.append((root, id(node) in top))
    return found


def test_every_third_party_import_is_a_declared_dependency() -> None:
    core, extras = _declared()
    distributions = packages_distributions()
    missing = []
    for module, path in modules().items():
        allowed_lazy = core | (extras["app"] if module.startswith("app") else set().union(*extras.values()))
        allowed_top = core | (extras["app"] if module.startswith("app") else set())
        for name, at_top in _third_party(path):
            dists = {_normalize(d) for d in distributions.get(name, [name])}
            if not dists & (allowed_top if at_top else allowed_lazy):
                where = "core dependencies" if at_top else "core dependencies or an extra"
                missing.append(f"{module} imports {name} ({', '.join(sorted(dists))}), not in the {where}")
    assert not missing, "\n".join(missing)


@pytest.mark.parametrize("extra", ["app", "data", "saliency", "dev"])
def test_the_extras_exist(extra: str) -> None:
    assert _declared()[1][extra]
