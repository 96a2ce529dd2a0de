"""No import cycles inside the repository's packages, nor between them; and ``drmm`` takes from ``drmm_kernels``
only its public API and the internal names docs/kernels.md lists.

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

REPO = Path(__file__).resolve().parents[2]
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


# ---------------------------------------------------------------- what drmm takes from drmm_kernels

# The internal modules of drmm_kernels that drmm may use, with the names it takes from each; docs/kernels.md
# ("Internal modules drmm uses") lists the same and says why. Anything else drmm takes from drmm_kernels is public
# (drmm_kernels.__all__).
DRMM_KERNELS_INTERNALS = {
    "drmm_kernels.contract": {"ON_BIT", "OFFSET_MASK", "plain_pool"},
    "drmm_kernels.reference": {"pool_switches", "masked_values", "unpool", "activation_factor"},
}


def _public_names() -> Set[str]:
    tree = ast.parse((REPO / "drmm_kernels" / "__init__.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
            return set(ast.literal_eval(node.value))
    raise AssertionError("drmm_kernels/__init__.py has no __all__")


def drmm_kernels_uses(path: Path) -> List[str]:
    """What ``path`` takes from drmm_kernels and is neither public nor listed in DRMM_KERNELS_INTERNALS."""
    public, bad = _public_names(), []
    aliases: Dict[str, str] = {}  # local name -> the drmm_kernels module it is bound to

    def module(name: str, line: int) -> bool:
        if name == "drmm_kernels" or name in DRMM_KERNELS_INTERNALS:
            return True
        bad.append(f"{path.name}:{line}: imports {name}")
        return False

    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "drmm_kernels" and module(alias.name, node.lineno):
                    aliases[alias.asname or alias.name] = alias.name
        elif (
            isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").split(".")[0] == "drmm_kernels"
        ):
            if not module(node.module, node.lineno):
                continue
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                if full in DRMM_KERNELS_INTERNALS:
                    aliases[alias.asname or alias.name] = full
                elif alias.name not in (
                    public if node.module == "drmm_kernels" else DRMM_KERNELS_INTERNALS[node.module]
                ):
                    bad.append(f"{path.name}:{node.lineno}: takes {alias.name} from {node.module}")
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
            base, name = aliases[node.value.id], node.attr
            if base == "drmm_kernels" and f"{base}.{name}" in DRMM_KERNELS_INTERNALS:
                continue  # dk.reference.X: X is checked below
            if name not in (public if base == "drmm_kernels" else DRMM_KERNELS_INTERNALS[base]):
                bad.append(f"{path.name}:{node.lineno}: uses {base}.{name}")
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Attribute)
            and isinstance(node.value.value, ast.Name)
            and aliases.get(node.value.value.id) == "drmm_kernels"
            and f"drmm_kernels.{node.value.attr}" in DRMM_KERNELS_INTERNALS
            and node.attr not in DRMM_KERNELS_INTERNALS[f"drmm_kernels.{node.value.attr}"]
        ):
            bad.append(f"{path.name}:{node.lineno}: uses drmm_kernels.{node.value.attr}.{node.attr}")
    return bad


def test_drmm_uses_only_the_public_api_of_drmm_kernels_and_the_listed_internals():
    bad = [b for path in sorted((REPO / "drmm").rglob("*.py")) for b in drmm_kernels_uses(path)]
    assert not bad, "drmm takes internals of drmm_kernels that docs/kernels.md does not list: " + "; ".join(bad)
    doc = (REPO / "docs" / "kernels.md").read_text()
    for name, names in DRMM_KERNELS_INTERNALS.items():
        assert f"`{name}`" in doc and all(f"`{n}`" in doc for n in names), name


def test_the_drmm_kernels_checker_sees_internal_uses(tmp_path):
    (tmp_path / "m.py").write_text(
        "import drmm_kernels as dk\nfrom drmm_kernels import reference as kref, render\n"
        "from drmm_kernels.dispatch import load\nfrom drmm_kernels.contract import conv_size\n"
        "dk.render; dk.reference.pool_switches; dk.reference.render; kref.unpool; kref.gather_conv; dk.cpu\n"
    )
    assert drmm_kernels_uses(tmp_path / "m.py") == [
        "m.py:3: imports drmm_kernels.dispatch",
        "m.py:4: takes conv_size from drmm_kernels.contract",
        "m.py:5: uses drmm_kernels.reference.render",
        "m.py:5: uses drmm_kernels.reference.gather_conv",
        "m.py:5: uses drmm_kernels.cpu",
    ]
