"""Layering of `lowmem.nn`: no import cycle between its modules, and no function too long to read at once.

Both are read from the source with `ast`, so an import hidden in a function body or under `TYPE_CHECKING`
counts as much as one at the top of a module.
"""

from __future__ import annotations

import ast
from pathlib import Path

import lowmem.nn

NN_DIR = Path(lowmem.nn.__file__).parent


def _imported_modules(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> list[str]:
    """Absolute names of the modules one import statement in `module` may load (`from a import b`: a and a.b)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level:  # relative: resolve against the importing module's package
        package = module.split(".") if is_package else module.split(".")[:-1]
        base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
    else:
        base = node.module or ""
    return [base] + [f"{base}.{alias.name}" for alias in node.names]


def import_graph(package_dir: Path, package: str | None = None) -> dict[str, set[str]]:
    """Module of the package in `package_dir` → the package's modules it imports, wherever in its source.

    Modules are named relative to the package ("llama", "__init__" for the package itself); only imports of
    the package's own modules are edges. `package` is its absolute name ("lowmem.nn"); by default the chain
    of directories holding an `__init__.py` that ends at `package_dir`.
    """
    if package is None:
        parts = [package_dir.name]
        parent = package_dir.parent
        while (parent / "__init__.py").exists():
            parts.insert(0, parent.name)
            parent = parent.parent
        package = ".".join(parts)
    modules = {p.stem: p for p in sorted(package_dir.glob("*.py"))}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        module = package if name == "__init__" else f"{package}.{name}"
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import | ast.ImportFrom):
                for target in _imported_modules(node, module, name == "__init__"):
                    if target == package:
                        edges.add("__init__")
                    elif target.startswith(package + ".") and target.removeprefix(package + ".") in modules:
                        edges.add(target.removeprefix(package + "."))
        edges.discard(name)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph` as [a, b, ..., a], or None when it has none (depth-first search)."""
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> list[str] | None:
        if node in path:
            return path[path.index(node):] + [node]
        if node in done:
            return None
        for nxt in sorted(graph.get(node, ())):
            cycle = visit(nxt, [*path, node])
            if cycle:
                return cycle
        done.add(node)
        return None

    for start in sorted(graph):
        cycle = visit(start, [])
        if cycle:
            return cycle
    return None


def test_nn_has_no_import_cycle():
    graph = import_graph(NN_DIR)
    assert {"llama", "lora", "lora_settings", "config"} <= graph.keys()
    assert find_cycle(graph) is None, f"import cycle in lowmem.nn: {' -> '.join(find_cycle(graph))}"


def test_find_cycle_sees_function_level_and_type_checking_imports(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.b import X\n")
    (pkg / "b.py").write_text("def f():\n    from . import c\n")
    (pkg / "c.py").write_text("import pkg.a\n")
    (pkg / "d.py").write_text("from pkg import a\nimport os\n")
    graph = import_graph(pkg)
    assert graph == {"__init__": set(), "a": {"b"}, "b": {"__init__", "c"}, "c": {"a"}, "d": {"__init__", "a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    (pkg / "c.py").write_text("import pkg\n")
    assert find_cycle(import_graph(pkg)) is None
    # named otherwise, only its relative import still points inside the package
    assert import_graph(pkg, package="other") == {"__init__": set(), "a": set(), "b": {"__init__", "c"},
                                                  "c": set(), "d": set()}
