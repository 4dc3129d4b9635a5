"""Running out of memory does not end a run (memory.on_oom = "replan"), rehearsed on the CPU with an enforced cap.

`--cap-memory` makes the live-tensor tracker raise torch.OutOfMemoryError once live bytes pass the cap, as the
CUDA caching allocator does on a full card. The cap is set between the measured peaks of the first and the
second step of an uncapped run (the second holds AdamW's states through forward and backward), so the run
completes step 1 and runs out of memory in step 2, exactly where a GPU run at the edge of its card would.
"""

import json
import subprocess
import sys

import pytest
import torch

from lowmem.train.memory import LiveTensorTracker

QUICKSTART_OVERRIDES = ["train.steps=5", "train.schedule.warmup_steps=1", "train.seq_len=256", "train.micro_batch=8", "train.eval_every=0",
                        "data.tokenizer.vocab_size=1024", "model.preset=tiny", "memory.precision=fp32"]


def _lowmem(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lowmem.cli", *args], capture_output=True, text=True, timeout=600)


def _records(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def uncapped(tmp_path_factory):
    root = tmp_path_factory.mktemp("oom")
    overrides = [f"--set={o}" for o in [*QUICKSTART_OVERRIDES, f"data.cache_dir={root / 'cache'}"]]
    run_dir = root / "uncapped"
    done = _lowmem("execute", "examples/quickstart.toml", *overrides, "--out", str(run_dir), "-q")
    assert done.returncode == 0, done.stderr
    records = _records(run_dir)
    step1, step2 = records[0]["tensor_peak_bytes"], records[1]["tensor_peak_bytes"]
    assert step2 > step1 * 1.01, "the second step must hold more (AdamW's states) for the cap to fall between"
    return root, overrides, records, (step1 + step2) // 2


def test_tracker_cap_raises_out_of_memory_past_the_cap_only():
    with LiveTensorTracker(cap_bytes=4096 * 4 + 100) as tracker:
        a = torch.ones(4096)  # 16 KiB: under the cap
        with pytest.raises(torch.OutOfMemoryError, match="passed the enforced cap"):
            torch.ones(4096)  # together past it
    assert tracker.peak_bytes >= a.numel() * 4


def test_out_of_memory_replans_and_continues_with_the_same_losses(uncapped, tmp_path):
    root, overrides, reference, cap = uncapped
    run_dir = tmp_path / "capped"
    done = _lowmem("execute", "examples/quickstart.toml", *overrides, "--out", str(run_dir), "--cap-memory",
                   f"{cap}B")
    assert done.returncode == 0, done.stderr
    said = [line for line in done.stderr.splitlines() if line.startswith("out of memory")]
    assert len(said) == 1 and "step 2" in said[0] and "re-planned for" in said[0] and "resuming from step 1" in said[0]
    assert "Traceback" not in done.stderr
    records = _records(run_dir)
    assert [r["step"] for r in records] == [r["step"] for r in reference]  # step 1 once, then 2.. under the new plan
    # the new plan differs only in memory strategies: the losses are the uncapped run's up to summation order
    for got, want in zip(records, reference, strict=True):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
    new_plan = json.loads((run_dir / "plan.json").read_text())
    old_plan = json.loads((root / "uncapped" / "plan.json").read_text())
    assert new_plan["strategies"] != old_plan["strategies"]
    assert new_plan["memory"]["peak_bytes"] < old_plan["memory"]["peak_bytes"]
    memory = json.loads((run_dir / "memory.json").read_text())
    assert memory["measured_peak_bytes"] <= cap


def test_on_oom_stop_checkpoints_the_last_step_and_stops_with_one_clear_error(uncapped, tmp_path):
    _root, overrides, reference, cap = uncapped
    run_dir = tmp_path / "stopped"
    done = _lowmem("execute", "examples/quickstart.toml", *overrides, "--set=memory.on_oom=stop", "--out",
                   str(run_dir), "--cap-memory", f"{cap}B", "-q")
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert "out of memory in step 2" in done.stderr and "memory.on_oom = 'stop'" in done.stderr
    trainer = json.loads((run_dir / "checkpoints" / "step-00000001" / "trainer.json").read_text())
    assert trainer["step"] == 1
    # the checkpoint is the completed step 1: resuming without the cap gives the uncapped run's losses
    done = _lowmem("execute", "examples/quickstart.toml", *overrides, "--set=memory.on_oom=stop", "--out",
                   str(run_dir), "--resume", "-q")
    assert done.returncode == 0, done.stderr
    for got, want in zip(_records(run_dir), reference, strict=True):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-9)


def test_on_oom_rejects_an_unknown_value():
    from lowmem.spec import decode_spec
    from lowmem.spec.load import SpecError

    with pytest.raises(SpecError, match=r"(?s)memory.on_oom.*'retry'.*'replan', 'stop'"):
        decode_spec('[model]\npreset = "tiny"\n[memory]\non_oom = "retry"\n', "toml")
