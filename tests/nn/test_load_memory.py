"""load_hf's peak memory, measured: benchmarks/load_memory.py at smoke size (a ~78 MB fp32 checkpoint)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_loading_needs_little_more_than_the_loaded_model(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks/load_memory.py"), "--smoke", "--out",
                             str(tmp_path)], cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {r["mode"]: r for r in json.loads((tmp_path / "load_memory.json").read_text())["rows"]}
    # Measured 1.02 (fp32) and 1.04 (bf16, read through a 1 MiB cast buffer) here: what is left over is the
    # cast buffer, the Python objects and allocator bookkeeping. 1.15 leaves room for another allocator or
    # kernel; loading the checkpoint through a memory map, or whole before casting, gives 1.3 to 3.
    for mode in ("fp32", "bf16"):
        assert rows[mode]["ratio"] <= 1.15, rows[mode]
        # no page of the checkpoint is mapped into the process (only a few MB of library code are paged in)
        assert rows[mode]["rss_file_extra_bytes"] < 0.05 * rows[mode]["model_bytes"], rows[mode]
    assert rows["bf16"]["model_bytes"] * 2 == rows["fp32"]["model_bytes"]
    # NF4 holds a quarter of the projections' fp32 bytes plus fp32 embeddings. Measured 0.89-1.0 here with the
    # fixed mmap threshold (without it 2.3-3.2: glibc kept the freed quantization temporaries).
    assert rows["nf4"]["model_bytes"] < 0.5 * rows["fp32"]["model_bytes"]
    assert rows["nf4"]["ratio"] <= 1.15, rows["nf4"]
