"""What the newer families' options (q/k norms, NoPE layers, a local RoPE, partial rotary) add to a step's memory,
measured against what the planner counts for them (issue #17).

Measured: the bytes of the distinct storages autograd saves in a forward (saved_tensors_hooks), parameters left
out. Each option is compared with the same model without it, so what both save cancels, and the planner's
difference must equal the measured one.
"""

import math

import msgspec
import pytest
import torch

from lowmem.nn.config import ModelConfig, count_params, param_shapes, preset
from lowmem.nn.llama import forward, init_params
from lowmem.nn.lora import LoraSettings, add_adapters, trainable_names
from lowmem.plan.estimate import FULL, Trainable, activation_bytes
from lowmem.plan.structs import Strategies

B, T = 2, 64
BASE = ModelConfig(vocab_size=128, dim=64, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=96)
WINDOWED = msgspec.structs.replace(BASE, sliding_window=8, sliding_layers=(0, 1, 2))
LORA = LoraSettings(rank=4, alpha=8.0, targets=("wq", "wv"))
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def saved_bytes(cfg: ModelConfig, precision: str, lora: bool = False) -> int:
    """Bytes autograd saves in one forward of `cfg` (B x T tokens), not counting the parameters."""
    params = init_params(cfg, seed=0, dtype=DTYPES[precision])
    if lora:
        params = add_adapters(params, cfg, LORA, seed=0)
    for name in trainable_names(params) if lora else params:
        params[name].requires_grad_(True)
    param_storages = {t.untyped_storage().data_ptr() for t in params.values()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in param_storages:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    tokens = torch.randint(0, cfg.vocab_size, (B, T), generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward(params, tokens, cfg, adapters=LORA if lora else None)
    return sum(saved.values())


def planned_bytes(cfg: ModelConfig, precision: str, lora: bool = False) -> int:
    strategies = Strategies(precision=precision, activation_checkpointing="off", cross_entropy="standard")
    trainable = Trainable(full=False, adapted=("wq", "wv"), rank=LORA.rank) if lora else FULL
    return activation_bytes(cfg, strategies, B * T, B, packed=False, trainable=trainable)


@pytest.mark.parametrize("precision", sorted(DTYPES))
@pytest.mark.parametrize("qk_norm", ["head", "projection"])
@pytest.mark.parametrize("lora", [False, True])
def test_qk_norm_activations_are_planned_exactly(precision, qk_norm, lora):
    cfg = msgspec.structs.replace(BASE, qk_norm=qk_norm)
    measured = saved_bytes(cfg, precision, lora) - saved_bytes(BASE, precision, lora)
    assert measured > 0
    planned = planned_bytes(cfg, precision, lora) - planned_bytes(BASE, precision, lora)
    if not lora:
        assert planned == measured
    else:  # under LoRA without a wk adapter, layer 0's k has no gradient path: its k norm saves nothing
        # its fp32 input (KV * hd) and one fp32 rstd per kv head, or one for the whole projection
        k_norm = BASE.n_kv_heads * BASE.head_dim * 4 + (BASE.n_kv_heads if qk_norm == "head" else 1) * 4
        assert planned - measured == k_norm * B * T
    # the weights are counted: (hd,) per norm and layer, or (H * hd,) and (KV * hd,)
    assert count_params(cfg) - count_params(BASE) == BASE.n_layers * (2 * 16 if qk_norm == "head" else 6 * 16)


@pytest.mark.parametrize("name", ["qwen3-8b", "gemma3-4b", "olmo2-1b"])
def test_qk_norm_weights_are_tiny_in_the_real_presets(name):
    cfg = preset(name)
    norms = sum(math.prod(s) for n, s in param_shapes(cfg).items() if n.endswith((".q_norm", ".k_norm")))
    assert 0 < norms < 1e-4 * count_params(cfg)


@pytest.mark.parametrize("precision", sorted(DTYPES))
def test_nope_layers_change_nothing_in_the_plan_and_save_at_most_the_rope_casts(precision):
    cfg = msgspec.structs.replace(BASE, nope_layers=(1, 3))
    assert planned_bytes(cfg, precision) == planned_bytes(BASE, precision) and count_params(cfg) == count_params(BASE)
    measured = saved_bytes(cfg, precision) - saved_bytes(BASE, precision)
    # fp32: RoPE saves views of the shared cos/sin tables, which a NoPE layer does not change. Below fp32 each RoPE
    # layer saves cos/sin cast for q and for k (4 rotary_dim values a token), which a NoPE layer does not: the plan
    # keeps them (the safe side).
    casts = 0 if precision == "fp32" else len(cfg.nope_layers) * 4 * cfg.rotary_dim * 2 * B * T
    assert measured == -casts


@pytest.mark.parametrize("precision", sorted(DTYPES))
def test_a_local_rope_costs_one_more_pair_of_tables_and_nothing_per_layer(precision):
    local = msgspec.structs.replace(WINDOWED, rope_local_theta=100.0)
    assert count_params(local) == count_params(WINDOWED)
    measured = saved_bytes(local, precision) - saved_bytes(WINDOWED, precision)
    # in fp32 RoPE saves views of the tables: one more pair, cos and sin (B, T, rotary_dim) fp32 shared by its layers;
    # below fp32 it saves its casts per layer either way, and no table
    assert measured == (2 * B * T * local.rotary_dim * 4 if precision == "fp32" else 0)
    assert planned_bytes(local, precision) - planned_bytes(WINDOWED, precision) == measured


@pytest.mark.parametrize("precision", sorted(DTYPES))
def test_partial_rotary_saves_less_as_planned(precision):
    cfg = msgspec.structs.replace(BASE, partial_rotary_factor=0.5)
    measured = saved_bytes(cfg, precision) - saved_bytes(BASE, precision)
    assert measured < 0  # smaller tables (and casts); no copy where the rotated and passed dims join
    assert planned_bytes(cfg, precision) - planned_bytes(BASE, precision) == measured


@pytest.mark.parametrize("name", ["gemma3-1b", "gemma3-4b", "phi4-mini", "smollm3-3b"])
def test_new_presets_plan_at_real_size(tiny_spec, name):
    from lowmem.plan import plan

    cfg = preset(name)
    vocab = min(cfg.vocab_size, 262144)  # the trained tokenizer's cap; Gemma 3 4B pads its vocabulary past it
    spec = tiny_spec(f"model.preset={name}", f"data.tokenizer.vocab_size={vocab}", "train.seq_len=2048",
                     "train.micro_batch=1", "memory.precision=bf16", "method.kind=lora")
    p = plan(spec, "h100-80gb")
    assert p.n_params == count_params(msgspec.structs.replace(cfg, vocab_size=vocab))  # a preset takes the data's
    # LoRA over a bf16 base: at least the frozen weights, within the card
    assert 2 * count_params(cfg) < p.memory.peak_bytes < 80e9
