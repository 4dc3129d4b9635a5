import math

import msgspec
import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from lowmem.nn.config import Llama3RopeScaling, ModelConfig, preset
from lowmem.nn.hf import from_hf_name, load_hf, to_hf_name
from lowmem.nn.llama import (
    BLOCK_PARAM_NAMES,
    doc_mask,
    forward,
    init_params,
    logits,
    output_weight,
    rms_norm,
    rope_cache,
)
from lowmem.nn.loss import cross_entropy_sum


def tokens_for(cfg: ModelConfig, B: int, T: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------- init


def test_init_is_deterministic_per_seed_and_leaves_global_rng_alone():
    cfg = preset("tiny")
    state = torch.get_rng_state()
    a, b, c = init_params(cfg, seed=1), init_params(cfg, seed=1), init_params(cfg, seed=2)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not torch.equal(a["layers.0.attn.wq"], c["layers.0.attn.wq"])
    assert not any(t.requires_grad for t in a.values())


def test_init_dtype_matches_fp32_cast():
    cfg = preset("tiny")
    full, half = init_params(cfg, seed=3), init_params(cfg, seed=3, dtype=torch.bfloat16)
    assert all(half[n].dtype == torch.bfloat16 and torch.equal(half[n], full[n].bfloat16()) for n in full)


def test_init_scales():
    cfg = msgspec.structs.replace(preset("tiny"), n_layers=8)
    params = init_params(cfg, seed=0)
    assert torch.equal(params["layers.5.attn_norm"], torch.ones(cfg.dim)) and torch.equal(params["norm"], torch.ones(cfg.dim))
    out_std = 0.02 / math.sqrt(2 * cfg.n_layers)
    for name, std in [("layers.5.attn.wq", 0.02), ("layers.5.mlp.w1", 0.02), ("tok_embeddings", 0.02),
                      ("layers.5.attn.wo", out_std), ("layers.5.mlp.w2", out_std)]:
        assert params[name].mean().abs() < 0.1 * std
        assert params[name].std().item() == pytest.approx(std, rel=0.05), name


# ------------------------------------------------------------------------------------------ helpers


def test_rms_norm_computes_in_fp32_and_casts_back():
    x = torch.randn(3, 5, 64) * 100
    w = torch.randn(64)
    ref = x / x.pow(2).mean(-1, keepdim=True).add(1e-5).sqrt() * w
    torch.testing.assert_close(rms_norm(x, w, 1e-5), ref)
    y = rms_norm(x.bfloat16(), w.bfloat16(), 1e-5)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref, atol=0.1, rtol=2e-2)


@pytest.mark.parametrize("scaled", [False, True])
def test_rope_cache_matches_transformers(scaled, llama3_scaling):
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    kwargs = {"rope_theta": 500000.0, "rope_scaling": llama3_scaling} if scaled else {}
    hf_config = transformers.LlamaConfig(hidden_size=64, num_attention_heads=4, max_position_embeddings=4096, **kwargs)
    cfg = ModelConfig.from_hf_config(hf_config.to_dict(), source="test")
    assert (cfg.rope_scaling is not None) is scaled
    positions = torch.tensor([[0, 1, 7, 100, 1000, 4000]])
    cos, sin = rope_cache(cfg, positions)
    ref_cos, ref_sin = LlamaRotaryEmbedding(hf_config)(torch.zeros(1, dtype=torch.float32), positions)
    torch.testing.assert_close(cos, ref_cos, atol=1e-6, rtol=0)
    torch.testing.assert_close(sin, ref_sin, atol=1e-6, rtol=0)


def test_llama3_scaling_changes_only_low_frequencies():
    plain = ModelConfig(vocab_size=8, dim=64, n_layers=1, n_heads=1, n_kv_heads=1, ffn_dim=8, rope_theta=500000.0)
    scaled = msgspec.structs.replace(plain, rope_scaling=Llama3RopeScaling(
        factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64))
    pos = torch.tensor([[1]])
    (_, s0), (_, s1) = rope_cache(plain, pos), rope_cache(scaled, pos)  # sin(1 * inv_freq)
    # head dim 0 has the highest frequency (kept); the last one the lowest (divided by the factor)
    assert s0[0, 0, 0] == s1[0, 0, 0]
    assert (s1[0, 0, 31] / s0[0, 0, 31]).item() == pytest.approx(1 / 8, rel=1e-4)


def test_doc_mask():
    m = doc_mask(torch.tensor([[0, 0, 1, 1, 1]]))
    expected = torch.tensor([
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [0, 0, 1, 0, 0],
        [0, 0, 1, 1, 0],
        [0, 0, 1, 1, 1],
    ], dtype=torch.bool)
    assert m.shape == (1, 1, 5, 5) and torch.equal(m[0, 0], expected)


# -------------------------------------------------------------------------------------------- forward


def test_forward_shapes_and_tied_output():
    cfg = msgspec.structs.replace(preset("tiny"), tie_embeddings=True)
    params = init_params(cfg, seed=0)
    h = forward(params, tokens_for(cfg, 2, 9), cfg)
    assert h.shape == (2, 9, cfg.dim) and h.dtype == torch.float32
    assert output_weight(params, cfg) is params["tok_embeddings"]
    assert logits(params, h, cfg).shape == (2, 9, cfg.vocab_size)


def test_forward_rejects_sequences_longer_than_max_seq_len():
    cfg = msgspec.structs.replace(preset("tiny"), max_seq_len=8)
    with pytest.raises(ValueError, match="max_seq_len"):
        forward(init_params(cfg, seed=0), tokens_for(cfg, 1, 9), cfg)


def test_single_document_mask_equals_causal():
    cfg = preset("tiny")
    params, tok = init_params(cfg, seed=0), tokens_for(cfg, 2, 12)
    plain = forward(params, tok, cfg)
    masked = forward(params, tok, cfg, doc_ids=torch.zeros(2, 12, dtype=torch.int32))
    torch.testing.assert_close(masked, plain, atol=1e-6, rtol=0)


def test_packed_documents_match_documents_run_alone():
    # a larger init so attention is not near-uniform and a leak across documents would show
    cfg = preset("tiny")
    params = {n: t * 10 if t.ndim == 2 else t for n, t in init_params(cfg, seed=0).items()}
    lengths = [5, 8, 3]
    docs = [tokens_for(cfg, 1, n, seed=i) for i, n in enumerate(lengths)]
    packed = torch.cat(docs, dim=1)  # (1, 16)
    doc_ids = torch.cat([torch.full((1, n), i) for i, n in enumerate(lengths)], dim=1)
    positions = torch.cat([torch.arange(n)[None] for n in lengths], dim=1)
    h = forward(params, packed, cfg, positions=positions, doc_ids=doc_ids)
    alone = torch.cat([forward(params, d, cfg) for d in docs], dim=1)
    torch.testing.assert_close(h, alone, atol=1e-5, rtol=0)
    # and the mask is what makes it so: without doc_ids the later documents differ
    leaky = forward(params, packed, cfg, positions=positions)
    assert not torch.allclose(leaky[:, 5:], alone[:, 5:], atol=1e-3)


def test_run_block_checkpointing_gives_identical_gradients():
    cfg = preset("tiny")
    tok = tokens_for(cfg, 2, 10)
    labels = tokens_for(cfg, 2, 10, seed=1)
    doc_ids = torch.tensor([[0] * 4 + [1] * 6, [0] * 10])

    calls = []

    def checkpointed(block_fn, *args):
        calls.append(len(args))
        return checkpoint(block_fn, *args, use_reentrant=False)

    def counting_block(block_fn):
        def run(*args):
            calls.append("block")
            return block_fn(*args)
        return run

    def grads(run_block):
        params = {n: t.requires_grad_() for n, t in init_params(cfg, seed=0).items()}
        h = forward(params, tok, cfg, doc_ids=doc_ids, run_block=run_block)
        loss, n = cross_entropy_sum(h, output_weight(params, cfg), labels)
        loss.backward()
        return loss.detach(), {k: v.grad for k, v in params.items()}

    loss_ref, ref = grads(None)
    loss_ckpt, got = grads(lambda f, *a: checkpointed(counting_block(f), *a))
    assert torch.equal(loss_ckpt, loss_ref)
    for name in ref:
        assert torch.equal(got[name], ref[name]), name
    # one call per layer with h + 9 weights + cos, sin, mask; each block ran twice (forward + recompute)
    assert calls.count(1 + len(BLOCK_PARAM_NAMES) + 3) == cfg.n_layers
    assert calls.count("block") == 2 * cfg.n_layers


# -------------------------------------------------------------------------- parity with transformers


def test_logits_match_transformers(hf_checkpoint):
    variant, model, path = hf_checkpoint
    cfg, params = load_hf(path)
    assert cfg.tie_embeddings is (variant == "tied")
    assert (cfg.rope_scaling is not None) is (variant == "llama3_rope")
    tok = tokens_for(cfg, 2, 40)
    with torch.no_grad():
        ref = model(tok).logits
    got = logits(params, forward(params, tok, cfg), cfg)
    assert ref.abs().max() > 1.0  # the oracle is not trivially small
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


def test_positions_match_transformers_position_ids(hf_checkpoint):
    _, model, path = hf_checkpoint
    cfg, params = load_hf(path)
    tok = tokens_for(cfg, 1, 12)
    positions = torch.arange(12)[None] + 50
    with torch.no_grad():
        ref = model(tok, position_ids=positions).logits
    got = logits(params, forward(params, tok, cfg, positions=positions), cfg)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


def test_loss_and_gradients_match_transformers(hf_checkpoint):
    _, model, path = hf_checkpoint
    cfg, params = load_hf(path)
    tok = tokens_for(cfg, 2, 24)
    labels = tok.clone()
    labels[0, :5] = -100

    model.zero_grad()
    ref_loss = model(tok, labels=labels).loss  # mean CE, labels shifted inside transformers
    ref_loss.backward()

    for t in params.values():
        t.requires_grad_()
    h = forward(params, tok, cfg)
    shifted = F.pad(labels[:, 1:], (0, 1), value=-100)  # label t = token t+1
    loss_sum, n = cross_entropy_sum(h, output_weight(params, cfg), shifted)
    loss = loss_sum / n
    loss.backward()

    torch.testing.assert_close(loss, ref_loss.detach(), atol=1e-4, rtol=0)
    hf_params = dict(model.named_parameters())
    for name, t in params.items():
        torch.testing.assert_close(t.grad, hf_params[to_hf_name(name)].grad, atol=1e-4, rtol=0, msg=name)


def test_parity_oracle_is_sensitive_to_rope_scaling(hf_model_factory):
    """Guards the parity test: a checkpoint loaded with the wrong rope config must not match."""
    model = hf_model_factory("llama3_rope")
    state = {k: v.detach() for k, v in model.state_dict().items()}
    cfg = ModelConfig.from_hf_config(model.config.to_dict(), source="test")
    plain = msgspec.structs.replace(cfg, rope_scaling=None)
    params = {from_hf_name(k): v for k, v in state.items()}
    tok = tokens_for(cfg, 1, 40)
    with torch.no_grad():
        ref = model(tok).logits
    assert not torch.allclose(logits(params, forward(params, tok, plain), plain), ref, atol=1e-3)
    torch.testing.assert_close(logits(params, forward(params, tok, cfg), cfg), ref, atol=1e-5, rtol=0)
