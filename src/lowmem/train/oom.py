"""Running out of memory mid-run: undo the failed step, checkpoint what is intact, re-plan for less."""

import gc
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import msgspec
import torch

from lowmem.plan import Plan, plan
from lowmem.plan.estimate import CUDA_CONTEXT_BYTES
from lowmem.spec.units import format_bytes
from lowmem.train import distributed
from lowmem.train.checkpoint import latest_checkpoint, read_trainer_state
from lowmem.train.device import CudaMemory, cuda_rng_state, real_cuda, restore_cuda_rng_state
from lowmem.train.strategies import InBackwardOptimizer

# A run re-plans at most this many times after running out of memory; then it stops with the error.
MAX_REPLANS = 3


# The re-planned budget is this fraction of the smaller of what was available and what the failed plan
# predicted: strictly below the failed plan's peak, so the planner must choose a plan that holds less.
REPLAN_FRACTION = 0.9


class OutOfMemoryStop(RuntimeError):
    """A run stopped for lack of memory, its last completed step checkpointed (the message says what to do)."""


class StepOutOfMemory(Exception):
    """A step ran out of memory; the state of step `resume_step` is on disk, ready to resume under a new plan."""

    def __init__(self, step: int, resume_step: int, message: str, available_bytes: int | None):
        super().__init__(message)
        self.step, self.resume_step, self.message, self.available_bytes = step, resume_step, message, available_bytes

    def as_error(self, p: Plan, replans: int) -> "OutOfMemoryStop":
        why = ("memory.on_oom = 'stop'" if p.spec.memory.on_oom == "stop" else
               "re-planning is for one process (several ranks would have to agree on the new plan)"
               if distributed.world_size() > 1 else f"it was re-planned {replans} times already")
        return OutOfMemoryStop(
            f"out of memory in step {self.step + 1} ({self.message}); not re-planned: {why}. The state of step "
            f"{self.resume_step} is checkpointed: lower memory.budget (the plan counted on "
            f"{format_bytes(p.budget_bytes)}) and continue with `lowmem execute RUN_DIR --resume` on a new plan"
        )


def replan_after_oom(p: Plan, available_bytes: int | None) -> Plan:
    """The spec planned again for a smaller budget, keeping everything a checkpoint stores as it was.

    The budget is REPLAN_FRACTION of the smaller of `available_bytes` (what the device really had for this
    process) and the failed plan's predicted need as nvidia-smi would show it (`MemoryReport.device_bytes`: on a
    GPU its CUDA overhead lines included, as the new plan's fit will be). Precision, the optimizer's state kind,
    optimizer in backward, stochastic rounding and FSDP offload are pinned to the failed plan's values, so its checkpoint loads; what may
    change are the strategies that only move memory (checkpointing, offloading, cross-entropy, micro-batch split).
    """
    # on a CPU the cap (--cap-memory) bounds the tensors, and the plan's runtime and heap lines come on top of them:
    # the fraction applies to the tensors' share, and those lines are added back
    beyond = p.memory.device_bytes - p.memory.peak_bytes if p.hardware.device == "cpu" else 0
    capped = available_bytes + beyond if available_bytes else None
    basis = min(b for b in (capped, p.memory.device_bytes, p.budget_bytes) if b) - beyond
    s = p.strategies
    pinned = msgspec.structs.replace(
        p.spec.memory.strategies,
        low_bit_optimizer="on" if s.optimizer_state == "8bit" else "off",
        optimizer_in_backward="on" if s.optimizer_in_backward else "off",
        bf16_stochastic_rounding="on" if s.bf16_stochastic_rounding else "off",
        fsdp_cpu_offload="on" if s.fsdp_cpu_offload else "off",
    )
    memory = msgspec.structs.replace(p.spec.memory, budget=f"{int(basis * REPLAN_FRACTION) + beyond}B",
                                     precision=s.precision, strategies=pinned)
    return plan(msgspec.structs.replace(p.spec, memory=memory), p.hardware, p.world_size)


def describe_strategies(p: Plan) -> str:
    """The memory strategies of a plan in one short line."""
    s = p.strategies
    parts = [s.precision, f"checkpointing {s.activation_checkpointing}", f"{s.cross_entropy} CE"]
    if s.activation_offloading:
        parts.append("activation offloading")
    if s.micro_batch_split > 1:
        parts.append(f"micro-batch split {s.micro_batch_split}")
    if s.optimizer_state == "8bit":
        parts.append("8-bit AdamW")
    return ", ".join(parts)


class StepStart(NamedTuple):
    """What a step starts from besides the weights: where the data is, the RNG states (to go back on OOM)."""

    loader: dict[str, int]
    cpu_rng: torch.Tensor
    cuda_rng: list | None

    @classmethod
    def take(cls, loader, device: str) -> "StepStart":
        return cls(loader.state_dict(), torch.get_rng_state(), cuda_rng_state(device))

    def restore(self, loader, device: str) -> None:
        loader.load_state_dict(self.loader)
        torch.set_rng_state(self.cpu_rng)
        restore_cuda_rng_state(self.cuda_rng, device)


class UpdateWatch:
    """Whether the current step has begun to change the weights (its optimizer step, or any in-backward hook)."""

    def __init__(self, optimizer):
        self.in_backward = isinstance(optimizer, InBackwardOptimizer)
        self._started = False
        if isinstance(optimizer, torch.optim.Optimizer):
            optimizer.register_step_pre_hook(lambda *_: setattr(self, "_started", True))

    @property
    def started(self) -> bool:
        return self._started or self.in_backward  # in-backward updates while backward runs

    @started.setter
    def started(self, value: bool) -> None:
        self._started = value


def checkpoint_before_oom(out: Path, step: int, first_step: int, before: StepStart, updated: bool, optimizer,
                           loader, save: Callable[[int], None], device: str) -> int:
    """Free the failed step and leave on disk the state it started from; returns that state's step.

    A step that failed before touching the weights (forward, backward) is undone: gradients dropped, the loader
    and the RNGs put back, and the weights as they are are the state of `step`. One that failed in its update
    may have changed some weights: the newest checkpoint on disk is the state to go back to.
    """
    optimizer.zero_grad(set_to_none=True)
    gc.collect()
    if real_cuda(device):
        torch.cuda.empty_cache()
    if not updated:
        before.restore(loader, device)
        save(step)
        return step
    newest = latest_checkpoint(out)
    if newest is None:
        raise OutOfMemoryStop(
            f"out of memory in the optimizer update of step {step + 1}, which had already changed some weights, and "
            f"{out}/checkpoints holds no checkpoint to go back to. Lower memory.budget and start again, or set "
            "output.save_every so a re-plan can resume"
        )
    return int(read_trainer_state(newest)["step"])


def available_bytes(cuda_memory: CudaMemory, cap_bytes: int | None) -> int | None:
    """What this process really had: the enforced cap, or on a GPU its allocated bytes plus the driver's free plus
    its CUDA context (which the driver's free already lost, and which a plan counts as its own line)."""
    available = cuda_memory.available_bytes()
    if available is not None:
        available += CUDA_CONTEXT_BYTES
    if cap_bytes is not None:
        return cap_bytes if available is None else min(cap_bytes, available)
    return available
