"""NF4 base weights for QLoRA: a params → params transform that changes the leaf type of the projections.

    base = quantize_nf4(init_params(cfg, seed=0), cfg)             # every wq..w3 → torchao NF4Tensor
    cfg, base = load_hf(path, convert=nf4_converter(read_hf_config(path)))  # or as read, never whole in fp32
    params = add_adapters(base, cfg, settings, seed=0)             # LoRA/DoRA on top, as for a dense base
    hidden = forward(params, tokens, cfg, adapters=settings)       # `linear` dispatches on NF4 leaves
    merged = merge_adapters(dequantize_nf4(params), settings)      # plain tensors again, for export

NF4 (QLoRA, arXiv 2305.14314, section 3): each block of `block_size` weights is scaled by its absmax and
rounded to the nearest of 16 normal-distribution quantiles, stored two codes per byte. "Double quantization"
stores the per-block absmax scales as int8 around their mean, in blocks of `scaler_block_size` with one
scale each. The tensor type and its kernels are torchao's (`to_nf4`, `linear_nf4`, `NF4Tensor`); this
module chooses which weights become NF4 and sizes them for the planner.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import (
    NF4Tensor,
    SubclassTensorArgs,
    get_block_absmax,
    to_nf4,
)

from lowmem.nn.config import ModelConfig
from lowmem.nn.llama import _NF4_MODULE, dense_weight, is_nf4
from lowmem.nn.lora_settings import TARGETS, target_names

__all__ = ["NF4_LEVELS", "dequantize_nf4", "nf4_bytes", "nf4_converter", "quantize_nf4", "quantized_names"]

Params = dict[str, torch.Tensor]

# `lowmem.nn.llama.is_nf4` finds the NF4 class by this module name without importing torchao.
assert NF4Tensor.__module__ == _NF4_MODULE, (NF4Tensor.__module__, _NF4_MODULE)

NF4_LEVELS = 16  # 4-bit codes; torchao keeps the 16 quantile values as a lookup table per tensor


def quantized_names(cfg: ModelConfig, targets: Iterable[str]) -> list[str]:
    """Canonical names of the projection weights the short `targets` (see `lora.TARGETS`) select, in order.

    Raises:
        ValueError for an unknown or repeated target.
    """
    targets = tuple(targets)
    for t in targets:
        if t not in TARGETS:
            raise ValueError(
                f"targets: unknown target {t!r}; NF4 quantizes the projections {sorted(TARGETS)}. "
                "Embeddings, norms and the output head are not quantized"
            )
    if len(set(targets)) != len(targets):
        raise ValueError(f"targets = {list(targets)}: each target may appear once")
    return target_names(cfg, targets)


def quantize_nf4(params: Params, cfg: ModelConfig, *, targets: Iterable[str] = tuple(TARGETS),
                 block_size: int = 64, scaler_block_size: int = 256) -> Params:
    """A new dict with the targeted projection weights replaced by NF4 tensors; `params` is not changed.

    Default targets: all seven projections of every layer, as QLoRA quantizes every linear of the base.
    Embeddings, norms and the output head keep their dtype: the embedding is a lookup and the norms are
    vectors, neither a linear that `lowmem.nn.llama.linear` runs; the head goes into the loss as a plain
    (V, D) matrix (`lowmem.nn.loss`), which has no NF4 path. (QLoRA keeps the head in 16 bit as well.)

    Each NF4 tensor keeps the weight's shape, dtype and device, has requires_grad False and is quantized
    in the weight's dtype (torchao's `to_nf4`). The full-precision weights stay alive as long as the
    caller holds `params`: drop it to free them.

    Args:
        params: canonical name → tensor; the targeted weights are (out, in) and plain.
        targets: short names from `lowmem.nn.lora.TARGETS` (wq wk wv wo w1 w2 w3).
        block_size: weights per absmax block (QLoRA: 64).
        scaler_block_size: block scales per int8 double-quantization block (torchao: 256).

    Raises:
        ValueError for an unknown target, a weight that is already NF4, or one whose element count is
        not a multiple of block_size * scaler_block_size (torchao's layout needs whole blocks).
    """
    out = dict(params)
    for name in quantized_names(cfg, targets):
        out[name] = _quantize_weight(name, params[name], block_size, scaler_block_size)
    return out


def nf4_converter(cfg: ModelConfig, *, targets: Iterable[str] = tuple(TARGETS), block_size: int = 64,
                  scaler_block_size: int = 256) -> Callable[[str, torch.Tensor], torch.Tensor]:
    """`quantize_nf4` one tensor at a time: a `convert(name, tensor)` for `lowmem.nn.hf.load_hf`.

    The returned function quantizes the weights `quantize_nf4` would (same targets, same checks and
    errors) and returns every other tensor unchanged, so

        load_hf(path, convert=nf4_converter(cfg))  ==  quantize_nf4(load_hf(path), cfg)

    while only one full-precision weight is alive at a time. `cfg` is the checkpoint's
    (`lowmem.nn.hf.read_hf_config(path)`).
    """
    names = frozenset(quantized_names(cfg, targets))

    def convert(name: str, tensor: torch.Tensor) -> torch.Tensor:
        if name not in names:
            return tensor
        return _quantize_weight(name, tensor, block_size, scaler_block_size, quantize=_to_nf4_in_chunks)

    return convert


# torchao's `to_nf4` finds each weight's nearest NF4 level over chunks of 2**20 elements, through a
# (2**20, 16) difference matrix: about 130 MB of transient memory for an fp32 weight of any size. Loading a
# checkpoint straight into NF4 keeps one weight in full precision at a time, and there that transient would
# be most of the peak (benchmarks/load_memory.py). `_to_nf4_in_chunks` runs the same torchao steps over
# chunks of this many elements: a few MB at a time.
_NF4_CHUNK_NUMEL = 2**16


def _to_nf4_in_chunks(w: torch.Tensor, block_size: int, scaler_block_size: int) -> NF4Tensor:
    """`to_nf4(w, block_size, scaler_block_size)`, bit for bit (tested), with a bounded transient.

    The steps of torchao's `NF4Tensor.from_tensor`, each with torchao's function: double-quantized block
    scales (`double_quantize_scalers`), each block divided by its absmax, nearest level
    (`quantize_tensor_nearest`), two 4-bit codes per byte (first in the high nibble).
    """
    flat = w.reshape(-1)  # (numel,); `w` is contiguous
    numel = flat.numel()
    n_blocks = numel // block_size
    scalers, factor, mean = NF4Tensor.double_quantize_scalers(flat, block_size, scaler_block_size)
    levels = to_nf4(torch.ones(block_size * scaler_block_size, dtype=w.dtype, device=w.device),
                    block_size, scaler_block_size).nf4  # torchao's 16-level table, in w's dtype
    absmax = get_block_absmax(flat, block_size)  # (n_blocks,)
    codes = torch.empty(numel // 2, dtype=torch.uint8, device=w.device)
    step = max(block_size, _NF4_CHUNK_NUMEL // block_size * block_size)
    for lo in range(0, numel, step):
        hi = min(lo + step, numel)
        scaled = flat[lo:hi].view(-1, block_size) / absmax[lo // block_size:hi // block_size, None]
        idx = NF4Tensor.quantize_tensor_nearest(scaled.flatten(), levels).to(torch.uint8)  # (hi - lo,)
        codes[lo // 2:hi // 2] = idx[::2] << 4 | idx[1::2]
    meta = SubclassTensorArgs(w.size(), w.stride(), w.storage_offset(), w.dtype, w.device, w.requires_grad)
    return NF4Tensor(meta, block_size, n_blocks, scaler_block_size, scalers, factor, mean, codes, levels)


def _quantize_weight(name: str, w: torch.Tensor, block_size: int, scaler_block_size: int,
                     quantize: Callable[[torch.Tensor, int, int], torch.Tensor] = to_nf4) -> torch.Tensor:
    """torchao's NF4 of the plain weight `w` (named `name` in errors); see `quantize_nf4`."""
    if is_nf4(w):
        raise ValueError(f"{name} is already NF4; quantize a plain base (or dequantize_nf4 it first)")
    numel_multiple = block_size * scaler_block_size
    if w.numel() % numel_multiple:
        raise ValueError(
            f"{name} has shape {tuple(w.shape)} ({w.numel()} elements), not a multiple of block_size * "
            f"scaler_block_size = {block_size} * {scaler_block_size} = {numel_multiple}; pass a smaller "
            "scaler_block_size, or leave this projection out of targets"
        )
    return quantize(w.detach().contiguous(), block_size, scaler_block_size)


def dequantize_nf4(params: Params) -> Params:
    """A new dict with every NF4 tensor replaced by its dequantized plain tensor (same shape and dtype).

    Other tensors are passed through unchanged (the same objects). For merging adapters and export:
    `merge_adapters(dequantize_nf4(params), settings)`.
    """
    return {n: dense_weight(t) if is_nf4(t) else t for n, t in params.items()}


def nf4_bytes(numel: int, block_size: int = 64, scaler_block_size: int = 256, *, param_bytes: int = 4) -> int:
    """Storage bytes of one torchao NF4 tensor of `numel` elements quantized from `param_bytes`-byte floats.

    torchao (0.18) keeps five storages: the codes (uint8, two per byte), one int8 scale per block, one
    double-quantization factor per scaler block and the mean of the block scales (both in the weight's
    dtype), and the 16-value lookup table (weight's dtype). With one scaler block only, torchao's factor
    stays a view of a (1, scaler_block_size) tensor, whose whole storage is kept. For a fp32 (1024, 1024)
    weight: 524288 + 16384 + 64 * 4 + 4 + 16 * 4 = 540996 bytes, 0.516 bytes per parameter.

    Raises:
        ValueError when numel is not a positive multiple of block_size * scaler_block_size, or block_size
        is odd (`quantize_nf4` refuses such weights).
    """
    if block_size <= 0 or block_size % 2 or scaler_block_size <= 0:
        raise ValueError(f"block_size = {block_size}, scaler_block_size = {scaler_block_size}: need a positive "
                         "even block_size and a positive scaler_block_size")
    if numel <= 0 or numel % (block_size * scaler_block_size):
        raise ValueError(f"numel = {numel}: must be a positive multiple of block_size * scaler_block_size = "
                         f"{block_size * scaler_block_size}")
    n_blocks = numel // block_size
    n_scaler_blocks = n_blocks // scaler_block_size
    codes = numel // 2
    block_scales = n_blocks  # int8
    factors = (scaler_block_size if n_scaler_blocks == 1 else n_scaler_blocks) * param_bytes
    mean = param_bytes
    lookup = NF4_LEVELS * param_bytes
    return codes + block_scales + factors + mean + lookup
