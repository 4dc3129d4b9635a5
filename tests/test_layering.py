"""The package's layering, pinned: the planner is a pure function of spec and hardware (it never imports the
executor), and no function anywhere in src/lowmem runs past 60 lines. Import cycles: tests/data and tests/nn."""

import ast
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "lowmem"
MAX_FUNCTION_LINES = 60


def imported_modules(path: Path) -> set[str]:
    """Every `lowmem...` module a file imports, at module level or inside functions (relative imports resolved)."""
    package = ".".join(path.relative_to(SRC.parent).with_suffix("").parts)
    if path.name != "__init__.py":
        package = package.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(parent + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
    return {m for m in found if m.startswith("lowmem")}


def long_functions(directory: Path, limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """`file:line name (N lines)` for each function in `directory` longer than `limit` lines."""
    found = []
    for path in sorted(directory.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = node.end_lineno - node.lineno + 1
                if n > limit:
                    found.append(f"{path.relative_to(SRC)}:{node.lineno} {node.name} ({n} lines)")
    return found


def test_the_planner_imports_nothing_from_the_executor():
    offending = {str(p.relative_to(SRC)): sorted(m for m in imported_modules(p) if m.startswith("lowmem.train"))
                 for p in (SRC / "plan").rglob("*.py")}
    assert {k: v for k, v in offending.items() if v} == {}


def test_importing_the_planner_does_not_load_the_executor():
    code = "import sys, lowmem.plan\nprint(sorted(m for m in sys.modules if m.startswith('lowmem.train')))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_the_finder_sees_function_level_and_relative_imports(tmp_path):
    # the check above must be able to fail: an import inside a function counts
    assert "lowmem.train.dryrun" in imported_modules(SRC / "cli.py")
    assert "lowmem.train.checkpoint" in imported_modules(SRC / "train" / "rundir.py")


def test_no_long_functions_anywhere_in_the_package():
    assert long_functions(SRC) == []


def test_long_functions_counts_from_def_to_last_line(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(59))
    (tmp_path / "m.py").write_text(f"def short():\n{body}\n\n\ndef too_long():\n{body}\n    return 0\n")
    global SRC
    saved, SRC = SRC, tmp_path
    try:
        assert long_functions(tmp_path) == ["m.py:63 too_long (61 lines)"]
    finally:
        SRC = saved
