"""CI runs the benchmarks at smoke size so the scripts keep working (their figures are not asserted here)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_memory_matrix_smoke(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks/memory_matrix.py"), "--smoke", "--out", str(tmp_path / "results")],
                            cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "| fp32 | on | 2 |" in result.stdout and "worst |error|" in result.stdout


def test_ladder_smoke(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks/ladder.py"), "--smoke", "--out", str(tmp_path)],
                            cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "| QLoRA r=8 (NF4 base) |" in result.stdout
    assert "| auto, 100% of baseline: fp32" in result.stdout  # the planner's own pick, measured


def test_data_benchmark_smoke(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks/data.py"), "--smoke", "--out", str(tmp_path)],
                            cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "best-fit packing of 2,000,000 tokens" in result.stdout
