"""Autoregressive text generation with a preallocated KV cache, over the functional Llama in `llama.py`.

    cfg, params = load_hf("run/model")
    new_ids = generate(params, cfg, [[1, 42, 7]], max_new_tokens=32, temperature=0.8, top_p=0.9, seed=0)

Read bottom-up: cache → attention_with_cache → block_with_cache → prefill / decode_step → sample → generate.
The model math is llama.py's (`embed`, `qkv`, `attend`, `residual_block`, `logits`), for every family;
only where attention's keys and values come from differs: the cache. Weights with adapters go through the
same `linear`, so LoRA/DoRA runs generate without merging.
Shapes: B batch, T new tokens this call, L cached length, D model dim, H/KV heads, hd head dim, V vocab.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch

from lowmem.nn.config import ModelConfig
from lowmem.nn.llama import (
    QKNorm,
    Weight,
    _norm,
    _weight,
    attend,
    attention_scale,
    block_param_names,
    causal_mask,
    embed,
    layer_rope_tables,
    linear,
    logits,
    qk_norm_of,
    qkv,
    residual_block,
)

if TYPE_CHECKING:
    from lowmem.nn.lora_settings import LoraSettings

__all__ = [
    "KVCache",
    "ModelFiles",
    "attention_with_cache",
    "decode_step",
    "find_model_files",
    "generate",
    "init_cache",
    "load_model",
    "prefill",
    "sample",
]

Params = dict[str, torch.Tensor]


# ---------------------------------------------------------------------------------------------------------
# cache


@dataclass
class KVCache:
    """Per-layer keys and values, each (B, KV, capacity, hd), for up to `max_len` positions; `length` are done.

    A full-attention layer's capacity is `max_len`, filled in order. A sliding-window layer (Mistral, Phi-3,
    Gemma 2's even layers) keeps only the last `window` positions, since no later query reaches further back,
    so its cache is bounded by the window however long the text: after each step its first
    min(length, window) slots hold positions length - min(length, window) .. length - 1, oldest first.
    The tensors are preallocated once; `prefill` and `decode_step` write into them and advance `length`.
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    windows: list[int | None]  # per layer: its sliding window, or None for full attention
    max_len: int
    length: int = 0

    @property
    def n_bytes(self) -> int:
        """Bytes the cache tensors hold."""
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype: torch.dtype = torch.float32,
               device: torch.device | str = "cpu") -> KVCache:
    """An empty cache for `batch` sequences of at most `max_len` tokens (prompt included)."""
    if max_len > cfg.max_seq_len:
        raise ValueError(f"cache length {max_len} exceeds cfg.max_seq_len = {cfg.max_seq_len}; "
                         "shorten the prompt or ask for fewer new tokens")
    windows = [cfg.layer_window(i) for i in range(cfg.n_layers)]
    shapes = [(batch, cfg.n_kv_heads, max_len if w is None else min(w, max_len), cfg.head_dim) for w in windows]
    return KVCache(keys=[torch.zeros(shape, dtype=dtype, device=device) for shape in shapes],
                   values=[torch.zeros(shape, dtype=dtype, device=device) for shape in shapes],
                   windows=windows, max_len=max_len)


# ---------------------------------------------------------------------------------------------------------
# model with cache


def attention_with_cache(x: torch.Tensor, wq: Weight, wk: Weight, wv: Weight, wo: Weight,
                         cos: torch.Tensor | None, sin: torch.Tensor | None, cache_k: torch.Tensor,
                         cache_v: torch.Tensor, start: int, n_heads: int, n_kv_heads: int, *, bq: torch.Tensor | None = None,
                         bk: torch.Tensor | None = None, bv: torch.Tensor | None = None,
                         window: int | None = None, scale: float | None = None,
                         logit_softcap: float | None = None, qk_norm: QKNorm | None = None,
                         rope_fp32: bool = False) -> torch.Tensor:
    """`llama.attention` for T new tokens at positions start..start+T-1 that also attend to the cache.

    x (B, T, D) → (B, T, D). A query at position p attends to keys 0..p, or with a sliding `window` to
    keys p - window + 1..p. Without a window, the new keys and values (after RoPE) are written into
    cache_k/cache_v (B, KV, max_len, hd) at [start, start + T). With one, the cache (B, KV, window, hd)
    holds the last min(start, window) positions before `start` (see `KVCache`) and is updated to the last
    min(start + T, window) positions after this call.
    """
    B, T, _ = x.shape
    end = start + T
    q, k, v = qkv(x, wq, wk, wv, cos, sin, n_heads, n_kv_heads, bq, bk, bv, qk_norm=qk_norm, rope_fp32=rope_fp32)
    if window is None:
        cache_k[:, :, start:end] = k
        cache_v[:, :, start:end] = v
        k, v = cache_k[:, :, :end], cache_v[:, :, :end]  # (B, KV, L, hd), L = end
        # Query i sits at position start + i, so it sees keys 0..start + i: a causal mask shifted by `start`.
        mask = causal_mask(T, x.device, None, start)  # (T, L)
    else:
        n_cached = min(start, cache_k.shape[2])
        first = start - n_cached  # the position of the oldest cached key
        k = torch.cat([cache_k[:, :, :n_cached], k], dim=2)  # (B, KV, L, hd), L = n_cached + T
        v = torch.cat([cache_v[:, :, :n_cached], v], dim=2)
        mask = causal_mask(T, x.device, window, start)[:, first:]  # (T, L): keys first..end-1
        n_kept = min(end, cache_k.shape[2])
        cache_k[:, :, :n_kept] = k[:, :, -n_kept:]  # `k` is a new tensor (cat): no overlap with the cache
        cache_v[:, :, :n_kept] = v[:, :, -n_kept:]
    y = attend(q, k, v, mask, scale=scale, logit_softcap=logit_softcap)  # (B, H, T, hd)
    y = y.transpose(1, 2).reshape(B, T, -1)  # (B, T, H*hd)
    return linear(y, wo)  # (B, T, D)


def block_with_cache(h: torch.Tensor, weights: dict[str, Weight], cos: torch.Tensor | None,
                     sin: torch.Tensor | None, cache_k: torch.Tensor, cache_v: torch.Tensor, start: int, window: int | None, *,
                     cfg: ModelConfig) -> torch.Tensor:
    """`llama.block` with `attention_with_cache`. h (B, T, D) → (B, T, D); weights by `block_param_names`."""
    w = weights

    def attn_fn(x: torch.Tensor) -> torch.Tensor:
        return attention_with_cache(x, w["attn.wq"], w["attn.wk"], w["attn.wv"], w["attn.wo"], cos, sin,
                                    cache_k, cache_v, start, cfg.n_heads, cfg.n_kv_heads, bq=w.get("attn.bq"),
                                    bk=w.get("attn.bk"), bv=w.get("attn.bv"), window=window,
                                    scale=attention_scale(cfg), logit_softcap=cfg.attn_logit_softcap,
                                    qk_norm=qk_norm_of(w, cfg), rope_fp32=cfg.rope_fp32)

    return residual_block(h, w, attn_fn, cfg)


def _forward_with_cache(params: Params, tokens: torch.Tensor, cfg: ModelConfig, cache: KVCache,
                        adapters: LoraSettings | None) -> torch.Tensor:
    """Logits (B, V) fp32 of the last of `tokens` (B, T), which continue the cache; advances the cache."""
    B, T = tokens.shape
    start = cache.length
    if start + T > cache.max_len:
        raise ValueError(f"{start} cached + {T} new tokens exceed the cache's {cache.max_len} positions")
    positions = torch.arange(start, start + T, device=tokens.device).expand(B, T)
    ropes = layer_rope_tables(cfg, positions)  # per layer: (B, T, rotary_dim) cos, sin, or None, None
    h = embed(params, tokens, cfg)  # (B, T, D)
    for i in range(cfg.n_layers):
        layer = {n: _weight(params, f"layers.{i}.{n}", adapters, False) for n in block_param_names(cfg, i)}
        h = block_with_cache(h, layer, *ropes[i], cache.keys[i], cache.values[i], start, cache.windows[i],
                             cfg=cfg)
    cache.length = start + T
    hidden = _norm(h[:, -1], params["norm"], cfg)  # (B, D): only the last position is sampled
    return logits(params, hidden, cfg).float()  # (B, V)


def prefill(params: Params, prompt: torch.Tensor, cfg: ModelConfig, cache: KVCache, *,
            adapters: LoraSettings | None = None) -> torch.Tensor:
    """Run the prompt (B, T) int64 through the model into an empty cache; logits (B, V) fp32 of its last token."""
    if cache.length != 0:
        raise ValueError(f"prefill needs an empty cache; this one holds {cache.length} positions")
    return _forward_with_cache(params, prompt, cfg, cache, adapters)


def decode_step(params: Params, token: torch.Tensor, cfg: ModelConfig, cache: KVCache, *,
                adapters: LoraSettings | None = None) -> torch.Tensor:
    """Feed one token per sequence (B,) int64 after the cached ones; logits (B, V) fp32 for the next."""
    return _forward_with_cache(params, token[:, None], cfg, cache, adapters)


# ---------------------------------------------------------------------------------------------------------
# sampling


def sample(logits_: torch.Tensor, *, temperature: float = 0.0, top_k: int | None = None,
           top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids (B,) int64 from logits (B, V).

    temperature 0 is greedy (argmax; top_k and top_p change nothing then). Otherwise the logits are divided
    by the temperature, cut to the `top_k` largest, then to the smallest set whose probability reaches
    `top_p` (nucleus sampling, Holtzman et al. 2019, arXiv 1904.09751; the most likely token always
    stays), and one token is drawn with `generator`.
    """
    if temperature == 0.0:
        return logits_.argmax(dim=-1)
    scores = logits_.float() / temperature  # (B, V)
    if top_k is not None and top_k < scores.shape[-1]:
        kth = scores.topk(top_k, dim=-1).values[:, -1:]  # (B, 1)
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_scores, order = scores.sort(dim=-1, descending=True)  # (B, V)
        probs = sorted_scores.softmax(dim=-1)
        # Drop a token when the more likely ones before it already reach top_p.
        drop_sorted = probs.cumsum(dim=-1) - probs >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
        scores = scores.masked_fill(drop, float("-inf"))
    probs = scores.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]  # (B,)


def _check_sampling(max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens = {max_new_tokens!r}: must be an integer >= 0")
    if not temperature >= 0.0:
        raise ValueError(f"temperature = {temperature!r}: must be >= 0 (0 is greedy)")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k = {top_k!r}: must be an integer >= 1, or None for no cut")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p = {top_p!r}: must be in (0, 1], or None for no cut")


# ---------------------------------------------------------------------------------------------------------
# generate


def _prompt_tensor(prompt_ids: list[list[int]] | torch.Tensor, cfg: ModelConfig,
                   device: torch.device) -> torch.Tensor:
    """Prompts as a (B, T) int64 tensor on `device`, checked: equal lengths, T >= 1, ids in the vocabulary."""
    if isinstance(prompt_ids, torch.Tensor):
        prompt = prompt_ids
    else:
        lengths = sorted({len(p) for p in prompt_ids})
        if len(lengths) > 1:
            raise ValueError(f"prompts have lengths {lengths}; generate takes a batch of equal-length prompts")
        prompt = torch.tensor(prompt_ids, dtype=torch.int64)
    if prompt.ndim != 2 or prompt.shape[0] == 0 or prompt.shape[1] == 0:
        raise ValueError(f"prompt_ids has shape {tuple(prompt.shape)}; expected (B, T) with B, T >= 1 "
                         "(start the prompt with the bos id if it has no text)")
    if prompt.min() < 0 or prompt.max() >= cfg.vocab_size:
        raise ValueError(f"prompt ids span [{int(prompt.min())}, {int(prompt.max())}]; the vocabulary is "
                         f"[0, {cfg.vocab_size})")
    return prompt.to(device=device, dtype=torch.int64)


@torch.no_grad()
def generate(params: Params, cfg: ModelConfig, prompt_ids: list[list[int]] | torch.Tensor, *,
             max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
             top_p: float | None = None, seed: int = 0, eos_id: int | None = None,
             adapters: LoraSettings | None = None) -> list[list[int]]:
    """Continue each prompt by up to `max_new_tokens` tokens.

    Args:
        params: canonical params (see `lowmem.nn.llama`), possibly with adapter tensors; compute runs in
            their dtype on their device.
        prompt_ids: B prompts of equal length T >= 1, as lists of ids or a (B, T) int64 tensor.
        temperature, top_k, top_p: see `sample`; temperature 0 (the default) is greedy.
        seed: seeds a generator local to this call, so the same arguments give the same tokens and the
            global torch RNG is left alone.
        eos_id: a sequence stops after producing this id (which ends its list); None never stops early.
        adapters: the LoraSettings of params' adapter tensors, as for `llama.forward`.

    Returns:
        B lists of new token ids (the prompt not included), each at most `max_new_tokens` long.
    """
    _check_sampling(max_new_tokens, temperature, top_k, top_p)
    embed = params["tok_embeddings"]
    prompt = _prompt_tensor(prompt_ids, cfg, embed.device)
    B, T = prompt.shape
    out: list[list[int]] = [[] for _ in range(B)]
    if max_new_tokens == 0:
        return out
    # The last new token is never fed back, so the cache needs T + max_new_tokens - 1 positions.
    cache = init_cache(cfg, B, T + max_new_tokens - 1, dtype=embed.dtype, device=embed.device)
    generator = torch.Generator(device=embed.device).manual_seed(seed)
    done = [False] * B
    next_logits = prefill(params, prompt, cfg, cache, adapters=adapters)
    for step in range(max_new_tokens):
        token = sample(next_logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
        for b, t in enumerate(token.tolist()):
            if not done[b]:
                out[b].append(t)
                done[b] = eos_id is not None and t == eos_id
        if all(done) or step == max_new_tokens - 1:
            break
        next_logits = decode_step(params, token, cfg, cache, adapters=adapters)
    return out


# ---------------------------------------------------------------------------------------------------------
# loading a model to generate from


class ModelFiles(NamedTuple):
    """Where a model to generate from lives: HF weights, optional PEFT adapter, tokenizer file."""

    model_dir: Path
    adapter_dir: Path | None
    tokenizer_path: Path


def find_model_files(path: str | os.PathLike[str]) -> ModelFiles:
    """The model in a lowmem run directory (`model/`, or `base/` + `adapter/`) or an HF model directory.

    An adapter-only run whose base lives elsewhere finds it through `adapter/adapter_config.json`'s
    `base_model_name_or_path`. The tokenizer is the one stored next to the base weights (TOKENIZER_FILES).

    Raises:
        FileNotFoundError naming what was looked for, when there is no model or no tokenizer.
    """
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such directory; give a lowmem run directory or an HF model directory")
    adapter_dir = None
    if (root / "config.json").is_file():
        model_dir = root
    elif (root / "model" / "config.json").is_file():
        model_dir = root / "model"
    elif (root / "adapter" / "adapter_config.json").is_file():
        adapter_dir = root / "adapter"
        model_dir = root / "base" if (root / "base").is_dir() else _adapter_base(adapter_dir)
        if not (model_dir / "config.json").is_file():
            raise FileNotFoundError(f"{adapter_dir}: its base model {model_dir} has no config.json")
    else:
        raise FileNotFoundError(
            f"{root}: no model found; expected a finished lowmem run (model/, or base/ + adapter/) or an "
            "HF model directory (config.json + model.safetensors)"
        )
    found = [model_dir / name for name in TOKENIZER_FILES if (model_dir / name).is_file()]
    if not found:
        raise FileNotFoundError(f"{model_dir}: no tokenizer ({', '.join(TOKENIZER_FILES)}); copy the model's "
                                "tokenizer files next to its weights")
    return ModelFiles(model_dir, adapter_dir, found[0])


# where an HF model directory keeps its tokenizer (lowmem.data.load_tokenizer reads any of them)
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "original/tokenizer.model")


def _adapter_base(adapter_dir: Path) -> Path:
    config_path = adapter_dir / "adapter_config.json"
    try:
        base = json.loads(config_path.read_text()).get("base_model_name_or_path")
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_path}: not valid JSON ({e})") from None
    if not base:
        raise FileNotFoundError(f"{config_path}: no base_model_name_or_path and no base/ next to the adapter")
    # a relative base (lowmem writes "base" for a run's own base/) is relative to the run directory
    return Path(base) if Path(base).is_absolute() else adapter_dir.parent / base


def load_model(files: ModelFiles, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
               ) -> tuple[ModelConfig, Params, LoraSettings | None]:
    """(cfg, params, adapter settings or None) for `find_model_files`' result."""
    from lowmem.nn.hf import load_hf
    from lowmem.nn.peft_io import load_peft

    cfg, params = load_hf(files.model_dir, dtype=dtype, device=device)
    if files.adapter_dir is None:
        return cfg, params, None
    settings, params = load_peft(files.adapter_dir, params, cfg)
    return cfg, params, settings
