"""Imports point one way: a module imports only from its own layer or the layers below.

Imports inside ``if TYPE_CHECKING:`` blocks do not count (they are type hints).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "platform" / "tether"

# bottom to top; a module may import its own layer and any layer below it
LAYERS = [
    ["errors", "sources"],
    ["config", "card", "cluster"],
    ["anchor", "adapters", "synthetic", "data", "models"],
    ["tasks"],
    ["tracking"],
    ["train"],
    ["registry"],
    ["run", "interpolate"],
    ["sweep"],
    ["serving"],
    ["cli", "demo", "submit"],
]
LAYER_OF = {name: i for i, names in enumerate(LAYERS) for name in names}


def top_module(path: Path) -> str:
    relative = path.relative_to(PACKAGE)
    return relative.parts[0].removesuffix(".py")


def imported(tree: ast.Module) -> list[tuple[str, int]]:
    """(first component under tether, line) for every runtime import of tether.*"""
    type_only = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            type_only |= {id(n) for n in ast.walk(node)}
    found = []
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tether."):
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.startswith("tether.")]
        found += [(n.split(".")[1], node.lineno) for n in names]
    return found


def test_every_module_has_a_layer():
    modules = {top_module(p) for p in PACKAGE.rglob("*.py")} - {"__init__"}
    assert modules <= set(LAYER_OF), sorted(modules - set(LAYER_OF))


def test_imports_point_one_way():
    """No module imports from a layer above its own (so there are no import cycles across
    layers: config never imports data, tracking never imports the registry, ...)."""
    violations = []
    for path in PACKAGE.rglob("*.py"):
        source = top_module(path)
        if source == "__init__":
            continue
        for target, line in imported(ast.parse(path.read_text())):
            if LAYER_OF.get(target, -1) > LAYER_OF[source]:
                violations.append(f"{path.relative_to(PACKAGE)}:{line} imports tether.{target}")
    assert violations == []
