"""data/ is layered: no module imports one that (directly or not) imports it back, and the tokenizer knows
nothing of files or record formats (issue #18).

The import graph comes from the source (an AST scan), not from importing: every import statement counts,
whether at module level, inside a function or under `if TYPE_CHECKING:`, since each one is a dependency a
reader has to follow. `import_graph` / `import_cycles` take any package directory (e.g. src/lowmem/nn).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "src" / "lowmem" / "data"

# What reads files and knows record formats (FORMATS), and what wires them to a tokenizer: the tokenizer
# must reach none of it.
FORMATS = {"lowmem.data.corpus", "lowmem.data.records", "lowmem.data.templates"}
FILES_AND_FORMATS = FORMATS | {"lowmem.data.prepare", "lowmem.data.pack", "lowmem.data.loader"}


def package_name(package_dir: Path) -> str:
    """Dotted name of a package directory: its name under each enclosing directory with an __init__.py."""
    parts = [package_dir.name]
    parent = package_dir.parent
    while (parent / "__init__.py").is_file():
        parts.append(parent.name)
        parent = parent.parent
    return ".".join(reversed(parts))


def import_graph(package_dir: str | Path) -> dict[str, set[str]]:
    """Module → the modules of the same package (subpackages included) it imports, anywhere in its source.

    Absolute (`from lowmem.data.x import y`, `import lowmem.data.x`) and relative (`from .x import y`,
    `from . import x`) imports are resolved to the module named; `from package import name` is an edge to the
    submodule `name` if there is one, else to the package's __init__. Importing a submodule also runs its
    parent package's __init__, but that is not counted as an edge (else every re-exporting __init__ would be
    in a cycle with its modules).
    """
    package_dir = Path(package_dir)
    package = package_name(package_dir)
    files = {}
    for path in sorted(package_dir.rglob("*.py")):
        rel = path.relative_to(package_dir).with_suffix("").parts
        rel = rel[:-1] if rel[-1] == "__init__" else rel
        files[".".join((package, *rel))] = path
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        is_init = path.name == "__init__.py"
        here = name if is_init else name.rpartition(".")[0]  # the package relative imports start from
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = here.split(".")[: len(here.split(".")) - (node.level - 1)]
                    base = ".".join([*anchor, *([base] if base else [])])
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            for target in targets:
                while target and target not in files:  # `import pkg.mod.attr`: the module holding it
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def import_cycles(package_dir: str | Path) -> list[list[str]]:
    """The import cycles of a package: each strongly connected set of modules of size > 1, sorted."""
    graph = import_graph(package_dir)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
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


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    """Every module `start` imports, directly or through others."""
    seen: set[str] = set()
    todo = [start]
    while todo:
        for w in graph[todo.pop()] - seen:
            seen.add(w)
            todo.append(w)
    return seen


def test_data_has_no_import_cycle():
    assert import_cycles(DATA) == []


def test_tokenizer_imports_nothing_that_reads_files_or_knows_record_formats():
    graph = import_graph(DATA)
    assert graph["lowmem.data.tokenizer"].isdisjoint(FORMATS)
    assert reachable(graph, "lowmem.data.tokenizer").isdisjoint(FILES_AND_FORMATS)
    assert reachable(graph, "lowmem.data.hf_tokenizer").isdisjoint(FILES_AND_FORMATS)


def test_cycle_finder_sees_function_level_relative_and_type_checking_imports(tmp_path: Path):
    pkg = tmp_path / "top" / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (tmp_path / "top" / "__init__.py").write_text("")
    sources = {
        "__init__.py": "from top.pkg.a import f\n",
        "a.py": "from . import b\n\ndef f():\n    return b\n",
        "b.py": "def g():\n    from .a import f\n    return f\n",  # a <-> b, through a function
        "c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from top.pkg.sub import d\n",
        "sub/__init__.py": "",
        "sub/d.py": "import top.pkg.c\nimport os\n",  # c <-> sub.d, under TYPE_CHECKING
        "e.py": "from top.pkg import a, sub\nfrom .sub.d import x\n",  # no cycle
    }
    for name, text in sources.items():
        (pkg / name).write_text(text)
    graph = import_graph(pkg)
    assert graph["top.pkg"] == {"top.pkg.a"}
    assert graph["top.pkg.e"] == {"top.pkg.a", "top.pkg.sub", "top.pkg.sub.d"}
    assert graph["top.pkg.sub.d"] == {"top.pkg.c"}
    assert import_cycles(pkg) == [["top.pkg.a", "top.pkg.b"], ["top.pkg.c", "top.pkg.sub.d"]]
