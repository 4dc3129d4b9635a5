"""The final model of a run: Hugging Face weights for full fine-tuning, PEFT adapters otherwise."""

import shutil
from pathlib import Path

import torch

from lowmem.data.tokenizer import Tokenizer
from lowmem.nn import save_hf
from lowmem.nn.hub import resolve_model_dir
from lowmem.nn.lora import LoraSettings, trainable_names
from lowmem.nn.peft_io import save_peft
from lowmem.plan import Plan
from lowmem.train import distributed
from lowmem.train.checkpoint import load_checkpoint, save_checkpoint
from lowmem.train.session import Session


def save_final(p: Plan, params: dict[str, torch.Tensor], adapters: LoraSettings | None, tokenizer: Tokenizer,
               out: Path) -> Path:
    """Final weights: HF format for full fine-tuning; PEFT adapters (plus the base when it is not on disk)."""
    detached = {k: v.detach() for k, v in params.items()}
    if adapters is None:
        model_dir = out / "model"
        save_hf(detached, p.model, model_dir, overwrite=True)
        for f in tokenizer.files:
            shutil.copyfile(f, model_dir / f.name)
        return model_dir
    base_dir = resolve_model_dir(p.spec.model.path) if p.spec.model.path else out / "base"
    if p.spec.model.path is None:  # a preset's random base exists only in this run: save it for the adapter
        base = {k: v for k, v in detached.items() if k not in set(trainable_names(detached))}
        if p.strategies.nf4_block_size:  # the weights QLoRA trained against: the dequantized NF4 base
            from lowmem.nn.quant import dequantize_nf4

            base = dequantize_nf4(base)
        save_hf(base, p.model, base_dir, overwrite=True)
        for f in tokenizer.files:
            shutil.copyfile(f, base_dir / f.name)
    adapter_dir = out / "adapter"
    save_peft(detached, p.model, adapters, adapter_dir, base_model_name_or_path=str(base_dir.resolve()),
              overwrite=True)
    return adapter_dir


def save_step(s: Session, out: Path, step: int, fingerprint: dict[str, str]) -> None:
    """A resumable checkpoint of the session after `step` optimizer steps (`lowmem.train.checkpoint`)."""
    # the loader's position counts batches of micro_batch x world rows: recorded, so that a resume on another
    # number of processes is checked to keep that product (lowmem.train.checkpoint)
    loader_state = {**s.loader.state_dict(), "rows_per_batch": s.rows_per_batch}
    if s.training.loss_scaler is not None:  # the fp16 loss scaler's state (a few numbers) rides beside it
        loader_state["loss_scaler"] = s.training.loss_scaler.state_dict()
    save_checkpoint(out, step, s.training.trainable_params, s.training.optimizer, loader_state, fingerprint,
                    s.plan.spec.output.keep)


def resume_step(s: Session, checkpoint: Path, fingerprint: dict[str, str]) -> int:
    """Load a checkpoint into the session (weights, optimizer, loader, loss scaler); returns its step."""
    state = load_checkpoint(checkpoint, s.training.trainable_params, s.training.optimizer, fingerprint,
                            rows_per_batch=s.rows_per_batch)
    loader_state = dict(state["loader"])
    scaler_state = loader_state.pop("loss_scaler", None)  # see `save_step`
    s.loader.load_state_dict(loader_state)
    if s.training.loss_scaler is not None:
        s.training.loss_scaler.load_state_dict(scaler_state)
    return state["step"]


def save_final_model(s: Session, tokenizer: Tokenizer, out: Path) -> Path:
    """The final model, gathered to rank 0 under FSDP and written there; every rank returns once it is on disk."""
    params = s.training.params
    if s.world > 1:
        params = distributed.gather_full(params, keep=s.rank == 0)
    model_dir = save_final(s.plan, params, s.training.adapters, tokenizer, out) if s.rank == 0 else out / "model"
    distributed.barrier()
    return model_dir
