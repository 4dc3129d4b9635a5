"""Issue #18: no function in lowmem.plan runs past a screen (60 lines), so each reads as one step."""

import ast
from pathlib import Path

import lowmem.plan

MAX_LINES = 60
PLAN_DIR = Path(lowmem.plan.__file__).parent
# trace.py is moving to lowmem.train (issue #18) and is split there
EXEMPT = {"trace.py"}


def function_lengths(source: str) -> dict[str, int]:
    """Qualified name -> lines (decorators excluded, docstring included) of every function in `source`."""
    lengths = {}

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                lengths[prefix + child.name] = child.end_lineno - child.lineno + 1
                visit(child, f"{prefix}{child.name}.")
            elif isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")

    visit(ast.parse(source), "")
    return lengths


def test_the_scan_counts_lines_of_nested_functions_and_methods():
    source = "def f():\n    def g():\n        pass\n    return g\n\nclass C:\n    def m(self):\n        x = 1\n        return x\n"
    assert function_lengths(source) == {"f": 4, "f.g": 2, "C.m": 3}


def test_no_planner_function_is_longer_than_a_screen():
    files = sorted(p for p in PLAN_DIR.glob("*.py") if p.name not in EXEMPT)
    assert len(files) >= 8  # the scan found the package's modules
    too_long = {f"{p.name}:{name}": n for p in files for name, n in function_lengths(p.read_text()).items()
                if n > MAX_LINES}
    assert not too_long, f"functions over {MAX_LINES} lines (split them into named steps): {too_long}"
