"""PEFT export of Phi-3 adapters onto its fused qkv_proj / gate_up_proj, checked with peft on transformers."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from tests.nn.conftest import randomize_

from lowmem.nn.hf import load_hf
from lowmem.nn.llama import forward, logits
from lowmem.nn.lora import LoraSettings, add_adapters, trainable_names
from lowmem.nn.peft_io import ADAPTER_CONFIG_FILE, load_peft, save_peft

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def phi3(tmp_path_factory):
    """(transformers Phi-3, lowmem cfg, lowmem params) of one tiny random checkpoint (GQA, sliding window)."""
    config = transformers.Phi3Config(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, sliding_window=5,
        attn_implementation="eager")
    torch.manual_seed(0)
    model = randomize_(transformers.Phi3ForCausalLM(config).eval(), vector_center=0.5, vector_spread=0.3)
    path = tmp_path_factory.mktemp("phi3")
    model.save_pretrained(path, safe_serialization=True)
    cfg, params = load_hf(path)
    return model, cfg, params


def trained(params, cfg, settings):
    """Adapters moved off their init (B random, so they act; DoRA magnitudes scaled), like after training."""
    out = add_adapters(params, cfg, settings, seed=0)
    gen = torch.Generator().manual_seed(1)
    for n in trainable_names(out):
        if n.endswith(".lora_b"):
            out[n] = 0.3 * torch.randn(out[n].shape, generator=gen)
        elif n.endswith(".dora_m"):
            out[n] = out[n] * (1 + 0.2 * (2 * torch.rand(out[n].shape, generator=gen) - 1))
    return out


TOKENS = torch.randint(1, 64, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(("targets", "dora"), [
    (("wq", "wv", "w3"), False),  # parts of both fused modules, others left as zero blocks
    (("wq", "wk", "wv", "wo", "w1", "w2", "w3"), False),
    (("wq", "wk", "wv", "w1", "w3"), True),  # DoRA: every part of each fused module
], ids=["lora-some-parts", "lora-all", "dora-whole-modules"])
def test_phi3_adapter_loads_in_peft_with_the_same_logits(phi3, tmp_path, targets, dora):
    model, cfg, params = phi3
    settings = LoraSettings(rank=4, alpha=12.0, targets=targets, dora=dora)
    adapted = trained(params, cfg, settings)
    with torch.no_grad():
        got = logits(adapted, forward(adapted, TOKENS, cfg, adapters=settings), cfg)
        base = logits(params, forward(params, TOKENS, cfg), cfg)
    assert (got - base).abs().max() > 0.1  # the adapters do something

    out = save_peft(adapted, cfg, settings, tmp_path / "adapter")
    config = json.loads((out / ADAPTER_CONFIG_FILE).read_text())
    assert "qkv_proj" in config["target_modules"] and "q_proj" not in config["target_modules"]
    assert config["rank_pattern"]["qkv_proj"] == 12 and config["alpha_pattern"]["qkv_proj"] == 36.0
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(model), out).eval()
    qkv = peft_model.base_model.model.model.layers[0].self_attn.qkv_proj
    assert qkv.r["default"] == 12 and qkv.scaling["default"] == settings.scale
    with torch.no_grad():
        ref = peft_model(TOKENS).logits
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)

    # and back: the fused blocks split into the parts lowmem trained, zero blocks dropped
    loaded_settings, loaded = load_peft(out, params, cfg)
    assert loaded_settings == settings
    assert set(trainable_names(loaded)) == set(trainable_names(adapted))
    assert all(torch.equal(loaded[n], adapted[n]) for n in trainable_names(adapted))


def test_dora_on_part_of_a_fused_module_is_refused_with_the_reason(phi3, tmp_path):
    _, cfg, params = phi3
    settings = LoraSettings(rank=4, alpha=8.0, targets=("wq", "wv"), dora=True)
    with pytest.raises(ValueError, match=r"DoRA .* fused qkv_proj .* magnitude"):
        save_peft(add_adapters(params, cfg, settings, seed=0), cfg, settings, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()


def test_fused_adapter_peft_trained_as_a_whole_is_refused(phi3, tmp_path):
    """A dense B (PEFT's own training on qkv_proj) mixes q, k and v ranks: it cannot be split exactly."""
    model, cfg, params = phi3
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["qkv_proj"], rank_pattern={"qkv_proj": 6},
                             alpha_pattern={"qkv_proj": 12})
    peft_model = peft.get_peft_model(copy.deepcopy(model), config)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_()
    peft_model.save_pretrained(tmp_path / "adapter")
    with pytest.raises(ValueError, match="not block diagonal"):
        load_peft(tmp_path / "adapter", params, cfg)
