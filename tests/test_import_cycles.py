"""No import cycles inside the fastddpm package.

The graph is read from the source with ``ast`` (nothing is imported): an edge ``a -> b`` for every
module-level ``import`` / ``from ... import`` in module ``a`` that names module ``b`` of the package
(``from pkg import name`` names ``pkg.name`` when that is a module, else ``pkg``). Imports inside
functions and classes, and under ``if TYPE_CHECKING:``, are not run at import time and are left out.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import fastddpm

PACKAGE_DIR = Path(fastddpm.__file__).resolve().parent


def _modules(root: Path, package: str) -> dict[str, Path]:
    """Every module of the package: dotted name -> file (``pkg/__init__.py`` is ``pkg``).

    Symlinked folders (``fastddpm/kernels``, ``fastddpm/csrc`` in a development checkout) are followed
    once; folders without ``__init__.py`` are not packages and are skipped.
    """
    out: dict[str, Path] = {}

    def walk(folder: Path, dotted: str) -> None:
        if not (folder / "__init__.py").is_file():
            return
        for path in sorted(folder.iterdir()):
            if path.is_dir():
                walk(path, f"{dotted}.{path.name}")
            elif path.suffix == ".py":
                out[dotted if path.name == "__init__.py" else f"{dotted}.{path.stem}"] = path

    walk(root, package)
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _module_level_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Import statements run when the module is imported (also inside module-level if/try/with blocks)."""
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.Import | ast.ImportFrom):
                found.append(node)
            elif isinstance(node, ast.If):
                if not _is_type_checking(node.test):
                    visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                for block in (node.body, node.orelse, node.finalbody, *(h.body for h in node.handlers)):
                    visit(block)
            elif isinstance(node, ast.With):
                visit(node.body)

    visit(tree.body)
    return found


def import_graph(root: Path = PACKAGE_DIR, package: str = "fastddpm") -> dict[str, set[str]]:
    """``module -> set of package modules it imports at module level``."""
    modules = _modules(root, package)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_pkg = path.name == "__init__.py"
        edges: set[str] = set()
        for node in _module_level_imports(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                if node.level:
                    parts = name.split(".")
                    base_parts = parts if is_pkg else parts[:-1]
                    base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                    base = ".".join(base_parts + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for target in targets:
                # "import fastddpm.a.b" names the module itself; keep the longest prefix that is a module.
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    edges.add(target)
        graph[name] = edges
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Each strongly connected component with more than one module (Tarjan), as a sorted list."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def connect(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
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
            connect(v)
    return sorted(cycles)


def test_no_module_level_import_cycles():
    graph = import_graph()
    assert "fastddpm.ops" in graph and "fastddpm" in graph  # the walk found the package
    cycles = find_cycles(graph)
    assert not cycles, "import cycles in fastddpm (module-level imports): " + "; ".join(" <-> ".join(c) for c in cycles)


@pytest.mark.parametrize(
    "files,expected",
    [
        ({"a.py": "from . import b\n", "b.py": "import pkg.a\n"}, [["pkg.a", "pkg.b"]]),
        (
            {"a.py": "from .sub.c import x\n", "sub/__init__.py": "", "sub/c.py": "from ..a import y\n"},
            [["pkg.a", "pkg.sub.c"]],
        ),
        ({"a.py": "def f():\n    from . import b\n", "b.py": "from .a import f\n"}, []),
        (
            {
                "a.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .b import B\n",
                "b.py": "import pkg.a\n",
            },
            [],
        ),
        (
            {"a.py": "try:\n    from . import b\nexcept ImportError:\n    b = None\n", "b.py": "from pkg import a\n"},
            [["pkg.a", "pkg.b"]],
        ),
    ],
    ids=["relative-and-absolute", "subpackage", "function-level-ignored", "type-checking-ignored", "inside-try"],
)
def test_the_checker_sees_cycles(tmp_path, files, expected):
    """The walk itself: a cycle through relative, absolute, subpackage and try-block imports is found."""
    root = tmp_path / "pkg"
    root.mkdir()
    (root / "__init__.py").write_text("")
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    assert find_cycles(import_graph(root, "pkg")) == expected
