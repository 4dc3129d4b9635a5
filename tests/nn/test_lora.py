"""LoRA / DoRA: params → params transforms, parity with peft on a tiny transformers Llama, PEFT I/O."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.utils.checkpoint

from lowmem.nn.hf import load_hf
from lowmem.nn.llama import forward, logits
from lowmem.nn.lora import LoraSettings, add_adapters, merge_adapters, trainable_names
from lowmem.nn.peft_io import ADAPTER_CONFIG_FILE, load_peft, save_peft, to_peft_name

peft = pytest.importorskip("peft")

TARGETS = ("wq", "wv", "wo", "w1", "w2")  # attention and MLP, in and out projections
HF_TARGETS = ["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"]


def settings_for(dora: bool, targets: tuple[str, ...] = TARGETS) -> LoraSettings:
    # dropout > 0 so that every evaluation-mode comparison also checks that dropout stays off there
    return LoraSettings(rank=4, alpha=8.0, targets=targets, dropout=0.1, dora=dora)


@pytest.fixture(scope="module")
def base(tmp_path_factory, hf_model_factory):
    """(HF model, lowmem cfg, lowmem params) holding the same tiny Llama."""
    model = hf_model_factory("gqa")
    path = tmp_path_factory.mktemp("lora-base")
    model.save_pretrained(path, safe_serialization=True)
    cfg, params = load_hf(path)
    return model, cfg, params


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))


def lowmem_logits(params, cfg, tokens, settings=None, **kw):
    return logits(params, forward(params, tokens, cfg, adapters=settings, **kw), cfg)


def perturbed(params, seed: int = 1):
    """Adapters moved off their initial values: B random (else the adapter is a no-op), m scaled ±20%."""
    gen = torch.Generator().manual_seed(seed)
    out = dict(params)
    for n in trainable_names(params):
        t = params[n]
        if n.endswith(".lora_b"):
            out[n] = 0.2 * torch.randn(t.shape, generator=gen)
        elif n.endswith(".dora_m"):
            out[n] = t * (1 + 0.2 * (2 * torch.rand(t.shape, generator=gen) - 1))
        else:
            out[n] = t + 0.05 * torch.randn(t.shape, generator=gen)
    return out


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_fresh_adapters_leave_logits_unchanged(base, tokens, dora):
    _, cfg, params = base
    settings = settings_for(dora)
    adapted = add_adapters(params, cfg, settings, seed=0)
    names = trainable_names(adapted)
    assert len(names) == cfg.n_layers * len(TARGETS) * (3 if dora else 2)
    assert all(adapted[n].abs().sum() > 0 for n in names if n.endswith(".lora_a"))  # A is drawn, not zero
    assert set(adapted) - set(names) == set(params)  # base untouched and still there
    ref = lowmem_logits(params, cfg, tokens)
    torch.testing.assert_close(lowmem_logits(adapted, cfg, tokens, settings), ref, atol=1e-6, rtol=0)


def test_adapters_are_deterministic_in_seed(base):
    _, cfg, params = base
    a = add_adapters(params, cfg, settings_for(False), seed=0)
    b = add_adapters(params, cfg, settings_for(False), seed=0)
    c = add_adapters(params, cfg, settings_for(False), seed=1)
    n = "layers.1.mlp.w2.lora_a"
    assert torch.equal(a[n], b[n]) and not torch.equal(a[n], c[n])
    bound = 1 / params["layers.1.mlp.w2"].shape[1] ** 0.5  # kaiming-uniform(a=sqrt(5)) = U(±1/sqrt(in))
    assert a[n].abs().max() <= bound and a[n].abs().max() > 0.8 * bound


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_logits_match_peft(base, tokens, tmp_path, dora):
    model, cfg, params = base
    settings = settings_for(dora)
    adapted = perturbed(add_adapters(params, cfg, settings, seed=0))
    got = lowmem_logits(adapted, cfg, tokens, settings)
    assert (got - lowmem_logits(params, cfg, tokens)).abs().max() > 0.1  # the adapters do something

    save_peft(adapted, cfg, settings, tmp_path / "adapter")
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "adapter").eval()
    with torch.no_grad():
        ref = peft_model(tokens).logits
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_training_dropout_matches_peft(base, tokens, tmp_path, dora):
    # Both draw one dropout mask per adapted linear, in the same order (q k v o, gate up down), from the
    # global generator; so with the same seed the masks and hence the outputs agree.
    model, cfg, params = base
    settings = LoraSettings(rank=4, alpha=8.0, targets=TARGETS, dropout=0.3, dora=dora)
    adapted = perturbed(add_adapters(params, cfg, settings, seed=0))
    save_peft(adapted, cfg, settings, tmp_path / "adapter")
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "adapter").train()
    torch.manual_seed(0)
    with torch.no_grad():
        ref = peft_model(tokens).logits
    torch.manual_seed(0)
    got = lowmem_logits(adapted, cfg, tokens, settings, training=True)
    assert (got - lowmem_logits(adapted, cfg, tokens, settings)).abs().max() > 1e-2  # dropout did act
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_merge_is_exact(base, tokens, dora):
    _, cfg, params = base
    settings = settings_for(dora)
    adapted = perturbed(add_adapters(params, cfg, settings, seed=0))
    merged = merge_adapters(adapted, settings)
    assert set(merged) == set(params)
    assert not torch.equal(merged["layers.0.mlp.w2"], params["layers.0.mlp.w2"])
    assert torch.equal(merged["layers.0.attn.wk"], params["layers.0.attn.wk"])  # not a target
    want = lowmem_logits(adapted, cfg, tokens, settings)
    torch.testing.assert_close(lowmem_logits(merged, cfg, tokens), want, atol=1e-5, rtol=0)


def _checkpointed(block_fn, *args):
    return torch.utils.checkpoint.checkpoint(block_fn, *args, use_reentrant=False)


@pytest.mark.parametrize("run_block", [None, _checkpointed], ids=["plain", "checkpointed"])
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_gradients_reach_only_adapters_and_match_peft(base, tokens, tmp_path, dora, run_block):
    model, cfg, params = base
    settings = LoraSettings(rank=4, alpha=8.0, targets=TARGETS, dora=dora)  # no dropout: same function
    adapted = perturbed(add_adapters(params, cfg, settings, seed=0))
    names = trainable_names(adapted)
    leaves = {n: t.detach().clone().requires_grad_(n in names) for n, t in adapted.items()}
    out = lowmem_logits(leaves, cfg, tokens, settings, run_block=run_block, training=True)
    out.square().mean().backward()
    assert all(leaves[n].grad is None for n in params)
    assert all(leaves[n].grad is not None and leaves[n].grad.abs().sum() > 0 for n in names)

    save_peft(adapted, cfg, settings, tmp_path / "adapter")
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "adapter", is_trainable=True)
    peft_model(tokens).logits.square().mean().backward()
    peft_grads = {n.replace(".default", ""): p.grad
                  for n, p in peft_model.named_parameters() if p.requires_grad}
    assert len(peft_grads) == len(names)
    for n in names:
        peft_name = _peft_param_name(n)
        torch.testing.assert_close(leaves[n].grad, peft_grads[peft_name], atol=1e-5, rtol=1e-4)


def _peft_param_name(name: str) -> str:
    # the file stores `...lora_magnitude_vector`; the module parameter is `...lora_magnitude_vector.weight`
    n = to_peft_name(name)
    return n + ".weight" if n.endswith("lora_magnitude_vector") else n


def test_dropout_only_in_training(base, tokens):
    _, cfg, params = base
    settings = LoraSettings(rank=4, alpha=8.0, targets=TARGETS, dropout=0.5)
    adapted = perturbed(add_adapters(params, cfg, settings, seed=0))
    no_dropout = LoraSettings(rank=4, alpha=8.0, targets=TARGETS)
    eval_logits = lowmem_logits(adapted, cfg, tokens, settings)
    assert torch.equal(eval_logits, lowmem_logits(adapted, cfg, tokens, no_dropout, training=True))
    torch.manual_seed(0)
    train_a = lowmem_logits(adapted, cfg, tokens, settings, training=True)
    torch.manual_seed(0)
    train_b = lowmem_logits(adapted, cfg, tokens, settings, training=True)
    assert torch.equal(train_a, train_b)
    assert (train_a - eval_logits).abs().max() > 1e-2


def test_forward_refuses_adapters_without_settings(base, tokens):
    _, cfg, params = base
    adapted = add_adapters(params, cfg, settings_for(False), seed=0)
    with pytest.raises(ValueError, match="adapters=None"):
        forward(adapted, tokens, cfg)


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_save_load_roundtrip(base, tmp_path, dora):
    _, cfg, params = base
    settings = settings_for(dora, targets=("w3", "wk"))
    adapted = perturbed(add_adapters(params, cfg, settings, seed=0))
    out = save_peft(adapted, cfg, settings, tmp_path / "adapter")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no temporary left behind
    config = json.loads((out / ADAPTER_CONFIG_FILE).read_text())
    assert config["target_modules"] == ["k_proj", "up_proj"] and config["use_dora"] is dora
    assert config["task_type"] == "CAUSAL_LM" and config["r"] == 4 and config["lora_alpha"] == 8.0
    loaded_settings, loaded = load_peft(out, params, cfg)
    assert loaded_settings == LoraSettings(rank=4, alpha=8.0, targets=("wk", "w3"), dropout=0.1, dora=dora)
    assert set(loaded) == set(adapted)
    assert all(torch.equal(loaded[n], adapted[n]) for n in adapted)
    with pytest.raises(FileExistsError):
        save_peft(adapted, cfg, settings, out)


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_peft_made_adapter_loads_and_matches(base, tokens, tmp_path, dora):
    model, cfg, params = base
    torch.manual_seed(3)
    config = peft.LoraConfig(r=4, lora_alpha=12, target_modules=HF_TARGETS + ["up_proj"], use_dora=dora,
                             init_lora_weights=False, task_type="CAUSAL_LM")  # B random, not zero
    peft_model = peft.get_peft_model(copy.deepcopy(model), config)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_magnitude_vector" in n:
                p.mul_(1 + 0.2 * torch.rand_like(p))
    peft_model.save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        ref = peft_model.eval()(tokens).logits

    settings, adapted = load_peft(tmp_path / "adapter", params, cfg)
    assert settings.scale == 3.0 and settings.dora is dora and len(settings.targets) == 6
    got = lowmem_logits(adapted, cfg, tokens, settings)
    assert (got - lowmem_logits(params, cfg, tokens)).abs().max() > 0.1
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("key, value", [
    ("use_rslora", True), ("bias", "all"), ("target_modules", ["lm_head"]), ("rank_pattern", {"q_proj": 2}),
    ("peft_type", "IA3"),
])
def test_load_refuses_configs_it_cannot_run(base, tmp_path, key, value):
    _, cfg, params = base
    settings = settings_for(False)
    out = save_peft(add_adapters(params, cfg, settings, seed=0), cfg, settings, tmp_path / "adapter")
    config = json.loads((out / ADAPTER_CONFIG_FILE).read_text())
    config[key] = value
    (out / ADAPTER_CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(ValueError, match=key if key != "target_modules" else "lm_head"):
        load_peft(out, params, cfg)


def test_settings_validation():
    with pytest.raises(ValueError, match="output"):
        LoraSettings(rank=4, alpha=8, targets=("output",))
    with pytest.raises(ValueError, match="unknown target"):
        LoraSettings(rank=4, alpha=8, targets=("q_proj",))
    with pytest.raises(ValueError, match="rank"):
        LoraSettings(rank=0, alpha=8, targets=("wq",))
    with pytest.raises(ValueError, match="dropout"):
        LoraSettings(rank=4, alpha=8, targets=("wq",), dropout=1.0)


@pytest.mark.parametrize("key, value, message", [
    ("target_modules", ["q_proj", "v_proj", "k_proj"], "missing tensors"),
    ("target_modules", ["q_proj"], "unexpected tensor"),
    ("r", 2, "has shape"),
])
def test_load_names_tensors_that_disagree_with_the_config(base, tmp_path, key, value, message):
    _, cfg, params = base
    settings = settings_for(False, targets=("wq", "wv"))
    out = save_peft(add_adapters(params, cfg, settings, seed=0), cfg, settings, tmp_path / "adapter")
    config = json.loads((out / ADAPTER_CONFIG_FILE).read_text())
    config[key] = value
    (out / ADAPTER_CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        load_peft(out, params, cfg)
