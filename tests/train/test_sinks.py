"""output.log_to: TensorBoard and W&B get every logged step; memory over time is in metrics.jsonl."""

import json
import sys

import pytest

from lowmem.plan import plan
from lowmem.train import execute


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _tensorboard_scalars(run_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def test_metrics_carry_memory_over_time(tiny_spec, tmp_path):
    execute(plan(tiny_spec("train.steps=3"), "cpu"), tmp_path, progress=False)
    records = _records(tmp_path)
    assert all(r["rss_bytes"] > 50 * 2**20 for r in records)  # torch alone is more than this
    # the tracked tensor peak is logged for the measured steps (the first two) and equals memory.json's
    measured = [r["tensor_peak_bytes"] for r in records if "tensor_peak_bytes" in r]
    assert len(measured) == 2
    assert max(measured) == json.loads((tmp_path / "memory.json").read_text())["measured_peak_bytes"]


def test_tensorboard_gets_every_step_once_even_after_resume(tiny_spec, tmp_path):
    pytest.importorskip("tensorboard")
    spec = tiny_spec("train.steps=4", "output.save_every=2", "output.keep=3", "output.log_to=[\"tensorboard\"]")
    execute(plan(spec, "cpu"), tmp_path, progress=False)
    # resume from step 2: steps 3 and 4 run again and must replace, not duplicate, their events
    execute(plan(spec, "cpu"), tmp_path, progress=False, resume=True)
    losses = _tensorboard_scalars(tmp_path, "train/loss")
    assert [step for step, _ in losses] == [1, 2, 3, 4]
    assert [v for _, v in losses] == pytest.approx([r["loss"] for r in _records(tmp_path)], rel=1e-6)
    assert [s for s, _ in _tensorboard_scalars(tmp_path, "train/rss_bytes")] == [1, 2, 3, 4]


def test_wandb_offline_run_gets_the_metrics_and_resumes_the_same_run(tiny_spec, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")  # no network here; offline is wandb's own, real code path
    monkeypatch.setenv("WANDB_SILENT", "true")
    spec = tiny_spec("train.steps=2", "output.save_every=1", "output.log_to=[\"wandb\"]")
    execute(plan(spec, "cpu"), tmp_path, progress=False)
    run_id = (tmp_path / "wandb_run_id").read_text()
    run_files = list((tmp_path / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert len(run_files) == 1
    # wandb 0.2x+ has no Python reader for its record log; the logged values are stored as JSON text in it
    logged = run_files[0].read_bytes()
    for record in _records(tmp_path):
        assert json.dumps(record["loss"]).encode() in logged
    execute(plan(spec, "cpu"), tmp_path, progress=False, resume=True)
    assert (tmp_path / "wandb_run_id").read_text() == run_id


def test_a_sink_whose_package_is_missing_stops_before_training(tiny_spec, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` raise ImportError
    spec = tiny_spec("train.steps=2", "output.log_to=[\"wandb\"]")
    with pytest.raises(ValueError, match=r"pip install 'lowmem\[wandb\]'"):
        execute(plan(spec, "cpu"), tmp_path, progress=False)
    assert not (tmp_path / "metrics.jsonl").read_text()  # no step ran
