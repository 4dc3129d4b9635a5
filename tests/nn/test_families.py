"""Model families (Qwen2, Mistral, Gemma, Gemma 2, Gemma 3, Phi-3, Phi-4-mini, Qwen3, OLMo 2, SmolLM3) against
transformers on tiny random checkpoints."""

import copy
import json
import math

import msgspec
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from tests.nn.conftest import assert_lora_loads_in_peft, assert_reloads_in_both, randomize_

from lowmem.nn.config import LinearRopeScaling, ModelConfig, count_params, param_shapes, preset
from lowmem.nn.generate import generate
from lowmem.nn.hf import hf_layout, load_hf, save_hf
from lowmem.nn.llama import AdaptedWeight, forward, init_params, linear, logits, output_weight
from lowmem.nn.loss import CE_IMPLEMENTATIONS, cross_entropy_sum

transformers = pytest.importorskip("transformers")

COMMON = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, attn_implementation="eager")
# Windows shorter than the test sequences (T = 12) so that the sliding mask changes the numbers; Gemma's
# head_dim 16 is decoupled from hidden_size / heads = 8 (Qwen3's too, and untied: tied is tested below);
# Gemma 2's caps are small enough to bite. Gemma 3 has a local and a global layer (its 5:1 pattern needs six
# layers, whose bf16 rounding outgrows the tolerance below; see test_gemma3_layer_pattern_is_read_as_transformers),
# a local RoPE base far from the global one and linear scaling on the global layer. Phi-4-mini's longrope context (8) is shorter
# than T, so its long factors apply, and its partial rotary turns half of each head. SmolLM3's layer 1 is NoPE
# and (use_sliding_window) slides.
LONGROPE = {"rope_type": "longrope", "short_factor": [1.5, 3.0], "long_factor": [4.0, 9.0],
            "original_max_position_embeddings": 8}
FAMILIES = {
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"tie_word_embeddings": True}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 4}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {"head_dim": 16}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {
        "head_dim": 16, "sliding_window": 4, "query_pre_attn_scalar": 12, "attn_logit_softcapping": 2.0,
        "final_logit_softcapping": 3.0}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"sliding_window": 5}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16, "tie_word_embeddings": False}),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {}),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM", {
        "head_dim": 16, "sliding_window": 4, "query_pre_attn_scalar": 12,
        "layer_types": ["sliding_attention", "full_attention"],
        "rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000.0},
                            "sliding_attention": {"rope_type": "default", "rope_theta": 50.0}}}),
    "phi4": ("Phi3Config", "Phi3ForCausalLM", {
        "partial_rotary_factor": 0.5, "tie_word_embeddings": True, "original_max_position_embeddings": 8,
        "rope_parameters": {
            **LONGROPE, "rope_theta": 10000.0, "partial_rotary_factor": 0.5}}),
    "smollm3": ("SmolLM3Config", "SmolLM3ForCausalLM", {
        "no_rope_layers": [1, 0], "use_sliding_window": True, "sliding_window": 4}),
}
MODEL_TYPE = {"phi4": "phi3"}  # FAMILIES keys that are a variant of a model_type, not one of their own
T = 12


def make_model(family: str, seed: int = 0, **overrides):
    """Tiny random HF model in eval mode; weights ~ 1/sqrt(fan_in) and norms/biases away from 0 and 1."""
    config_cls, model_cls, extra = FAMILIES[family]
    config = getattr(transformers, config_cls)(**COMMON | extra | overrides)
    torch.manual_seed(seed)
    return randomize_(getattr(transformers, model_cls)(config).eval(), vector_center=0.5, vector_spread=0.3)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def checkpoint(request, tmp_path_factory):
    """(family, HF model, its save_pretrained directory)."""
    model = make_model(request.param)
    path = tmp_path_factory.mktemp(f"hf-{request.param}")
    model.save_pretrained(path, safe_serialization=True)
    return request.param, model, path


def tokens(batch: int = 2, length: int = T, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, 64, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_config_flags_per_family(checkpoint):
    family, _, path = checkpoint
    cfg, _ = load_hf(path)
    assert cfg.family == MODEL_TYPE.get(family, family)
    assert cfg.qkv_bias is (family == "qwen2")
    assert cfg.sliding_window == {"mistral": 4, "gemma2": 4, "phi3": 5, "gemma3_text": 4, "smollm3": 4}.get(family)
    assert cfg.head_dim == (16 if family.startswith("gemma") or family == "qwen3" else 8)
    assert (cfg.mlp_act == "gelu_tanh") is cfg.norm_unit_offset is cfg.embed_scale is family.startswith("gemma")
    assert cfg.sandwich_norms is (family in ("gemma2", "olmo2", "gemma3_text"))
    assert cfg.pre_norms is (family != "olmo2")
    assert cfg.qk_norm == {"qwen3": "head", "olmo2": "projection", "gemma3_text": "head"}.get(family)
    assert cfg.nope_layers == ((1,) if family == "smollm3" else ())
    assert cfg.rotary_dim == (4 if family == "phi4" else cfg.head_dim)
    assert [cfg.layer_rope(i) for i in range(cfg.n_layers)] == {
        "gemma3_text": ["local", "global"], "smollm3": ["global", None]}.get(family, ["global"] * cfg.n_layers)
    if family == "gemma3_text":
        assert cfg.sliding_layers == (0,) and cfg.layer_window(1) is None
        assert (cfg.rope_theta, cfg.rope_local_theta, cfg.rope_scaling) == (1000.0, 50.0, LinearRopeScaling(factor=2.0))
    if family == "phi4":
        assert cfg.tie_embeddings and cfg.rope_scaling.long_factor == (4.0, 9.0)
        assert cfg.rope_scaling.attention_factor == pytest.approx(math.sqrt(1 + math.log(64 / 8) / math.log(8)))
    if family == "smollm3":
        assert cfg.sliding_layers == (1,)
    assert cfg.norm_scale_fp32 is cfg.rope_fp32 is (family == "olmo2")
    if family == "gemma2":
        assert cfg.sliding_layers == "even" and [cfg.layer_window(i) for i in range(2)] == [4, None]
        assert (cfg.query_pre_attn_scalar, cfg.attn_logit_softcap, cfg.final_logit_softcap) == (12.0, 2.0, 3.0)


def test_logits_loss_and_grads_match_transformers(checkpoint):
    family, model, path = checkpoint
    cfg, params = load_hf(path)
    tok = tokens()
    for t in params.values():
        t.requires_grad_(True)
    hidden = forward(params, tok, cfg)
    got = logits(params, hidden, cfg)
    model.zero_grad()
    out = model(tok, labels=tok)
    assert out.logits.abs().max() > 1.0
    torch.testing.assert_close(got, out.logits, atol=1e-5, rtol=0)

    # HF shifts labels inside; here hidden t predicts token t + 1.
    loss_sum, n = cross_entropy_sum(hidden[:, :-1], output_weight(params, cfg), tok[:, 1:],
                                    softcap=cfg.final_logit_softcap)
    loss = loss_sum / n
    torch.testing.assert_close(loss, out.loss, atol=1e-4, rtol=0)
    loss.backward()
    out.loss.backward()
    hf_params = dict(model.named_parameters())
    for hf_name, parts in hf_layout(cfg).items():
        ours = torch.cat([params[n].grad for n in parts])
        ref = hf_params[hf_name].grad
        assert ref.abs().max() > 0, hf_name
        torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4, msg=hf_name)


def test_checkpoint_names_and_save_round_trip(checkpoint, tmp_path):
    family, model, path = checkpoint
    cfg, params = load_hf(path)
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        stored = set(f.keys())
    assert stored == set(hf_layout(cfg))
    assert ("model.layers.0.self_attn.q_proj.bias" in stored) is (family == "qwen2")
    assert ("model.layers.0.self_attn.qkv_proj.weight" in stored) is (family in ("phi3", "phi4"))
    assert ("model.layers.1.post_feedforward_layernorm.weight" in stored) is (family in ("gemma2", "olmo2",
                                                                                          "gemma3_text"))
    assert ("model.layers.1.input_layernorm.weight" in stored) is (family != "olmo2")
    assert ("model.layers.1.self_attn.k_norm.weight" in stored) is (family in ("qwen3", "olmo2", "gemma3_text"))

    out = save_hf(params, cfg, tmp_path / "ckpt")
    saved = json.loads((out / "config.json").read_text())
    assert saved["model_type"] == MODEL_TYPE.get(family, family)
    tok = tokens(seed=1)
    reloaded = assert_reloads_in_both(model, params, cfg, out, tok)
    with torch.no_grad():
        torch.testing.assert_close(logits(params, forward(params, tok, cfg), cfg), reloaded(tok).logits,
                                   atol=1e-5, rtol=0)


def test_packed_documents_equal_separate_runs(checkpoint):
    family, _, path = checkpoint
    cfg, params = load_hf(path)
    # both longer than the sliding windows; for LongRoPE (phi4) both within its original context (8), since a
    # batch reaching past it switches every token to the long factors, as transformers does (see
    # test_longrope_switches_factors_per_batch_as_transformers)
    lengths = [7, 5] if family == "phi4" else [7, 9]
    docs = [tokens(1, n, seed=i) for i, n in enumerate(lengths)]
    packed = torch.cat(docs, dim=1)
    doc_ids = torch.cat([torch.full((1, n), i) for i, n in enumerate(lengths)], dim=1)
    positions = torch.cat([torch.arange(n)[None] for n in lengths], dim=1)
    with torch.no_grad():
        got = forward(params, packed, cfg, positions=positions, doc_ids=doc_ids)
        alone = torch.cat([forward(params, d, cfg) for d in docs], dim=1)
        mixed = forward(params, packed, cfg)
    torch.testing.assert_close(got, alone, atol=1e-5, rtol=0)
    assert (mixed[:, lengths[0]:] - alone[:, lengths[0]:]).abs().max() > 1e-3  # the mask matters


# bf16 logits agree to a few bf16 steps (2^-7 of the value at the top of a binade): SDPA here and transformers'
# eager kernels round differently. Measured max |diff| / max |logit|: 0.008-0.012 for Llama-style families,
# Qwen3 and OLMo 2; 0.014 Gemma, 0.027 Gemma 2 (its eager soft-capped scores). Allowed: 4 steps, 1/32.
BF16_ATOL_FRACTION = 1 / 32


def test_bf16_and_sharded_checkpoints_match_transformers(checkpoint, tmp_path):
    family, model, path = checkpoint
    tok = tokens(seed=2)
    model.save_pretrained(tmp_path / "sharded", safe_serialization=True, max_shard_size="20KB")
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    half = copy.deepcopy(model).to(torch.bfloat16)
    with torch.no_grad():
        ref, ref16 = model(tok).logits, half(tok).logits
        for directory in (path, tmp_path / "sharded"):
            cfg, params = load_hf(directory)
            torch.testing.assert_close(logits(params, forward(params, tok, cfg), cfg), ref, atol=1e-5, rtol=0)
            _, params16 = load_hf(directory, dtype=torch.bfloat16)
            got16 = logits(params16, forward(params16, tok, cfg), cfg)
            assert got16.dtype == torch.bfloat16
            atol = BF16_ATOL_FRACTION * ref16.float().abs().max().item()
            torch.testing.assert_close(got16.float(), ref16.float(), atol=atol, rtol=0)


@pytest.mark.parametrize("family", ["qwen2", "mistral", "gemma2", "qwen3", "olmo2", "gemma3_text", "phi4", "smollm3"])
def test_greedy_generation_matches_transformers(family):
    model = make_model(family)
    params = {n: t.detach().clone() for n, t in model.state_dict().items()}
    cfg = ModelConfig.from_hf_config(model.config.to_dict(), source=f"{family}/config.json")
    from lowmem.nn.hf import hf_layout as layout

    canon = {}
    for hf_name, parts in layout(cfg).items():
        sizes = [param_shapes(cfg)[n][0] for n in parts]
        canon.update(zip(parts, params[hf_name].split(sizes), strict=True))
    prompt = tokens(2, 5, seed=3)
    with torch.no_grad():
        ref = model.generate(prompt, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
    got = generate(canon, cfg, prompt, max_new_tokens=8)
    assert got == ref[:, 5:].tolist()


def test_sliding_window_changes_generation():
    """The window is honoured in the KV-cache path: generating with it differs from full attention."""
    model = make_model("mistral")
    cfg = ModelConfig.from_hf_config(model.config.to_dict(), source="mistral/config.json")
    params = init_params(cfg, seed=0)
    params = {n: t / (0.02 * math.sqrt(t.shape[1])) if t.ndim == 2 else t for n, t in params.items()}
    full = msgspec.structs.replace(cfg, sliding_window=None)
    prompt = tokens(1, 10, seed=4)
    with torch.no_grad():
        windowed = logits(params, forward(params, prompt, cfg), cfg)[:, -1]
        unwindowed = logits(params, forward(params, prompt, full), full)[:, -1]
    assert (windowed - unwindowed).abs().max() > 1e-3
    assert generate(params, cfg, prompt, max_new_tokens=1) == [windowed.argmax(-1).tolist()]


# ------------------------------------------------------------------------------ biases with LoRA and NF4


def qwen_cfg() -> ModelConfig:
    return msgspec.structs.replace(preset("tiny"), family="qwen2", qkv_bias=True)


def test_bias_adds_to_lora_output():
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(3, 8, generator=g), torch.randn(6, 8, generator=g), torch.randn(6, generator=g)
    a, bb = torch.randn(2, 8, generator=g), torch.randn(6, 2, generator=g)
    got = linear(x, AdaptedWeight(w, a, bb, None, 0.5, 0.0), b)
    torch.testing.assert_close(got, x @ w.T + b + 0.5 * (x @ a.T) @ bb.T)
    torch.testing.assert_close(linear(x, w, b), x @ w.T + b)


def test_qwen2_biases_matter_and_work_with_lora_and_nf4():
    from lowmem.nn.lora import LoraSettings, add_adapters, merge_adapters
    from lowmem.nn.quant import dequantize_nf4, is_nf4, quantize_nf4

    cfg = qwen_cfg()
    params = init_params(cfg, seed=0)
    assert "layers.1.attn.bk" in params and not params["layers.1.attn.bk"].any()  # biases start at zero
    assert count_params(cfg) == sum(t.numel() for t in params.values())
    g = torch.Generator().manual_seed(1)
    for n in params:
        if n.endswith((".bq", ".bk", ".bv")):
            params[n] = torch.randn(params[n].shape, generator=g)
    tok = tokens(1, 8)
    no_bias = {n: torch.zeros_like(t) if n.endswith((".bq", ".bk", ".bv")) else t for n, t in params.items()}
    with torch.no_grad():
        base = forward(params, tok, cfg)
        assert (base - forward(no_bias, tok, cfg)).abs().max() > 1e-3

        settings = LoraSettings(rank=2, alpha=4, targets=("wq", "wk", "wv"))
        adapted = add_adapters(params, cfg, settings, seed=0)
        for n in adapted:
            if n.endswith(".lora_b"):
                adapted[n] = torch.randn(adapted[n].shape, generator=g) * 0.1
        lora_out = forward(adapted, tok, cfg, adapters=settings)
        assert (lora_out - base).abs().max() > 1e-3
        torch.testing.assert_close(lora_out, forward(merge_adapters(adapted, settings), tok, cfg))

        quant = quantize_nf4(params, cfg, targets=("wq", "wo"), scaler_block_size=16)
        assert is_nf4(quant["layers.0.attn.wq"]) and quant["layers.0.attn.bq"].dtype == torch.float32
        assert torch.equal(quant["layers.0.attn.bq"], params["layers.0.attn.bq"])
        q_out = forward(quant, tok, cfg)
        torch.testing.assert_close(q_out, forward(dequantize_nf4(quant), tok, cfg), atol=1e-5, rtol=0)
        q_lora = add_adapters(quant, cfg, settings, seed=0)
        torch.testing.assert_close(forward(q_lora, tok, cfg, adapters=settings), q_out, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------- loss soft-capping


@pytest.mark.parametrize("kind", sorted(CE_IMPLEMENTATIONS))
def test_softcapped_losses_match_reference(kind):
    g = torch.Generator().manual_seed(0)
    h = (3 * torch.randn(10, 16, generator=g)).requires_grad_(True)
    w = torch.randn(40, 16, generator=g).requires_grad_(True)
    y = torch.randint(0, 40, (10,), generator=g)
    y[2] = -100
    capped = torch.tanh((h @ w.T) / 5.0) * 5.0
    ref = F.cross_entropy(capped, y, reduction="sum")
    ref_grads = torch.autograd.grad(ref, (h, w))
    loss, n = CE_IMPLEMENTATIONS[kind](h, w, y, softcap=5.0)
    grads = torch.autograd.grad(loss, (h, w))
    assert int(n) == 9
    torch.testing.assert_close(loss, ref, atol=1e-4, rtol=1e-5)
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert (loss - CE_IMPLEMENTATIONS[kind](h, w, y)[0]).abs() > 1.0  # the cap changes the loss


# ----------------------------------------------------------------------------------------- configs


PUBLISHED_PARAM_COUNTS = {
    "qwen2.5-0.5b": 494_032_768,
    "qwen2.5-7b": 7_615_616_512,
    "mistral-7b-v0.3": 7_248_023_552,
    "gemma-2b": 2_506_172_416,
    "gemma2-2b": 2_614_341_888,
    "phi3-mini": 3_821_079_552,
    # Qwen3 model cards give non-embedding counts (0.44B, 1.4B, 3.6B, 6.95B), checked below; these totals are
    # transformers' own count of the preset's config (test_qk_norm_presets_count_as_transformers).
    "qwen3-0.6b": 596_049_920,
    "qwen3-1.7b": 1_720_574_976,
    "qwen3-4b": 4_022_468_096,
    "qwen3-8b": 8_190_735_360,
    "olmo2-1b": 1_484_916_736,  # "OLMo 2 1B": 1.48B
    # transformers' count of each preset's config (test_qk_norm_presets_count_as_transformers); model cards:
    # Gemma 3 1B 999,885,952 (the text tower of 4B: 3.88B), Phi-4-mini 3.8B, SmolLM3 3B (3.08B)
    "gemma3-1b": 999_885_952,
    "gemma3-4b": 3_880_263_168,
    "phi4-mini": 3_836_021_760,
    "smollm3-3b": 3_075_098_624,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAM_COUNTS))
def test_family_presets_have_published_param_counts(name):
    cfg = preset(name)
    assert count_params(cfg) == PUBLISHED_PARAM_COUNTS[name]
    assert count_params(cfg) == sum(math.prod(s) for s in param_shapes(cfg).values())
    assert ModelConfig.from_hf_config(cfg.to_hf_config(), source="x/config.json") == cfg


@pytest.mark.parametrize(("name", "non_embedding_billions"),
                         [("qwen3-0.6b", 0.44), ("qwen3-1.7b", 1.4), ("qwen3-4b", 3.6), ("qwen3-8b", 6.95)])
def test_qwen3_presets_have_the_model_cards_non_embedding_counts(name, non_embedding_billions):
    cfg = preset(name)
    embedding = cfg.vocab_size * cfg.dim * (1 if cfg.tie_embeddings else 2)
    assert round((count_params(cfg) - embedding) / 1e9, 2 if non_embedding_billions < 1 or name == "qwen3-8b"
                 else 1) == non_embedding_billions


@pytest.mark.parametrize("name", ["qwen3-0.6b", "qwen3-8b", "olmo2-1b", "gemma3-1b", "gemma3-4b", "phi4-mini",
                                  "smollm3-3b"])
def test_qk_norm_presets_count_as_transformers(name):
    cfg = preset(name)
    config = transformers.AutoConfig.for_model(**cfg.to_hf_config())
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    assert count_params(cfg) == sum(p.numel() for p in model.parameters())
    hf_shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    assert {hf: (sum(param_shapes(cfg)[n][0] for n in parts), *param_shapes(cfg)[parts[0]][1:])
            for hf, parts in hf_layout(cfg).items()} == hf_shapes


def test_family_preset_flags():
    assert preset("qwen2.5-0.5b").qkv_bias and preset("qwen2.5-0.5b").tie_embeddings
    g2 = preset("gemma2-2b")
    assert (g2.head_dim, g2.sliding_window, g2.attn_logit_softcap, g2.final_logit_softcap) == (256, 4096, 50.0, 30.0)
    assert preset("gemma-2b").head_dim == 256 and preset("phi3-mini").sliding_window == 2047
    assert [preset(f"qwen3-{s}").head_dim for s in ("0.6b", "1.7b", "4b", "8b")] == [128] * 4
    assert [preset(f"qwen3-{s}").tie_embeddings for s in ("0.6b", "1.7b", "4b", "8b")] == [True] * 3 + [False]
    assert preset("olmo2-1b").qk_norm == "projection" and not preset("olmo2-1b").pre_norms


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"model_type": "gemma3n"}, ["model_type", "'gemma3n'", "'qwen2'", "'phi3'", "closest name: 'gemma3'"]),
        ({"model_type": "mixtral"}, ["model_type", "'mixtral'", "closest name: 'mistral'"]),
        ({"model_type": "mistral", "attention_bias": True}, ["attention_bias", "True", "false"]),
        ({"model_type": "llama", "rope_scaling": {"type": "longrope", "short_factor": [1.0], "long_factor": [1.0]}},
         ["rope_type", "'longrope'", "'llama'"]),
        ({"model_type": "phi3", "original_max_position_embeddings": 8,
          "rope_scaling": {"type": "longrope", "short_factor": [1.0], "long_factor": [1.0]}},
         ["1 longrope factors", "rotary_dim 16"]),
        ({"model_type": "phi3", "rope_scaling": {"type": "longrope", "short_factor": [1.0] * 8, "long_factor": [1.0] * 8}},
         ["original_max_position_embeddings", "None"]),
        ({"model_type": "mistral", "partial_rotary_factor": 0.5}, ["partial_rotary_factor", "0.5", "1.0"]),
        ({"model_type": "qwen2", "rope_scaling": {"rope_type": "linear", "factor": 2.0}}, ["rope_type", "'linear'"]),
        ({"model_type": "gemma3_text", "attn_logit_softcapping": 50.0}, ["attn_logit_softcapping", "50.0"]),
        ({"model_type": "gemma3_text", "use_bidirectional_attention": True}, ["use_bidirectional_attention"]),
        ({"model_type": "gemma3_text", "rope_parameters": {"sliding_attention": {"rope_type": "linear", "factor": 2.0},
                                                           "full_attention": {"rope_type": "default"}}},
         ["rope_parameters", "sliding_attention"]),
        ({"model_type": "gemma3_text", "layer_types": ["sliding_attention"]}, ["layer_types", "2 entries"]),
        ({"model_type": "smollm3", "no_rope_layers": [1]}, ["no_rope_layers", "at least 2"]),
        ({"model_type": "gemma3", "text_config": None}, ["text_config"]),
        ({"model_type": "gemma", "hidden_activation": "relu"}, ["hidden_activation", "'relu'", "gelu_pytorch_tanh"]),
        ({"model_type": "gemma2", "hidden_act": "gelu", "query_pre_attn_scalar": 16, "sliding_window": 4,
          "layer_types": ["full_attention", "sliding_attention"]}, ["layer_types", "sliding_attention"]),
        ({"model_type": "gemma2", "hidden_act": "gelu"}, ["query_pre_attn_scalar"]),
        ({"model_type": "qwen2", "use_sliding_window": True, "max_window_layers": 0, "sliding_window": 8},
         ["use_sliding_window", "True"]),
        ({"model_type": "mistral", "hidden_act": "gelu"}, ["hidden_act", "'gelu'", "'silu'"]),
        ({"model_type": "qwen3", "head_dim": 16, "attention_bias": True}, ["attention_bias", "True", "false"]),
        ({"model_type": "qwen3", "head_dim": 16, "use_sliding_window": True, "max_window_layers": 1,
          "sliding_window": 8}, ["use_sliding_window", "True"]),
        ({"model_type": "qwen3", "head_dim": 16, "max_window_layers": 1, "sliding_window": 8},
         ["sliding_window", "8", "max_window_layers"]),
        ({"model_type": "qwen3", "head_dim": 16, "layer_types": ["full_attention", "sliding_attention"],
          "sliding_window": 8}, ["layer_types", "sliding_attention"]),
        ({"model_type": "qwen3", "head_dim": None}, ["head_dim", "'qwen3'"]),
        ({"model_type": "olmo2", "attention_bias": True}, ["attention_bias", "True", "false"]),
        ({"model_type": "olmo2", "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, ["rope_type", "'yarn'"]),
    ],
)
def test_unsupported_family_options_name_file_key_and_value(change, words):
    d = preset("tiny").to_hf_config() | change
    with pytest.raises(ValueError) as e:
        ModelConfig.from_hf_config(d, source="ckpt/config.json")
    assert "ckpt/config.json" in str(e.value)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


# ------------------------------------------------------------------------------ Qwen3 and OLMo 2 q/k norms


@pytest.mark.parametrize(("family", "tied"), [("qwen3", False), ("qwen3", True), ("olmo2", False)])
def test_param_count_equals_transformers_and_includes_qk_norms(family, tied):
    model = make_model(family, tie_word_embeddings=tied)
    cfg = ModelConfig.from_hf_config(model.config.to_dict(), source=f"{family}/config.json")
    assert cfg.tie_embeddings is tied
    assert count_params(cfg) == sum(p.numel() for p in model.parameters())
    shapes = param_shapes(cfg)
    assert count_params(cfg) == sum(math.prod(s) for s in shapes.values())
    q_dim, kv_dim = (16, 16) if family == "qwen3" else (4 * 8, 2 * 8)  # per head (16) / whole projection
    assert (shapes["layers.1.attn.q_norm"], shapes["layers.1.attn.k_norm"]) == ((q_dim,), (kv_dim,))


def test_tied_qwen3_matches_transformers(tmp_path):
    model = make_model("qwen3", tie_word_embeddings=True)
    model.save_pretrained(tmp_path, safe_serialization=True)
    cfg, params = load_hf(tmp_path)
    assert cfg.tie_embeddings and "output" not in params
    tok = tokens(seed=5)
    with torch.no_grad():
        torch.testing.assert_close(logits(params, forward(params, tok, cfg), cfg), model(tok).logits,
                                   atol=1e-5, rtol=0)


def test_olmo2_norm_and_rope_round_as_transformers_in_bf16():
    """OLMo 2 scales its norms and rotates q, k in fp32 before rounding: bit-equal to its HF modules in bf16, and
    not to Llama's rounding (cast first), which the whole-model tolerance could not tell apart."""
    from transformers.models.olmo2.modeling_olmo2 import Olmo2RMSNorm, apply_rotary_pos_emb

    from lowmem.nn.llama import apply_rope, rms_norm, rope_cache

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 12, 16, generator=g).bfloat16()
    norm = Olmo2RMSNorm(16, eps=1e-6).bfloat16()
    with torch.no_grad():
        norm.weight.copy_(0.5 + 0.3 * torch.randn(16, generator=g))
        ref = norm(x)
    assert torch.equal(rms_norm(x, norm.weight, 1e-6, scale_fp32=True), ref)
    assert not torch.equal(rms_norm(x, norm.weight, 1e-6), ref)

    cfg = msgspec.structs.replace(preset("tiny"), dim=64, n_heads=4)  # head_dim 16
    cos, sin = rope_cache(cfg, (torch.arange(12) * 37).expand(2, 12))  # fp32, as Olmo2RotaryEmbedding's
    ref_q, _ = apply_rotary_pos_emb(x, x, cos, sin)
    assert torch.equal(apply_rope(x, cos, sin, fp32=True), ref_q)
    assert not torch.equal(apply_rope(x, cos, sin), ref_q)


@pytest.mark.parametrize("family", ["qwen3", "olmo2", "gemma3_text", "phi4", "smollm3"])
def test_lora_adapter_loads_in_peft_with_the_same_logits(family, tmp_path):
    from lowmem.nn.lora import merge_adapters

    model = make_model(family)
    model.save_pretrained(tmp_path / "base", safe_serialization=True)
    cfg, params = load_hf(tmp_path / "base")
    tok = tokens(seed=7)
    adapted, settings, got = assert_lora_loads_in_peft(model, params, cfg, ("wq", "wk", "wv", "wo", "w1", "w2", "w3"),
                                                       tmp_path / "adapter", tok)
    # what `lowmem export --merge` writes: the merged weights in the family's layout, which transformers loads
    merged = save_hf(merge_adapters(adapted, settings), cfg, tmp_path / "merged")
    with torch.no_grad():
        reloaded = transformers.AutoModelForCausalLM.from_pretrained(merged, attn_implementation="eager").eval()
        torch.testing.assert_close(reloaded(tok).logits, got, atol=1e-5, rtol=0)


def test_qk_norms_are_not_lora_targets_and_are_ones_at_init():
    cfg = preset("qwen3-0.6b")
    small = msgspec.structs.replace(cfg, vocab_size=64, dim=32, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=48,
                                    head_dim_override=16)
    params = init_params(small, seed=0)
    assert torch.equal(params["layers.0.attn.q_norm"], torch.ones(16))
    from lowmem.nn.lora import LoraSettings, add_adapters

    adapted = add_adapters(params, small, LoraSettings(rank=2, alpha=4, targets=("wq", "wk")), seed=0)
    assert not any(n.startswith("layers.0.attn.q_norm.") for n in adapted)


# ------------------------------------------------------------------- Gemma 3, Phi-4-mini, SmolLM3 specifics


def test_longrope_switches_factors_per_batch_as_transformers():
    """Within the original context (8) the short factors apply, beyond it the long ones, to the whole batch."""
    model = make_model("phi4")
    cfg = ModelConfig.from_hf_config(model.config.to_dict(), source="phi4/config.json")
    params = _canonical(model, cfg)
    tok = tokens(seed=8)
    with torch.no_grad():
        for n in (6, T):
            torch.testing.assert_close(logits(params, forward(params, tok[:, :n], cfg), cfg), model(tok[:, :n]).logits,
                                       atol=1e-5, rtol=0)
        short = logits(params, forward(params, tok[:, :6], cfg), cfg)
        long = logits(params, forward(params, tok, cfg), cfg)[:, :6]
    assert (short - long).abs().max() > 1e-2  # the same six tokens, turned by the other factors


def _canonical(model, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The HF model's weights under canonical names (fused Phi-3 tensors split)."""
    state = {n: t.detach().clone() for n, t in model.state_dict().items()}
    canon = {}
    for hf_name, parts in hf_layout(cfg).items():
        sizes = [param_shapes(cfg)[n][0] for n in parts]
        canon.update(zip(parts, state[hf_name].split(sizes), strict=True))
    return canon


@pytest.mark.parametrize("n_layers", [6, 13])
def test_gemma3_layer_pattern_is_read_as_transformers(n_layers):
    """The 5:1 pattern from transformers' layer_types (5.x) and from sliding_window_pattern alone (4.x hub
    configs), with the local RoPE base on the sliding layers only."""
    config = transformers.Gemma3TextConfig(**COMMON | {"num_hidden_layers": n_layers, "head_dim": 16,
                                                       "rope_local_base_freq": 50.0})
    d = config.to_dict()
    sliding = tuple(i for i, t in enumerate(config.layer_types) if t == "sliding_attention")
    assert len(sliding) == n_layers - n_layers // 6
    old = {k: v for k, v in d.items() if k not in ("layer_types", "rope_parameters")} | {
        "sliding_window_pattern": 6, "rope_theta": 1000.0, "rope_local_base_freq": 50.0}
    for layout in (d, old):
        cfg = ModelConfig.from_hf_config(layout, source="gemma3/config.json")
        assert cfg.sliding_layers == sliding and cfg.rope_local_theta == 50.0
        assert [cfg.layer_rope(i) for i in range(n_layers)] == ["local" if i in sliding else "global"
                                                               for i in range(n_layers)]
    assert ModelConfig.from_hf_config(cfg.to_hf_config(), source="x") == cfg


def test_gemma3_six_layers_match_transformers_in_fp32():
    """The whole 5:1 pattern in one model (fp32 only; see FAMILIES): five local layers, one global."""
    model = make_model("gemma3_text", num_hidden_layers=6, layer_types=None)
    cfg = ModelConfig.from_hf_config(model.config.to_dict(), source="gemma3/config.json")
    assert cfg.sliding_layers == (0, 1, 2, 3, 4)
    params = _canonical(model, cfg)
    tok = tokens(seed=9)
    with torch.no_grad():
        ref = model(tok).logits
        got = logits(params, forward(params, tok, cfg), cfg)
        one_rope = msgspec.structs.replace(cfg, rope_local_theta=None)
        unlocal = logits(params, forward(params, tok, one_rope), one_rope)
    # 1.01e-5 measured, as transformers' own sdpa and eager kernels differ here (logits up to 5.4)
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=0)
    assert (unlocal - ref).abs().max() > 1e-2  # the local RoPE base matters


def _tiny_gemma3_multimodal():
    text = COMMON | FAMILIES["gemma3_text"][2]
    vision = transformers.SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, image_size=28, patch_size=14)
    config = transformers.Gemma3Config(text_config=text, vision_config=vision.to_dict(), mm_tokens_per_image=4)
    torch.manual_seed(0)
    return randomize_(transformers.Gemma3ForConditionalGeneration(config).eval(), vector_center=0.5,
                      vector_spread=0.3)


def test_multimodal_gemma3_loads_its_text_tower_and_says_what_it_leaves_out(tmp_path, caplog):
    model = _tiny_gemma3_multimodal()
    model.save_pretrained(tmp_path / "mm", safe_serialization=True)
    with safe_open(str(tmp_path / "mm" / "model.safetensors"), framework="pt") as f:
        stored = set(f.keys())
    assert "language_model.model.layers.0.self_attn.q_norm.weight" in stored  # what transformers writes
    with caplog.at_level("WARNING", logger="lowmem.nn.hf"):
        cfg, params = load_hf(tmp_path / "mm")
    assert cfg.family == "gemma3_text" and cfg.sliding_layers == (0,) and cfg.tie_embeddings
    note = " ".join(r.getMessage() for r in caplog.records)
    assert "text tower" in note and "vision_tower.*" in note and "multi_modal_projector.*" in note
    tok = tokens(seed=10)
    with torch.no_grad():
        ref = model(input_ids=tok).logits  # no image: the text tower alone
        torch.testing.assert_close(logits(params, forward(params, tok, cfg), cfg), ref, atol=1e-5, rtol=0)
        out = save_hf(params, cfg, tmp_path / "text")
        text_only = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
        assert type(text_only).__name__ == "Gemma3ForCausalLM"
        torch.testing.assert_close(text_only(tok).logits, ref, atol=1e-5, rtol=0)


def test_family_defaults_are_transformers_defaults():
    """Keys a sparse hub config leaves out (Gemma 3's text_config) take the values transformers would."""
    from lowmem.nn.config import _FAMILY_DEFAULTS

    for model_type, cls in (("gemma3_text", "Gemma3TextConfig"), ("smollm3", "SmolLM3Config")):
        ref = getattr(transformers, cls)().to_dict()
        rope = ref["rope_parameters"].get("full_attention", ref["rope_parameters"])
        for key, value in _FAMILY_DEFAULTS[model_type].items():
            assert (rope["rope_theta"] if key == "rope_theta" else ref[key]) == value, (model_type, key)
    sparse = {"model_type": "gemma3", "text_config": {"hidden_size": 2560, "intermediate_size": 10240,
              "model_type": "gemma3_text", "num_hidden_layers": 34, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
              "sliding_window": 1024}}  # google/gemma-3-4b-it's text_config, all of it
    assert ModelConfig.from_hf_config(sparse, source="gemma-3-4b/config.json") == msgspec.structs.replace(
        preset("gemma3-4b"), max_seq_len=131072)
