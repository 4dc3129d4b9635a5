"""PEFT-format adapters: `adapter_config.json` + `adapter_model.safetensors`, as `PeftModel.from_pretrained`
reads them and `PeftModel.save_pretrained` writes them (checked against peft 0.21).

Tensor names: `layers.3.attn.wq.lora_a` ↔ `base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight`,
`.lora_b` ↔ `.lora_B.weight`, `.dora_m` ↔ `.lora_magnitude_vector` (no `.weight` suffix in the file).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

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


def _peft_config(settings: LoraSettings, base_model_name_or_path: str | None) -> dict[str, Any]:
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": settings.rank,
        "lora_alpha": settings.alpha,
        "lora_dropout": settings.dropout,
        "target_modules": [_TARGET_TO_HF[t] for t in TARGETS if t in settings.targets],
        "use_dora": settings.dora,
        "use_rslora": False,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
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
    return write_dir_atomic(out, {ADAPTER_CONFIG_FILE: _peft_config(settings, base_model_name_or_path)},
                            {ADAPTER_WEIGHTS_FILE: tensors})


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
    settings = _settings_from_peft(d, str(config_path))
    expected = _expected_shapes(params, cfg, settings)
    weights_path = root / ADAPTER_WEIGHTS_FILE
    if not weights_path.exists():
        raise FileNotFoundError(f"{root}: no {ADAPTER_WEIGHTS_FILE} (lowmem reads safetensors adapters only)")
    out = dict(params)
    with safe_open(str(weights_path), framework="pt", device="cpu") as f:
        for peft_name in f.keys():
            try:
                name = from_peft_name(peft_name)
            except KeyError:
                name = None
            if name is None or name not in expected:
                modules = [_TARGET_TO_HF[t] for t in settings.targets]
                raise ValueError(
                    f"{weights_path}: unexpected tensor {peft_name!r}; {config_path.name} "
                    f"(r={settings.rank}, use_dora={settings.dora}, target_modules {modules}) "
                    f"expects only their adapters for {cfg.n_layers} layers"
                )
            shape = tuple(f.get_slice(peft_name).get_shape())
            if shape != expected[name]:
                raise ValueError(f"{weights_path}: tensor {peft_name!r} has shape {shape}, expected "
                                 f"{expected[name]} (r={settings.rank} from {config_path.name})")
            w = params[name.rsplit(".", 1)[0]]
            out[name] = f.get_tensor(peft_name).to(device=w.device, dtype=w.dtype)
    missing = [to_peft_name(n) for n in expected if n not in out]
    if missing:
        raise ValueError(f"{weights_path}: missing tensors {missing[:4]}{' ...' if len(missing) > 4 else ''} "
                         f"({len(missing)} in all) that {config_path.name} implies")
    return settings, out


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
