"""Llama-architecture decoder as pure functions over a flat dict of tensors.

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

from lowmem.nn.config import ModelConfig, param_shapes

if TYPE_CHECKING:
    from lowmem.nn.lora import LoraSettings

__all__ = [
    "ADAPTER_SUFFIXES",
    "BLOCK_PARAM_NAMES",
    "AdaptedWeight",
    "apply_rope",
    "attention",
    "base_linear",
    "block",
    "dense_weight",
    "doc_mask",
    "forward",
    "init_params",
    "is_nf4",
    "linear",
    "logits",
    "mlp",
    "output_weight",
    "rms_norm",
    "rope_cache",
]

Params = dict[str, torch.Tensor]

# Per-layer parameters in the order `block` takes them (after `h`), without the `layers.{i}.` prefix.
BLOCK_PARAM_NAMES = (
    "attn_norm", "attn.wq", "attn.wk", "attn.wv", "attn.wo",
    "mlp_norm", "mlp.w1", "mlp.w2", "mlp.w3",
)

INIT_STD = 0.02

# Adapter tensors live in params next to the weight they adapt: `{name}.lora_a` (r, in),
# `{name}.lora_b` (out, r) and, for DoRA, `{name}.dora_m` (out,). See `lowmem.nn.lora`.
ADAPTER_SUFFIXES = (".lora_a", ".lora_b", ".dora_m")


def init_params(cfg: ModelConfig, seed: int, dtype: torch.dtype = torch.float32,
                device: torch.device | str = "cpu") -> Params:
    """Fresh parameters, deterministic in `seed` whatever `dtype` and `device` are.

    Matrices ~ N(0, 0.02); the residual output projections (wo, w2) are scaled by 1/sqrt(2 * n_layers)
    so the residual stream's variance does not grow with depth (GPT-2 paper, section 2.3); norms are ones.
    Values are drawn in fp32 on the CPU from a local generator, then cast and moved tensor by tensor.
    Leaves have requires_grad False.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    out_std = INIT_STD / math.sqrt(2 * cfg.n_layers)
    params: Params = {}
    for name, shape in param_shapes(cfg).items():
        if len(shape) == 1:
            t = torch.ones(shape)
        else:
            std = out_std if name.endswith(("attn.wo", "mlp.w2")) else INIT_STD
            t = torch.empty(shape).normal_(0.0, std, generator=gen)
        params[name] = t.to(device=device, dtype=dtype)
    return params


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) * weight over the last dim, normalised in fp32 and cast back to x's dtype. (..., D)"""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def _rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies (hd/2,) fp32, with Llama 3 scaling applied when configured."""
    hd = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))  # (hd/2,)
    s = cfg.rope_scaling
    if s is None:
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


def rope_cache(cfg: ModelConfig, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables for `positions` (B, T) int64 → two (B, T, hd) fp32 tensors.

    HF "rotate_half" layout: the two halves of each head dim share frequencies, so HF checkpoints need no
    q/k permutation.
    """
    inv_freq = _rope_inv_freq(cfg).to(positions.device)  # (hd/2,)
    freqs = positions.float()[..., None] * inv_freq  # (B, T, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, hd)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, H, T, hd) by cos/sin (B, T, hd), in x's dtype."""
    cos = cos[:, None].to(x.dtype)  # (B, 1, T, hd)
    sin = sin[:, None].to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)  # rotate_half
    return x * cos + rotated * sin


def doc_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """Boolean attention mask (B, 1, T, T) from doc_ids (B, T): True where key j <= query i, same doc."""
    T = doc_ids.shape[-1]
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()  # (T, T)
    same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]  # (B, T, T)
    return (causal & same_doc)[:, None]  # (B, 1, T, T)


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


def linear(x: torch.Tensor, w: Weight) -> torch.Tensor:
    """x (..., in) → (..., out) through a plain weight (out, in) or an `AdaptedWeight`.

    LoRA:  W x + s B A d(x), with d dropout on the adapter's input only.
    DoRA:  W x + (g - 1) W d(x) + g s B A d(x), g = m / ||W + s B A||_row (detached); without dropout this
    is g (W + s B A) x, the DoRA weight m (W + s B A) / ||W + s B A||_row. Same grouping as PEFT's
    `DoraLinearVariant.forward`, so the two agree to rounding.

    W may be an NF4 tensor (QLoRA), plain or as `AdaptedWeight.weight`; W x then runs through `base_linear`.
    DoRA over NF4 takes the row norm of the dequantized W (a temporary, no gradient): the norm is a
    detached constant anyway, and the dequantized W is exactly the weight the NF4 forward multiplies by.
    """
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


def attention(x: torch.Tensor, wq: Weight, wk: Weight, wv: Weight, wo: Weight,
              cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
              n_heads: int, n_kv_heads: int) -> torch.Tensor:
    """Causal grouped-query self-attention with RoPE. x (B, T, D) → (B, T, D).

    mask: None for plain causal attention, else a boolean (B, 1, T, T) mask (True = attend) that
    already includes causality (see `doc_mask`).
    """
    B, T, _ = x.shape
    hd = wq.shape[0] // n_heads
    q = linear(x, wq).view(B, T, n_heads, hd).transpose(1, 2)  # (B, H, T, hd)
    k = linear(x, wk).view(B, T, n_kv_heads, hd).transpose(1, 2)  # (B, KV, T, hd)
    v = linear(x, wv).view(B, T, n_kv_heads, hd).transpose(1, 2)  # (B, KV, T, hd)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    if n_kv_heads != n_heads:
        # Query head h reads kv head h // (H / KV), as in HF `repeat_kv`. Expanded by hand rather than
        # SDPA's enable_gqa so torch < 2.5 works and every SDPA backend sees the same shapes.
        rep = n_heads // n_kv_heads
        k = k.repeat_interleave(rep, dim=1)  # (B, H, T, hd)
        v = v.repeat_interleave(rep, dim=1)
    if mask is None:
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, hd)
    else:
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    y = y.transpose(1, 2).reshape(B, T, n_heads * hd)  # (B, T, H*hd)
    return linear(y, wo)  # (B, T, D)


def mlp(x: torch.Tensor, w1: Weight, w2: Weight, w3: Weight) -> torch.Tensor:
    """SwiGLU: w2(silu(w1 x) * w3 x). x (B, T, D) → (B, T, D); w1, w3 (F, D), w2 (D, F)."""
    return linear(F.silu(linear(x, w1)) * linear(x, w3), w2)


def block(h: torch.Tensor, attn_norm: torch.Tensor, wq: Weight, wk: Weight, wv: Weight, wo: Weight,
          mlp_norm: torch.Tensor, w1: Weight, w2: Weight, w3: Weight, cos: torch.Tensor, sin: torch.Tensor,
          mask: torch.Tensor | None, *, cfg: ModelConfig) -> torch.Tensor:
    """One pre-norm transformer block. h (B, T, D) → (B, T, D)."""
    h = h + attention(rms_norm(h, attn_norm, cfg.norm_eps), wq, wk, wv, wo, cos, sin, mask,
                      cfg.n_heads, cfg.n_kv_heads)
    return h + mlp(rms_norm(h, mlp_norm, cfg.norm_eps), w1, w2, w3)


def _call(block_fn: Callable[..., torch.Tensor], *tensors: torch.Tensor | None) -> torch.Tensor:
    return block_fn(*tensors)


def forward(params: Params, tokens: torch.Tensor, cfg: ModelConfig, *,
            positions: torch.Tensor | None = None, doc_ids: torch.Tensor | None = None,
            run_block: Callable[..., torch.Tensor] | None = None,
            adapters: LoraSettings | None = None, training: bool = False) -> torch.Tensor:
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
            and must return `block_fn(*those args)`. Every argument after `block_fn` is positional and is
            a tensor, except `mask`, which is None when `doc_ids` is None. `h` is (B, T, D) in the
            params' dtype, cos/sin are (B, T, hd) fp32, mask is (B, 1, T, T) bool. So
            `lambda f, *a: torch.utils.checkpoint.checkpoint(f, *a, use_reentrant=False)` works.
            Default: call `block_fn(*args)` directly. A weight that carries an adapter arrives as an
            `AdaptedWeight` (a NamedTuple of tensors and floats) instead of a tensor.
        adapters: the LoRA/DoRA settings (`lowmem.nn.lora.LoraSettings`) that params' adapter tensors
            were made with; its `scale` and `dropout` reach each adapted linear through `AdaptedWeight`.
            Required when params hold adapter tensors (`*.lora_a`), ignored otherwise.
        training: apply the adapters' dropout (as PEFT does in train mode); False for evaluation.

    Returns:
        (B, T, D) hidden states in the params' dtype.
    """
    B, T = tokens.shape
    if T > cfg.max_seq_len:
        raise ValueError(f"sequence length {T} exceeds cfg.max_seq_len = {cfg.max_seq_len}")
    if positions is None:
        positions = torch.arange(T, device=tokens.device).expand(B, T)
    run_block = run_block or _call
    cos, sin = rope_cache(cfg, positions)  # (B, T, hd) each
    mask = None if doc_ids is None else doc_mask(doc_ids)  # (B, 1, T, T)
    block_fn = partial(block, cfg=cfg)
    h = F.embedding(tokens, params["tok_embeddings"])  # (B, T, D)
    for i in range(cfg.n_layers):
        layer = [_weight(params, f"layers.{i}.{n}", adapters, training) for n in BLOCK_PARAM_NAMES]
        h = run_block(block_fn, h, *layer, cos, sin, mask)
    return rms_norm(h, params["norm"], cfg.norm_eps)


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
    """hidden (..., D) → logits (..., V) in hidden's dtype.

    Materialises every logit; training computes its loss through `lowmem.nn.loss` instead.
    """
    return F.linear(hidden, output_weight(params, cfg))
