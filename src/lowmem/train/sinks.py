"""Where a run's per-step records go besides `metrics.jsonl`: TensorBoard and Weights & Biases (`output.log_to`).

A sink takes the same flat record the JSONL file gets (`step`, `loss`, `lr`, `tokens_per_s`, memory, ...) and
writes its numeric fields. Each sink's package is optional; asking for a sink whose package is missing stops the
run before its first step with the `pip install` that fixes it. Only rank 0 opens sinks.
"""

from __future__ import annotations

import math
import secrets
from pathlib import Path
from typing import Protocol

import msgspec

from lowmem.spec.structs import RunSpec

WANDB_ID_FILE = "wandb_run_id"  # in the run dir: a resumed run continues the same W&B run


class Sink(Protocol):
    def write(self, record: dict) -> None: ...

    def close(self) -> None: ...


def _scalars(record: dict) -> dict[str, float]:
    """The record's finite numbers (not the step itself), as floats."""
    return {k: float(v) for k, v in record.items()
            if k != "step" and isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)}


class TensorBoardSink:
    """Scalars under `train/<field>` (and `eval/loss`) in `RUN/tensorboard`, via torch's SummaryWriter."""

    def __init__(self, run_dir: Path, first_step: int):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ValueError(
                "output.log_to includes 'tensorboard' but the tensorboard package is not installed: "
                "pip install 'lowmem[tensorboard]' (or remove it from output.log_to)"
            ) from None
        # purge_step drops events a resumed run writes again (steps after its checkpoint)
        self._writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=first_step + 1 if first_step else None)

    def write(self, record: dict) -> None:
        step = record["step"]
        for name, value in _scalars(record).items():
            tag = "eval/loss" if name == "eval_loss" else f"train/{name}"
            self._writer.add_scalar(tag, value, global_step=step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class WandbSink:
    """One W&B run per lowmem run (resumed runs continue it); the spec is the run's config."""

    def __init__(self, run_dir: Path, spec: RunSpec):
        try:
            import wandb
        except ImportError:
            raise ValueError(
                "output.log_to includes 'wandb' but the wandb package is not installed: "
                "pip install 'lowmem[wandb]' (or remove it from output.log_to)"
            ) from None
        id_file = run_dir / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
        self._run = wandb.init(
            project=spec.output.wandb_project or spec.name, name=spec.name, id=run_id, resume="allow",
            dir=str(run_dir), config=msgspec.to_builtins(spec),
        )
        id_file.write_text(run_id)

    def write(self, record: dict) -> None:
        self._run.log(_scalars(record), step=record["step"])

    def close(self) -> None:
        self._run.finish()


def open_sinks(spec: RunSpec, run_dir: Path, first_step: int) -> list[Sink]:
    """The sinks `output.log_to` asks for, opened (raises ValueError naming the missing package)."""
    sinks: list[Sink] = []
    try:
        for name in dict.fromkeys(spec.output.log_to):  # each once, in the spec's order
            sinks.append(TensorBoardSink(run_dir, first_step) if name == "tensorboard" else WandbSink(run_dir, spec))
    except BaseException:
        close_sinks(sinks)
        raise
    return sinks


def close_sinks(sinks: list[Sink]) -> None:
    for sink in sinks:
        sink.close()
