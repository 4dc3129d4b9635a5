"""Losses over final hidden states: the output projection and the cross-entropy in one call, so that
chunked or fused variants with the same signature can replace it without materialising (N, V) logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["IGNORE_INDEX", "cross_entropy_sum"]

IGNORE_INDEX = -100  # the value HF and torch use for "no label here"


def cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                      ignore_index: int = IGNORE_INDEX) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy, logits computed in fp32.

    Labels are already aligned with `hidden` (label t is the target for hidden t; shifting is the
    caller's job). Returning the sum and the count, not the mean, lets micro-batches and ranks be
    combined exactly: mean = sum(loss_sum) / sum(n_tokens).

    Args:
        hidden: (N, D) or (B, T, D) final hidden states, any float dtype.
        weight: (V, D) output projection (see `lowmem.nn.llama.output_weight`).
        labels: (N,) or (B, T) int64 targets; `ignore_index` marks positions without a target.

    Returns:
        loss_sum: 0-d fp32 tensor, the CE summed over non-ignored positions (0 when there are none).
        n_tokens: 0-d int64 tensor, the number of non-ignored positions.
    """
    D = hidden.shape[-1]
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(
            f"hidden {tuple(hidden.shape)} and labels {tuple(labels.shape)} disagree: labels must have "
            "hidden's shape without its last dim"
        )
    if weight.shape[-1] != D:
        raise ValueError(f"weight {tuple(weight.shape)} must be (V, {D}) to match hidden {tuple(hidden.shape)}")
    h = hidden.reshape(-1, D)  # (N, D)
    y = labels.reshape(-1)  # (N,)
    logits = F.linear(h.float(), weight.float())  # (N, V) fp32
    loss_sum = F.cross_entropy(logits, y, ignore_index=ignore_index, reduction="sum")
    n_tokens = (y != ignore_index).sum()
    return loss_sum, n_tokens
