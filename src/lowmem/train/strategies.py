"""The one function per strategy that applies what the plan decided. Nothing here decides anything."""

from collections.abc import Callable

import torch
import torch.utils.checkpoint

from lowmem.nn.loss import CE_IMPLEMENTATIONS
from lowmem.plan.structs import Strategies

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def param_dtype(strategies: Strategies) -> torch.dtype:
    """precision: the dtype parameters, gradients and optimizer states are held in."""
    return DTYPES[strategies.precision]


def _checkpointed(block_fn: Callable[..., torch.Tensor], *tensors: torch.Tensor | None) -> torch.Tensor:
    # non-reentrant checkpointing: works with inputs that do not require grad and with nested autograd
    return torch.utils.checkpoint.checkpoint(block_fn, *tensors, use_reentrant=False)


def block_runner(strategies: Strategies, params: dict[str, torch.Tensor] | None = None
                 ) -> Callable[..., torch.Tensor] | None:
    """activation_checkpointing: the `run_block` seam of `lowmem.nn.llama.forward` (None = plain call).

    For "every-k" the seam recognizes block i by its `layers.{i}.attn_norm` tensor (the first weight `forward`
    passes; a norm is never adapted or quantized, so it is the very tensor in `params`) and checkpoints blocks
    0, k, 2k, ... A weight it does not know (e.g. FSDP's gathered copy) is checkpointed: the safe side for memory.
    """
    value = strategies.activation_checkpointing
    if value == "full":
        return _checkpointed
    if value == "off":
        return None
    k = int(value.removeprefix("every-"))
    layer_of = {id(t): int(name.split(".")[1]) for name, t in (params or {}).items()
                if name.startswith("layers.") and name.endswith(".attn_norm")}

    def every_k(block_fn: Callable[..., torch.Tensor], h: torch.Tensor, *tensors: torch.Tensor | None):
        layer = layer_of.get(id(tensors[0]))
        if layer is None or layer % k == 0:
            return _checkpointed(block_fn, h, *tensors)
        return block_fn(h, *tensors)

    return every_k


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
    """

    def __init__(self, build: Callable[[list[torch.Tensor]], torch.optim.Optimizer], params: list[torch.Tensor]):
        self._optimizers = [build([p]) for p in params]
        self.grad_sq_sum = 0.0  # squared gradient norms summed by the hooks, for reporting
        self._handles = [p.register_post_accumulate_grad_hook(self._hook(opt))
                         for p, opt in zip(params, self._optimizers, strict=True)]

    def _hook(self, optimizer: torch.optim.Optimizer):
        def step(param: torch.Tensor) -> None:
            self.grad_sq_sum += float(param.grad.float().pow(2).sum())
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return step

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
