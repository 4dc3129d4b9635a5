"""One optimizer step over its micro-batches, gradient clipping, and evaluation on held-out rows."""

import contextlib
import math

import msgspec
import torch

from lowmem.data import BatchLoader, PackedDataset
from lowmem.spec.structs import RunSpec
from lowmem.train import distributed
from lowmem.train.device import to_device
from lowmem.train.memory import LiveTensorTracker
from lowmem.train.optim import lr_at, stepped_params
from lowmem.train.strategies import InBackwardOptimizer, LossScaler


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
