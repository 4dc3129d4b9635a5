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
"""

from lowmem.nn.config import ModelConfig, count_params
from lowmem.plan.hardware import HardwareProfile
from lowmem.plan.structs import Component, MemoryReport, Strategies
from lowmem.spec.structs import SGD, Adafactor, AdamW, AdamW4bit, AdamW8bit, OptimizerSpec, TrainSpec

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "mixed-bf16": 2, "fp16": 2}
FP32 = 4

# Share of peak FLOP/s a training step reaches, by device: CPU fp32 GEMMs at these sizes reach about a
# third of peak (measured on the development machine); GPUs without compile about 40% (MFU of torchtune
# recipes without compile, README ladder).
EFFICIENCY = {"cpu": 0.35, "cuda": 0.40}


def weight_bytes(precision: str) -> int:
    """Bytes per parameter of the weights the model computes with (fp32 master copies are extra)."""
    return DTYPE_BYTES[precision]


def optimizer_state_bytes(optimizer: OptimizerSpec, shapes: list[tuple[int, ...]], param_bytes: int) -> int:
    """Bytes of optimizer state for trainable parameters of these shapes."""
    n = sum(_numel(s) for s in shapes)
    if isinstance(optimizer, AdamW):
        return 2 * n * param_bytes  # exp_avg and exp_avg_sq, in the parameter's dtype (torch AdamW)
    if isinstance(optimizer, SGD):
        return n * param_bytes if optimizer.momentum > 0 else 0
    if isinstance(optimizer, Adafactor):
        # factored second moment: a row and a column vector per matrix, the full vector for 1-d tensors
        return sum((s[0] + s[1] if len(s) == 2 else _numel(s)) * FP32 for s in shapes)
    if isinstance(optimizer, AdamW8bit):
        # two 8-bit moments plus one fp32 absmax per 256-element block each (tensors under 4096 elements
        # stay 32-bit in bitsandbytes)
        small = sum(_numel(s) for s in shapes if _numel(s) < 4096)
        big = n - small
        return 2 * big + 2 * (big // 256 + 1) * FP32 + 2 * small * FP32
    if isinstance(optimizer, AdamW4bit):
        return n + 2 * (n // 128 + 1) * FP32  # two 4-bit moments, absmax per 128-element block
    raise AssertionError(f"unhandled optimizer {type(optimizer).__name__}")


def block_activation_bytes(cfg: ModelConfig, n_tokens: int, batch: int, precision: str, packed: bool) -> int:
    """Bytes autograd saves for one transformer block without checkpointing (input included).

    Counted from the block's saved tensors (verified with saved_tensors_hooks): per token the block input and
    the attention residual (2 D), per RMSNorm its normalized output and the scaled output fed to the
    projections (2 D, plus an fp32 upcast when not fp32), q after RoPE, k and v expanded to all query heads
    and the attention output re-laid out for wo (4 Q), the four SwiGLU (N, F) tensors, two fp32 rstd and the
    per-head logsumexp. With packed documents SDPA also keeps the mask as an additive (B, 1, T, T) tensor.
    """
    a = DTYPE_BYTES[precision]
    D, Q, F, H = cfg.dim, cfg.n_heads * cfg.head_dim, cfg.ffn_dim, cfg.n_heads
    upcast = D * FP32 if a != FP32 else 0
    per_token = 2 * D * a + 2 * (2 * D * a + upcast) + 4 * Q * a + 4 * F * a + 2 * FP32 + H * FP32
    seq_len = n_tokens // batch
    mask = batch * seq_len * seq_len * a if packed else 0
    return n_tokens * per_token + mask


def activation_bytes(cfg: ModelConfig, strategies: Strategies, n_tokens: int, batch: int, packed: bool = True) -> int:
    """Activations alive at the start of backward (with checkpointing, the larger of that and a recompute)."""
    a = DTYPE_BYTES[strategies.precision]
    seq_len = n_tokens // batch
    block = block_activation_bytes(cfg, n_tokens, batch, strategies.precision, packed)
    # final RMSNorm (input, normalized, scaled) + the bool document mask + the fp32 RoPE tables
    shared = n_tokens * (3 * cfg.dim * a + FP32) + (batch * seq_len * seq_len if packed else 0)
    shared += 2 * n_tokens * cfg.head_dim * FP32
    if a != FP32:
        shared += n_tokens * cfg.dim * FP32  # hidden upcast to fp32 for the loss
    if strategies.activation_checkpointing == "full":
        return cfg.n_layers * n_tokens * cfg.dim * a + shared  # only block inputs are saved
    return cfg.n_layers * block + shared


def recompute_bytes(cfg: ModelConfig, strategies: Strategies, n_tokens: int, batch: int, packed: bool = True) -> int:
    """Extra bytes while one checkpointed block is recomputed in backward (zero without checkpointing)."""
    if strategies.activation_checkpointing != "full":
        return 0
    a = DTYPE_BYTES[strategies.precision]
    # the recomputed block's activations plus the gradient flowing through it
    return block_activation_bytes(cfg, n_tokens, batch, strategies.precision, packed) + 2 * n_tokens * cfg.dim * a


def logits_bytes(cfg: ModelConfig, strategies: Strategies, n_tokens: int) -> int:
    """Peak bytes of the loss: three fp32 (N, V) tensors at the start of backward."""
    extra = 0 if strategies.precision == "fp32" else cfg.vocab_size * cfg.dim * FP32  # fp32 weight copy
    return 3 * n_tokens * cfg.vocab_size * FP32 + extra


def batch_bytes(n_tokens: int) -> int:
    """The batch tensors: token ids, labels, positions and document ids, int64."""
    return 4 * n_tokens * 8


def estimate_memory(
    cfg: ModelConfig, strategies: Strategies, train: TrainSpec, optimizer: OptimizerSpec,
    trainable_shapes: list[tuple[int, ...]],
) -> MemoryReport:
    """Predicted peak live bytes of a training step, by component, with the phase where it falls.

    Two phases can hold the peak: the start of backward (all activations and the loss tensors alive) and
    the optimizer step (all gradients alive plus the update's temporaries).
    """
    wb = weight_bytes(strategies.precision)
    n_params = count_params(cfg)
    n_trainable = sum(_numel(s) for s in trainable_shapes)
    n_tokens = train.micro_batch * train.seq_len

    params = n_params * wb
    grads = n_trainable * wb
    opt = optimizer_state_bytes(optimizer, trainable_shapes, wb)
    acts = activation_bytes(cfg, strategies, n_tokens, train.micro_batch)
    loss = logits_bytes(cfg, strategies, n_tokens)
    batch = batch_bytes(n_tokens)
    recompute = recompute_bytes(cfg, strategies, n_tokens, train.micro_batch)
    # gradients of earlier micro-batches are alive while later ones run forward
    grads_in_backward = grads if train.grad_accum > 1 else 0
    # torch's single-tensor AdamW makes one parameter-sized temporary (the denominator) at a time
    update_temp = max((_numel(s) for s in trainable_shapes), default=0) * wb

    backward_start = params + opt + grads_in_backward + acts + loss + batch
    # with checkpointing the loss tensors are gone by the time the last block is recomputed; by then the
    # output head's gradient exists
    head_grad = cfg.vocab_size * cfg.dim * wb
    in_recompute = params + opt + max(grads_in_backward, head_grad) + acts + recompute + batch
    optimizer_step = params + grads + opt + update_temp
    if recompute and in_recompute > max(backward_start, optimizer_step):
        components = (
            Component(name="parameters", bytes=params, note=f"{n_params:,} x {wb} B"),
            Component(name="gradients", bytes=max(grads_in_backward, head_grad), note="output head and accumulated"),
            Component(name="optimizer_state", bytes=opt, note=type(optimizer).__name__),
            Component(name="activations", bytes=acts + recompute, note=_acts_note(cfg, strategies)),
            Component(name="batch", bytes=batch, note="token ids, labels, positions, document ids"),
        )
        return MemoryReport(components=components, peak_bytes=in_recompute, peak_phase="block recompute in backward")
    if backward_start >= optimizer_step:
        components = (
            Component(name="parameters", bytes=params, note=f"{n_params:,} x {wb} B"),
            Component(name="gradients", bytes=grads_in_backward,
                      note="accumulated over micro-batches" if grads_in_backward else "none yet at backward start"),
            Component(name="optimizer_state", bytes=opt, note=type(optimizer).__name__),
            Component(name="activations", bytes=acts, note=_acts_note(cfg, strategies)),
            Component(name="logits", bytes=loss, note=f"3 x {n_tokens:,} tokens x {cfg.vocab_size:,} vocab x fp32"),
            Component(name="batch", bytes=batch, note="token ids, labels, positions, document ids"),
        )
        return MemoryReport(components=components, peak_bytes=backward_start, peak_phase="start of backward")
    components = (
        Component(name="parameters", bytes=params, note=f"{n_params:,} x {wb} B"),
        Component(name="gradients", bytes=grads, note=f"{n_trainable:,} trainable x {wb} B"),
        Component(name="optimizer_state", bytes=opt, note=type(optimizer).__name__),
        Component(name="temporaries", bytes=update_temp, note="update of the largest parameter"),
    )
    return MemoryReport(components=components, peak_bytes=optimizer_step, peak_phase="optimizer step")


def _acts_note(cfg: ModelConfig, strategies: Strategies) -> str:
    if strategies.activation_checkpointing == "full":
        return f"{cfg.n_layers} block inputs kept, one block recomputed at a time"
    return f"{cfg.n_layers} blocks, everything autograd saves"


def flops_per_token(cfg: ModelConfig, strategies: Strategies, seq_len: int) -> float:
    """Training FLOPs per token: 6 per matmul weight (forward + backward), causal attention, recompute."""
    D, Q, F, L = cfg.dim, cfg.n_heads * cfg.head_dim, cfg.ffn_dim, cfg.n_layers
    kv = cfg.n_kv_heads * cfg.head_dim
    block_weights = 2 * D * Q + 2 * D * kv + 3 * D * F
    attn = 2 * seq_len * Q  # QK^T and AV, 2 FLOPs per MAC, half of them masked by causality
    forward = 2 * L * block_weights + L * attn + 2 * cfg.vocab_size * D
    total = 3 * forward
    if strategies.activation_checkpointing == "full":
        total += 2 * L * block_weights + L * attn  # blocks run forward twice
    return float(total)


def estimate_tokens_per_s(cfg: ModelConfig, strategies: Strategies, seq_len: int, hw: HardwareProfile) -> float:
    """Tokens per second from FLOPs per token, the device's peak for the compute dtype and an efficiency."""
    bf16_compute = strategies.precision in ("bf16", "mixed-bf16", "fp16")
    peak = hw.peak_flops_bf16 if bf16_compute else hw.peak_flops_fp32
    return peak * EFFICIENCY[hw.device] / flops_per_token(cfg, strategies, seq_len)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
