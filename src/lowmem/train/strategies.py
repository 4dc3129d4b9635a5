"""The one function per strategy that applies what the plan decided. Nothing here decides anything."""

import contextlib
import importlib
import math
from collections.abc import Callable
from functools import partial

import torch
import torch.utils.checkpoint
from torch.utils._python_dispatch import is_in_torch_dispatch_mode
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from lowmem import hostmem
from lowmem.native import NativeBuildError
from lowmem.nn.llama import AdaptedWeight
from lowmem.nn.loss import CE_IMPLEMENTATIONS
from lowmem.plan.structs import Plan, Strategies, checkpointed, run_optimizer
from lowmem.train.offload import ActivationOffload
from lowmem.train.optim import backend_module

# precision -> (dtype of the trained tensors, their gradients and optimizer states; dtype blocks compute in).
# mixed-bf16 and fp16 keep fp32 master weights and cast them to the compute dtype inside each block.
DTYPES = {
    "fp32": (torch.float32, torch.float32),
    "bf16": (torch.bfloat16, torch.bfloat16),
    "mixed-bf16": (torch.float32, torch.bfloat16),
    "fp16": (torch.float32, torch.float16),
}


def param_dtype(strategies: Strategies) -> torch.dtype:
    """precision: the dtype trained parameters, gradients and optimizer states are held in."""
    return DTYPES[strategies.precision][0]


def compute_dtype(strategies: Strategies) -> torch.dtype:
    """precision: the dtype the blocks compute in; frozen base weights (LoRA/QLoRA) are stored in it too."""
    return DTYPES[strategies.precision][1]


def _cast(w, dtype: torch.dtype):
    """A weight (tensor, `AdaptedWeight` or None) in `dtype`; a differentiable copy, or `w` if already there."""
    if isinstance(w, AdaptedWeight):
        return w._replace(weight=_cast(w.weight, dtype), lora_a=_cast(w.lora_a, dtype),
                          lora_b=_cast(w.lora_b, dtype), dora_m=_cast(w.dora_m, dtype))
    if w is None or w.dtype == dtype:
        return w
    return w.to(dtype)


def _cast_weights(block_fn: Callable[..., torch.Tensor], dtype: torch.dtype, h: torch.Tensor,
                  *tensors) -> torch.Tensor:
    # runs inside the checkpointed region: the low-precision copies of a checkpointed block are dropped after
    # its forward and made again in its recompute, so no whole low-precision copy of the model stays alive
    *weights, cos, sin, mask = tensors
    return block_fn(h, *(_cast(w, dtype) for w in weights), cos, sin, mask)


def _call(block_fn: Callable[..., torch.Tensor], *tensors) -> torch.Tensor:
    return block_fn(*tensors)


def _checkpointed(block_fn: Callable[..., torch.Tensor], *tensors: torch.Tensor | None) -> torch.Tensor:
    # non-reentrant checkpointing: works with inputs that do not require grad and with nested autograd
    return torch.utils.checkpoint.checkpoint(block_fn, *tensors, use_reentrant=False)


# Selective activation checkpointing (torchtitan's SAC, torch.utils.checkpoint docs): the outputs of the
# matmuls and of attention are kept, everything elementwise between them (norms, RoPE, SiLU, the gating
# product, GQA's head repeat, the boolean mask's conversion) is recomputed in backward from them.
_SDPA_OPS = ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
             "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention")
SAVED_OPS = frozenset(
    [torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default]
    + [getattr(torch.ops.aten, name).default for name in _SDPA_OPS if hasattr(torch.ops.aten, name)]
)


# flash attention over packed documents (`lowmem.nn.llama.attend_varlen`): torch's custom ops in this namespace,
# matched by namespace so this module need not import torch.nn.attention.varlen (0.8 s) to name them
SAVED_OP_NAMESPACES = frozenset({"torch_attn"})


def _save_matmuls(ctx, func, *args, **kwargs) -> CheckpointPolicy:
    if func in SAVED_OPS or getattr(func, "namespace", None) in SAVED_OP_NAMESPACES:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def _selective(block_fn: Callable[..., torch.Tensor], *tensors: torch.Tensor | None) -> torch.Tensor:
    contexts = partial(create_selective_checkpoint_contexts, _save_matmuls)
    return torch.utils.checkpoint.checkpoint(block_fn, *tensors, use_reentrant=False, context_fn=contexts)


def block_runner(strategies: Strategies, params: dict[str, torch.Tensor] | None = None
                 ) -> Callable[..., torch.Tensor] | None:
    """The `run_block` seam of `lowmem.nn.llama.forward` (None = plain call), from three strategies.

    precision (mixed-bf16, fp16): the block input is cast to the compute dtype before the block (a no-op after
    the first) and the fp32 master weights inside it, under the checkpoint (see `_cast_weights`).
    compile: the block (with its casts) runs through `torch.compile`; one graph serves every layer. While a
    TorchDispatchMode is active (`LiveTensorTracker` measuring the first steps, FakeTensorMode) the block runs
    eager instead: dynamo would fall back to eager there anyway and then never compile that code again.
    activation_checkpointing: "full" checkpoints every block, "selective" every block with the matmul and
    attention outputs saved (`SAVED_OPS`), "first-n" blocks 0..n-1, "every-k" blocks 0, k, 2k, ... For those two
    the seam recognizes block i by its `layers.{i}.attn_norm` tensor, or `attn_post_norm` without pre-norms
    (OLMo 2): the first weight `forward` passes (`block_param_names`); a norm is never adapted or quantized, so
    it is the very tensor in `params`; or by `layer=i` from a caller that knows it (FSDP's seam, whose gathered
    weights are other tensors). A block it cannot place is checkpointed: the safe side.
    """
    value = strategies.activation_checkpointing
    master, compute = param_dtype(strategies), compute_dtype(strategies)
    cast = compute != master
    if value == "off" and not cast and not strategies.compile:
        return None
    checkpoint = {"full": _checkpointed, "selective": _selective}.get(value)
    some = value.startswith(("first-", "every-"))
    layer_of = {id(t): int(name.split(".")[1]) for name, t in (params or {}).items()
                if name.startswith("layers.") and name.endswith((".attn_norm", ".attn_post_norm"))}
    compiled = torch.compile(_call, dynamic=False) if strategies.compile else _call

    def run(block_fn: Callable[..., torch.Tensor], h: torch.Tensor, *tensors: torch.Tensor | None,
            layer: int | None = None):
        call = _call if is_in_torch_dispatch_mode() else compiled
        fn = partial(call, partial(_cast_weights, block_fn, compute) if cast else block_fn)
        if cast:
            h = h.to(compute)  # the embedding's output (fp32) at block 0; already there afterwards
        if checkpoint is not None:
            return checkpoint(fn, h, *tensors)
        if some:
            layer = layer_of.get(id(tensors[0])) if layer is None else layer
            if layer is None or checkpointed(value, layer):
                return _checkpointed(fn, h, *tensors)
        return fn(h, *tensors)

    return run


def activation_offload(strategies: Strategies, device: str, params: dict[str, torch.Tensor]
                       ) -> contextlib.AbstractContextManager:
    """activation_offloading: the context to run each forward in, reusable across steps.

    With offloading, this is an `ActivationOffload` from `device` to pinned host memory, with the plan's size
    threshold and host budget; `params` (the parameters and frozen weights) always stay on the device. Without
    it, this is a null context.
    """
    if not strategies.activation_offloading:
        return contextlib.nullcontext()
    return ActivationOffload(device, min_bytes=strategies.offload_min_bytes,
                             max_host_bytes=strategies.offload_max_host_bytes, keep=params.values())


def load_libraries(p: Plan) -> None:
    """Import what the plan's run will import, before its memory is measured (a CPU plan's RSS view is what the
    run adds to a process with its libraries loaded): torch.optim's optimizers import torch._dynamo when the
    first is built (about 90 MiB of modules, sympy among them), NF4 imports torchao, 8-bit AdamW bitsandbytes
    (about 130 MiB). A backend that does not import is left to `build_optimizer`, which says what to do."""
    import torch._dynamo  # noqa: F401

    if p.strategies.nf4_block_size:
        import lowmem.nn.quant  # noqa: F401
    module = backend_module(run_optimizer(p.spec.optimizer, p.strategies),
                            stochastic_rounding=p.strategies.bf16_stochastic_rounding)
    if module is not None:
        with contextlib.suppress(ImportError):
            importlib.import_module(module)


def apply_host_allocator(strategies: Strategies) -> None:
    """host_allocator = "caching": make lowmem's caching allocator torch's CPU allocator from here on (the tensors
    a step allocates; the loaded weights keep glibc's). Under FakeTensorMode (a traced plan) nothing is allocated,
    so nothing is installed."""
    if strategies.host_allocator != "caching" or is_in_torch_dispatch_mode():
        return
    try:
        hostmem.install()
    except NativeBuildError as err:
        raise RuntimeError(f"{err}\nThe plan runs on lowmem's caching allocator (host_caching_allocator on); "
                           "install a C++ compiler, or plan with --set memory.strategies.host_caching_allocator="
                           "off") from None


def loss_function(strategies: Strategies) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """cross_entropy: standard, chunked (8 chunks, recomputed in backward) or fused linear cross-entropy."""
    return CE_IMPLEMENTATIONS[strategies.cross_entropy]


class InBackwardOptimizer:
    """optimizer_in_backward: one optimizer per parameter, stepped as soon as that parameter's gradient is final.

    Each parameter's gradient is freed right after its update (`register_post_accumulate_grad_hook`), so the
    gradients of the whole model are never alive together. It looks like one optimizer to the loop and to
    checkpoints (`param_groups`, `state`, `state_dict`, `load_state_dict`); `step` and `zero_grad` are no-ops
    because the hooks do both. The loss must already be normalized when `backward` runs (the hooks step
    immediately), which is why the planner allows it only without gradient accumulation and without
    global-norm clipping (both need every gradient first).

    The hooks also sum the gradients' squared norms, for reporting, into a 0-d fp32 tensor on the parameters'
    device: reading a value back in each hook would wait for the device once per parameter. `reset_grad_norm()`
    before backward, `grad_norm()` after it (one read of the device, or none while it stays a tensor).
    """

    def __init__(self, build: Callable[[list[torch.Tensor]], torch.optim.Optimizer], params: list[torch.Tensor]):
        self._optimizers = [build([p]) for p in params]
        device = params[0].device if params else torch.device("cpu")
        self._grad_sq = torch.zeros((), dtype=torch.float32, device=device)  # summed by the hooks
        self._handles = [p.register_post_accumulate_grad_hook(self._hook(opt))
                         for p, opt in zip(params, self._optimizers, strict=True)]

    def _hook(self, optimizer: torch.optim.Optimizer):
        def step(param: torch.Tensor) -> None:
            # the norm reduces in fp32 without an fp32 copy of a bf16 gradient; squared, it adds on the device
            self._grad_sq.add_(torch.linalg.vector_norm(param.grad, dtype=torch.float32).square())
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return step

    def reset_grad_norm(self) -> None:
        """Start a new sum of squared gradient norms (before each backward)."""
        self._grad_sq.zero_()

    def grad_norm(self) -> torch.Tensor:
        """The global norm of the gradients the hooks stepped with since `reset_grad_norm`: 0-d fp32, on the
        parameters' device (`float()` of it is the one host sync of the step)."""
        return self._grad_sq.sqrt()

    @property
    def grad_sq_sum(self) -> float:
        """The squared norm summed so far, as a float (reads the device). Kept for callers that set it to 0.0
        before backward and take its square root after; `reset_grad_norm` and `grad_norm` are the same."""
        return float(self._grad_sq)

    @grad_sq_sum.setter
    def grad_sq_sum(self, value: float) -> None:
        self._grad_sq.fill_(value)

    @property
    def param_groups(self) -> list[dict]:
        return [group for opt in self._optimizers for group in opt.param_groups]

    @property
    def state(self) -> dict:
        return {k: v for opt in self._optimizers for k, v in opt.state.items()}

    def step(self) -> None:  # the hooks already stepped
        pass

    def zero_grad(self, set_to_none: bool = True) -> None:  # the hooks already freed the gradients
        pass

    def state_dict(self) -> dict:
        return {"per_parameter": [opt.state_dict() for opt in self._optimizers]}

    def load_state_dict(self, state: dict) -> None:
        for opt, s in zip(self._optimizers, state["per_parameter"], strict=True):
            opt.load_state_dict(s)

    def remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()


def make_optimizer(strategies: Strategies, build: Callable[[list[torch.Tensor]], torch.optim.Optimizer],
                   params: list[torch.Tensor]):
    """The optimizer as the plan says: one over all trainable tensors, or stepped inside backward."""
    if strategies.optimizer_in_backward:
        return InBackwardOptimizer(build, params)
    return build(params)


class LossScaler:
    """precision fp16: dynamic loss scaling with `torch.amp.GradScaler`'s semantics and defaults.

    The loss is multiplied by `scale` before backward so that small fp16 gradients do not flush to zero;
    the fp32 master gradients are divided by it again before clipping (`unscale_factor`). A step whose
    gradients hold an inf or a nan (their global norm is not finite) is skipped and the scale multiplied by
    `backoff_factor`; after `growth_interval` finite steps in a row it is multiplied by `growth_factor`.
    `state_dict` is a small dict of plain numbers, saved with a checkpoint so a resumed run goes on with the
    same scale.
    """

    def __init__(self, init_scale: float = 2.0**16, growth_factor: float = 2.0, backoff_factor: float = 0.5,
                 growth_interval: int = 2000) -> None:
        self.scale = init_scale
        self.growth_factor = growth_factor
        self.backoff_factor = backoff_factor
        self.growth_interval = growth_interval
        self.growth_tracker = 0  # finite steps since the scale last changed
        self.skipped_steps = 0

    def update(self, grad_norm: float) -> bool:
        """After unscaling: whether the optimizer may step (the norm is finite), and the scale's next value."""
        if not math.isfinite(grad_norm):
            self.scale *= self.backoff_factor
            self.growth_tracker = 0
            self.skipped_steps += 1
            return False
        self.growth_tracker += 1
        if self.growth_tracker == self.growth_interval:
            self.scale *= self.growth_factor
            self.growth_tracker = 0
        return True

    def state_dict(self) -> dict:
        return {"scale": self.scale, "growth_factor": self.growth_factor, "backoff_factor": self.backoff_factor,
                "growth_interval": self.growth_interval, "growth_tracker": self.growth_tracker,
                "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state: dict) -> None:
        known = self.state_dict().keys()
        if state.keys() != known:
            raise ValueError(f"loss scaler state has keys {sorted(state)}, expected {sorted(known)}")
        for key, value in state.items():
            setattr(self, key, value)


def make_loss_scaler(strategies: Strategies, tokens_per_micro_batch: int) -> LossScaler | None:
    """precision: a dynamic loss scaler for fp16 compute (bf16 has fp32's exponent range and needs none).

    GradScaler's initial 2**16 is meant for a mean loss; lowmem backpropagates the *summed* loss of a micro-batch
    (normalized afterwards), whose gradients are `tokens_per_micro_batch` times larger, so the scale starts
    that much lower (a power of two, at least 1) instead of overflowing and backing off for the first steps.
    """
    if strategies.precision != "fp16":
        return None
    return LossScaler(init_scale=2.0 ** max(0, 16 - math.ceil(math.log2(max(tokens_per_micro_batch, 1)))))
