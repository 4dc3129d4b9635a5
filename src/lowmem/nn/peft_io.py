"""PEFT-format adapters: `adapter_config.json` + `adapter_model.safetensors`, as `PeftModel.from_pretrained`
reads them and `PeftModel.save_pretrained` writes them (checked against peft 0.21).

Tensor names: `layers.3.attn.wq.lora_a` ↔ `base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight`,
`.lora_b` ↔ `.lora_B.weight`, `.dora_m` ↔ `.lora_magnitude_vector` (no `.weight` suffix in the file).

Phi-3 fuses q, k, v into `self_attn.qkv_proj` and gate, up into `mlp.gate_up_proj`, where lowmem adapts each
part on its own. Such adapters are written onto the fused module, exactly: with parts P1..Pn (every part of
the module, a part not targeted as zeros), A = [A1; ...; An] stacked by rows, B = diag(B1, ..., Bn) block
diagonal, so B A = diag(B1 A1, ..., Bn An) row block by row block, rank n * r. `rank_pattern` and
`alpha_pattern` give the fused module rank n * r and alpha n * alpha, so PEFT's scale alpha / r is unchanged.
DoRA's magnitude is per output row, so the parts' magnitudes stack; it needs every part targeted (the rows of
a part without adapter would need a magnitude equal to the norms of the exact base weights it is loaded on).
Reading splits the blocks back; a part whose A and B blocks are zero in every layer is read as not targeted.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import msgspec
import torch
from safetensors import safe_open

from lowmem.nn.config import ModelConfig
from lowmem.nn.hf import from_hf_name, to_hf_name, write_dir_atomic
from lowmem.nn.lora import TARGETS, LoraSettings, adapted_names, trainable_names

__all__ = ["ADAPTER_CONFIG_FILE", "ADAPTER_WEIGHTS_FILE", "from_peft_name", "load_peft", "save_peft",
           "to_peft_name"]

Params = dict[str, torch.Tensor]

ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_SUFFIX_TO_PEFT = {
    ".lora_a": ".lora_A.weight", ".lora_b": ".lora_B.weight", ".dora_m": ".lora_magnitude_vector",
}
# Short target name → HF module name (the last part of its path), e.g. "wq" → "q_proj".
_TARGET_TO_HF = {t: to_hf_name(f"layers.0.{s}").split(".")[-2] for t, s in TARGETS.items()}
_TARGET_FROM_HF = {v: k for k, v in _TARGET_TO_HF.items()}
# Phi-3's fused modules: HF module name → (its parent module, the short targets stacked in it, in row order).
_PHI3_FUSED = {"qkv_proj": ("self_attn", ("wq", "wk", "wv")), "gate_up_proj": ("mlp", ("w1", "w3"))}

# adapter_config.json keys whose non-default values change the adapter's function in ways lowmem does not
# implement; a config using them is refused rather than loaded wrongly.
_UNSUPPORTED_IF_SET = {
    "use_rslora": False, "rank_pattern": {}, "alpha_pattern": {}, "bias": "none", "lora_bias": False,
    "fan_in_fan_out": False, "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
    "exclude_modules": None, "layer_replication": None, "target_parameters": None,
    "trainable_token_indices": None, "use_qalora": False, "alora_invocation_tokens": None, "use_bdlora": None,
}


def to_peft_name(name: str) -> str:
    """`layers.0.attn.wq.lora_a` → `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`."""
    for suffix, peft_suffix in _SUFFIX_TO_PEFT.items():
        if name.endswith(suffix):
            module = to_hf_name(name.removesuffix(suffix)).removesuffix(".weight")
            return _PREFIX + module + peft_suffix
    raise KeyError(f"{name!r} is not an adapter tensor name (*.lora_a, *.lora_b, *.dora_m)")


def from_peft_name(peft_name: str) -> str:
    """Inverse of `to_peft_name`; KeyError for a name outside that layout."""
    for suffix, peft_suffix in _SUFFIX_TO_PEFT.items():
        if peft_name.startswith(_PREFIX) and peft_name.endswith(peft_suffix):
            module = peft_name.removeprefix(_PREFIX).removesuffix(peft_suffix)
            return from_hf_name(module + ".weight") + suffix
    raise KeyError(f"{peft_name!r} is not a PEFT LoRA tensor name of a Llama model")


def _hf_modules(settings: LoraSettings, cfg: ModelConfig) -> list[str]:
    """The HF module names (`target_modules`) `settings` adapts: Phi-3's fused module for any of its parts."""
    fused = _fused_modules(settings, cfg)
    modules = []
    for t in TARGETS:
        if t in settings.targets:
            module = next((m for m in fused if t in _PHI3_FUSED[m][1]), _TARGET_TO_HF[t])
            if module not in modules:
                modules.append(module)
    return modules


def _fused_modules(settings: LoraSettings, cfg: ModelConfig) -> list[str]:
    """Phi-3's fused modules that hold a part `settings` targets (none for other families)."""
    if cfg.family != "phi3":
        return []
    return [m for m, (_, parts) in _PHI3_FUSED.items() if set(parts) & set(settings.targets)]


def _fused_patterns(settings: LoraSettings, cfg: ModelConfig) -> tuple[dict[str, int], dict[str, float]]:
    """`rank_pattern` and `alpha_pattern`: n * rank and n * alpha for a fused module of n parts."""
    fused = _fused_modules(settings, cfg)
    return ({m: len(_PHI3_FUSED[m][1]) * settings.rank for m in fused},
            {m: len(_PHI3_FUSED[m][1]) * settings.alpha for m in fused})


def _peft_config(settings: LoraSettings, cfg: ModelConfig, base_model_name_or_path: str | None) -> dict[str, Any]:
    rank_pattern, alpha_pattern = _fused_patterns(settings, cfg)
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": settings.rank,
        "lora_alpha": settings.alpha,
        "lora_dropout": settings.dropout,
        "target_modules": _hf_modules(settings, cfg),
        "use_dora": settings.dora,
        "use_rslora": False,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
    }


def save_peft(params: Params, cfg: ModelConfig, settings: LoraSettings, out_dir: str | os.PathLike[str], *,
              base_model_name_or_path: str | None = None, overwrite: bool = False) -> Path:
    """Write the adapter tensors of `params` to `out_dir` in PEFT format, atomically.

    Files go to a temporary directory next to `out_dir`, are fsynced, and the directory is renamed into
    place (see `lowmem.nn.hf.save_hf`). Only adapter tensors are written, in their own dtype.
    An existing `out_dir` raises FileExistsError unless `overwrite`.

    Raises:
        ValueError when params' adapters are not exactly those `settings` describes for `cfg`.
    """
    out = Path(out_dir)
    _refuse_expert_adapters(cfg, settings)
    expected = _expected_shapes(params, cfg, settings)
    names = trainable_names(params)
    _check_adapters(set(names), expected, where="params passed to save_peft")
    for n in names:
        if tuple(params[n].shape) != expected[n]:
            raise ValueError(f"params passed to save_peft: {n!r} has shape {tuple(params[n].shape)}, "
                             f"expected {expected[n]} for rank {settings.rank}")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tensors = {to_peft_name(n): params[n].detach().to("cpu").contiguous() for n in names}
    if _fused_modules(settings, cfg):
        tensors = _fuse_adapters(tensors, params, cfg, settings)
    return write_dir_atomic(out, {ADAPTER_CONFIG_FILE: _peft_config(settings, cfg, base_model_name_or_path)},
                            {ADAPTER_WEIGHTS_FILE: tensors})


def _refuse_expert_adapters(cfg: ModelConfig, settings: LoraSettings) -> None:
    """PEFT has no counterpart of lowmem's per-expert adapters: transformers 5 holds Qwen3-MoE's experts as fused
    3-D parameters (gate and up in one `gate_up_proj`), which PEFT adapts through `target_parameters` with one
    adapter over gate and up together, not one per projection as lowmem trains them."""
    experts = [n for n in adapted_names(cfg, settings) if ".moe." in n]
    if experts:
        raise ValueError(f"adapters on mixture-of-experts experts ({experts[0]}, ...) cannot be written in PEFT "
                         "format: PEFT adapts transformers' fused expert tensors differently. Export them merged "
                         "(lowmem export --merge), or adapt only the attention (targets wq, wk, wv, wo)")


def _fused_prefix(layer: int, module: str) -> str:
    return f"{_PREFIX}model.layers.{layer}.{_PHI3_FUSED[module][0]}.{module}"


def _fuse_adapters(tensors: Params, params: Params, cfg: ModelConfig, settings: LoraSettings) -> Params:
    """Per-part PEFT tensors → the same with Phi-3's fused modules' parts replaced by their fused adapter."""
    out = dict(tensors)
    r = settings.rank
    for module in _fused_modules(settings, cfg):
        parts = _PHI3_FUSED[module][1]
        if settings.dora and not set(parts) <= set(settings.targets):
            raise ValueError(
                f"DoRA with targets {list(settings.targets)} adapts part of Phi-3's fused {module} "
                f"({', '.join(parts)}): PEFT's DoRA magnitude spans the whole fused module, so the rows of the "
                "parts without adapter would need magnitudes equal to the exact norms of the base weights the "
                f"adapter is later loaded on. Target all of {list(parts)} (or none) to export DoRA for Phi-3"
            )
        for i in range(cfg.n_layers):
            names = [f"layers.{i}.{TARGETS[p]}" for p in parts]
            targeted = [p in settings.targets for p in parts]
            dtype = next(params[n + ".lora_a"].dtype for n, t in zip(names, targeted, strict=True) if t)
            rows = [params[n].shape[0] for n in names]
            a = torch.zeros(len(parts) * r, params[names[0]].shape[1], dtype=dtype)  # (n * r, in)
            b = torch.zeros(sum(rows), len(parts) * r, dtype=dtype)  # (out_1 + ... + out_n, n * r)
            row = 0
            for j, (n, t) in enumerate(zip(names, targeted, strict=True)):
                if t:
                    a[j * r:(j + 1) * r] = out.pop(to_peft_name(n + ".lora_a"))
                    b[row:row + rows[j], j * r:(j + 1) * r] = out.pop(to_peft_name(n + ".lora_b"))
                row += rows[j]
            prefix = _fused_prefix(i, module)
            out[prefix + ".lora_A.weight"] = a
            out[prefix + ".lora_B.weight"] = b
            if settings.dora:
                out[prefix + ".lora_magnitude_vector"] = torch.cat(
                    [out.pop(to_peft_name(n + ".dora_m")) for n in names])
    return out


def load_peft(adapter_dir: str | os.PathLike[str], params: Params,
              cfg: ModelConfig) -> tuple[LoraSettings, Params]:
    """Read a PEFT LoRA/DoRA adapter for the base `params` into (settings, params + adapter tensors).

    `params` is not changed. Tensors are cast to the dtype and device of the weight they adapt.
    `target_modules` may be a list of HF module names or "all-linear" (every projection but lm_head).

    Raises:
        ValueError naming the file and key for a config lowmem cannot run (rsLoRA, rank/alpha patterns,
        biases, modules_to_save, lm_head or embedding targets, ...) and for missing, unexpected or wrongly
        shaped tensors. FileNotFoundError when a file is absent.
    """
    root = Path(adapter_dir)
    config_path = root / ADAPTER_CONFIG_FILE
    try:
        d = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_path}: not valid JSON ({e})") from None
    settings = _settings_from_peft(_unfuse_config(d, cfg, str(config_path)), str(config_path))
    expected = _expected_shapes(params, cfg, settings)
    weights_path = root / ADAPTER_WEIGHTS_FILE
    if not weights_path.exists():
        raise FileNotFoundError(f"{root}: no {ADAPTER_WEIGHTS_FILE} (lowmem reads safetensors adapters only)")
    found: Params = {}
    with safe_open(str(weights_path), framework="pt", device="cpu") as f:
        for peft_name in f.keys():
            fused = _FUSED_PEFT_NAME.fullmatch(peft_name) if cfg.family == "phi3" else None
            if fused is not None and fused.group(3) in _fused_modules(settings, cfg):
                found |= _split_fused(f.get_tensor(peft_name), fused, params, settings, f"{weights_path}")
                continue
            try:
                name = from_peft_name(peft_name)
            except KeyError:
                name = None
            if name is None or name not in expected:
                raise ValueError(
                    f"{weights_path}: unexpected tensor {peft_name!r}; {config_path.name} "
                    f"(r={settings.rank}, use_dora={settings.dora}, target_modules {_hf_modules(settings, cfg)}) "
                    f"expects only their adapters for {cfg.n_layers} layers"
                )
            shape = tuple(f.get_slice(peft_name).get_shape())
            if shape != expected[name]:
                raise ValueError(f"{weights_path}: tensor {peft_name!r} has shape {shape}, expected "
                                 f"{expected[name]} (r={settings.rank} from {config_path.name})")
            found[name] = f.get_tensor(peft_name)
    settings, found = _drop_untargeted_parts(settings, cfg, found)
    out = dict(params)
    for name, t in found.items():
        w = params[name.rsplit(".", 1)[0]]
        out[name] = t.to(device=w.device, dtype=w.dtype)
    missing = [to_peft_name(n) for n in _expected_shapes(params, cfg, settings) if n not in out]
    if missing:
        raise ValueError(f"{weights_path}: missing tensors {missing[:4]}{' ...' if len(missing) > 4 else ''} "
                         f"({len(missing)} in all) that {config_path.name} implies")
    return settings, out


_FUSED_PEFT_NAME = re.compile(
    re.escape(_PREFIX) + r"model\.layers\.(\d+)\.(self_attn|mlp)\.(qkv_proj|gate_up_proj)\."
    r"(lora_A\.weight|lora_B\.weight|lora_magnitude_vector)"
)


def _unfuse_config(d: dict[str, Any], cfg: ModelConfig, source: str) -> dict[str, Any]:
    """A Phi-3 adapter config as if written per part: fused target modules → their parts, patterns checked."""
    modules = d.get("target_modules")
    if cfg.family != "phi3" or not isinstance(modules, list) or not set(modules) & set(_PHI3_FUSED):
        return d
    fused = [m for m in _PHI3_FUSED if m in modules]
    r, alpha = d.get("r", 8), d.get("lora_alpha", 8)
    want = ({m: len(_PHI3_FUSED[m][1]) * r for m in fused}, {m: len(_PHI3_FUSED[m][1]) * alpha for m in fused})
    got = (d.get("rank_pattern") or {}, d.get("alpha_pattern") or {})
    if got != want:
        raise ValueError(
            f"{source}: rank_pattern = {got[0]!r}, alpha_pattern = {got[1]!r}; lowmem reads Phi-3's fused "
            f"{fused} as its parts' adapters stacked, which needs rank_pattern = {want[0]!r} and "
            f"alpha_pattern = {want[1]!r} (rank and alpha times the number of parts), as lowmem writes them"
        )
    parts = [_TARGET_TO_HF[p] for m in fused for p in _PHI3_FUSED[m][1]]
    return d | {"target_modules": [m for m in modules if m not in _PHI3_FUSED] + parts,
                "rank_pattern": {}, "alpha_pattern": {}}


def _split_fused(t: torch.Tensor, m: re.Match[str], params: Params, settings: LoraSettings,
                 source: str) -> Params:
    """One fused Phi-3 adapter tensor (see the module docstring) → its parts' canonical adapter tensors."""
    layer, module, kind = int(m.group(1)), m.group(3), m.group(4)
    names = [f"layers.{layer}.{TARGETS[p]}" for p in _PHI3_FUSED[module][1]]
    rows = [params[n].shape[0] for n in names]
    r, n = settings.rank, len(names)
    want = {"lora_A.weight": (n * r, params[names[0]].shape[1]), "lora_B.weight": (sum(rows), n * r),
            "lora_magnitude_vector": (sum(rows),)}[kind]
    if tuple(t.shape) != want:
        raise ValueError(f"{source}: tensor {m.group(0)!r} has shape {tuple(t.shape)}, expected {want} "
                         f"(rank {r} for each of {n} parts)")
    if kind == "lora_A.weight":
        return {name + ".lora_a": block for name, block in zip(names, t.split(r), strict=True)}
    if kind == "lora_magnitude_vector":
        return {name + ".dora_m": block for name, block in zip(names, t.split(rows), strict=True)}
    out, row = {}, 0
    for j, name in enumerate(names):
        band = t[row:row + rows[j]]  # (rows_j, n * r): part j's rows
        block = band[:, j * r:(j + 1) * r]
        if band.count_nonzero() != block.count_nonzero():
            raise ValueError(
                f"{source}: {m.group(0)!r} is not block diagonal (part {TARGETS[_PHI3_FUSED[module][1][j]]} "
                "reads other parts' ranks): an adapter trained on the fused module as a whole, which lowmem, "
                "adapting each part on its own, cannot split. Merge it into the base with PEFT instead"
            )
        out[name + ".lora_b"] = block
        row += rows[j]
    return out


def _drop_untargeted_parts(settings: LoraSettings, cfg: ModelConfig, found: Params) -> tuple[LoraSettings, Params]:
    """Settings and tensors without the fused modules' parts whose A and B are zero in every layer."""
    dropped = [
        p for m in _fused_modules(settings, cfg) for p in _PHI3_FUSED[m][1]
        if not settings.dora and all(
            not found[f"layers.{i}.{TARGETS[p]}{s}"].count_nonzero()
            for i in range(cfg.n_layers) for s in (".lora_a", ".lora_b")
            if f"layers.{i}.{TARGETS[p]}{s}" in found)
    ]
    if not dropped:
        return settings, found
    targets = tuple(t for t in settings.targets if t not in dropped)
    keep = {k: v for k, v in found.items() if not any(f".{TARGETS[p]}." in k for p in dropped)}
    return msgspec.structs.replace(settings, targets=targets), keep


def _settings_from_peft(d: dict[str, Any], source: str) -> LoraSettings:
    if d.get("peft_type") != "LORA":
        raise ValueError(f"{source}: peft_type = {d.get('peft_type')!r} is not supported; supported: 'LORA'")
    for key, default in _UNSUPPORTED_IF_SET.items():
        value = d.get(key, default)
        if value != default and (default or value):  # an empty list or false counts as unset
            raise ValueError(f"{source}: {key} = {value!r} is not supported; lowmem needs {default!r}")
    modules = d.get("target_modules")
    if modules == "all-linear":
        targets = tuple(TARGETS)
    elif isinstance(modules, list):
        unknown = [m for m in modules if m not in _TARGET_FROM_HF]
        if unknown:
            raise ValueError(f"{source}: target_modules {unknown} are not supported; supported: "
                             f"{sorted(_TARGET_FROM_HF)} or 'all-linear'")
        targets = tuple(t for t in TARGETS if _TARGET_TO_HF[t] in modules)
    else:
        raise ValueError(f"{source}: target_modules = {modules!r} is not supported; give a list of "
                         f"{sorted(_TARGET_FROM_HF)} or 'all-linear' (regular expressions are not read)")
    try:
        return LoraSettings(rank=d.get("r", 8), alpha=d.get("lora_alpha", 8), targets=targets,
                            dropout=float(d.get("lora_dropout", 0.0)), dora=bool(d.get("use_dora", False)))
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None


def _expected_shapes(params: Params, cfg: ModelConfig, settings: LoraSettings) -> dict[str, tuple[int, ...]]:
    """Adapter tensor name → shape for `settings` over `cfg`, from the base weights' shapes."""
    shapes: dict[str, tuple[int, ...]] = {}
    for name in adapted_names(cfg, settings):
        n_out, n_in = params[name].shape
        shapes[name + ".lora_a"] = (settings.rank, n_in)
        shapes[name + ".lora_b"] = (n_out, settings.rank)
        if settings.dora:
            shapes[name + ".dora_m"] = (n_out,)
    return shapes


def _check_adapters(found: set[str], expected: dict[str, tuple[int, ...]], where: str) -> None:
    missing = [n for n in expected if n not in found]
    unexpected = sorted(found - set(expected))
    if missing or unexpected:
        raise ValueError(f"{where}: adapters do not match the settings: missing {missing[:4]}, "
                         f"unexpected {unexpected[:4]}")
