"""execute(plan, out_dir): run exactly what the plan says, and report measured memory beside planned.

A run directory holds::

    plan.json        the plan that ran (`lowmem execute plan.json` runs it again)
    metrics.jsonl    one JSON record per logged step and per evaluation (incl. resident memory over time)
    tensorboard/     TensorBoard event files, when `output.log_to` includes it (W&B: `wandb/`)
    memory.json      planned versus measured peak memory, by component
    model/           final weights in Hugging Face format (config.json, model.safetensors, the tokenizer files)
    checkpoints/     step-NNNNNNNN/ resumable checkpoints (see lowmem.train.checkpoint), newest `output.keep`
"""

import contextlib
import gc
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import NamedTuple

import msgspec
import torch
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

from lowmem.data import (
    BatchLoader,
    PackedDataset,
    load_or_train_tokenizer,
    prepare_packed_dataset,
    shipped_corpus,
)
from lowmem.data.corpus import source_size_bytes
from lowmem.data.loader import split_rows
from lowmem.data.templates import resolve_chat_template
from lowmem.data.tokenizer import Tokenizer, load_tokenizer
from lowmem.nn import forward, init_params, load_hf, output_weight, save_hf
from lowmem.nn.hub import resolve_model_dir
from lowmem.nn.llama import is_nf4
from lowmem.nn.lora import LoraSettings, add_adapters, trainable_names
from lowmem.nn.peft_io import save_peft
from lowmem.plan import Plan, plan
from lowmem.plan.structs import run_optimizer
from lowmem.spec.structs import Dora, FileTokenizer, Lora, QLora, RunSpec
from lowmem.spec.units import format_bytes
from lowmem.train import distributed
from lowmem.train.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    plan_fingerprint,
    read_trainer_state,
    save_checkpoint,
)
from lowmem.train.device import (
    CudaMemory,
    check_local_device,
    cuda_rng_state,
    real_cuda,
    restore_cuda_rng_state,
    to_device,
)
from lowmem.train.memory import LiveTensorTracker, resident_bytes
from lowmem.train.optim import build_optimizer, lr_at, stepped_params
from lowmem.train.sinks import close_sinks, open_sinks
from lowmem.train.strategies import (
    InBackwardOptimizer,
    LossScaler,
    activation_offload,
    block_runner,
    compute_dtype,
    loss_function,
    make_loss_scaler,
    make_optimizer,
    param_dtype,
)

# Memory is measured over the first steps only: step 1 creates the optimizer state, step 2 is the
# steady state; every later step has the same shapes. The tracker slows a step, so it stops after these.
MEASURE_STEPS = 2


class RunResult(msgspec.Struct, frozen=True, kw_only=True):
    """What a finished run reports back to a caller."""

    out_dir: str
    steps: int  # tokens_per_s below is over the steps after the first MEASURE_STEPS (memory-tracked) ones
    first_loss: float
    final_loss: float
    eval_loss: float | None
    tokens_per_s: float
    planned_peak_bytes: int
    measured_peak_bytes: int
    model_dir: str | None
    interrupted: bool = False
    resumed_from_step: int = 0


class StepStats(msgspec.Struct, frozen=True):
    """What one optimizer step reports."""

    loss: float
    n_tokens: int
    grad_norm: float
    lr: float


def train_step(step: int, total_steps: int, spec: RunSpec, loss_of, loader, trainable: list[torch.Tensor],
               optimizer: torch.optim.Optimizer, tracker: LiveTensorTracker | None,
               loss_scaler: LossScaler | None = None, split: int = 1) -> StepStats:
    """One optimizer step over `train.grad_accum` micro-batches; `tracker` (if given) is active throughout.

    `split` (the plan's micro_batch_split) runs each loaded micro-batch as that many pieces of equal rows, one
    forward and backward each, their gradients accumulating: the step is the same, its activations smaller.

    With a `loss_scaler` (fp16) the loss is scaled before backward, the gradients unscaled before clipping,
    and the optimizer step skipped (the scale lowered) when they hold an inf or a nan.
    """
    lr = lr_at(step, total_steps, spec.optimizer.lr, spec.train.schedule)
    for group in optimizer.param_groups:
        group["lr"] = lr
    # the loss and token sums stay 0-d tensors on the device: one host read per step, none per micro-batch
    loss_sum = n_tokens = None
    in_backward = isinstance(optimizer, InBackwardOptimizer)
    assert not (in_backward and loss_scaler), "the planner refuses fp16 with optimizer_in_backward"
    assert not (in_backward and split > 1), "the planner refuses micro_batch_split with optimizer_in_backward"
    for _ in range(spec.train.grad_accum):
        batch = next(loader)
        if tracker:
            tracker.add_existing(batch.values(), "batch")
        for piece in _pieces(batch, split):
            micro_loss, micro_n = loss_of(piece)
            loss_sum, n_tokens = _backward(micro_loss, micro_n, loss_sum, n_tokens, in_backward, optimizer,
                                           loss_scaler, tracker, trainable)
    loss_sum, n_tokens = float(loss_sum), int(n_tokens)  # the step's host reads, after its last backward
    world = distributed.world_size()
    if world > 1:  # every rank's share of the step: the loss and the gradients are over all of them
        loss_sum, n_tokens = distributed.all_reduce_sum([loss_sum, n_tokens])
        n_tokens = int(n_tokens)
    if in_backward:
        grad_norm = math.sqrt(optimizer.grad_sq_sum)
    else:
        # normalize by the target tokens of the whole step, not per micro-batch (torchtune #1875); under FSDP
        # the reduce-scatter already averaged the ranks' summed-loss gradients (divided by `world`), so the
        # gradient of (sum over all ranks' tokens) / n_tokens is theirs times world / n_tokens
        scale = world / max(n_tokens, 1)
        if loss_scaler is not None:
            scale /= loss_scaler.scale  # unscale before clipping
        stepped = stepped_params(optimizer, trainable)  # a host optimizer's gradients are on the host already
        for t in stepped:
            t.grad.mul_(scale)
        grad_norm = _clip(stepped, spec.train.clip_grad_norm)
        if loss_scaler is None or loss_scaler.update(grad_norm):  # an inf/nan gradient skips the step
            with _category(tracker, "optimizer_state"):
                optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    loss = loss_sum / max(n_tokens, 1)
    if not math.isfinite(loss):
        raise FloatingPointError(
            f"loss became {loss} at step {step + 1}; lower optimizer.lr ({spec.optimizer.lr}) or use precision fp32"
        )
    return StepStats(loss=loss, n_tokens=n_tokens, grad_norm=grad_norm, lr=lr)


def _tokens_per_piece(p: Plan) -> int:
    """Tokens in one forward of the plan (a micro-batch, or a piece of a split one)."""
    return p.spec.train.micro_batch // p.strategies.micro_batch_split * p.spec.train.seq_len


def _pieces(batch: dict[str, torch.Tensor], split: int) -> list[dict[str, torch.Tensor]]:
    """A micro-batch as `split` pieces of equal rows (views, no copy); itself when `split` is 1."""
    if split == 1:
        return [batch]
    return [dict(zip(batch, parts, strict=True))
            for parts in zip(*(t.chunk(split) for t in batch.values()), strict=True)]


def _backward(micro_loss: torch.Tensor, micro_n: torch.Tensor, loss_sum: torch.Tensor | None,
              n_tokens: torch.Tensor | None, in_backward: bool, optimizer, loss_scaler,
              tracker: LiveTensorTracker | None, trainable: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward of one (piece of a) micro-batch's summed loss; returns the step's running loss sum and count.

    Both stay on the device (no host read here); `train_step` reads them once, after the step's last backward.
    """
    if in_backward:
        # the hooks step during backward, so the loss is normalized first (grad_accum is 1: planner rule); the
        # count divides on the device: no host read before backward
        optimizer.grad_sq_sum = 0.0
        with _category(tracker, "optimizer_state"):
            (micro_loss / micro_n.clamp(min=1).to(micro_loss.dtype)).backward()
    elif loss_scaler is not None:
        (micro_loss * loss_scaler.scale).backward()
    else:
        micro_loss.backward()
    if tracker and not in_backward:
        tracker.reclassify((t.grad for t in trainable), "gradients")
    micro_loss, micro_n = micro_loss.detach(), torch.as_tensor(micro_n).detach()
    if loss_sum is None:
        return micro_loss, micro_n
    return loss_sum + micro_loss, n_tokens + micro_n


def _category(tracker: LiveTensorTracker | None, name: str):
    """`tracker.category(name)`, or nothing when memory is not being measured this step."""
    return tracker.category(name) if tracker else contextlib.nullcontext()


class Training(NamedTuple):
    """What a run trains with: built once by `build_training`, for `execute` and for `lowmem.plan.trace`."""

    params: dict[str, torch.Tensor]  # base weights (NF4 under QLoRA) and adapters, by canonical name
    adapters: LoraSettings | None
    trainable_params: dict[str, torch.Tensor]  # the tensors the optimizer updates (requires_grad set)
    optimizer: torch.optim.Optimizer | InBackwardOptimizer
    loss_of: Callable[..., tuple[torch.Tensor, torch.Tensor]]  # batch -> (loss_sum, n_tokens)
    loss_scaler: LossScaler | None = None  # fp16 only


def build_training(p: Plan, params: dict[str, torch.Tensor], tracker: LiveTensorTracker,
                   world: int = 1) -> Training:
    """Apply the plan's strategies to initial `params`: NF4, adapters, trainable mask, optimizer and loss.

    `params` are the initial weights in the plan's dtype (`param_dtype`). Under mixed precision (mixed-bf16,
    fp16) with adapters the frozen base is cast to the compute dtype first: it needs no fp32 master. `loss_of(batch, training=True)`
    runs forward and the plan's loss, counting the loss's tensors as "logits" while `tracker` is active.
    `lowmem.plan.trace.trace_memory` calls this under FakeTensorMode, so the traced step is this very one.
    With `world` > 1 (a process group is up) the params are sharded with FSDP2 (`lowmem.train.distributed`):
    the returned params and trainable params are then the sharded DTensors, and `loss_of` runs inside the
    shell module's forward so that FSDP gathers the weights forward needs.
    """
    spec = p.spec
    adapters = lora_settings(spec.method)
    params = _with_adapters(p, params, adapters)
    if world > 1:
        return _build_sharded_training(p, params, adapters, tracker)
    trainable_params = {n: params[n] for n in (trainable_names(params) if adapters else params)}
    for t in trainable_params.values():
        t.requires_grad_(True)
    optimizer = make_optimizer(p.strategies, partial(build_optimizer, run_optimizer(spec.optimizer, p.strategies),
                                                     stochastic_rounding=p.strategies.bf16_stochastic_rounding),
                               list(trainable_params.values()))
    run_block = block_runner(p.strategies, params)
    loss_fn = _planned_loss(p)
    offload = activation_offload(p.strategies, p.hardware.device, params)

    def loss_of(batch, training: bool = True):
        with offload:  # the model's saved tensors only: backward needs the loss's first
            hidden = forward(params, batch["tokens"], p.model, positions=batch["positions"],
                             doc_ids=batch["doc_ids"], run_block=run_block, adapters=adapters, training=training,
                             attention_kernel=p.strategies.attention_kernel)
        with tracker.category("logits"):
            return loss_fn(hidden, output_weight(params, p.model), batch["labels"],
                           softcap=p.model.final_logit_softcap)

    return Training(params, adapters, trainable_params, optimizer, loss_of, make_loss_scaler(p.strategies, _tokens_per_piece(p)))


def _planned_loss(p: Plan):
    """The plan's cross-entropy, its vocabulary projection in the planned dtype (bf16 on a GPU; fp32 on the CPU)."""
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[p.strategies.projection_dtype]
    return partial(loss_function(p.strategies), projection_dtype=dtype)


def _with_adapters(p: Plan, params: dict[str, torch.Tensor], adapters: LoraSettings | None
                   ) -> dict[str, torch.Tensor]:
    """The params a run trains: the frozen base in the compute dtype and NF4 where planned, plus the adapters."""
    master, compute = param_dtype(p.strategies), compute_dtype(p.strategies)
    if adapters is not None and compute != master:
        params = {n: t if is_nf4(t) else t.to(compute) for n, t in params.items()}  # NF4: loaded in compute
    # A checkpoint on disk arrives quantized already (`_initial_params`); a preset's random init does not
    if p.strategies.nf4_block_size and not any(is_nf4(t) for t in params.values()):
        from lowmem.nn.quant import quantize_nf4  # imports torchao (seconds): only for QLoRA

        params = quantize_nf4(params, p.model, block_size=p.strategies.nf4_block_size,
                              scaler_block_size=p.strategies.nf4_scaler_block_size)
    if adapters is not None:
        params = add_adapters(params, p.model, adapters, seed=p.spec.model.init_seed, dtype=master)
    return params


def _build_sharded_training(p: Plan, params: dict[str, torch.Tensor], adapters: LoraSettings | None,
                            tracker: LiveTensorTracker) -> Training:
    """`build_training` sharded over the process group with FSDP2: full fine-tuning, or a frozen base with adapters.

    Every tensor is sharded (the frozen base too, `requires_grad=False`); the optimizer holds only the trainable
    shards. While `tracker` measures, it re-reads its storages wherever FSDP frees gathered weights.
    """
    assert not p.strategies.activation_offloading, "the planner refuses activation offloading under FSDP"
    trainable = set(trainable_names(params) if adapters else params)
    for name, t in params.items():
        t.requires_grad_(name in trainable)
    compute = compute_dtype(p.strategies)
    shell = distributed.shard(params, p.model.n_layers, p.hardware.device,
                              compute_dtype=compute if compute != param_dtype(p.strategies) else None,
                              offload=p.strategies.fsdp_cpu_offload)
    sharded = distributed.named_params(shell)  # DTensors, each rank holding its shard
    trainable_params = {n: t for n, t in sharded.items() if n in trainable}
    assert not p.strategies.bf16_stochastic_rounding, "the planner rounds stochastically only in one process"
    optimizer = build_optimizer(run_optimizer(p.spec.optimizer, p.strategies), list(trainable_params.values()))

    def resync() -> None:
        if is_in_torch_dispatch_mode():  # only while the tracker measures; see distributed.block_runner
            tracker.resync()

    optimizer.register_step_pre_hook(lambda *_: resync())  # after backward FSDP freed the root's full weights
    run_block = distributed.block_runner(shell, p.model, block_runner(p.strategies, params), after_reshard=resync)
    loss_fn = _planned_loss(p)

    def loss_in_shell(module, batch, training: bool):
        params = distributed.named_params(module)  # the root's weights full (FSDP gathered them), blocks sharded
        hidden = forward(params, batch["tokens"], p.model, positions=batch["positions"], doc_ids=batch["doc_ids"],
                         run_block=run_block, adapters=adapters, training=training,
                             attention_kernel=p.strategies.attention_kernel)
        with tracker.category("logits"):
            return loss_fn(hidden, output_weight(params, p.model), batch["labels"],
                           softcap=p.model.final_logit_softcap)

    def loss_of(batch, training: bool = True):
        return shell(loss_in_shell, batch, training)

    return Training(sharded, adapters, trainable_params, optimizer, loss_of,
                    make_loss_scaler(p.strategies, _tokens_per_piece(p)))


def check_distributable(p: Plan, world: int) -> None:
    """Refuse a plan made for another number of processes than the `world` this run has.

    What FSDP can run is the planner's business (it knows the plan's `world_size`); the plan's memory is per
    process and its tokens per step count every process, so both hold only for the count it was made for.
    """
    if p.world_size == world:
        return
    launched = f"torchrun started {world} processes" if world > 1 else "this is a single process (no torchrun)"
    raise ValueError(
        f"the plan has world_size = {p.world_size} (made for {p.world_size} process(es)) but {launched}. Run it "
        + (f"under torchrun --nproc_per_node {p.world_size}" if p.world_size > 1 else "without torchrun")
        + f", or re-plan for {world}: lowmem plan SPEC --nproc {world} --json > plan.json (executing the spec "
        "itself plans it for the processes it runs on)"
    )


def execute(plan_or_spec: Plan | RunSpec, out_dir: str | Path | None = None, *, progress: bool = True,
            resume: bool = False, cap_memory_bytes: int | None = None) -> RunResult:
    """Run a plan (a RunSpec is planned for this machine first) and write the run directory.

    With `resume`, continue from the newest complete checkpoint in the run directory (same plan required);
    the resumed run's losses equal those of a run never stopped. SIGINT/SIGTERM finish the current step,
    write a checkpoint and return with `interrupted=True`.
    Under `torchrun --nproc_per_node N` every process calls this and they train data-parallel with FSDP2
    (gloo on CPU, NCCL and gloo on CUDA); `train.micro_batch` is then per process. See `_execute`.

    A step that runs out of device memory (`torch.OutOfMemoryError`) does not end the run while
    `memory.on_oom = "replan"` (the default): the step's tensors are freed, the last completed step is
    checkpointed, the spec is re-planned with the budget lowered to what was really available, and the run
    resumes under the new plan (`replan_after_oom`), which gives what a resume under that plan gives.
    `cap_memory_bytes` enforces a cap on live tensor bytes (any device): an op past it raises
    `torch.OutOfMemoryError` as a full GPU would, so that on-OOM re-planning can be rehearsed on a CPU.
    """
    if isinstance(plan_or_spec, Plan):
        p = plan_or_spec
    else:  # under torchrun: planned for the processes it has (memory per process, tokens over all)
        p = plan(plan_or_spec, world_size=distributed.launch_world_size())
    note = check_executable(p)
    if note and progress and distributed.launch_rank() == 0:
        sys.stderr.write(f"note: {note}\n")
    with distributed.process_group(p.hardware.device):
        for replans in range(MAX_REPLANS + 1):
            try:
                return _execute(p, out_dir, progress=progress, resume=resume, cap_memory_bytes=cap_memory_bytes)
            except _OutOfMemory as oom:
                if p.spec.memory.on_oom == "stop" or distributed.world_size() > 1 or replans == MAX_REPLANS:
                    raise oom.as_error(p, replans) from None
                p = replan_after_oom(p, oom.available_bytes)
                resume = True
                if progress and distributed.rank() == 0:
                    sys.stderr.write(f"\nout of memory in step {oom.step + 1} ({oom.message}); re-planned for "
                                     f"{format_bytes(p.budget_bytes)}: {describe_strategies(p)}; resuming from "
                                     f"step {oom.resume_step}\n")
    raise AssertionError("unreachable")


# A run re-plans at most this many times after running out of memory; then it stops with the error.
MAX_REPLANS = 3
# The re-planned budget is this fraction of the smaller of what was available and what the failed plan
# predicted: strictly below the failed plan's peak, so the planner must choose a plan that holds less.
REPLAN_FRACTION = 0.9


class OutOfMemoryStop(RuntimeError):
    """A run stopped for lack of memory, its last completed step checkpointed (the message says what to do)."""


class _OutOfMemory(Exception):
    """A step ran out of memory; the state of step `resume_step` is on disk, ready to resume under a new plan."""

    def __init__(self, step: int, resume_step: int, message: str, available_bytes: int | None):
        super().__init__(message)
        self.step, self.resume_step, self.message, self.available_bytes = step, resume_step, message, available_bytes

    def as_error(self, p: Plan, replans: int) -> "OutOfMemoryStop":
        why = ("memory.on_oom = 'stop'" if p.spec.memory.on_oom == "stop" else
               "re-planning is for one process (several ranks would have to agree on the new plan)"
               if distributed.world_size() > 1 else f"it was re-planned {replans} times already")
        return OutOfMemoryStop(
            f"out of memory in step {self.step + 1} ({self.message}); not re-planned: {why}. The state of step "
            f"{self.resume_step} is checkpointed: lower memory.budget (the plan counted on "
            f"{format_bytes(p.budget_bytes)}) and continue with `lowmem execute RUN_DIR --resume` on a new plan"
        )


def replan_after_oom(p: Plan, available_bytes: int | None) -> Plan:
    """The spec planned again for a smaller budget, keeping everything a checkpoint stores as it was.

    The budget is REPLAN_FRACTION of the smaller of `available_bytes` (what the device really had for this
    process) and the failed plan's predicted peak. Precision, the optimizer's state kind, optimizer in backward,
    stochastic rounding and FSDP offload are pinned to the failed plan's values, so its checkpoint loads; what may
    change are the strategies that only move memory (checkpointing, offloading, cross-entropy, micro-batch split).
    """
    basis = min(b for b in (available_bytes, p.memory.peak_bytes, p.budget_bytes) if b)
    s = p.strategies
    pinned = msgspec.structs.replace(
        p.spec.memory.strategies,
        low_bit_optimizer="on" if s.optimizer_state == "8bit" else "off",
        optimizer_in_backward="on" if s.optimizer_in_backward else "off",
        bf16_stochastic_rounding="on" if s.bf16_stochastic_rounding else "off",
        fsdp_cpu_offload="on" if s.fsdp_cpu_offload else "off",
    )
    memory = msgspec.structs.replace(p.spec.memory, budget=f"{int(basis * REPLAN_FRACTION)}B",
                                     precision=s.precision, strategies=pinned)
    return plan(msgspec.structs.replace(p.spec, memory=memory), p.hardware, p.world_size)


def describe_strategies(p: Plan) -> str:
    """The memory strategies of a plan in one short line."""
    s = p.strategies
    parts = [s.precision, f"checkpointing {s.activation_checkpointing}", f"{s.cross_entropy} CE"]
    if s.activation_offloading:
        parts.append("activation offloading")
    if s.micro_batch_split > 1:
        parts.append(f"micro-batch split {s.micro_batch_split}")
    if s.optimizer_state == "8bit":
        parts.append("8-bit AdamW")
    return ", ".join(parts)


def _execute(p: Plan, out_dir: str | Path | None, *, progress: bool, resume: bool,
             cap_memory_bytes: int | None = None) -> RunResult:
    """`execute` once the process group (if any) is up: under torchrun every rank runs this.

    Data parallel over W ranks: `train.micro_batch` is per rank (torchtune's convention), so one optimizer
    step sees micro_batch x W x grad_accum rows and equals a single-process step with micro_batch x W.
    Rank 0 alone writes plan.json, metrics.jsonl, memory.json (its own measured memory) and the final model.
    """
    world, rank = distributed.world_size(), distributed.rank()
    check_distributable(p, world)
    spec = p.spec
    out = Path(out_dir if out_dir is not None else spec.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fingerprint = plan_fingerprint(p, world)
    resume_from = latest_checkpoint(out) if resume else None
    if resume and resume_from is None:
        raise ValueError(f"--resume: no complete checkpoint in {out}/checkpoints; run without --resume to start")
    if not resume and latest_checkpoint(out) is not None:
        raise ValueError(f"{out} already holds checkpoints of a run; pass --resume to continue it, or choose "
                         "another --out so nothing is overwritten")
    if rank == 0:
        (out / "plan.json").write_bytes(msgspec.json.format(msgspec.json.encode(p), indent=2))

    torch.manual_seed(spec.train.seed)
    if rank != 0:  # rank 0 trains the tokenizer and packs the data into the cache; the others then read it
        distributed.barrier()
    tokenizer, dataset = prepare_data(spec, world=world)
    if rank == 0:
        distributed.barrier()
    train_rows, eval_rows = split_rows(len(dataset), spec.data.eval_rows, spec.train.seed)
    total_steps = p.total_steps or _steps_for_epochs(spec, len(train_rows), world)

    device = p.hardware.device
    tracker = LiveTensorTracker(cap_bytes=cap_memory_bytes)
    cuda_memory = CudaMemory(device)
    params, adapters, trainable_params, optimizer, loss_of, loss_scaler = build_training(
        p, _initial_params(p, param_dtype(p.strategies)), tracker, world)
    trainable = list(trainable_params.values())
    host_loader = BatchLoader(dataset, train_rows, spec.train.micro_batch, spec.train.seed, rank=rank,
                              world_size=world, pin_memory=real_cuda(device))
    loader = _DeviceBatches(host_loader, device)
    first_step = 0
    if resume_from is not None:
        state = load_checkpoint(resume_from, trainable_params, optimizer, fingerprint,
                                rows_per_batch=spec.train.micro_batch * world)
        loader_state = dict(state["loader"])
        scaler_state = loader_state.pop("loss_scaler", None)  # see `save` below
        loader.load_state_dict(loader_state)
        if loss_scaler is not None:
            loss_scaler.load_state_dict(scaler_state)
        first_step = state["step"]

    def save(step: int) -> None:
        # the fp16 loss scaler's state (a few numbers) rides in trainer.json beside the loader's position
        # the loader's position counts batches of micro_batch x world rows: recorded, so that a resume on
        # another number of processes is checked to keep that product (lowmem.train.checkpoint)
        loader_state = {**loader.state_dict(), "rows_per_batch": spec.train.micro_batch * world}
        if loss_scaler is not None:
            loader_state["loss_scaler"] = loss_scaler.state_dict()
        save_checkpoint(out, step, trainable_params, optimizer, loader_state, fingerprint, spec.output.keep)

    metrics = _open_metrics(out / "metrics.jsonl", first_step) if rank == 0 else open(os.devnull, "w")
    try:
        sinks = open_sinks(spec, out, first_step) if rank == 0 else []
    except BaseException:
        metrics.close()
        loader.close()
        raise
    printer = _Progress(total_steps, enabled=progress and rank == 0)
    tokens_per_step = p.tokens_per_step  # every process's (check_distributable: the plan's world is this one)
    tracker.add_existing(params.values(), "parameters")  # frozen base weights count too
    tracker.add_existing(_state_tensors(optimizer), "optimizer_state")
    losses, measured, cuda_measured, eval_loss, interrupted = [], None, None, None, False
    updating = _UpdateWatch(optimizer)
    start = time.perf_counter()
    tokens_done, steady_start, steady_tokens = 0, None, 0
    # Under torchrun the launcher passes SIGINT/SIGTERM on to every rank (then waits 30 s before SIGKILL); the
    # ranks agree on stopping after each step (`stop.agreed`), so all of them write the same step's shards.
    with _StopOnSignal() as stop:
        try:
            for step in range(first_step, total_steps):
                measuring = step - first_step < MEASURE_STEPS
                # an enforced cap needs the tracker in every step; only the first ones are reported
                tracking = measuring or cap_memory_bytes is not None
                before = _StepStart.take(loader, device)
                updating.started = False
                oom = None
                if measuring:
                    cuda_memory.start()
                try:
                    with tracker if tracking else contextlib.nullcontext():
                        stats = train_step(step, total_steps, spec, loss_of, loader, trainable, optimizer,
                                           tracker if tracking else None, loss_scaler,
                                           split=p.strategies.micro_batch_split)
                except torch.OutOfMemoryError as err:  # handled below, once the traceback's frames are gone
                    oom = str(err).splitlines()[0] if str(err) else type(err).__name__
                if oom is not None:
                    resume_step = _checkpoint_before_oom(out, step, first_step, before, updating.started, optimizer,
                                                         loader, save, device)
                    raise _OutOfMemory(step, resume_step, oom, _available_bytes(cuda_memory, cap_memory_bytes))
                if measuring:
                    measured = tracker.snapshot()
                    cuda_measured = _max_stats(cuda_measured, cuda_memory.read())
                losses.append(stats.loss)
                tokens_done += tokens_per_step
                elapsed = time.perf_counter() - start
                if step - first_step + 1 == MEASURE_STEPS:  # steady speed excludes the slower, measured steps
                    steady_start, steady_tokens = time.perf_counter(), tokens_done
                record = {"step": step + 1, "loss": stats.loss, "lr": stats.lr, "grad_norm": stats.grad_norm,
                          "tokens": (step + 1) * tokens_per_step, "tokens_per_s": tokens_done / elapsed,
                          "elapsed_s": elapsed, "rss_bytes": resident_bytes()}
                if measuring:
                    record["tensor_peak_bytes"] = measured["peak_bytes"]
                    if cuda_measured is not None:
                        record.update(cuda_measured)
                if spec.train.eval_every and len(eval_rows) >= spec.train.micro_batch * world and (
                    (step + 1) % spec.train.eval_every == 0 or step + 1 == total_steps
                ):
                    eval_loss = evaluate(loss_of, dataset, eval_rows, spec, device=device)
                    record["eval_loss"] = eval_loss
                if (step + 1) % spec.train.log_every == 0 or step + 1 == total_steps or "eval_loss" in record:
                    metrics.write(json.dumps(record) + "\n")
                    metrics.flush()
                    for sink in sinks:
                        sink.write(record)
                    printer.update(record, done_before=first_step)
                if stop.agreed():
                    save(step + 1)
                    interrupted = True
                    break
                if spec.output.save_every and (step + 1) % spec.output.save_every == 0 and step + 1 < total_steps:
                    save(step + 1)
        finally:
            loader.close()
            metrics.close()
            close_sinks(sinks)
            printer.close()
    end = time.perf_counter()
    if steady_start is not None and tokens_done > steady_tokens:
        tokens_per_s = (tokens_done - steady_tokens) / (end - steady_start)
    else:
        tokens_per_s = tokens_done / max(end - start, 1e-9)

    report = memory_report(p, measured, cuda_measured)
    if rank == 0:
        (out / "memory.json").write_bytes(msgspec.json.format(msgspec.json.encode(report), indent=2))
    model_dir = None
    if spec.output.save_final and not interrupted:
        if world > 1:
            params = distributed.gather_full(params, keep=rank == 0)
        if rank == 0:
            model_dir = save_final(p, params, adapters, tokenizer, out)
        else:
            model_dir = out / "model"
        distributed.barrier()  # the model is on disk when any rank returns
    return RunResult(
        out_dir=str(out), steps=first_step + len(losses), first_loss=losses[0] if losses else math.nan,
        final_loss=losses[-1] if losses else math.nan, eval_loss=eval_loss, tokens_per_s=tokens_per_s,
        planned_peak_bytes=p.memory.peak_bytes, measured_peak_bytes=report["measured_peak_bytes"],
        model_dir=str(model_dir) if model_dir else None, interrupted=interrupted, resumed_from_step=first_step,
    )


class _DeviceBatches:
    """The loader's batches on the run's device (pinned host batches copied without blocking on a GPU)."""

    def __init__(self, loader: BatchLoader, device: str):
        self.loader, self.device = loader, device

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        return to_device(next(self.loader), self.device)

    def state_dict(self) -> dict[str, int]:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.loader.load_state_dict(state)

    def close(self) -> None:
        self.loader.close()


class _StepStart(NamedTuple):
    """What a step starts from besides the weights: where the data is, the RNG states (to go back on OOM)."""

    loader: dict[str, int]
    cpu_rng: torch.Tensor
    cuda_rng: list | None

    @classmethod
    def take(cls, loader, device: str) -> "_StepStart":
        return cls(loader.state_dict(), torch.get_rng_state(), cuda_rng_state(device))

    def restore(self, loader, device: str) -> None:
        loader.load_state_dict(self.loader)
        torch.set_rng_state(self.cpu_rng)
        restore_cuda_rng_state(self.cuda_rng, device)


class _UpdateWatch:
    """Whether the current step has begun to change the weights (its optimizer step, or any in-backward hook)."""

    def __init__(self, optimizer):
        self.in_backward = isinstance(optimizer, InBackwardOptimizer)
        self._started = False
        if isinstance(optimizer, torch.optim.Optimizer):
            optimizer.register_step_pre_hook(lambda *_: setattr(self, "_started", True))

    @property
    def started(self) -> bool:
        return self._started or self.in_backward  # in-backward updates while backward runs

    @started.setter
    def started(self, value: bool) -> None:
        self._started = value


def _checkpoint_before_oom(out: Path, step: int, first_step: int, before: _StepStart, updated: bool, optimizer,
                           loader, save: Callable[[int], None], device: str) -> int:
    """Free the failed step and leave on disk the state it started from; returns that state's step.

    A step that failed before touching the weights (forward, backward) is undone: gradients dropped, the loader
    and the RNGs put back, and the weights as they are are the state of `step`. One that failed in its update
    may have changed some weights: the newest checkpoint on disk is the state to go back to.
    """
    optimizer.zero_grad(set_to_none=True)
    gc.collect()
    if real_cuda(device):
        torch.cuda.empty_cache()
    if not updated:
        before.restore(loader, device)
        save(step)
        return step
    newest = latest_checkpoint(out)
    if newest is None:
        raise OutOfMemoryStop(
            f"out of memory in the optimizer update of step {step + 1}, which had already changed some weights, and "
            f"{out}/checkpoints holds no checkpoint to go back to. Lower memory.budget and start again, or set "
            "output.save_every so a re-plan can resume"
        )
    return int(read_trainer_state(newest)["step"])


def _available_bytes(cuda_memory: CudaMemory, cap_bytes: int | None) -> int | None:
    """What this process really had: the enforced cap, or on a GPU its allocated bytes plus the driver's free."""
    available = cuda_memory.available_bytes()
    if cap_bytes is not None:
        return cap_bytes if available is None else min(cap_bytes, available)
    return available


def _max_stats(a: dict | None, b: dict | None) -> dict | None:
    """The larger of two steps' CUDA memory figures, field by field."""
    if a is None or b is None:
        return b or a
    return {k: max(a[k], b[k]) for k in b}


def _state_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]


def _open_metrics(path: Path, first_step: int):
    """metrics.jsonl for appending: on resume, records after the checkpoint's step are dropped (they re-run)."""
    if first_step == 0 or not path.exists():
        return open(path, "w")
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= first_step]
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)
    return open(path, "a")


class _StopOnSignal:
    """SIGINT/SIGTERM ask the loop to checkpoint after the current step and stop (main thread only)."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:  # a second signal: stop now
            raise KeyboardInterrupt
        self.requested = True

    def agreed(self) -> bool:
        """Whether any rank was asked to stop (every rank must call this after each step; one tiny all-reduce).

        A signal reaches the ranks at slightly different moments, or only one rank when it is sent to one
        process: each stops after the first step at whose end any rank had it, so all save the same step.
        """
        if distributed.world_size() == 1:
            return self.requested
        return distributed.all_reduce_sum([float(self.requested)])[0] > 0

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


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


def lora_settings(method) -> LoraSettings | None:
    """The adapter settings of a LoRA/QLoRA/DoRA method (None for full fine-tuning)."""
    if isinstance(method, Lora | Dora | QLora):
        return LoraSettings(rank=method.rank, alpha=method.alpha, targets=tuple(method.targets),
                            dropout=method.dropout, dora=isinstance(method, Dora))
    return None


def check_executable(p: Plan) -> str | None:
    """Refuse, before anything runs, a plan this machine cannot execute; a line to show when it runs elsewhere.

    A CUDA plan needs a CUDA torch and a GPU with at least the memory the plan was made for
    (`lowmem.train.device.check_local_device`, which names both cards when they differ).
    """
    return check_local_device(p.hardware, p.budget_bytes)


def prepare_data(spec: RunSpec, progress=None, world: int = 1) -> tuple[Tokenizer, PackedDataset]:
    """Tokenizer (trained and cached, or from a file) and the packed, memory-mapped dataset.

    `progress(records_read, bytes_read, total_bytes)` is called while a new packed file is written.
    `world`: the data-parallel processes, each taking `train.micro_batch` rows per batch.
    """
    source = spec.data.source
    corpus = shipped_corpus(source.removeprefix("builtin:")) if source.startswith("builtin:") else Path(source)
    if not corpus.exists():
        raise ValueError(f"data.source = {source!r}: no such file or directory; give a .jsonl, .jsonl.gz, .json, "
                         ".parquet, .csv or .txt file, or a directory of them")
    cache = Path(spec.data.cache_dir)
    model_dir = str(resolve_model_dir(spec.model.path)) if spec.model.path else None
    tok_spec = spec.data.resolved_tokenizer(model_dir)
    if isinstance(tok_spec, FileTokenizer):
        tokenizer = load_tokenizer(tok_spec.path)
    else:
        tokenizer = load_or_train_tokenizer(corpus, tok_spec.vocab_size, cache, data=spec.data)
    data = spec.data
    if data.format == "chat":  # "auto" becomes the checkpoint family's template, which the packed cache keys on
        data = msgspec.structs.replace(data, chat_template=resolve_chat_template(data.chat_template, model_dir,
                                                                                 tokenizer))
    hook = None
    if progress is not None:
        total = source_size_bytes(corpus)

        def hook(records: int, read: int) -> None:
            progress(records, read, total)

    path = prepare_packed_dataset(corpus, tokenizer, spec.train.seq_len, cache, data, progress=hook)
    dataset = PackedDataset(path)
    needed = spec.data.eval_rows + spec.train.micro_batch * world
    if len(dataset) < needed:
        per = f" x {world} processes" if world > 1 else ""
        raise ValueError(
            f"data.source = {source!r} packs into {len(dataset)} rows of {spec.train.seq_len} tokens; "
            f"data.eval_rows ({spec.data.eval_rows}) + train.micro_batch ({spec.train.micro_batch}){per} need "
            f"{needed}. Use more data, a shorter train.seq_len or fewer eval rows."
        )
    return tokenizer, dataset


@torch.no_grad()
def evaluate(loss_of, dataset: PackedDataset, eval_rows, spec: RunSpec, device: str = "cpu") -> float:
    """Mean loss per target token over up to `train.eval_batches` batches of the held-out rows, in order.

    Under data parallelism each rank takes its slice of every batch (as in training) and the sums are reduced.
    """
    loader = BatchLoader(dataset, eval_rows, spec.train.micro_batch, spec.train.seed, shuffle=False, prefetch=0,
                         rank=distributed.rank(), world_size=distributed.world_size())
    total = count = None  # on the device: read once, after the last batch
    for _ in range(min(spec.train.eval_batches, loader.batches_per_epoch)):
        loss_sum, n = loss_of(to_device(next(loader), device), training=False)
        total = loss_sum if total is None else total + loss_sum
        count = n if count is None else count + n
    loader.close()
    total, count = distributed.all_reduce_sum([float(total), float(count)])
    return total / max(count, 1)


def memory_report(p: Plan, measured: dict | None, cuda: dict | None = None) -> dict:
    """Planned versus measured peak bytes, per component and in total.

    On a GPU (`cuda`: the measured steps' `max_memory_allocated`, `max_memory_reserved`, `num_alloc_retries`)
    the measured peak is the allocator's `max_memory_allocated`; the components stay the live-tensor tracker's.
    """
    planned = p.memory.by_name()
    measured_by = dict(measured["peak_by_category"]) if measured else {}
    measured_peak = measured["peak_bytes"] if measured else 0
    names = list(dict.fromkeys([*planned, *measured_by]))
    rows = [{"component": n, "planned_bytes": planned.get(n, 0), "measured_bytes": measured_by.get(n, 0)}
            for n in names]
    method = "live tensor bytes (TorchDispatchMode)"
    extra = {}
    if cuda is not None:
        measured_peak, method = cuda["max_memory_allocated"], "torch.cuda.max_memory_allocated"
        extra = {"cuda": {**cuda, "reserved_over_allocated": cuda["max_memory_reserved"]
                          / max(cuda["max_memory_allocated"], 1)},
                 "tracked_peak_bytes": measured["peak_bytes"] if measured else 0}
    error = (p.memory.peak_bytes - measured_peak) / measured_peak if measured_peak else None
    return {"device": p.hardware.name, "method": method,
            "planned_peak_bytes": p.memory.peak_bytes, "planned_phase": p.memory.peak_phase,
            "measured_peak_bytes": measured_peak, "error": error, "components": rows, **extra}


def _initial_params(p: Plan, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The run's starting weights, created or loaded straight onto the plan's device, tensor by tensor.

    QLoRA quantizes each projection to NF4 as it arrives (on the device), so the full-precision model is never
    whole there: a checkpoint through `load_hf`'s converter; a preset's random init is drawn on the host (its
    values do not depend on the device) and moved one quantized tensor at a time.
    """
    device = p.hardware.device
    convert = None
    if p.strategies.nf4_block_size:  # QLoRA: quantized as read, never whole in full precision (issue #3)
        from lowmem.nn.quant import nf4_converter

        convert = nf4_converter(p.model, block_size=p.strategies.nf4_block_size,
                                scaler_block_size=p.strategies.nf4_scaler_block_size)
    if p.spec.model.path is not None:
        model_dir = resolve_model_dir(p.spec.model.path)
        if convert is not None:  # the frozen base in the dtype `build_training` would cast it to before quantizing
            _, params = load_hf(model_dir, dtype=compute_dtype(p.strategies), device=device, convert=convert)
            return params
        _, params = load_hf(model_dir, dtype=dtype, device=device)
        return params
    if convert is None or device == "cpu":  # on the CPU `_with_adapters` quantizes (same values)
        return init_params(p.model, seed=p.spec.model.init_seed, dtype=dtype, device=device)
    host = init_params(p.model, seed=p.spec.model.init_seed, dtype=dtype)
    compute = compute_dtype(p.strategies)
    return {name: convert(name, host.pop(name).to(compute).to(device)) for name in list(host)}


def _clip(params: list[torch.Tensor], max_norm: float) -> float:
    """Clip to the global norm `max_norm` (0: no clipping) and return the norm before clipping."""
    if distributed.is_sharded(params[0].grad):  # FSDP's gradients: the norm over all shards
        norm = torch.nn.utils.get_total_norm([t.grad for t in params]).full_tensor()
        if max_norm:
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
        return float(norm)
    if max_norm == 0:
        # a host optimizer's gradients sit on the host beside the small ones on the device
        norms = torch.stack([t.grad.float().norm().to(params[0].grad.device) for t in params])
        return float(norms.norm())
    return float(torch.nn.utils.clip_grad_norm_(params, max_norm))


def _steps_for_epochs(spec: RunSpec, n_train_rows: int, world: int = 1) -> int:
    rows_per_step = spec.train.micro_batch * spec.train.grad_accum * world
    return max(1, math.ceil(spec.train.epochs * n_train_rows / rows_per_step))


class _Progress:
    """One live line on a terminal (a line per update otherwise): step, loss, lr, tokens/s, time."""

    def __init__(self, total_steps: int, enabled: bool):
        self.total = total_steps
        self.enabled = enabled
        self.tty = sys.stderr.isatty()

    def update(self, r: dict, done_before: int = 0) -> None:
        if not self.enabled:
            return
        elapsed = r["elapsed_s"]
        left = elapsed / max(r["step"] - done_before, 1) * (self.total - r["step"])
        line = (f"step {r['step']:>{len(str(self.total))}}/{self.total}  loss {r['loss']:.4f}  lr {r['lr']:.2e}  "
                f"{r['tokens_per_s']:,.0f} tok/s  {_clock(elapsed)} elapsed, {_clock(left)} left")
        if "eval_loss" in r:
            line += f"  eval {r['eval_loss']:.4f}"
        if self.tty:
            sys.stderr.write("\r\x1b[2K" + line)
            if "eval_loss" in r:
                sys.stderr.write("\n")
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            sys.stderr.write("\n")


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m}:{s:02d}"


def describe_memory(report: dict) -> str:
    """Planned versus measured memory as a small table."""
    lines = [f"{'component':<16} {'planned':>12} {'measured':>12}"]
    for row in report["components"]:
        lines.append(f"{row['component']:<16} {format_bytes(row['planned_bytes']):>12} "
                     f"{format_bytes(row['measured_bytes']):>12}")
    lines.append(f"{'peak':<16} {format_bytes(report['planned_peak_bytes']):>12} "
                 f"{format_bytes(report['measured_peak_bytes']):>12}")
    if report["error"] is not None:
        lines.append(f"planned is {report['error']:+.1%} off measured ({report['method']})")
    cuda = report.get("cuda")
    if cuda:
        lines.append(f"CUDA allocator: reserved {format_bytes(cuda['max_memory_reserved'])} "
                     f"({cuda['reserved_over_allocated']:.2f}x allocated), {cuda['num_alloc_retries']} allocation "
                     "retries")
    return "\n".join(lines)
