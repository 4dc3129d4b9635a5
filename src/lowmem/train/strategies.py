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


def block_runner(strategies: Strategies) -> Callable[..., torch.Tensor] | None:
    """activation_checkpointing: the `run_block` seam of `lowmem.nn.llama.forward` (None = plain call)."""
    if strategies.activation_checkpointing == "full":
        return _checkpointed
    return None


def loss_function(strategies: Strategies) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """cross_entropy: standard, chunked (8 chunks, recomputed in backward) or fused linear cross-entropy."""
    return CE_IMPLEMENTATIONS[strategies.cross_entropy]
