"""CI runs the benchmarks at smoke size so the scripts keep working (their figures are not asserted here)."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

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


def test_strategy_speed_smoke(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks/strategy_speed.py"), "--smoke", "--out", str(tmp_path)],
                            cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    table = (tmp_path / "strategy_speed.md").read_text()
    assert "| standard |" in table and "| split 4 |" in table and "| fused CE |" in table


def test_data_benchmark_smoke(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks/data.py"), "--smoke", "--out", str(tmp_path)],
                            cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "best-fit packing of 2,000,000 tokens" in result.stdout


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None or importlib.util.find_spec("peft") is None,
                    reason="the HF peer needs transformers and peft (pip install -e '.[dev]')")
def test_peers_smoke(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks/peers.py"), "--smoke", "--out", str(tmp_path)],
                            cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "| full | HF Trainer + peft |" in result.stdout and "| lora | lowmem |" in result.stdout
    rows = json.loads((tmp_path / "peers_smoke.json").read_text())["rows"]
    assert all(r["status"] == "ok" for r in rows), [r.get("reason") for r in rows]
    # same initial weights and rows: the first step's loss agrees across the tools
    first = {(r["method"], r["tool"]): r["first_loss"] for r in rows}
    assert first["full", "hf"] == pytest.approx(first["full", "lowmem"], abs=1e-3)
