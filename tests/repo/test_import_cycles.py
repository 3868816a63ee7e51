"""No import cycle between the modules of `gateway/`, at run time or at type level.

Why type level too: a cycle hidden behind `if TYPE_CHECKING:` or a function-level import is still
two modules that each need the other, so neither can be understood, tested or compiled alone;
it is also how wide interfaces creep back (`admin: object`, `getattr` duck typing). The check
walks the AST of every file, so top-level, function-level and `TYPE_CHECKING` imports all count.
"""

from __future__ import annotations

import ast
from collections import deque
from itertools import pairwise
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# module -> {imported module: line of the first import of it}
Graph = dict[str, dict[str, int]]


def module_names(root: Path, package: str) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file under `root / package`."""
    out: dict[str, Path] = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _known(name: str, modules: dict[str, Path]) -> str | None:
    """`name` if it is one of ours, else its longest prefix that is (None: not ours at all)."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(
    source: str, module: str, modules: dict[str, Path], is_package: bool = False
) -> dict[str, int]:
    """The modules of `modules` that `source` (module `module`) imports, each with its first line.

    `from a.b import c` is module `a.b.c` when that is a module, else `a.b` (c is a name in it).
    """
    found: dict[str, int] = {}
    package = module if is_package else module.rpartition(".")[0]

    def add(name: str | None, line: int) -> None:
        if name is not None and name != module:
            found.setdefault(name, line)

    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(_known(alias.name, modules), node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:
                full = f"{base}.{alias.name}"
                add(full if full in modules else _known(base, modules), node.lineno)
    return found


def module_graph(root: Path, package: str) -> Graph:
    modules = module_names(root, package)
    return {
        name: imports_of(path.read_text(encoding="utf-8"), name, modules, path.name == "__init__.py")
        for name, path in modules.items()
    }


def strongly_connected(graph: Graph) -> list[list[str]]:
    """Tarjan's algorithm: the components of more than one module, or of one importing itself."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, {})):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component: list[str] = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph.get(v, {}):
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(components)


def shortest_cycle(graph: Graph, component: list[str]) -> list[str]:
    """A shortest cycle through the component's first module, staying inside the component."""
    start, members = component[0], set(component)
    parent: dict[str, str] = {}
    queue = deque([start])
    while queue:
        v = queue.popleft()
        for w in sorted(graph.get(v, {})):
            if w == start:
                path = [v]
                while path[-1] != start:
                    path.append(parent[path[-1]])
                return [*reversed(path), start]
            if w in members and w not in parent:
                parent[w] = v
                queue.append(w)
    raise AssertionError(f"no cycle through {start} in {component}")  # pragma: no cover


def describe_cycles(graph: Graph) -> list[str]:
    """One line per cycle: its modules, then one concrete loop, `module:line` of each import."""
    out = []
    for component in strongly_connected(graph):
        loop = shortest_cycle(graph, component)
        steps = [f"{a}:{graph[a][b]}" for a, b in pairwise(loop)]
        out.append(f"{{{', '.join(component)}}}: {' -> '.join([*steps, loop[-1]])}")
    return out


def test_gateway_has_no_import_cycle() -> None:
    cycles = describe_cycles(module_graph(ROOT, "gateway"))
    assert not cycles, "import cycles (type-level imports count too):\n" + "\n".join(cycles)


# ---- the checker itself, on tiny synthetic packages ------------------------------------------------


def _package(root: Path, files: dict[str, str]) -> Graph:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return module_graph(root, "pkg")


def test_checker_finds_a_type_level_and_a_function_level_cycle(tmp_path: Path) -> None:
    graph = _package(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/a.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.sub import b\n",
            "pkg/sub/__init__.py": "",
            "pkg/sub/b.py": "def f():\n    from pkg.c import name\n",
            "pkg/c.py": "import pkg.a\n",
            "pkg/d.py": "from pkg import a\n",  # imports into the cycle, is not part of it
        },
    )
    assert graph["pkg.a"] == {"pkg.sub.b": 3}  # `from pkg.sub import b`: b is a module
    assert graph["pkg.sub.b"] == {"pkg.c": 2}  # `from pkg.c import name`: a name in pkg.c
    assert strongly_connected(graph) == [["pkg.a", "pkg.c", "pkg.sub.b"]]
    [line] = describe_cycles(graph)
    assert line == "{pkg.a, pkg.c, pkg.sub.b}: pkg.a:3 -> pkg.sub.b:2 -> pkg.c:1 -> pkg.a"


def test_checker_passes_an_acyclic_graph(tmp_path: Path) -> None:
    graph = _package(
        tmp_path,
        {
            "pkg/__init__.py": "from pkg import a\n",
            "pkg/a.py": "from . import b\nimport json\n",
            "pkg/b.py": "from pkg.c import helper\n",
            "pkg/c.py": "import os\n",
        },
    )
    assert graph == {"pkg": {"pkg.a": 1}, "pkg.a": {"pkg.b": 1}, "pkg.b": {"pkg.c": 1}, "pkg.c": {}}
    assert strongly_connected(graph) == []
    assert describe_cycles(graph) == []


def test_checker_sees_a_module_importing_itself() -> None:
    assert strongly_connected({"m": {"m": 1}}) == [["m"]]
