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


def test_host_overhead_smoke(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks/host_overhead.py"), "--smoke", "--configs", "LoRA",
                             "--allocators", "lowmem caching", "glibc default", "--out", str(tmp_path)],
                            cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads((tmp_path / "host_overhead.json").read_text())
    assert [r["host_allocator"] for r in rows] == ["caching", "system"]
    assert "allocator_peak_bytes" in rows[0] and "allocator_peak_bytes" not in rows[1]  # tiny: maybe no 1 MiB tensor
    assert "| LoRA | lowmem caching |" in (tmp_path / "host_overhead.md").read_text()


def test_peers_target_compares_lowmem_under_the_best_peers_budget_with_that_peer():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import peers
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    row = dict(status="ok", method="lora")
    rows = [dict(row, tool="hf", rss_delta_bytes=300, tokens_per_s=100.0),
            dict(row, tool="torchtune", rss_delta_bytes=200, tokens_per_s=100.0),
            dict(row, tool="lowmem", budget_kind="target", budget_from="torchtune", rss_delta_bytes=140,
                 tokens_per_s=111.0, strategies=dict(precision="fp32", activation_checkpointing="full",
                                                     cross_entropy="fused")),
            dict(row, tool="lowmem", budget_kind="tight", budget_from="torchtune", rss_delta_bytes=10, tokens_per_s=1.0,
                 strategies=dict(precision="fp32", activation_checkpointing="full", cross_entropy="standard"))]
    target, tight = peers.target_rows({"best_rows": rows})
    assert (target["peer"], target["rss_ratio"], round(target["speed_ratio"], 2), target["met"]) == (
        "torchtune", 0.7, 1.11, True)
    assert target["plan"] == "fp32, checkpointing full, fused CE" and tight["budget"] == "tight"
    rows[2]["tokens_per_s"] = 109.0
    assert not peers.target_rows({"best_rows": rows})[0]["met"]


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks/gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(ROOT / "benchmarks"))  # for its `from _spec import ...`
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return module


def test_gpu_check_table_and_targets():
    g = _gpu_check()
    gib = 2**30
    row = dict(planned_bytes=int(10.2 * gib), allocated_bytes=10 * gib, reserved_bytes=11 * gib,
               planned_reserved_bytes=int(11.22 * gib),
               reserved_over_allocated=1.10, alloc_retries=0, tokens_per_s=50_000.0, planned_tokens_per_s=60_000.0,
               attention_kernel="varlen", final_loss=7.0)
    full = {**row, "row": "full bf16", "mfu": g.mfu(50_000.0, 10**9, 10**9, 989e12)}
    lora = {**row, "row": "LoRA r=8", "alloc_retries": 2, "mfu": 0.2}
    rows = [full, lora, {"row": "+ 8-bit AdamW", "failed": "ImportError: no bitsandbytes"}]
    resume = {"steps": 8, "resumed_from": 4, "compared_steps": 4, "exact": True, "max_abs_diff": 0.0}
    md = g.to_markdown("## t", {"passed": 5, "failed": 0, "skipped": 1}, rows, resume)
    assert full["mfu"] == pytest.approx(6 * 10**9 * 50_000 / 989e12)  # 6·N·tokens/s for full fine-tuning
    assert "| full bf16 | 10.20 GiB | 10.00 GiB | +2.0% | 11.22 GiB | 11.00 GiB | 1.10 | 0 | 50,000 | 60,000 | 30.3% | varlen |" in md
    assert "| + 8-bit AdamW | — |" in md and "failed: ImportError" in md
    assert "| MFU >= 40%, full bf16 | 30.3% | FAIL |" in md
    assert "| reserved/allocated <= 1.10 | 1.10 | pass |" in md
    assert "| no allocator retries | 2 | FAIL |" in md
    assert "| every row ran | 1 failed | FAIL |" in md
    assert "| resume reproduces the losses exactly | yes | pass |" in md
    assert "`pytest -m gpu`: 5 passed, 0 failed, 1 skipped" in md


@pytest.mark.skipif(importlib.util.find_spec("torch") is None or __import__("torch").cuda.is_available(),
                    reason="checks the no-GPU exit")
def test_gpu_check_without_cuda(tmp_path):
    ran = [subprocess.run([sys.executable, str(ROOT / "benchmarks/gpu_check.py"), *flags, "--out", str(tmp_path)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300) for flags in ([], ["--require-gpu"])]
    assert [r.returncode for r in ran] == [0, 1], ran[0].stderr[-2000:]
    assert "needs a CUDA GPU" in ran[0].stdout and not list(tmp_path.iterdir())


def test_checkpoint_digest_smoke():
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks/checkpoint_digest.py"), "--smoke"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "save_checkpoint, with digests" in result.stdout


def test_partial_checkpointing_smoke(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks/partial_checkpointing.py"), "--smoke",
                             "--cache", str(tmp_path / "cache"), "--out", str(tmp_path)],
                            cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = {r["checkpointing"]: r for r in json.loads((tmp_path / "partial_checkpointing_smoke.json").read_text())}
    assert set(rows) == {"off", "first-1", "full"}
    assert rows["first-1"]["max_loss_diff"] < 1e-5 and rows["full"]["max_loss_diff"] < 1e-5
    assert "| lora | first-1 |" in (tmp_path / "partial_checkpointing_smoke.md").read_text()
