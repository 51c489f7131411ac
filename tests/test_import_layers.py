"""The package graph has no cycle: read every import statement in src/lowgear (lazy ones inside
functions included) and check that no two packages depend on each other, directly or around a loop.

A "package" is lowgear's first level: a subpackage (ops, model, engine, ...) or a top-level module
(config, errors). The root __init__ is the lazy façade over all of them and is left out.
"""

from __future__ import annotations

import ast
from pathlib import Path

import lowgear

SRC = Path(lowgear.__file__).parent


def _unit(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "lowgear" or len(parts) < 2:
        return None
    return parts[1]


def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Absolute module names this file imports (relative imports resolved)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            found.add(mod)
            found.update(f"{mod}.{a.name}" for a in node.names)  # `from pkg import submodule`
    return found


def package_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in SRC.rglob("*.py"):
        if path == SRC / "__init__.py":
            continue
        here = _unit(_module_name(path))
        deps = graph.setdefault(here, set())
        for mod in _imports(path):
            there = _unit(mod)
            if there and there != here and ((SRC / there).is_dir() or (SRC / f"{there}.py").exists()):
                deps.add(there)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a list of nodes (first == last), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_find_cycle_sees_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]


def test_reader_resolves_relative_imports(tmp_path):
    graph = package_graph()
    assert "formats" in graph["model"]  # model/linear.py: from ..formats.dequant import ...
    assert "ops" in graph["model"]


def test_no_import_cycle_between_packages():
    graph = package_graph()
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)
