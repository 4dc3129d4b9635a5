"""Hugging Face format I/O: `config.json` + safetensors (never pickle), canonical ↔ HF tensor names.

Every family uses HF's Llama names, with these differences: Qwen2 adds `self_attn.{q,k,v}_proj.bias`;
Gemma 2 has four norms per layer (`post_attention_layernorm` is the norm *after* attention there, and the
pre-MLP norm is `pre_feedforward_layernorm`); Qwen3 and OLMo 2 add `self_attn.{q,k}_norm`, and OLMo 2 keeps
only Gemma 2's two norms after the sublayers (no `input_layernorm`); Gemma 3 has Gemma 2's four norms and the
q/k norms; SmolLM3 is Llama's layout; Phi-3 stores q, k, v fused as `self_attn.qkv_proj` and the
gate and up projections as `mlp.gate_up_proj`, which are split on load and fused again on save. Qwen3-MoE's
sparse layers store the router as `mlp.gate.weight` and each expert as `mlp.experts.{e}.{gate,up,down}_proj.weight`
(what transformers 5's `save_pretrained` writes, though its modules hold them fused), which are row blocks of
lowmem's stacked `moe.w1`, `moe.w3`, `moe.w2` (`expert_rows`).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import json
import logging
import math
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

import torch
from safetensors.torch import save_file

from lowmem.files import share
from lowmem.nn.config import TEXT_TOWERS, ModelConfig, param_shapes

__all__ = ["expert_rows", "from_hf_name", "hf_layout", "load_hf", "read_hf_config", "save_hf", "to_hf_name"]

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
_QK_NORM_TO_HF = {
    "attn.q_norm": "self_attn.q_norm.weight",
    "attn.k_norm": "self_attn.k_norm.weight",
}
_MOE_ROUTER_TO_HF = {"moe.router": "mlp.gate.weight"}
# A sparse layer's stacked experts → the HF name of one expert's tensor, and which size its rows have.
_MOE_EXPERTS_TO_HF = {"moe.w1": "gate_proj", "moe.w3": "up_proj", "moe.w2": "down_proj"}
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

_LOG = logging.getLogger(__name__)
# A multimodal checkpoint's text tower (`TEXT_TOWERS`): stored name prefix → the text model's own. transformers
# writes `language_model.model.*` (the layout of the published Gemma 3 checkpoints); its in-memory names, which
# some converters save, are `model.language_model.*`.
_TEXT_TOWER_PREFIXES = {"language_model.model.": "model.", "model.language_model.": "model.",
                        "language_model.lm_head.": "lm_head.", "lm_head.": "lm_head."}


def _layer_to_hf(cfg: ModelConfig | None) -> dict[str, str]:
    """Canonical layer name → HF layer name for `cfg`'s family (Llama's without a cfg)."""
    names = dict(_LAYER_TO_HF)
    if cfg is not None and cfg.qkv_bias:
        names |= _BIAS_TO_HF
    if cfg is not None and cfg.sandwich_norms:
        names |= _SANDWICH_TO_HF
    if cfg is not None and not cfg.pre_norms:
        del names["attn_norm"], names["mlp_norm"]
    if cfg is not None and cfg.qk_norm is not None:
        names |= _QK_NORM_TO_HF
    if cfg is not None and cfg.n_experts:
        names |= _MOE_ROUTER_TO_HF
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
        if m and m.group(2) in _MOE_EXPERTS_TO_HF:
            continue  # one canonical tensor, many HF ones: `expert_rows`
        if m and m.group(2) in fused_parts:
            for hf_suffix, parts in _PHI3_FUSED.items():
                if m.group(2) == parts[0]:
                    layout[f"model.layers.{m.group(1)}.{hf_suffix}"] = tuple(f"layers.{m.group(1)}.{p}" for p in parts)
            continue
        layout[to_hf_name(name, cfg)] = (name,)
    return layout


class ExpertRows(NamedTuple):
    """Where one HF expert tensor lies in lowmem's stacked experts: rows first..first + n_rows of `name`."""

    name: str
    first: int
    n_rows: int


def expert_rows(cfg: ModelConfig) -> dict[str, ExpertRows]:
    """HF per-expert tensor name → its rows in the canonical stacked tensor, in checkpoint order (empty for a
    dense model): `model.layers.{i}.mlp.experts.{e}.gate_proj.weight` is rows e * Fe .. (e + 1) * Fe of
    `layers.{i}.moe.w1` (up_proj: `moe.w3`; down_proj: rows e * D .. of `moe.w2`)."""
    rows: dict[str, ExpertRows] = {}
    shapes = param_shapes(cfg)
    for name in shapes:
        m = _CANON_LAYER.fullmatch(name)
        if not (m and m.group(2) in _MOE_EXPERTS_TO_HF):
            continue
        n_rows = shapes[name][0] // cfg.n_experts
        for e in range(cfg.n_experts):
            hf = f"model.layers.{m.group(1)}.mlp.experts.{e}.{_MOE_EXPERTS_TO_HF[m.group(2)]}.weight"
            rows[hf] = ExpertRows(name, e * n_rows, n_rows)
    return rows


# ---------------------------------------------------------------------------------------------------------
# save


def save_hf(params: Params, cfg: ModelConfig, out_dir: str | os.PathLike[str], *,
            overwrite: bool = False, max_shard_bytes: int | None = None) -> Path:
    """Write `config.json` + `model.safetensors` to `out_dir`, atomically.

    Files are written and fsynced in a temporary directory next to `out_dir`, which is then renamed
    into place, so `out_dir` is either absent, the previous complete version, or the new complete one.
    A tied output is stored once, as `model.embed_tokens.weight`. The config's dtype is that of
    `tok_embeddings`. An existing `out_dir` raises FileExistsError unless `overwrite`.

    With `max_shard_bytes`, tensors go in checkpoint order into shards `model-00001-of-0000N.safetensors`
    of at most that many bytes each (a larger tensor gets a shard of its own), listed in
    `model.safetensors.index.json`, as transformers' `save_pretrained(max_shard_size=...)` writes them.

    Returns the output directory.
    """
    out = Path(out_dir)
    expected = param_shapes(cfg)
    _check_names_and_shapes(params, expected, where="params passed to save_hf")
    if max_shard_bytes is not None and max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes = {max_shard_bytes}: must be positive, or None for one file")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    dtype_name = str(params["tok_embeddings"].dtype).removeprefix("torch.")
    tensors = {hf: torch.cat([params[n].detach().to("cpu") for n in parts]).contiguous()
               for hf, parts in hf_layout(cfg).items()}
    tensors |= {hf: params[r.name].detach()[r.first:r.first + r.n_rows].to("cpu").contiguous()
                for hf, r in expert_rows(cfg).items()}
    json_files: dict[str, Any] = {CONFIG_FILE: cfg.to_hf_config(dtype=dtype_name)}
    if max_shard_bytes is None:
        return write_dir_atomic(out, json_files, {WEIGHTS_FILE: tensors})
    shards = _shard(tensors, max_shard_bytes)
    json_files[INDEX_FILE] = {
        "metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
        "weight_map": {name: file for file, shard in shards.items() for name in shard},
    }
    return write_dir_atomic(out, json_files, shards)


def _shard(tensors: dict[str, torch.Tensor], max_shard_bytes: int) -> dict[str, dict[str, torch.Tensor]]:
    """Split `tensors` (in order) into HF-named shards of at most `max_shard_bytes` (or one big tensor) each."""
    groups: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        n_bytes = t.numel() * t.element_size()
        if groups[-1] and size + n_bytes > max_shard_bytes:
            groups.append({})
            size = 0
        groups[-1][name] = t
        size += n_bytes
    n = len(groups)
    return {f"model-{i + 1:05d}-of-{n:05d}.safetensors": g for i, g in enumerate(groups)}


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
        share(tmp)  # mkdtemp makes it 0700 and safetensors writes 0600: a model directory is shared (0755/0644)
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


def read_hf_config(model_dir: str | os.PathLike[str]) -> ModelConfig:
    """The ModelConfig of an HF checkpoint directory's `config.json` (errors name the file and key)."""
    config_path = Path(model_dir) / CONFIG_FILE
    return ModelConfig.from_hf_config(_config_json(config_path), source=str(config_path))


def _config_json(config_path: Path) -> dict[str, Any]:
    try:
        return json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_path}: not valid JSON ({e})") from None


def _stored_to_layout_name(root: Path) -> Callable[[str], str | None]:
    """How a stored tensor name maps to an `hf_layout` name: itself, or for a multimodal checkpoint's text tower
    the text model's name, None for a tensor of another tower (left out). The left-out towers are logged."""
    model_type = _config_json(root / CONFIG_FILE).get("model_type")
    if model_type not in TEXT_TOWERS:
        return lambda name: name

    def text_name(name: str) -> str | None:
        for prefix, text in _TEXT_TOWER_PREFIXES.items():
            if name.startswith(prefix):
                return text + name.removeprefix(prefix)
        return None

    left_out: dict[str, int] = {}
    for names in _weight_files(root).values():
        for name in names:
            if text_name(name) is None:
                left_out[name.split(".")[0]] = left_out.get(name.split(".")[0], 0) + 1
    _LOG.warning("%s: loading only the text tower of this %s checkpoint (%s); left out: %s", root, model_type,
                 TEXT_TOWERS[model_type][1],
                 ", ".join(f"{p}.* ({n} tensors)" for p, n in sorted(left_out.items())) or "nothing")
    return text_name


def load_hf(model_dir: str | os.PathLike[str], dtype: torch.dtype = torch.float32,
            device: torch.device | str = "cpu", *,
            convert: Callable[[str, torch.Tensor], torch.Tensor] | None = None) -> tuple[ModelConfig, Params]:
    """Read an HF checkpoint directory (Llama, Mistral, Qwen2, Gemma, Gemma 2, Gemma 3, Phi-3 / Phi-4-mini, Qwen3,
    OLMo 2, SmolLM3) into (config, params).

    Of a multimodal Gemma 3 (`Gemma3ForConditionalGeneration`) only the text tower is read, as a Gemma 3 text
    model (`language_model.*`); the vision tower and the projector are left out, and a warning on the
    `lowmem.nn.hf` logger names them. Saving such a model writes a text-only `Gemma3ForCausalLM`.

    Reads `config.json` and either `model.safetensors` or the shards listed in
    `model.safetensors.index.json`, tensor by tensor, each straight from the file into a tensor of `dtype`
    (see `_read_rows`: no file page is mapped into the process, and a cast goes through one small buffer),
    then onto `device`. Peak memory is therefore the loaded params plus one tensor, not the checkpoint.
    Shapes are checked against the config before a tensor is read. A tied checkpoint may omit
    `lm_head.weight` (and one that stores it anyway has the copy skipped). Fused tensors (Phi-3) are
    read as their canonical parts, each its own tensor.

    Args:
        convert: called as `convert(name, tensor)` on each canonical tensor as soon as it is read, and
            its result kept instead; e.g. `lowmem.nn.quant.nf4_converter(...)` quantizes the projections
            while loading, so the full-precision model is never whole in memory (QLoRA).

    Raises:
        ValueError naming the file and tensor for a missing, unexpected or wrongly shaped tensor, and
        for a config lowmem cannot run. FileNotFoundError when config.json or the weights are absent.
    """
    root = Path(model_dir)
    config_path = root / CONFIG_FILE
    cfg = read_hf_config(root)
    expected = param_shapes(cfg)
    layout = hf_layout(cfg)

    params: Params = {}
    buffer = torch.empty(_CAST_BUFFER_BYTES, dtype=torch.uint8)  # reused by every cast (`_read_rows`)
    with _large_allocations_returned() if convert is not None else contextlib.nullcontext():
        _read_params(root, cfg, expected, layout, _stored_to_layout_name(root), params, buffer, device, dtype,
                     convert)
    missing = [hf for hf, parts in layout.items() if parts[0] not in params]
    missing += [hf for hf, r in expert_rows(cfg).items() if r.name not in params]
    if missing:
        raise ValueError(
            f"{root}: missing tensors {missing[:8]}{' ...' if len(missing) > 8 else ''} "
            f"({len(missing)} in all) required by {config_path}"
        )
    return cfg, {n: params[n] for n in expected}


def _read_params(root: Path, cfg: ModelConfig, expected: dict[str, tuple[int, ...]],
                 layout: dict[str, tuple[str, ...]], layout_name: Callable[[str], str | None], params: Params,
                 buffer: torch.Tensor, device: torch.device | str, dtype: torch.dtype,
                 convert: Callable[[str, torch.Tensor], torch.Tensor] | None) -> None:
    """load_hf's reading loop: every weight file, tensor by tensor, into `params` (converted as read).

    `layout_name` maps a stored name to its `layout` name, or to None for a tensor left out
    (`_stored_to_layout_name`).
    """
    config_path = root / CONFIG_FILE
    experts = _ExpertReader(cfg, expert_rows(cfg), expected, params, dtype, device, convert)
    for file, names in _weight_files(root).items():
        entries = _safetensors_entries(file)
        with open(file, "rb", buffering=0) as fh:
            for hf_name in names:
                name_in_layout = layout_name(hf_name)
                if name_in_layout is None or _IGNORED_HF.fullmatch(name_in_layout):
                    continue
                if name_in_layout in experts.rows:
                    experts.read(fh, file, name_in_layout, entries[hf_name], buffer)
                    continue
                if cfg.tie_embeddings and name_in_layout == _GLOBAL_TO_HF["output"]:
                    continue  # tied: the output is tok_embeddings; a stored copy is redundant
                parts = layout.get(name_in_layout)
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
                entry = entries[hf_name]
                if entry.shape != want:
                    raise ValueError(
                        f"{file}: tensor {hf_name!r} has shape {entry.shape}, expected {want} from {config_path}"
                    )
                row = 0
                for name, n_rows in zip(parts, sizes, strict=True):
                    shape = (n_rows, *entry.shape[1:])
                    tensor = torch.empty(shape, dtype=dtype)
                    _read_rows(fh, file, hf_name, entry, row, tensor, buffer)
                    tensor = tensor.to(device)
                    if convert is not None:
                        tensor = convert(name, tensor)
                    params[name] = tensor
                    del tensor  # before the next read: one full-precision tensor alive at a time
                    row += n_rows


class _ExpertReader:
    """Reads HF per-expert tensors into lowmem's stacked ones (`expert_rows`) for `_read_params`.

    A stacked tensor is allocated at its first expert and kept, in `dtype` on the CPU, until its last expert
    is read; then it is moved to `device`, converted (NF4 for QLoRA) and put in `params`. With the per-layer
    checkpoint order HF writes, a layer's three stacked projections are what is pending at once.
    """

    def __init__(self, cfg, rows: dict[str, ExpertRows], expected, params: Params, dtype, device, convert):
        self.rows, self.expected, self.params = rows, expected, params
        self.dtype, self.device, self.convert, self.n_experts = dtype, device, convert, cfg.n_experts
        self.pending: dict[str, torch.Tensor] = {}
        self.seen: dict[str, set[int]] = {}

    def read(self, fh: BinaryIO, file: Path, hf_name: str, entry: _Entry, buffer: torch.Tensor) -> None:
        r = self.rows[hf_name]
        want = (r.n_rows, self.expected[r.name][1])
        if entry.shape != want:
            raise ValueError(f"{file}: tensor {hf_name!r} has shape {entry.shape}, expected {want}")
        seen = self.seen.setdefault(r.name, set())
        if r.first in seen:
            raise ValueError(f"{file}: tensor {hf_name!r} appears in more than one shard")
        tensor = self.pending.setdefault(r.name, torch.empty(self.expected[r.name], dtype=self.dtype))
        _read_rows(fh, file, hf_name, entry, 0, tensor[r.first:r.first + r.n_rows], buffer)
        seen.add(r.first)
        if len(seen) == self.n_experts:
            tensor = self.pending.pop(r.name).to(self.device)
            self.params[r.name] = tensor if self.convert is None else self.convert(r.name, tensor)


# glibc mallopt parameter (malloc.h): allocations at least this large are served by mmap
_M_MMAP_THRESHOLD = -3


@contextlib.contextmanager
def _large_allocations_returned():
    """While loading with a converter, make glibc serve allocations of 64 KiB or more by mmap.

    Quantizing as we read frees many large temporaries between the small tensors it keeps. glibc's dynamic
    mmap threshold rises after the first large free, so later temporaries come from the heap, and the heap
    cannot shrink past the kept tensors between them: measured, peak RSS reached 2.3-3.2x the NF4 model
    (benchmarks/load_memory.py). With a fixed 64 KiB threshold every temporary is unmapped when freed and the
    peak is the model plus one weight. Afterwards the threshold is left at 32 MiB, the ceiling glibc's own
    dynamic threshold grows to on 64-bit, so training allocates as it would have. A no-op without glibc.
    """
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is None or not hasattr(libc, "mallopt") or not hasattr(libc, "malloc_trim"):
        yield
        return
    libc.mallopt(_M_MMAP_THRESHOLD, 64 * 1024)
    try:
        yield
    finally:
        libc.mallopt(_M_MMAP_THRESHOLD, 32 * 1024 * 1024)
        libc.malloc_trim(0)


# A cast (bf16 file -> fp32 params, fp32 -> bf16, ...) reads the file in pieces of this size and converts
# each into its place in the output, so a cast costs this much beyond the output tensor itself.
_CAST_BUFFER_BYTES = 1024 * 1024
# safetensors dtype names (https://github.com/huggingface/safetensors, "Format") of the float tensors
# lowmem reads.
_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


class _Entry(NamedTuple):
    """Where one tensor lies in a safetensors file: its dtype name, shape and absolute byte offset."""

    dtype: str
    shape: tuple[int, ...]
    offset: int


def _safetensors_entries(file: Path) -> dict[str, _Entry]:
    """Tensor name -> `_Entry`, from the file's header: an 8-byte little-endian length, then that much JSON
    whose `data_offsets` count from the end of the header. (safetensors' Python API gives shapes, not offsets.)

    The header is checked against the file's size, so a truncated or overwritten file is a ValueError naming
    it (`_damaged`), before any tensor is read.
    """
    size = file.stat().st_size
    with open(file, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise _damaged(file, f"it is {size} bytes long, shorter than a safetensors header")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > size - 8:
            raise _damaged(file, f"its header claims {header_len:,} bytes but the file has {size - 8:,} after the "
                                 "length field (cut short, or not a safetensors file)")
        try:
            header = json.loads(fh.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise _damaged(file, f"its header is not valid JSON ({err})") from None
    if not isinstance(header, dict):
        raise _damaged(file, "its header is not a JSON object")
    data_start = 8 + header_len
    entries = {}
    for name, e in header.items():
        if name == "__metadata__":
            continue
        try:
            (lo, hi), shape, dtype = e["data_offsets"], tuple(e["shape"]), e["dtype"]
        except (KeyError, TypeError, ValueError):
            raise _damaged(file, f"its header entry for {name!r} lacks dtype, shape or data_offsets") from None
        if not 0 <= lo <= hi <= size - data_start:
            raise _damaged(file, f"tensor {name!r} lies at bytes {lo:,}..{hi:,} of the data, which has "
                                 f"{size - data_start:,} (the file is cut short)")
        stored = _SAFETENSORS_DTYPES.get(dtype)
        if stored is not None and hi - lo != math.prod(shape) * stored.itemsize:
            raise _damaged(file, f"tensor {name!r} takes {hi - lo:,} bytes, but shape {list(shape)} in {dtype} "
                                 f"needs {math.prod(shape) * stored.itemsize:,}")
        entries[name] = _Entry(dtype, shape, data_start + lo)
    return entries


def _damaged(file: Path, what: str) -> ValueError:
    return ValueError(f"{file}: damaged safetensors file: {what}. Download or copy it again (for a hub model: "
                      "`lowmem download ORG/NAME`)")


def check_weight_files(model_dir: str | os.PathLike[str]) -> None:
    """Read every weight file's header under `model_dir` and check it against the file's size (cheap: no tensor
    is read); a damaged file or a shard missing from the index is an error naming it. `lowmem plan` runs this
    before a run. A directory with a config but no weights yet passes: a plan needs only the config."""
    root = Path(model_dir)
    if not (root / WEIGHTS_FILE).exists() and not (root / INDEX_FILE).exists():
        return
    for file in _weight_files(root):
        _safetensors_entries(file)


def _read_rows(fh: BinaryIO, file: Path, hf_name: str, entry: _Entry, first_row: int, out: torch.Tensor,
               buffer: torch.Tensor) -> None:
    """Fill the contiguous CPU tensor `out` (any float dtype) with rows first_row.. of a stored tensor.

    Read with plain file reads, not through a memory map: the bytes land in `out` (same dtype) or, for a
    cast, piecewise in `buffer` (uint8) and are converted into `out`. So the process holds `out` and the
    buffer, and no page of the file, which a memory map would count in its RSS until it is unmapped.
    """
    stored = _SAFETENSORS_DTYPES.get(entry.dtype)
    if stored is None:
        raise ValueError(f"{file}: tensor {hf_name!r} is stored as {entry.dtype}; lowmem reads "
                         f"{sorted(_SAFETENSORS_DTYPES)} (convert the checkpoint to bf16 or fp32)")
    item = stored.itemsize
    start = entry.offset + first_row * math.prod(entry.shape[1:]) * item
    flat = out.view(-1)
    if stored == out.dtype:
        _read_exactly(fh, file, hf_name, start, flat.view(torch.uint8))
        return
    per_piece = max(1, buffer.numel() // item)
    for lo in range(0, flat.numel(), per_piece):
        n = min(per_piece, flat.numel() - lo)
        piece = buffer[: n * item]
        _read_exactly(fh, file, hf_name, start + lo * item, piece)
        flat[lo:lo + n].copy_(piece.view(stored))


def _read_exactly(fh: BinaryIO, file: Path, hf_name: str, offset: int, out: torch.Tensor) -> None:
    """Fill the uint8 tensor `out` from `offset` of the open file (one read may return less: loop)."""
    view = memoryview(out.numpy())
    fh.seek(offset)
    done = 0
    while done < len(view):
        n = fh.readinto(view[done:])
        if not n:
            raise ValueError(f"{file}: tensor {hf_name!r} is cut short (file ends {len(view) - done} bytes "
                             "early); the download or copy is incomplete")
        done += n


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
            stored = set(_safetensors_entries(file))
            absent = [n for n in names if n not in stored]
            if absent:
                raise ValueError(f"{file}: missing tensor {absent[0]!r} that {index_path.name} places there")
        return files
    if single.exists():
        return {single: list(_safetensors_entries(single))}
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
