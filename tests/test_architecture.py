"""The package's import graph: layers import down, never in a circle (docs/ARCHITECTURE.md)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "multipromot"

# Lower layers first; a module may import its own layer or lower ones, never a higher one.
LAYERS = [
    {"errors", "features", "fsio", "lazy", "registry", "yamlio"},
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


# A deferred import (multipromot.lazy): "package.module" or "package.module:attribute"
DEFERRED = re.compile(r"^(multipromot(?:\.\w+)+)(?::\w+)?$")


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules ``path`` imports anywhere in its code (type-checking blocks too),
    and the ones it names for a deferred import (a ``"multipromot.x:y"`` string)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            match = DEFERRED.match(node.value)  # ("multipromot.json" is a file name)
            names = [match.group(1)] if match and match.group(1) in modules else []
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


def test_deferred_imports_go_through_multipromot_lazy():
    """Our modules are imported at module level, or named for multipromot.lazy (whose strings
    the graph above reads as imports); nothing else imports by name at run time."""
    found = []
    for module, path in _modules().items():
        if module == "multipromot.lazy":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            by_attribute = isinstance(node, ast.Attribute) and node.attr == "import_module"
            by_name = isinstance(node, ast.Name) and node.id in ("__import__", "import_module")
            if by_attribute or by_name:
                found.append(module)
    assert found == []


def test_every_deferred_name_is_a_module_of_the_package():
    """A typo in a deferred import would fail only when the command runs."""
    modules = _modules()
    for module, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                match = DEFERRED.match(node.value)
                if match and ":" in node.value:
                    assert match.group(1) in modules, (module, node.value)
                    name = node.value.partition(":")[2]
                    assert name in modules[match.group(1)].read_text(), (module, node.value)
