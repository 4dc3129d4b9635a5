"""execute(plan, out_dir): run exactly what the plan says, and report measured memory beside planned.

`execute` reads top-down as the steps of a run; each concept has its own module:

    rundir.py    the run directory: its layout, and the rules for starting or resuming a run in it
    inputs.py    the tokenizer and packed dataset of the spec, batches on the run's device
    session.py   the training session built from the plan: weights onto the device, adapters, NF4, optimizer
    step.py      one optimizer step over its micro-batches, gradient clipping, evaluation
    saving.py    checkpoints of a step, resuming from one, the final model
    oom.py       out of memory mid-run: undo the failed step, checkpoint, re-plan for less
    progress.py  the live progress line, planned versus measured memory
"""

import contextlib
import json
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import NamedTuple

import msgspec
import torch

from lowmem.data.loader import split_rows
from lowmem.plan import Plan, plan
from lowmem.spec.structs import RunSpec
from lowmem.spec.units import format_bytes
from lowmem.train import distributed
from lowmem.train.checkpoint import plan_fingerprint
from lowmem.train.device import check_local_device
from lowmem.train.inputs import prepare_data, steps_for_epochs
from lowmem.train.memory import ProcessPeak, resident_bytes
from lowmem.train.oom import (
    MAX_REPLANS,
    OutOfMemoryStop,
    StepOutOfMemory,
    StepStart,
    UpdateWatch,
    available_bytes,
    checkpoint_before_oom,
    describe_strategies,
    replan_after_oom,
)
from lowmem.train.progress import Progress, max_stats, memory_report
from lowmem.train.rundir import RunDir
from lowmem.train.saving import resume_step, save_final_model, save_step
from lowmem.train.session import Session, open_session
from lowmem.train.sinks import close_sinks, open_sinks
from lowmem.train.step import evaluate, train_step
from lowmem.train.strategies import load_libraries

__all__ = ["MEASURE_STEPS", "OutOfMemoryStop", "RunResult", "check_distributable", "check_executable", "execute"]

# Memory is measured over the first steps only: step 1 creates the optimizer state, step 2 is the
# steady state; every later step has the same shapes. The tracker slows a step, so it stops after these.
MEASURE_STEPS = 2


class RunResult(msgspec.Struct, frozen=True, kw_only=True):
    """What a finished run reports back to a caller."""

    out_dir: str
    steps: int  # tokens_per_s below is over the steps after the first MEASURE_STEPS (memory-tracked) ones
    first_loss: float
    final_loss: float
    eval_loss: float | None
    tokens_per_s: float
    planned_peak_bytes: int
    measured_peak_bytes: int
    model_dir: str | None
    interrupted: bool = False
    resumed_from_step: int = 0


def check_distributable(p: Plan, world: int) -> None:
    """Refuse a plan made for another number of processes than the `world` this run has.

    What FSDP can run is the planner's business (it knows the plan's `world_size`); the plan's memory is per
    process and its tokens per step count every process, so both hold only for the count it was made for.
    """
    if p.world_size == world:
        return
    launched = f"torchrun started {world} processes" if world > 1 else "this is a single process (no torchrun)"
    raise ValueError(
        f"the plan has world_size = {p.world_size} (made for {p.world_size} process(es)) but {launched}. Run it "
        + (f"under torchrun --nproc_per_node {p.world_size}" if p.world_size > 1 else "without torchrun")
        + f", or re-plan for {world}: lowmem plan SPEC --nproc {world} --json > plan.json (executing the spec "
        "itself plans it for the processes it runs on)"
    )


def execute(plan_or_spec: Plan | RunSpec, out_dir: str | Path | None = None, *, progress: bool = True,
            resume: bool = False, overwrite: bool = False, cap_memory_bytes: int | None = None) -> RunResult:
    """Run a plan (a RunSpec is planned for this machine first) and write the run directory.

    With `resume`, continue from the newest complete checkpoint in the run directory (same plan required);
    the resumed run's losses equal those of a run never stopped. SIGINT/SIGTERM finish the current step,
    write a checkpoint and return with `interrupted=True`. A directory holding another run is refused unless
    `overwrite` (which deletes that run once this one's data is ready); see `lowmem.train.rundir`. The run
    holds an exclusive lock on the directory while it runs.
    Under `torchrun --nproc_per_node N` every process calls this and they train data-parallel with FSDP2
    (gloo on CPU, NCCL and gloo on CUDA); `train.micro_batch` is then per process. See `_execute`.

    A step that runs out of device memory (`torch.OutOfMemoryError`) does not end the run while
    `memory.on_oom = "replan"` (the default): the step's tensors are freed, the last completed step is
    checkpointed, the spec is re-planned with the budget lowered to what was really available, and the run
    resumes under the new plan (`replan_after_oom`), which gives what a resume under that plan gives.
    `cap_memory_bytes` enforces a cap on live tensor bytes (any device): an op past it raises
    `torch.OutOfMemoryError` as a full GPU would, so that on-OOM re-planning can be rehearsed on a CPU.
    """
    if isinstance(plan_or_spec, Plan):
        p = plan_or_spec
    else:  # under torchrun: planned for the processes it has (memory per process, tokens over all)
        p = plan(plan_or_spec, world_size=distributed.launch_world_size())
    note = check_executable(p)
    if note and progress and distributed.launch_rank() == 0:
        sys.stderr.write(f"note: {note}\n")
    out = Path(out_dir if out_dir is not None else p.spec.out_dir)
    with distributed.process_group(p.hardware.device), RunDir(out, distributed.rank()) as run_dir:
        for replans in range(MAX_REPLANS + 1):
            try:
                return _execute(p, run_dir, progress=progress, resume=resume, overwrite=overwrite,
                                cap_memory_bytes=cap_memory_bytes)
            except StepOutOfMemory as oom:
                if p.spec.memory.on_oom == "stop" or distributed.world_size() > 1 or replans == MAX_REPLANS:
                    raise oom.as_error(p, replans) from None
                p = replan_after_oom(p, oom.available_bytes)
                resume, overwrite = True, False
                if progress and distributed.rank() == 0:
                    sys.stderr.write(f"\nout of memory in step {oom.step + 1} ({oom.message}); re-planned for "
                                     f"{format_bytes(p.budget_bytes)}: {describe_strategies(p)}; resuming from "
                                     f"step {oom.resume_step}\n")
    raise AssertionError("unreachable")


def _execute(p: Plan, run_dir: RunDir, *, progress: bool, resume: bool, overwrite: bool,
             cap_memory_bytes: int | None = None) -> RunResult:
    """`execute` once the process group (if any) is up: under torchrun every rank runs this.

    Data parallel over W ranks: `train.micro_batch` is per rank (torchtune's convention), so one optimizer
    step sees micro_batch x W x grad_accum rows and equals a single-process step with micro_batch x W.
    Rank 0 alone writes plan.json, metrics.jsonl, memory.json (its own measured memory) and the final model.
    """
    world, rank = distributed.world_size(), distributed.rank()
    check_distributable(p, world)
    load_libraries(p)
    process_peak = ProcessPeak()
    process_peak.start()  # the CPU plan's device_bytes: the RSS the run adds to the process, libraries loaded
    start = run_dir.start(p, world, resume, overwrite)
    distributed.barrier()  # every rank judged the directory before rank 0 changes it
    torch.manual_seed(p.spec.train.seed)
    tokenizer, dataset, train_rows, eval_rows = _prepare_inputs(p, world, rank)
    session = open_session(p, dataset, train_rows, world, rank, cap_memory_bytes)
    fingerprint = plan_fingerprint(p, world)
    first_step = resume_step(session, start.checkpoint, fingerprint) if start.checkpoint is not None else 0
    run_dir.accept(p, start)  # only now: a refused resume or bad data leaves the directory as it was
    skipped = _skipped_records(dataset.metadata)
    for line in ([start.note] if start.note else []) + ([skipped["note"]] if skipped else []):
        if rank == 0:  # said even with --quiet: it is about the user's files
            sys.stderr.write("".join(f"note: {part}\n" for part in line.splitlines()))
    total_steps = p.total_steps or steps_for_epochs(p.spec, len(train_rows), world)
    ran = _train(session, run_dir, fingerprint, first_step, total_steps, (dataset, eval_rows), skipped,
                 progress=progress, cap_memory_bytes=cap_memory_bytes)
    report = memory_report(p, ran.measured, ran.cuda_measured, process_peak.read())
    if rank == 0:
        run_dir.write_json("memory.json", report)
    model_dir = None
    if p.spec.output.save_final and not ran.interrupted:
        model_dir = save_final_model(session, tokenizer, run_dir.path, first_step + len(ran.losses), fingerprint)
    # the run's first loss, not this resume's (the resumed part's last; the logged last when it ran no step)
    first_loss, last_logged = run_dir.logged_losses() if first_step else (math.nan, math.nan)
    return RunResult(
        out_dir=str(run_dir.path), steps=first_step + len(ran.losses),
        first_loss=first_loss if first_step else ran.losses[0] if ran.losses else math.nan,
        final_loss=ran.losses[-1] if ran.losses else last_logged,
        eval_loss=ran.eval_loss, tokens_per_s=ran.tokens_per_s, planned_peak_bytes=p.memory.peak_bytes,
        measured_peak_bytes=report["measured_peak_bytes"], model_dir=str(model_dir) if model_dir else None,
        interrupted=ran.interrupted, resumed_from_step=first_step,
    )


def _prepare_inputs(p: Plan, world: int, rank: int):
    """The tokenizer, the packed dataset, and its training and held-out rows (rank 0 prepares, others read)."""
    if rank != 0:  # rank 0 trains the tokenizer and packs the data into the cache; the others then read it
        distributed.barrier()
    tokenizer, dataset = prepare_data(p.spec, world=world)
    if rank == 0:
        distributed.barrier()
    train_rows, eval_rows = split_rows(len(dataset), p.spec.data.eval_rows, p.spec.train.seed)
    return tokenizer, dataset, train_rows, eval_rows


class _Ran(NamedTuple):
    """What the training loop gives back to `_execute`."""

    losses: list[float]
    eval_loss: float | None
    tokens_per_s: float  # over the steps after the measured ones, when there were any
    measured: dict | None  # the live-tensor tracker's snapshot of the measured steps
    cuda_measured: dict | None  # the allocator's peaks over them, on a GPU
    interrupted: bool


class _Speed:
    """Tokens per second over the run, from the end of the (slower, memory-tracked) measured steps on."""

    def __init__(self, tokens_per_step: int, first_step: int):
        self.tokens_per_step, self.first_step = tokens_per_step, first_step
        self.start = time.perf_counter()
        self.tokens = 0
        self.steady_start, self.steady_tokens = None, 0

    def step_done(self, step: int) -> float:
        """Count one finished step; returns the seconds since the run started."""
        self.tokens += self.tokens_per_step
        if step - self.first_step + 1 == MEASURE_STEPS:
            self.steady_start, self.steady_tokens = time.perf_counter(), self.tokens
        return time.perf_counter() - self.start

    def tokens_per_s(self) -> float:
        end = time.perf_counter()
        if self.steady_start is not None and self.tokens > self.steady_tokens:
            return (self.tokens - self.steady_tokens) / (end - self.steady_start)
        return self.tokens / max(end - self.start, 1e-9)


def _train(s: Session, run_dir: RunDir, fingerprint: dict, first_step: int, total_steps: int, held_out, skipped,
           *, progress: bool, cap_memory_bytes: int | None) -> _Ran:
    """The loop: each step trained, measured (the first MEASURE_STEPS), logged, evaluated and checkpointed."""
    p, spec = s.plan, s.plan.spec
    metrics = run_dir.open_metrics(first_step) if s.rank == 0 else open(os.devnull, "w")
    try:
        sinks = open_sinks(spec, run_dir.path, first_step) if s.rank == 0 else []
    except BaseException:
        metrics.close()
        s.loader.close()
        raise
    printer = Progress(total_steps, enabled=progress and s.rank == 0)
    losses, measured, cuda_measured, eval_loss, interrupted = [], None, None, None, False
    updating = UpdateWatch(s.training.optimizer)
    say_skipped = skipped is not None and first_step == 0
    speed = _Speed(p.tokens_per_step, first_step)  # every process's tokens (check_distributable)
    # Under torchrun the launcher passes SIGINT/SIGTERM on to every rank (then waits 30 s before SIGKILL); the
    # ranks agree on stopping after each step (`stop.agreed`), so all of them write the same step's shards.
    with _StopOnSignal() as stop:
        try:
            for step in range(first_step, total_steps):
                measuring = step - first_step < MEASURE_STEPS
                stats = _guarded_step(s, run_dir, fingerprint, step, first_step, total_steps, updating,
                                      measuring=measuring, cap_memory_bytes=cap_memory_bytes)
                if measuring:
                    measured = s.tracker.snapshot()
                    cuda_measured = max_stats(cuda_measured, s.cuda_memory.read())
                losses.append(stats.loss)
                elapsed = speed.step_done(step)
                record = _record(step, stats, p.tokens_per_step, speed.tokens / elapsed, elapsed,
                                 measured if measuring else None, cuda_measured if measuring else None)
                if _evaluates(spec, step, total_steps, len(held_out[1]), s.world):
                    eval_loss = record["eval_loss"] = evaluate(s.training.loss_of, *held_out, spec,
                                                               device=p.hardware.device)
                if (step + 1) % spec.train.log_every == 0 or step + 1 == total_steps or "eval_loss" in record:
                    if say_skipped:  # the run's first record says what the data left out
                        record.update(data_skipped=skipped["n"], data_skipped_examples=skipped["examples"])
                        say_skipped = False
                    _log(record, metrics, sinks, printer, first_step)
                if stop.agreed():
                    save_step(s, run_dir.path, step + 1, fingerprint)
                    interrupted = True
                    break
                if spec.output.save_every and (step + 1) % spec.output.save_every == 0 and step + 1 < total_steps:
                    save_step(s, run_dir.path, step + 1, fingerprint)
        finally:
            s.loader.close()
            metrics.close()
            close_sinks(sinks)
            printer.close()
    return _Ran(losses, eval_loss, speed.tokens_per_s(), measured, cuda_measured, interrupted)


def _guarded_step(s: Session, run_dir: RunDir, fingerprint: dict, step: int, first_step: int, total_steps: int,
                  updating: UpdateWatch, *, measuring: bool, cap_memory_bytes: int | None):
    """`train_step`, tracked while measuring (or under a cap); out of memory becomes `StepOutOfMemory`."""
    p, device = s.plan, s.plan.hardware.device
    # an enforced cap needs the tracker in every step; only the first ones are reported
    tracking = measuring or cap_memory_bytes is not None
    before = StepStart.take(s.loader, device)
    updating.started = False
    oom = None
    if measuring:
        s.cuda_memory.start()
    try:
        with s.tracker if tracking else contextlib.nullcontext():
            return train_step(step, total_steps, p.spec, s.training.loss_of, s.loader, s.trainable,
                              s.training.optimizer, s.tracker if tracking else None, s.training.loss_scaler,
                              split=p.strategies.micro_batch_split)
    except torch.OutOfMemoryError as err:  # handled below, once the traceback's frames are gone
        oom = str(err).splitlines()[0] if str(err) else type(err).__name__
    resumable = checkpoint_before_oom(run_dir.path, step, first_step, before, updating.started,
                                      s.training.optimizer, s.loader,
                                      lambda at: save_step(s, run_dir.path, at, fingerprint), device)
    raise StepOutOfMemory(step, resumable, oom, available_bytes(s.cuda_memory, cap_memory_bytes))


def _record(step: int, stats, tokens_per_step: int, tokens_per_s: float, elapsed: float, measured: dict | None,
            cuda_measured: dict | None) -> dict:
    """The metrics.jsonl record of a finished step (memory fields on the measured steps)."""
    record = {"step": step + 1, "loss": stats.loss, "lr": stats.lr, "grad_norm": stats.grad_norm,
              "tokens": (step + 1) * tokens_per_step, "tokens_per_s": tokens_per_s,
              "elapsed_s": elapsed, "rss_bytes": resident_bytes()}
    if measured is not None:
        record["tensor_peak_bytes"] = measured["peak_bytes"]
        if cuda_measured is not None:
            record.update(cuda_measured)
    return record


def _evaluates(spec, step: int, total_steps: int, n_eval_rows: int, world: int) -> bool:
    """Whether held-out loss is measured after `step`: every `train.eval_every` steps and after the last."""
    return bool(spec.train.eval_every) and n_eval_rows >= spec.train.micro_batch * world and (
        (step + 1) % spec.train.eval_every == 0 or step + 1 == total_steps)


def _skipped_records(metadata: dict) -> dict | None:
    """How many malformed records `data.bad_rows = "skip"` left out, and where the first were (file:line)."""
    n = metadata.get("n_skipped", 0)
    if not n:
        return None
    examples = list(metadata.get("skipped_examples", []))
    note = f"data.bad_rows = \"skip\" skipped {n:,} malformed record(s)" + (
        ", e.g. " + "; ".join(examples[:3]) if examples else "")
    return {"n": n, "examples": examples, "note": note}


def _log(record: dict, metrics, sinks, printer: Progress, first_step: int) -> None:
    metrics.write(json.dumps(record) + "\n")
    metrics.flush()
    for sink in sinks:
        sink.write(record)
    printer.update(record, done_before=first_step)


class _StopOnSignal:
    """SIGINT/SIGTERM ask the loop to checkpoint after the current step and stop (main thread only)."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:  # a second signal: stop now
            raise KeyboardInterrupt
        self.requested = True

    def agreed(self) -> bool:
        """Whether any rank was asked to stop (every rank must call this after each step; one tiny all-reduce).

        A signal reaches the ranks at slightly different moments, or only one rank when it is sent to one
        process: each stops after the first step at whose end any rank had it, so all save the same step.
        """
        if distributed.world_size() == 1:
            return self.requested
        return distributed.all_reduce_sum([float(self.requested)])[0] > 0

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def check_executable(p: Plan) -> str | None:
    """Refuse, before anything runs, a plan this machine cannot execute; a line to show when it runs elsewhere.

    A CUDA plan needs a CUDA torch and a GPU with at least the memory the plan was made for
    (`lowmem.train.device.check_local_device`, which names both cards when they differ).
    """
    return check_local_device(p.hardware, p.budget_bytes)
