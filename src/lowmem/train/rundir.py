"""The run directory: its layout, its lock, and the rules for starting a run in it or resuming one.

A run directory holds::

    plan.json        the plan that ran (`lowmem execute plan.json` runs it again)
    metrics.jsonl    one JSON record per logged step and per evaluation (incl. resident memory over time)
    tensorboard/     TensorBoard event files, when `output.log_to` includes it (W&B: `wandb/`)
    memory.json      planned versus measured peak memory, by component
    model/           final weights in Hugging Face format (config.json, model.safetensors, the tokenizer files)
    adapter/, base/  instead of model/ for LoRA, QLoRA and DoRA: the PEFT adapter and, for a preset, its base
    checkpoints/     step-NNNNNNNN/ resumable checkpoints (see lowmem.train.checkpoint), newest `output.keep`
    .lock            held (flock) by the process running in it; `.lock-rank-R` by rank R under torchrun

What may be there decides what a start may do (`RunDir.start`): a new run goes into an empty directory, or
replaces a run of the same plan that left no checkpoint (saying what it replaces); anything else needs
`--resume` (continue it) or `--overwrite` (delete that run first). plan.json and memory.json are written
atomically, and plan.json only once the run was accepted: a refused or failed start changes nothing.
"""

import fcntl
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import msgspec

from lowmem.data.tokenizer import write_bytes_atomic
from lowmem.plan import Plan
from lowmem.train.checkpoint import intact_checkpoint, latest_checkpoint, plan_fingerprint

# What a run writes at the top of its directory: `--overwrite` deletes these (and nothing else)
RUN_ENTRIES = ("plan.json", "memory.json", "metrics.jsonl", "model", "adapter", "base", "checkpoints",
               "tensorboard", "wandb", "report.png")


class RunDirError(ValueError):
    """A run cannot start in this directory: the message names what is there and what to do."""


class Start(NamedTuple):
    """What `RunDir.start` allows: resume from `checkpoint`, or start anew replacing `replaces` (with `note`)."""

    checkpoint: Path | None
    replaces: list[str]
    note: str | None


class RunDir:
    """One run directory (`path`), locked by this process for as long as the run is open (`with RunDir(...)`)."""

    def __init__(self, path: Path, rank: int = 0):
        self.path, self.rank = Path(path), rank
        self._lock = None
        self.created = False  # this start made the directory: a failed start removes it again

    def __enter__(self) -> "RunDir":
        self.created = not self.path.exists()
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock = _take_lock(self.path / (".lock" if self.rank == 0 else f".lock-rank-{self.rank}"))
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._lock.close()
        if exc_type is not None and self.created and self.rank == 0:
            self.remove_if_empty()

    def remove_if_empty(self) -> None:
        """Remove the directory this start created when nothing but lock files is in it."""
        if all(f.name.startswith(".lock") for f in self.path.iterdir()):
            shutil.rmtree(self.path, ignore_errors=True)

    def start(self, p: Plan, world: int, resume: bool, overwrite: bool = False) -> "Start":
        """Whether this run may start here (raises RunDirError if not): the checkpoint to resume from, and what
        of an earlier run it replaces. Leaves the run's files as they are (`accept` changes them, once the run's
        inputs are ready); a resume only moves a damaged checkpoint aside (`intact_checkpoint`).
        """
        newest = latest_checkpoint(self.path)
        present = self.run_entries()
        if resume:
            if overwrite:
                raise RunDirError("--resume continues the run in the directory and --overwrite deletes it: "
                                  "give one of them")
            if newest is None:
                raise RunDirError(f"--resume: no complete checkpoint in {self.path}/checkpoints; run without "
                                  "--resume to start")
            intact, damaged = intact_checkpoint(self.path)
            return Start(intact, [], "\n".join(damaged) or None)
        if not present:
            return Start(None, [], None)
        listed = ", ".join(present)
        if overwrite:
            return Start(None, present, f"--overwrite: deleting the run that was in {self.path} ({listed})")
        if newest is not None:
            raise RunDirError(f"{self.path} already holds checkpoints of a run (newest {newest.name}); pass "
                              "--resume to continue it, --overwrite to delete it and start again, or choose "
                              "another --out")
        if not self._same_plan(p, world):
            raise RunDirError(f"{self.path} holds another run ({listed}; its plan.json is not this plan). Choose "
                              "another --out, or pass --overwrite to delete that run")
        return Start(None, present, f"replacing the earlier run of this plan in {self.path} ({listed})")

    def accept(self, p: Plan, start: "Start") -> None:
        """The run is on (its data is ready, its checkpoint loaded): replace what it replaces, record its plan."""
        if self.rank != 0:
            return
        if start.replaces:
            self.clear(start.replaces)
        self.write_json("plan.json", p)

    def run_entries(self) -> list[str]:
        """What of a run is in the directory (names from RUN_ENTRIES)."""
        return [name for name in RUN_ENTRIES if (self.path / name).exists()]

    def clear(self, names: list[str]) -> None:
        """Delete those entries: each renamed to a hidden trash name first, so no half-deleted one is ever seen."""
        for stale in self.path.glob(".trash-*"):  # left by a start killed while deleting
            shutil.rmtree(stale, ignore_errors=True)
        trash = Path(tempfile.mkdtemp(prefix=".trash-", dir=self.path))
        for name in names:
            os.rename(self.path / name, trash / name)
        shutil.rmtree(trash, ignore_errors=True)

    def _same_plan(self, p: Plan, world: int) -> bool:
        try:
            old = msgspec.json.decode((self.path / "plan.json").read_bytes(), type=Plan)
        except (OSError, msgspec.DecodeError, msgspec.ValidationError):
            return False  # no plan.json (or an unreadable one) beside what is there: not known to be this plan
        return plan_fingerprint(old, old.world_size) == plan_fingerprint(p, world)

    def write_json(self, name: str, value) -> None:
        """`value` (a Struct or plain data) as indented JSON in this directory, atomically (temp file, rename)."""
        write_bytes_atomic(self.path / name, msgspec.json.format(msgspec.json.encode(value), indent=2))

    def open_metrics(self, first_step: int):
        """metrics.jsonl for appending: on resume, records after the checkpoint's step are dropped (they re-run)."""
        path = self.path / "metrics.jsonl"
        if first_step == 0 or not path.exists():
            return open(path, "w")
        kept = [r for r in read_metrics(path) if r["step"] <= first_step]
        write_bytes_atomic(path, "".join(json.dumps(r) + "\n" for r in kept).encode())
        return open(path, "a")


    def logged_losses(self) -> tuple[float, float]:
        """The losses of the run's first and last logged steps (metrics.jsonl); nan where none was logged."""
        path = self.path / "metrics.jsonl"
        records = [r for r in read_metrics(path) if "loss" in r] if path.exists() else []
        return (records[0]["loss"], records[-1]["loss"]) if records else (math.nan, math.nan)


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl. A torn last line (a run killed mid-write) is skipped; a bad record
    before it raises ValueError naming the file and line."""
    lines = path.read_bytes().split(b"\n")
    records = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or "step" not in record:
                raise ValueError("not a step record")
        except ValueError as err:
            if not any(rest.strip() for rest in lines[i:]):
                break  # the last line, cut short by a kill: the step it logged re-runs on resume
            raise ValueError(f"{path}:{i}: not a metrics record ({err}): {line[:60]!r}. Delete that line (or the "
                             "file, which only holds logs) and run again") from None
        records.append(record)
    return records


def _take_lock(path: Path):
    """An exclusive flock on `path` (released when the process ends, however it ends), or RunDirError naming
    the process that holds it."""
    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise RunDirError(f"{path.parent} is in use by another `lowmem execute` ({holder}); wait for it to finish, "
                          "stop it, or choose another --out") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    f.flush()
    return f


class RunStatus(NamedTuple):
    """What state a run directory is in, as `lowmem runs` lists it."""

    path: Path
    state: str  # "running", "finished", "stopped at step N", "failed before its first checkpoint"
    steps_logged: int  # the last step metrics.jsonl holds (0: none)
    newest_checkpoint: str | None
    final_loss: float | None  # the last logged loss


def run_status(path: Path) -> RunStatus:
    """The state of the run in `path` (a directory holding plan.json), read without changing anything."""
    metrics = path / "metrics.jsonl"
    try:
        records = [r for r in read_metrics(metrics) if "loss" in r] if metrics.exists() else []
    except ValueError:
        records = []
    newest = latest_checkpoint(path)
    if _is_locked(path / ".lock"):
        state = "running"
    elif any((path / name).is_dir() for name in ("model", "adapter")):
        state = "finished"
    elif newest is not None:
        state = f"stopped at step {int(newest.name.split('-')[1])}"
    else:
        state = "failed before its first checkpoint" if records or (path / "plan.json").exists() else "empty"
    return RunStatus(path, state, records[-1]["step"] if records else 0, newest.name if newest else None,
                     records[-1]["loss"] if records else None)


def find_runs(root: Path) -> list[Path]:
    """Run directories at or under `root` (each holds plan.json), sorted by path; checkpoints are not entered."""
    found = {p.parent for p in root.rglob("plan.json") if "checkpoints" not in p.parent.parts}
    return sorted(found)


def _is_locked(path: Path) -> bool:
    """Whether a process holds the flock on `path` (tried without waiting, released at once)."""
    if not path.exists():
        return False
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
        return False
