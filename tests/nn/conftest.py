"""Shared builders for tests/nn: tiny transformers Llama models used as the parity oracle."""

from __future__ import annotations

import math

import pytest
import torch

LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    # Small, so that the smoothing band covers some of head_dim 16's frequencies.
    "original_max_position_embeddings": 16,
}

# name → LlamaConfig kwargs on top of the common tiny ones. All use GQA (4 query heads, 2 kv heads).
HF_VARIANTS = {
    "gqa": {},
    "tied": {"tie_word_embeddings": True},
    "llama3_rope": {"rope_theta": 500000.0, "rope_scaling": LLAMA3_SCALING},
}


def make_hf_model(variant: str, seed: int = 0):
    """A tiny random LlamaForCausalLM in eval mode, with weights large enough to make attention peaked.

    transformers' init (std 0.02, norms 1) leaves attention near uniform and norms trivial, which would
    hide RoPE and norm-loading mistakes; so every matrix is redrawn with std 1/sqrt(fan_in) and every
    norm weight perturbed around 1.
    """
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        rms_norm_eps=1e-5, attn_implementation="eager", **HF_VARIANTS[variant],
    )
    torch.manual_seed(seed)
    return randomize_(transformers.LlamaForCausalLM(config).eval(), vector_center=1.0, vector_spread=0.2)


def randomize_(model, vector_center: float, vector_spread: float):
    """Redraw a tiny HF model's weights in place (global RNG): matrices ~ N(0, 1/fan_in), vectors (norms,
    biases) ~ center + spread * N(0, 1), so attention is not uniform and norm/bias bugs show. Returns it."""
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0.0, 1.0 / math.sqrt(p.shape[1]))
            else:
                p.copy_(vector_center + vector_spread * torch.randn_like(p))
    return model


@pytest.fixture(scope="session", params=sorted(HF_VARIANTS))
def hf_checkpoint(request, tmp_path_factory):
    """(variant, HF model, directory of its save_pretrained safetensors checkpoint)."""
    model = make_hf_model(request.param)
    path = tmp_path_factory.mktemp(f"hf-{request.param}")
    model.save_pretrained(path, safe_serialization=True)
    return request.param, model, path


@pytest.fixture(scope="session")
def hf_model_factory():
    """`make_hf_model` as a fixture, for tests that build their own oracle."""
    return make_hf_model


@pytest.fixture(scope="session")
def llama3_scaling():
    return dict(LLAMA3_SCALING)


def assert_reloads_in_both(model, params: dict, cfg, out, tok: torch.Tensor):
    """A checkpoint `save_hf` wrote at `out`: lowmem reads back the same config and tensors, and transformers loads
    it as `model`'s class with `model`'s logits on `tok` (1e-5). Returns transformers' reloaded model."""
    import transformers

    from lowmem.nn.hf import load_hf

    cfg2, params2 = load_hf(out)
    assert cfg2 == cfg and all(torch.equal(params2[n], params[n]) for n in params)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    assert type(reloaded) is type(model)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(tok).logits, model(tok).logits, atol=1e-5, rtol=0)
    return reloaded


def assert_lora_loads_in_peft(model, params: dict, cfg, targets: tuple[str, ...], out, tok: torch.Tensor):
    """LoRA adapters on `targets` with random non-zero B (so they act): `save_peft` at `out` loads in peft over a
    copy of `model` to lowmem's logits on `tok` (1e-5), and `load_peft` gives back the same settings and tensors.
    Returns (adapted params, settings, lowmem's logits)."""
    import copy

    peft = pytest.importorskip("peft")
    from lowmem.nn.llama import forward, logits
    from lowmem.nn.lora import LoraSettings, add_adapters, trainable_names
    from lowmem.nn.peft_io import load_peft, save_peft

    settings = LoraSettings(rank=4, alpha=8.0, targets=targets)
    adapted = add_adapters(params, cfg, settings, seed=0)
    g = torch.Generator().manual_seed(1)
    for n in trainable_names(adapted):
        if n.endswith(".lora_b"):
            adapted[n] = 0.3 * torch.randn(adapted[n].shape, generator=g)
    with torch.no_grad():
        got = logits(adapted, forward(adapted, tok, cfg, adapters=settings), cfg)
        assert (got - logits(params, forward(params, tok, cfg), cfg)).abs().max() > 0.1  # the adapters act
        saved = save_peft(adapted, cfg, settings, out)
        ref = peft.PeftModel.from_pretrained(copy.deepcopy(model), saved).eval()(tok).logits
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    loaded_settings, loaded = load_peft(saved, params, cfg)
    assert loaded_settings == settings and all(torch.equal(loaded[n], adapted[n]) for n in trainable_names(adapted))
    return adapted, settings, got
