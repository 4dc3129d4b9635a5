"""Mixture-of-experts MLP (Qwen3-MoE) as pure functions: route, compute the chosen experts, load-balancing loss.

Read bottom-up: route → sort by expert → expert_linear → moe_mlp → router_stats → router_loss.
A sparse layer's weights (see `lowmem.nn.config.param_shapes`): `moe.router` (E, D), and the experts' gated MLPs
stacked along the rows, `moe.w1`, `moe.w3` (E * Fe, D) and `moe.w2` (E * D, Fe), plain or NF4 (QLoRA).
Shapes: N tokens (B * T flattened), D model dim, E experts, k experts per token, Fe an expert's hidden size,
M = N * k routed rows (one per token and chosen expert).

No Python loop runs per token. The tokens are sorted by expert once (`argsort`), so each expert's rows are
contiguous, then each projection is one grouped GEMM over all experts (`torch._grouped_mm`, which reads the
experts' row counts on the device: no host sync), where this torch runs it for the dtype and the shapes
(`grouped_mm_supported`); otherwise a loop over the experts (not the tokens), one matmul each, after one host
read of the counts. Results go back to their tokens with one `index_add`, weighted by the router's probabilities.
"""

from __future__ import annotations

import sys
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import is_fake

__all__ = [
    "Routing",
    "dequantize_experts",
    "expert_linear",
    "grouped_mm_supported",
    "moe_mlp",
    "route",
    "router_loss",
    "router_stats",
]

# torchao's NF4 module, found without importing torchao (see `lowmem.nn.llama.is_nf4`).
_NF4_MODULE = "torchao.quantization.quantize_.workflows.nf4.nf4_tensor"
# torch._grouped_mm wants every row stride of its operands a multiple of 16 bytes (checked on CPU, torch 2.13:
# "strides should be multiple of 16 bytes").
GROUPED_MM_ALIGN_BYTES = 16
# NF4 experts are dequantized this many elements at a time into one buffer: torchao's dequantization goes through
# int64 codes, about 4.8x the fp32 weight in scratch (tests/nn/test_quant.py), which for a whole layer's experts
# (Qwen3-30B-A3B: 128 x 768 x 2048 = 201M elements) would be 3.6 GiB; 16M elements keep it near 300 MiB.
NF4_DEQUANT_CHUNK_ELEMENTS = 1 << 24


class Routing(NamedTuple):
    """Where the tokens go: each token's k experts and weights, and the routed rows sorted by expert."""

    weights: torch.Tensor  # (N, k) in the hidden dtype: the chosen experts' (renormalised) probabilities
    experts: torch.Tensor  # (N, k) int64
    logits: torch.Tensor  # (N, E) in the hidden dtype, the router's output (for the load-balancing loss)
    order: torch.Tensor  # (M,) int64: routed row j of the sorted rows is flat (token, slot) index order[j]
    offsets: torch.Tensor  # (E,) int32: cumulative rows per expert in sorted order (`torch._grouped_mm`'s offs)


def _is_nf4(w: torch.Tensor) -> bool:
    module = sys.modules.get(_NF4_MODULE)
    return module is not None and isinstance(w, module.NF4Tensor)


def route(x: torch.Tensor, router: torch.Tensor, top_k: int, norm_topk_prob: bool) -> Routing:
    """The router: softmax over experts in fp32, the top k per token, optionally renormalised to sum to 1.

    x (N, D), router (E, D). As HF's Qwen3MoeTopKRouter: logits in x's dtype, probabilities in fp32, the chosen
    weights cast back to x's dtype. The routed rows are sorted by expert (stable, so within an expert tokens
    keep their order).
    """
    logits = F.linear(x, router)  # (N, E)
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    weights, experts = torch.topk(probs, top_k, dim=-1)  # (N, k)
    if norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    flat = experts.reshape(-1)  # (M,)
    order = torch.argsort(flat, stable=True)
    # (E,) rows per expert; a scatter rather than bincount, whose output length depends on the data
    counts = torch.zeros(router.shape[0], dtype=torch.int64, device=x.device).index_add_(0, flat, torch.ones_like(flat))
    return Routing(weights.to(logits.dtype), experts, logits, order, counts.cumsum(0).to(torch.int32))


def grouped_mm_supported(x: torch.Tensor, in_dim: int, out_dim: int) -> bool:
    """True where `torch._grouped_mm` runs this projection here: the op exists, x is bf16 (or fp32 on the CPU
    outside `torch.compile`: the CPU kernel takes fp32, but the op's fake-tensor rule, which compile traces with,
    demands bf16 as CUDA does; torch 2.13), and rows of in_dim and out_dim elements are multiples of 16 bytes."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    eager_cpu = x.device.type == "cpu" and not torch.compiler.is_compiling()
    dtypes = (torch.bfloat16, torch.float32) if eager_cpu else (torch.bfloat16,)
    size = x.element_size()
    return x.dtype in dtypes and (in_dim * size) % GROUPED_MM_ALIGN_BYTES == 0 and \
        (out_dim * size) % GROUPED_MM_ALIGN_BYTES == 0


def _grouped(xs: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, grouped: bool) -> torch.Tensor:
    """xs (M, in) sorted by expert, w (E, out, in) → (M, out): expert e's rows times w[e]^T.

    One `torch._grouped_mm` where `grouped`, else one matmul per expert over its rows (one host read of the
    offsets); an expert without rows costs nothing in either.
    """
    if is_fake(xs) and not (grouped and xs.dtype == torch.bfloat16):
        return _FakeGroupedMM.apply(xs, w, offsets)  # a dry run: see `_FakeGroupedMM`
    if grouped:
        return torch._grouped_mm(xs.contiguous(), w.transpose(-2, -1), offs=offsets)
    ends = offsets.tolist()
    starts = [0, *ends[:-1]]
    parts = [F.linear(xs[s:e], w[i]) for i, (s, e) in enumerate(zip(starts, ends, strict=True)) if e > s]
    return torch.cat(parts) if parts else xs.new_zeros(0, w.shape[1])


def _experts_per_chunk(w_nf4, n_experts: int, chunk_elements: int) -> int:
    """The most experts per dequantization piece within `chunk_elements` (at least 1) that divide n_experts and
    hold whole NF4 scaler blocks (what torchao's split of an NF4 tensor needs); n_experts where none does."""
    per_expert = w_nf4.numel() // n_experts
    quantum = w_nf4.block_size * w_nf4.scaler_block_size
    fits = [k for k in range(1, n_experts + 1) if n_experts % k == 0 and k * per_expert % quantum == 0]
    small = [k for k in fits if k * per_expert <= chunk_elements]
    return max(small) if small else min(fits, default=n_experts)


def dequantize_experts(w_nf4, n_experts: int, dtype: torch.dtype,
                       chunk_elements: int = NF4_DEQUANT_CHUNK_ELEMENTS) -> torch.Tensor:
    """NF4 stacked experts (E * out, in) → plain (E, out, in) in `dtype`, without gradient, dequantized a piece
    of experts at a time into one buffer, so torchao's scratch is that of a piece, not of the whole tensor."""
    rows, cols = w_nf4.shape
    k = _experts_per_chunk(w_nf4, n_experts, chunk_elements)
    piece_rows = k * (rows // n_experts)
    with torch.no_grad():
        if k == n_experts:
            return w_nf4.get_original_weight().to(dtype).view(n_experts, -1, cols)
        out = torch.empty(rows, cols, dtype=dtype, device=w_nf4.device)
        for i, piece in enumerate(torch.split(w_nf4, piece_rows)):
            out[i * piece_rows:(i + 1) * piece_rows] = piece.get_original_weight()
    return out.view(n_experts, -1, cols)


class _FakeGroupedMM(torch.autograd.Function):
    """`_grouped` on fake tensors (lowmem's FakeTensorMode dry runs) where torch cannot trace it: fp32, whose
    fake-tensor rule torch restricts to bf16, and the per-expert loop, which reads the experts' row counts on the
    host. Outputs of the right shape, saving what both real paths save: the weight (and the input where the
    weight trains) and the offsets."""

    @staticmethod
    def forward(ctx, xs, w, offsets):
        ctx.save_for_backward(xs if w.requires_grad else None, w, offsets)
        return xs.new_empty(xs.shape[0], w.shape[1])  # (M, out)

    @staticmethod
    def backward(ctx, grad):
        _, w, _ = ctx.saved_tensors
        grad_w = w.new_empty(w.shape) if ctx.needs_input_grad[1] else None
        return grad.new_empty(grad.shape[0], w.shape[2]), grad_w, None


class _NF4ExpertLinear(torch.autograd.Function):
    """`_grouped` through NF4 experts: dequantized for the forward and again for backward, never saved, as
    torchao's `linear_nf4` does for one weight. The frozen weight gets no gradient."""

    @staticmethod
    def forward(ctx, xs, w_nf4, offsets, n_experts, grouped):
        ctx.save_for_backward(offsets)
        ctx.w_nf4, ctx.n_experts, ctx.grouped = w_nf4, n_experts, grouped
        w = dequantize_experts(w_nf4, n_experts, xs.dtype)  # (E, out, in), a temporary
        return _grouped(xs, w, offsets, grouped)

    @staticmethod
    def backward(ctx, grad):
        (offsets,) = ctx.saved_tensors
        w = dequantize_experts(ctx.w_nf4, ctx.n_experts, grad.dtype)
        return _grouped(grad, w.transpose(-2, -1), offsets, ctx.grouped), None, None, None, None


def _base_expert_linear(xs: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, n_experts: int,
                        grouped: bool | None) -> torch.Tensor:
    out_dim, in_dim = w.shape[0] // n_experts, w.shape[1]
    if grouped is None:
        grouped = grouped_mm_supported(xs, in_dim, out_dim)
    if _is_nf4(w):
        return _NF4ExpertLinear.apply(xs, w, offsets, n_experts, grouped)
    return _grouped(xs, w.view(n_experts, out_dim, in_dim), offsets, grouped)


def expert_linear(xs: torch.Tensor, w, offsets: torch.Tensor, n_experts: int, *,
                  grouped: bool | None = None) -> torch.Tensor:
    """The routed rows through their experts' projection. xs (M, in) sorted by expert, w (E * out, in) plain or
    NF4, offsets (E,) int32 cumulative rows → (M, out) in xs's dtype.

    w may also be a `lowmem.nn.llama.AdaptedWeight` holding one LoRA adapter per expert, stacked as the weights
    are (A (E * r, in), B (E * out, r)): expert e's rows get W_e x + s B_e A_e d(x), both products grouped like
    the base. DoRA is refused on experts (`lowmem.nn.lora.add_adapters`).
    grouped: use `torch._grouped_mm` (True), the per-expert loop (False), or whichever runs here (None,
    `grouped_mm_supported`), chosen per product.
    """
    if isinstance(w, torch.Tensor):
        return _base_expert_linear(xs, w, offsets, n_experts, grouped)
    assert w.dora_m is None, "add_adapters refuses DoRA on experts"
    y = _base_expert_linear(xs, w.weight, offsets, n_experts, grouped)
    xd = F.dropout(xs, w.dropout) if w.dropout > 0 else xs
    low = _base_expert_linear(xd, w.lora_a, offsets, n_experts, grouped)  # (M, r)
    return y + _base_expert_linear(low, w.lora_b, offsets, n_experts, grouped) * w.scale


def moe_mlp(x: torch.Tensor, router: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor, *,
            top_k: int, norm_topk_prob: bool, grouped: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse gated MLP: each token through its top-k experts' SwiGLU, summed with the router's weights.

    x (B, T, D); router (E, D); w1, w3 (E * Fe, D); w2 (E * D, Fe), plain or NF4 → (B, T, D) in x's dtype, and
    the router logits (N, E) for `router_stats`. grouped: see `expert_linear`.
    """
    B, T, D = x.shape
    E = router.shape[0]
    x2 = x.reshape(B * T, D)  # (N, D)
    r = route(x2, router, top_k, norm_topk_prob)
    token_of = r.order // top_k  # (M,) the token of each sorted routed row
    xs = x2[token_of]  # (M, D)
    gate = expert_linear(xs, w1, r.offsets, E, grouped=grouped)  # (M, Fe)
    up = expert_linear(xs, w3, r.offsets, E, grouped=grouped)
    ys = expert_linear(F.silu(gate) * up, w2, r.offsets, E, grouped=grouped)  # (M, D)
    ys = ys * r.weights.reshape(-1)[r.order, None]
    # sorted by expert, so each token's k contributions add in expert order, as HF's loop over experts adds them
    y = x2.new_zeros(B * T, D).index_add(0, token_of, ys)
    return y.view(B, T, D), r.logits


def router_stats(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """One layer's share of the load-balancing loss: (2, E) fp32, row 0 how many routed rows each expert got
    (no gradient), row 1 the sum over tokens of its router probability.

    As transformers' `load_balancing_loss_func` (Qwen3-MoE, Mixtral): the probabilities are recomputed as a
    softmax in the logits' dtype and their own top k counted (in bf16 that may differ from the routing's fp32
    choice at a tie, and then so does HF's), summed in fp32.
    """
    probs = torch.softmax(logits, dim=-1)  # (N, E) in the logits' dtype
    E = logits.shape[-1]
    with torch.no_grad():
        chosen = torch.topk(probs, top_k, dim=-1).indices.reshape(-1)
        counts = torch.zeros(E, device=logits.device).index_add_(0, chosen, torch.ones(chosen.shape, device=logits.device))
    return torch.stack([counts, probs.float().sum(dim=0)])  # (2, E)


def router_loss(stats: list[torch.Tensor], top_k: int) -> torch.Tensor:
    """Switch Transformer's auxiliary loss (arXiv 2101.03961, eqs. 4-6) over every sparse layer: 0-d fp32.

    E * sum_e f_e P_e with f_e the fraction of routed rows expert e got and P_e its mean router probability,
    both over all layers' tokens pooled (transformers' `load_balancing_loss_func` without an attention mask;
    pooled, not a mean of per-layer losses). stats: each layer's `router_stats`.
    """
    total = torch.stack(stats).sum(dim=0)  # (2, E)
    E = total.shape[-1]
    rows = total[0].sum() / top_k  # tokens times sparse layers
    return E * torch.sum(total[0] / rows * (total[1] / rows))
