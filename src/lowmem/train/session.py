"""Building a training session from a plan: weights onto the device, adapters, NF4, the optimizer, the loss."""

from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import torch
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

from lowmem.data import BatchLoader, PackedDataset
from lowmem.nn import forward, init_params, load_hf, output_weight
from lowmem.nn.hub import resolve_model_dir
from lowmem.nn.llama import forward_with_router_loss, is_nf4
from lowmem.nn.lora import LoraSettings, add_adapters, trainable_names
from lowmem.plan import Plan
from lowmem.plan.structs import run_optimizer
from lowmem.spec.structs import Dora, Lora, QLora
from lowmem.train import distributed
from lowmem.train.device import CudaMemory, real_cuda
from lowmem.train.inputs import DeviceBatches
from lowmem.train.memory import LiveTensorTracker
from lowmem.train.optim import build_optimizer
from lowmem.train.strategies import (
    InBackwardOptimizer,
    LossScaler,
    activation_offload,
    apply_host_allocator,
    block_runner,
    compute_dtype,
    loss_function,
    make_loss_scaler,
    make_optimizer,
    param_dtype,
)


class Training(NamedTuple):
    """What a run trains with: built once by `build_training`, for `execute` and for `lowmem.train.dryrun`."""

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
    `lowmem.train.dryrun.trace_memory` calls this under FakeTensorMode, so the traced step is this very one.
    With `world` > 1 (a process group is up) the params are sharded with FSDP2 (`lowmem.train.distributed`):
    the returned params and trainable params are then the sharded DTensors, and `loss_of` runs inside the
    shell module's forward so that FSDP gathers the weights forward needs.
    """
    spec = p.spec
    adapters = lora_settings(spec.method)
    params = _with_adapters(p, params, adapters)
    apply_host_allocator(p.strategies)
    if world > 1:
        return _build_sharded_training(p, params, adapters, tracker)
    trainable_params = {n: params[n] for n in (trainable_names(params) if adapters else params)}
    for t in trainable_params.values():
        t.requires_grad_(True)
    optimizer = make_optimizer(p.strategies, partial(build_optimizer, run_optimizer(spec.optimizer, p.strategies),
                                                     stochastic_rounding=p.strategies.bf16_stochastic_rounding),
                               list(trainable_params.values()))
    run_block = block_runner(p.strategies, params)
    loss_fn = planned_loss(p)
    offload = activation_offload(p.strategies, p.hardware.device, params)

    def loss_of(batch, training: bool = True):
        with offload:  # the model's saved tensors only: backward needs the loss's first
            hidden, aux = model_forward(p, params, batch, run_block, adapters, training)
        return head_loss(p, params, hidden, aux, batch, loss_fn, tracker)

    return Training(params, adapters, trainable_params, optimizer, loss_of, make_loss_scaler(p.strategies, tokens_per_piece(p)))


def model_forward(p: Plan, params: dict[str, torch.Tensor], batch: dict, run_block, adapters: LoraSettings | None,
                  training: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The model's hidden states for `batch`, and in training the mixture-of-experts load-balancing loss where
    the model adds one (`router_aux_loss`, HF's `output_router_logits`), else None."""
    kwargs = dict(positions=batch["positions"], doc_ids=batch["doc_ids"], run_block=run_block, adapters=adapters,
                  training=training, attention_kernel=p.strategies.attention_kernel)
    if training and p.model.router_aux_loss:
        return forward_with_router_loss(params, batch["tokens"], p.model, **kwargs)
    return forward(params, batch["tokens"], p.model, **kwargs), None


def with_router_loss(loss: tuple[torch.Tensor, torch.Tensor], aux: torch.Tensor | None,
                     p: Plan) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss_sum, n_tokens) with `router_aux_loss_coef * aux` added per token, so that the step's mean over its
    tokens is cross-entropy + coef * aux as transformers' Qwen3MoeForCausalLM computes it (over one micro-batch;
    across several, the aux losses are averaged weighted by their token counts)."""
    if aux is None:
        return loss
    loss_sum, n_tokens = loss
    return loss_sum + p.model.router_aux_loss_coef * aux * n_tokens, n_tokens


def head_loss(p: Plan, params: dict[str, torch.Tensor], hidden: torch.Tensor, aux: torch.Tensor | None, batch: dict,
              loss_fn, tracker: LiveTensorTracker) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss_sum, n_tokens) of `hidden` through the output head, the router's loss added where the model has one;
    the tracker counts the loss's tensors, its backward's too, as logits (as the plan counts them)."""
    with tracker.category("logits"):
        loss, n_kept = with_router_loss(loss_fn(hidden, output_weight(params, p.model), batch["labels"],
                                                softcap=p.model.final_logit_softcap), aux, p)
    tracker.backward_category(loss, hidden, "logits")
    return loss, n_kept


def planned_loss(p: Plan):
    """The plan's cross-entropy, its vocabulary projection in the planned dtype (bf16 on a GPU; fp32 on the CPU)."""
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[p.strategies.projection_dtype]
    return partial(loss_function(p.strategies), projection_dtype=dtype)


def _with_adapters(p: Plan, params: dict[str, torch.Tensor], adapters: LoraSettings | None
                   ) -> dict[str, torch.Tensor]:
    """The params a run trains: the frozen base in the compute dtype and NF4 where planned, plus the adapters."""
    master, compute = param_dtype(p.strategies), compute_dtype(p.strategies)
    if adapters is not None and compute != master:
        params = {n: t if is_nf4(t) else t.to(compute) for n, t in params.items()}  # NF4: loaded in compute
    # A checkpoint on disk arrives quantized already (`initial_params`); a preset's random init does not
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
    loss_fn = planned_loss(p)

    def loss_in_shell(module, batch, training: bool):
        params = distributed.named_params(module)  # the root's weights full (FSDP gathered them), blocks sharded
        hidden, aux = model_forward(p, params, batch, run_block, adapters, training)
        return head_loss(p, params, hidden, aux, batch, loss_fn, tracker)

    def loss_of(batch, training: bool = True):
        return shell(loss_in_shell, batch, training)

    return Training(sharded, adapters, trainable_params, optimizer, loss_of,
                    make_loss_scaler(p.strategies, tokens_per_piece(p)))


def tokens_per_piece(p: Plan) -> int:
    """Tokens in one forward of the plan (a micro-batch, or a piece of a split one)."""
    return p.spec.train.micro_batch // p.strategies.micro_batch_split * p.spec.train.seq_len


def initial_params(p: Plan, dtype: torch.dtype) -> dict[str, torch.Tensor]:
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


def lora_settings(method) -> LoraSettings | None:
    """The adapter settings of a LoRA/QLoRA/DoRA method (None for full fine-tuning)."""
    if isinstance(method, Lora | Dora | QLora):
        return LoraSettings(rank=method.rank, alpha=method.alpha, targets=tuple(method.targets),
                            dropout=method.dropout, dora=isinstance(method, Dora))
    return None


def state_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]


class Session(NamedTuple):
    """A run's training session: what it trains (`training`), on which batches, measured by what."""

    plan: Plan
    training: Training
    loader: DeviceBatches  # the training rows, this rank's share, on the plan's device
    tracker: LiveTensorTracker  # live tensor bytes by category (measured steps, and every step under a cap)
    cuda_memory: CudaMemory  # the allocator's peaks on a GPU (nothing elsewhere)
    world: int
    rank: int

    @property
    def trainable(self) -> list[torch.Tensor]:
        return list(self.training.trainable_params.values())

    @property
    def rows_per_batch(self) -> int:
        """Rows of one loaded batch over all processes: what the loader's position counts."""
        return self.plan.spec.train.micro_batch * self.world


def open_session(p: Plan, dataset: PackedDataset, train_rows, world: int, rank: int,
                 cap_memory_bytes: int | None = None) -> Session:
    """Build the plan's training on its device and the loader of this rank's training rows."""
    tracker = LiveTensorTracker(cap_bytes=cap_memory_bytes)
    training = build_training(p, initial_params(p, param_dtype(p.strategies)), tracker, world)
    spec, device = p.spec, p.hardware.device
    host_loader = BatchLoader(dataset, train_rows, spec.train.micro_batch, spec.train.seed, rank=rank,
                              world_size=world, pin_memory=real_cuda(device))
    tracker.add_existing(training.params.values(), "parameters")  # frozen base weights count too
    tracker.add_existing(state_tensors(training.optimizer), "optimizer_state")
    return Session(p, training, DeviceBatches(host_loader, device), tracker, CudaMemory(device), world, rank)
