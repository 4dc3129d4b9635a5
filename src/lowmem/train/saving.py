"""Saving a run: checkpoints of a step, resuming from one, and the final model (HF weights, or PEFT adapters)."""

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

from lowmem.data.tokenizer import Tokenizer
from lowmem.files import share
from lowmem.nn import save_hf
from lowmem.nn.hf import _fsync as fsync_path
from lowmem.nn.hf import _replace_dir as replace_dir
from lowmem.nn.hub import resolve_model_dir
from lowmem.nn.lora import LoraSettings, trainable_names
from lowmem.nn.peft_io import save_peft
from lowmem.plan import Plan
from lowmem.train import distributed
from lowmem.train.checkpoint import (
    CheckpointError,
    checkpoint_dir,
    latest_checkpoint,
    load_checkpoint,
    plan_identity,
    save_checkpoint,
)
from lowmem.train.session import Session


def save_final(p: Plan, params: dict[str, torch.Tensor], adapters: LoraSettings | None, tokenizer: Tokenizer,
               out: Path) -> Path:
    """Final weights: HF format for full fine-tuning; PEFT adapters (plus the base when it is not on disk).

    Each directory (model/, base/, adapter/) is written whole, tokenizer files included, in a hidden staging
    directory and renamed into place: a kill at any moment leaves it absent, as it was, or complete.
    """
    detached = {k: v.detach() for k, v in params.items()}
    if adapters is None:
        with staged(out / "model") as model_dir:
            save_hf(detached, p.model, model_dir)
            copy_tokenizer(tokenizer, model_dir)
        return out / "model"
    base_dir = resolve_model_dir(p.spec.model.path) if p.spec.model.path else out / "base"
    if p.spec.model.path is None:  # a preset's random base exists only in this run: save it for the adapter
        base = {k: v for k, v in detached.items() if k not in set(trainable_names(detached))}
        if p.strategies.nf4_block_size:  # the weights QLoRA trained against: the dequantized NF4 base
            from lowmem.nn.quant import dequantize_nf4

            base = dequantize_nf4(base)
        with staged(base_dir) as staging:
            save_hf(base, p.model, staging)
            copy_tokenizer(tokenizer, staging)
    # the run's own base/ is named relative to the run directory, so the run can be moved or copied whole;
    # a base outside the run is named by its absolute path
    base_name = "base" if p.spec.model.path is None else str(base_dir.resolve())
    with staged(out / "adapter") as adapter_dir:
        save_peft(detached, p.model, adapters, adapter_dir, base_model_name_or_path=base_name)
    return out / "adapter"


def copy_tokenizer(tokenizer: Tokenizer, model_dir: Path) -> None:
    """The tokenizer's files (its model file and HF config files) beside the weights."""
    for f in tokenizer.files:
        shutil.copyfile(f, model_dir / f.name)


@contextlib.contextmanager
def staged(final: Path) -> Iterator[Path]:
    """A path to write `final`'s whole content at; on success it replaces `final` in one rename.

    The staging directory is hidden beside `final` (same filesystem); on failure it is removed and `final`
    is as it was. An existing `final` is moved aside first and deleted only once the new one is in place.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    try:
        yield root / final.name
        for f in (root / final.name).iterdir():
            fsync_path(f)
        share(root / final.name)  # what the writers made private (safetensors: 0600) is shared as the run is
        replace_dir(root / final.name, final)
        fsync_path(final.parent)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def save_step(s: Session, out: Path, step: int, fingerprint: dict[str, str]) -> None:
    """A resumable checkpoint of the session after `step` optimizer steps (`lowmem.train.checkpoint`)."""
    # the loader's position counts batches of micro_batch x world rows: recorded, so that a resume on another
    # number of processes is checked to keep that product (lowmem.train.checkpoint)
    loader_state = {**s.loader.state_dict(), "rows_per_batch": s.rows_per_batch}
    if s.training.loss_scaler is not None:  # the fp16 loss scaler's state (a few numbers) rides beside it
        loader_state["loss_scaler"] = s.training.loss_scaler.state_dict()
    save_checkpoint(out, step, s.training.trainable_params, s.training.optimizer, loader_state, fingerprint,
                    s.plan.spec.output.keep, identity=plan_identity(s.plan, s.world))


def resume_step(s: Session, checkpoint: Path, fingerprint: dict[str, str]) -> int:
    """Load a checkpoint into the session (weights, optimizer, loader, loss scaler); returns its step."""
    state = load_checkpoint(checkpoint, s.training.trainable_params, s.training.optimizer, fingerprint,
                            rows_per_batch=s.rows_per_batch, identity=plan_identity(s.plan, s.world))
    loader_state = dict(state["loader"])
    scaler_state = loader_state.pop("loss_scaler", None)  # see `save_step`
    s.loader.load_state_dict(loader_state)
    if s.training.loss_scaler is not None:
        s.training.loss_scaler.load_state_dict(scaler_state)
    return state["step"]


class FinalSaveError(ValueError):
    """The final model could not be written; the message says what was kept and how to finish."""


def save_final_model(s: Session, tokenizer: Tokenizer, out: Path, step: int, fingerprint: dict[str, str]) -> Path:
    """The final model, gathered to rank 0 under FSDP and written there; every rank returns once it is on disk.

    A write that fails (full disk, file size limit) leaves no partial directory; the trained state of `step`
    is then kept as an emergency checkpoint if that still fits, and FinalSaveError says what is intact.
    """
    params = s.training.params
    if s.world > 1:
        params = distributed.gather_full(params, keep=s.rank == 0)
    failure = None
    if s.rank == 0:
        try:
            model_dir = save_final(s.plan, params, s.training.adapters, tokenizer, out)
        except Exception as err:  # noqa: BLE001 - any failure: keep what can be kept, then say what happened
            failure = err
    else:
        model_dir = out / "model"
    if s.world > 1 and distributed.all_reduce_sum([float(failure is not None)])[0] and failure is None:
        failure = OSError("rank 0 could not write the final model")
    if failure is None:
        distributed.barrier()
        return model_dir
    raise FinalSaveError(_final_save_failure(s, out, step, fingerprint, failure)) from failure


def _final_save_failure(s: Session, out: Path, step: int, fingerprint: dict[str, str], err: BaseException) -> str:
    """Write the emergency checkpoint of `step` if it fits; the one line that says what was lost and kept."""
    what = f"could not write the final model into {out}: {_first_line(err)}"
    try:
        if checkpoint_dir(out, step).exists():
            kept = f"the trained state is checkpoint {checkpoint_dir(out, step).name}"
        else:
            save_step(s, out, step, fingerprint)
            kept = f"the trained state was saved as emergency checkpoint {checkpoint_dir(out, step).name}"
        return (f"{what}. Nothing partial was left and {kept}: free space under {out} (or raise the file size "
                f"limit), then `lowmem execute {out} --resume` writes the model without training again")
    except CheckpointError as second:
        newest = latest_checkpoint(out)
        intact = (f"the newest intact checkpoint is {newest.name} (`--resume` trains on from it)" if newest else
                  "no checkpoint exists, so the training of this run is lost (set output.save_every to keep some)")
        return (f"{what}; an emergency checkpoint did not fit either ({_first_line(second)}). Nothing partial was "
                f"left; {intact}; plan.json, metrics.jsonl and memory.json are intact")


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
