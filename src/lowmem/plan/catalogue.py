"""The strategy catalogue: one record per memory strategy, the single place that says what it does.

The planner reads these records to build candidates, explain choices and reject impossible requests;
`lowmem.train.strategies` holds the one function that applies each strategy.
"""

import msgspec

# Pure bf16 keeps no fp32 copy of the weights, and a weight w changes only when its update is at least half the
# spacing of bf16 numbers around it (round to nearest): |w| * 2**-8 (7 stored mantissa bits). Adam's update is
# about lr per element, at most. For a weight of 0.02, the std Llama initializes with and the order of trained
# Llama projections, an update of lr survives only from lr = 0.02 * 2**-8 = 7.8e-5 up. Measured
# (tests/train/test_strategies.py): one bf16 AdamW step at lr 1e-5 moved 21% of the block weights, at lr 1e-3
# all of them. torchtune's users met this as "very bad convergence with bf16" (torchtune #2254).
TYPICAL_WEIGHT = 0.02
BF16_MIN_LR = TYPICAL_WEIGHT * 2.0**-8
# Decoupled weight decay multiplies each weight by 1 - lr x weight_decay. In bf16 a relative change below half the
# spacing (2**-9 of the weight at worst) rounds away: at lr 3e-3 and weight_decay 0.01 (3e-5) the decay does
# nothing (measured: tests/train/test_strategies.py, weights bitwise equal to a run without it).
BF16_DECAY_MIN = 2.0**-9
BF16_LOST_UPDATES_REASON = (
    f"bf16 weights round away an update smaller than half their spacing (for a weight of {TYPICAL_WEIGHT}: "
    f"{BF16_MIN_LR:.1e}), so at this learning rate most updates are lost and the loss stalls; mixed-bf16 keeps "
    "fp32 master weights and states (twice the bytes) and computes as fast"
)


class StrategyInfo(msgspec.Struct, frozen=True, kw_only=True):
    """What a strategy saves, what it costs, what it needs, and whether this version can run it."""

    name: str  # the field in `memory.strategies` (or `memory.precision`)
    saves: str
    costs: str
    requires: str = ""
    available: bool = True
    unavailable_reason: str = ""


CATALOGUE: dict[str, StrategyInfo] = {
    "precision": StrategyInfo(
        name="precision",
        saves="bf16 halves weights, gradients, optimizer states and activations; mixed-bf16 and fp16 keep fp32 "
              "master weights, gradients and optimizer states and halve the activations (a frozen LoRA base is "
              "held in the compute dtype)",
        costs="bf16 compute is slow on CPUs without AVX512-BF16/AMX (about 300x on a development machine); "
              "mixed-bf16/fp16 hold a 16-bit copy of each block's weights until its backward (one block at a time "
              "when checkpointed); fp16 skips steps whose scaled gradients overflow",
        requires="auto picks bf16 only when optimizer.lr >= BF16_MIN_LR (below it, bf16 weights round most updates "
                 "away: BF16_LOST_UPDATES_REASON); auto picks bf16/mixed-bf16 only with native bf16 arithmetic (AVX512-BF16/AMX CPUs, Ampere+ GPUs) "
                 "and fp16 only on GPUs without bf16 (on CPU it is slower than fp32: FP16_CPU_REASON); fp16 not "
                 "with optimizer_in_backward (an overflowing step must be skippable)",
    ),
    "activation_checkpointing": StrategyInfo(
        name="activation_checkpointing",
        saves="full / first-n: keeps only each checkpointed block's input (every block, or the first n: about a "
              "quarter, a half, three quarters, all but the last); selective: every block keeps its input and its "
              "matmul and attention outputs only",
        costs="full / first-n: one extra forward of each checkpointed block (up to about +33% FLOPs for every "
              "block); selective: only the elementwise ops (norms, RoPE, SiLU, gating) run again",
        requires="selective: not together with compile (the policy sees aten ops, a compiled block is one graph)",
    ),
    "activation_offloading": StrategyInfo(
        name="activation_offloading",
        saves="saved activations (with checkpointing, the block inputs) wait for backward in pinned host memory; "
              "about one block's worth stays on the device (copies in flight, the next one fetched back early)",
        costs="PCIe copies on a side CUDA stream, overlapped with compute: copy time beyond the forward's (out) or "
              "the backward's (back) compute is lost, plus OFFLOAD_OVERHEAD for the Python hooks; auto uses it only "
              "when no plan without it fits",
        requires="a CUDA device (OFFLOAD_CPU_REASON); one process, not FSDP (OFFLOAD_FSDP_REASON); host memory: "
                 "saved tensors of OFFLOAD_MIN_BYTES or more, up to HOST_PINNED_SHARE of the RAM pinned",
    ),
    "chunked_cross_entropy": StrategyInfo(
        name="chunked_cross_entropy",
        saves="only one token chunk's fp32 logits alive at a time (8 chunks), in forward and backward",
        costs="the output projection runs twice (recomputed per chunk in backward)",
        requires="not together with fused_cross_entropy",
    ),
    "fused_cross_entropy": StrategyInfo(
        name="fused_cross_entropy",
        saves="never materializes (tokens x vocab) logits: loss and its gradient computed chunk by chunk in forward",
        costs="a Python loop over chunks (about hidden-size logits tiles); gradients computed even if unused",
        requires="not together with chunked_cross_entropy",
    ),
    "optimizer_in_backward": StrategyInfo(
        name="optimizer_in_backward",
        saves="frees each gradient right after its update; gradients never all alive",
        costs="a Python hook per parameter; about 1% in speed",
        requires="grad_accum = 1 and no global-norm clipping",
    ),
    "compile": StrategyInfo(
        name="compile",
        saves="torch.compile (inductor) of the block: fused elementwise kernels, fewer saved intermediates",
        costs="compile time at start (COMPILE_SECONDS_PER_BLOCK per distinct block graph); chosen only when the "
              "run's estimated time saved repays it",
        requires="a C compiler for inductor on CPU; not together with selective checkpointing",
    ),
    "micro_batch_split": StrategyInfo(
        name="micro_batch_split",
        saves="activations and loss tensors of a micro-batch fall by the split factor (each piece runs alone)",
        costs="smaller matmuls and one more forward/backward per piece (SPLIT_EFFICIENCY per halving); gradients "
              "alive during forward; auto uses it only when no plan with whole micro-batches fits",
        requires="train.micro_batch > 1; not together with optimizer_in_backward",
    ),
    "fsdp_cpu_offload": StrategyInfo(
        name="fsdp_cpu_offload",
        saves="FSDP2's CPUOffloadPolicy: each process's parameter, gradient and optimizer-state shards live in "
              "pinned host memory; the device holds only the units being gathered and computed",
        costs="every unit's shards cross PCIe before each all-gather (forward and backward) and its gradient "
              "shards back; the optimizer steps on the host CPU; auto uses it only when nothing else fits",
        requires="a CUDA device and several processes under torchrun (on a CPU the shards are in host memory "
                 "already: FSDP_OFFLOAD_CPU_REASON)",
    ),
    "bf16_stochastic_rounding": StrategyInfo(
        name="bf16_stochastic_rounding",
        saves="lets pure bf16 (8 bytes per AdamW-trained parameter) learn at a learning rate below BF16_MIN_LR, "
              "where mixed-bf16 would need 16 or more",
        costs="torchao's _AdamW computes each update in fp32 and rounds stochastically (one random draw per "
              "weight); its step compiles once per parameter shape (seconds on a CPU); the weights follow the "
              "fp32 trajectory on average, with rounding noise (torchtune #2254 found it close to, not equal to, "
              "fp32); auto prefers mixed-bf16 whenever that fits",
        requires="memory.precision bf16, optimizer.kind = 'adamw' on the device (no optimizer.offload, no 8-bit "
                 "states), one process (not tested under FSDP2), a C++ compiler for torch.compile on a CPU",
    ),
    "host_caching_allocator": StrategyInfo(
        name="host_caching_allocator",
        saves="on a CPU, RSS stays near the step's live tensors: glibc's heap grows to about twice them and keeps "
              "it (fragmentation after its mmap threshold rises); the caching allocator keeps freed blocks of 1 "
              "MiB or more per size class and hands them to the next tensor of that size",
        costs="no speed (0.98-1.12x glibc's tokens/s in benchmarks/host_overhead.py: no page is faulted in again "
              "after the first step); up to 1/8 rounding per tensor and blocks idle in classes not in use at the "
              "peak, which the plan counts",
        requires="Linux, a C++ compiler the first time (it is built against the installed torch, about 4 s)",
    ),
    "low_bit_optimizer": StrategyInfo(
        name="low_bit_optimizer",
        saves="AdamW's two fp32 moments held in 8 bits with block-wise scales (bitsandbytes): about 75% of the "
              "optimizer state",
        costs="the updates change slightly (quantized moments); auto uses it only when no plan with "
              "full-precision states fits",
        requires="optimizer.kind = 'adamw'",
    ),
}

# Why activation offloading is never planned on a CPU or under FSDP
OFFLOAD_CPU_REASON = "on a CPU the activations already live in host memory: there is nothing to move them to"
OFFLOAD_FSDP_REASON = ("the hooks would also move the weights FSDP gathers for a block (they are not the run's "
                       "parameters), undoing FSDP's freeing of them")

FSDP_OFFLOAD_CPU_REASON = ("on a CPU FSDP's shards already live in host memory: CPUOffloadPolicy would copy them "
                           "within it and save nothing")

# precision values the executor runs today
AVAILABLE_PRECISIONS = ("fp32", "bf16", "mixed-bf16", "fp16")

# fp16 on CPU, measured on the development CPU (AVX512-FP16 and AMX-BF16, no AMX-FP16), torch 2.13: 512x1024 @
# 1024x1024 matmuls ran at fp32 36.5, bf16 81.6, fp16 42.9 GFLOP/s, and a whole quickstart-5m training step at
# 413 tokens/s in fp16 against 2,612 in fp32 (fp16 elementwise ops and their backward are slow there). So auto
# never picks fp16 for a CPU; forced, it runs (same memory as mixed-bf16) and the plan warns.
FP16_CPU_REASON = ("fp16 on CPU is slower than fp32 (measured: matmuls 43 vs 37 GFLOP/s, a training step 413 vs "
                   "2,612 tokens/s on an AVX512-FP16 CPU) and needs loss scaling; mixed-bf16 or bf16 give the same "
                   "memory without scaling where the CPU has bf16 instructions, else fp32")
