"""Hugging Face format I/O: `config.json` + safetensors (never pickle), canonical ↔ HF tensor names.

Every family uses HF's Llama names, with these differences: Qwen2 adds `self_attn.{q,k,v}_proj.bias`;
Gemma 2 has four norms per layer (`post_attention_layernorm` is the norm *after* attention there, and the
pre-MLP norm is `pre_feedforward_layernorm`); Phi-3 stores q, k, v fused as `self_attn.qkv_proj` and the
gate and up projections as `mlp.gate_up_proj`, which are split on load and fused again on save.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lowmem.nn.config import ModelConfig, param_shapes

__all__ = ["from_hf_name", "hf_layout", "load_hf", "save_hf", "to_hf_name"]

Params = dict[str, torch.Tensor]

_LAYER_TO_HF = {
    "attn_norm": "input_layernorm.weight",
    "attn.wq": "self_attn.q_proj.weight",
    "attn.wk": "self_attn.k_proj.weight",
    "attn.wv": "self_attn.v_proj.weight",
    "attn.wo": "self_attn.o_proj.weight",
    "mlp_norm": "post_attention_layernorm.weight",
    "mlp.w1": "mlp.gate_proj.weight",
    "mlp.w2": "mlp.down_proj.weight",
    "mlp.w3": "mlp.up_proj.weight",
}
_GLOBAL_TO_HF = {
    "tok_embeddings": "model.embed_tokens.weight",
    "norm": "model.norm.weight",
    "output": "lm_head.weight",
}
_BIAS_TO_HF = {
    "attn.bq": "self_attn.q_proj.bias",
    "attn.bk": "self_attn.k_proj.bias",
    "attn.bv": "self_attn.v_proj.bias",
}
_SANDWICH_TO_HF = {
    "attn_post_norm": "post_attention_layernorm.weight",
    "mlp_norm": "pre_feedforward_layernorm.weight",
    "mlp_post_norm": "post_feedforward_layernorm.weight",
}
# Phi-3's fused tensors: HF layer name → the canonical layer names stacked along dim 0, in order.
_PHI3_FUSED = {
    "self_attn.qkv_proj.weight": ("attn.wq", "attn.wk", "attn.wv"),
    "mlp.gate_up_proj.weight": ("mlp.w1", "mlp.w3"),
}
_GLOBAL_FROM_HF = {v: k for k, v in _GLOBAL_TO_HF.items()}
_CANON_LAYER = re.compile(r"layers\.(\d+)\.(.+)")
_HF_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
# Non-persistent RoPE buffers some older Llama checkpoints still carry; recomputed from the config.
_IGNORED_HF = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def _layer_to_hf(cfg: ModelConfig | None) -> dict[str, str]:
    """Canonical layer name → HF layer name for `cfg`'s family (Llama's without a cfg)."""
    names = dict(_LAYER_TO_HF)
    if cfg is not None and cfg.qkv_bias:
        names |= _BIAS_TO_HF
    if cfg is not None and cfg.sandwich_norms:
        names |= _SANDWICH_TO_HF
    return names


def to_hf_name(name: str, cfg: ModelConfig | None = None) -> str:
    """Canonical name → HF name: `layers.3.attn.wq` → `model.layers.3.self_attn.q_proj.weight`.

    Without `cfg`, the Llama layout; with it, that of `cfg`'s family (biases, Gemma 2's norms). Phi-3's
    fused projections have no name of their own: see `hf_layout`.
    """
    if name in _GLOBAL_TO_HF:
        return _GLOBAL_TO_HF[name]
    m = _CANON_LAYER.fullmatch(name)
    layer_map = _layer_to_hf(cfg)
    if m and m.group(2) in layer_map:
        return f"model.layers.{m.group(1)}.{layer_map[m.group(2)]}"
    family = "Llama" if cfg is None else cfg.family
    raise KeyError(f"{name!r} is not a canonical {family} parameter name")


def from_hf_name(hf_name: str, cfg: ModelConfig | None = None) -> str:
    """HF name → canonical name (Llama layout, or `cfg`'s family); KeyError for a name outside it."""
    if hf_name in _GLOBAL_FROM_HF:
        return _GLOBAL_FROM_HF[hf_name]
    m = _HF_LAYER.fullmatch(hf_name)
    layer_map = {v: k for k, v in _layer_to_hf(cfg).items()}
    if m and m.group(2) in layer_map:
        return f"layers.{m.group(1)}.{layer_map[m.group(2)]}"
    family = "Llama" if cfg is None else cfg.family
    raise KeyError(f"{hf_name!r} is not an HF {family} parameter name")


def hf_layout(cfg: ModelConfig) -> dict[str, tuple[str, ...]]:
    """HF tensor name → the canonical names it holds, stacked along dim 0, in checkpoint order.

    One name each, except Phi-3's `qkv_proj` (wq, wk, wv) and `gate_up_proj` (w1, w3).
    """
    layout: dict[str, tuple[str, ...]] = {}
    fused_parts = {part for parts in _PHI3_FUSED.values() for part in parts} if cfg.family == "phi3" else set()
    for name in param_shapes(cfg):
        m = _CANON_LAYER.fullmatch(name)
        if m and m.group(2) in fused_parts:
            for hf_suffix, parts in _PHI3_FUSED.items():
                if m.group(2) == parts[0]:
                    layout[f"model.layers.{m.group(1)}.{hf_suffix}"] = tuple(f"layers.{m.group(1)}.{p}" for p in parts)
            continue
        layout[to_hf_name(name, cfg)] = (name,)
    return layout


# ---------------------------------------------------------------------------------------------------------
# save


def save_hf(params: Params, cfg: ModelConfig, out_dir: str | os.PathLike[str], *,
            overwrite: bool = False) -> Path:
    """Write `config.json` + `model.safetensors` to `out_dir`, atomically.

    Files are written and fsynced in a temporary directory next to `out_dir`, which is then renamed
    into place, so `out_dir` is either absent, the previous complete version, or the new complete one.
    A tied output is stored once, as `model.embed_tokens.weight`. The config's dtype is that of
    `tok_embeddings`. An existing `out_dir` raises FileExistsError unless `overwrite`.

    Returns the output directory.
    """
    out = Path(out_dir)
    expected = param_shapes(cfg)
    _check_names_and_shapes(params, expected, where="params passed to save_hf")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    dtype_name = str(params["tok_embeddings"].dtype).removeprefix("torch.")
    tensors = {hf: torch.cat([params[n].detach().to("cpu") for n in parts]).contiguous()
               for hf, parts in hf_layout(cfg).items()}
    return write_dir_atomic(out, {CONFIG_FILE: cfg.to_hf_config(dtype=dtype_name)}, {WEIGHTS_FILE: tensors})


def write_dir_atomic(out: Path, json_files: dict[str, Any], tensor_files: dict[str, dict[str, torch.Tensor]]
                     ) -> Path:
    """Write JSON and safetensors files into a temporary sibling of `out`, fsync, and rename it into place.

    `out` ends up absent, as it was, or complete: never half-written. Used for HF models and PEFT adapters.
    """
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        for name, obj in json_files.items():
            (tmp / name).write_text(json.dumps(obj, indent=2) + "\n")
        for name, tensors in tensor_files.items():
            save_file(tensors, str(tmp / name), metadata={"format": "pt"})
        for f in [*(tmp / n for n in (*json_files, *tensor_files)), tmp]:
            _fsync(f)
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync(out.parent)
    return out


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace_dir(src: Path, dst: Path) -> None:
    """Rename `src` to `dst`; an existing `dst` is moved aside first and deleted only afterwards."""
    if not dst.exists():
        os.rename(src, dst)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
    os.rename(dst, old / dst.name)
    try:
        os.rename(src, dst)
    except BaseException:
        os.rename(old / dst.name, dst)
        raise
    shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------
# load


def load_hf(model_dir: str | os.PathLike[str], dtype: torch.dtype = torch.float32,
            device: torch.device | str = "cpu") -> tuple[ModelConfig, Params]:
    """Read an HF checkpoint directory (Llama, Mistral, Qwen2, Gemma, Gemma 2, Phi-3) into (config, params).

    Reads `config.json` and either `model.safetensors` or the shards listed in
    `model.safetensors.index.json`, tensor by tensor through `safe_open`, casting each to `dtype` on
    `device` as it goes. Shapes are checked against the config before a tensor is read. A tied
    checkpoint may omit `lm_head.weight` (and one that stores it anyway has the copy skipped). Fused
    tensors (Phi-3) are split into their canonical parts, each its own copy.

    Raises:
        ValueError naming the file and tensor for a missing, unexpected or wrongly shaped tensor, and
        for a config lowmem cannot run. FileNotFoundError when config.json or the weights are absent.
    """
    root = Path(model_dir)
    config_path = root / CONFIG_FILE
    try:
        hf_config = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_path}: not valid JSON ({e})") from None
    cfg = ModelConfig.from_hf_config(hf_config, source=str(config_path))
    expected = param_shapes(cfg)
    layout = hf_layout(cfg)

    params: Params = {}
    for file, names in _weight_files(root).items():
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for hf_name in names:
                if _IGNORED_HF.fullmatch(hf_name):
                    continue
                if cfg.tie_embeddings and hf_name == _GLOBAL_TO_HF["output"]:
                    continue  # tied: the output is tok_embeddings; a stored copy is redundant
                parts = layout.get(hf_name)
                if parts is None:
                    raise ValueError(
                        f"{file}: unexpected tensor {hf_name!r}; this config ({config_path}) expects only "
                        f"the {cfg.family} tensors for {cfg.n_layers} layers"
                        + (" with tied embeddings (no lm_head)" if cfg.tie_embeddings else "")
                    )
                if parts[0] in params:
                    raise ValueError(f"{file}: tensor {hf_name!r} appears in more than one shard")
                sizes = [expected[n][0] for n in parts]
                want = (sum(sizes), *expected[parts[0]][1:])
                shape = tuple(f.get_slice(hf_name).get_shape())
                if shape != want:
                    raise ValueError(
                        f"{file}: tensor {hf_name!r} has shape {shape}, expected {want} from {config_path}"
                    )
                tensor = f.get_tensor(hf_name)
                if len(parts) == 1:
                    params[parts[0]] = tensor.to(device=device, dtype=dtype)
                    continue
                for name, piece in zip(parts, tensor.split(sizes), strict=True):
                    params[name] = piece.to(device=device, dtype=dtype, copy=True).contiguous()
    missing = [hf for hf, parts in layout.items() if parts[0] not in params]
    if missing:
        raise ValueError(
            f"{root}: missing tensors {missing[:8]}{' ...' if len(missing) > 8 else ''} "
            f"({len(missing)} in all) required by {config_path}"
        )
    return cfg, {n: params[n] for n in expected}


def _weight_files(root: Path) -> dict[Path, list[str]]:
    """Weight file → tensor names it holds: the single file, or the shards of the index."""
    index_path = root / INDEX_FILE
    single = root / WEIGHTS_FILE
    if index_path.exists():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index_path}: expected JSON with a 'weight_map' object ({e!r})") from None
        files: dict[Path, list[str]] = {}
        for hf_name, shard in weight_map.items():
            files.setdefault(root / shard, []).append(hf_name)
        for file, names in files.items():
            if not file.exists():
                raise FileNotFoundError(f"{index_path}: shard {file.name} (holding {names[0]!r}) is missing")
            with safe_open(str(file), framework="pt", device="cpu") as f:
                stored = set(f.keys())
            absent = [n for n in names if n not in stored]
            if absent:
                raise ValueError(f"{file}: missing tensor {absent[0]!r} that {index_path.name} places there")
        return files
    if single.exists():
        with safe_open(str(single), framework="pt", device="cpu") as f:
            return {single: list(f.keys())}
    raise FileNotFoundError(
        f"{root}: no {WEIGHTS_FILE} or {INDEX_FILE}; lowmem reads safetensors only (convert .bin/.pth "
        "checkpoints with transformers' save_pretrained(safe_serialization=True))"
    )


def _check_names_and_shapes(params: Params, expected: dict[str, tuple[int, ...]], where: str) -> None:
    unexpected = sorted(set(params) - set(expected))
    missing = [n for n in expected if n not in params]
    if unexpected or missing:
        raise ValueError(f"{where}: missing {missing}, unexpected {unexpected}")
    for name, shape in expected.items():
        if tuple(params[name].shape) != shape:
            raise ValueError(f"{where}: {name!r} has shape {tuple(params[name].shape)}, expected {shape}")
