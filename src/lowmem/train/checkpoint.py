"""Atomic, resumable checkpoints: weights, optimizer state, RNG, data position and step.

A checkpoint is a directory `RUN/checkpoints/step-00000050/` holding::

    model.safetensors      trainable and frozen tensors by canonical name
    optimizer.safetensors  every tensor of the optimizer's state_dict, keyed by its path in that dict
    trainer.json           step, data-loader position, the optimizer state_dict's non-tensor part, the plan's
                           fingerprint, and the format version

It is written into a hidden temporary directory beside it and renamed into place, so a run killed at any
moment leaves either a complete checkpoint or none (the temporary directory is ignored and cleaned up). No
pickle is used anywhere.
"""

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import msgspec
import torch
from safetensors.torch import load_file, save_file

from lowmem.nn.hf import _fsync as _fsync_file

CHECKPOINT_FORMAT = 1
_STEP_DIR = re.compile(r"^step-(\d{8})$")


def plan_fingerprint(plan) -> str:
    """What must not change between a run and its resumption: model, strategies, data, method, optimizer, train.

    The output section, logging and evaluation cadence are left out: they do not change the numbers.
    """
    spec = plan.spec
    train = msgspec.structs.replace(spec.train, log_every=1, eval_every=0, eval_batches=1)
    key = (plan.model, plan.strategies, spec.model, spec.data, spec.method, spec.optimizer, train)
    return hashlib.sha256(msgspec.json.encode(key)).hexdigest()[:16]


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step-{step:08d}"


def save_checkpoint(run_dir: Path, step: int, params: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
                    loader_state: dict, fingerprint: str, keep: int) -> Path:
    """Write the checkpoint for `step` atomically, then delete all but the newest `keep` checkpoints."""
    final = checkpoint_dir(run_dir, step)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().contiguous() for k, v in params.items()}, tmp / "model.safetensors")
    tensors, skeleton = _split_state(optimizer.state_dict())
    save_file(tensors, tmp / "optimizer.safetensors")
    trainer = {"format": CHECKPOINT_FORMAT, "step": step, "loader": loader_state, "fingerprint": fingerprint,
               "optimizer": skeleton, "torch_rng": torch.get_rng_state().tolist()}
    (tmp / "trainer.json").write_text(json.dumps(trainer))
    for f in tmp.iterdir():
        _fsync_file(f)
    if final.exists():  # the same step saved again (e.g. the final step after an interrupt): replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_file(final.parent)
    _rotate(run_dir, keep)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint in a run directory, or None."""
    steps = _step_dirs(run_dir)
    return steps[-1] if steps else None


def _step_dirs(run_dir: Path) -> list[Path]:
    """The complete checkpoints of a run, oldest first (temporary directories are not among them)."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    steps = sorted((int(m.group(1)), d) for d in root.iterdir() if (m := _STEP_DIR.match(d.name)))
    return [d for _, d in steps]


def load_checkpoint(path: Path, params: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
                    fingerprint: str) -> dict:
    """Restore params (in place) and the optimizer from a checkpoint; return its trainer state."""
    try:
        trainer = json.loads((path / "trainer.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not a readable lowmem checkpoint ({err}); delete it to resume from an older one") from None
    if trainer.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: checkpoint format {trainer.get('format')}, this lowmem reads {CHECKPOINT_FORMAT}")
    if trainer["fingerprint"] != fingerprint:
        raise ValueError(
            f"{path}: this checkpoint was written by a different plan (model, data, method, optimizer, strategies "
            "or train settings changed). Resume with the spec that made it, or start a new run in another "
            "output directory."
        )
    weights = load_file(path / "model.safetensors")
    if weights.keys() != params.keys():
        missing, extra = sorted(params.keys() - weights.keys()), sorted(weights.keys() - params.keys())
        raise ValueError(f"{path}/model.safetensors: tensor names differ (missing {missing[:3]}, extra {extra[:3]})")
    with torch.no_grad():
        for name, t in params.items():
            if weights[name].shape != t.shape:
                raise ValueError(f"{path}/model.safetensors: {name} has shape {tuple(weights[name].shape)}, "
                                 f"the model expects {tuple(t.shape)}")
            t.copy_(weights[name])
    optimizer.load_state_dict(_join_state(load_file(path / "optimizer.safetensors"), trainer["optimizer"]))
    torch.set_rng_state(torch.tensor(trainer["torch_rng"], dtype=torch.uint8))
    return trainer


def _split_state(obj: Any, prefix: str = "") -> tuple[dict[str, torch.Tensor], Any]:
    """Separate the tensors of a nested state_dict (to safetensors) from its structure (to JSON)."""
    if isinstance(obj, torch.Tensor):
        return {prefix: obj.detach().contiguous()}, {"__tensor__": prefix}
    if isinstance(obj, dict):
        tensors, out = {}, {"__dict__": []}
        for k, v in obj.items():
            t, s = _split_state(v, f"{prefix}.{k}" if prefix else str(k))
            tensors.update(t)
            out["__dict__"].append([k, s])  # keys may be ints (param indices): keep their type
        return tensors, out
    if isinstance(obj, (list, tuple)):
        tensors, items = {}, []
        for i, v in enumerate(obj):
            t, s = _split_state(v, f"{prefix}.{i}")
            tensors.update(t)
            items.append(s)
        return tensors, {"__list__": items}
    return {}, {"__value__": obj}


def _join_state(tensors: dict[str, torch.Tensor], skeleton: Any) -> Any:
    if "__tensor__" in skeleton:
        return tensors[skeleton["__tensor__"]]
    if "__dict__" in skeleton:
        return {k: _join_state(tensors, s) for k, s in skeleton["__dict__"]}
    if "__list__" in skeleton:
        return [_join_state(tensors, s) for s in skeleton["__list__"]]
    return skeleton["__value__"]


def _rotate(run_dir: Path, keep: int) -> None:
    steps = _step_dirs(run_dir)
    for d in steps[:-keep] if keep > 0 else []:
        shutil.rmtree(d)
    for d in (run_dir / "checkpoints").iterdir():  # temporary directories of killed runs
        if d.name.startswith(".tmp-") and not d.name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(d, ignore_errors=True)
