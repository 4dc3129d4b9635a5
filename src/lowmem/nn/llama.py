"""Llama-lineage decoder as pure functions over a flat dict of tensors.

One set of layers serves every family (Llama, Mistral, Qwen2, Gemma, Gemma 2, Phi-3, Qwen3, OLMo 2); what
differs is a flag of `ModelConfig` (biases, sliding window, GeGLU, (1 + w) norms, sandwich or post-only norms,
q/k norms, soft-capping).
Read bottom-up: init → norm → rope → attention → mlp → block → forward → logits.
Canonical parameter names and shapes come from `lowmem.nn.config.param_shapes`. Weights follow the torch
Linear convention (out, in), so `F.linear(x, w)` applies them and HF checkpoints load by renaming only.
Shapes: B batch, T sequence, D model dim, H query heads, KV kv heads, hd head dim, F ffn dim, V vocab.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F

from lowmem.nn.config import LinearRopeScaling, Llama3RopeScaling, LongRopeScaling, ModelConfig, param_shapes
from lowmem.nn.moe import moe_mlp, router_loss, router_stats

if TYPE_CHECKING:
    from lowmem.nn.lora_settings import LoraSettings

__all__ = [
    "ADAPTER_SUFFIXES",
    "ATTENTION_KERNELS",
    "BLOCK_PARAM_NAMES",
    "AdaptedWeight",
    "DocSpans",
    "apply_rope",
    "attend",
    "attend_efficient",
    "attend_varlen",
    "attention",
    "attention_mask_bytes",
    "attention_saved_bytes",
    "attention_scale",
    "block_param_names",
    "causal_mask",
    "cu_seq_lens",
    "base_linear",
    "block",
    "dense_weight",
    "doc_mask",
    "doc_starts",
    "efficient_bias",
    "embed",
    "forward",
    "forward_with_router_loss",
    "init_params",
    "is_nf4",
    "layer_attention_inputs",
    "layer_rope_tables",
    "layer_masks",
    "linear",
    "logits",
    "mlp",
    "output_weight",
    "QKNorm",
    "qk_norm_of",
    "qkv",
    "residual_block",
    "residual_block_with_stats",
    "rms_norm",
    "rope_cache",
    "softcap",
]

Params = dict[str, torch.Tensor]

# Per-layer parameters in the order `block` takes them (after `h`), without the `layers.{i}.` prefix.
BLOCK_PARAM_NAMES = (
    "attn_norm", "attn.wq", "attn.wk", "attn.wv", "attn.wo",
    "mlp_norm", "mlp.w1", "mlp.w2", "mlp.w3",
)

# A sparse (mixture-of-experts) layer's MLP weights in place of mlp.w1, w2, w3 (`lowmem.nn.moe`).
MOE_PARAM_NAMES = ("moe.router", "moe.w1", "moe.w2", "moe.w3")

INIT_STD = 0.02

# Adapter tensors live in params next to the weight they adapt: `{name}.lora_a` (r, in),
# `{name}.lora_b` (out, r) and, for DoRA, `{name}.dora_m` (out,). See `lowmem.nn.lora`.
ADAPTER_SUFFIXES = (".lora_a", ".lora_b", ".dora_m")


def init_params(cfg: ModelConfig, seed: int, dtype: torch.dtype = torch.float32,
                device: torch.device | str = "cpu") -> Params:
    """Fresh parameters, deterministic in `seed` whatever `dtype` and `device` are.

    Matrices ~ N(0, 0.02); the residual output projections (wo, w2) are scaled by 1/sqrt(2 * n_layers)
    so the residual stream's variance does not grow with depth (GPT-2 paper, section 2.3); norms act as
    ones (stored as ones, or zeros where the norm scales by 1 + weight) and biases are zeros.
    Values are drawn in fp32 on the CPU from a local generator, then cast and moved tensor by tensor.
    Leaves have requires_grad False.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    out_std = INIT_STD / math.sqrt(2 * cfg.n_layers)
    params: Params = {}
    for name, shape in param_shapes(cfg).items():
        if name.endswith((".bq", ".bk", ".bv")) or (len(shape) == 1 and cfg.norm_unit_offset):
            t = torch.zeros(shape)
        elif len(shape) == 1:
            t = torch.ones(shape)
        else:
            std = out_std if name.endswith(("attn.wo", "mlp.w2", "moe.w2")) else INIT_STD
            t = torch.empty(shape).normal_(0.0, std, generator=gen)
        params[name] = t.to(device=device, dtype=dtype)
    return params


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, unit_offset: bool = False,
             scale_fp32: bool = False) -> torch.Tensor:
    """x / rms(x) * weight over the last dim, normalised in fp32. (..., D) → (..., D) in x's dtype.

    Llama casts back to x's dtype before scaling; with `unit_offset` (Gemma) the scale is 1 + weight and
    is applied in fp32 before the cast, as HF's GemmaRMSNorm does; `scale_fp32` (OLMo 2) applies the plain
    weight in fp32 before the cast, as HF's Olmo2RMSNorm does.
    """
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if unit_offset:
        return (xf * (1.0 + weight.float())).to(x.dtype)
    if scale_fp32:
        return (weight.float() * xf).to(x.dtype)
    return weight * xf.to(x.dtype)


def _norm(x: torch.Tensor, weight: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    return rms_norm(x, weight, cfg.norm_eps, cfg.norm_unit_offset, cfg.norm_scale_fp32)


def softcap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    """cap * tanh(x / cap): a smooth clamp to (-cap, cap) (Gemma 2's logit soft-capping); x when cap is None."""
    return x if cap is None else torch.tanh(x / cap) * cap


def _rope_inv_freq(cfg: ModelConfig, local: bool = False) -> torch.Tensor:
    """Inverse frequencies (rotary_dim/2,) fp32 of the global RoPE (`rope_theta`, Llama 3 or linear scaling
    applied when configured) or, with `local`, of the sliding layers' (`rope_local_theta`, unscaled).

    LongRoPE's factors depend on the batch's positions: see `rope_cache`.
    """
    rd = cfg.rotary_dim
    theta = cfg.rope_local_theta if local else cfg.rope_theta
    inv_freq = 1.0 / (theta ** (torch.arange(0, rd, 2, dtype=torch.float32) / rd))  # (rd/2,)
    s = None if local else cfg.rope_scaling
    if isinstance(s, LinearRopeScaling):
        return inv_freq / s.factor
    if not isinstance(s, Llama3RopeScaling):
        return inv_freq
    # Llama 3.1 scaling (Meta llama-models `apply_scaling`): long wavelengths are stretched by `factor`,
    # short ones kept, and the band between interpolated linearly in 1/wavelength.
    wavelen = 2 * math.pi / inv_freq
    low_freq_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_freq_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    smoothed = (1 - smooth) * inv_freq / s.factor + smooth * inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
    in_band = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(in_band, smoothed, scaled)


def rope_cache(cfg: ModelConfig, positions: torch.Tensor, local: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables for `positions` (B, T) int64 → two (B, T, rotary_dim) fp32 tensors.

    HF "rotate_half" layout: the two halves of the rotated dims share frequencies, so HF checkpoints need no
    q/k permutation. `local`: the sliding layers' RoPE (`ModelConfig.rope_local_theta`). LongRoPE divides the
    frequencies by its long factors when the batch's largest position is past the original context, else by
    the short ones, as transformers does per forward (picked on the device: no host sync), and scales cos and
    sin by its attention factor.
    """
    inv_freq = _rope_inv_freq(cfg, local).to(positions.device)  # (rd/2,)
    s = None if local else cfg.rope_scaling
    scale = 1.0
    if isinstance(s, LongRopeScaling):
        short = torch.tensor(s.short_factor, dtype=torch.float32, device=positions.device)
        long = torch.tensor(s.long_factor, dtype=torch.float32, device=positions.device)
        beyond = positions.max() + 1 > s.original_max_position_embeddings  # 0-dim bool
        inv_freq = inv_freq / torch.where(beyond, long, short)
        scale = s.attention_factor
    freqs = positions.float()[..., None] * inv_freq  # (B, T, rd/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, rd)
    if scale == 1.0:
        return emb.cos(), emb.sin()
    return emb.cos() * scale, emb.sin() * scale


def layer_rope_tables(cfg: ModelConfig, positions: torch.Tensor) -> list[tuple[torch.Tensor | None, ...]]:
    """Each layer's (cos, sin) (B, T, rotary_dim) fp32 by `ModelConfig.layer_rope`, or (None, None) for a NoPE
    layer. Each distinct RoPE is computed once and shared by its layers (Gemma 3: two; most families: one)."""
    tables: dict[str | None, tuple[torch.Tensor | None, ...]] = {None: (None, None)}
    out = []
    for i in range(cfg.n_layers):
        kind = cfg.layer_rope(i)
        if kind not in tables:
            tables[kind] = rope_cache(cfg, positions, local=kind == "local")
        out.append(tables[kind])
    return out


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, fp32: bool = False) -> torch.Tensor:
    """Rotate x (B, H, T, hd) by cos/sin (B, T, rd) → x's shape and dtype; dims past rd (partial rotary,
    Phi-4-mini) pass through unchanged.

    Computed in x's dtype (cos/sin rounded to it, as HF Llama does), or with `fp32` in fp32 and rounded once at
    the end (OLMo 2, whose rotary embedding keeps cos/sin fp32).
    """
    rd = cos.shape[-1]
    if rd < x.shape[-1]:
        # joined along the head dim in (B, T, H, hd) order, the memory order of q and k (`qkv` transposes views):
        # SDPA's output then takes that order too, and wo reads it without a copy, as with whole-head RoPE
        parts = (apply_rope(x[..., :rd], cos, sin, fp32).transpose(1, 2), x[..., rd:].transpose(1, 2))
        return torch.cat(parts, dim=-1).transpose(1, 2)  # (B, H, T, hd)
    dtype = torch.float32 if fp32 else x.dtype
    cos = cos[:, None].to(dtype)  # (B, 1, T, hd)
    sin = sin[:, None].to(dtype)
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)  # rotate_half
    return (x * cos + rotated * sin).to(x.dtype)


def causal_mask(T: int, device: torch.device, window: int | None = None, start: int = 0) -> torch.Tensor:
    """Boolean mask (T, start + T) for T queries at positions start.. over keys 0..start+T-1.

    True where key j <= query position i and, with a sliding `window`, j > i - window (HF's
    `sliding_window_overlay`: a query sees `window` keys, itself included).
    """
    i = torch.arange(start, start + T, device=device)[:, None]  # (T, 1)
    j = torch.arange(start + T, device=device)[None, :]  # (1, L)
    mask = j <= i
    if window is not None:
        mask = mask & (j > i - window)
    return mask  # (T, L)


def doc_mask(doc_ids: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """Boolean attention mask (B, 1, T, T) from doc_ids (B, T): True where key j <= query i, same doc,
    and (with a sliding `window`) i - j < window."""
    T = doc_ids.shape[-1]
    same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]  # (B, T, T)
    return (causal_mask(T, doc_ids.device, window) & same_doc)[:, None]  # (B, 1, T, T)


def layer_masks(cfg: ModelConfig, T: int, doc_ids: torch.Tensor | None,
                device: torch.device) -> list[torch.Tensor | None]:
    """The attention mask of each layer: None for plain causal (SDPA's is_causal), else bool (B|1, 1, T, T).

    Layers sharing a window share one mask tensor.
    """
    by_window: dict[int | None, torch.Tensor | None] = {}
    masks = []
    for i in range(cfg.n_layers):
        window = cfg.layer_window(i)
        if window is not None and window >= T:
            window = None  # the window reaches back past the first token: plain causal
        if window not in by_window:
            if doc_ids is not None:
                by_window[window] = doc_mask(doc_ids, window)
            else:
                by_window[window] = None if window is None else causal_mask(T, device, window)[None, None]
        masks.append(by_window[window])
    return masks


def layer_attention_inputs(cfg: ModelConfig, kernel: str, B: int, T: int, doc_ids: torch.Tensor | None,
                           device: torch.device, dtype: torch.dtype) -> list:
    """Each layer's attention input for `kernel` (the `mask` argument of `block`), built once per forward.

    "sdpa": `layer_masks`. "sdpa-efficient": None or, where `layer_masks` has a mask, its `efficient_bias` in
    `dtype` (the params' dtype; one tensor per window, shared). "varlen": a `DocSpans` per layer over one
    `cu_seq`: the documents' spans when `doc_ids` is given (`doc_starts`; one host sync), else one span per
    row (no sync), with the layer's sliding window where it is shorter than T.
    """
    if kernel == "sdpa":
        return layer_masks(cfg, T, doc_ids, device)
    if kernel == "sdpa-efficient":
        masks = layer_masks(cfg, T, doc_ids, device)
        biases = {id(m): efficient_bias(m, dtype) for m in masks if m is not None}  # one per distinct mask
        return [None if m is None else biases[id(m)] for m in masks]
    if doc_ids is None:
        cu_seq = torch.arange(0, B * T + 1, T, dtype=torch.int32, device=device)  # (B + 1,) one row each
    else:
        cu_seq = cu_seq_lens(doc_starts(doc_ids))  # (n_docs + 1,)
        # its length changes from batch to batch: a compiled block (`torch.compile(dynamic=False)`) would
        # otherwise compile again for every new number of documents
        torch._dynamo.mark_dynamic(cu_seq, 0)
    spans = []
    for i in range(cfg.n_layers):
        window = cfg.layer_window(i)
        spans.append(DocSpans(cu_seq, T, None if window is None or window >= T else window))
    return spans


class AdaptedWeight(NamedTuple):
    """A frozen weight (out, in) with its LoRA (or DoRA) adapter: a leaf type that `linear` dispatches on.

    `forward` builds these from params holding `{name}.lora_a` etc.; plain weights stay plain tensors.
    """

    weight: torch.Tensor  # (out, in)
    lora_a: torch.Tensor  # (r, in)
    lora_b: torch.Tensor  # (out, r)
    dora_m: torch.Tensor | None  # (out,) DoRA magnitude, None for plain LoRA
    scale: float  # alpha / r
    dropout: float  # probability applied to the adapter's input; 0.0 outside training

    @property
    def shape(self) -> torch.Size:
        return self.weight.shape


Weight = torch.Tensor | AdaptedWeight


# The module that defines torchao's NF4Tensor (QLoRA base weights, made by `lowmem.nn.quant`). llama.py does not
# import torchao (seconds of import time a dense run does not need): while that module is not loaded, no NF4
# tensor can exist, so a weight is NF4 only if the module is loaded and the weight is an instance of its class.
_NF4_MODULE = "torchao.quantization.quantize_.workflows.nf4.nf4_tensor"


def is_nf4(w: torch.Tensor) -> bool:
    """True when `w` is a torchao NF4 tensor (a frozen 4-bit base weight, see `lowmem.nn.quant`)."""
    module = sys.modules.get(_NF4_MODULE)
    return module is not None and isinstance(w, module.NF4Tensor)


def dense_weight(w: torch.Tensor) -> torch.Tensor:
    """`w` itself, or for an NF4 weight a fresh dequantized copy (out, in) in its dtype, without gradient."""
    if not is_nf4(w):
        return w
    with torch.no_grad():
        return w.get_original_weight()


def base_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x (..., in) → (..., out) through a plain or NF4 weight (out, in), no adapter.

    NF4 goes through torchao's `linear_nf4`: forward dequantizes the weight into a temporary, multiplies and
    drops it; autograd saves only the NF4 tensor, and backward dequantizes again to return the gradient wrt
    x and none for the frozen weight. So no full-precision copy of the weight outlives the op.
    """
    if is_nf4(w):
        return sys.modules[_NF4_MODULE].linear_nf4(x, w)
    return F.linear(x, w)


def dora_row_norm(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                  scale: float) -> torch.Tensor:
    """||W + scale * B @ A|| over the input dim, one value per output row (out,), without gradient.

    DoRA (arXiv 2402.09353, section 4.3) treats this norm as a constant in backprop; PEFT detaches it too.
    """
    with torch.no_grad():
        return torch.linalg.norm(weight + scale * (lora_b @ lora_a), dim=1).to(weight.dtype)  # (out,)


def linear(x: torch.Tensor, w: Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., in) → (..., out) through a plain weight (out, in) or an `AdaptedWeight`, plus `bias` (out,).

    The bias belongs to the base layer: it stays in full precision next to an NF4 weight and the adapter's
    update adds to the biased base output (as PEFT's LoRA layer does around an nn.Linear with bias).

    LoRA:  W x + s B A d(x), with d dropout on the adapter's input only.
    DoRA:  W x + (g - 1) W d(x) + g s B A d(x), g = m / ||W + s B A||_row (detached); without dropout this
    is g (W + s B A) x, the DoRA weight m (W + s B A) / ||W + s B A||_row. Same grouping as PEFT's
    `DoraLinearVariant.forward`, so the two agree to rounding.

    W may be an NF4 tensor (QLoRA), plain or as `AdaptedWeight.weight`; W x then runs through `base_linear`.
    DoRA over NF4 takes the row norm of the dequantized W (a temporary, no gradient): the norm is a
    detached constant anyway, and the dequantized W is exactly the weight the NF4 forward multiplies by.
    """
    y = _adapted_linear(x, w)
    return y if bias is None else y + bias


def _adapted_linear(x: torch.Tensor, w: Weight) -> torch.Tensor:
    if isinstance(w, torch.Tensor):
        return base_linear(x, w)
    y = base_linear(x, w.weight)
    xd = F.dropout(x, w.dropout) if w.dropout > 0 else x
    lora = F.linear(F.linear(xd, w.lora_a), w.lora_b) * w.scale  # (..., out)
    if w.dora_m is None:
        return y + lora
    g = w.dora_m / dora_row_norm(dense_weight(w.weight), w.lora_a, w.lora_b, w.scale)  # (out,)
    yd = y if xd is x else base_linear(xd, w.weight)
    return y + (g - 1) * yd + g * lora


class QKNorm(NamedTuple):
    """RMSNorm of queries and keys between their projection and RoPE (`ModelConfig.qk_norm`).

    over "head": each head over head_dim, weights (hd,) (Qwen3); "projection": the whole projection before it is
    split into heads, weights (H*hd,) and (KV*hd,) (OLMo 2). eps, unit_offset, scale_fp32: see `rms_norm`.
    """

    q_weight: torch.Tensor
    k_weight: torch.Tensor
    over: str
    eps: float
    unit_offset: bool = False
    scale_fp32: bool = False

    def __call__(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, weight, self.eps, self.unit_offset, self.scale_fp32)


def qk_norm_of(w: dict[str, Weight], cfg: ModelConfig) -> QKNorm | None:
    """The layer's `QKNorm` from its weights by `block_param_names`, or None where cfg has no q/k norm."""
    if cfg.qk_norm is None:
        return None
    return QKNorm(w["attn.q_norm"], w["attn.k_norm"], cfg.qk_norm, cfg.norm_eps, cfg.norm_unit_offset,
                  cfg.norm_scale_fp32)


def qkv(x: torch.Tensor, wq: Weight, wk: Weight, wv: Weight, cos: torch.Tensor | None, sin: torch.Tensor | None,
        n_heads: int, n_kv_heads: int, bq: torch.Tensor | None = None, bk: torch.Tensor | None = None,
        bv: torch.Tensor | None = None, *, qk_norm: QKNorm | None = None,
        rope_fp32: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Queries (B, H, T, hd) and keys, values (B, KV, T, hd) of x (B, T, D), RoPE applied to q and k (not where
    cos and sin are None: a NoPE layer).

    qk_norm: q and k are normed after the projection (and its bias), before RoPE. rope_fp32: see `apply_rope`.
    """
    B, T, _ = x.shape
    hd = wq.shape[0] // n_heads
    q = linear(x, wq, bq)  # (B, T, H*hd)
    k = linear(x, wk, bk)  # (B, T, KV*hd)
    if qk_norm is not None and qk_norm.over == "projection":
        q, k = qk_norm(q, qk_norm.q_weight), qk_norm(k, qk_norm.k_weight)
    q = q.view(B, T, n_heads, hd)
    k = k.view(B, T, n_kv_heads, hd)
    if qk_norm is not None and qk_norm.over == "head":
        q, k = qk_norm(q, qk_norm.q_weight), qk_norm(k, qk_norm.k_weight)
    q = q.transpose(1, 2)  # (B, H, T, hd)
    k = k.transpose(1, 2)  # (B, KV, T, hd)
    v = linear(x, wv, bv).view(B, T, n_kv_heads, hd).transpose(1, 2)  # (B, KV, T, hd)
    if cos is None:  # a NoPE layer (SmolLM3)
        return q, k, v
    return apply_rope(q, cos, sin, rope_fp32), apply_rope(k, cos, sin, rope_fp32), v


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, *,
           scale: float | None = None, logit_softcap: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale) v over grouped kv heads. q (B, H, T, hd), k/v (B, KV, L, hd) → (B, H, T, hd).

    mask: None for plain causal (T == L), else bool broadcastable to (B, H, T, L), True = attend.
    scale: default 1 / sqrt(hd). logit_softcap: scores become cap * tanh(scores / cap) before masking
    (Gemma 2); SDPA has no such hook, so that path computes the (B, H, T, L) scores explicitly, softmax in
    fp32, as HF's eager Gemma 2 attention does.
    """
    H, KV = q.shape[1], k.shape[1]
    if KV != H:
        # Query head h reads kv head h // (H / KV), as in HF `repeat_kv`. Expanded by hand rather than
        # SDPA's enable_gqa so torch < 2.5 works and every SDPA backend sees the same shapes.
        k = k.repeat_interleave(H // KV, dim=1)  # (B, H, L, hd)
        v = v.repeat_interleave(H // KV, dim=1)
    if logit_softcap is None:
        if mask is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    T, L = q.shape[2], k.shape[2]
    if mask is None:
        mask = causal_mask(T, q.device, start=L - T)
    scores = softcap((q @ k.transpose(-2, -1)) * (scale or q.shape[-1] ** -0.5), logit_softcap)  # (B, H, T, L)
    scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(dim=-1, dtype=torch.float32).to(q.dtype) @ v  # (B, H, T, hd)


# -- attention kernels on CUDA -------------------------------------------------------------------------
#
# "sdpa" is `attend`: SDPA picks its backend. With a (B, 1, T, T) mask flash attention is ruled out, and where
# nothing else fits (and always on fake CUDA) the math kernel runs, saving the (B, H, T, T) probabilities in fp32
# (issue #14: 2.09 GiB per layer at T = 4096 for llama3.2-1b, 33x the efficient kernel). The two CUDA kernels
# below are called as themselves, not through SDPA's dispatch, so no other backend can run in their place.

ATTENTION_KERNELS = ("sdpa", "sdpa-efficient", "varlen")
FP32_BYTES = 4
EFFICIENT_BIAS_ALIGN = 16  # the memory-efficient kernel wants the bias's row stride a multiple of 16 elements
EFFICIENT_LSE_ALIGN = 32  # ...and rounds its logsumexp's length up to a multiple of 32 (its query block)
RNG_STATE_BYTES = 16  # the (unused, dropout is 0) Philox seed and offset both kernels save: two 8-byte words


class DocSpans(NamedTuple):
    """Where the packed documents lie in the flattened (B*T) tokens: one layer's input to `attend_varlen`.

    `forward` builds `cu_seq` once and shares it between layers (a layer with a sliding window differs only in
    `window`). `max_len` is T, an upper bound on a document's length: the kernel skips the query blocks past a
    document's end, and a bound known without reading the data back keeps the host from waiting for the GPU
    and `torch.compile` from specializing on a batch's longest document.
    """

    cu_seq: torch.Tensor  # (n_docs + 1,) int32: document i is flattened tokens cu_seq[i]:cu_seq[i + 1]
    max_len: int  # upper bound on any document's length
    window: int | None  # keys a query sees, itself included (`causal_mask`); None: every earlier key


def doc_starts(doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) bool, True at each document's first token: column 0 of every row and where `doc_ids` changes.

    These are the tokens where `lowmem.data.loader.make_batch`'s positions are 0, and for documents that are
    contiguous in their row (as packing makes them) the spans they delimit are exactly `doc_mask`'s blocks.
    """
    starts = torch.ones(doc_ids.shape, dtype=torch.bool, device=doc_ids.device)  # (B, T)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    return starts


def cu_seq_lens(starts: torch.Tensor) -> torch.Tensor:
    """Cumulative document offsets (n_docs + 1,) int32 into the flattened tokens, from (B, T) bool `starts`.

    Entries are the flattened indices of the starts, then B * T; column 0 counts as a start in every row, so
    no document crosses a row. The number of documents depends on the data: `nonzero` reads it back from the
    device (one host sync, once per forward).
    """
    B, T = starts.shape
    starts = starts.clone()
    starts[:, 0] = True
    first = starts.reshape(-1).nonzero().squeeze(1)  # (n_docs,) int64
    end = torch.full((1,), B * T, dtype=first.dtype, device=first.device)
    return torch.cat((first, end)).to(torch.int32)  # (n_docs + 1,)


def attend_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spans: DocSpans, *,
                  scale: float | None = None) -> torch.Tensor:
    """Causal attention within each packed document through `torch.nn.attention.varlen.varlen_attn`.

    q (B, H, T, hd), k/v (B, KV, T, hd) in bf16 or fp16 → (B, H, T, hd) (a view of the kernel's (B*T, H, hd)
    output). Grouped kv heads are read in place (`enable_gqa`), never repeated. Nothing of size T x T is made:
    the kernel saves its inputs, its output and an fp32 logsumexp (H, B*T) (see `attention_saved_bytes`).
    A sliding window of `w` keys (itself included) is flash attention's `window_size=(w - 1, 0)`.
    """
    from torch.nn.attention.varlen import varlen_attn  # registers the op; imported where it is used

    if q.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"attention_kernel='varlen' computes in bf16 or fp16 only (flash attention); the block "
                         f"computes in {q.dtype}: use attention_kernel='sdpa-efficient' for fp32 compute")
    B, H, T, hd = q.shape
    KV = k.shape[1]
    flat_q = q.transpose(1, 2).reshape(B * T, H, hd)  # (B*T, H, hd)
    flat_k = k.transpose(1, 2).reshape(B * T, KV, hd)  # (B*T, KV, hd)
    flat_v = v.transpose(1, 2).reshape(B * T, KV, hd)
    window = (-1, 0) if spans.window is None else (spans.window - 1, 0)
    y = varlen_attn(flat_q, flat_k, flat_v, spans.cu_seq, spans.cu_seq, spans.max_len, spans.max_len,
                    scale=scale, window_size=window, enable_gqa=KV != H)  # (B*T, H, hd)
    return y.view(B, T, H, hd).transpose(1, 2)  # (B, H, T, hd)


def efficient_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The memory-efficient kernel's additive mask: 0 where `mask` (bool, (..., T, L)) attends, -inf elsewhere.

    (..., T, L) in `dtype` (the kernel's compute dtype), a view of a buffer whose rows are padded to a multiple
    of 16 elements, as the kernel requires (SDPA pads the same way). A float `mask` is copied as it is.
    """
    *lead, T, L = mask.shape
    padded = -(-L // EFFICIENT_BIAS_ALIGN) * EFFICIENT_BIAS_ALIGN
    bias = torch.zeros((*lead, T, padded), dtype=dtype, device=mask.device)[..., :L]
    if mask.dtype == torch.bool:
        return bias.masked_fill_(mask.logical_not(), float("-inf"))
    return bias.copy_(mask)


def attend_efficient(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, *,
                     scale: float | None = None) -> torch.Tensor:
    """`attend` through the memory-efficient kernel (`aten._scaled_dot_product_efficient_attention`) only.

    q (B, H, T, hd), k/v (B, KV, T, hd), any float dtype → (B, H, T, hd). bias: None for plain causal
    (the kernel's own causal mode), else an additive (B|1, 1, T, T) mask from `efficient_bias`; `forward` makes
    it once per window and every layer shares it (a block computing in another dtype casts it, keeping a copy
    per layer). Grouped kv heads are repeated, as SDPA needs them. Saves its inputs, its output and an fp32
    logsumexp (B, H, T rounded up to 32), not T x T (see `attention_saved_bytes`).
    """
    B, H, T, _ = q.shape
    KV = k.shape[1]
    if KV != H:
        k = k.repeat_interleave(H // KV, dim=1)  # (B, H, T, hd)
        v = v.repeat_interleave(H // KV, dim=1)
    if bias is not None:
        if bias.dtype != q.dtype:
            bias = efficient_bias(bias, q.dtype)
        bias = bias.expand(B, H, T, T)  # a view: one head's mask, stride 0 over heads
    need_lse = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    y, *_ = torch.ops.aten._scaled_dot_product_efficient_attention(
        q, k, v, bias, need_lse, 0.0, bias is None, scale=scale)  # (B, H, T, hd), logsumexp, rng words
    return y


def attention_saved_bytes(kernel: str, B: int, T: int, n_heads: int, n_kv_heads: int, head_dim: int,
                          dtype_bytes: int) -> int:
    """Bytes one layer's attention kernel saves for backward: from the rotated q, k, v to its output.

    Counted as distinct storages under `saved_tensors_hooks` on fake CUDA (tests/nn/test_cuda_attention.py
    checks every kernel exactly). Leaves out what `forward` builds once and every layer shares:
    `attention_mask_bytes`.

    - "math", what unrouted SDPA runs on fake CUDA (and on a GPU where no fused kernel fits): the softmax
      probabilities (B, H, T, T) and the scaled q, k and v it multiplies, all in fp32 (torch upcasts bf16/fp16
      there). Its output is re-laid out for wo by a copy, which wo saves when it trains.
    - "sdpa-efficient": q and k, v repeated to all H heads, the output (its memory in (B, T, H, hd) order: it is
      the very tensor wo reads, no copy), the fp32 logsumexp (B, H, T rounded up to 32) and two RNG words.
    - "varlen": q (B*T, H, hd), k and v with their KV heads only, the output (again wo's input), the fp32
      logsumexp (H, B*T) and the RNG words.

    Args:
        kernel: "math", "sdpa-efficient" or "varlen". ("sdpa" is whichever backend torch picks: on CPU the
            planner's own formula covers it.)
        B, T: batch and sequence length. n_heads, n_kv_heads, head_dim: the model's attention shape.
        dtype_bytes: bytes per element of the compute dtype (2 for bf16/fp16, 4 for fp32).

    Returns:
        bytes, an int.
    """
    H, KV, hd, b = n_heads, n_kv_heads, head_dim, dtype_bytes
    head_tensor = B * H * T * hd  # elements of a (B, H, T, hd) tensor
    if kernel == "math":
        return B * H * T * T * FP32_BYTES + 3 * head_tensor * FP32_BYTES
    if kernel == "sdpa-efficient":
        lse = B * H * (-(-T // EFFICIENT_LSE_ALIGN) * EFFICIENT_LSE_ALIGN) * FP32_BYTES
        return 4 * head_tensor * b + lse + RNG_STATE_BYTES
    if kernel == "varlen":
        return 2 * head_tensor * b + 2 * B * KV * T * hd * b + H * B * T * FP32_BYTES + RNG_STATE_BYTES
    raise ValueError(f"kernel={kernel!r}: attention_saved_bytes knows 'math', 'sdpa-efficient' and 'varlen'")


def attention_mask_bytes(kernel: str, B: int, T: int, dtype_bytes: int) -> int:
    """Bytes of one mask `forward` builds, once per distinct sliding window, for every layer with that window.

    A mask exists where documents are packed (leading dim B) or, without packing, where a sliding window is
    shorter than T (leading dim 1: pass B = 1). "sdpa"/"math": a bool (B, 1, T, T). "sdpa-efficient": the
    additive (B, 1, T, T) bias in the compute dtype, rows padded to 16 elements, which every such layer's
    kernel saves (one storage: count it once). "varlen": nothing of that size (`cu_seq`, (n_docs + 1) int32,
    is left out).
    """
    if kernel not in (*ATTENTION_KERNELS, "math"):
        raise ValueError(f"kernel={kernel!r}: choose one of {[*ATTENTION_KERNELS, 'math']}")
    if kernel == "varlen":
        return 0
    if kernel == "sdpa-efficient":
        return B * T * (-(-T // EFFICIENT_BIAS_ALIGN) * EFFICIENT_BIAS_ALIGN) * dtype_bytes
    return B * T * T


def attention_scale(cfg: ModelConfig) -> float | None:
    """The score scale: query_pre_attn_scalar ** -1/2 where set (Gemma 2), else None (1 / sqrt(head_dim))."""
    return None if cfg.query_pre_attn_scalar is None else cfg.query_pre_attn_scalar ** -0.5


def attention(x: torch.Tensor, wq: Weight, wk: Weight, wv: Weight, wo: Weight,
              cos: torch.Tensor | None, sin: torch.Tensor | None, mask: torch.Tensor | None,
              n_heads: int, n_kv_heads: int, *, bq: torch.Tensor | None = None,
              bk: torch.Tensor | None = None, bv: torch.Tensor | None = None, scale: float | None = None,
              logit_softcap: float | None = None, kernel: str = "sdpa", qk_norm: QKNorm | None = None,
              rope_fp32: bool = False) -> torch.Tensor:
    """Causal grouped-query self-attention with RoPE. x (B, T, D) → (B, T, D).

    mask: what `layer_attention_inputs` gives the layer for `kernel`: for "sdpa" None (plain causal) or a
    boolean (B|1, 1, T, T) mask (True = attend) that already includes causality (see `doc_mask`); for
    "sdpa-efficient" None or the additive mask of `efficient_bias`; for "varlen" the layer's `DocSpans`.
    bq/bk/bv: optional biases (Qwen2). scale, logit_softcap: see `attend` (only "sdpa" soft-caps).
    qk_norm, rope_fp32: see `qkv` (Qwen3, OLMo 2).
    """
    B, T, _ = x.shape
    q, k, v = qkv(x, wq, wk, wv, cos, sin, n_heads, n_kv_heads, bq, bk, bv, qk_norm=qk_norm, rope_fp32=rope_fp32)
    if kernel == "varlen":
        assert isinstance(mask, DocSpans) and logit_softcap is None, "forward checks the kernel's inputs"
        y = attend_varlen(q, k, v, mask, scale=scale)  # (B, H, T, hd)
    elif kernel == "sdpa-efficient":
        assert logit_softcap is None, "forward refuses soft-capping with this kernel"
        y = attend_efficient(q, k, v, mask, scale=scale)
    else:
        y = attend(q, k, v, mask, scale=scale, logit_softcap=logit_softcap)
    y = y.transpose(1, 2).reshape(B, T, -1)  # (B, T, H*hd)
    return linear(y, wo)  # (B, T, D)


def mlp(x: torch.Tensor, w1: Weight, w2: Weight, w3: Weight, act: str = "silu") -> torch.Tensor:
    """Gated MLP: w2(act(w1 x) * w3 x). x (B, T, D) → (B, T, D); w1, w3 (F, D), w2 (D, F).

    act "silu" is SwiGLU (Llama); "gelu_tanh" is GeGLU with the tanh approximation (Gemma).
    """
    gate = linear(x, w1)
    gate = F.silu(gate) if act == "silu" else F.gelu(gate, approximate="tanh")
    return linear(gate * linear(x, w3), w2)


def block_param_names(cfg: ModelConfig, layer: int | None = None) -> tuple[str, ...]:
    """Per-layer parameter names in the order `block` takes them (after `h`), without `layers.{i}.`.

    The first is always a norm, never adapted or quantized: the activation-checkpointing and FSDP seams
    recognise a block by that tensor. Without pre-norms (OLMo 2) it is `attn_post_norm`. A sparse layer
    (`cfg.is_moe_layer(layer)`) has `MOE_PARAM_NAMES` in place of mlp.w1, w2, w3; `layer` may be left out
    where every layer is alike.
    """
    kinds = {cfg.is_moe_layer(i) for i in range(cfg.n_layers)}
    if layer is None and len(kinds) > 1:
        raise ValueError("this config mixes dense and sparse MLP layers: pass the layer to block_param_names")
    sparse = cfg.is_moe_layer(0 if layer is None else layer)
    names = BLOCK_PARAM_NAMES
    if sparse:
        names = (*names[:-3], *MOE_PARAM_NAMES)
    if not cfg.pre_norms:
        names = ("attn_post_norm", *(n for n in names if n not in ("attn_norm", "mlp_norm")), "mlp_post_norm")
    if cfg.qkv_bias:
        names += ("attn.bq", "attn.bk", "attn.bv")
    if cfg.sandwich_norms and cfg.pre_norms:
        names += ("attn_post_norm", "mlp_post_norm")
    if cfg.qk_norm is not None:
        names += ("attn.q_norm", "attn.k_norm")
    return names


def residual_block(h: torch.Tensor, w: dict[str, Weight], attn_fn: Callable[[torch.Tensor], torch.Tensor],
                   cfg: ModelConfig) -> torch.Tensor:
    """Residual block around `attn_fn` (B, T, D) → (B, T, D); w maps `block_param_names` to weights.

    Pre-norm; with sandwich norms (Gemma 2) each sublayer's output is normed again before it joins the
    residual; without pre-norms (OLMo 2) that output norm is the only one. A sparse layer's router statistics
    are dropped (see `residual_block_with_stats`).
    """
    return residual_block_with_stats(h, w, attn_fn, cfg)[0]


def residual_block_with_stats(h: torch.Tensor, w: dict[str, Weight],
                              attn_fn: Callable[[torch.Tensor], torch.Tensor],
                              cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`residual_block`, and for a sparse layer (w holds `moe.router`) its `router_stats` (2, E), else None."""
    a = attn_fn(_norm(h, w["attn_norm"], cfg) if cfg.pre_norms else h)
    if cfg.sandwich_norms:
        a = _norm(a, w["attn_post_norm"], cfg)
    h = h + a
    x = _norm(h, w["mlp_norm"], cfg) if cfg.pre_norms else h
    stats = None
    if "moe.router" in w:
        m, router_logits = moe_mlp(x, *_moe_weights(w), top_k=cfg.n_experts_per_token,
                                   norm_topk_prob=cfg.norm_topk_prob)
        stats = router_stats(router_logits, cfg.n_experts_per_token)
    else:
        m = mlp(x, w["mlp.w1"], w["mlp.w2"], w["mlp.w3"], cfg.mlp_act)
    if cfg.sandwich_norms:
        m = _norm(m, w["mlp_post_norm"], cfg)
    return h + m, stats


def _moe_weights(w: dict[str, Weight]) -> tuple[Weight, ...]:
    """The router and experts of a sparse layer (experts plain, NF4 or `AdaptedWeight`; the router plain)."""
    weights = tuple(w[n] for n in MOE_PARAM_NAMES)
    assert not isinstance(weights[0], AdaptedWeight), "the router is never a LoRA target"
    return weights


def block(h: torch.Tensor, *tensors: Weight | None, cfg: ModelConfig, attention_kernel: str = "sdpa",
          layer: int | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """One pre-norm transformer block. h (B, T, D) → (B, T, D); a sparse layer returns (h, router_stats (2, E)).

    tensors: the layer's weights in `block_param_names(cfg, layer)` order (for Llama: attn_norm, wq, wk, wv, wo,
    mlp_norm, w1, w2, w3), then cos, sin (B, T, hd) and mask (the layer's `layer_attention_inputs` entry:
    for "sdpa" None or bool (B|1, 1, T, T)). attention_kernel: see `forward`.
    """
    *weights, cos, sin, mask = tensors
    w = dict(zip(block_param_names(cfg, layer), weights, strict=True))

    def attn_fn(x: torch.Tensor) -> torch.Tensor:
        return attention(x, w["attn.wq"], w["attn.wk"], w["attn.wv"], w["attn.wo"], cos, sin, mask,
                         cfg.n_heads, cfg.n_kv_heads, bq=w.get("attn.bq"), bk=w.get("attn.bk"),
                         bv=w.get("attn.bv"), scale=attention_scale(cfg), logit_softcap=cfg.attn_logit_softcap,
                         kernel=attention_kernel, qk_norm=qk_norm_of(w, cfg), rope_fp32=cfg.rope_fp32)

    h, stats = residual_block_with_stats(h, w, attn_fn, cfg)
    return h if stats is None else (h, stats)


def embed(params: Params, tokens: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """Token embeddings (B, T, D) in the params' dtype; times sqrt(dim) rounded to that dtype for Gemma."""
    h = F.embedding(tokens, params["tok_embeddings"])  # (B, T, D)
    if cfg.embed_scale:
        h = h * torch.tensor(cfg.dim ** 0.5, dtype=h.dtype)  # HF's `normalizer`, in the hidden dtype
    return h


def _call(block_fn: Callable[..., torch.Tensor], *tensors: torch.Tensor | None) -> torch.Tensor:
    return block_fn(*tensors)


def forward(params: Params, tokens: torch.Tensor, cfg: ModelConfig, *,
            positions: torch.Tensor | None = None, doc_ids: torch.Tensor | None = None,
            run_block: Callable[..., torch.Tensor] | None = None,
            adapters: LoraSettings | None = None, training: bool = False,
            attention_kernel: str = "sdpa") -> torch.Tensor:
    """Hidden states after the final norm.

    Args:
        params: canonical name → tensor (see `param_shapes`); compute runs in their dtype.
        tokens: (B, T) int64 token ids.
        positions: (B, T) int64 RoPE positions, restarting at 0 for each packed document;
            default arange(T) in every row.
        doc_ids: (B, T) int32/int64 document id per token. When given, a token attends only to earlier
            tokens of the same document (explicit boolean mask through SDPA); when None, plain causal.
        run_block: activation-checkpointing seam, called once per layer as
            `run_block(block_fn, h, attn_norm, wq, wk, wv, wo, mlp_norm, w1, w2, w3, cos, sin, mask)`
            and must return `block_fn(*those args)`; for other families the weights are those of
            `block_param_names(cfg)` (biases, extra norms appended after w3). Every argument after
            `block_fn` is positional and is a tensor, except cos and sin, both None in a NoPE layer
            (SmolLM3), and `mask`, which is None for plain causal
            attention (no `doc_ids` and no sliding window shorter than T) and for "varlen" a `DocSpans`
            (a NamedTuple of a tensor and ints). `h` is (B, T, D) in the params' dtype, cos/sin are
            (B, T, rotary_dim) fp32 (`layer_rope_tables`), mask is (B, 1, T, T) bool ("sdpa") or float ("sdpa-efficient"). So
            `lambda f, *a: torch.utils.checkpoint.checkpoint(f, *a, use_reentrant=False)` works.
            Default: call `block_fn(*args)` directly. A weight that carries an adapter arrives as an
            `AdaptedWeight` (a NamedTuple of tensors and floats) instead of a tensor.
        adapters: the LoRA/DoRA settings (`lowmem.nn.lora.LoraSettings`) that params' adapter tensors
            were made with; its `scale` and `dropout` reach each adapted linear through `AdaptedWeight`.
            Required when params hold adapter tensors (`*.lora_a`), ignored otherwise.
        training: apply the adapters' dropout (as PEFT does in train mode); False for evaluation.
        attention_kernel: how attention runs (`ATTENTION_KERNELS`; the plan's `strategies.attention_kernel`):
            "sdpa": `F.scaled_dot_product_attention`, backend chosen by torch, with a (B, 1, T, T) bool
            mask for packed documents (the CPU's kernel). The other two are CUDA kernels called directly, so
            the math kernel cannot run in their place, and neither soft-caps attention logits (Gemma 2):
            "varlen": flash attention over the packed documents (`attend_varlen`), bf16/fp16 compute, never
            T x T; `mask` is then a `DocSpans`. "sdpa-efficient": the memory-efficient kernel
            (`attend_efficient`), any float dtype, for fp32 compute; packed documents (or a sliding window)
            go in as one additive (B|1, 1, T, T) mask per window shared by the layers; `mask` is that
            float tensor or None. Numbers agree with "sdpa" to rounding.

    Returns:
        (B, T, D) hidden states in the params' dtype.
    """
    return _forward_with_stats(params, tokens, cfg, positions, doc_ids, run_block, adapters, training,
                               attention_kernel)[0]


def forward_with_router_loss(params: Params, tokens: torch.Tensor, cfg: ModelConfig, *,
                             positions: torch.Tensor | None = None, doc_ids: torch.Tensor | None = None,
                             run_block: Callable[..., torch.Tensor] | None = None,
                             adapters: LoraSettings | None = None, training: bool = False,
                             attention_kernel: str = "sdpa") -> tuple[torch.Tensor, torch.Tensor | None]:
    """`forward`'s hidden states (B, T, D) and the mixture-of-experts load-balancing loss (0-d fp32) over every
    sparse layer (`lowmem.nn.moe.router_loss`, transformers' `aux_loss`), or None for a dense model.

    A sparse block returns (h, router_stats), so `run_block` passes a tuple through (checkpointing does).
    """
    hidden, stats = _forward_with_stats(params, tokens, cfg, positions, doc_ids, run_block, adapters, training,
                                        attention_kernel)
    return hidden, (router_loss(stats, cfg.n_experts_per_token) if stats else None)


def _forward_with_stats(params: Params, tokens: torch.Tensor, cfg: ModelConfig, positions: torch.Tensor | None,
                        doc_ids: torch.Tensor | None, run_block: Callable[..., torch.Tensor] | None,
                        adapters: LoraSettings | None, training: bool,
                        attention_kernel: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """`forward`, and the `router_stats` (2, E) of each sparse layer (an empty list for a dense model)."""
    B, T = tokens.shape
    _check_forward_inputs(cfg, tokens, positions, doc_ids, attention_kernel)
    if positions is None:
        positions = torch.arange(T, device=tokens.device).expand(B, T)
    run_block = run_block or _call
    ropes = layer_rope_tables(cfg, positions)  # per layer: (B, T, rotary_dim) cos, sin; None, None for NoPE
    # layers of one kind share one block function (one compiled graph); mixed dense and sparse layers each say theirs
    mixed = len({cfg.is_moe_layer(i) for i in range(cfg.n_layers)}) > 1
    block_fns = {None: partial(block, cfg=cfg, attention_kernel=attention_kernel)}
    h = embed(params, tokens, cfg)  # (B, T, D)
    masks = layer_attention_inputs(cfg, attention_kernel, B, T, doc_ids, tokens.device, h.dtype)  # per layer
    stats = []
    for i in range(cfg.n_layers):
        key = i if mixed else None
        block_fn = block_fns.get(key) or partial(block, cfg=cfg, attention_kernel=attention_kernel, layer=key)
        layer = [_weight(params, f"layers.{i}.{n}", adapters, training) for n in block_param_names(cfg, key)]
        out = run_block(block_fn, h, *layer, *ropes[i], masks[i])
        if isinstance(out, tuple):
            h, layer_stats = out
            stats.append(layer_stats)
        else:
            h = out
    return _norm(h, params["norm"], cfg), stats


def _check_forward_inputs(cfg: ModelConfig, tokens: torch.Tensor, positions: torch.Tensor | None,
                          doc_ids: torch.Tensor | None, attention_kernel: str) -> None:
    """Refuse a batch `forward` cannot run: tokens (B, T) longer than the model's context, a kernel that
    cannot run this model here (`_check_attention_kernel`), positions or doc_ids on another device."""
    T = tokens.shape[1]
    if T > cfg.max_seq_len:
        raise ValueError(f"sequence length {T} exceeds cfg.max_seq_len = {cfg.max_seq_len}")
    _check_attention_kernel(attention_kernel, cfg, tokens.device)
    for name, t in (("positions", positions), ("doc_ids", doc_ids)):
        if t is not None and t.device != tokens.device:
            # varlen's kernel would take its document offsets from the host unchecked on fake CUDA
            raise ValueError(f"{name} are on {t.device} but tokens on {tokens.device}: move the whole batch to "
                             "the device the model runs on")


def _check_attention_kernel(kernel: str, cfg: ModelConfig, device: torch.device) -> None:
    if kernel not in ATTENTION_KERNELS:
        raise ValueError(f"attention_kernel={kernel!r}: unknown; choose one of {list(ATTENTION_KERNELS)}")
    if kernel == "sdpa":
        return
    if cfg.attn_logit_softcap is not None:
        raise ValueError(
            f"attention_kernel={kernel!r} cannot soft-cap attention logits, and this {cfg.family} model has "
            f"attn_logit_softcap = {cfg.attn_logit_softcap} (Gemma 2); use attention_kernel='sdpa', which "
            "computes the capped (B, H, T, T) scores explicitly")
    if device.type != "cuda":
        raise ValueError(f"attention_kernel={kernel!r} is a CUDA kernel, but the tokens are on {device}; "
                         "use attention_kernel='sdpa' off CUDA")


def _weight(params: Params, name: str, adapters: LoraSettings | None, training: bool) -> Weight:
    """params[name], or an `AdaptedWeight` when params hold `{name}.lora_a`."""
    lora_a = params.get(name + ".lora_a")
    if lora_a is None:
        return params[name]
    if adapters is None:
        raise ValueError(
            f"params hold a LoRA adapter ({name}.lora_a) but forward got adapters=None; pass the "
            "LoraSettings the adapters were made with (adapters=...), or merge them first "
            "(lowmem.nn.lora.merge_adapters)"
        )
    return AdaptedWeight(params[name], lora_a, params[name + ".lora_b"], params.get(name + ".dora_m"),
                         adapters.scale, adapters.dropout if training else 0.0)


def output_weight(params: Params, cfg: ModelConfig) -> torch.Tensor:
    """The (V, D) output projection: `tok_embeddings` when tied, else `output`."""
    return params["tok_embeddings"] if cfg.tie_embeddings else params["output"]


def logits(params: Params, hidden: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """hidden (..., D) → logits (..., V) in hidden's dtype, soft-capped where `cfg.final_logit_softcap` is set.

    Materialises every logit; training computes its loss through `lowmem.nn.loss` instead, which must then
    be given `softcap=cfg.final_logit_softcap`.
    """
    return softcap(F.linear(hidden, output_weight(params, cfg)), cfg.final_logit_softcap)
