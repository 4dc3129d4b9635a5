"""Atomic, resumable checkpoints: weights, optimizer state, RNG, data position and step.

A checkpoint is a directory `RUN/checkpoints/step-00000050/`. A single process writes::

    model.safetensors      the trainable tensors by canonical name
    optimizer.safetensors  every tensor of the optimizer's state_dict, keyed by its path in that dict, with
                           parameters named (`state.layers.0.attn.wq.exp_avg`), not numbered
    trainer.json           step, data-loader position, the optimizer state_dict's non-tensor part, the plan's
                           fingerprint, the RNG state and the format version

Under torchrun (FSDP2) every rank writes its own shards with torch.distributed.checkpoint (DCP) through its
safetensors storage writer, so no rank ever holds the full state::

    shard-0000R-model-00001-of-00001.safetensors   rank R-1's shards of the same tensors, under the same keys,
                                                   each with its offset in the full tensor (DCP metadata)
    trainer.json                                   as above (written by rank 0), with "sharded": true

Both layouts are read by any number of processes: DCP's safetensors reader sees a single-process checkpoint as
a sharded one with one shard per tensor, so resuming 2 -> 1 or 1 -> 2 processes reshards on load. Keying the
optimizer state by parameter name (not by its position in the optimizer) is what makes that possible: FSDP's
parameter order is the module tree's, not the params dict's.

A checkpoint is written into a hidden temporary directory beside it and renamed into place (by rank 0 after
every rank has written), so a run killed at any moment leaves either a complete checkpoint or none; the
temporary directory is ignored and cleaned up. No pickle is used anywhere.
"""

import errno
import hashlib
import importlib
import json
import os
import re
import shutil
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import msgspec
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lowmem.files import share
from lowmem.nn.hf import _fsync as _fsync_file
from lowmem.nn.hf import _replace_dir
from lowmem.train import distributed
from lowmem.train.device import cuda_rng_state, restore_cuda_rng_state

CHECKPOINT_FORMAT = 1
# The digest recorded per checkpoint file (trainer.json "digests") and checked on resume: hashlib's sha256 uses
# the CPU's SHA extensions where it has them (sha_ni on this machine's EPYC)
DIGEST = "sha256"
_STEP_DIR = re.compile(r"^step-(\d{8})$")
# Tensor subclasses whose inner tensors a checkpoint may store, and rebuild through `__tensor_unflatten__`:
# torchao's quantized optimizer states (codes, scale, qmap). An allowlist: a checkpoint names a class to build.
_SUBCLASSES = {
    "torchao.optim.subclass_8bit.OptimState8bit",
    "torchao.optim.subclass_4bit.OptimState4bit",
}


class CheckpointError(ValueError):
    """A checkpoint cannot be written or read: the message names the directory, what went wrong and the fix."""


def plan_fingerprint(plan, world: int = 1) -> dict[str, str]:
    """What must not change between a run and its resumption, by part: a hash of each.

    Parts: the model (resolved config and spec section), the strategies, data, method, optimizer and train
    settings. Logging and evaluation cadence are left out, and so is the split of each step's rows over
    processes: `train.micro_batch` enters as micro_batch x `world`, the rows one loader batch takes over all
    ranks, so a run can resume on another number of processes when that product is kept.
    """
    return {name: hashlib.sha256(msgspec.json.encode(v)).hexdigest()[:16]
            for name, v in plan_identity(plan, world).items()}


def plan_identity(plan, world: int = 1) -> dict[str, Any]:
    """The values `plan_fingerprint` hashes, as plain JSON data (a checkpoint stores them, so that a refused
    resume can name each setting that changed, with its old and new value)."""
    spec = plan.spec
    train = msgspec.structs.replace(spec.train, log_every=1, eval_every=0, eval_batches=1,
                                    micro_batch=spec.train.micro_batch * world)
    parts = {"model": (plan.model, spec.model), "strategies": _stored_strategies(plan.strategies), "data": spec.data,
             "method": spec.method, "optimizer": spec.optimizer, "train": train}
    return {name: msgspec.json.decode(msgspec.json.encode(_set_fields(v))) for name, v in parts.items()}


def changed_settings(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """`path: old -> new` for each setting that differs between two `plan_identity`s (a missing one is unset)."""
    found: list[str] = []

    def walk(a, b, where: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for key in dict.fromkeys([*a, *b]):
                walk(a.get(key, _UNSET), b.get(key, _UNSET), f"{where}.{key}")
        elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b) and where != "model":
            for i, (x, y) in enumerate(zip(a, b, strict=True)):
                walk(x, y, f"{where}[{i}]")
        elif where == "model" and isinstance(a, list) and isinstance(b, list) and len(a) == len(b) == 2:
            walk(a[0], b[0], "model config")  # the resolved ModelConfig, then the spec's model section
            walk(a[1], b[1], "model")
        elif a != b:
            found.append(f"{where.lstrip('.')}: {_shown(a)} -> {_shown(b)}")

    for part in dict.fromkeys([*old, *new]):
        walk(old.get(part, _UNSET), new.get(part, _UNSET), part)
    return found


_UNSET = "(default)"


def _shown(value) -> str:
    text = value if value == _UNSET else json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


# Strategies that change what a step holds on the device but neither what the checkpoint stores nor what the
# step computes (up to float summation order): a run may resume under a plan that chose them differently, as
# an on-OOM re-plan does (`memory.on_oom`). Precision, the optimizer's states and where they step stay fixed.
MEMORY_ONLY_STRATEGIES = ("activation_checkpointing", "cross_entropy", "activation_offloading", "offload_min_bytes",
                          "offload_max_host_bytes", "compile", "micro_batch_split", "attention_kernel",
                          "projection_dtype")


def _stored_strategies(strategies):
    """`strategies` with the memory-only ones at their defaults: the part a resume must keep."""
    defaults = {f.name: f.default for f in msgspec.structs.fields(strategies)
                if f.name in MEMORY_ONLY_STRATEGIES and f.default is not msgspec.NODEFAULT}
    return msgspec.structs.replace(strategies, **{name: defaults.get(name, "any") for name in MEMORY_ONLY_STRATEGIES
                                                  if hasattr(strategies, name)})


def _set_fields(value):
    """`value` with every Struct field that holds its default left out, recursively (tags kept).

    A later version that adds a setting with a default (a new strategy, off) therefore fingerprints an old
    run's plan as before, and resumes it; a setting whose value differs from the default still changes the
    hash.
    """
    if isinstance(value, msgspec.Struct):
        out = {}
        config = value.__struct_config__
        if config.tag is not None:
            out[config.tag_field] = config.tag
        for field in msgspec.structs.fields(value):
            v = getattr(value, field.name)
            if field.default is not msgspec.NODEFAULT and _same(v, field.default):
                continue
            if field.default_factory is not msgspec.NODEFAULT and _same(v, field.default_factory()):
                continue
            out[field.encode_name] = _set_fields(v)
        return out
    if isinstance(value, dict):
        return {k: _set_fields(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_set_fields(v) for v in value]
    return value


def _same(a, b) -> bool:
    return type(a) is type(b) and msgspec.json.encode(a) == msgspec.json.encode(b)


def _combined(parts: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step-{step:08d}"


def save_checkpoint(run_dir: Path, step: int, params: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
                    loader_state: dict, fingerprint: dict[str, str], keep: int,
                    identity: dict[str, Any] | None = None) -> Path:
    """Write the checkpoint for `step` atomically, then delete all but the newest `keep` checkpoints.

    `params` are the trainable tensors by canonical name, in the order the optimizer was given them (DTensors
    under FSDP: then every rank must call this, and each writes its shards). A write that fails (disk full,
    file size limit) removes the partial directory and raises CheckpointError; older checkpoints are untouched.
    """
    world = distributed.world_size()
    final = checkpoint_dir(run_dir, step)
    # every rank must name the same directory: rank 0's pid (which also marks it as this run's in `_rotate`)
    pid = os.getpid() if world == 1 else int(distributed.all_reduce_sum(
        [float(os.getpid() if distributed.rank() == 0 else 0)])[0])
    tmp = final.parent / f".tmp-{final.name}-{pid}"
    tensors, skeleton = _split_state(_by_name(optimizer.state_dict(), list(params)))
    trainer = {"format": CHECKPOINT_FORMAT, "step": step, "loader": loader_state,
               "fingerprint": _combined(fingerprint), "fingerprint_parts": fingerprint, "identity": identity,
               "optimizer": skeleton,
               "sharded": world > 1, "world_size": world, "torch_rng": torch.get_rng_state().tolist(),
               # LoRA dropout and stochastic rounding on a GPU draw from the CUDA generators: a resume needs them
               "cuda_rng": cuda_rng_state("cuda")}
    first = distributed.rank() == 0

    def prepare() -> None:
        if first:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)

    def write() -> None:
        if world == 1:
            save_file({k: v.detach().contiguous() for k, v in params.items()}, tmp / "model.safetensors")
            save_file(tensors, tmp / "optimizer.safetensors")
        else:
            _save_sharded({**{k: v.detach() for k, v in params.items()}, **tensors}, tmp)

    def finish() -> None:
        if first:
            # every file's digest, computed while the files are flushed to disk (hashing overlaps the fsync)
            trainer["digests"] = _digest_and_sync(sorted(tmp.iterdir()))
            (tmp / "trainer.json").write_text(json.dumps(trainer))
            _fsync_file(tmp / "trainer.json")
            share(tmp)  # safetensors writes 0600: a checkpoint is shared like the run directory
            # the same step saved again (e.g. the final step after an interrupt) is moved aside, then deleted
            _replace_dir(tmp, final)
            _fsync_file(final.parent)

    for phase in (prepare, write, finish):  # every rank learns of a failure on any rank, so all stop together
        failed = _on_every_rank(phase)
        if failed is not None:
            if first:
                shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointError(_write_failure(final, run_dir, failed)) from failed
    if first:
        _rotate(run_dir, keep, pid)
    distributed.barrier()  # the checkpoint is in place when any rank goes on
    return final


def _on_every_rank(phase) -> BaseException | None:
    """Run `phase()`; return its error, or (when only another rank failed) an error saying so; else None."""
    try:
        phase()
        failed = None
    except Exception as err:  # noqa: BLE001 - reported to every rank, then raised as CheckpointError
        failed = err
    if distributed.world_size() > 1 and distributed.all_reduce_sum([float(failed is not None)])[0] and not failed:
        failed = OSError(f"another rank failed in the checkpoint's {phase.__name__} phase (see its error)")
    return failed


def _write_failure(final: Path, run_dir: Path, err: BaseException) -> str:
    previous = latest_checkpoint(run_dir)
    kept = (f"the newest complete checkpoint, {previous.name}, is intact: `--resume` continues from it"
            if previous else "there is no earlier checkpoint")
    code = _errno(err)
    if code in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        fix = (f"the disk is full or a file size limit was hit ({os.strerror(code)}). Free space under "
               f"{final.parent} or lower output.keep (or raise the limit), then resume")
    else:
        fix = "fix the cause above, then resume"
    return f"could not write checkpoint {final}: {err}. The partial checkpoint was removed and {kept}; {fix}."


def _errno(err: BaseException | None) -> int | None:
    """The OS error number behind `err`: an OSError's, one safetensors reports in its message ("os error 27"),
    or one inside DCP's exception (which collects each rank's failure)."""
    for _ in range(8):
        if err is None:
            return None
        if isinstance(err, OSError) and err.errno is not None:
            return err.errno
        if isinstance(err, SafetensorError) and (m := re.search(r"os error (\d+)", str(err))):
            return int(m.group(1))
        failures = getattr(err, "failures", None)  # torch.distributed.checkpoint's CheckpointException
        if isinstance(failures, dict) and failures:
            return _errno(next(iter(failures.values())))
        err = err.__cause__ or err.__context__
    return None


def _save_sharded(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Every rank writes its shards of `tensors` (DTensors, or plain tensors every rank holds alike) as safetensors."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.hf_storage import HuggingFaceStorageWriter

    dcp.save(tensors, storage_writer=HuggingFaceStorageWriter(str(path), save_distributed=True))


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
                    fingerprint: dict[str, str], rows_per_batch: int | None = None,
                    identity: dict[str, Any] | None = None) -> dict:
    """Restore params (in place) and the optimizer from a checkpoint; return its trainer state.

    Any number of processes reads either layout (see the module docstring). `rows_per_batch` is the rows one
    loader batch takes over all ranks (train.micro_batch x processes): the loader position counts such
    batches, so it must be the one the checkpoint was written with. File digests are not checked here: a resume
    picks its checkpoint with `intact_checkpoint`, which has checked them (once: they cost a read of every file).
    """
    trainer = read_trainer_state(path)
    saved_rows = trainer["loader"].get("rows_per_batch")
    if rows_per_batch is not None and saved_rows is not None and saved_rows != rows_per_batch:
        world = distributed.world_size()
        raise CheckpointError(
            f"{path}: written with {saved_rows} rows per loader batch (train.micro_batch x "
            f"{trainer.get('world_size', 1)} processes), this run takes {rows_per_batch} "
            f"(train.micro_batch = {rows_per_batch // world} x {world}). Resume with train.micro_batch = "
            f"{saved_rows / world:g} on {world} process(es) so every step sees the same rows"
            + ("" if saved_rows % world == 0 else f" (not possible: use a process count dividing {saved_rows})")
        )
    _check_fingerprint(path, trainer, fingerprint, identity)
    names = list(params)
    if trainer.get("sharded") or distributed.world_size() > 1:
        weights, state = _load_resharded(path, params, trainer["optimizer"])
    else:
        weights = _read_safetensors(path / "model.safetensors")
        state = _join_state(_read_safetensors(path / "optimizer.safetensors"), trainer["optimizer"])
    if weights.keys() != params.keys():
        missing, extra = sorted(params.keys() - weights.keys()), sorted(weights.keys() - params.keys())
        raise CheckpointError(f"{path}: the trainable tensors differ from this run's (missing {missing[:3]}, extra "
                              f"{extra[:3]}); resume with the spec that made the checkpoint")
    with torch.no_grad():
        for name, t in params.items():
            if weights[name].shape != t.shape:
                raise CheckpointError(f"{path}: {name} has shape {tuple(weights[name].shape)}, the model expects "
                                      f"{tuple(t.shape)}; resume with the spec that made the checkpoint")
            if weights[name] is not t:
                t.copy_(weights[name])
    optimizer.load_state_dict(_by_index(state, names, path))
    torch.set_rng_state(torch.tensor(trainer["torch_rng"], dtype=torch.uint8))
    restore_cuda_rng_state(trainer.get("cuda_rng"), "cuda")
    return trainer


def _check_fingerprint(path: Path, trainer: dict, fingerprint: dict[str, str], identity: dict | None) -> None:
    """Refuse a checkpoint another plan wrote, naming each setting that changed (old -> new) where it can."""
    if trainer["fingerprint"] == _combined(fingerprint):
        return
    saved = trainer.get("fingerprint_parts", {})
    parts = [name for name in fingerprint if saved.get(name) != fingerprint[name]] if saved else []
    what = ", ".join(parts) if parts else "model, data, method, optimizer, strategies or train settings"
    settings = changed_settings(trainer["identity"], identity) if "identity" in trainer and identity else []
    detail = f": {'; '.join(settings[:6])}" if settings else ""
    raise CheckpointError(
        f"{path}: this checkpoint was written by a different plan ({what} changed{detail}). Resume with the "
        "spec that made it, or start a new run in another output directory."
    )


def verify_digests(path: Path, trainer: dict | None = None) -> None:
    """Check every file of a checkpoint against the digest recorded when it was written (CheckpointError if
    one differs or is missing). Checkpoints written before digests were recorded pass unchecked."""
    trainer = read_trainer_state(path) if trainer is None else trainer
    for name, digest in trainer.get("digests", {}).items():
        file = path / name
        try:
            actual = _file_digest(file)
        except OSError as err:
            raise CheckpointError(f"{file}: cannot be read ({err.strerror}); the checkpoint is damaged. Delete "
                                  f"{path} to resume from the checkpoint before it") from None
        if actual != digest:
            raise CheckpointError(f"{file}: its {DIGEST} differs from the one recorded when it was written; the "
                                  f"checkpoint is damaged. Delete {path} to resume from the checkpoint before it")


def intact_checkpoint(run_dir: Path) -> tuple[Path | None, list[str]]:
    """The newest checkpoint whose files match their digests, and a line for each damaged newer one.

    A damaged checkpoint with an intact one before it is renamed `damaged-step-N` (by rank 0, once every rank
    has looked), so that it is neither resumed from nor kept in place of good ones by the rotation; it stays for
    inspection. When none is intact, the newest one's CheckpointError is raised and nothing is moved.
    """
    damaged, found = [], None
    for candidate in reversed(_step_dirs(run_dir)):
        try:
            verify_digests(candidate)
        except CheckpointError as err:
            damaged.append((candidate, err))
            continue
        found = candidate
        break
    if damaged and found is None:
        raise damaged[0][1]
    distributed.barrier()
    notes = []
    for candidate, err in damaged:
        aside = candidate.parent / f"damaged-{candidate.name}"
        if distributed.rank() == 0:
            os.rename(candidate, aside)
        notes.append(f"{str(err).split('; ')[0]}: moved aside to {aside}; resuming from {found.name}")
    distributed.barrier()
    return found, notes


def _digest_and_sync(files: list[Path]) -> dict[str, str]:
    """`{name: digest}` of `files`, each hashed in a thread while the main thread fsyncs the files."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        futures = {f.name: pool.submit(_file_digest, f) for f in files}
        for f in files:
            _fsync_file(f)
        return {name: future.result() for name, future in futures.items()}


def _file_digest(file: Path) -> str:
    with open(file, "rb") as f:
        return hashlib.file_digest(f, DIGEST).hexdigest()


def read_trainer_state(path: Path) -> dict:
    """trainer.json of a checkpoint, checked for its format version."""
    try:
        trainer = json.loads((path / "trainer.json").read_text())
    except (OSError, ValueError) as err:  # ValueError: not UTF-8, not JSON
        raise CheckpointError(f"{path}: not a readable lowmem checkpoint ({err}); delete {path} to resume from "
                              "an older checkpoint") from None
    if trainer.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: checkpoint format {trainer.get('format')}, this lowmem reads "
                              f"{CHECKPOINT_FORMAT}")
    return trainer


def _read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(file)
    except (OSError, SafetensorError) as err:
        raise CheckpointError(f"{file}: cannot be read ({err}); the checkpoint is damaged. Delete "
                              f"{file.parent} to resume from the checkpoint before it") from None


def _load_resharded(path: Path, params: dict[str, torch.Tensor], skeleton: Any
                    ) -> tuple[dict[str, torch.Tensor], Any]:
    """Read either layout into this run's tensors (sharded like `params`, or full in one process) with DCP.

    Every tensor of the checkpoint is read into a tensor made like the parameter it belongs to (so a DTensor
    gets only this rank's shard, whatever the saved sharding was); a tensor of another shape (a 0-d `step`)
    is read whole. Returns (the weights by name, the optimizer state_dict keyed by parameter name).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.hf_storage import HuggingFaceStorageReader

    reader = HuggingFaceStorageReader(str(path))
    try:
        saved = reader.read_metadata().state_dict_metadata
    except (OSError, SafetensorError) as err:
        raise CheckpointError(f"{path}: its safetensors files cannot be read ({err}); the checkpoint is damaged. "
                              f"Delete {path} to resume from the checkpoint before it") from None
    owner = {key: name for name, keys in _state_keys(skeleton).items() for key in keys}
    targets = {}
    for key, meta in saved.items():
        like = params.get(key, params.get(owner.get(key, "")))
        if like is not None and tuple(meta.size) == tuple(like.shape):
            targets[key] = torch.empty_like(like, dtype=meta.properties.dtype)
        else:
            targets[key] = torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
    try:
        with warnings.catch_warnings():  # one process reading a sharded checkpoint is what this is for
            warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
            dcp.load(targets, storage_reader=HuggingFaceStorageReader(str(path)))
    except Exception as err:  # noqa: BLE001 - DCP wraps a failing read on any rank in its own exception
        raise CheckpointError(f"{path}: reading the checkpoint failed ({err}); the checkpoint is damaged. "
                              f"Delete {path} to resume from the checkpoint before it") from None
    weights = {k: v for k, v in targets.items() if k in params}
    return weights, _join_state(targets, skeleton)


def _state_keys(skeleton: Any) -> dict[str, list[str]]:
    """Parameter name -> the tensor keys of its optimizer state, from a name-keyed optimizer skeleton."""
    top = dict(skeleton.get("__dict__", []))
    out = {}
    for name, entry in top.get("state", {}).get("__dict__", []):
        out[name] = [s["__tensor__"] for _, s in entry.get("__dict__", []) if "__tensor__" in s]
    return out


def _by_name(state_dict: dict, names: list[str]) -> dict:
    """A torch optimizer state_dict with parameter indices replaced by the parameters' names."""
    if set(state_dict) != {"state", "param_groups"}:  # not a torch optimizer's (e.g. in-backward): as it is
        return state_dict
    return {"state": {names[i]: s for i, s in state_dict["state"].items()},
            "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state_dict["param_groups"]]}


def _by_index(state_dict: dict, names: list[str], path: Path) -> dict:
    """Inverse of `_by_name` for this run's parameter order (a state_dict already keyed by index passes)."""
    if set(state_dict) != {"state", "param_groups"}:
        return state_dict
    index = {n: i for i, n in enumerate(names)}
    unknown = [n for g in state_dict["param_groups"] for n in g["params"] if isinstance(n, str) and n not in index]
    if unknown:
        raise CheckpointError(f"{path}: the optimizer state is for tensors this run does not train ({unknown[:3]}); "
                              "resume with the spec that made the checkpoint")
    # torch's load_state_dict pairs a group's saved ids with its current parameters by position: list them in
    # this run's order (FSDP's module order may differ from the single-process one)
    return {"state": {index.get(k, k): s for k, s in state_dict["state"].items()},
            "param_groups": [{**g, "params": sorted(index.get(n, n) for n in g["params"])}
                             for g in state_dict["param_groups"]]}


def _split_state(obj: Any, prefix: str = "", seen: dict | None = None) -> tuple[dict[str, torch.Tensor], Any]:
    """Separate the tensors of a nested state_dict (to safetensors) from its structure (to JSON).

    An allowlisted tensor subclass (torchao's quantized states) is stored as its inner tensors plus its class
    and non-tensor attributes (`__tensor_flatten__`), and rebuilt by `__tensor_unflatten__`. A tensor met again
    (bitsandbytes shares its quantization maps between parameters) is stored once and referred to by its first
    key: safetensors refuses tensors that share memory. It comes back as equal, separate tensors.
    """
    seen = {} if seen is None else seen
    if isinstance(obj, torch.Tensor) and _qualname(type(obj)) in _SUBCLASSES:
        inner_names, attrs = obj.__tensor_flatten__()
        tensors, inner = {}, []
        for name in inner_names:
            t, s = _split_state(getattr(obj, name), f"{prefix}.{name}", seen)
            tensors.update(t)
            inner.append([name, s])
        return tensors, {"__subclass__": _qualname(type(obj)), "inner": inner,
                         "attrs": [_split_state(a)[1] for a in attrs]}
    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        if distributed.is_sharded(t):
            return {prefix: t}, {"__tensor__": prefix}
        where = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if where in seen and t.numel():
            return {}, {"__tensor__": seen[where]}
        seen[where] = prefix
        return {prefix: t.contiguous()}, {"__tensor__": prefix}
    if isinstance(obj, torch.dtype):
        return {}, {"__dtype__": str(obj).removeprefix("torch.")}
    if isinstance(obj, dict):
        tensors, out = {}, {"__dict__": []}
        for k, v in obj.items():
            t, s = _split_state(v, f"{prefix}.{k}" if prefix else str(k), seen)
            tensors.update(t)
            out["__dict__"].append([k, s])  # keys may be ints (param indices): keep their type
        return tensors, out
    if isinstance(obj, (list, tuple)):
        tensors, items = {}, []
        for i, v in enumerate(obj):
            t, s = _split_state(v, f"{prefix}.{i}", seen)
            tensors.update(t)
            items.append(s)
        # tuples stay tuples (betas): torch.compile'd steps (torchao) guard on the type
        return tensors, {"__tuple__" if isinstance(obj, tuple) else "__list__": items}
    return {}, {"__value__": obj}


def _join_state(tensors: dict[str, torch.Tensor], skeleton: Any) -> Any:
    if "__tensor__" in skeleton:
        return tensors[skeleton["__tensor__"]]
    if "__subclass__" in skeleton:
        inner = {name: _join_state(tensors, s) for name, s in skeleton["inner"]}
        attrs = [_join_state(tensors, s) for s in skeleton["attrs"]]
        return _subclass(skeleton["__subclass__"]).__tensor_unflatten__(inner, attrs, None, None)
    if "__dtype__" in skeleton:
        dtype = getattr(torch, skeleton["__dtype__"], None)
        assert isinstance(dtype, torch.dtype), skeleton
        return dtype
    if "__dict__" in skeleton:
        return {k: _join_state(tensors, s) for k, s in skeleton["__dict__"]}
    if "__list__" in skeleton:
        return [_join_state(tensors, s) for s in skeleton["__list__"]]
    if "__tuple__" in skeleton:
        return tuple(_join_state(tensors, s) for s in skeleton["__tuple__"])
    return skeleton["__value__"]


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _subclass(qualname: str) -> type:
    if qualname not in _SUBCLASSES:
        raise CheckpointError(f"a checkpoint names the tensor class {qualname!r}, which lowmem does not rebuild")
    module, name = qualname.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


def _rotate(run_dir: Path, keep: int, pid: int) -> None:
    """Delete all but the newest `keep` checkpoints, and what killed runs left behind.

    Each is renamed to a hidden trash name before it is deleted: a kill during the deletion leaves a hidden
    directory (deleted at the next rotation), never a `step-N/` that lacks some of its files.
    """
    steps = _step_dirs(run_dir)
    root = run_dir / "checkpoints"
    for d in steps[:-keep] if keep > 0 else []:
        trash = root / f".trash-{d.name}-{pid}"
        os.rename(d, trash)
        shutil.rmtree(trash)
    for d in root.iterdir():  # temporary, trash and moved-aside (`_replace_dir`) directories of killed runs
        if (d.name.startswith((".tmp-", ".trash-")) and not d.name.endswith(f"-{pid}")) or ".old-" in d.name:
            shutil.rmtree(d, ignore_errors=True)
