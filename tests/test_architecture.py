"""Dependencies point one way (ARCHITECTURE.md): every import of every module, function-level
ones included, parsed from the source; a low room never imports a high one, and the package
has no import circles."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).parents[1] / "src" / "crossres"

# room -> rooms it must never import (module names under crossres; a file is its own room)
FORBIDDEN = {
    "attacks": {"datamodules", "lightning_modules", "callbacks", "cli", "store", "report"},
    "metrics": {"datamodules", "lightning_modules", "callbacks", "cli", "store", "report"},
    "models": {"datamodules", "lightning_modules", "callbacks", "cli", "store", "report"},
    "datamodules": {"lightning_modules", "callbacks", "cli", "report"},
    "store": {"lightning_modules", "callbacks", "cli", "report"},
    "report": {"lightning_modules", "callbacks", "cli"},
    "lightning_modules": {"callbacks", "cli"},
    "callbacks": {"cli"},
    # the shared helpers every room may use import no room at all
    "types": {"attacks", "metrics", "models", "datamodules", "lightning_modules", "callbacks"},
    "io": {"attacks", "metrics", "models", "datamodules", "lightning_modules", "callbacks"},
    "errors": {"attacks", "metrics", "models", "datamodules", "lightning_modules", "callbacks"},
    "paths": {"attacks", "metrics", "models", "datamodules", "lightning_modules", "callbacks"},
    "phases": {"attacks", "metrics", "models", "datamodules", "lightning_modules", "callbacks"},
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """Every crossres module a file imports, at any depth of the file (functions included)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    this = module_name(path)
    package = this if path.name == "__init__.py" else this.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import: resolve against this package
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)  # `from pkg import module`
    return {m for m in out if m == "crossres" or m.startswith("crossres.")}


MODULES = {module_name(p): p for p in sorted(SRC.rglob("*.py"))}
GRAPH = {
    name: {m for m in imports_of(path) if m in MODULES and m != name}
    for name, path in MODULES.items()
}


def room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


@pytest.mark.parametrize("module", sorted(MODULES))
def test_low_rooms_never_import_high_ones(module):
    banned = FORBIDDEN.get(room(module), set())
    bad = sorted(m for m in imports_of(MODULES[module]) if room(m) in banned)
    assert not bad, f"{module} ({room(module)}) imports {bad}: dependencies must point down"


def test_no_import_circles_between_modules():
    """Tarjan-free check: a depth-first search over module -> imported module edges (package
    ``__init__`` files re-export their rooms, so edges into an ``__init__`` are skipped:
    importing ``crossres.models`` to reach ``crossres.models.base`` is not a circle)."""
    graph = {n: {m for m in deps if MODULES[m].name != "__init__.py"} for n, deps in GRAPH.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt) :] + [nxt]
                raise AssertionError("import circle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_the_checker_sees_function_level_imports(tmp_path):
    """The parser is the test's foundation: an import hidden in a function body is found."""
    pkg = tmp_path / "crossres" / "models"
    pkg.mkdir(parents=True)
    f = pkg / "x.py"
    f.write_text("def f():\n    from crossres.cli import main\n    from . import base\n")
    global SRC
    saved, SRC = SRC, tmp_path / "crossres"
    try:
        assert imports_of(f) >= {"crossres.cli", "crossres.cli.main", "crossres.models.base"}
    finally:
        SRC = saved
