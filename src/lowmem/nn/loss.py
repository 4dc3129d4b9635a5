"""Losses over final hidden states: the output projection and the cross-entropy in one call, so that
chunked or fused variants with the same signature can replace it without materialising (N, V) logits.

Three drop-in implementations, all `(hidden, weight, labels, ignore_index) -> (loss_sum, n_tokens)`:

- `cross_entropy_sum`: the reference. Projects every token to fp32 (N, V) logits at once.
- `chunked_cross_entropy_sum` (torchtune's chunked CE): drops ignored tokens, then projects and
  takes the CE chunk by chunk under non-reentrant activation checkpointing, so one chunk's logits
  are alive at a time in forward and backward (backward recomputes them).
- `fused_linear_cross_entropy_sum` (Liger's fused linear CE): a custom autograd function that
  computes, chunk by chunk in forward, the loss *and* the gradients wrt hidden and weight, and
  saves only those gradients; backward scales them. Logits are never saved nor recomputed.

`loss_peak_bytes` gives what each one holds at its peak, for the planner.

Each takes an optional `softcap`: the logits become cap * tanh(z / cap) before the CE (Gemma 2's final
logit soft-capping, `ModelConfig.final_logit_softcap`). A Gemma 2 loss without it is a different loss.
The fused variant then holds a second (C, V) fp32 tile (tanh(z / cap), for the chain rule).

And an optional `projection_dtype`, the dtype the matmuls with the (V, D) weight run in: None (fp32, hidden
and weight upcast) or bf16/fp16, where they run at the low-precision matmul speed (CUDA's tensor cores) with no fp32 copy of
hidden or weight (issue #14). The logits are upcast to fp32 right after the matmul, inside each chunk, so the logsumexp, the
softmax and its gradient are fp32 either way; the gradient is cast back to the projection dtype for the
matmuls of backward.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

__all__ = [
    "CE_IMPLEMENTATIONS",
    "IGNORE_INDEX",
    "chunked_cross_entropy_sum",
    "cross_entropy_sum",
    "default_chunk_tokens",
    "fused_linear_cross_entropy_sum",
    "loss_peak_bytes",
]

IGNORE_INDEX = -100  # the value HF and torch use for "no label here"
FP32_BYTES = 4
INDEX_BYTES = 8  # int64 labels and row indices
PROJECTION_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _projection(projection_dtype: torch.dtype | None) -> torch.dtype:
    """The dtype the vocabulary projection runs in: fp32 for None, else `projection_dtype` (checked)."""
    if projection_dtype is None:
        return torch.float32
    if projection_dtype not in PROJECTION_DTYPES:
        raise ValueError(f"projection_dtype={projection_dtype}: choose None (fp32) or one of {PROJECTION_DTYPES}")
    return projection_dtype


def _project(h: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp32 logits (N, V) of h (N, D) and weight (V, D), multiplied in `dtype` (inputs cast where they differ)."""
    return F.linear(h.to(dtype), weight.to(dtype)).float()


def _flatten_checked(hidden: torch.Tensor, weight: torch.Tensor,
                     labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, D) hidden and (N,) labels from (N, D)/(B, T, D) and (N,)/(B, T), after checking shapes."""
    D = hidden.shape[-1]
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(
            f"hidden {tuple(hidden.shape)} and labels {tuple(labels.shape)} disagree: labels must have "
            "hidden's shape without its last dim"
        )
    if weight.ndim != 2 or weight.shape[-1] != D:
        raise ValueError(f"weight {tuple(weight.shape)} must be (V, {D}) to match hidden {tuple(hidden.shape)}")
    return hidden.reshape(-1, D), labels.reshape(-1)


def _kept_rows(y: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """(K,) int64 indices of the positions that have a target. Syncs with the device (`nonzero`)."""
    return (y != ignore_index).nonzero().squeeze(1)


def _softcap(z: torch.Tensor, cap: float | None) -> torch.Tensor:
    return z if cap is None else torch.tanh(z / cap) * cap


def cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                      ignore_index: int = IGNORE_INDEX, *, softcap: float | None = None,
                      projection_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy over fp32 logits.

    Labels are already aligned with `hidden` (label t is the target for hidden t; shifting is the
    caller's job). Returning the sum and the count, not the mean, lets micro-batches and ranks be
    combined exactly: mean = sum(loss_sum) / sum(n_tokens).

    Args:
        hidden: (N, D) or (B, T, D) final hidden states, any float dtype.
        weight: (V, D) output projection (see `lowmem.nn.llama.output_weight`).
        labels: (N,) or (B, T) int64 targets; `ignore_index` marks positions without a target.
        softcap: soft-cap the logits at this value first (Gemma 2: `cfg.final_logit_softcap`); None: no cap.
        projection_dtype: the dtype of the matmul h @ weight.T (and of its gradients' matmuls): None for fp32,
            or torch.bfloat16 / torch.float16; the logits are upcast to fp32 after it either way.

    Returns:
        loss_sum: 0-d fp32 tensor, the CE summed over non-ignored positions (0 when there are none).
        n_tokens: 0-d int64 tensor, the number of non-ignored positions.
    """
    h, y = _flatten_checked(hidden, weight, labels)  # (N, D), (N,)
    logits = _softcap(_project(h, weight, _projection(projection_dtype)), softcap)  # (N, V) fp32
    loss_sum = F.cross_entropy(logits, y, ignore_index=ignore_index, reduction="sum")
    n_tokens = (y != ignore_index).sum()
    return loss_sum, n_tokens


# -- chunked: checkpointed projection + CE per chunk --------------------------------------------


def _projected_ce_sum(h: torch.Tensor, weight: torch.Tensor, y: torch.Tensor, softcap: float | None,
                      dtype: torch.dtype) -> torch.Tensor:
    """CE summed over a chunk whose labels are all targets: (C, D), (V, D), (C,) -> 0-d fp32; projected in dtype."""
    logits = _softcap(_project(h, weight, dtype), softcap)  # (C, V) fp32
    return F.cross_entropy(logits, y, reduction="sum")


def chunked_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                              ignore_index: int = IGNORE_INDEX, *, n_chunks: int = 8, softcap: float | None = None,
                              projection_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`cross_entropy_sum` with one chunk of fp32 logits alive at a time (torchtune's chunked CE).

    Ignored positions are dropped before projecting (their logits are never computed). The kept
    tokens are split into `n_chunks` chunks; each chunk's projection and CE run under
    non-reentrant `torch.utils.checkpoint`, so forward keeps only the chunk inputs and backward
    recomputes one chunk's logits at a time. Costs one extra projection (forward recompute).

    Args:
        hidden, weight, labels, ignore_index, softcap, projection_dtype: as `cross_entropy_sum`.
        n_chunks: how many token chunks (fewer when there are fewer kept tokens).

    Returns:
        (loss_sum, n_tokens) as `cross_entropy_sum`.
    """
    if n_chunks < 1:
        raise ValueError(f"n_chunks={n_chunks}: must be >= 1 (8 is torchtune's default)")
    dtype = _projection(projection_dtype)
    h, y = _flatten_checked(hidden, weight, labels)  # (N, D), (N,)
    rows = _kept_rows(y, ignore_index)  # (K,)
    if rows.numel() < y.numel():
        h, y = h.index_select(0, rows), y.index_select(0, rows)  # (K, D), (K,)
    loss_sum = sum(
        checkpoint(_projected_ce_sum, h_c, weight, y_c, softcap, dtype, use_reentrant=False)
        for h_c, y_c in zip(h.chunk(n_chunks), y.chunk(n_chunks), strict=True)
    )
    return loss_sum, rows.new_tensor(rows.numel())


# -- fused: loss and gradients in forward, chunk by chunk ---------------------------------------


def default_chunk_tokens(n_tokens: int, vocab: int, dim: int) -> int:
    """Tokens per chunk such that a chunk's (C, V) logits tile is about the size of the (N, D) hidden.

    Liger's rule (`LigerFusedLinearCrossEntropyFunction`): C = N * D / V, rounded *up* to a power of
    two, so the tile holds between 1x and 2x the hidden states' element count, and the number of
    chunks is about V / D (32 for Llama 3 8B's 128256 x 4096 head). At least 1.
    """
    target = max(1, (n_tokens * dim) // vocab)
    return 1 << (target - 1).bit_length()


def _ce_chunk_loss_and_dlogits(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor,
                               softcap: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """CE summed over one chunk and its gradient wrt the logits, using one (C, V) fp32 buffer.

    Args:
        h: (C, D) hidden rows and w: (V, D) weight, both in the projection dtype (below fp32 the matmul's
            (C, V) output is upcast: a transient second tile); y: (C,) int64 targets (none ignored).
        softcap: when set, z = cap * tanh(h @ w.T / cap), and d_logits is taken wrt h @ w.T (chain rule
            through the cap: times 1 - tanh^2), at the cost of a second (C, V) buffer.

    Returns:
        loss: 0-d fp32, sum_i logsumexp(z_i) - z_i[y_i] with z = h @ w.T.
        d_logits: (C, V) fp32, softmax(z) - onehot(y), the gradient of `loss` wrt z.
    """
    z = (h @ w.T).float()  # (C, V) fp32
    tanh = None
    if softcap is not None:
        tanh = z.div_(softcap).tanh_()  # (C, V), in place
        z = tanh * softcap  # (C, V) the capped logits: the second buffer
    target = z.gather(1, y[:, None])  # (C, 1)
    z_max = z.amax(1, keepdim=True)  # (C, 1)
    p = z.sub_(z_max).exp_()  # (C, V) unnormalised softmax, in place: the only (C, V) buffer
    total = p.sum(1, keepdim=True)  # (C, 1)
    loss = (z_max + total.log() - target).sum()
    p.div_(total).scatter_add_(1, y[:, None], torch.full_like(target, -1.0))
    if tanh is not None:
        p.mul_(tanh.square_().neg_().add_(1.0))  # d cap*tanh(x/cap) / dx = 1 - tanh^2
    return loss, p


def _fused_ce_forward(h: torch.Tensor, weight: torch.Tensor, y: torch.Tensor, ignore_index: int,
                      chunk_tokens: int | None, need_h: bool, need_w: bool, softcap: float | None = None,
                      dtype: torch.dtype = torch.float32):
    """Loss, count and (if asked) the gradients of loss_sum wrt h and weight, chunk by chunk.

    Args:
        h: (N, D) hidden; weight: (V, D); y: (N,) labels; dtype: the projection dtype.

    Returns:
        loss_sum (0-d fp32), n_tokens (0-d int64), grad_h ((N, D) in h's dtype, zero rows where
        ignored; or None), grad_w ((V, D) in weight's dtype, accumulated in the projection dtype, fp32 by
        default, bf16 with a bf16 projection as Liger does; or None).
    """
    rows = _kept_rows(y, ignore_index)  # (K,)
    K, (V, D) = rows.numel(), weight.shape
    C = chunk_tokens or default_chunk_tokens(K, V, D)
    w_p = weight.to(dtype)  # (V, D); a copy only when the weight's dtype is not the projection's
    grad_h = torch.zeros_like(h) if need_h else None  # (N, D)
    grad_w_sum = torch.zeros_like(w_p) if need_w else None  # (V, D) accumulator in the projection dtype
    loss_sum = torch.zeros((), dtype=torch.float32, device=h.device)
    for start in range(0, K, C):
        r = rows[start:start + C]  # (C,)
        h_c = h.index_select(0, r).to(dtype)  # (C, D)
        loss_c, d_logits = _ce_chunk_loss_and_dlogits(h_c, w_p, y.index_select(0, r), softcap)
        loss_sum += loss_c
        d_logits = d_logits.to(dtype)  # (C, V) for the gradients' matmuls; the fp32 tile itself when fp32
        if need_h:
            grad_h.index_copy_(0, r, (d_logits @ w_p).to(h.dtype))  # (C, D)
        if need_w:
            grad_w_sum.addmm_(d_logits.T, h_c)  # (V, C) @ (C, D)
        del d_logits  # free the tile before the next chunk allocates its own
    del w_p
    grad_w = grad_w_sum.to(weight.dtype) if need_w else None
    return loss_sum, rows.new_tensor(K), grad_h, grad_w


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """(h (N, D), weight (V, D), y (N,)) -> (loss_sum, n_tokens), gradients computed in forward."""

    @staticmethod
    def forward(ctx, h, weight, y, ignore_index, chunk_tokens, softcap, dtype):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        loss_sum, n_tokens, grad_h, grad_w = _fused_ce_forward(
            h, weight, y, ignore_index, chunk_tokens, need_h, need_w, softcap, dtype)
        # Plain attributes, not save_for_backward: these are results, not inputs to recompute
        # from, and backward hands them over (below), which saved tensors would not allow.
        ctx.grads = (grad_h, grad_w)
        ctx.mark_non_differentiable(n_tokens)
        return loss_sum, n_tokens

    @staticmethod
    def backward(ctx, grad_loss, _grad_n):
        if ctx.grads is None:
            raise RuntimeError(
                "fused_linear_cross_entropy_sum: backward ran a second time through the same loss; "
                "its gradients are computed in forward and handed over on the first backward. "
                "Recompute the loss instead of using retain_graph=True, or use chunked_cross_entropy_sum")
        grad_h, grad_w = ctx.grads
        # Handing the only reference over lets the engine (AccumulateGrad) adopt the tensors as
        # `.grad` and lets us scale in place: no second (N, D) or (V, D) copy at backward time.
        ctx.grads = None
        if grad_h is not None:
            grad_h.mul_(grad_loss)
        if grad_w is not None:
            grad_w.mul_(grad_loss)
        return grad_h, grad_w, None, None, None, None, None


def fused_linear_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                                   ignore_index: int = IGNORE_INDEX, *, chunk_tokens: int | None = None,
                                   softcap: float | None = None, projection_dtype: torch.dtype | None = None,
                                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """`cross_entropy_sum` without ever holding (N, V) logits, forward or backward (Liger's fused CE).

    Ignored positions are dropped first. For each chunk of kept tokens, forward computes the fp32
    logits, the loss and at once d(loss)/d(logits) = softmax - onehot in the same buffer, and
    accumulates grad_hidden (its chunk rows) and grad_weight ((V, D), in the projection dtype); only those gradients
    are kept for backward, which scales them by the incoming gradient. So forward costs the
    gradient FLOPs even when no backward follows (it is skipped when nothing requires grad), and
    backward may run only once per forward (no `retain_graph=True` reuse).

    Args:
        hidden, weight, labels, ignore_index, softcap, projection_dtype: as `cross_entropy_sum`.
        chunk_tokens: tokens per chunk; default `default_chunk_tokens(n_kept, V, D)` (a logits
            tile about the size of the hidden states).

    Returns:
        (loss_sum, n_tokens) as `cross_entropy_sum`; gradients arrive in hidden's and weight's dtypes.
    """
    if chunk_tokens is not None and chunk_tokens < 1:
        raise ValueError(f"chunk_tokens={chunk_tokens}: must be >= 1, or None for the default")
    dtype = _projection(projection_dtype)
    h, y = _flatten_checked(hidden, weight, labels)  # (N, D), (N,)
    if not (torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)):
        loss_sum, n_tokens, _, _ = _fused_ce_forward(h, weight, y, ignore_index, chunk_tokens, False, False,
                                                     softcap, dtype)
        return loss_sum, n_tokens
    return _FusedLinearCrossEntropy.apply(h, weight, y, ignore_index, chunk_tokens, softcap, dtype)


CE_IMPLEMENTATIONS: dict[str, Callable[..., tuple[torch.Tensor, torch.Tensor]]] = {
    "standard": cross_entropy_sum,
    "chunked": chunked_cross_entropy_sum,
    "fused": fused_linear_cross_entropy_sum,
}


def loss_peak_bytes(kind: str, n_tokens: int, vocab: int, dim: int, dtype_bytes: int,
                    n_kept: int | None = None, *, n_chunks: int = 8,
                    chunk_tokens: int | None = None, weight_grad: bool = True,
                    projection_bytes: int = FP32_BYTES) -> int:
    """Peak bytes one `CE_IMPLEMENTATIONS[kind]` call holds over its forward and backward.

    Counts what the loss allocates beyond its inputs (hidden, weight, labels), with both hidden
    and weight requiring grad, including the gradients it returns when they are alive at the peak.
    Leaves out index vectors and row temporaries where they are small beside the rest. Matches
    `LiveTensorTracker` on CPU (torch 2.13, within 2% on the shapes in tests/nn/test_loss.py;
    the CUDA allocator rounds blocks up, and kernels' scratch space is not counted). Each kind's formula
    is a helper with its derivation (`_standard_peak_bytes`, `_chunked_peak_bytes`, `_fused_peak_bytes`),
    written with N tokens, K kept, V vocab, D dim, b dtype bytes, p projection bytes (4 for fp32, the
    default; 2 for bf16), L = an fp32 (., V) logits tile, "cast" = b != p, when copies of hidden/weight in
    the projection dtype are made.

    Args:
        kind: a key of `CE_IMPLEMENTATIONS`.
        n_tokens: N, positions in the batch (B * T).
        vocab, dim: V and D of the (V, D) output weight.
        dtype_bytes: bytes per element of hidden and weight (2 for bf16, 4 for fp32).
        n_kept: K, positions with a target; default all of them.
        n_chunks, chunk_tokens: as given to the chunked / fused implementation.
        weight_grad: whether the output weight requires grad (False for LoRA/QLoRA/DoRA, whose head is
            frozen: no (V, D) gradient is made, only the gradient wrt hidden).
        projection_bytes: bytes per element of the `projection_dtype` given to the loss: 4 for None
            (fp32), 2 for bf16/fp16.

    Returns:
        bytes, an int.
    """
    if kind not in CE_IMPLEMENTATIONS:
        raise ValueError(f"kind={kind!r}: unknown; choose one of {sorted(CE_IMPLEMENTATIONS)}")
    if projection_bytes not in (2, FP32_BYTES):
        raise ValueError(f"projection_bytes={projection_bytes}: 4 for an fp32 projection, 2 for bf16/fp16")
    N, V, D, b, p = n_tokens, vocab, dim, dtype_bytes, projection_bytes
    K = N if n_kept is None else n_kept
    if not 0 <= K <= N:
        raise ValueError(f"n_kept={n_kept}: must be between 0 and n_tokens={n_tokens}")
    if kind == "standard":
        return _standard_peak_bytes(N, V, D, b, p, weight_grad)
    if kind == "chunked":
        return _chunked_peak_bytes(N, K, V, D, b, p, weight_grad, n_chunks)
    return _fused_peak_bytes(N, K, V, D, b, p, weight_grad, chunk_tokens)


def _standard_peak_bytes(N: int, V: int, D: int, b: int, p: int, wg: bool) -> int:
    """`loss_peak_bytes` of `cross_entropy_sum`: the sum of `standard_peak_terms`."""
    return sum(n_bytes for _, n_bytes in standard_peak_terms(N, V, D, b, p, wg))


def standard_peak_terms(N: int, V: int, D: int, b: int, p: int, wg: bool) -> list[tuple[str, int]]:
    """What `cross_entropy_sum` holds at its peak, as (what, bytes) terms (letters as in `loss_peak_bytes`; wg:
    the weight trains), so that a report can show the arithmetic of the bytes it counts.

    The peak is in backward at log_softmax, which holds its saved output, the incoming gradient from nll_loss
    and its result: 3 (N, V) L, and the linear has saved the casts of weight (and of hidden, when the weight
    trains) when cast. Ignored tokens are projected too: N, not K. When (V, D) outweighs (N, V), the peak is
    later, at the matmul's backward: the logits' gradient in p, the gradients (N + V) x D in p (and the saved
    casts when cast); or, with b > p, when the weight's gradient is cast to b beside its p form.
    """
    cast = b != p
    pn = "fp32" if p == FP32_BYTES else f"{p} B"
    at_log_softmax = [(f"3 x {N:,} tokens x {V:,} vocab x fp32", 3 * N * V * FP32_BYTES)]
    if cast:
        at_log_softmax.append((f"the ({V:,}, {D:,}) head cast to {pn}", V * D * p))
    if cast and wg:
        at_log_softmax.append((f"the ({N:,}, {D:,}) hidden states cast to {pn}", N * D * p))
    if not wg:  # only the (N, D) gradient
        return at_log_softmax
    at_matmul = [(f"logits' gradient {N:,} x {V:,} x {p} B", N * V * p),
                 (f"gradients of hidden and head ({N:,} + {V:,}) x {D:,} x {p} B", (N + V) * D * p)]
    if cast:
        at_matmul.append(("their saved casts", (N + V) * D * p))
    at_grad_cast = [(f"the head's gradient in {p} B and {b} B", V * D * (p + b)),
                    (f"the hidden states' gradient in {p} B", N * D * p)] if b > p else []
    return max(at_log_softmax, at_matmul, at_grad_cast, key=lambda terms: sum(n for _, n in terms))


def _chunked_peak_bytes(N: int, K: int, V: int, D: int, b: int, p: int, wg: bool, n_chunks: int) -> int:
    """`loss_peak_bytes` of `chunked_cross_entropy_sum` (letters as there; wg: the weight trains).

    C = ceil(K / n_chunks). The same 3 tiles as the standard loss but (C, V); the peak is at the last chunk
    backward visits, when the weight gradient accumulated so far ((V, D) in b; when cast also a recomputed
    weight copy and the chunk's rows in p) and the other chunks' hidden gradients ((K - C, D), dtype, held
    until the split's backward) are alive, plus the gathered kept rows (K, D) when some tokens are ignored.
    When (V, D) outweighs 3 tiles, the peak is where autograd sums the chunks' weight gradients: 3 (V, D) in
    b (old sum, new term, new sum: the transposed matmul gradient is added out of place), or when cast, one
    tile, the weight copy and the chunk's weight gradient in p, and the accumulator in b.
    """
    cast = b != p
    C = -(-K // n_chunks)
    L = C * V * FP32_BYTES
    gathered = K * D * b if K < N else 0
    copies = cast * (V * D * p + C * D * p)  # the recomputed casts of the weight and the chunk's rows
    if not wg:  # nothing to accumulate
        return 3 * L + copies + (K - C) * D * b + gathered
    accumulate = max(L + V * D * (2 * p + b), 3 * V * D * b) if cast else 3 * V * D * b
    return max(3 * L + V * D * b + copies + (K - C) * D * b + gathered, accumulate)


def _fused_peak_bytes(N: int, K: int, V: int, D: int, b: int, p: int, wg: bool,
                      chunk_tokens: int | None) -> int:
    """`loss_peak_bytes` of `fused_linear_cross_entropy_sum` (letters as there; wg: the weight trains).

    C = chunk_tokens or `default_chunk_tokens(K, V, D)`. The peak is in forward, in a chunk: one (C, V) L tile
    (logits turned into their gradient in place; below fp32 also the tile in p, the matmul's output and the
    gradient's cast for the backward matmuls), the grad_weight accumulator (V, D) in p, grad_hidden (N, D) in
    dtype, the weight copy when cast, the chunk's rows and their gradient (C, D) in p, and the kept-row
    indices (K,). Or, with b > p, at the end, when the accumulator is cast to the weight's dtype. Backward
    scales in place, allocates nothing.
    """
    cast = b != p
    C = min(K, chunk_tokens or default_chunk_tokens(K, V, D))
    tile = C * V * (FP32_BYTES + (p < FP32_BYTES) * p)
    rows = C * D * (2 * p + cast * b) + K * INDEX_BYTES  # chunk rows in p, their gradient
    accumulator = V * D * p if wg else 0  # grad_weight, not made for a frozen head
    in_chunk = tile + accumulator + cast * V * D * p + N * D * b + rows
    at_end = wg * (b > p) * (V * D * (p + b) + N * D * b + K * INDEX_BYTES)
    return max(in_chunk, at_end)
