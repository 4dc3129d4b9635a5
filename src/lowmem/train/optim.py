"""Optimizers from the spec, and the learning-rate schedule."""

import math

import torch

from lowmem.spec.structs import SGD, AdamW, OptimizerSpec, ScheduleSpec


def build_optimizer(spec: OptimizerSpec, params: list[torch.Tensor]) -> torch.optim.Optimizer:
    """The torch optimizer the spec names, over `params` (all trainable)."""
    if isinstance(spec, AdamW):
        return torch.optim.AdamW(params, lr=spec.lr, betas=spec.betas, eps=spec.eps,
                                 weight_decay=spec.weight_decay)
    if isinstance(spec, SGD):
        return torch.optim.SGD(params, lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay)
    # the planner rejects every other optimizer before a run starts
    raise AssertionError(f"optimizer {type(spec).__name__} reached the executor unplanned")


def lr_at(step: int, total_steps: int, base_lr: float, schedule: ScheduleSpec) -> float:
    """Learning rate for optimizer step `step` (0-based) of `total_steps`.

    Linear warmup from base_lr / warmup_steps to base_lr over `warmup_steps`, then cosine or linear decay
    to `min_lr_ratio * base_lr` at the last step (or constant).
    """
    warmup = schedule.warmup_steps
    if step < warmup:
        return base_lr * (step + 1) / warmup
    if schedule.kind == "constant":
        return base_lr
    decay_steps = max(total_steps - warmup - 1, 1)
    progress = min((step - warmup) / decay_steps, 1.0)
    floor = schedule.min_lr_ratio * base_lr
    if schedule.kind == "linear":
        return base_lr - (base_lr - floor) * progress
    return floor + (base_lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))
