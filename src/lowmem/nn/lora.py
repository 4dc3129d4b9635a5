"""LoRA and DoRA as params → params transforms plus a trainable mask.

    settings = LoraSettings(rank=8, alpha=16, targets=("wq", "wv"))
    params = add_adapters(base, cfg, settings, seed=0)          # base + `*.lora_a`, `*.lora_b`
    for n in trainable_names(params): params[n].requires_grad_(True)
    hidden = forward(params, tokens, cfg, adapters=settings, training=True)
    merged = merge_adapters(params, settings)                   # plain params again, same function

Adapter tensors sit next to the weight they adapt: `layers.3.attn.wq.lora_a` (r, in), `.lora_b` (out, r)
and for DoRA `.dora_m` (out,). The math of the adapted linear is `lowmem.nn.llama.linear`; the settings
reach it through `forward(..., adapters=settings)`, so nothing here is global. `LoraSettings` and `TARGETS`
are defined in `lowmem.nn.lora_settings` (which the model imports too) and re-exported here.
"""

from __future__ import annotations

import math

import torch

from lowmem.nn.config import ModelConfig
from lowmem.nn.llama import ADAPTER_SUFFIXES, dense_weight, dora_row_norm
from lowmem.nn.lora_settings import TARGETS, LoraSettings, target_names

__all__ = [
    "TARGETS",
    "LoraSettings",
    "add_adapters",
    "adapted_names",
    "lora_delta",
    "merge_adapters",
    "trainable_names",
]

Params = dict[str, torch.Tensor]


def adapted_names(cfg: ModelConfig, settings: LoraSettings) -> list[str]:
    """Canonical names of the weights `settings` adapts, layer by layer in param order."""
    return target_names(cfg, settings.targets)


def add_adapters(params: Params, cfg: ModelConfig, settings: LoraSettings, *, seed: int,
                 dtype: torch.dtype | None = None) -> Params:
    """A new dict: `params` plus fresh adapter tensors for every targeted weight; `params` is not changed.

    A (r, in) is drawn like PEFT / nn.Linear, kaiming-uniform with a = sqrt(5), i.e. U(-1/sqrt(in),
    1/sqrt(in)); B (out, r) is zero, so the adapted model starts equal to the base. DoRA's magnitude
    m (out,) starts at the row norms of W (= ||W + s B A||_row since B = 0). Values are drawn in fp32 on
    the CPU from a local generator (deterministic in `seed`), then cast to `dtype` (default: the adapted
    weight's dtype) on the weight's device. New tensors have requires_grad False; see `trainable_names`.
    """
    existing = [n for n in params if n.endswith(ADAPTER_SUFFIXES)]
    if existing:
        raise ValueError(f"params already hold adapters ({existing[0]!r}, ...); merge or drop them first")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    out = dict(params)
    for name in adapted_names(cfg, settings):
        w = params[name]
        n_out, n_in = w.shape
        t_dtype = dtype or w.dtype
        # stacked experts get one adapter per expert, stacked as their weights are: A (E * r, in), B (E * out, r)
        n_experts = cfg.n_experts if ".moe." in name else 1
        if n_experts > 1 and settings.dora:
            raise ValueError(f"DoRA on a mixture-of-experts layer's experts ({name}) is not supported; use LoRA "
                             "there, or DoRA on the attention projections only")
        a = torch.empty(n_experts * settings.rank, n_in)
        for block in a.view(n_experts, settings.rank, n_in):
            torch.nn.init.kaiming_uniform_(block, a=math.sqrt(5), generator=gen)
        out[name + ".lora_a"] = a.to(device=w.device, dtype=t_dtype)
        out[name + ".lora_b"] = torch.zeros(n_out, settings.rank, device=w.device, dtype=t_dtype)
        if settings.dora:
            m = torch.linalg.norm(dense_weight(w).detach().float(), dim=1)  # (out,); NF4: dequantized
            out[name + ".dora_m"] = m.to(device=w.device, dtype=t_dtype)
    return out


def lora_delta(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """B @ A (out, in) of an adapter; for stacked experts (A (E * r, in), B (E * out, r): rows of A are E times
    B's columns) the block of each expert, B_e @ A_e, stacked along the rows as the weights are."""
    n_experts = a.shape[0] // b.shape[1]
    if n_experts == 1:
        return b @ a
    r = b.shape[1]
    return torch.bmm(b.view(n_experts, -1, r), a.view(n_experts, r, -1)).reshape(b.shape[0], a.shape[1])


def trainable_names(params: Params) -> list[str]:
    """Names of the adapter tensors in `params` (the trainable mask of a LoRA/DoRA run), in params order."""
    return [n for n in params if n.endswith(ADAPTER_SUFFIXES)]


def merge_adapters(params: Params, settings: LoraSettings) -> Params:
    """A new dict without adapter tensors, each adapted weight replaced by the weight it acts as.

    LoRA: W + s B A. DoRA: m / ||W + s B A||_row * (W + s B A), row-wise (PEFT's merge). Computed in fp32
    and cast back to W's dtype; the result needs no `adapters=` in `forward`.

    An NF4 W (QLoRA) is dequantized first, so the merge is exact with respect to the weight the NF4 forward
    used, and the merged weight is a plain tensor. NF4 weights without an adapter stay NF4; for a fully
    plain dict (export) use `merge_adapters(lowmem.nn.quant.dequantize_nf4(params), settings)`.
    """
    out = {n: t for n, t in params.items() if not n.endswith(ADAPTER_SUFFIXES)}
    for name in params:
        if not name.endswith(".lora_a"):
            continue
        base = name.removesuffix(".lora_a")
        w = params[base]
        with torch.no_grad():
            wf, a, b = dense_weight(w).float(), params[name].float(), params[base + ".lora_b"].float()
            merged = wf + settings.scale * lora_delta(a, b)  # (out, in)
            m = params.get(base + ".dora_m")
            if m is not None:
                merged = (m.float() / dora_row_norm(wf, a, b, settings.scale))[:, None] * merged
        out[base] = merged.to(w.dtype)
    return out
