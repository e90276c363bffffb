"""The import graph of the project's packages runs one way and has no circles.

Allowed package order (an arrow is "may import"):

    preprocessing   the bottom: video, faces, parsing, shards and the label schema
                    (``preprocessing.labels``), importing none of the others
    synthetic       a data source (procedural portraits, the embedded sample) → preprocessing
    durian          the model library → preprocessing (the Preparer detects and parses faces)
    flows           the application layer → every package above; nothing imports ``flows``

``synthetic`` and ``durian`` do not import each other; the glue joining them (the synthetic
evaluation cases) lives in ``flows``. ``tests`` and ``benchmarks`` may import anything.

Every ``import`` counts — module level, inside functions and under ``TYPE_CHECKING`` — because
any of them can close a circle at run time or for a type checker; relative imports are resolved
against the importing module.
"""

from __future__ import annotations

import ast
from pathlib import Path

from project_helpers import ROOT

PACKAGES = ("preprocessing", "synthetic", "durian", "flows")
ALLOWED: dict[str, set[str]] = {
    "preprocessing": set(),
    "synthetic": {"preprocessing"},
    "durian": {"preprocessing"},
    "flows": {"preprocessing", "synthetic", "durian"},
}


def project_modules(root: Path) -> dict[str, Path]:
    """Dotted module name → file, for every module of :data:`PACKAGES` under ``root``."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def imported_names(module: str, path: Path) -> set[str]:
    """Every dotted name ``module`` imports (a ``from a import b`` yields ``a`` and ``a.b``:
    ``b`` may be a submodule or an attribute, the caller keeps what is a module)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module.split(".")[: None if path.name == "__init__.py" else -1]
                anchor = package[: len(package) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def import_edges(root: Path) -> dict[str, set[str]]:
    """Module → the project modules it imports (the longest known prefix of each name)."""
    modules = project_modules(root)
    edges: dict[str, set[str]] = {}
    for module, path in modules.items():
        targets = set()
        for name in imported_names(module, path):
            while name and name not in modules:
                name = name.rpartition(".")[0]
            # A package's own __init__ runs before its submodules: importing it from inside
            # is not a circle of its own.
            if name and name != module and not module.startswith(name + "."):
                targets.add(name)
        edges[module] = targets
    return edges


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one node (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_packages_import_only_downwards() -> None:
    wrong = sorted(
        f"{module} imports {target}"
        for module, targets in import_edges(ROOT).items()
        for target in targets
        if (a := module.split(".")[0]) != (b := target.split(".")[0]) and b not in ALLOWED[a]
    )
    assert not wrong, "imports against the package order (see this file's docstring):\n" + (
        "\n".join(wrong)
    )


def test_no_import_cycle_between_files() -> None:
    found = cycles(import_edges(ROOT))
    assert not found, "import cycles between files:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_walker_sees_function_level_relative_and_type_checking_imports(tmp_path: Path) -> None:
    """The walker itself: an import hidden in a function, under TYPE_CHECKING or written
    relatively still makes an edge, and a circle made of them is reported."""
    (tmp_path / "durian").mkdir()
    (tmp_path / "durian" / "__init__.py").write_text("")
    (tmp_path / "durian" / "a.py").write_text("def f():\n    from . import b\n")
    (tmp_path / "durian" / "b.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from durian.a import f\n"
    )
    (tmp_path / "preprocessing").mkdir()
    (tmp_path / "preprocessing" / "c.py").write_text("import durian.a\n")
    edges = import_edges(tmp_path)
    assert edges["durian.a"] == {"durian.b"}
    assert edges["durian.b"] == {"durian.a"}
    assert edges["preprocessing.c"] == {"durian.a"}
    assert cycles(edges) == [["durian.a", "durian.b"]]
