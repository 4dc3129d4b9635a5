"""Analytic estimates: peak memory by component and tokens/s, for one training step.

Memory is counted as live tensor bytes (what `LiveTensorTracker` measures on CPU and
`torch.cuda.max_memory_allocated` on CUDA), derived from the tensors autograd saves in lowmem's own
functional Llama block (`lowmem.nn.llama.block`), not from a generic GPT formula:

per block (see `block_activation_bytes`), N = tokens in the micro-batch, D = dim, Q = n_heads*head_dim,
F = ffn_dim, a = bytes of the compute dtype: N (6 D + 4 Q + 4 F) a, plus fp32 norm statistics, and the
additive document mask SDPA keeps when documents are packed. Full activation checkpointing keeps only each
block's input and recomputes one block at a time in backward. The loss computes logits in fp32: at the start
of backward three (N, V) fp32 tensors are alive (log-probabilities, their gradient, the logits' gradient).
Checked against `LiveTensorTracker` on the tiny preset: within 2.5% for fp32/bf16 x checkpointing x
accumulation (tests/plan/test_estimate.py).

On CUDA the planner adds what the process holds beyond its live tensors (`cuda_overheads`: cuBLAS workspaces, the
caching allocator's slack, the CUDA context, NCCL's buffers) and fits that total, nvidia-smi's view, to the budget.
"""

import math
from typing import NamedTuple

import msgspec

from lowmem.nn.config import ModelConfig, count_params, param_shapes
from lowmem.nn.lora import TARGETS
from lowmem.nn.lora_settings import target_names
from lowmem.nn.loss import loss_peak_bytes, standard_peak_terms
from lowmem.nn.moe import NF4_DEQUANT_CHUNK_ELEMENTS
from lowmem.plan.hardware import HardwareProfile
from lowmem.plan.structs import Component, MemoryReport, Strategies, checkpointed
from lowmem.spec.structs import SGD, Adafactor, AdamW, AdamW4bit, AdamW8bit, OptimizerSpec, TrainSpec
from lowmem.spec.units import format_bytes

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "mixed-bf16": 2, "fp16": 2}  # the compute dtype: activations
MASTER_BYTES = {"fp32": 4, "bf16": 2, "mixed-bf16": 4, "fp16": 4}  # trained weights, gradients, optimizer states
FP32 = 4

# fp16 compute on CPU, relative to fp32: a quickstart-5m step (8 x 256 tokens) ran at 413 vs 2,612 tokens/s on
# the development CPU (AVX512-FP16 but no AMX-FP16; torch 2.13; /tmp/lm/bench_prec.py in the commit message of
# mixed precision). fp16 matmuls alone ran at about fp32 speed (catalogue.FP16_CPU_REASON): the elementwise
# ops and their backward in fp16 are what is slow.
FP16_OVER_FP32_CPU = 0.16

# torch.compile (inductor) time per distinct block graph, cold cache: the first compiled step took 38 s for the
# tiny preset and 53 s for quickstart-5m (forward and backward graphs; one graph serves every layer), plus 1-2 s
# for a second variant on the next step; development CPU (2 cores shared with other work, gcc 12, torch 2.13),
# /tmp/lm/speed.py. Compile time is Python-side tracing and code generation: assumed about the same on a GPU host.
COMPILE_SECONDS_PER_BLOCK = 45.0
# Steady-state speed of a compiled block relative to eager: 1.13x on the development CPU (quickstart-5m fp32,
# 8 x 256 tokens, min of 6 interleaved forward+backward rounds: 0.718 vs 0.814 s). On CUDA assumed 1.1x (fused
# elementwise kernels; not measured here).
COMPILE_SPEEDUP = {"cpu": 1.13, "cuda": 1.1}

# Selective checkpointing runs no matmul twice, yet on the development CPU (quickstart-5m, 8 x 256 tokens, fp32,
# min of 8 interleaved forward+backward rounds, /tmp/lm/speed.py) its step took 4.27 s against 3.34 s off and
# 4.95 s full: 58% of full recompute's extra time (elementwise ops are memory-bound there, and the policy adds a
# Python dispatch per op). Counted as that share of full recompute's FLOPs.
SELECTIVE_RECOMPUTE_SHARE = 0.6
# mixed precision casts every block weight to the compute dtype (forward and recompute) and each weight gradient
# back: memory-bound work proportional to the parameters, about 1% of a step at these token counts
MIXED_CAST_OVERHEAD = 0.99
# Speed kept per halving of the micro-batch (micro_batch_split = 2, 4, ...): smaller matmuls and one more
# forward/backward per piece. Measured on the development CPU (quickstart-5m fp32, 8 x 256 tokens,
# `python benchmarks/strategy_speed.py`), three sessions of best-of-3/3/5 interleaved runs: 2 pieces 0.997x /
# 1.136x / 1.068x, 4 pieces 0.942x / 1.053x / 1.007x of whole micro-batches (the run-to-run spread, about 15%,
# is larger than the effect: smaller pieces also fit the caches better). 0.97 per halving is the low end, kept
# so that whole micro-batches win among equals. The same runs put the fused loss at 0.965x / 1.174x / 0.986x
# (its 0.97 below stands; last session's "2x slower" was load) and the chunked loss at 0.914x / 1.002x / 1.020x.
SPLIT_EFFICIENCY = 0.97

# Share of peak FLOP/s a training step reaches, by device: on CPU 0.45 of the profile's peak (fitted on the
# development machine: quickstart-5m fp32 measured 2,466 tokens/s, benchmarks/memory_matrix.py); GPUs without
# compile about 40% (MFU of torchtune recipes without compile, README ladder). Not yet checked on a GPU.
EFFICIENCY = {"cpu": 0.45, "cuda": 0.40}

# The per-step floor (`step_floor_seconds`): eager PyTorch pays a fixed host cost per op, whatever its size, so a
# small model's step cannot be faster than its ops can be issued (issue #16: quickstart-5m on an H100 was estimated
# at 11.1M tokens/s from FLOPs alone). Counted, not fitted:
# - OPS_PER_BLOCK, OPS_ROOT: aten ops other than views in one block's forward + backward (102) and in the embedding,
#   final norm and loss (40): counted with a TorchDispatchMode over lowmem.nn.llama.forward + backward, tiny preset
#   shapes, packed-document SDPA (benchmarks/step_floor.py). Each is at least one kernel on CUDA.
# - HOST_SECONDS_PER_OP: Python, the dispatcher and autograd per op, measured on the development CPU (AMD EPYC,
#   1 thread, torch 2.13, load about 4 on 2 cores): one block's forward + backward at dim 16 and 8 tokens took 526 us
#   more per block (10 vs 2 layers, best of 30; benchmarks/step_floor.py; 615 us, 6.0 us per op, in a busier
#   minute), 5.2 us per op. A GPU host's CPU is assumed about as fast.
# - CUDA_LAUNCH_SECONDS: cudaLaunchKernel's own host time, "a few microseconds" per launch (NVIDIA's Nsight Systems
#   guide measured about 20 us from a PyTorch elementwise op's call to its kernel's start on a V100, dispatch
#   included); 5 us assumed on top of the dispatch above. Not measured: no GPU was at hand.
# - COMPILED_OPS_PER_BLOCK: a compiled block runs its matmuls and attention (about 25 kernels forward + backward) and
#   a few fused elementwise kernels in one graph call: 30 assumed, without per-op Python.
# - OPTIMIZER_SECONDS_PER_TENSOR: torch AdamW's single-tensor CPU path took 20-22 us per 4-element tensor
#   (benchmarks/step_floor.py); on CUDA the fused kernel takes every tensor of a group in a few launches: 2 us of
#   host time per tensor assumed (building its tensor lists).
# - SAVED_TENSORS_PER_BLOCK: what autograd saves in one block's forward (39, counted with saved_tensors_hooks over
#   the same forward, benchmarks/step_floor.py); under activation offloading each runs a Python pack and unpack
#   hook (one op's host time each) and a copy out and back (a launch and an event, OFFLOAD_COPY_SECONDS each way, the 10 us
#   of OFFLOAD_MIN_BYTES' comment; not measured).
# On CUDA the host issues kernels ahead of the device, so a step takes the longer of its compute and its host
# time; on a CPU both run on the same cores one after the other, so they add.
OPS_PER_BLOCK = 102
OPS_ROOT = 40
COMPILED_OPS_PER_BLOCK = 30
HOST_SECONDS_PER_OP = 5.2e-6
CUDA_LAUNCH_SECONDS = 5e-6
OPTIMIZER_SECONDS_PER_TENSOR = {"cpu": 20e-6, "cuda": 2e-6}
SAVED_TENSORS_PER_BLOCK = 39
OFFLOAD_COPY_SECONDS = 10e-6

# Right after the loss's backward, the final RMSNorm's backward holds 3 (N, D) fp32 gradients beside every saved
# activation (the loss's hidden gradient, the gradient of the norm's fp32 input and a product): the measured peak
# of quickstart-5m with fused CE falls there (PowBackward0 / MulBackward0 of the norm; +6.0 MiB mixed-bf16, +7.2 MiB
# fp32 at N = 2,048, D = 256 beyond the saved activations: 3.0 and 3.6 such tensors; issue #16 item 4). Under
# LoRA the norm's weight is frozen and one fewer is made.
FINAL_NORM_GRADS = 3

# Partial checkpointing (first-n, or every-k with the last block not checkpointed): backward runs the last blocks
# over everything they saved before any recompute, and with fused or chunked CE the peak falls there, beside
# every saved activation (lowmem plan --trace on quickstart-5m, N = 2,048, D = 256). Beyond the saved activations
# it holds, in (N, D) tensors: full fine-tuning 3.8 fp32 (first-3); LoRA and QLoRA on the default targets q, k, v,
# o 7.25 fp32 (first-3, first-5: 1.25 more than with checkpointing off, whose final norm's phase stands as fitted
# above). The adapters' figure falls as more projections are adapted (their saved dropout inputs are freed inside
# that backward; checkpointing off: 12 with wq alone, 6.0 with q, k, v, o, 3.2 with all seven). So: full 3.6 fp32
# tensors, adapters 7.5 of the compute dtype, fitted on the default targets: within 0.7% of the measured peak on
# quickstart-5m (benchmarks/partial_checkpointing.py), over-counting where more projections are adapted.
LAST_BLOCK_BACKWARD_GRADS = {"full": 3.6, "adapters": 7.5}

# activation_offloading (lowmem.train.offload). Saved tensors under OFFLOAD_MIN_BYTES stay on the device: a copy's
# fixed cost (a launch and an event, about 10 us) is the transfer time of about 0.6 MiB at 64 GB/s, so a smaller
# tensor frees too little memory to be worth it.
OFFLOAD_MIN_BYTES = 1 << 20
# The hooks run in Python for every saved tensor, and the copies take HBM bandwidth from the kernels they overlap:
# assumed to cost 3% of a step on top of the PCIe time that compute does not hide (not measured: no GPU was
# available). So auto offloads only when no plan without offloading fits.
OFFLOAD_OVERHEAD = 0.97
# At most this share of the host's RAM is pinned (offloaded activations, a host optimizer's copies and states):
# pinned pages cannot be swapped out, and the data loader, Python and the page cache need the rest.
HOST_PINNED_SHARE = 0.5
# optimizer.offload (torchao's CPUOffloadOptimizer) keeps tensors with fewer elements than this on the device
# (its `minimal_size`, which lowmem.train.optim passes explicitly); the others are stepped on the host.
CPU_OFFLOAD_MIN_NUMEL = 4096
# The host step is torch's fused CPU AdamW. For each parameter it reads the gradient and reads and writes the
# weight and both moments (7 values), so it is memory-bound: assumed 20 GB/s for one process's threads (not
# measured: no GPU host was available).
HOST_ADAMW_BYTES_PER_S = 20e9

# What a CUDA process holds beyond its live tensors: the lines of `MemoryReport.overheads`, so that a plan is
# planned the way nvidia-smi shows it (issue #14). No GPU was at hand to measure them: each figure cites its source.
MiB = 1 << 20
# cuBLAS workspace. torch gives every (cuBLAS handle, stream) pair that runs a GEMM a workspace from the caching
# allocator and keeps it (so max_memory_allocated counts it): aten/src/ATen/cuda/CublasHandlePool.cpp,
# `parseChosenWorkspaceSize`, ":4096:2:16:8 default, 32MiB for Hopper" (4096 KiB x 2 + 16 KiB x 8 = 8.125 MiB before
# sm90, 4096 KiB x 8 = 32 MiB on sm90; later releases also on sm100/sm120, so 32 MiB from sm90 up here). The
# 8,519,680-byte block of pytorch#95668 and discuss.pytorch.org/t/178671 is the pre-Hopper one. cuBLASLt shares it
# (TORCH_CUBLASLT_UNIFIED_WORKSPACE, on by default). Handles are per thread: the step's thread (forward, optimizer)
# and autograd's device thread (backward) each hold one on the compute stream; the copy streams run no GEMM.
CUBLAS_WORKSPACE_BYTES_SM90 = 4096 * 1024 * 8
CUBLAS_WORKSPACE_BYTES_OLDER = 4096 * 1024 * 2 + 16 * 1024 * 8
CUBLAS_HANDLES = 2
# Allocator slack: max_memory_reserved over max_memory_allocated, the caching allocator's rounding (blocks of 1 MiB
# or more round up to 2 MiB; requests up to 10 MiB take 20 MiB segments) and split blocks it cannot hand back.
# lowmem sets no PYTORCH_CUDA_ALLOC_CONF, so no expandable segments: planned at issue #14's bound for a run,
# reserved <= 1.10 x allocated, which benchmarks/gpu_check.py checks on a GPU.
ALLOCATOR_SLACK = 0.10
# CUDA context and the kernels loaded into it, outside the allocator (nvidia-smi counts them, max_memory_reserved
# does not): a bare context took 287 MB with lazy module loading (pytorch#86509, torch's default since 1.13), about
# 400 MB (pytorch#109888), 426 MiB on an RTX 6000 Ada under torch 2.10 / CUDA 13 (unsloth-zoo#1053); a training
# step then loads its own kernels (cuBLAS's, attention's, the fused optimizer's) lazily. Planned at 512 MiB.
CUDA_CONTEXT_BYTES = 512 * MiB
# NCCL under torchrun (FSDP2's all-gathers and reduce-scatters run as rings, one communicator). Per channel the
# receive FIFOs of the three protocols (NVIDIA/nccl src/init.cc defaults: Simple NCCL_BUFFSIZE = 4 MiB, LL128
# 120 x 640 x 8 x 8 B = 4.69 MiB, LL 8 x 512 x 8 x 16 B = 512 KiB; 9.19 MiB, allocated in 2 MiB granules: the
# 10 MiB buffers NVIDIA/nccl#1685 logged, with a 2 MiB one per send side). A ring has two peers at any scale, so the
# bytes follow the channel count, not the GPU count (NVIDIA/nccl#986); NCCL opened 32 channels between two H100s
# (NVIDIA/nccl#1685), fewer over PCIe: 32 planned. NCCL allocates them itself, outside the caching allocator.
NCCL_CHANNELS = 32
NCCL_BYTES_PER_CHANNEL = 10 * MiB + 2 * MiB


def weight_bytes(precision: str) -> int:
    """Bytes per trained parameter (its gradient and optimizer states too): fp32 masters under mixed precision."""
    return MASTER_BYTES[precision]


def cast_copy_bytes(cfg: ModelConfig, precision: str, trainable: "Trainable") -> int:
    """Bytes of one block's low-precision weight copies under mixed precision (0 otherwise).

    `lowmem.train.strategies` casts each block's fp32 master tensors to the compute dtype inside the block;
    every copy is saved by the op that uses it (a linear saves its weight for the input's gradient, the
    norm's product its weight) until that block's backward. A frozen base is stored in the compute dtype
    already, so under LoRA only the adapters are copied.
    """
    a, wb = DTYPE_BYTES[precision], MASTER_BYTES[precision]
    if a == wb:
        return 0
    shapes = param_shapes(cfg)
    if trainable.full:
        return sum(_numel(s) for n, s in shapes.items() if n.startswith("layers.0.")) * a
    layer = _sample_layer(cfg)
    total = sum(_numel(s) for name in trainable.adapted
                for s in adapter_shapes(cfg, name, layer, trainable.rank, trainable.dora))
    return total * a


def update_temporary_bytes(optimizer: OptimizerSpec, shapes: list[tuple[int, ...]], param_bytes: int,
                           device: str) -> int:
    """The optimizer update's largest temporary, for the implementation `lowmem.train.optim` runs on `device`.

    On CUDA AdamW and SGD run fused (`fused=True`): one kernel per group, no temporary (measured 0 bytes on
    fake CUDA, tests/train/test_cuda_optim.py; torch's default foreach path would allocate one the size of all
    the parameters: +1.32 GiB on llama3.2-1b full bf16). Adafactor has no fused kernel and steps one tensor at a
    time: about two of the largest tensor. On the CPU torch's single-tensor path makes one parameter-sized
    temporary (the denominator) at a time.
    """
    largest = max((_numel(s) for s in shapes), default=0) * param_bytes
    if device == "cuda" and isinstance(optimizer, AdamW | SGD) and not getattr(optimizer, "offload", False):
        return 0
    if device == "cuda" and isinstance(optimizer, Adafactor):
        return 2 * largest
    return largest


def optimizer_state_bytes(optimizer: OptimizerSpec, shapes: list[tuple[int, ...]], param_bytes: int) -> int:
    """Bytes of optimizer state for trainable parameters of these shapes, in a dtype of `param_bytes` bytes.

    Counted as the optimizer builds it (`lowmem.train.optim`, whose docstring says which tensors each low-bit
    backend quantizes); tests/train/test_optim.py measures it after one step. torch's AdamW, Adafactor and
    torchao keep a 0-d fp32 `step` tensor per parameter.
    """
    if isinstance(optimizer, AdamW):
        return sum(2 * _numel(s) * param_bytes + FP32 for s in shapes)  # exp_avg, exp_avg_sq, step
    if isinstance(optimizer, SGD):
        return sum(_numel(s) for s in shapes) * param_bytes if optimizer.momentum > 0 else 0
    if isinstance(optimizer, Adafactor):
        return sum(_adafactor_bytes(s, param_bytes) + FP32 for s in shapes)
    if isinstance(optimizer, AdamW8bit) and optimizer.backend == "bitsandbytes":
        return _bitsandbytes_8bit_bytes(shapes)
    if isinstance(optimizer, AdamW8bit):
        return sum(_torchao_bytes(_numel(s), param_bytes, 8, block=256) + FP32 for s in shapes)
    if isinstance(optimizer, AdamW4bit):
        return sum(_torchao_bytes(_numel(s), param_bytes, 4, block=128) + FP32 for s in shapes)
    raise AssertionError(f"unhandled optimizer {type(optimizer).__name__}")


def _adafactor_bytes(shape: tuple[int, ...], param_bytes: int) -> int:
    """torch Adafactor's second moment: row and column means over the last two dims, else the full tensor."""
    if len(shape) < 2:
        return _numel(shape) * param_bytes
    *lead, n_rows, n_cols = shape
    return _numel(tuple(lead)) * (n_rows + n_cols) * param_bytes


def _bitsandbytes_8bit_bytes(shapes: list[tuple[int, ...]]) -> int:
    """bitsandbytes AdamW8bit: tensors under 4096 elements keep two fp32 moments; larger ones two uint8
    moments and an fp32 absmax per (possibly partial) 256-element block each, plus two 256-entry fp32
    quantization maps shared by all parameters."""
    total = 0
    for shape in shapes:
        n = _numel(shape)
        total += 2 * n * FP32 if n < 4096 else 2 * n + 2 * math.ceil(n / 256) * FP32
    quantized = any(_numel(s) >= 4096 for s in shapes)
    return total + (2 * 256 * FP32 if quantized else 0)


def _torchao_bytes(n: int, param_bytes: int, bits: int, block: int) -> int:
    """torchao low-bit AdamW moments of one n-element tensor: quantized only when n >= 4096 and n is a multiple
    of the block size (codes, an fp32 scale per block and a 2**bits-entry fp32 map, per moment), else two
    tensors in the parameter's dtype."""
    if n < 4096 or n % block:
        return 2 * n * param_bytes
    return 2 * (n * bits // 8 + n // block * FP32 + 2**bits * FP32)


class Trainable(msgspec.Struct, frozen=True, kw_only=True):
    """Which parameters train, as the activation count needs it: everything, or adapters on some projections."""

    full: bool
    adapted: tuple[str, ...] = ()  # short projection names with adapters: wq wk wv wo w1 w2 w3
    rank: int = 0
    dropout: bool = False
    dora: bool = False

    def trains(self, projection: str) -> bool:
        return self.full or projection in self.adapted


FULL = Trainable(full=True)


# ---------------------------------------------------------------------------------------------------------
# Mixture of experts (Qwen3-MoE, `lowmem.nn.moe`). The expert weights are in `param_shapes` (router (E, D),
# experts stacked as (E * Fe, D) and (E * D, Fe)), so parameters, gradients, optimizer states and NF4 count
# them like any weight. Activations are per routed row: N tokens x top-k rows go through the experts.

# How many routed rows the experts hold per (token, chosen expert): 1.0, i.e. the planner assumes load
# imbalance costs no memory. Reason: `lowmem.nn.moe` sorts the routed rows by expert and each expert computes
# exactly the rows it got, with no capacity buffer, padding or dropped tokens (unlike Switch / GShard's
# capacity factor of 1.25-2), so an unbalanced router moves rows between experts and leaves their sum at
# N x k; measured equal for a balanced and a collapsed router (tests/plan/test_moe_estimate.py). Imbalance
# does cost time on a GPU (the busiest expert's GEMM is the longest), which this estimate does not model.
MOE_LOAD_IMBALANCE = 1.0
INDEX_BYTES = 8  # int64 indices autograd keeps for a gather / scatter


def _sample_layer(cfg: ModelConfig) -> int:
    """The layer the per-block estimates describe: the first sparse one where there is one (its routed
    activations are what the block formulas add), else layer 0. Mixed models are estimated as all sparse."""
    return next((i for i in range(cfg.n_layers) if cfg.is_moe_layer(i)), 0)


def adapter_dims(cfg: ModelConfig, target: str, layer: int | None = None) -> tuple[int, int, int]:
    """(d_out, d_in, rows_per_token) of the projection `target` adapts in `layer` (default `_sample_layer`):
    for a sparse layer's experts d_out is one expert's and each token passes top-k rows, else 1."""
    layer = _sample_layer(cfg) if layer is None else layer
    name = target_names(cfg, (target,))[layer]
    d_out, d_in = param_shapes(cfg)[name]
    if ".moe." in name:
        return d_out // cfg.n_experts, d_in, cfg.n_experts_per_token
    return d_out, d_in, 1


def adapter_shapes(cfg: ModelConfig, target: str, layer: int, rank: int, dora: bool) -> list[tuple[int, ...]]:
    """The adapter tensors' shapes on `target` of `layer`: A (r, in), B (out, r) (and DoRA's m (out,)); for a
    sparse layer's experts one adapter per expert, stacked: A (E * r, in), B (E * out, r)."""
    d_out, d_in, rows = adapter_dims(cfg, target, layer)
    if rows > 1:
        E = cfg.n_experts
        return [(E * rank, d_in), (E * d_out, rank)]
    return [(rank, d_in), (d_out, rank)] + ([(d_out,)] if dora else [])


def mlp_token_bytes(cfg: ModelConfig, a: int, t: Trainable) -> int:
    """Bytes per token the MLP sublayer's autograd keeps (without its norm), for `_sample_layer`.

    Dense: silu's input and output and the up projection (3 F), the normed input if w1 or w3 trains (D), the
    gated product if w2 trains (F). Sparse: the router's fp32 probabilities (softmax) and the aux loss's own
    softmax in the compute dtype (E each), the top-k indices and weights; then per routed row
    (k x `MOE_LOAD_IMBALANCE`): 3 Fe as dense, the expert output and its routing weight (the weighted sum)
    and the weighted output (index_add keeps it),
    the sort order and token index; the gathered input if w1 or w3 trains (D), the product if w2 trains (Fe),
    and the normed input once if the router trains (full fine-tuning). A frozen expert's grouped GEMM keeps
    only its weight (measured: `torch._grouped_mm` saves its input only for the weight's gradient).
    """
    D, F = cfg.dim, cfg.ffn_dim
    w13, w2 = t.trains("w1") or t.trains("w3"), t.trains("w2")
    if not cfg.is_moe_layer(_sample_layer(cfg)):
        return 3 * F * a + (D * a if w13 else 0) + (F * a if w2 else 0)
    k, E, Fe = cfg.n_experts_per_token, cfg.n_experts, cfg.expert_ffn_dim
    router = E * (FP32 + a) + k * (INDEX_BYTES + FP32) + (D * a if t.full else 0)
    per_row = 3 * Fe * a + 2 * D * a + a + 2 * INDEX_BYTES + (D * a if w13 else 0) + (Fe * a if w2 else 0)
    return router + int(k * MOE_LOAD_IMBALANCE * per_row)


def block_activation_bytes(cfg: ModelConfig, n_tokens: int, batch: int, precision: str, packed: bool,
                           trainable: Trainable = FULL, kernel: str = "sdpa") -> int:
    """Bytes autograd saves for one transformer block without checkpointing (input included).

    Counted from the block's saved tensors (verified with saved_tensors_hooks), per token: the block input and
    the attention residual (2 D, always: the norms need them for the gradient of their input); per RMSNorm an
    fp32 upcast when not fp32, its normalized output (only if the norm weight trains) and its scaled output
    (only if a projection reading it trains); q after RoPE and k, v expanded to all query heads (3 Q, SDPA's
    inputs) and the attention output re-laid out for wo (Q, only if wo trains); silu's input, its output and
    the up projection (3 F) and their product (F, only if w2 trains); two fp32 rstd and the per-head
    logsumexp. A frozen projection saves nothing (its weight needs no gradient). Each adapter saves A x
    (rank), its dropout output and mask (if dropout), and for DoRA the base and adapter outputs (2 x out).
    With packed documents SDPA also keeps the mask as an additive (B, 1, T, T) tensor.

    `kernel` is the plan's attention kernel. "sdpa" (the CPU's) as above; a CUDA kernel's saved tensors (q, k, v,
    its output, which is wo's input, and the logsumexp) are `lowmem.nn.llama.attention_saved_bytes`, measured
    exactly on fake CUDA: varlen keeps no mask; the memory-efficient kernel's additive bias is one tensor all
    layers share, except under mixed precision, where each layer keeps its own copy in the compute dtype.
    """
    a = DTYPE_BYTES[precision]
    D, Q, H = cfg.dim, cfg.n_heads * cfg.head_dim, cfg.n_heads
    t = trainable
    upcast = D * FP32 if a != FP32 else 0
    norm_out = D * a if t.full else 0
    # the block input and the attention residual are saved by the norms as themselves in fp32; below fp32 the
    # norms save their fp32 upcasts instead (counted in `upcast`) and RoPE saves its cos/sin cast to the
    # compute dtype for q and k (4 head_dim vectors)
    residuals = 2 * D * a if a == FP32 else 4 * cfg.rotary_dim * a
    cuda_kernel = kernel != "sdpa"
    attention = 0 if cuda_kernel else 3 * Q * a + H * FP32 + (Q * a if t.trains("wo") else 0)
    per_token = residuals + attention + 2 * FP32
    per_token += upcast + norm_out + (D * a if any(t.trains(n) for n in ("wq", "wk", "wv")) else 0)
    per_token += upcast + norm_out + mlp_token_bytes(cfg, a, t)
    per_token += qk_norm_bytes_per_token(cfg, a, t)
    for name in t.adapted:
        d_out, d_in, rows = adapter_dims(cfg, name)  # rows: top-k routed rows per token on experts
        per_token += rows * (t.rank * a + (d_in * (a + 1) if t.dropout else 0) + (2 * d_out * a if t.dora else 0))
    seq_len = n_tokens // batch
    if cuda_kernel:
        from lowmem.nn.llama import attention_mask_bytes, attention_saved_bytes

        saved = attention_saved_bytes(kernel, batch, seq_len, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, a)
        own_mask = packed and kernel == "sdpa-efficient" and precision == "mixed-bf16"
        return n_tokens * per_token + saved + (attention_mask_bytes(kernel, batch, seq_len, a) if own_mask else 0)
    mask = batch * seq_len * seq_len * a if packed else 0
    return n_tokens * per_token + mask


def qk_norm_bytes_per_token(cfg: ModelConfig, a: int, trainable: Trainable = FULL) -> int:
    """Bytes per token the q and k RMSNorms save in one block (Qwen3, Qwen3-MoE, Gemma 3: per head; OLMo 2: whole projection).

    Each saves its input (the projection's output, as itself in fp32, else its fp32 upcast), its normalized
    output when its weight trains (in the compute dtype; in fp32 where the weight multiplies in fp32: OLMo 2,
    Gemma's 1 + w), and an fp32 rstd per normalized row (per head, or one per projection). Measured with
    saved_tensors_hooks (tests/plan/test_family_memory.py). 0 without q/k norms.
    """
    if cfg.qk_norm is None:
        return 0
    width = (cfg.n_heads + cfg.n_kv_heads) * cfg.head_dim  # q and k
    normalized_bytes = FP32 if cfg.norm_scale_fp32 or cfg.norm_unit_offset else a
    rows = cfg.n_heads + cfg.n_kv_heads if cfg.qk_norm == "head" else 2
    return width * FP32 + (width * normalized_bytes if trainable.full else 0) + rows * FP32


def selective_block_bytes(cfg: ModelConfig, n_tokens: int, batch: int, precision: str,
                          trainable: Trainable = FULL) -> int:
    """Bytes one block keeps under selective checkpointing: its input and the outputs of its matmuls and SDPA.

    `lowmem.train.strategies.SAVED_OPS`: every projection's matmul output (q, k, v, wo, w1, w3, w2; frozen ones
    too: the policy looks at ops, not at what trains), each adapter's two matmul outputs (rank, out), DoRA's
    B @ A product (a weight-sized (out, in) matrix per adapted weight, made for the row norm), and SDPA's output
    with its fp32 per-head logsumexp. Everything elementwise (norms, RoPE, SiLU, the gating product, GQA's
    repeated heads, the mask) is recomputed. Checked against `LiveTensorTracker` (tests/plan/test_estimate.py).
    """
    a = DTYPE_BYTES[precision]
    D, Q, F, H = cfg.dim, cfg.n_heads * cfg.head_dim, cfg.ffn_dim, cfg.n_heads
    KV = cfg.n_kv_heads * cfg.head_dim
    per_token = D * a  # the input
    per_token += (Q + 2 * KV + D) * a  # wq wk wv wo
    # w1 w3 w2; a sparse layer's router (its experts' grouped GEMMs are no mm: recomputed)
    per_token += cfg.n_experts * a if cfg.is_moe_layer(_sample_layer(cfg)) else (2 * F + D) * a
    per_token += Q * a + H * FP32  # SDPA output and logsumexp
    weight_sized = 0
    for name in trainable.adapted:
        d_out, d_in, rows = adapter_dims(cfg, name)
        per_token += 0 if rows > 1 else (trainable.rank + d_out) * a  # expert adapters: grouped, recomputed
        weight_sized += d_out * d_in * a if trainable.dora else 0
    return n_tokens * per_token + weight_sized


def activation_bytes(cfg: ModelConfig, strategies: Strategies, n_tokens: int, batch: int, packed: bool = True,
                     trainable: Trainable = FULL, sharded: bool = False) -> int:
    """Activations alive at the start of backward.

    `sharded` (FSDP2): mixed precision gathers a block's weights in the compute dtype (`MixedPrecisionPolicy`)
    and FSDP frees them after the block's forward, so no low-precision weight copy is held (`cast_copy_bytes`).
    """
    a = DTYPE_BYTES[strategies.precision]
    seq_len = n_tokens // batch
    block = block_activation_bytes(cfg, n_tokens, batch, strategies.precision, packed, trainable,
                                   strategies.attention_kernel)
    block += 0 if sharded else cast_copy_bytes(cfg, strategies.precision, trainable)
    # final RMSNorm (input, normalized if its weight trains, scaled) + the bool document mask + the fp32 RoPE
    # tables
    final_norm = (3 if trainable.full else 2) * cfg.dim * a + FP32
    shared = n_tokens * final_norm + (batch * seq_len * seq_len if packed else 0)
    # the fp32 cos/sin tables of each distinct RoPE (Gemma 3: a local and a global one), which RoPE saves as views
    # when it computes in fp32; below fp32 it saves casts instead (a block's `residuals`) and the tables go
    n_ropes = len({cfg.layer_rope(i) for i in range(cfg.n_layers)} - {None})
    if a == FP32 or cfg.rope_fp32:
        shared += n_ropes * 2 * n_tokens * cfg.rotary_dim * FP32
    if a != FP32:
        shared += n_tokens * cfg.dim * FP32  # hidden upcast to fp32 for the loss
    if strategies.activation_checkpointing == "selective":
        return cfg.n_layers * selective_block_bytes(cfg, n_tokens, batch, strategies.precision, trainable) + shared
    n_ckpt = checkpointed_layers(cfg, strategies)  # these keep only their input
    return n_ckpt * n_tokens * cfg.dim * a + (cfg.n_layers - n_ckpt) * block + shared


def offloaded_activation_bytes(cfg: ModelConfig, strategies: Strategies, n_tokens: int, batch: int,
                               packed: bool = True, trainable: Trainable = FULL) -> int:
    """Bytes of saved activations that activation offloading holds in pinned host memory at the start of backward.

    The cap is the plan's `offload_max_host_bytes`; everything past it stays on the device. Approximations: the
    tensors every block shares and the final norm's (the shared part of `activation_bytes`) are counted on the
    device, although they move too. Norm statistics and other tensors under the size threshold (a few bytes a
    token) are counted as moved, although they stay.
    """
    if not strategies.activation_offloading:
        return 0
    return min(movable_activation_bytes(cfg, strategies, n_tokens, batch, packed, trainable),
               strategies.offload_max_host_bytes)


def movable_activation_bytes(cfg: ModelConfig, strategies: Strategies, n_tokens: int, batch: int,
                             packed: bool = True, trainable: Trainable = FULL) -> int:
    """Bytes of saved block activations that offloading can move out, with no host budget.

    Under the hooks (`lowmem.train.offload`) a block saves everything autograd keeps. A checkpointed block (full,
    every-k, selective) saves only its input. All of it moves except about one block's worth, which is counted
    on the device: the last block's copies are still running when backward starts, and in backward each saved
    tensor is fetched back one ahead of its use.
    """
    block = (block_activation_bytes(cfg, n_tokens, batch, strategies.precision, packed, trainable,
                                   strategies.attention_kernel)
             + cast_copy_bytes(cfg, strategies.precision, trainable))
    n_ckpt = checkpointed_layers(cfg, strategies)
    per_layer = [n_tokens * cfg.dim * DTYPE_BYTES[strategies.precision]] * n_ckpt + [block] * (cfg.n_layers - n_ckpt)
    return sum(per_layer) - max(per_layer)


def checkpointed_layers(cfg: ModelConfig, strategies: Strategies) -> int:
    """How many blocks activation checkpointing recomputes (in part, for selective): none, the first n, every
    k-th, or all."""
    return sum(checkpointed(strategies.activation_checkpointing, i) for i in range(cfg.n_layers))


def unchecked_after_last_checkpointed(cfg: ModelConfig, strategies: Strategies) -> int:
    """How many blocks come after the last checkpointed one: backward runs them (and frees what they saved)
    before it recomputes any block. L - n for first-n; 0 for full, selective and off."""
    value = strategies.activation_checkpointing
    last = max((i for i in range(cfg.n_layers) if checkpointed(value, i)), default=cfg.n_layers - 1)
    return cfg.n_layers - 1 - last


def recompute_bytes(cfg: ModelConfig, strategies: Strategies, n_tokens: int, batch: int, packed: bool = True,
                    trainable: Trainable = FULL, sharded: bool = False) -> int:
    """Extra bytes while one checkpointed block is recomputed in backward (zero without checkpointing)."""
    if checkpointed_layers(cfg, strategies) == 0:
        return 0
    a = DTYPE_BYTES[strategies.precision]
    # the recomputed block's activations plus the (N, D) gradients alive around it: the incoming gradient, the
    # residual branches' gradients and their sum; 5 of them fitted against the traced step (lowmem plan
    # --trace) on quickstart-5m, full and LoRA, with and without the fused loss: within 4%
    block = block_activation_bytes(cfg, n_tokens, batch, strategies.precision, packed, trainable,
                                   strategies.attention_kernel)
    if not sharded:  # the recomputed block's weight copies (FSDP: its gathered weights, see `fsdp_bytes`)
        block += cast_copy_bytes(cfg, strategies.precision, trainable)
    if strategies.activation_checkpointing == "selective":
        # the recompute reuses the block's kept outputs (counted in `activation_bytes`) instead of making them
        # again; fitted against the traced step: within 1.5% of the peak on tiny (2 layers) and quickstart-5m (6)
        block -= selective_block_bytes(cfg, n_tokens, batch, strategies.precision, trainable)
    return block + 5 * n_tokens * cfg.dim * a


def logits_bytes(cfg: ModelConfig, strategies: Strategies, n_tokens: int, trainable: Trainable = None) -> int:
    """Peak bytes the loss holds beyond its inputs (see `lowmem.nn.loss.loss_peak_bytes` for the derivation)."""
    head_trains = trainable is None or trainable.full
    return loss_peak_bytes(strategies.cross_entropy, n_tokens, cfg.vocab_size, cfg.dim,
                           head_bytes(strategies.precision, head_trains), weight_grad=head_trains,
                           projection_bytes=4 if strategies.projection_dtype == "fp32" else 2)


def head_bytes(precision: str, head_trains: bool) -> int:
    """Bytes per element of the loss's inputs: the output head's dtype (a trained fp32 master under mixed
    precision, whose final norm then also returns fp32 hidden states; else the compute dtype)."""
    return MASTER_BYTES[precision] if head_trains else DTYPE_BYTES[precision]


def batch_bytes(n_tokens: int) -> int:
    """The batch tensors: token ids, labels, positions and document ids, int64."""
    return 4 * n_tokens * 8


class ShardedBytes(NamedTuple):
    """One process's bytes under FSDP2 (`fsdp_bytes`)."""

    params: int  # its shard of every tensor
    gradients: int  # its shard of every trainable tensor's gradient
    optimizer_state: int  # the optimizer's state of its trainable shards
    update_temp: int  # the update's temporary for its largest trainable shard
    gathered: int  # full weights alive beside the shards in forward/backward: the root's and one block's
    gathered_in_recompute: int  # the same while a block is recomputed: the root's and two blocks'
    largest_unit_shard: int  # the larger of the root's and one block's shards (fsdp_cpu_offload: in transit)


def fsdp_bytes(cfg: ModelConfig, strategies: Strategies, optimizer: OptimizerSpec,
               trainable_shapes: list[tuple[int, ...]], trainable: Trainable, world_size: int) -> ShardedBytes:
    """Per-process bytes of parameters, gradients and optimizer state when FSDP2 shards them over `world_size`.

    `lowmem.train.distributed.shard`: every tensor is split on dim 0 into `world_size` row blocks, padded to
    equal ones (ceil(rows / N) rows each); the optimizer sees only this process's shards, gradients are
    reduce-scattered into shards. Full weights exist only for the units being computed: the root (embeddings,
    final norm, output head) from its forward to the end of backward (`reshard_after_forward=False`), and a
    block while it runs. Measured on the tiny preset under torchrun (tests/train/test_distributed.py), the peak
    at the start of backward holds the root's full weights and one block's: the last block's all-gather, which
    FSDP prefetches when the root's backward begins. Recomputing a block (activation checkpointing) holds it and
    the block before it (prefetched) gathered.
    """
    wb = weight_bytes(strategies.precision)
    base_b = wb if trainable.full else DTYPE_BYTES[strategies.precision]
    shapes = param_shapes(cfg)
    per_block_adapters = len(trainable_shapes) // cfg.n_layers if not trainable.full else 0
    quantized = set()
    if strategies.nf4_block_size:
        from lowmem.nn.quant import nf4_bytes, quantized_names  # imports torchao: only when planning QLoRA

        quantized = set(quantized_names(cfg, TARGETS))

    def shard(shape: tuple[int, ...]) -> tuple[int, ...]:
        return (-(-shape[0] // world_size), *shape[1:])

    def full_bytes(name: str, b: int = base_b) -> int:  # a tensor gathered whole; NF4 storages if quantized
        if name in quantized:
            return nf4_bytes(_numel(shapes[name]), strategies.nf4_block_size, strategies.nf4_scaler_block_size,
                             param_bytes=base_b)
        return _numel(shapes[name]) * b

    def shard_bytes(name: str) -> int:  # an NF4 weight splits its codes, scales and factors evenly (torchao)
        return -(-full_bytes(name) // world_size) if name in quantized else _numel(shard(shapes[name])) * base_b

    params = sum(shard_bytes(n) for n in shapes)
    if not trainable.full:  # adapters, in the master dtype
        params += sum(_numel(shard(s)) for s in trainable_shapes) * wb
    trainable_shards = [shard(s) for s in trainable_shapes]
    root = sum(full_bytes(n) for n in shapes if not n.startswith("layers."))
    # a block is gathered in the compute dtype under mixed precision (`distributed.shard`'s MixedPrecisionPolicy)
    gather_b = DTYPE_BYTES[strategies.precision]
    block = sum(full_bytes(n, gather_b) for n in shapes if n.startswith("layers.0."))
    block += sum(_numel(s) for s in trainable_shapes[:per_block_adapters]) * gather_b  # block 0's adapters
    return ShardedBytes(
        params=params,
        gradients=sum(_numel(s) for s in trainable_shards) * wb,
        optimizer_state=optimizer_state_bytes(optimizer, trainable_shards, wb),
        update_temp=max((_numel(s) for s in trainable_shards), default=0) * wb,
        gathered=root + block,
        gathered_in_recompute=root + 2 * block,
        largest_unit_shard=max(sum(shard_bytes(n) for n in shapes if not n.startswith("layers.")),
                               sum(shard_bytes(n) for n in shapes if n.startswith("layers.0."))),
    )


def host_optimizer_split(optimizer: OptimizerSpec, shapes: list[tuple[int, ...]]
                         ) -> tuple[list[tuple[int, ...]], list[tuple[int, ...]]]:
    """The trainable shapes stepped on the host and those stepped on the device.

    Without `optimizer.offload` every shape is stepped on the device. With it, torchao's CPUOffloadOptimizer
    steps tensors of CPU_OFFLOAD_MIN_NUMEL elements or more on the host.
    """
    if not (isinstance(optimizer, AdamW) and optimizer.offload):
        return [], list(shapes)
    return ([s for s in shapes if _numel(s) >= CPU_OFFLOAD_MIN_NUMEL],
            [s for s in shapes if _numel(s) < CPU_OFFLOAD_MIN_NUMEL])


def host_optimizer_components(optimizer: OptimizerSpec, shapes: list[tuple[int, ...]], param_bytes: int
                              ) -> tuple[Component, ...]:
    """Pinned host memory of `optimizer.offload`. For each tensor the host steps, torchao allocates a master copy
    and a gradient buffer up front, both in the parameter's dtype, and AdamW keeps its states there."""
    host, _ = host_optimizer_split(optimizer, shapes)
    if not host:
        return ()
    n = sum(_numel(s) for s in host)
    return (
        Component(name="parameters", bytes=n * param_bytes, note=f"copies of the {len(host)} tensors the host steps"),
        Component(name="gradients", bytes=n * param_bytes, note="copied from the device as backward makes them"),
        Component(name="optimizer_state", bytes=optimizer_state_bytes(optimizer, host, param_bytes),
                  note="AdamW on the host (torchao CPUOffloadOptimizer)"),
    )


def host_optimizer_seconds(optimizer: OptimizerSpec, shapes: list[tuple[int, ...]], precision: str,
                           hw: HardwareProfile) -> float:
    """Seconds that `optimizer.offload` adds to each optimizer step.

    This is the host AdamW step, plus copying the updated weights back over PCIe before the next forward. The
    gradients' copies overlap backward and are not counted.
    """
    host, _ = host_optimizer_split(optimizer, shapes)
    if not host:
        return 0.0
    assert hw.device == "cuda", "the planner refuses optimizer.offload without a CUDA device"
    n_bytes = sum(_numel(s) for s in host) * weight_bytes(precision)
    return 7 * n_bytes / HOST_ADAMW_BYTES_PER_S + n_bytes / hw.pcie_bytes_per_s


def fsdp_offload_seconds(cfg: ModelConfig, strategies: Strategies, train: TrainSpec, optimizer: OptimizerSpec,
                         trainable_shapes: list[tuple[int, ...]], trainable: Trainable, world_size: int,
                         hw: HardwareProfile) -> float:
    """Seconds that `fsdp_cpu_offload` adds to one optimizer step of one process.

    Per micro-batch every unit's parameter shards cross PCIe before its forward all-gather and again before
    its backward one, and the gradient shards come back; then the host steps the optimizer over the trainable
    shards (memory-bound: HOST_ADAMW_BYTES_PER_S). Counted as not hidden behind compute: FSDP overlaps the
    copies with other units' work only in part.
    """
    if not strategies.fsdp_cpu_offload:
        return 0.0
    sharded = fsdp_bytes(cfg, strategies, optimizer, trainable_shapes, trainable, world_size)
    per_micro_batch = (2 * sharded.params + sharded.gradients) / hw.pcie_bytes_per_s
    return train.grad_accum * per_micro_batch + 7 * sharded.gradients / HOST_ADAMW_BYTES_PER_S


def estimate_memory(
    cfg: ModelConfig, strategies: Strategies, train: TrainSpec, optimizer: OptimizerSpec,
    trainable_shapes: list[tuple[int, ...]], trainable: Trainable = FULL, world_size: int = 1,
    device: str = "cpu",
) -> MemoryReport:
    """Predicted peak live bytes of a training step, by component, with the phase where it falls.

    These phases can hold the peak: the start of backward (all activations and the loss tensors alive), the final
    norm's backward and, under partial checkpointing, the last block's (all activations and the gradients flowing
    back), a checkpointed block's recompute inside backward, and the optimizer step (all gradients alive plus the
    update's temporaries). With `world_size` > 1 the bytes are one process's under FSDP2 (`fsdp_bytes`): `train.micro_batch`
    is per process, so activations are not divided. Offloaded activations and a host optimizer's tensors are
    counted in `MemoryReport.host`, not on the device.
    """
    step = step_bytes(cfg, strategies, train, optimizer, trainable_shapes, trainable, world_size, device)
    phases = [_backward_start(step), _optimizer_step(step, strategies.optimizer_in_backward),
              _final_norm_backward(step)]
    if step.last_block_grads:
        phases.append(_last_block_backward(step))
    if step.recompute:
        phases.append(_block_recompute(step))
    # the largest; on a tie the earlier in `phases` (a recompute peak must exceed both others to be the peak)
    return max(phases, key=lambda report: report.peak_bytes)


def cuda_overheads(peak_bytes: int, hw: HardwareProfile, world_size: int = 1) -> tuple[Component, ...]:
    """What a CUDA process holds beside `peak_bytes` of live tensors (`MemoryReport.overheads`); none on a CPU.

    cuBLAS's workspaces and the allocator's slack are inside torch's views (max_memory_allocated, _reserved); the
    context and, with `world_size` > 1, NCCL's buffers are outside them. The constants above give the sources.
    """
    if hw.device != "cuda":
        return ()
    major = int(hw.compute_capability.split(".")[0]) if hw.compute_capability else 9  # unknown: the larger
    per_handle = CUBLAS_WORKSPACE_BYTES_SM90 if major >= 9 else CUBLAS_WORKSPACE_BYTES_OLDER
    cublas = CUBLAS_HANDLES * per_handle
    lines = (
        Component(name="cublas_workspace", bytes=cublas,
                  note=f"{CUBLAS_HANDLES} handles x {format_bytes(per_handle)} (torch's "
                       f"{'sm90+' if major >= 9 else 'pre-sm90'} default)"),
        Component(name="allocator_slack", bytes=int(ALLOCATOR_SLACK * (peak_bytes + cublas)),
                  note=f"{ALLOCATOR_SLACK:.0%} of allocated: allocator rounding, fragmentation"),
        Component(name="cuda_context", bytes=CUDA_CONTEXT_BYTES,
                  note="context and kernels, outside torch's allocator (0.3-0.45 GiB bare)"),
    )
    if world_size == 1:
        return lines
    return lines + (Component(name="nccl_buffers", bytes=NCCL_CHANNELS * NCCL_BYTES_PER_CHANNEL,
                              note=f"{NCCL_CHANNELS} channels x {format_bytes(NCCL_BYTES_PER_CHANNEL)} of FIFOs, "
                                   "outside torch's allocator"),)


def with_cuda_overheads(report: MemoryReport, hw: HardwareProfile, world_size: int = 1) -> MemoryReport:
    """`report` with its CUDA overhead lines (`cuda_overheads`); unchanged on a CPU."""
    if hw.device != "cuda":
        return report
    return msgspec.structs.replace(report, overheads=cuda_overheads(report.peak_bytes, hw, world_size))


# What a CPU process holds in RSS beyond its live tensors: the lines of `MemoryReport.overheads` for a CPU plan, so
# that the budget bounds the process's RSS (issue #16). The view is what a run adds to a process whose libraries
# are loaded: `execute` imports what the plan needs first (lowmem.train.strategies.load_libraries: torch._dynamo,
# which torch.optim imports, 70-90 MiB; torchao, bitsandbytes), then takes its baseline. benchmarks/host_overhead.py
# (results/host_overhead.md) measured that baseline's peak - the tracked tensor peak for quickstart-5m, seven
# configurations, torch 2.13.0+cpu, 1 thread. With every allocation of 1 MiB or more returned to the system
# (glibc, M_MMAP_THRESHOLD 1 MiB), 49-75 MiB stayed: thread pools, kernel workspaces, Python objects, the data
# loader, small tensors' heap. The runtime line, by torch version (1 and 2 threads measured within 4 MiB of each
# other before, more threads not measured):
CPU_RUNTIME_BYTES = {"2.13": 80 * MiB}
# On glibc's allocator as it comes (host_allocator "system": no C++ compiler here, or the user's choice) its heap
# held 2-178 MiB more than that: after a large free glibc's dynamic mmap threshold rises (to 32 MiB at most), so
# later step tensors come from the heap, which fragments and keeps what it frees. Up to 2.8x the step's transient
# tensors (everything but parameters, gradients and optimizer states: LoRA with checkpointing, 178 MiB of 63) and
# never past 180 MiB (tensors above 32 MiB are always mapped, and returned when freed).
HEAP_RETAINED_SHARE = 3.0
HEAP_RETAINED_MAX = 180 * MiB
# lowmem's caching allocator (lowmem.hostmem, host_allocator "caching", the CPU default) maps every tensor of 1 MiB
# or more rounded up to one of 8 size classes per power of two (at most 1/8 more) and keeps it for reuse when
# freed: RSS holds the live tensors plus the rounding and the blocks idle in classes not in use at the peak. The
# same runs measured 9-35 MiB beyond the returned rows (QLoRA 35 MiB of ~200 transient; the mixed-bf16 quickstart
# ran 2.5% past a 12.5% line): the line is 20% of the transient tensors, at least ALLOCATOR_CACHE_MIN (the idle
# blocks of the small configurations).
ALLOCATOR_CACHE_SHARE = 0.2
ALLOCATOR_CACHE_MIN = 24 * MiB
PERSISTENT = ("parameters", "gradients", "optimizer_state")


def cpu_overheads(report: MemoryReport, host_allocator: str = "system") -> tuple[Component, ...]:
    """What a CPU process holds in RSS beside `report`'s live tensors: the runtime, and what the allocator keeps
    (glibc's retained heap, or the caching allocator's rounding and idle blocks)."""
    version, measured = _torch_minor(), max(CPU_RUNTIME_BYTES)
    runtime = CPU_RUNTIME_BYTES.get(version, CPU_RUNTIME_BYTES[measured])
    source = f"torch {version}" if version in CPU_RUNTIME_BYTES else f"measured for torch {measured}, not {version}"
    transient = max(report.peak_bytes - sum(c.bytes for c in report.components if c.name in PERSISTENT), 0)
    if host_allocator == "caching":
        kept = Component(name="allocator_cache", bytes=max(int(ALLOCATOR_CACHE_SHARE * transient), ALLOCATOR_CACHE_MIN),
                         note=f"lowmem's caching allocator: size-class rounding ({ALLOCATOR_CACHE_SHARE:.0%} of the "
                              f"transient tensors) and idle blocks, at least {format_bytes(ALLOCATOR_CACHE_MIN)}")
    else:
        kept = Component(name="heap_retained", bytes=min(int(HEAP_RETAINED_SHARE * transient), HEAP_RETAINED_MAX),
                         note=f"glibc's heap keeps freed step tensors: {HEAP_RETAINED_SHARE:g}x the transient ones, "
                              f"at most {format_bytes(HEAP_RETAINED_MAX)}")
    return (
        Component(name="runtime", bytes=runtime,
                  note=f"threads, kernel workspaces, Python ({source}, 1-2 threads: benchmarks/host_overhead.py)"),
        kept,
    )


def _torch_minor() -> str:
    """The installed torch's major.minor, read from its package metadata (no import of torch)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return ".".join(version("torch").split(".")[:2])
    except PackageNotFoundError:
        return "unknown"


def with_overheads(report: MemoryReport, hw: HardwareProfile, world_size: int = 1,
                   host_allocator: str = "system") -> MemoryReport:
    """`report` with what the process holds beyond its tensors: CUDA's lines (`cuda_overheads`) or the CPU's
    (`cpu_overheads`, for the plan's `host_allocator`), so that `device_bytes` is what nvidia-smi or the
    process's RSS shows."""
    if hw.device == "cuda":
        return with_cuda_overheads(report, hw, world_size)
    return msgspec.structs.replace(report, overheads=cpu_overheads(report, host_allocator))


class StepBytes(NamedTuple):
    """One process's bytes per component in a training step, which the phases of `estimate_memory` add up."""

    params: int  # on the device (NF4 storages where quantized; one shard under FSDP)
    params_note: str
    gathered: int  # full weights FSDP holds beside the shards at the start of backward
    gathered_in_recompute: int  # the same while a block is recomputed
    grads: int  # every gradient the device holds at the optimizer step
    grads_note: str
    grads_in_backward: int  # gradients alive during backward: earlier micro-batches' (or pieces') accumulated
    head_grad: int  # the output head's gradient, made before any block is recomputed
    # gradients of blocks 1..L-1, all made (and kept for the optimizer step) before block 0 is recomputed: 0 when
    # the gradients are full-sized already (accumulation) or freed as they are made (optimizer in backward)
    later_block_grads: int
    later_block_acts: int  # saved activations of blocks 1..L-1, freed by the time block 0 is recomputed
    # what the blocks after the last checkpointed one saved (freed before the first recompute; 0 when offloaded,
    # as they then wait in host memory), and the gradients their backward made by then
    after_last_acts: int
    after_last_grads: int
    flowing_grads: int  # the (N, D) gradients alive in the final norm's backward, once the loss's are freed
    last_block_grads: int  # those alive in the last block's backward under partial checkpointing (else 0)
    largest_grad: int  # the largest trainable tensor's gradient (optimizer in backward keeps about one)
    opt: int
    opt_note: str
    acts: int  # saved activations on the device at the start of backward
    acts_note: str
    recompute: int  # extra bytes while one checkpointed block is recomputed (0 without checkpointing)
    loss: int
    loss_note: str
    batch: int
    update_temp: int
    dequant_scratch: int  # NF4: one weight's dequantization for the length of one op
    host: tuple[Component, ...]  # pinned host memory beside the device's


def step_bytes(cfg: ModelConfig, strategies: Strategies, train: TrainSpec, optimizer: OptimizerSpec,
               trainable_shapes: list[tuple[int, ...]], trainable: Trainable = FULL, world_size: int = 1,
               device: str = "cpu") -> StepBytes:
    """The per-component bytes of one training step (`StepBytes`), before the phases pick the peak."""
    wb = weight_bytes(strategies.precision)
    n_trainable = sum(_numel(s) for s in trainable_shapes)
    # a split micro-batch runs `rows` rows at a time: activations and loss tensors are those of one piece
    rows = train.micro_batch // strategies.micro_batch_split
    n_tokens = rows * train.seq_len
    sharded = world_size > 1
    params, params_note, dequant_scratch = _parameter_bytes(cfg, strategies, trainable, n_trainable)
    host_shapes, device_shapes = host_optimizer_split(optimizer, trainable_shapes)
    assert not (host_shapes and sharded), "the planner refuses optimizer.offload under FSDP"
    # offload_gradients: a gradient the host steps is freed on the device once it has been copied
    grads_on_host = bool(host_shapes) and optimizer.offload_gradients
    grads = sum(_numel(s) for s in (device_shapes if grads_on_host else trainable_shapes)) * wb
    grads_note = (f"of the {len(device_shapes)} tensors the device steps x {wb} B (the others' freed once copied to "
                  "the host)" if grads_on_host else f"{n_trainable:,} trainable x {wb} B"
                  + (f", 1/{world_size} shard" if sharded else ""))
    opt_note = type(optimizer).__name__ + (f" of the {len(device_shapes)} tensors under {CPU_OFFLOAD_MIN_NUMEL:,} "
                                           "elements; the others' on the host" if host_shapes else "")
    acts_host = offloaded_activation_bytes(cfg, strategies, n_tokens, rows, trainable=trainable)
    acts = activation_bytes(cfg, strategies, n_tokens, rows, trainable=trainable, sharded=sharded) - acts_host
    host = host_optimizer_components(optimizer, trainable_shapes, wb) + ((Component(
        name="activations", bytes=acts_host, note=f"saved tensors of {format_bytes(strategies.offload_min_bytes)} or "
        f"more, at most {format_bytes(strategies.offload_max_host_bytes)} per forward (activation_offloading)"),)
        if acts_host else ())
    # gradients of earlier micro-batches (or pieces of one) are alive while later ones run forward
    accumulating = train.grad_accum > 1 or strategies.micro_batch_split > 1
    later_grads = 0 if accumulating or strategies.optimizer_in_backward else int(
        grads * _later_block_share(cfg, trainable, trainable_shapes))
    step = StepBytes(
        params=params, params_note=params_note, gathered=0, gathered_in_recompute=0, grads=grads,
        grads_note=grads_note, grads_in_backward=grads if accumulating else 0,
        # with checkpointing the loss tensors are gone by the time the last block is recomputed; by then the
        # output head's gradient exists (full size under FSDP too: the root reduces its gradients last)
        # (offload_gradients: the host steps the head, its gradient freed once copied)
        head_grad=cfg.vocab_size * cfg.dim * wb if trainable.full and not grads_on_host else 0,
        # a frozen final norm makes no weight-gradient product
        flowing_grads=(FINAL_NORM_GRADS if trainable.full else FINAL_NORM_GRADS - 1) * n_tokens * cfg.dim * FP32,
        later_block_grads=later_grads,
        **_backward_order(cfg, strategies, n_tokens, rows, trainable, sharded, later_grads),
        largest_grad=max((_numel(s) for s in trainable_shapes), default=0) * wb,
        opt=optimizer_state_bytes(optimizer, device_shapes, wb), opt_note=opt_note,
        acts=acts, acts_note=_acts_note(cfg, strategies),
        recompute=recompute_bytes(cfg, strategies, n_tokens, rows, trainable=trainable, sharded=sharded),
        loss=logits_bytes(cfg, strategies, n_tokens, trainable),
        loss_note=_loss_note(cfg, strategies, n_tokens, trainable),
        batch=batch_bytes(train.micro_batch * train.seq_len),  # the loaded micro-batch; its pieces are views
        update_temp=update_temporary_bytes(optimizer, device_shapes, wb, device),
        dequant_scratch=dequant_scratch, host=host,
    )
    if not sharded:
        return step
    return _sharded_step(step, fsdp_bytes(cfg, strategies, optimizer, trainable_shapes, trainable, world_size),
                         world_size, strategies.fsdp_cpu_offload, type(optimizer).__name__)


def _parameter_bytes(cfg: ModelConfig, strategies: Strategies, trainable: Trainable, n_trainable: int
                     ) -> tuple[int, str, int]:
    """The parameters' bytes on one device, their note, and NF4's dequantization scratch (0 without NF4)."""
    n_params = count_params(cfg)
    wb = weight_bytes(strategies.precision)
    # adapters come on top of the base; a frozen base is held in the compute dtype (it needs no fp32 master)
    base_b = wb if trainable.full else DTYPE_BYTES[strategies.precision]
    params = n_params * base_b + (0 if trainable.full else n_trainable * wb)
    note = f"{n_params:,} x {base_b} B"
    if not strategies.nf4_block_size:
        return params, note, 0
    from lowmem.nn.quant import nf4_bytes, quantized_names  # imports torchao: only when planning QLoRA

    shapes = param_shapes(cfg)
    names = quantized_names(cfg, TARGETS)
    quantized = [_numel(shapes[name]) for name in names]
    params -= sum(quantized) * base_b
    params += sum(nf4_bytes(n, strategies.nf4_block_size, strategies.nf4_scaler_block_size, param_bytes=base_b)
                  for n in quantized)
    # torchao dequantizes one NF4 weight at a time through int64 codes: about 4.8x the fp32 weight for the
    # length of one op (measured in tests/nn/test_quant.py); stacked experts are dequantized piece by piece into
    # one buffer in the compute dtype (`lowmem.nn.moe.dequantize_experts`)
    dequant_scratch = int(max(n * 4 * 4.8 if ".moe." not in name else
                              n * base_b + min(n, NF4_DEQUANT_CHUNK_ELEMENTS) * 4 * 4.8
                              for name, n in zip(names, quantized, strict=True)))
    # the projections (most of the parameters) are NF4, about half a byte each
    note = f"{n_params:,}: {sum(quantized):,} in NF4 (~0.5 B), the rest x {base_b} B"
    return params, note, dequant_scratch


def _sharded_step(step: StepBytes, sharded: ShardedBytes, world_size: int, cpu_offload: bool,
                  optimizer_name: str) -> StepBytes:
    """`step` as one of `world_size` FSDP2 processes holds it: shards, and the units gathered in full."""
    params_note = f"1/{world_size} shard of " + step.params_note
    step = step._replace(
        params=sharded.params, grads=sharded.gradients, opt=sharded.optimizer_state, update_temp=sharded.update_temp,
        gathered=sharded.gathered, gathered_in_recompute=sharded.gathered_in_recompute, params_note=params_note,
        grads_in_backward=sharded.gradients if step.grads_in_backward else 0,
        # the later blocks' gradients are reduce-scattered into shards as each block's backward ends
        later_block_grads=step.later_block_grads * sharded.gradients // max(step.grads, 1),
        after_last_grads=step.after_last_grads * sharded.gradients // max(step.grads, 1))
    if not cpu_offload:
        return step
    # the shards, their gradients and the optimizer step move to the host
    host = step.host + (
        Component(name="parameters", bytes=step.params, note=params_note + " (fsdp_cpu_offload)"),
        Component(name="gradients", bytes=step.grads, note="reduce-scattered shards, copied to the host"),
        Component(name="optimizer_state", bytes=step.opt, note=optimizer_name + " on the host"))
    # on the device: the units being gathered, each unit's shards in transit to its all-gather
    return step._replace(params=sharded.largest_unit_shard, grads=0, opt=0, update_temp=0, grads_in_backward=0,
                         later_block_grads=0, after_last_grads=0,
                         params_note="shards in host memory; one unit's in transit",
                         opt_note="on the host (fsdp_cpu_offload)", host=host)


_BATCH_NOTE = "token ids, labels, positions, document ids"


def _backward_start(step: StepBytes) -> MemoryReport:
    """The start of backward: every saved activation and the loss's tensors alive (or an NF4 dequantization)."""
    s = step
    # a dequantization in backward runs only after the loss tensors are freed: the two never coexist
    peak = s.params + s.gathered + s.opt + s.grads_in_backward + s.acts + max(s.loss, s.dequant_scratch) + s.batch
    components = (
        Component(name="parameters", bytes=s.params + s.gathered,
                  note=s.params_note + _gathered_note(s.gathered, "root and one block")),
        Component(name="gradients", bytes=s.grads_in_backward,
                  note="accumulated over micro-batches" if s.grads_in_backward else "none yet at backward start"),
        Component(name="optimizer_state", bytes=s.opt, note=s.opt_note),
        Component(name="activations", bytes=s.acts, note=s.acts_note),
        Component(name="logits", bytes=s.loss, note=s.loss_note),
        Component(name="batch", bytes=s.batch, note=_BATCH_NOTE),
    ) + ((Component(name="temporaries", bytes=max(s.dequant_scratch - s.loss, 0),
                    note="NF4 dequantization of one weight, beyond the loss tensors it replaces"),)
         if s.dequant_scratch else ())
    return MemoryReport(components=components, peak_bytes=peak, peak_phase="start of backward", host=s.host)


def _final_norm_backward(step: StepBytes) -> MemoryReport:
    """Just after the loss's backward: every saved activation, the head's gradient and the (N, D) gradients that
    the final norm's backward makes. It holds the peak when the loss's own tensors are small (fused CE)."""
    return _flowing_back(step, step.flowing_grads, f"{FINAL_NORM_GRADS} (N, D) fp32 gradients of the final norm's "
                         "backward", "final norm's backward")


def _last_block_backward(step: StepBytes) -> MemoryReport:
    """Under partial checkpointing, the last block's backward (it is not checkpointed): every saved activation
    still alive, the head's gradient, and the gradients of the block's inputs and intermediates
    (`LAST_BLOCK_BACKWARD_GRADS`)."""
    return _flowing_back(step, step.last_block_grads, "the gradients of the last block's backward",
                         "last block's backward")


def _flowing_back(step: StepBytes, flowing: int, what: str, phase: str) -> MemoryReport:
    """A phase of backward before any recompute: every saved activation, the head's gradient (or the accumulated
    ones) and `flowing` bytes of gradients on their way back."""
    s = step
    grads = max(s.grads_in_backward, s.head_grad)
    peak = s.params + s.gathered + s.opt + grads + s.acts + flowing + s.batch
    components = (
        Component(name="parameters", bytes=s.params + s.gathered,
                  note=s.params_note + _gathered_note(s.gathered, "root and one block")),
        Component(name="gradients", bytes=grads, note="output head and accumulated"),
        Component(name="optimizer_state", bytes=s.opt, note=s.opt_note),
        Component(name="activations", bytes=s.acts + flowing, note=s.acts_note + "; + " + what),
        Component(name="batch", bytes=s.batch, note=_BATCH_NOTE),
    )
    return MemoryReport(components=components, peak_bytes=peak, peak_phase=phase, host=s.host)


def _backward_order(cfg: ModelConfig, strategies: Strategies, n_tokens: int, batch: int, trainable: Trainable,
                    sharded: bool, later_grads: int) -> dict[str, int]:
    """The `StepBytes` fields that follow from the order backward meets the blocks in: what blocks 1..L-1 saved
    (freed before block 0's recompute), what the blocks after the last checkpointed one saved and the gradients
    they made (freed, and made, before the first recompute), and the last block's backward gradients under
    partial checkpointing (`LAST_BLOCK_BACKWARD_GRADS`)."""
    after_last = unchecked_after_last_checkpointed(cfg, strategies)
    if not after_last:
        last_block = 0  # the last block recomputed, or checkpointing off (the final norm's phase, fitted there)
    elif trainable.full:
        last_block = int(LAST_BLOCK_BACKWARD_GRADS["full"] * n_tokens * cfg.dim * FP32)
    else:
        last_block = int(LAST_BLOCK_BACKWARD_GRADS["adapters"] * n_tokens * cfg.dim * DTYPE_BYTES[strategies.precision])
    return {"later_block_acts": _later_block_acts(cfg, strategies, n_tokens, batch, trainable, sharded),
            "after_last_acts": 0 if strategies.activation_offloading else
            after_last * _block_bytes(cfg, strategies, n_tokens, batch, trainable, sharded),
            "after_last_grads": later_grads * after_last // max(cfg.n_layers - 1, 1),
            "last_block_grads": last_block}


def _block_recompute(step: StepBytes) -> MemoryReport:
    """A checkpointed block recomputed inside backward: its activations and gradients beside the kept inputs.

    Of the blocks recomputed the peak is at one end: the first (the last checkpointed block: every kept input
    alive, the head's gradient made, and those of the blocks after it, which have freed what they saved) or the
    last (block 0: the later blocks' inputs freed, their gradients all made). In between the bytes move linearly
    from one to the other. Gradients win for large blocks: llama3.2-1b, full
    bf16 at 4 x 2,048 tokens, makes 116 MiB of gradient per block and frees a 32 MiB input.
    """
    s = step
    made = max(s.grads_in_backward, s.head_grad)
    # the first block recomputed is the last checkpointed one: the blocks after it have run their backward, made
    # their gradients and freed what they saved
    grads, acts = made + s.after_last_grads, s.acts - s.after_last_acts + s.recompute
    last_grads, last_acts = made + s.later_block_grads, max(s.acts - s.later_block_acts, 0) + s.recompute
    at_block_0 = last_grads + last_acts > grads + acts
    if at_block_0:
        grads, acts = last_grads, last_acts
    peak = s.params + s.gathered_in_recompute + s.opt + grads + acts + s.batch
    components = (
        Component(name="parameters", bytes=s.params + s.gathered_in_recompute,
                  note=s.params_note + _gathered_note(s.gathered_in_recompute, "root and two blocks")),
        Component(name="gradients", bytes=grads, note="output head and every block but the first, as block 0 is "
                  "recomputed" if at_block_0 else "output head and accumulated"),
        Component(name="optimizer_state", bytes=s.opt, note=s.opt_note),
        Component(name="activations", bytes=acts, note="block 0 recomputed, the others' inputs freed" if at_block_0
                  else s.acts_note + ("; the blocks after the last checkpointed one freed theirs"
                                      if s.after_last_acts else "")),
        Component(name="batch", bytes=s.batch, note=_BATCH_NOTE),
    )
    return MemoryReport(components=components, peak_bytes=peak, peak_phase="block recompute in backward",
                        host=s.host)


def _optimizer_step(step: StepBytes, in_backward: bool) -> MemoryReport:
    """The optimizer step: every gradient alive with the update's temporary (in backward: about one gradient)."""
    s = step
    grads = s.grads
    if in_backward:
        # each gradient is freed right after its update: at most one full gradient (plus the one being made)
        peak = s.params + 2 * s.largest_grad + s.opt + s.update_temp
        grads = s.largest_grad
    else:
        peak = s.params + s.grads + s.opt + s.update_temp
    components = (
        Component(name="parameters", bytes=s.params, note=s.params_note),
        Component(name="gradients", bytes=grads, note=s.grads_note),
        Component(name="optimizer_state", bytes=s.opt, note=s.opt_note),
        Component(name="temporaries", bytes=s.update_temp, note="update of the largest parameter"),
    )
    return MemoryReport(components=components, peak_bytes=peak, peak_phase="optimizer step", host=s.host)


def _later_block_share(cfg: ModelConfig, trainable: Trainable, trainable_shapes: list[tuple[int, ...]]) -> float:
    """The share of the trainable elements that sit in blocks 1..L-1 (whose gradients precede block 0's)."""
    total = sum(_numel(shape) for shape in trainable_shapes)
    if not total:
        return 0.0
    # adapters are all in the blocks; a full fine-tune also trains the embeddings, the head and the final norm
    in_blocks = (sum(_numel(shape) for name, shape in param_shapes(cfg).items() if name.startswith("layers."))
                 if trainable.full else total)
    return in_blocks / total * (cfg.n_layers - 1) / cfg.n_layers


def _later_block_acts(cfg: ModelConfig, strategies: Strategies, n_tokens: int, batch: int, trainable: Trainable,
                      sharded: bool) -> int:
    """What blocks 1..L-1 keep for backward (`activation_bytes`'s per-block part): gone before block 0's turn."""
    a = DTYPE_BYTES[strategies.precision]
    later = cfg.n_layers - 1
    if strategies.activation_checkpointing == "selective":
        return later * selective_block_bytes(cfg, n_tokens, batch, strategies.precision, trainable)
    # checkpointing keeps the inputs of the blocks it recomputes (block 0 always among them): block 0's stays
    kept_inputs = max(checkpointed_layers(cfg, strategies) - 1, 0)
    block = _block_bytes(cfg, strategies, n_tokens, batch, trainable, sharded)
    return kept_inputs * n_tokens * cfg.dim * a + (later - kept_inputs) * block


def _block_bytes(cfg: ModelConfig, strategies: Strategies, n_tokens: int, batch: int, trainable: Trainable,
                 sharded: bool) -> int:
    """What one block that is not checkpointed saves for backward, its weight copies included (not under FSDP)."""
    block = block_activation_bytes(cfg, n_tokens, batch, strategies.precision, True, trainable,
                                   strategies.attention_kernel)
    return block + (0 if sharded else cast_copy_bytes(cfg, strategies.precision, trainable))


def _gathered_note(n_bytes: int, what: str) -> str:
    return f", plus {n_bytes:,} B gathered in full by FSDP ({what})" if n_bytes else ""


def _loss_note(cfg: ModelConfig, strategies: Strategies, n_tokens: int, trainable: Trainable = FULL) -> str:
    """The logits line's note; for standard CE the arithmetic of `logits_bytes`, term by term."""
    kind = strategies.cross_entropy
    if kind == "standard":
        terms = standard_peak_terms(n_tokens, cfg.vocab_size, cfg.dim, head_bytes(strategies.precision, trainable.full),
                                    4 if strategies.projection_dtype == "fp32" else 2, trainable.full)
        if len(terms) == 1:
            return terms[0][0]
        return " + ".join(f"{what} ({format_bytes(n_bytes)})" for what, n_bytes in terms)
    if kind == "chunked":
        return f"standard CE over 8 chunks of {n_tokens // 8:,} tokens, one alive at a time"
    return "fused linear CE: one hidden-sized logits tile plus the gradients it returns"


def _acts_note(cfg: ModelConfig, strategies: Strategies) -> str:
    n_ckpt = checkpointed_layers(cfg, strategies)
    offloaded = "; offloaded to host memory but about one block's worth" if strategies.activation_offloading else ""
    if n_ckpt == cfg.n_layers:
        return f"{cfg.n_layers} block inputs kept, one block recomputed at a time" + offloaded
    if n_ckpt:
        return (f"{n_ckpt} of {cfg.n_layers} blocks keep only their input, the others everything autograd saves"
                + offloaded)
    return f"{cfg.n_layers} blocks, everything autograd saves" + offloaded


def flops_per_token(cfg: ModelConfig, strategies: Strategies, seq_len: int) -> float:
    """Training FLOPs per token: 6 per matmul weight (forward + backward), causal attention, recompute."""
    D, Q, F, L = cfg.dim, cfg.n_heads * cfg.head_dim, cfg.ffn_dim, cfg.n_layers
    kv = cfg.n_kv_heads * cfg.head_dim
    mlp = 3 * D * F
    if cfg.is_moe_layer(_sample_layer(cfg)):  # the active weights: the router and each token's top-k experts
        mlp = cfg.n_experts * D + cfg.n_experts_per_token * 3 * D * cfg.expert_ffn_dim
    block_weights = 2 * D * Q + 2 * D * kv + mlp
    attn = 2 * seq_len * Q  # QK^T and AV, 2 FLOPs per MAC, half of them masked by causality
    forward = 2 * L * block_weights + L * attn + 2 * cfg.vocab_size * D
    total = 3 * forward
    recompute = checkpointed_layers(cfg, strategies) * (2 * block_weights + attn)  # recomputed blocks run twice
    if strategies.activation_checkpointing == "selective":
        recompute *= SELECTIVE_RECOMPUTE_SHARE  # no matmul again, but every elementwise op and the policy's dispatch
    total += recompute
    if strategies.cross_entropy == "chunked":
        total += 2 * cfg.vocab_size * D  # the output projection is recomputed in backward
    return float(total)


def peak_flops(precision: str, hw: HardwareProfile) -> float:
    """The device's peak FLOP/s in the compute dtype of `precision`."""
    if precision == "fp32":
        return hw.peak_flops_fp32
    if precision == "fp16" and hw.device == "cpu":
        return hw.peak_flops_fp32 * FP16_OVER_FP32_CPU
    return hw.peak_flops_bf16  # bf16; fp16 runs on the same tensor cores on GPUs


def estimate_tokens_per_s(cfg: ModelConfig, strategies: Strategies, seq_len: int, hw: HardwareProfile,
                          trainable: Trainable = FULL) -> float:
    """Tokens per second from FLOPs per token, the device's peak for the compute dtype and an efficiency; with
    activation offloading, less the copy time that compute does not hide (`offload_exposed_seconds`)."""
    peak = peak_flops(strategies.precision, hw)
    # the fused loss loops over chunks in Python and makes its gradients in forward: a small fixed cost, so it
    # is chosen when memory asks for it, not when standard CE fits
    overhead = 0.97 if strategies.cross_entropy == "fused" else 1.0
    if DTYPE_BYTES[strategies.precision] != MASTER_BYTES[strategies.precision]:
        overhead *= MIXED_CAST_OVERHEAD
    if strategies.optimizer_in_backward:
        overhead *= 0.99  # a Python hook and a small optimizer per parameter
    if strategies.compile:
        overhead *= COMPILE_SPEEDUP[hw.device]
    # smaller matmuls and one more forward/backward launch sequence per piece
    overhead *= SPLIT_EFFICIENCY ** math.log2(strategies.micro_batch_split)
    tokens_per_s = overhead * peak * EFFICIENCY[hw.device] / flops_per_token(cfg, strategies, seq_len)
    if not strategies.activation_offloading:
        return tokens_per_s
    exposed = offload_exposed_seconds(cfg, strategies, seq_len, hw, trainable, 1 / tokens_per_s)
    return OFFLOAD_OVERHEAD / (1 / tokens_per_s + exposed)


def step_floor_seconds(cfg: ModelConfig, strategies: Strategies, train: TrainSpec, n_tensors: int,
                       hw: HardwareProfile) -> float:
    """Host seconds one optimizer step takes at the least, whatever its FLOPs: every op's dispatch (and on CUDA its
    kernel launch) in each forward + backward of the step's micro-batches (and their pieces), and the optimizer's
    work per trainable tensor (`n_tensors`). The constants above give their sources."""
    per_op = HOST_SECONDS_PER_OP + (CUDA_LAUNCH_SECONDS if hw.device == "cuda" else 0.0)
    if strategies.compile:  # one graph call per block: launches, no per-op Python
        block = COMPILED_OPS_PER_BLOCK * (CUDA_LAUNCH_SECONDS if hw.device == "cuda" else HOST_SECONDS_PER_OP)
    else:
        block = OPS_PER_BLOCK * per_op
    if strategies.activation_offloading:
        block += SAVED_TENSORS_PER_BLOCK * 2 * (HOST_SECONDS_PER_OP + OFFLOAD_COPY_SECONDS)
    # recomputed blocks run their forward ops again (selective: the elementwise ones, most of them)
    block_runs = cfg.n_layers + checkpointed_layers(cfg, strategies) / 3
    passes = train.grad_accum * strategies.micro_batch_split
    return passes * (block_runs * block + OPS_ROOT * per_op) + n_tensors * OPTIMIZER_SECONDS_PER_TENSOR[hw.device]


def with_step_floor(tokens_per_s: float, floor_seconds: float, step_tokens: int, device: str) -> float:
    """Tokens/s of a step whose compute runs at `tokens_per_s` and whose host work takes `floor_seconds`: the longer
    of the two on CUDA (the host runs ahead), their sum on a CPU (the same cores do both)."""
    compute = step_tokens / tokens_per_s
    seconds = max(compute, floor_seconds) if device == "cuda" else compute + floor_seconds
    return step_tokens / seconds


def offload_exposed_seconds(cfg: ModelConfig, strategies: Strategies, seq_len: int, hw: HardwareProfile,
                            trainable: Trainable, compute_seconds: float) -> float:
    """Seconds per token that activation offloading's copies add to a step of `compute_seconds` per token.

    The copies out run beside the forward's kernels and the copies back beside the backward's, each way over PCIe
    at the profile's `pcie_bytes_per_s`. Whatever takes longer than the compute it overlaps is exposed. The
    forward's share of compute is its FLOPs' share; recomputation happens in backward.
    """
    assert hw.device == "cuda", "the planner offloads activations only on CUDA"
    moved = movable_activation_bytes(cfg, strategies, seq_len, 1, trainable=trainable) / seq_len
    copy = moved / hw.pcie_bytes_per_s
    plain = msgspec.structs.replace(strategies, activation_checkpointing="off", cross_entropy="standard")
    forward = compute_seconds * flops_per_token(cfg, plain, seq_len) / 3 / flops_per_token(cfg, strategies, seq_len)
    return max(copy - forward, 0.0) + max(copy - (compute_seconds - forward), 0.0)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
