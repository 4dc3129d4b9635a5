"""The run directory: its layout, and the rules for starting a run in it or resuming one.

A run directory holds::

    plan.json        the plan that ran (`lowmem execute plan.json` runs it again)
    metrics.jsonl    one JSON record per logged step and per evaluation (incl. resident memory over time)
    tensorboard/     TensorBoard event files, when `output.log_to` includes it (W&B: `wandb/`)
    memory.json      planned versus measured peak memory, by component
    model/           final weights in Hugging Face format (config.json, model.safetensors, the tokenizer files)
    adapter/, base/  instead of model/ for LoRA, QLoRA and DoRA: the PEFT adapter and, for a preset, its base
    checkpoints/     step-NNNNNNNN/ resumable checkpoints (see lowmem.train.checkpoint), newest `output.keep`
"""




import json
import os
from pathlib import Path

import msgspec

from lowmem.plan import Plan
from lowmem.train.checkpoint import latest_checkpoint


class RunDir:
    """One run directory (`path`), opened for a new run or for resuming the one it holds."""

    def __init__(self, path: Path):
        self.path = path

    def start(self, p: Plan, resume: bool, writer: bool) -> Path | None:
        """Accept this run here, or refuse it; returns the checkpoint to resume from (None for a new run).

        A new run is refused where checkpoints of a run exist; a resume needs a complete one. The `writer`
        (rank 0) records the plan.
        """
        self.path.mkdir(parents=True, exist_ok=True)
        newest = latest_checkpoint(self.path)
        if resume and newest is None:
            raise ValueError(f"--resume: no complete checkpoint in {self.path}/checkpoints; run without --resume to "
                             "start")
        if not resume and newest is not None:
            raise ValueError(f"{self.path} already holds checkpoints of a run; pass --resume to continue it, or "
                             "choose another --out so nothing is overwritten")
        if writer:
            self.write_json("plan.json", p)
        return newest if resume else None

    def write_json(self, name: str, value) -> None:
        """`value` (a Struct or plain data) as indented JSON in this directory."""
        (self.path / name).write_bytes(msgspec.json.format(msgspec.json.encode(value), indent=2))

    def open_metrics(self, first_step: int):
        """metrics.jsonl for appending: on resume, records after the checkpoint's step are dropped (they re-run)."""
        path = self.path / "metrics.jsonl"
        if first_step == 0 or not path.exists():
            return open(path, "w")
        kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= first_step]
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, path)
        return open(path, "a")
