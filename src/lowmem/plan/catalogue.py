"""The strategy catalogue: one record per memory strategy, the single place that says what it does.

The planner reads these records to build candidates, explain choices and reject impossible requests;
`lowmem.train.strategies` holds the one function that applies each strategy.
"""

import msgspec


class StrategyInfo(msgspec.Struct, frozen=True, kw_only=True):
    """What a strategy saves, what it costs, what it needs, and whether this version can run it."""

    name: str  # the field in `memory.strategies` (or `memory.precision`)
    saves: str
    costs: str
    requires: str = ""
    available: bool = True
    unavailable_reason: str = ""


CATALOGUE: dict[str, StrategyInfo] = {
    "precision": StrategyInfo(
        name="precision",
        saves="bf16 halves weights, gradients, optimizer states and activations",
        costs="bf16 compute is slow on CPUs without AVX512-BF16/AMX (about 300x on the dev machine)",
    ),
    "activation_checkpointing": StrategyInfo(
        name="activation_checkpointing",
        saves="keeps only each checkpointed block's input (every block, or every 2nd/4th: 0, k, 2k, ...)",
        costs="one extra forward of each checkpointed block (up to about +33% FLOPs for every block)",
    ),
    "activation_offloading": StrategyInfo(
        name="activation_offloading",
        saves="moves saved activations to pinned host memory",
        costs="PCIe traffic overlapped on a side CUDA stream",
        requires="a CUDA device",
        available=False,
        unavailable_reason="not implemented in this version",
    ),
    "chunked_cross_entropy": StrategyInfo(
        name="chunked_cross_entropy",
        saves="only one token chunk's fp32 logits alive at a time (8 chunks), in forward and backward",
        costs="the output projection runs twice (recomputed per chunk in backward)",
        requires="not together with fused_cross_entropy",
    ),
    "fused_cross_entropy": StrategyInfo(
        name="fused_cross_entropy",
        saves="never materializes (tokens x vocab) logits: loss and its gradient computed chunk by chunk in forward",
        costs="a Python loop over chunks (about hidden-size logits tiles); gradients computed even if unused",
        requires="not together with chunked_cross_entropy",
    ),
    "optimizer_in_backward": StrategyInfo(
        name="optimizer_in_backward",
        saves="frees each gradient right after its update; gradients never all alive",
        costs="a Python hook per parameter; about 1% in speed",
        requires="grad_accum = 1 and no global-norm clipping",
    ),
    "compile": StrategyInfo(
        name="compile",
        saves="fuses elementwise ops, fewer saved intermediates",
        costs="compile time at start",
        available=False,
        unavailable_reason="not implemented in this version",
    ),
}

# precision values the executor runs today
AVAILABLE_PRECISIONS = ("fp32", "bf16")
