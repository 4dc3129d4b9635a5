"""What the loop asks of the device it runs on: where tensors go, how memory is read, which RNG states to keep.

Every CUDA-only call of the executor is here (pinned copies, `torch.cuda` memory statistics and RNG states, the
local card), so that the rest of `lowmem.train` is the same code on the CPU, on a GPU and on fake CUDA
(`lowmem.fakecuda`: FakeTensorMode tensors on `cuda` in a CPU-only torch, where `torch.cuda.is_available()` is
False and none of these calls may run).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from lowmem.spec.units import format_bytes

__all__ = ["CudaMemory", "check_local_device", "cuda_rng_state", "real_cuda", "restore_cuda_rng_state",
           "to_device"]


def real_cuda(device: str) -> bool:
    """Whether `device` is a CUDA device this process really has (not fake CUDA, not the CPU)."""
    return device == "cuda" and torch.cuda.is_available()


def to_device(batch: dict[str, torch.Tensor], device: str, fake_mode=None) -> dict[str, torch.Tensor]:
    """A batch of host tensors on `device`: a non-blocking copy from pinned memory on a GPU, itself on the CPU.

    The loader pins its batches in its own thread (`BatchLoader(pin_memory=True)`), so the copy here is queued on
    the stream and the step does not wait for it. `fake_mode`: a FakeTensorMode the tensors are first converted
    into (fake CUDA, where a real host tensor cannot enter a fake op).
    """
    if device == "cpu":
        return batch
    if fake_mode is not None:
        batch = {k: fake_mode.from_tensor(v) for k, v in batch.items()}
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


class CudaMemory:
    """The caching allocator's view of one step, as `nvidia-smi` would account it: allocated, reserved, retries.

    `start()` resets the peaks before a measured step; `read()` after it returns the step's
    `max_memory_allocated`, `max_memory_reserved` and the allocator's `num_alloc_retries` (a retry means the
    allocator freed its cache to satisfy a request: the step ran at the edge of the card). None off a GPU.
    """

    def __init__(self, device: str):
        self.enabled = real_cuda(device)

    def start(self) -> None:
        if self.enabled:
            torch.cuda.reset_peak_memory_stats()

    def read(self) -> dict[str, int] | None:
        if not self.enabled:
            return None
        stats = torch.cuda.memory_stats()
        return {"max_memory_allocated": torch.cuda.max_memory_allocated(),
                "max_memory_reserved": torch.cuda.max_memory_reserved(),
                "num_alloc_retries": int(stats.get("num_alloc_retries", 0)),
                "num_ooms": int(stats.get("num_ooms", 0))}

    def available_bytes(self) -> int | None:
        """What this process could hold on the card now: its allocated bytes plus what the driver has free."""
        if not self.enabled:
            return None
        torch.cuda.empty_cache()
        free, _total = torch.cuda.mem_get_info()
        return free + torch.cuda.memory_allocated()


def cuda_rng_state(device: str) -> list[list[int]] | None:
    """The CUDA generators' states (LoRA dropout and stochastic rounding draw from them), for a checkpoint."""
    if not real_cuda(device):
        return None
    return [s.tolist() for s in torch.cuda.get_rng_state_all()]


def restore_cuda_rng_state(states: Iterable[Iterable[int]] | None, device: str) -> None:
    """Put back what `cuda_rng_state` saved (nothing when the checkpoint holds none or this is not a GPU)."""
    if states is None or not real_cuda(device):
        return
    torch.cuda.set_rng_state_all([torch.tensor(list(s), dtype=torch.uint8) for s in states])


def check_local_device(hardware, needed_bytes: int) -> str | None:
    """Refuse a CUDA plan this process cannot run; return a warning line when the local card differs.

    A plan made for another card is checked against this one: refused when this card has less memory than the
    plan's budget (`needed_bytes`), with both cards named; a card with enough runs it, with a line saying so.
    """
    if hardware.device != "cuda":
        return None
    if not torch.backends.cuda.is_built():
        raise ValueError(
            f"this plan was made for {hardware.name} (cuda), but this torch ({torch.__version__}) is built without "
            "CUDA; install a CUDA build (pip install torch --index-url https://download.pytorch.org/whl/cu128), "
            "or re-plan for this machine: lowmem plan SPEC (no --hardware)"
        )
    if not torch.cuda.is_available():
        raise ValueError(
            f"this plan was made for {hardware.name} (cuda), but torch sees no CUDA device here (CUDA_VISIBLE_DEVICES"
            " or the driver); run it on the GPU machine, or re-plan for this one: lowmem plan SPEC (no --hardware)"
        )
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    local = f"{props.name} ({format_bytes(props.total_memory)})"
    if props.total_memory < needed_bytes:
        raise ValueError(
            f"this plan was made for {hardware.name} with a budget of {format_bytes(needed_bytes)}, but this GPU "
            f"is {local}: the plan's memory does not fit. Re-plan for this card: lowmem plan SPEC (no --hardware), "
            "or execute the spec itself, which plans for the local GPU"
        )
    if props.name != hardware.name:
        return f"planned for {hardware.name}, running on {local}: the plan's memory fits; its speed estimate is the other card's"
    return None
