"""Checkpoints: atomic, rotated, and a run killed or interrupted resumes to the same losses (bitwise, CPU fp32)."""

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time

import msgspec
import pytest

from lowmem.plan import plan
from lowmem.plan.structs import Strategies
from lowmem.spec import encode_spec
from lowmem.train import execute
from lowmem.train.checkpoint import CheckpointError, latest_checkpoint, plan_fingerprint, read_trainer_state


def _losses(run_dir):
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_checkpoints_are_written_and_rotated(tiny_spec, tmp_path):
    spec = tiny_spec("train.steps=7", "output.save_every=2", "output.keep=2")
    execute(plan(spec, "cpu"), tmp_path, progress=False)
    names = sorted(d.name for d in (tmp_path / "checkpoints").iterdir())
    assert names == ["step-00000004", "step-00000006"]  # 2 kept; none at the final step (the model is saved)
    for name in ("model.safetensors", "optimizer.safetensors", "trainer.json"):
        assert (tmp_path / "checkpoints/step-00000006" / name).is_file()


def test_resume_from_a_checkpoint_matches_the_uninterrupted_run(tiny_spec, tmp_path):
    full = tiny_spec("train.steps=6")
    execute(plan(full, "cpu"), tmp_path / "full", progress=False)
    # same run, checkpointing every 2 steps; drop the newest checkpoint and the final model to "go back in time"
    spec = tiny_spec("train.steps=6", "output.save_every=2", "output.keep=5")
    execute(plan(spec, "cpu"), tmp_path / "part", progress=False)
    import shutil

    shutil.rmtree(tmp_path / "part/checkpoints/step-00000004")
    result = execute(plan(spec, "cpu"), tmp_path / "part", progress=False, resume=True)
    assert result.resumed_from_step == 2
    assert _losses(tmp_path / "part") == _losses(tmp_path / "full")  # bitwise


# torchao compiles its update once per parameter shape in each process (about 75 s for the tiny model here)
LOW_BIT = [
    pytest.param(["optimizer.kind=adamw8bit", "optimizer.backend=bitsandbytes"], id="adamw8bit-bnb"),
    pytest.param(["optimizer.kind=adamw8bit", "optimizer.backend=torchao"], id="adamw8bit-torchao",
                 marks=pytest.mark.slow),
    pytest.param(["optimizer.kind=adamw4bit"], id="adamw4bit-torchao", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("optimizer", LOW_BIT)
@pytest.mark.filterwarnings("ignore:.*does not implement _stable_hash_for_caching")
def test_low_bit_optimizers_resume_to_the_uninterrupted_losses(tiny_spec, tmp_path, optimizer):
    pytest.importorskip("bitsandbytes.optim" if "bitsandbytes" in optimizer[-1] else "torchao.optim")
    spec = tiny_spec("train.steps=6", "output.save_every=2", "output.keep=5", *optimizer)
    execute(plan(spec, "cpu"), tmp_path, progress=False)
    uninterrupted = _losses(tmp_path)
    import shutil

    shutil.rmtree(tmp_path / "checkpoints/step-00000004")
    shutil.rmtree(tmp_path / "model")
    result = execute(plan(spec, "cpu"), tmp_path, progress=False, resume=True)
    assert result.resumed_from_step == 2
    assert _losses(tmp_path) == uninterrupted  # bitwise
    trainer = json.loads((tmp_path / "checkpoints/step-00000002/trainer.json").read_text())
    assert trainer["sharded"] is False and trainer["loader"]["rows_per_batch"] == 4


def test_a_setting_added_later_with_its_default_keeps_the_fingerprint(tiny_spec):
    # what an older version, whose Strategies had no fsdp_cpu_offload field yet, fingerprinted for this plan
    p = plan(tiny_spec(), "cpu")
    fields = [(f.name, f.type, f.default) for f in msgspec.structs.fields(Strategies) if f.name != "fsdp_cpu_offload"]
    Older = msgspec.defstruct("Strategies", fields, kw_only=True, frozen=True)
    older = Older(**{name: getattr(p.strategies, name) for name, _, _ in fields})
    newer = plan_fingerprint(p)
    assert newer == plan_fingerprint(msgspec.structs.replace(p, strategies=older))
    # a value other than the default still counts
    changed = msgspec.structs.replace(p.strategies, fsdp_cpu_offload=True)
    assert plan_fingerprint(msgspec.structs.replace(p, strategies=changed))["strategies"] != newer["strategies"]


def test_resume_refuses_a_different_plan(tiny_spec, tmp_path):
    spec = tiny_spec("train.steps=3", "output.save_every=1")
    execute(plan(spec, "cpu"), tmp_path, progress=False)
    other = tiny_spec("train.steps=3", "output.save_every=1", "optimizer.lr=1e-2")
    with pytest.raises(ValueError, match="different plan"):
        execute(plan(other, "cpu"), tmp_path, progress=False, resume=True)


def test_a_new_run_never_overwrites_a_runs_checkpoints(tiny_spec, tmp_path):
    spec = tiny_spec("train.steps=2", "output.save_every=1")
    execute(plan(spec, "cpu"), tmp_path, progress=False)
    before = latest_checkpoint(tmp_path)
    with pytest.raises(ValueError, match="--resume"):
        execute(plan(spec, "cpu"), tmp_path, progress=False)
    assert latest_checkpoint(tmp_path) == before


def _spawn(spec_file, run_dir):
    return subprocess.Popen([sys.executable, "-m", "lowmem.cli", "execute", str(spec_file), "--out", str(run_dir),
                             "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(path, proc, timeout=120):
    """Wait until the checkpoint `path` or a later one exists (older ones are rotated away)."""
    deadline = time.monotonic() + timeout
    wanted = int(path.name.split("-")[1])

    def reached():
        latest = latest_checkpoint(path.parent.parent)
        return latest is not None and int(latest.name.split("-")[1]) >= wanted

    while not reached():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.05)


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_gives_the_same_losses(tiny_spec, tmp_path):
    spec = tiny_spec("train.steps=12", "output.save_every=2", "output.keep=3")
    spec_file = tmp_path / "spec.toml"
    spec_file.write_bytes(encode_spec(spec))
    execute(plan(spec, "cpu"), tmp_path / "reference", progress=False)

    run_dir = tmp_path / "killed"
    proc = _spawn(spec_file, run_dir)
    _wait_for(run_dir / "checkpoints/step-00000004", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "model").exists()
    # whatever the kill interrupted, only complete checkpoints are visible
    ckpt = latest_checkpoint(run_dir)
    assert {p.name for p in ckpt.iterdir()} == {"model.safetensors", "optimizer.safetensors", "trainer.json"}
    result = subprocess.run([sys.executable, "-m", "lowmem.cli", "execute", str(run_dir), "--resume", "--quiet"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert _losses(run_dir) == _losses(tmp_path / "reference")
    assert not [d for d in (run_dir / "checkpoints").iterdir() if d.name.startswith(".tmp-")]


@pytest.mark.slow
def test_sigterm_writes_a_checkpoint_and_exits_cleanly(tiny_spec, tmp_path):
    # long enough that the signal always arrives mid-run; the first checkpoint shows the loop is running
    spec = tiny_spec("train.steps=100000", "output.save_every=2", "output.keep=1", "train.schedule.warmup_steps=0")
    spec_file = tmp_path / "spec.toml"
    spec_file.write_bytes(encode_spec(spec))
    run_dir = tmp_path / "run"
    proc = _spawn(spec_file, run_dir)
    _wait_for(run_dir / "checkpoints/step-00000002", proc)
    os.kill(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "--resume" in out
    step = int(latest_checkpoint(run_dir).name.split("-")[1])
    assert 2 <= step < 100000
    assert _losses(run_dir)[-1] == _losses(run_dir)[step - 1]


def _keep_only_step_2(run_dir):
    """A finished 6-step run, as if it had been stopped right after its step-2 checkpoint."""
    shutil.rmtree(run_dir / "checkpoints/step-00000004")
    shutil.rmtree(run_dir / "model")


def _limit_file_size(n_bytes: int):
    def apply():  # in the child: a write past n_bytes fails with EFBIG instead of killing it with SIGXFSZ
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (n_bytes, n_bytes))

    return apply


def test_a_full_disk_fails_clearly_and_keeps_the_last_checkpoint(tiny_spec, tmp_path):
    """A real write failure (EFBIG under RLIMIT_FSIZE) while saving step 4: the run stops with a message naming
    the checkpoint and the fix; step 2 stays complete and loadable, and no partial directory is left."""
    spec = tiny_spec("train.steps=6", "output.save_every=2", "output.keep=5")
    execute(plan(spec, "cpu"), tmp_path, progress=False)
    _keep_only_step_2(tmp_path)
    optimizer_bytes = (tmp_path / "checkpoints/step-00000002/optimizer.safetensors").stat().st_size
    done = subprocess.run([sys.executable, "-m", "lowmem.cli", "execute", str(tmp_path), "--resume", "--quiet"],
                          capture_output=True, text=True, timeout=300,
                          preexec_fn=_limit_file_size(optimizer_bytes // 2))
    assert done.returncode != 0
    message = done.stdout + done.stderr
    assert "Traceback" not in message, message[-3000:]
    for part in ("could not write checkpoint", str(tmp_path / "checkpoints/step-00000004"), "File too large",
                 "step-00000002, is intact", "--resume", "Free space"):
        assert part in message, (part, message[-3000:])
    assert latest_checkpoint(tmp_path).name == "step-00000002"
    assert [d.name for d in (tmp_path / "checkpoints").iterdir()] == ["step-00000002"]  # no temporary directory
    result = execute(plan(spec, "cpu"), tmp_path, progress=False, resume=True)  # the kept checkpoint still works
    assert result.resumed_from_step == 2 and result.steps == 6


def test_a_checkpoint_of_another_plan_names_what_changed(tiny_spec, tmp_path):
    execute(plan(tiny_spec("train.steps=2", "output.save_every=1"), "cpu"), tmp_path, progress=False)
    other = tiny_spec("train.steps=2", "output.save_every=1", "optimizer.lr=1e-2", "model.init_seed=7")
    changed = r"model, optimizer changed: model.init_seed: \(default\) -> 7; optimizer.lr: 0.003 -> 0.01"
    with pytest.raises(CheckpointError, match=rf"different plan \({changed}\)") as err:
        execute(plan(other, "cpu"), tmp_path, progress=False, resume=True)
    assert "step-00000001" in str(err.value) and "another output directory" in str(err.value)


@pytest.mark.parametrize("damage", ["truncate", "header", "trainer.json"])
def test_a_damaged_checkpoint_is_reported_with_the_file_and_the_fix(tiny_spec, tmp_path, damage):
    spec = tiny_spec("train.steps=2", "output.save_every=1", "output.keep=5")
    execute(plan(spec, "cpu"), tmp_path, progress=False)
    ckpt = latest_checkpoint(tmp_path)
    target = ckpt / ("trainer.json" if damage == "trainer.json" else "optimizer.safetensors")
    data = target.read_bytes()
    if damage == "truncate":
        target.write_bytes(data[: len(data) // 2])  # a write cut short
    else:
        target.write_bytes(b"\xff" * 64 + data[64:])  # garbage where the header (or JSON) starts
    with pytest.raises(CheckpointError, match="damaged|not a readable lowmem checkpoint") as err:
        execute(plan(spec, "cpu"), tmp_path, progress=False, resume=True)
    assert str(target if damage != "trainer.json" else ckpt) in str(err.value)
    assert f"Delete {ckpt}" in str(err.value) or f"delete {ckpt}" in str(err.value)
    if damage == "trainer.json":
        with pytest.raises(CheckpointError):
            read_trainer_state(ckpt)
