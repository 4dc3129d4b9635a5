"""Qwen3-MoE (routed experts, load-balancing loss) against transformers on tiny random checkpoints."""

import copy
import json
import math

import pytest
import torch
from safetensors import safe_open
from tests.nn.conftest import assert_lora_loads_in_peft, assert_reloads_in_both

from lowmem.nn.config import ModelConfig, count_params, param_shapes, preset
from lowmem.nn.hf import expert_rows, hf_layout, load_hf, save_hf
from lowmem.nn.llama import (
    block_param_names,
    forward,
    forward_with_router_loss,
    init_params,
    logits,
    output_weight,
)
from lowmem.nn.loss import cross_entropy_sum
from lowmem.nn.moe import expert_linear, grouped_mm_supported, moe_mlp, route

transformers = pytest.importorskip("transformers")

# Layer 1 keeps the dense MLP (mlp_only_layers), layers 0 and 2 route to 8 experts, 2 per token.
TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=64, moe_intermediate_size=16,
            num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, mlp_only_layers=[1],
            router_aux_loss_coef=0.02, pad_token_id=0, attn_implementation="eager")
T = 12


def make_model(seed: int = 0, **overrides):
    """A tiny random Qwen3MoeForCausalLM in eval mode: matrices (and each expert's) ~ N(0, 1/fan_in), vectors
    around 0.5, so attention is peaked and the router's top 2 are far from ties."""
    config = transformers.Qwen3MoeConfig(**TINY | overrides)
    torch.manual_seed(seed)
    model = transformers.Qwen3MoeForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.normal_(0.0, 1.0 / math.sqrt(p.shape[-1]))
            else:
                p.copy_(0.5 + 0.3 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    model = make_model()
    path = tmp_path_factory.mktemp("hf-qwen3-moe")
    model.save_pretrained(path, safe_serialization=True)
    return model, path


def tokens(batch: int = 2, length: int = T, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, 64, (batch, length), generator=torch.Generator().manual_seed(seed))


def hf_grad(model, hf_name: str) -> torch.Tensor:
    """The gradient of the HF tensor `hf_name` as save_pretrained names it (experts split from the fused ones)."""
    params = dict(model.named_parameters())
    if ".mlp.experts." not in hf_name:
        return params[hf_name].grad
    prefix, rest = hf_name.split(".mlp.experts.")
    e, kind = int(rest.split(".")[0]), rest.split(".")[1]
    if kind == "down_proj":
        return params[f"{prefix}.mlp.experts.down_proj"].grad[e]
    gate, up = params[f"{prefix}.mlp.experts.gate_up_proj"].grad[e].chunk(2)
    return gate if kind == "gate_proj" else up


def test_config_reads_the_moe_keys(checkpoint):
    _, path = checkpoint
    cfg, params = load_hf(path)
    assert (cfg.family, cfg.n_experts, cfg.n_experts_per_token, cfg.expert_ffn_dim) == ("qwen3_moe", 8, 2, 16)
    assert cfg.norm_topk_prob and cfg.dense_mlp_layers == (1,) and cfg.qk_norm == "head" and cfg.head_dim == 16
    assert (cfg.router_aux_loss, cfg.router_aux_loss_coef) == (False, 0.02)
    assert [cfg.is_moe_layer(i) for i in range(3)] == [True, False, True]
    assert "layers.1.mlp.w1" in params and "layers.1.moe.router" not in params
    assert params["layers.0.moe.w1"].shape == (8 * 16, 32) and params["layers.0.moe.w2"].shape == (8 * 32, 16)
    assert block_param_names(cfg, 0)[-6:-2] == ("moe.router", "moe.w1", "moe.w2", "moe.w3")
    with pytest.raises(ValueError, match="pass the layer"):
        block_param_names(cfg)


def test_logits_aux_loss_and_grads_match_transformers(checkpoint):
    model, path = checkpoint
    cfg, params = load_hf(path)
    tok = tokens()
    for t in params.values():
        t.requires_grad_(True)
    hidden, aux = forward_with_router_loss(params, tok, cfg)
    model.zero_grad()
    out = model(tok, labels=tok, output_router_logits=True)
    torch.testing.assert_close(logits(params, hidden, cfg), out.logits, atol=1e-5, rtol=0)
    assert aux is not None and aux.item() > 1.0  # E * sum f P is 1 when perfectly balanced
    torch.testing.assert_close(aux, out.aux_loss, atol=1e-6, rtol=0)
    loss_sum, n = cross_entropy_sum(hidden[:, :-1], output_weight(params, cfg), tok[:, 1:])
    loss = loss_sum / n + cfg.router_aux_loss_coef * aux  # transformers adds it with output_router_logits
    torch.testing.assert_close(loss, out.loss, atol=1e-5, rtol=0)
    loss.backward()
    out.loss.backward()
    for hf_name, parts in hf_layout(cfg).items():
        ref = hf_grad(model, hf_name)
        assert ref.abs().max() > 0, hf_name
        torch.testing.assert_close(torch.cat([params[n].grad for n in parts]), ref, atol=1e-4, rtol=1e-4,
                                   msg=hf_name)
    for hf_name, r in expert_rows(cfg).items():
        torch.testing.assert_close(params[r.name].grad[r.first:r.first + r.n_rows], hf_grad(model, hf_name),
                                   atol=1e-4, rtol=1e-4, msg=hf_name)


def test_checkpoint_names_and_save_round_trip(checkpoint, tmp_path):
    model, path = checkpoint
    cfg, params = load_hf(path)
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        stored = set(f.keys())
    assert stored == set(hf_layout(cfg)) | set(expert_rows(cfg))
    assert "model.layers.2.mlp.experts.7.down_proj.weight" in stored and "model.layers.1.mlp.gate_proj.weight" in stored
    out = save_hf(params, cfg, tmp_path / "ckpt", max_shard_bytes=20_000)
    assert len(list(out.glob("*.safetensors"))) > 1
    assert json.loads((out / "config.json").read_text())["model_type"] == "qwen3_moe"
    assert_reloads_in_both(model, params, cfg, out, tokens(seed=1))


# Same allowance as tests/nn/test_families.py: 4 bf16 steps of the largest logit.
BF16_ATOL_FRACTION = 1 / 32


def test_bf16_logits_and_aux_loss_match_transformers(checkpoint):
    model, path = checkpoint
    tok = tokens(seed=2)
    half = copy.deepcopy(model).to(torch.bfloat16)
    cfg, params16 = load_hf(path, dtype=torch.bfloat16)
    with torch.no_grad():
        ref = half(tok, output_router_logits=True)
        hidden, aux = forward_with_router_loss(params16, tok, cfg)
        got = logits(params16, hidden, cfg)
    assert got.dtype == torch.bfloat16
    atol = BF16_ATOL_FRACTION * ref.logits.float().abs().max().item()
    torch.testing.assert_close(got.float(), ref.logits.float(), atol=atol, rtol=0)
    torch.testing.assert_close(aux, ref.aux_loss.float(), atol=2e-3, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_gemm_equals_the_loop_over_experts(dtype):
    g = torch.Generator().manual_seed(0)
    E, D, Fe, k = 8, 32, 16, 2
    x = torch.randn(2, 20, D, generator=g).to(dtype)
    router = torch.randn(E, D, generator=g).to(dtype)
    w1, w3 = (torch.randn(E * Fe, D, generator=g).div(D ** 0.5).to(dtype) for _ in range(2))
    w2 = torch.randn(E * D, Fe, generator=g).div(Fe ** 0.5).to(dtype)
    assert grouped_mm_supported(x, D, Fe)  # this torch's CPU kernel runs both dtypes
    results = []
    for grouped in (True, False):
        leaves = [t.clone().requires_grad_(True) for t in (x, w1, w2, w3)]
        y, _ = moe_mlp(leaves[0], router, *leaves[1:], top_k=k, norm_topk_prob=False, grouped=grouped)
        y.float().square().sum().backward()
        results.append([y, *(t.grad for t in leaves)])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, atol=0 if dtype == torch.float32 else 1e-2, rtol=1e-5)


def test_router_picks_top_k_and_an_expert_without_tokens_costs_nothing():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.1]])
    router = torch.tensor([[4.0, -1.0], [-1.0, 4.0], [0.0, 0.0], [-9.0, -9.0]])  # expert 3 never wins
    r = route(x, router, top_k=2, norm_topk_prob=True)
    assert r.experts[:, 0].tolist() == [0, 1, 0] and r.experts[:, 1].tolist() == [2, 2, 2]
    torch.testing.assert_close(r.weights.sum(-1), torch.ones(3))
    assert r.offsets.tolist() == [2, 3, 6, 6]
    xs = x.repeat_interleave(2, dim=0)[r.order]
    w = torch.randn(4 * 4, 2)
    for grouped in (False,):  # 2 fp32 features are 8 bytes: too narrow for torch._grouped_mm
        y = expert_linear(xs, w, r.offsets, 4, grouped=grouped)
        want = torch.stack([w.view(4, 4, 2)[e] @ row for e, row in zip(r.experts.reshape(-1)[r.order], xs, strict=True)])
        torch.testing.assert_close(y, want)
    assert not grouped_mm_supported(xs, 2, 4)


def test_unaligned_expert_sizes_take_the_loop_and_match_transformers(tmp_path):
    # transformers' own default (grouped_mm) refuses these sizes too: its loop over experts is the reference
    model = make_model(seed=3, moe_intermediate_size=6, mlp_only_layers=[], norm_topk_prob=False,
                       num_experts_per_tok=3, experts_implementation="eager")
    model.save_pretrained(tmp_path / "m", safe_serialization=True)
    cfg, params = load_hf(tmp_path / "m")
    assert not grouped_mm_supported(torch.zeros(1, dtype=torch.float32), cfg.dim, cfg.expert_ffn_dim)
    tok = tokens(seed=4)
    with torch.no_grad():
        hidden, aux = forward_with_router_loss(params, tok, cfg)
        out = model(tok, output_router_logits=True)
    torch.testing.assert_close(logits(params, hidden, cfg), out.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(aux, out.aux_loss, atol=1e-6, rtol=0)


def test_qwen3_30b_a3b_preset_counts_as_transformers():
    cfg = preset("qwen3-30b-a3b")
    hf_cfg = transformers.AutoConfig.for_model(**{k: v for k, v in cfg.to_hf_config().items() if k != "architectures"})
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(hf_cfg)
    assert type(model).__name__ == "Qwen3MoeForCausalLM"
    assert count_params(cfg) == model.num_parameters() == sum(math.prod(s) for s in param_shapes(cfg).values())
    assert round(count_params(cfg) / 1e9, 1) == 30.5  # the model card's 30.5B
    assert ModelConfig.from_hf_config(cfg.to_hf_config(), "x") == cfg


def test_init_params_and_generation_run_on_a_moe_config():
    from lowmem.nn.generate import generate

    cfg = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48, family="qwen3_moe",
                      qk_norm="head", n_experts=4, n_experts_per_token=2, expert_ffn_dim=16)
    params = init_params(cfg, seed=0)
    assert set(params) == set(param_shapes(cfg))
    prompt = tokens(1, 4)
    out = generate(params, cfg, prompt, max_new_tokens=3)
    # greedy decoding with the KV cache continues as the full forward would
    seq = torch.cat([prompt, torch.tensor([out[0]])], dim=1)  # (1, 7)
    full = logits(params, forward(params, seq[:, :-1], cfg), cfg)
    assert len(out[0]) == 3 and full[0, 3:].argmax(-1).tolist() == out[0]


def test_attention_lora_loads_in_peft_with_the_same_logits(checkpoint, tmp_path):
    model, path = checkpoint
    cfg, params = load_hf(path)
    assert_lora_loads_in_peft(model, params, cfg, ("wq", "wk", "wv", "wo"), tmp_path / "adapter", tokens(seed=7))


def expert_lora(params, cfg, targets=("wq", "wo", "w1", "w2", "w3"), seed=1):
    from lowmem.nn.lora import LoraSettings, add_adapters

    settings = LoraSettings(rank=4, alpha=8.0, targets=targets)
    adapted = add_adapters(params, cfg, settings, seed=0)
    g = torch.Generator().manual_seed(seed)
    for n in adapted:
        if n.endswith(".lora_b"):
            adapted[n] = 0.3 * torch.randn(adapted[n].shape, generator=g)
    return settings, adapted


def test_expert_lora_is_one_adapter_per_expert_and_merges_exactly(checkpoint, tmp_path):
    from lowmem.nn.lora import merge_adapters
    from lowmem.nn.peft_io import save_peft

    _, path = checkpoint
    cfg, params = load_hf(path)
    settings, adapted = expert_lora(params, cfg)
    assert adapted["layers.0.moe.w1.lora_a"].shape == (8 * 4, 32) and adapted["layers.0.moe.w2.lora_b"].shape == (8 * 32, 4)
    assert "layers.1.mlp.w1.lora_a" in adapted and not any(n.startswith("layers.0.moe.router.") for n in adapted)
    tok = tokens(seed=5)
    with torch.no_grad():
        got = logits(adapted, forward(adapted, tok, cfg, adapters=settings), cfg)
        attention_only = {n: t for n, t in adapted.items() if ".moe." not in n or not n.endswith(("lora_a", "lora_b"))}
        merged = merge_adapters(adapted, settings)
        want = logits(merged, forward(merged, tok, cfg), cfg)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    # the experts' adapters act: dropping them changes the logits
    with torch.no_grad():
        partial = logits(attention_only, forward(attention_only, tok, cfg, adapters=settings), cfg)
    assert (partial - got).abs().max() > 0.05
    with pytest.raises(ValueError, match="PEFT"):
        save_peft(adapted, cfg, settings, tmp_path / "adapter")


def test_qlora_keeps_the_experts_in_nf4_and_saves_no_dequantized_copy(checkpoint):
    pytest.importorskip("torchao")
    from lowmem.nn.llama import is_nf4
    from lowmem.nn.lora import trainable_names
    from lowmem.nn.quant import dequantize_nf4, quantize_nf4

    _, path = checkpoint
    cfg, params = load_hf(path)
    base = quantize_nf4(params, cfg, block_size=16, scaler_block_size=8)
    assert is_nf4(base["layers.0.moe.w1"]) and is_nf4(base["layers.1.mlp.w1"])
    assert not is_nf4(base["layers.0.moe.router"])
    settings, adapted = expert_lora(base, cfg)
    tok = tokens(seed=6)
    with torch.no_grad():
        plain = dequantize_nf4(adapted)
        want = logits(plain, forward(plain, tok, cfg, adapters=settings), cfg)
    for n in trainable_names(adapted):
        adapted[n].requires_grad_(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        hidden = forward(adapted, tok, cfg, adapters=settings)
    got = logits(adapted, hidden, cfg)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    got.square().mean().backward()
    assert all(adapted[n].grad is not None and adapted[n].grad.abs().max() > 0 for n in trainable_names(adapted))
    experts_numel = 8 * 16 * 32
    assert max(saved) < experts_numel  # no dequantized (E * Fe, D) expert weight outlives its op


def test_qlora_load_quantizes_each_stacked_expert_tensor_as_it_completes(checkpoint):
    pytest.importorskip("torchao")
    from lowmem.nn.llama import is_nf4
    from lowmem.nn.quant import nf4_converter, quantize_nf4

    _, path = checkpoint
    cfg, plain = load_hf(path)
    _, params = load_hf(path, convert=nf4_converter(cfg, block_size=16, scaler_block_size=8))
    assert is_nf4(params["layers.2.moe.w2"]) and not is_nf4(params["layers.2.moe.router"])
    want = quantize_nf4(plain, cfg, block_size=16, scaler_block_size=8)
    tok = tokens(seed=8)
    with torch.no_grad():
        torch.testing.assert_close(forward(params, tok, cfg), forward(want, tok, cfg), atol=0, rtol=0)


def test_nf4_experts_dequantize_piecewise_to_the_same_values_in_less_scratch():
    pytest.importorskip("torchao")
    from lowmem.nn.moe import dequantize_experts
    from lowmem.nn.quant import _quantize_weight
    from lowmem.train.memory import LiveTensorTracker

    E, out, cols = 16, 64, 128
    w = _quantize_weight("w", torch.randn(E * out, cols, generator=torch.Generator().manual_seed(0)), 64, 256)
    peaks, results = {}, {}
    for chunk in (E * out * cols, 2 * out * cols):
        with LiveTensorTracker() as tracker:
            results[chunk] = dequantize_experts(w, E, torch.float32, chunk_elements=chunk)
        peaks[chunk] = tracker.peak_bytes
    whole, pieces = results.values()
    assert torch.equal(whole, pieces) and torch.equal(whole.reshape(E * out, cols), w.get_original_weight())
    weight_bytes = E * out * cols * 4
    assert peaks[E * out * cols] > 3 * weight_bytes  # torchao's int64 codes for the whole tensor
    assert peaks[2 * out * cols] < 1.8 * weight_bytes  # the output plus the scratch of 2 experts
