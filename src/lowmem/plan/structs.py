"""What the planner produces: a Plan with every strategy resolved, its reasons, and a memory report."""

from typing import Annotated, Literal

import msgspec

from lowmem.nn.config import ModelConfig
from lowmem.plan.hardware import HardwareProfile
from lowmem.spec.structs import AdamW, AdamW8bit, OptimizerSpec, RunSpec

_STRUCT = {"frozen": True, "kw_only": True, "forbid_unknown_fields": True}

PLAN_FORMAT = "lowmem.plan/1"
CHECKPOINTING_PATTERN = r"^(off|full|selective|every-[24]|first-[1-9][0-9]*)$"


def checkpointed(value: str, layer: int) -> bool:
    """Whether activation checkpointing `value` recomputes block `layer` (in part, for selective)."""
    if value == "off":
        return False
    if value.startswith("first-"):
        return layer < int(value.removeprefix("first-"))
    if value.startswith("every-"):
        return layer % int(value.removeprefix("every-")) == 0
    return True  # full, selective


class Strategies(msgspec.Struct, **_STRUCT):
    """The concrete strategy values `execute` applies; nothing here is left to decide at run time."""

    # mixed-bf16 / fp16: fp32 master weights, gradients and optimizer states, blocks computed in bf16 / fp16
    # (fp16 with dynamic loss scaling)
    precision: Literal["fp32", "bf16", "mixed-bf16", "fp16"]
    # "first-n": blocks 0..n-1 keep only their input and are recomputed in backward; the rest save all (the
    # planner's ladder between off and full). "every-k": blocks 0, k, 2k, ... do (plans written before first-n).
    # "selective": every block keeps its input and its matmul/attention outputs; elementwise ops are recomputed
    activation_checkpointing: Annotated[str, msgspec.Meta(pattern=CHECKPOINTING_PATTERN)]
    cross_entropy: Literal["standard", "chunked", "fused"]
    # saved activations of at least offload_min_bytes wait for backward in pinned host memory, up to
    # offload_max_host_bytes per forward (the rest stay on the device); both 0 without offloading
    activation_offloading: bool = False
    offload_min_bytes: int = 0
    offload_max_host_bytes: int = 0
    optimizer_in_backward: bool = False
    compile: bool = False
    # QLoRA: NF4 base weights in blocks of nf4_block_size, their scales double-quantized in blocks of
    # nf4_scaler_block_size (the largest of 256, 128, ... that divides every quantized weight); 0: no NF4
    nf4_block_size: int = 0
    nf4_scaler_block_size: int = 0
    # each loaded micro-batch runs as this many equal pieces, their gradients accumulated (1: whole)
    micro_batch_split: int = 1
    # "8bit": an AdamW spec runs as bitsandbytes AdamW8bit with the same hyper-parameters
    optimizer_state: Literal["full", "8bit"] = "full"
    # FSDP2's CPUOffloadPolicy: parameter, gradient and optimizer-state shards in host memory (CUDA, world > 1)
    fsdp_cpu_offload: bool = False
    # pure bf16 with an on-device AdamW: updates computed in fp32 and rounded to bf16 stochastically (torchao
    # _AdamW), so that updates below bf16's spacing are kept on average
    bf16_stochastic_rounding: bool = False
    # the attention kernel (lowmem.nn.llama.forward): "sdpa" on the CPU (explicit document mask); on CUDA "varlen"
    # (flash over packed documents, bf16/fp16 compute) or "sdpa-efficient" (the memory-efficient kernel; fp32)
    attention_kernel: Literal["sdpa", "sdpa-efficient", "varlen"] = "sdpa"
    # the dtype of the vocabulary projection inside the loss (logits upcast to fp32 in chunks); fp32 on the CPU
    projection_dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    # what a CPU run's tensors are allocated from: "caching", lowmem's caching allocator (lowmem.hostmem),
    # or "system", torch's default (glibc); always "system" on CUDA, whose tensors torch's caching allocator holds
    host_allocator: Literal["system", "caching"] = "system"


def run_optimizer(optimizer: OptimizerSpec, strategies: Strategies) -> OptimizerSpec:
    """The optimizer a plan runs: the spec's, or its 8-bit-state form where the planner chose that."""
    if strategies.optimizer_state == "8bit":
        assert isinstance(optimizer, AdamW) and not optimizer.offload, "the planner swaps only on-device AdamW's states"
        return AdamW8bit(lr=optimizer.lr, betas=optimizer.betas, eps=optimizer.eps,
                         weight_decay=optimizer.weight_decay, backend="bitsandbytes")
    return optimizer


class Decision(msgspec.Struct, **_STRUCT):
    """One strategy's resolved value and why: `source` is "user" (forced in the spec), "auto" or "fixed"."""

    strategy: str
    value: str
    source: Literal["user", "auto", "fixed"]
    reason: str


class Component(msgspec.Struct, **_STRUCT):
    """Bytes of one memory component at the predicted peak (or, for an overhead line, beside it)."""

    name: Literal["parameters", "gradients", "optimizer_state", "activations", "logits", "batch", "temporaries",
                  "cublas_workspace", "allocator_slack", "cuda_context", "nccl_buffers", "runtime", "heap_retained",
                  "allocator_cache"]
    bytes: int
    note: str = ""


# Which of torch's views of CUDA memory each overhead line is part of (`MemoryReport`): cuBLAS's workspaces come
# from the caching allocator (max_memory_allocated counts them), the slack is the allocator's cache beyond its
# allocations (max_memory_reserved), and the context and NCCL's buffers are outside it (only nvidia-smi shows them).
ALLOCATED_OVERHEADS = ("cublas_workspace",)
RESERVED_OVERHEADS = (*ALLOCATED_OVERHEADS, "allocator_slack")


class MemoryReport(msgspec.Struct, **_STRUCT):
    """Predicted peak memory by component, and the phase of the step where the peak falls.

    `peak_bytes` is the live tensors at the peak (what `lowmem plan --trace` and the CPU's tracker count). On CUDA,
    `overheads` names what the process holds beyond them (`estimate.cuda_overheads`), and three properties give
    torch's and the driver's views: `allocated_bytes` (torch.cuda.max_memory_allocated), `reserved_bytes`
    (max_memory_reserved) and `device_bytes` (what nvidia-smi shows for the process, which the planner fits to the
    budget). On a CPU the overheads are the runtime and what the allocator keeps (`estimate.cpu_overheads`), and
    `device_bytes` is the peak RSS the run adds to the process once its libraries are imported. Without overheads (a plan written before them) all three
    are `peak_bytes`.

    `host` is pinned host memory the plan fills beside the device's (offloaded activations, a host optimizer's
    copies and states): not part of `peak_bytes`, which is the device's.
    """

    components: tuple[Component, ...]
    peak_bytes: int
    peak_phase: str
    host: tuple[Component, ...] = ()
    overheads: tuple[Component, ...] = ()

    def by_name(self) -> dict[str, int]:
        return {c.name: c.bytes for c in self.components}

    @property
    def allocated_bytes(self) -> int:
        """torch.cuda.max_memory_allocated as planned: the live tensors and cuBLAS's workspaces."""
        return self.peak_bytes + sum(c.bytes for c in self.overheads if c.name in ALLOCATED_OVERHEADS)

    @property
    def reserved_bytes(self) -> int:
        """torch.cuda.max_memory_reserved as planned: allocated plus the caching allocator's slack."""
        return self.peak_bytes + sum(c.bytes for c in self.overheads if c.name in RESERVED_OVERHEADS)

    @property
    def device_bytes(self) -> int:
        """The process's memory as nvidia-smi shows it: reserved plus the CUDA context and NCCL's buffers."""
        return self.peak_bytes + sum(c.bytes for c in self.overheads)


class Alternative(msgspec.Struct, **_STRUCT):
    """A candidate strategy set the search considered."""

    strategies: Strategies
    peak_bytes: int
    tokens_per_s: float
    fits: bool  # device_bytes within the usable budget
    chosen: bool
    # the nvidia-smi view on CUDA (`MemoryReport.device_bytes`), what `fits` compares; peak_bytes on a CPU;
    # 0 in plans written before it
    device_bytes: int = 0


class Plan(msgspec.Struct, **_STRUCT):
    """A compiled run: the spec, the hardware it is planned for, and every derived number with its reason."""

    format: str = PLAN_FORMAT
    spec: RunSpec
    hardware: HardwareProfile
    # data-parallel processes (torchrun, FSDP2): `memory` is one process's, `tokens_per_step` all processes'
    world_size: int = 1
    model: ModelConfig
    strategies: Strategies
    decisions: tuple[Decision, ...]
    n_params: int
    n_trainable: int
    tokens_per_step: int
    total_steps: int | None  # None: an epoch count, resolved from the prepared dataset's length
    budget_bytes: int
    usable_bytes: int  # budget less the safety margin
    memory: MemoryReport
    tokens_per_s: float
    alternatives: tuple[Alternative, ...] = ()
    warnings: tuple[str, ...] = ()
