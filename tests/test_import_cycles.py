"""No module of nasxserve imports, directly or through others, a module that imports it back.

lint-imports (tests/test_layers.py) keeps the layers apart but not the modules within one layer; a cycle
there makes the import order matter and hides which module is the lower one. Every import statement
counts, wherever it is: at the top, inside a function (a lazy import) or under TYPE_CHECKING.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def module_names(root: Path, package: str) -> dict[str, Path]:
    """Dotted name -> file of every module of ``package`` under ``root`` (a package by its __init__.py)."""
    names = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def _imported(module: str, is_package: bool, node: ast.Import | ast.ImportFrom, known: set[str]) -> set[str]:
    """The modules of ``known`` that ``node`` in ``module`` imports: ``from P import name`` imports the module
    P.name where there is one, else P."""
    if isinstance(node, ast.Import):
        candidates = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:
            anchor = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
            base = ".".join(anchor + ([base] if base else []))
        candidates = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
    found = set()
    for name in candidates:
        while name and name not in known:   # import a.b.c also imports a.b: take the longest known module
            name = name.rpartition(".")[0]
        if name:
            found.add(name)
    return found


def import_graph(root: Path, package: str) -> dict[str, set[str]]:
    """Module -> the modules of the package it imports, from the syntax tree of each file."""
    files = module_names(root, package)
    known = set(files)
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                edges |= _imported(module, path.name == "__init__.py", node, known)
        graph[module] = edges - {module}
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles = []

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
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(cycles)


def test_nasxserve_has_no_import_cycles():
    graph = import_graph(ROOT, "nasxserve")
    assert len(graph) > 50 and "nasxserve.training.trainer" in graph   # the walk found the package
    assert import_cycles(graph) == []


def _package(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")


def test_a_lazy_import_that_closes_a_cycle_is_found(tmp_path: Path):
    _package(tmp_path, {"pkg/__init__.py": "", "pkg/low.py": "X = 1\n",
                        "pkg/a.py": "from pkg.b import helper\n",
                        "pkg/b.py": "def helper():\n    from pkg import a\n    return a\n",
                        "pkg/c.py": "from pkg.low import X\n"})
    assert import_cycles(import_graph(tmp_path, "pkg")) == [["pkg.a", "pkg.b"]]


def test_relative_imports_and_longer_cycles_are_found(tmp_path: Path):
    _package(tmp_path, {"pkg/__init__.py": "", "pkg/sub/__init__.py": "from .one import f\n",
                        "pkg/sub/one.py": "from ..two import g\n",
                        "pkg/two.py": "import typing\nif typing.TYPE_CHECKING:\n    import pkg.three\n",
                        "pkg/three.py": "from pkg.sub import one\n"})
    graph = import_graph(tmp_path, "pkg")
    assert graph["pkg.sub"] == {"pkg.sub.one"} and graph["pkg.sub.one"] == {"pkg.two"}
    assert import_cycles(graph) == [["pkg.sub.one", "pkg.three", "pkg.two"]]
