"""The run directory survives kills, full disks, concurrent starts and bad files (issue #15).

Each test reproduces one defect found by hand with the tiny preset, and fails on the code before its fix.
"""

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time

import pytest

from lowmem.plan import plan
from lowmem.spec import encode_spec
from lowmem.train import checkpoint as checkpoint_module
from lowmem.train import execute
from lowmem.train import saving as saving_module
from lowmem.train.checkpoint import CheckpointError, latest_checkpoint
from lowmem.train.rundir import RunDir, RunDirError, read_metrics
from lowmem.train.saving import FinalSaveError


def _cli(*args, timeout=300, **kwargs):
    return subprocess.run([sys.executable, "-m", "lowmem.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, **kwargs)


def _one_clean_line(done) -> str:
    """A user error as the CLI shows it: exit code 2, no traceback; returns the message."""
    assert done.returncode == 2, (done.returncode, done.stderr[-3000:])
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    return done.stderr


# ---------------------------------------------------------------------------------------------- 1. rotation


def test_a_kill_while_rotation_deletes_never_leaves_a_partial_checkpoint(tiny_spec, tmp_path, monkeypatch):
    """A deletion cut short (here: after its first file, as a SIGKILL would) must not leave a `step-N/` that
    lacks files; before the fix `_rotate` deleted in place and left `step-M/` holding only some of them."""
    spec = tiny_spec("train.steps=5", "output.save_every=1", "output.keep=5")
    execute(plan(spec, "cpu"), tmp_path, progress=False)  # steps 1 to 4

    def killed_midway(path, *args, **kwargs):
        os.unlink(sorted(f.path for f in os.scandir(path) if f.is_file())[0])
        raise KeyboardInterrupt("killed while deleting")

    monkeypatch.setattr(checkpoint_module.shutil, "rmtree", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        checkpoint_module._rotate(tmp_path, keep=2, pid=os.getpid())
    monkeypatch.undo()
    visible = [d for d in (tmp_path / "checkpoints").iterdir() if not d.name.startswith(".")]
    assert visible
    for d in visible:
        assert {f.name for f in d.iterdir()} == {"model.safetensors", "optimizer.safetensors", "trainer.json"}, d
    checkpoint_module._rotate(tmp_path, keep=2, pid=os.getpid() + 1)  # the next rotation clears the trash
    assert sorted(d.name for d in (tmp_path / "checkpoints").iterdir()) == ["step-00000003", "step-00000004"]


# ------------------------------------------------------------------------------------------ 2. final model


def test_the_final_model_appears_with_its_tokenizer_in_one_rename(tiny_spec, tmp_path, monkeypatch):
    """A kill while the tokenizer files are copied must not leave a finished-looking `model/` without them."""

    execute(plan(tiny_spec("train.steps=1"), "cpu"), tmp_path / "warm", progress=False)  # tokenizer cached

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed while copying the tokenizer")

    tmp_path = tmp_path / "run"
    monkeypatch.setattr(saving_module.shutil, "copyfile", killed)
    with pytest.raises(KeyboardInterrupt):
        execute(plan(tiny_spec("train.steps=1"), "cpu"), tmp_path, progress=False)
    assert not (tmp_path / "model").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp")] == []  # the staging is gone


def test_export_writes_weights_and_tokenizer_together(tiny_spec, tmp_path):
    execute(plan(tiny_spec("train.steps=1"), "cpu"), tmp_path / "run", progress=False)
    done = _cli("export", tmp_path / "run", "--out", tmp_path / "hf")
    assert done.returncode == 0, done.stderr
    names = {p.name for p in (tmp_path / "hf").iterdir()}
    assert {"config.json", "model.safetensors"} <= names and any("tokenizer" in n for n in names), names
    assert "exists" in _one_clean_line(_cli("export", tmp_path / "run", "--out", tmp_path / "hf"))


# --------------------------------------------------------------------------------- 3. plan.json once accepted


def test_a_refused_resume_leaves_plan_json_as_it_was(tiny_spec, tmp_path):
    spec = tiny_spec("train.steps=3", "output.save_every=1")
    execute(plan(spec, "cpu"), tmp_path, progress=False)
    before = (tmp_path / "plan.json").read_bytes()
    with pytest.raises(CheckpointError, match=r"optimizer\.lr: 0\.003 -> 0\.01"):
        execute(plan(tiny_spec("train.steps=3", "output.save_every=1", "optimizer.lr=1e-2"), "cpu"), tmp_path,
                progress=False, resume=True)
    assert (tmp_path / "plan.json").read_bytes() == before
    assert execute(plan(spec, "cpu"), tmp_path, progress=False, resume=True).resumed_from_step == 2


def test_bad_data_leaves_no_run_directory(tiny_spec, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": broken\n')
    out = tmp_path / "run"
    with pytest.raises(ValueError):
        execute(plan(tiny_spec("train.steps=1", f"data.source={bad}", "data.format=text"), "cpu"), out,
                progress=False)
    assert not out.exists()


# --------------------------------------------------------------------------------- 4. a finished run's directory


def test_a_directory_holding_another_run_is_refused_unless_overwrite(tiny_spec, tmp_path):
    execute(plan(tiny_spec("train.steps=1"), "cpu"), tmp_path, progress=False)  # full: model/
    lora = tiny_spec("train.steps=1", "method.kind=lora", "method.rank=4")
    spec_file = tmp_path.parent / f"{tmp_path.name}-lora.toml"
    spec_file.write_bytes(encode_spec(lora))
    message = _one_clean_line(_cli("execute", spec_file, "--out", tmp_path, "--quiet"))
    assert "holds another run (plan.json, memory.json, metrics.jsonl, model" in message and "--overwrite" in message
    assert message.count("\n") == 1, message
    with pytest.raises(RunDirError, match="holds another run"):
        execute(plan(lora, "cpu"), tmp_path, progress=False)
    assert not (tmp_path / "adapter").exists()
    execute(plan(lora, "cpu"), tmp_path, progress=False, overwrite=True)
    assert (tmp_path / "adapter").is_dir() and not (tmp_path / "model").exists()


def test_a_rerun_of_the_same_plan_says_what_it_replaces(tiny_spec, tmp_path, capfd):
    spec = tiny_spec("train.steps=1")
    execute(plan(spec, "cpu"), tmp_path, progress=False)
    execute(plan(spec, "cpu"), tmp_path, progress=False)
    assert "replacing the earlier run of this plan" in capfd.readouterr().err
    assert len(read_metrics(tmp_path / "metrics.jsonl")) == 1


# --------------------------------------------------------------------------------------------------- 5. lock


def test_a_second_execute_into_a_running_directory_is_refused(tiny_spec, tmp_path):
    spec_file = tmp_path / "spec.toml"
    spec_file.write_bytes(encode_spec(tiny_spec("train.steps=400")))
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "lowmem.cli", "execute", str(spec_file), "--out", str(out),
                              "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / "metrics.jsonl").exists():  # the first run holds the lock and is training
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()
            time.sleep(0.1)
        message = _one_clean_line(_cli("execute", spec_file, "--out", out, "--quiet"))
        assert f"{out} is in use by another `lowmem execute` (pid {first.pid}" in message, message
    finally:
        first.kill()
        first.wait()
    with RunDir(out):  # the lock went with the killed process
        pass


def test_metrics_readers_skip_a_torn_last_line_and_name_a_bad_one(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    assert [r["step"] for r in read_metrics(path)] == [1, 2]
    path.write_text('{"step": 1, "loss": 2.0}\n\x00\x00{"step"\n{"step": 3, "loss": 1.5}\n')
    with pytest.raises(ValueError, match=rf"{path}:2: not a metrics record"):
        read_metrics(path)


def test_report_names_the_bad_metrics_line(tiny_spec, tmp_path):
    execute(plan(tiny_spec("train.steps=2"), "cpu"), tmp_path, progress=False)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    (tmp_path / "metrics.jsonl").write_text(lines[0] + "}{\n" + "\n".join(lines[1:]) + "\n")
    assert "metrics.jsonl:1: not a metrics record" in _one_clean_line(_cli("report", tmp_path))


# ------------------------------------------------------------------------------------ 6. full disk, final save


def _limit_file_size(n_bytes):
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (n_bytes, n_bytes))


def test_a_full_disk_in_the_final_save_is_one_line_naming_what_is_lost(tiny_spec, tmp_path):
    """save_every = 0 and every file past a size limit fails: no traceback, no partial model, one line."""
    spec_file = tmp_path / "spec.toml"
    spec_file.write_bytes(encode_spec(tiny_spec("train.steps=2")))
    message = _one_clean_line(_cli("execute", spec_file, "--out", tmp_path / "run", "--quiet",
                                   preexec_fn=_limit_file_size(200_000)))
    assert "could not write the final model" in message and "File too large" in message, message
    assert "training of this run is lost" in message and "metrics.jsonl" in message, message
    assert not (tmp_path / "run" / "model").exists()


def test_a_failed_final_save_keeps_an_emergency_checkpoint_and_resume_finishes(tiny_spec, tmp_path, monkeypatch):
    spec = tiny_spec("train.steps=3")
    real = saving_module.save_hf

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(saving_module, "save_hf", disk_full)
    with pytest.raises(FinalSaveError, match="emergency checkpoint step-00000003") as err:
        execute(plan(spec, "cpu"), tmp_path, progress=False)
    assert "--resume" in str(err.value) and "No space left" in str(err.value)
    monkeypatch.setattr(saving_module, "save_hf", real)
    result = execute(plan(spec, "cpu"), tmp_path, progress=False, resume=True)
    assert (tmp_path / "model" / "model.safetensors").is_file() and result.steps == 3
    reference = execute(plan(spec, "cpu"), tmp_path / "ref", progress=False)
    assert result.first_loss == reference.first_loss and result.final_loss == reference.final_loss


# ------------------------------------------------------------------------------------------------ 8. digests


def test_flipped_bytes_in_a_checkpoint_fall_back_to_the_previous_one(tiny_spec, tmp_path, capfd):
    spec = tiny_spec("train.steps=5", "output.save_every=1", "output.keep=3")
    execute(plan(spec, "cpu"), tmp_path, progress=False)
    newest = latest_checkpoint(tmp_path)
    target = newest / "model.safetensors"
    data = bytearray(target.read_bytes())
    data[-4096:] = bytes(b ^ 0xFF for b in data[-4096:])  # 4 KiB of tensor data, the header intact
    target.write_bytes(bytes(data))
    result = execute(plan(spec, "cpu"), tmp_path, progress=False, resume=True)
    err = capfd.readouterr().err
    assert f"{target}: its sha256 differs" in err and "resuming from step-00000003" in err, err
    assert result.resumed_from_step == 3
    assert (tmp_path / "checkpoints" / f"damaged-{newest.name}").is_dir()
    reference = execute(plan(spec, "cpu"), tmp_path / "ref", progress=False)
    assert result.final_loss == reference.final_loss


def test_digests_are_recorded_for_every_checkpoint_file(tiny_spec, tmp_path):
    execute(plan(tiny_spec("train.steps=2", "output.save_every=1"), "cpu"), tmp_path, progress=False)
    trainer = json.loads((latest_checkpoint(tmp_path) / "trainer.json").read_text())
    assert set(trainer["digests"]) == {"model.safetensors", "optimizer.safetensors"}


# ------------------------------------------------------------------------------------------------ 10. messages


def test_a_bad_set_value_names_set_in_one_line(tiny_spec, tmp_path):
    spec_file = tmp_path / "spec.toml"
    spec_file.write_bytes(encode_spec(tiny_spec()))
    message = _one_clean_line(_cli("validate", spec_file, "--set", "train.steps=abc"))
    assert message.startswith("error: --set train.steps=abc: invalid value at `$.train.steps`: 'abc'"), message
    assert message.count("\n") == 1, message


def test_a_second_interrupt_names_the_newest_checkpoint(tiny_spec, tmp_path):
    spec_file = tmp_path / "spec.toml"
    spec_file.write_bytes(encode_spec(tiny_spec("train.steps=100000", "output.save_every=2", "output.keep=1")))
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "lowmem.cli", "execute", str(spec_file), "--out", str(out),
                             "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while latest_checkpoint(out) is None:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    # two different signals are both delivered (two SIGINTs could merge into one): the second stops at once
    os.kill(proc.pid, signal.SIGINT)
    os.kill(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err and "stopped at once by a second interrupt" in err, err[-2000:]
    assert f"the newest checkpoint is {latest_checkpoint(out)}" in err, err[-2000:]


# ------------------------------------------------------------------------------------------------ lowmem runs


def test_runs_lists_each_runs_state(tiny_spec, tmp_path):
    spec = tiny_spec("train.steps=3", "output.save_every=1")
    execute(plan(spec, "cpu"), tmp_path / "done", progress=False)
    execute(plan(spec, "cpu"), tmp_path / "stopped", progress=False)
    shutil.rmtree(tmp_path / "stopped" / "model")  # as if stopped after its step-2 checkpoint
    with RunDir(tmp_path / "done"):  # a process holding the lock: running
        running = _cli("runs", tmp_path)
    assert running.returncode == 0, running.stderr
    done = _cli("runs", tmp_path)
    lines = {line.split()[0]: line for line in done.stdout.splitlines()[1:]}
    assert "finished" in lines[str(tmp_path / "done")] and "step-00000002" in lines[str(tmp_path / "done")]
    assert "stopped at step 2" in lines[str(tmp_path / "stopped")]
    assert "running" in running.stdout.splitlines()[1]
    assert "no such directory" in _one_clean_line(_cli("runs", tmp_path / "nowhere"))


# --------------------------------------------------------------------------------------------- 9. bad rows


def test_skipped_rows_are_said_in_the_output_and_the_metrics(tiny_spec, tmp_path):
    source = tmp_path / "data.jsonl"
    good = [json.dumps({"text": f"In the beginning line {i} was written, and it was good. " * 8}) for i in range(300)]
    source.write_text("\n".join(good[:5] + ['{"text": broken', '{"other": 1}'] + good[5:]) + "\n")
    spec_file = tmp_path / "spec.toml"
    spec_file.write_bytes(encode_spec(tiny_spec("train.steps=1", f"data.source={source}", "data.bad_rows=skip",
                                                "data.eval_rows=0", "data.tokenizer.vocab_size=340")))
    done = _cli("execute", spec_file, "--out", tmp_path / "run", "--quiet")
    assert done.returncode == 0, done.stderr[-3000:]
    assert 'data.bad_rows = "skip" skipped 2 malformed record(s)' in done.stderr and f"{source}:6" in done.stderr
    first = read_metrics(tmp_path / "run" / "metrics.jsonl")[0]
    assert first["data_skipped"] == 2 and any(f"{source}:7" in e for e in first["data_skipped_examples"])


def test_an_adapter_names_the_run_s_own_base_relative_to_the_run(tiny_spec, tmp_path):
    from lowmem.nn.generate import _adapter_base, find_model_files

    lora = tiny_spec("train.steps=1", "method.kind=lora", "method.rank=4")
    execute(plan(lora, "cpu"), tmp_path / "run", progress=False)
    config = json.loads((tmp_path / "run/adapter/adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "base"
    # the run moved elsewhere still finds its base, through the adapter's config too
    shutil.move(tmp_path / "run", tmp_path / "moved")
    assert _adapter_base(tmp_path / "moved/adapter") == tmp_path / "moved/base"
    assert find_model_files(tmp_path / "moved").model_dir == tmp_path / "moved/base"
