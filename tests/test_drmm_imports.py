"""No import cycles inside the repository's packages, nor between them.

Every ``import`` statement counts, wherever it sits: at module level, inside a function (a "lazy" import only
hides a cycle until someone calls that function first) and under ``if TYPE_CHECKING:``. The graph is built from
the source with ``ast``, without importing anything, over every package folder at the repository root (a folder
with an ``__init__.py``), so it keeps working as modules are added, moved or renamed.

Edges: ``import a.b.c`` and ``from a.b import c`` point at the module that runs (``a.b.c`` when it is a module, else
``a.b``) and at every package ``__init__`` on the way that is not already a parent of the importing module (those
run before the importer anyway).
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = sorted(p.parent.name for p in REPO.glob("*/__init__.py"))


def module_files(root: Path, package: str) -> Dict[str, Path]:
    """Dotted module name -> file, for every .py file of ``package`` (a folder under ``root``)."""
    modules = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _parents(name: str) -> List[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def import_graph(root: Path, packages: List[str]) -> Dict[str, Set[str]]:
    """module -> the modules of ``packages`` it imports (anywhere in its file)."""
    modules: Dict[str, Path] = {}
    for package in packages:
        modules.update(module_files(root, package))
    graph: Dict[str, Set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        own_parents = set(_parents(name)) | ({name} if is_package else set())

        def add(target: str) -> None:
            while target and target not in modules:  # `from pkg.mod import function`: the module runs
                target = target.rpartition(".")[0]
            if not target:
                return  # outside the packages we check (torch, numpy, ...)
            for t in [*_parents(target), target]:
                if t in modules and t not in own_parents and t != name:
                    graph[name].add(t)

        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    add(alias.name)
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: resolve against this module's package
                    base_parts = name.split(".") if is_package else name.split(".")[:-1]
                    base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                    base = ".".join(base_parts + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                for alias in node.names:  # `from pkg import submodule` imports the submodule
                    add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    return graph


def cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    found: List[List[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _describe(graph: Dict[str, Set[str]], component: List[str]) -> str:
    members = set(component)
    return "; ".join(f"{m} -> {', '.join(sorted(graph[m] & members))}" for m in component)


def test_the_checked_packages_are_found():
    assert {"drmm", "drmm_kernels"} <= set(PACKAGES)


@pytest.mark.parametrize("package", PACKAGES)
def test_no_import_cycle_within_package(package):
    graph = import_graph(REPO, [package])
    found = cycles(graph)
    assert not found, f"import cycles in {package}/: " + " | ".join(_describe(graph, c) for c in found)


def test_no_import_cycle_between_packages():
    graph = import_graph(REPO, PACKAGES)
    own = {p: import_graph(REPO, [p]) for p in PACKAGES}
    within = {tuple(c) for p in PACKAGES for c in cycles(own[p])}  # reported by the per-package test
    found = [c for c in cycles(graph) if tuple(c) not in within]
    assert not found, "import cycles across packages: " + " | ".join(_describe(graph, c) for c in found)


def test_the_checker_sees_lazy_and_type_checking_imports(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from .a import f\n")
    (pkg / "a.py").write_text("def f():\n    from . import b\n    return b\n")
    (pkg / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .sub.c import C\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "c.py").write_text("import pkg.a as a\nimport torch\n")
    (pkg / "d.py").write_text("from .sub import c\n")
    graph = import_graph(tmp_path, ["pkg"])
    assert graph["pkg.a"] == {"pkg.b"}
    assert graph["pkg.b"] == {"pkg.sub", "pkg.sub.c"}
    assert graph["pkg.sub.c"] == {"pkg.a"}  # its parents pkg and pkg.sub run before it: no edge
    assert graph["pkg.d"] == {"pkg.sub", "pkg.sub.c"}
    assert cycles(graph) == [["pkg.a", "pkg.b", "pkg.sub.c"]]
    (pkg / "a.py").write_text("def f():\n    pass\n")
    assert cycles(import_graph(tmp_path, ["pkg"])) == []
