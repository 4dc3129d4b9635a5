"""Data-parallel training (FSDP2, gloo): two ranks under torchrun equal one process with twice the micro-batch,
for full fine-tuning and for LoRA/DoRA/QLoRA adapters; the plan's per-process memory matches what rank 0 measured;
their sharded checkpoints (DCP) resume on 2 processes to the same bits, and on 1 (or 1 -> 2) within rounding."""

import json
import shutil
import socket
import subprocess
import sys

import msgspec
import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from tests.conftest import TINY_SPEC

from lowmem.plan import Plan, plan
from lowmem.plan.estimate import estimate_memory
from lowmem.plan.planner import PlanError, trainable_shapes
from lowmem.spec import decode_spec, encode_spec
from lowmem.train import execute
from lowmem.train.checkpoint import CheckpointError
from lowmem.train.loop import check_distributable

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="needs torch.distributed with the gloo backend")

WORLD = 2
PER_RANK_BATCH = 2
# Same rows, same fp32 math; only the order of float sums differs (each rank's token sum, the gloo reductions).
REL_TOL = 1e-5
# Final weights, per optimizer. SGD passes rounding through linearly (measured: 1e-8 apart). AdamW's first
# updates are lr * g / (|g| + eps): for an element whose gradient is within rounding of zero, a last-bit change
# in g moves the update by up to lr (3e-3), so a handful of elements can differ by far more than the rest
# (measured: 3.7e-5 on 1 and 1.02e-5 on 1 of 222k elements, every other one within 1e-5).
WEIGHT_ATOL = {"sgd": 1e-5, "adamw": 1e-4}
# The SGD pair also runs activation checkpointing and the chunked loss (both sides): recomputing a block in
# backward must go through FSDP's gathered weights too.
OPTIMIZERS = {
    "adamw": ["optimizer.kind=adamw"],
    "sgd": ["optimizer.kind=sgd", "optimizer.lr=0.5", "memory.strategies.activation_checkpointing=on",
            "memory.strategies.chunked_cross_entropy=on"],
}


def _metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spec(data_cache, micro_batch: int, optimizer: str, *overrides: str):
    return decode_spec(TINY_SPEC, "toml", overrides=[
        f"data.cache_dir={data_cache}", "data.eval_rows=8", "train.steps=3", f"train.micro_batch={micro_batch}",
        "train.eval_every=3", "train.eval_batches=1", *OPTIMIZERS[optimizer], *overrides,
    ])


# A rank of a gloo run on this CPU sometimes dies with SIGABRT and nothing but "terminate called without an
# active exception" (a C++ std::terminate, no Python traceback), or with SIGSEGV, the other rank then failing in a
# collective: about one torchrun launch in 40 under load (2 of 6 full test runs on 2026-12-04; 0 in 45 QLoRA
# launches under two CPU hogs on 2026-12-07). Its one cause found in lowmem is fixed: the QLoRA save's NF4
# all-gathers were left unwaited in c10d's work registry until its static destructor ran at exit (see
# `test_no_collective_is_left_unwaited`). What remains is upstream: the gloo worker threads survive
# destroy_process_group and run on into interpreter teardown, where a native thread that drops the last
# reference to a tensor with a Python object takes the GIL and is ended by pthread_exit -> std::terminate
# (pytorch/pytorch#190489, #117762; the same race aborts the fake-CUDA child, whose core dump shows it, see
# lowmem.fakecuda). No rank core dump was caught, so the retry stays: a run with exactly that signature is
# retried once from scratch; any other failure, or a second abort, fails the test.
RANK_ABORT = "terminate called without an active exception"


def _torchrun(*args: str) -> str:
    for attempt in (1, 2):
        done = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD),
             "--master_port", str(_free_port()), "-m", "lowmem.cli", "execute", *args, "--quiet"],
            capture_output=True, text=True, timeout=300,
        )
        if done.returncode == 0 or attempt == 2 or RANK_ABORT not in done.stderr:
            break
        print(f"torchrun {' '.join(args)}: a rank aborted ({RANK_ABORT!r}); retrying once", file=sys.stderr)
        if "--resume" not in args:  # a fresh run starts over; a resumed one resumes again
            shutil.rmtree(args[args.index("--out") + 1], ignore_errors=True)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return done.stderr


def _with(p, **strategies):
    return msgspec.structs.replace(p, strategies=msgspec.structs.replace(p.strategies, **strategies))


def _single_and_sharded(root, make_spec, **strategies) -> tuple:
    """`make_spec(micro_batch)` run in one process with micro_batch 4 and under torchrun on 2 ranks x 2 rows:
    (sharded run dir, single-process run dir). Both take the same rows per step. `strategies` replace the
    plans' own choices (a plan is data: `lowmem execute plan.json` runs what it says)."""
    one = plan(make_spec(PER_RANK_BATCH * WORLD), "cpu")
    two = plan(make_spec(PER_RANK_BATCH), "cpu", world_size=WORLD)
    if one.strategies.nf4_block_size:  # QLoRA: quantize the one process's base as the 2 shards do (see below)
        strategies["nf4_scaler_block_size"] = two.strategies.nf4_scaler_block_size
    execute(_with(one, **strategies), root / "single", progress=False)
    plan_file = root / "plan.json"
    plan_file.write_bytes(msgspec.json.encode(_with(two, **strategies)))
    (root / "torchrun.stderr").write_text(_torchrun(str(plan_file), "--out", str(root / "sharded")))
    return root / "sharded", root / "single"


@pytest.fixture(scope="module", params=list(OPTIMIZERS))
def runs(request, data_cache, tmp_path_factory):
    """(optimizer, torchrun run dir: 2 ranks x micro_batch 2, single-process run dir: micro_batch 4)."""
    optimizer = request.param
    root = tmp_path_factory.mktemp(f"distributed-{optimizer}")
    return optimizer, *_single_and_sharded(root, lambda rows: _spec(data_cache, rows, optimizer))


def test_losses_and_grad_norms_equal_the_single_process_batch(runs):
    sharded, single = (_metrics(d) for d in runs[1:])
    assert [r["step"] for r in sharded] == [1, 2, 3]
    for key in ("loss", "grad_norm"):  # grad_norm catches a wrong gradient scale that AdamW would hide
        assert [r[key] for r in sharded] == pytest.approx([r[key] for r in single], rel=REL_TOL), key
    assert sharded[-1]["eval_loss"] == pytest.approx(single[-1]["eval_loss"], rel=REL_TOL)
    assert [r["tokens"] for r in sharded] == [r["tokens"] for r in single]  # tokens count every rank's


def test_final_weights_equal_the_single_process_run(runs):
    optimizer = runs[0]
    sharded, single = (load_file(d / "model" / "model.safetensors") for d in runs[1:])
    assert sharded.keys() == single.keys()
    for name in single:
        torch.testing.assert_close(sharded[name], single[name], rtol=0, atol=WEIGHT_ATOL[optimizer], msg=name)


def test_only_rank_0_writes_the_run_directory(runs):
    sharded = runs[1]
    # beside the run's files only the lock files: rank 0's on the directory, rank 1's of its own
    assert sorted(p.name for p in sharded.iterdir()) == [".lock", ".lock-rank-1", "memory.json", "metrics.jsonl",
                                                         "model", "plan.json"]
    assert len(_metrics(sharded)) == 3  # one record per step, not one per rank


# The planned per-process peak against rank 0's measured one (LiveTensorTracker; FSDP's gathered weights
# included). Measured: adamw (no checkpointing, standard loss) +0.4%, sgd (full checkpointing, chunked loss)
# and LoRA within a few percent; see the report of issue #7.
PEAK_TOLERANCE = 0.10


def test_planned_per_process_peak_matches_rank_0s_measured_peak(runs):
    sharded, single = runs[1:]
    plan_json = json.loads((sharded / "plan.json").read_text())
    report = json.loads((sharded / "memory.json").read_text())
    assert plan_json["world_size"] == WORLD
    assert report["measured_peak_bytes"] > 0
    assert abs(report["error"]) < PEAK_TOLERANCE, report
    # sharding shows: parameters and optimizer state are measured at half of one process's
    measured = {c["component"]: c["measured_bytes"] for c in report["components"]}
    alone = {c["component"]: c["measured_bytes"] for c in json.loads((single / "memory.json").read_text())["components"]}
    assert measured["parameters"] == pytest.approx(alone["parameters"] / WORLD, rel=0.01)


def test_fsdp_cpu_offload_policy_changes_no_number(data_cache, tmp_path):
    """A plan with fsdp_cpu_offload runs the executor's CPUOffloadPolicy path: the shards, their gradients and
    the AdamW step on "host" shards. On CPU processes the policy only copies within host memory (which is why
    the planner never chooses it there; its memory effect needs a GPU), so the losses and weights must equal
    one process's as without it."""
    sharded, single = _single_and_sharded(tmp_path, lambda rows: _spec(data_cache, rows, "adamw"),
                                          fsdp_cpu_offload=True)
    assert json.loads((sharded / "plan.json").read_text())["strategies"]["fsdp_cpu_offload"] is True
    assert _losses(sharded) == pytest.approx(_losses(single), rel=REL_TOL)
    got, want = (load_file(d / "model" / "model.safetensors") for d in (sharded, single))
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=WEIGHT_ATOL["adamw"], msg=name)


def test_every_2nd_block_checkpointed_under_fsdp(data_cache, tmp_path):
    """FSDP's seam tells the checkpointing which block runs (its gathered weights are not the params' tensors):
    block 0 is checkpointed, block 1 is not. Same losses as one process; the peak lies between the plan's
    off and full checkpointing ones (a seam checkpointing every block would sit at full)."""
    sharded, single = _single_and_sharded(tmp_path, lambda rows: _spec(data_cache, rows, "adamw"),
                                          # standard CE: the logits keep "off" the largest of the three
                                          activation_checkpointing="every-2", cross_entropy="standard")
    assert _losses(sharded) == pytest.approx(_losses(single), rel=REL_TOL)
    p = msgspec.json.decode((sharded / "plan.json").read_bytes(), type=Plan)
    shapes, trains = trainable_shapes(p.spec, p.model)
    planned = {value: estimate_memory(p.model, msgspec.structs.replace(p.strategies, activation_checkpointing=value),
                                      p.spec.train, p.spec.optimizer, shapes, trains, world_size=WORLD).peak_bytes
               for value in ("off", "every-2", "full")}
    measured = json.loads((sharded / "memory.json").read_text())["measured_peak_bytes"]
    # measured: 7.02 MB against 8.45 (off) and 5.59 (full) planned; every block checkpointed measured 5.59
    assert planned["full"] < planned["every-2"] < planned["off"], planned
    assert measured == pytest.approx(planned["every-2"], rel=PEAK_TOLERANCE), (planned, measured)


@pytest.mark.parametrize("override, message", [
    ("optimizer.kind=adafactor", "optimizer.kind = 'adafactor'"),
    ("memory.strategies.optimizer_in_backward=on", "optimizer_in_backward = 'on'"),
    ("memory.strategies.low_bit_optimizer=on", "low_bit_optimizer = 'on'"),
])
def test_planner_refuses_what_it_cannot_shard(tiny_spec, override, message):
    overrides = [override] + (["train.clip_grad_norm=0"] if "in_backward" in override else [])
    plan(tiny_spec(*overrides), "cpu")  # a single process runs it
    with pytest.raises(PlanError, match=message):
        plan(tiny_spec(*overrides), "cpu", world_size=WORLD)


def test_qlora_shards_need_whole_nf4_scaler_blocks(tiny_spec):
    """Each process holds an even part of every NF4 weight's rows and scaler blocks; the planner says when the
    model's shapes do not allow that, and counts NF4 bytes (not 16/32-bit ones) per process."""
    qlora = tiny_spec("method.kind=qlora")
    one, two = plan(qlora, "cpu"), plan(qlora, "cpu", world_size=WORLD)
    # the 172-row MLP weights hold 172 NF4 blocks of 64: scaler blocks of 4 on one process, of 2 on two
    assert (one.strategies.nf4_scaler_block_size, two.strategies.nf4_scaler_block_size) == (4, 2)
    with pytest.raises(PlanError, match="rows, not a multiple of 3.*method.kind = 'lora'"):
        plan(qlora, "cpu", world_size=3)
    lora = plan(tiny_spec("method.kind=lora"), "cpu", world_size=WORLD)
    params = {p.strategies.activation_checkpointing: p.memory.by_name()["parameters"] for p in (two, lora)}
    assert two.memory.by_name()["parameters"] < 0.8 * lora.memory.by_name()["parameters"], params


def test_planner_never_picks_what_fsdp_cannot_run(tiny_spec):
    # tight: 2 processes x (~6 MiB of tensors + the ~150 MiB each process's runtime and heap lines add)
    spec = tiny_spec("train.clip_grad_norm=0", "memory.budget=320MiB", "memory.safety_margin=0")
    p = plan(spec, "cpu", world_size=WORLD)
    assert all(not a.strategies.optimizer_in_backward and a.strategies.optimizer_state == "full"
               for a in p.alternatives)
    for strategy in ("optimizer_in_backward", "low_bit_optimizer"):  # each says why, not "not needed"
        decision = next(d for d in p.decisions if d.strategy == strategy)
        assert decision.source == "fixed" and "FSDP" in decision.reason, decision


def test_the_plan_counts_every_process(tiny_spec):
    one, two = plan(tiny_spec(), "cpu"), plan(tiny_spec(), "cpu", world_size=WORLD)
    assert (one.world_size, two.world_size) == (1, WORLD)
    assert two.tokens_per_step == WORLD * one.tokens_per_step
    assert two.memory.peak_bytes < one.memory.peak_bytes + one.n_params * 4  # shards plus gathered, not N copies
    assert two.usable_bytes == one.usable_bytes // WORLD  # the processes share this machine's memory


def test_a_plan_runs_only_on_the_process_count_it_was_made_for(tiny_spec):
    one, two = plan(tiny_spec(), "cpu"), plan(tiny_spec(), "cpu", world_size=WORLD)
    check_distributable(one, world=1)
    check_distributable(two, world=WORLD)
    with pytest.raises(ValueError, match=r"world_size = 1 .* torchrun started 2 processes.*--nproc 2"):
        check_distributable(one, world=WORLD)
    with pytest.raises(ValueError, match=r"world_size = 2 .* single process.*--nproc_per_node 2"):
        check_distributable(two, world=1)


def _checkpointing_spec(data_cache, micro_batch: int):
    return decode_spec(TINY_SPEC, "toml", overrides=[
        f"data.cache_dir={data_cache}", "data.eval_rows=8", "train.steps=6", f"train.micro_batch={micro_batch}",
        "output.save_every=2", "output.keep=5",
    ])


def _back_to_step_2(run_dir, into):
    """A copy of a finished run as if it had been killed after its step-2 checkpoint."""
    shutil.copytree(run_dir, into)
    shutil.rmtree(into / "checkpoints/step-00000004")
    shutil.rmtree(into / "model")
    return into


def _losses(run_dir) -> list[float]:
    return [r["loss"] for r in _metrics(run_dir)]


@pytest.fixture(scope="module")
def checkpointed(data_cache, tmp_path_factory):
    """(root, a 2-process run of 6 steps (micro_batch 2 per rank) checkpointing every 2 steps, its spec file)."""
    root = tmp_path_factory.mktemp("distributed-checkpoints")
    spec_file = root / "spec2.toml"
    spec_file.write_bytes(encode_spec(_checkpointing_spec(data_cache, PER_RANK_BATCH), "toml"))
    _torchrun(str(spec_file), "--out", str(root / "sharded"))
    return root, root / "sharded", spec_file


def test_sharded_checkpoints_are_per_rank_safetensors(checkpointed):
    _, run_dir, _ = checkpointed
    ckpt = run_dir / "checkpoints/step-00000004"
    assert sorted(p.name for p in ckpt.iterdir()) == [
        "shard-00001-model-00001-of-00001.safetensors", "shard-00002-model-00001-of-00001.safetensors",
        "trainer.json"]  # no pickled DCP .metadata: each shard's offsets are in its safetensors header
    trainer = json.loads((ckpt / "trainer.json").read_text())
    assert trainer["sharded"] is True and trainer["world_size"] == WORLD and trainer["step"] == 4
    assert trainer["loader"]["rows_per_batch"] == PER_RANK_BATCH * WORLD
    shards = [load_file(ckpt / f"shard-0000{r}-model-00001-of-00001.safetensors") for r in (1, 2)]
    full = load_file(run_dir / "model/model.safetensors")  # HF names; the first block's query weight is shared
    rows = full["model.layers.0.self_attn.q_proj.weight"].shape[0]
    assert sum(s["layers.0.attn.wq"].shape[0] for s in shards) == rows  # each rank wrote its half only
    assert not [d for d in (run_dir / "checkpoints").iterdir() if d.name.startswith(".tmp-")]


def test_resume_on_2_processes_equals_the_uninterrupted_run(checkpointed):
    root, run_dir, spec_file = checkpointed
    resumed = _back_to_step_2(run_dir, root / "resumed-2")
    _torchrun(str(spec_file), "--out", str(resumed), "--resume")
    assert _losses(resumed) == _losses(run_dir)  # bitwise: same ranks, same sums
    for name, t in load_file(run_dir / "model/model.safetensors").items():
        assert torch.equal(load_file(resumed / "model/model.safetensors")[name], t), name


def test_resume_2_to_1_process_reshards(checkpointed, data_cache):
    """One process with micro_batch 2 x 2 takes the same rows per step: losses and weights within rounding."""
    root, run_dir, _ = checkpointed
    resumed = _back_to_step_2(run_dir, root / "resumed-1")
    result = execute(plan(_checkpointing_spec(data_cache, PER_RANK_BATCH * WORLD), "cpu"), resumed, progress=False,
                     resume=True)
    assert result.resumed_from_step == 2
    assert _losses(resumed) == pytest.approx(_losses(run_dir), rel=REL_TOL)
    sharded, single = (load_file(d / "model/model.safetensors") for d in (run_dir, resumed))
    for name in single:
        torch.testing.assert_close(single[name], sharded[name], rtol=0, atol=WEIGHT_ATOL["adamw"], msg=name)


def test_resume_1_to_2_processes_reshards(checkpointed, data_cache):
    root, run_dir, spec_file = checkpointed
    single = root / "single"
    execute(plan(_checkpointing_spec(data_cache, PER_RANK_BATCH * WORLD), "cpu"), single, progress=False)
    resumed = _back_to_step_2(single, root / "single-resumed-2")
    _torchrun(str(spec_file), "--out", str(resumed), "--resume")
    assert _losses(resumed)[:2] == _losses(single)[:2]  # kept from before the checkpoint
    assert _losses(resumed) == pytest.approx(_losses(single), rel=REL_TOL)
    assert _losses(resumed) == pytest.approx(_losses(run_dir), rel=REL_TOL)


def test_resume_with_other_rows_per_step_is_refused(checkpointed, data_cache):
    """The loader's position counts batches of micro_batch x processes rows: that product must be kept."""
    root, run_dir, _ = checkpointed
    resumed = _back_to_step_2(run_dir, root / "resumed-wrong")
    with pytest.raises(CheckpointError, match=r"train\.micro_batch = 4 on 1 process"):
        execute(plan(_checkpointing_spec(data_cache, PER_RANK_BATCH), "cpu"), resumed, progress=False, resume=True)


@pytest.mark.slow
def test_sigkill_of_a_2_process_run_then_resume_gives_the_same_losses(checkpointed):
    """torchrun and both ranks killed (SIGKILL) after a checkpoint; `--resume` on 2 processes finishes the run."""
    import os
    import signal
    import time

    from lowmem.train.checkpoint import latest_checkpoint

    root, run_dir, spec_file = checkpointed
    killed = root / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD), "--master_port",
         str(_free_port()), "-m", "lowmem.cli", "execute", str(spec_file), "--out", str(killed), "--quiet"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    deadline = time.monotonic() + 240
    while latest_checkpoint(killed) is None:
        assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and its workers: nothing gets to clean up
    proc.wait()
    assert not (killed / "model").exists(), "the run finished before it was killed"
    _torchrun(str(spec_file), "--out", str(killed), "--resume")
    assert _losses(killed) == _losses(run_dir)
    assert not [d for d in (killed / "checkpoints").iterdir() if d.name.startswith(".tmp-")]


@pytest.mark.slow
def test_sigterm_to_torchrun_checkpoints_every_rank_at_the_same_step(checkpointed, data_cache):
    """torchrun passes SIGTERM on to both ranks; they agree on a step, each writes its shard, and both exit
    before the launcher's 30 s grace ends; `--resume` then finishes the run from there."""
    import os
    import signal
    import time

    from lowmem.train.checkpoint import latest_checkpoint

    root = checkpointed[0]
    spec_file = root / "spec-long.toml"
    spec = _checkpointing_spec(data_cache, PER_RANK_BATCH)
    spec_file.write_bytes(encode_spec(decode_spec(encode_spec(spec, "toml"), "toml", overrides=[
        "train.steps=40", "output.save_every=2", "output.keep=1"]), "toml"))
    stopped = root / "sigterm"
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD), "--master_port",
         str(_free_port()), "-m", "lowmem.cli", "execute", str(spec_file), "--out", str(stopped), "--quiet"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.monotonic() + 240
    while latest_checkpoint(stopped) is None:
        assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGTERM)  # the launcher only: it forwards the signal to the ranks
    out, err = proc.communicate(timeout=120)
    assert not (stopped / "model").exists(), "the run finished before the signal"
    ckpt = latest_checkpoint(stopped)
    step = int(ckpt.name.split("-")[1])
    assert 2 <= step < 40
    assert sorted(p.name for p in ckpt.iterdir()) == [
        "shard-00001-model-00001-of-00001.safetensors", "shard-00002-model-00001-of-00001.safetensors",
        "trainer.json"]
    assert json.loads((ckpt / "trainer.json").read_text())["step"] == step
    assert _metrics(stopped)[-1]["step"] == step  # the ranks stopped right after the step they saved
    before = _losses(stopped)
    _torchrun(str(spec_file), "--out", str(stopped), "--resume")
    assert [r["step"] for r in _metrics(stopped)] == list(range(1, 41))
    assert _losses(stopped)[:step] == before[:step]
    assert (stopped / "model/model.safetensors").exists()


# QLoRA: FSDP2 splits each NF4 weight (codes, scales, scale factors) by rows. On 2 processes every shard must
# hold whole scaler blocks, so the tiny model's scaler block shrinks from 4 to 2 (`nf4_scaler_block_size`);
# the single-process run is given the same, so both train against the same dequantized base.
ADAPTERS = {"lora": ["method.kind=lora", "method.targets=[wq,wv,wo,w1]"],
            "dora": ["method.kind=dora", "method.targets=[wq,wk,w2]", "method.alpha=8"],
            "qlora": ["method.kind=qlora", "method.targets=[wq,wv,wo,w1]"]}


def _adapter_spec(data_cache, micro_batch: int, method: str):
    # SGD: rounding passes through linearly, so the adapters can be held to 1e-5 (AdamW moves an element whose
    # gradient is within rounding of zero by up to lr; see WEIGHT_ATOL). AdamW on DTensors is covered by `runs`.
    return decode_spec(TINY_SPEC, "toml", overrides=[
        f"data.cache_dir={data_cache}", "data.eval_rows=8", "train.steps=3", f"train.micro_batch={micro_batch}",
        "output.save_every=2", "optimizer.kind=sgd", "optimizer.lr=0.5", *ADAPTERS[method],
    ])


@pytest.fixture(scope="module", params=list(ADAPTERS))
def adapter_runs(request, data_cache, tmp_path_factory):
    """(method, torchrun run dir: 2 ranks x micro_batch 2, single-process run dir: micro_batch 4)."""
    method = request.param
    root = tmp_path_factory.mktemp(f"distributed-{method}")
    return method, *_single_and_sharded(root, lambda rows: _adapter_spec(data_cache, rows, method))


def test_adapter_losses_equal_the_single_process_batch(adapter_runs):
    sharded, single = (_metrics(d) for d in adapter_runs[1:])
    for key in ("loss", "grad_norm"):
        assert [r[key] for r in sharded] == pytest.approx([r[key] for r in single], rel=REL_TOL), key


def test_exported_adapter_equals_the_single_process_one(adapter_runs):
    sharded, single = adapter_runs[1:]
    assert json.loads((sharded / "adapter/adapter_config.json").read_text())["use_dora"] == (adapter_runs[0] == "dora")
    got, want = (load_file(d / "adapter/adapter_model.safetensors") for d in (sharded, single))
    assert got.keys() == want.keys()
    assert any(t.abs().sum() > 0 for n, t in got.items() if "lora_B" in n)  # B starts at zero: it trained
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=WEIGHT_ATOL["sgd"], msg=name)
    base_got, base_want = (load_file(d / "base/model.safetensors") for d in (sharded, single))
    for name in base_want:  # the frozen base did not move on any rank
        assert torch.equal(base_got[name], base_want[name]), name


def test_adapter_checkpoints_hold_only_the_trainable_shards(adapter_runs):
    sharded = adapter_runs[1]
    ckpt = sharded / "checkpoints/step-00000002"
    shards = [load_file(ckpt / f"shard-0000{r}-model-00001-of-00001.safetensors") for r in (1, 2)]
    for names in (s.keys() for s in shards):  # the adapters and their optimizer state ("state.{name}.exp_avg")
        tensors = {n.removeprefix("state.").rsplit(".", 1)[0] if n.startswith("state.") else n for n in names}
        assert tensors and all(n.endswith((".lora_a", ".lora_b", ".dora_m")) for n in tensors), sorted(tensors)


def test_no_collective_is_left_unwaited(adapter_runs):
    """c10d warns at exit of each collective still in its work registry. QLoRA's save gathers the NF4 base
    (`DTensor.full_tensor()`), whose result is an NF4Tensor of unwaited AsyncCollectiveTensors: 42 works (14 NF4
    weights x 3 inner tensors) were left to the registry's static destructor, after the interpreter had gone."""
    stderr = (adapter_runs[1].parent / "torchrun.stderr").read_text()
    assert "unwaited collective calls" not in stderr, stderr[-2000:]


def test_adapter_per_process_peak_matches_the_plan(adapter_runs):
    report = json.loads((adapter_runs[1] / "memory.json").read_text())
    assert abs(report["error"]) < PEAK_TOLERANCE, report


def test_mixed_bf16_under_fsdp_matches_one_process(data_cache, tmp_path):
    """fp32 masters sharded, each block's gathered weights cast to bf16 inside it: the same step as one process up
    to bf16 rounding of the per-rank partial sums (measured: losses 1e-5 apart, grad norms 7e-4)."""
    runs = _single_and_sharded(tmp_path, lambda rows: _spec(data_cache, rows, "adamw", "memory.precision=mixed-bf16"))
    sharded, single = (_metrics(d) for d in runs)
    assert [r["loss"] for r in sharded] == pytest.approx([r["loss"] for r in single], rel=1e-4)
    assert [r["grad_norm"] for r in sharded] == pytest.approx([r["grad_norm"] for r in single], rel=2e-3)
    report = json.loads((tmp_path / "sharded/memory.json").read_text())
    assert abs(report["error"]) < PEAK_TOLERANCE, report
