"""NF4 base weights (QLoRA): storage bytes, numerics against the dequantized model, adapter gradients,
training-step memory, and merging for export."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4

from lowmem.nn.config import ModelConfig
from lowmem.nn.llama import forward, init_params, is_nf4, linear, logits
from lowmem.nn.lora import TARGETS, LoraSettings, add_adapters, merge_adapters, trainable_names
from lowmem.nn.quant import dequantize_nf4, nf4_bytes, quantize_nf4, quantized_names
from lowmem.train.memory import LiveTensorTracker

# Every projection numel is a multiple of 64 * 256 (torchao's whole double-quantization blocks);
# 4 layers so that the weights outweigh one linear's dequantization scratch in the memory test.
CFG = ModelConfig(vocab_size=64, dim=128, n_layers=4, n_heads=4, n_kv_heads=4, ffn_dim=256, max_seq_len=32)
ALL = tuple(TARGETS)

# The NF4 data type's 16 values, QLoRA paper (arXiv 2305.14314) appendix E.
NF4_VALUES = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
])


@pytest.fixture(scope="module")
def base():
    return init_params(CFG, seed=0)


@pytest.fixture(scope="module")
def quantized(base):
    return quantize_nf4(base, CFG)


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, CFG.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))


def model_logits(params, tokens, settings=None, **kw):
    return logits(params, forward(params, tokens, CFG, adapters=settings, **kw), CFG)


def inner_storage_bytes(t: torch.Tensor) -> int:
    """Bytes of the distinct storages inside a torchao NF4 tensor."""
    names, _ = t.__tensor_flatten__()
    storages = {getattr(t, n).untyped_storage().data_ptr(): getattr(t, n).untyped_storage() for n in names}
    return sum(s.nbytes() for s in storages.values())


def perturbed(params, seed: int = 1):
    """Adapters moved off their start (B = 0 would make them a no-op and their A gradients zero)."""
    gen = torch.Generator().manual_seed(seed)
    out = dict(params)
    for n in trainable_names(params):
        t = params[n]
        if n.endswith(".lora_b"):
            out[n] = 0.05 * torch.randn(t.shape, generator=gen)
        elif n.endswith(".dora_m"):
            out[n] = t * (1 + 0.2 * (2 * torch.rand(t.shape, generator=gen) - 1))
    return out


def lm_loss(params, tokens, settings, **kw):
    z = model_logits(params, tokens, settings, training=True, **kw)  # (B, T, V)
    return F.cross_entropy(z[:, :-1].reshape(-1, CFG.vocab_size), tokens[:, 1:].reshape(-1))


# ------------------------------------------------------------------------------------------- memory


@pytest.mark.parametrize("shape,dtype,block_size,scaler_block_size", [
    ((1024, 1024), torch.float32, 64, 256),
    ((128, 128), torch.float32, 64, 256),  # one scaler block: torchao keeps a (1, 256) factor storage
    ((256, 512), torch.bfloat16, 64, 256),
    ((128, 256), torch.float32, 32, 128),
])
def test_nf4_bytes_matches_torchao_storages(shape, dtype, block_size, scaler_block_size):
    w = torch.empty(shape).normal_(0.0, 0.02, generator=torch.Generator().manual_seed(0)).to(dtype)
    expected = nf4_bytes(w.numel(), block_size, scaler_block_size, param_bytes=w.element_size())
    tracker = LiveTensorTracker()
    with tracker:
        q = to_nf4(w, block_size, scaler_block_size)
    assert tracker.current_bytes == expected  # every temporary of quantization freed, only q's storages left
    assert inner_storage_bytes(q) == expected
    assert LiveTensorTracker().add_existing([q], "weights") == expected


def test_nf4_bytes_per_param_of_a_1024_square_fp32_weight():
    n_bytes = nf4_bytes(1024 * 1024)
    # 4-bit codes + an int8 scale per 64 weights + one fp32 factor per 256 scales + mean + lookup table
    assert n_bytes == 1024 * 1024 // 2 + 1024 * 1024 // 64 + 64 * 4 + 4 + 16 * 4 == 540996
    assert n_bytes / (1024 * 1024) == pytest.approx(0.5159, abs=1e-4)  # vs 4 bytes fp32: 7.75x smaller


def test_quantized_model_holds_under_a_fifth_of_the_fp32_bytes(base, quantized):
    names = quantized_names(CFG, ALL)
    assert len(names) == CFG.n_layers * 7
    assert all(is_nf4(quantized[n]) and not quantized[n].requires_grad for n in names)
    assert all(quantized[n] is base[n] for n in base if n not in names)  # embeddings, norms, head untouched
    assert not any(is_nf4(base[n]) for n in base)  # the input dict is not changed
    fp32_bytes = sum(base[n].numel() * 4 for n in names)
    nf4_total = LiveTensorTracker().add_existing([quantized[n] for n in names], "weights")
    assert nf4_total == sum(nf4_bytes(base[n].numel()) for n in names)
    assert nf4_total < 0.2 * fp32_bytes  # 0.146x here: 0.58 bytes/param for 128 x 128 weights


def test_quantize_targets_and_errors(base):
    only = quantize_nf4(base, CFG, targets=("wq", "w2"))
    assert [n for n in only if is_nf4(only[n])] == quantized_names(CFG, ("wq", "w2"))
    with pytest.raises(ValueError, match="unknown target 'output'"):
        quantize_nf4(base, CFG, targets=("output",))
    with pytest.raises(ValueError, match="already NF4"):
        quantize_nf4(only, CFG, targets=("wq",))
    gqa = ModelConfig(vocab_size=64, dim=128, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=128)
    gqa_params = init_params(gqa, seed=0)
    with pytest.raises(ValueError, match=r"layers\.0\.attn\.wk has shape \(64, 128\).*smaller scaler_block_size"):
        quantize_nf4(gqa_params, gqa)
    assert is_nf4(quantize_nf4(gqa_params, gqa, targets=("wk",), scaler_block_size=128)["layers.0.attn.wk"])


# ----------------------------------------------------------------------------------------- numerics


def test_round_trip_error_of_a_normal_weight_is_in_nf4_band():
    w = torch.empty(512, 512).normal_(0.0, 0.02, generator=torch.Generator().manual_seed(0))
    d = dequantize_nf4({"w": to_nf4(w)})["w"]
    assert not is_nf4(d) and d.dtype == w.dtype and d.shape == w.shape
    # NF4 with absmax blocks of 64 on Gaussian weights: relative L2 error about 0.092 (measured 0.0925 here;
    # the blocks' absmax sits near 2.4 sigma and the 16 levels are normal quantiles). Band: [0.085, 0.10].
    rel = ((d - w).norm() / w.norm()).item()
    assert 0.085 < rel < 0.10, rel
    # Each block is a scale times NF4's 16 levels; the absmax element maps to exactly +-1.
    blocks = d.view(-1, 64)
    levels = blocks / blocks.abs().amax(dim=1, keepdim=True)
    nearest = (levels[..., None] - NF4_VALUES).abs().min(dim=-1).values
    assert nearest.max() < 2e-4  # torchao stores the levels rounded to 4 decimals
    assert torch.unique(torch.bucketize(levels.flatten(), (NF4_VALUES[1:] + NF4_VALUES[:-1]) / 2)).numel() == 16


def test_quantized_logits_are_close_to_fp32(base, quantized, tokens):
    ref = model_logits(base, tokens)
    rel = ((model_logits(quantized, tokens) - ref).norm() / ref.norm()).item()
    # Each weight carries ~9% relative error; a residual branch multiplies two quantized matrices
    # (wv then wo, w1/w3 then w2), so its output errs by about sqrt(2) * 9% = 13%. Measured 0.145.
    assert 0.02 < rel < 0.2, rel


@pytest.mark.parametrize("dora", [None, False, True], ids=["base", "lora", "dora"])
def test_nf4_forward_equals_forward_of_the_dequantized_weights(quantized, tokens, dora):
    settings = None if dora is None else LoraSettings(rank=4, alpha=8.0, targets=ALL, dora=dora)
    params = quantized if settings is None else perturbed(add_adapters(quantized, CFG, settings, seed=0))
    reference = dequantize_nf4(params)
    assert not any(is_nf4(t) for t in reference.values())
    torch.testing.assert_close(model_logits(params, tokens, settings), model_logits(reference, tokens, settings),
                               rtol=0, atol=1e-5)


# --------------------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("dora,checkpointed", [(False, False), (True, False), (False, True)],
                         ids=["lora", "dora", "lora-checkpointed"])
def test_adapter_grads_on_nf4_base_equal_those_on_the_dequantized_base(quantized, tokens, dora, checkpointed):
    settings = LoraSettings(rank=4, alpha=8.0, targets=ALL, dora=dora)
    qlora = perturbed(add_adapters(quantized, CFG, settings, seed=0))
    dense_base = dequantize_nf4(quantized)
    fresh, fresh_nf4 = add_adapters(dense_base, CFG, settings, seed=0), add_adapters(quantized, CFG, settings, seed=0)
    # Adapters made on the NF4 base are those made on its dequantized twin (DoRA's m from the dequantized rows)
    assert all(torch.equal(fresh[n], fresh_nf4[n]) for n in trainable_names(fresh))
    reference = dense_base | {n: qlora[n] for n in trainable_names(qlora)}
    names = trainable_names(qlora)
    run_block = (lambda f, *a: checkpoint(f, *a, use_reentrant=False)) if checkpointed else None
    grads = []
    for params in (qlora, reference):
        params = dict(params) | {n: params[n].detach().clone().requires_grad_(True) for n in names}
        lm_loss(params, tokens, settings, run_block=run_block).backward()
        grads.append([params[n].grad for n in names])
        nf4 = [params[n] for n in quantized_names(CFG, ALL) if is_nf4(params[n])]
        assert all(t.grad is None and not t.requires_grad for t in nf4)
    for n, g_q, g_ref in zip(names, *grads, strict=True):
        assert g_q.abs().sum() > 0, n
        torch.testing.assert_close(g_q, g_ref, rtol=1e-5, atol=1e-5, msg=n)


def test_optimizer_sees_only_adapters_and_leaves_nf4_untouched(quantized, tokens):
    settings = LoraSettings(rank=4, alpha=8.0, targets=ALL)
    params = perturbed(add_adapters(quantized, CFG, settings, seed=0))
    names = trainable_names(params)
    params |= {n: params[n].clone().requires_grad_(True) for n in names}
    opt = torch.optim.AdamW([params[n] for n in names], lr=1e-2)
    codes = {n: params[n].quantized_data.clone() for n in quantized_names(CFG, ALL)}
    before = {n: params[n].detach().clone() for n in names}
    lm_loss(params, tokens, settings).backward()
    opt.step()
    assert len(opt.state) == len(names) and not any(is_nf4(p) for p in opt.state)
    assert all(not torch.equal(params[n], before[n]) for n in names if n.endswith(".lora_b"))
    assert all(torch.equal(params[n].quantized_data, codes[n]) and params[n].grad is None for n in codes)


# ------------------------------------------------------------------------------- memory of training


def test_nf4_linear_keeps_no_dequantized_copy_after_the_op(quantized):
    w = quantized["layers.0.mlp.w1"]  # (256, 128)
    x = torch.randn(2, 16, 128, requires_grad=True)
    tracker = LiveTensorTracker()
    tracker.add_existing([w, x], "inputs")
    before = tracker.current_bytes
    with tracker:
        y = linear(x, w)
    # Autograd saves the NF4 weight (already counted) for backward, not the (256, 128) fp32 weight.
    assert tracker.current_bytes - before == y.numel() * 4
    # The dequantization inside the op is scratch; torchao's (int64 codes) peaks at ~4.5x the fp32 weight.
    scratch = tracker.peak_bytes - before - y.numel() * 4
    assert 1 * w.numel() * 4 <= scratch < 6 * w.numel() * 4, scratch / (w.numel() * 4)


def step_peak_bytes(params, tokens, settings) -> int:
    """Peak live bytes of one training step (forward, backward, AdamW step), everything counted."""
    names = trainable_names(params)
    params = dict(params) | {n: params[n].clone().requires_grad_(True) for n in names}
    opt = torch.optim.AdamW([params[n] for n in names], lr=1e-3)
    tracker = LiveTensorTracker()
    tracker.add_existing(params.values(), "parameters")
    with tracker:
        lm_loss(params, tokens, settings).backward()
        opt.step()
    return tracker.peak_bytes


def test_training_step_peak_holds_no_fp32_copy_of_the_nf4_weights(base, quantized, tokens):
    settings = LoraSettings(rank=4, alpha=8.0, targets=ALL)
    peak_fp32 = step_peak_bytes(add_adapters(base, CFG, settings, seed=0), tokens, settings)
    peak_nf4 = step_peak_bytes(add_adapters(quantized, CFG, settings, seed=0), tokens, settings)
    fp32_weight_bytes = sum(base[n].numel() * 4 for n in quantized_names(CFG, ALL))
    # The weights shrink 7x (saving 0.86x of their fp32 bytes); one linear's dequantization scratch at a time
    # takes some of it back. A full fp32 copy of the weights anywhere would erase the saving.
    assert peak_fp32 - peak_nf4 > 0.4 * fp32_weight_bytes, (peak_fp32, peak_nf4, fp32_weight_bytes)


# ------------------------------------------------------------------------------------------- merge


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_merge_of_dequantized_params_reproduces_adapted_nf4_logits(quantized, tokens, dora):
    settings = LoraSettings(rank=4, alpha=8.0, targets=("wq", "wv", "w2"), dora=dora)
    params = perturbed(add_adapters(quantized, CFG, settings, seed=0))
    merged = merge_adapters(dequantize_nf4(params), settings)
    assert not any(is_nf4(t) for t in merged.values()) and not trainable_names(merged)
    ref = model_logits(params, tokens, settings)
    torch.testing.assert_close(model_logits(merged, tokens), ref, rtol=0, atol=1e-5)
    # merge_adapters on the NF4 params dequantizes adapted bases itself; unadapted ones stay NF4.
    direct = merge_adapters(params, settings)
    assert is_nf4(direct["layers.0.attn.wk"]) and not is_nf4(direct["layers.0.attn.wq"])
    direct = dequantize_nf4(direct)
    assert all(torch.equal(direct[n], merged[n]) for n in merged)
