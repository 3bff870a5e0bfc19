"""The package's import graph: layers import down, never in a circle (docs/ARCHITECTURE.md)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "multipromot"

# Lower layers first; a module may import its own layer or lower ones, never a higher one.
LAYERS = [
    {"errors", "features", "fsio", "registry", "yamlio"},
    {"methods"},
    {"config"},
    {"data"},
    {"models", "soft_prompt"},
    {"bank"},
    {"router"},
    {"eval"},
    {"train"},
    {"experiment", "preflight", "reuse", "method_eval", "sweep", "trained"},
    {"integrations"},
    {"lab"},
    {"cli", "__main__"},
]


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = ["multipromot", *path.relative_to(PACKAGE).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules ``path`` imports anywhere in its code (type-checking blocks too)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name.startswith("multipromot"):
                out.add(name)
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: _imports(p, modules) - {m} for m, p in modules.items()}


def _layer(module: str) -> int:
    top = module.split(".")[1] if "." in module else ""
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    raise AssertionError(f"{module} is in no layer; add its package to LAYERS")


def test_no_import_cycles():
    graph = _graph()
    on_cycle = []
    for start in graph:
        seen, todo = set(), [start]
        while todo:
            for nxt in graph[todo.pop()]:
                if nxt == start:
                    on_cycle.append(start)
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
    assert sorted(set(on_cycle)) == []


def test_layers_import_only_downwards():
    upward = []
    for module, targets in _graph().items():
        if module == "multipromot":  # the package root re-exports from every layer
            continue
        upward += [
            f"{module} -> {t}" for t in targets if t != "multipromot" and _layer(t) > _layer(module)
        ]
    assert upward == []


def test_nothing_imports_the_package_root_or_the_lab_from_below():
    for module, targets in _graph().items():
        if module == "multipromot" or module.startswith(("multipromot.cli", "multipromot.lab")):
            continue
        assert "multipromot" not in targets, module
        assert not any(t.startswith("multipromot.lab") for t in targets), module


def test_function_local_imports_are_only_for_heavy_third_party_packages():
    local = []
    for module, path in _modules().items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for func in ast.walk(tree):
            if not isinstance(func, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for node in ast.walk(func):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
                    "multipromot"
                ):
                    local.append(f"{module}: {node.module}")
                elif isinstance(node, ast.Import) and any(
                    a.name.startswith("multipromot") for a in node.names
                ):
                    local.append(module)
    assert local == []
