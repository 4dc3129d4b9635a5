"""Generation with a KV cache: parity with full re-forwarding and with transformers, sampling, eos, adapters,
and the `lowmem generate` command on a tiny trained run."""

from __future__ import annotations

import msgspec
import pytest
import torch
from typer.testing import CliRunner

from lowmem.cli import app
from lowmem.nn.config import ModelConfig
from lowmem.nn.generate import decode_step, generate, init_cache, prefill, sample
from lowmem.nn.hf import load_hf
from lowmem.nn.llama import forward, init_params, logits
from lowmem.nn.lora import LoraSettings, add_adapters, trainable_names

# Two layers, GQA (4 query heads, 2 kv heads), short max_seq_len so the length check is reachable.
CFG = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48, max_seq_len=40)


def sharp_params(cfg: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random params with std 1/sqrt(fan_in) (init's 0.02 gives near-uniform logits and near-ties)."""
    params = init_params(cfg, seed=seed)
    gen = torch.Generator().manual_seed(seed + 100)
    return {n: torch.randn(t.shape, generator=gen) / t.shape[1] ** 0.5 if t.ndim == 2 else t
            for n, t in params.items()}


def prompts(cfg: ModelConfig, B: int = 2, T: int = 5, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


def greedy_by_full_forward(params, cfg, prompt: torch.Tensor, n_new: int, adapters=None) -> list[list[int]]:
    """The reference: re-run `forward` over the whole growing sequence for every new token."""
    tokens = prompt.clone()
    for _ in range(n_new):
        hidden = forward(params, tokens, cfg, adapters=adapters)
        nxt = logits(params, hidden[:, -1], cfg).argmax(-1)  # (B,)
        tokens = torch.cat([tokens, nxt[:, None]], dim=1)
    return tokens[:, prompt.shape[1]:].tolist()


@pytest.fixture(scope="module")
def model():
    return CFG, sharp_params(CFG)


# ------------------------------------------------------------------------------------------ greedy parity


def test_greedy_with_cache_equals_full_forward(model):
    cfg, params = model
    prompt = prompts(cfg, B=3, T=6)
    expected = greedy_by_full_forward(params, cfg, prompt, 20)
    got = generate(params, cfg, prompt, max_new_tokens=20)
    assert got == expected
    assert len({tuple(s) for s in got}) > 1  # the rows differ, so batching mixes nothing up
    assert generate(params, cfg, prompt.tolist(), max_new_tokens=20) == expected  # lists == tensor


def test_prefill_logits_equal_forward_logits(model):
    cfg, params = model
    prompt = prompts(cfg, B=2, T=7)
    cache = init_cache(cfg, 2, 10)
    got = prefill(params, prompt, cfg, cache)
    torch.testing.assert_close(got, logits(params, forward(params, prompt, cfg)[:, -1], cfg))
    assert cache.length == 7


def test_generation_past_max_seq_len_is_refused(model):
    cfg, params = model
    with pytest.raises(ValueError, match="max_seq_len = 40"):
        generate(params, cfg, prompts(cfg, T=30), max_new_tokens=12)
    assert len(generate(params, cfg, prompts(cfg, T=30), max_new_tokens=11)[0]) == 11


def test_unequal_prompts_are_refused(model):
    cfg, params = model
    with pytest.raises(ValueError, match="equal-length"):
        generate(params, cfg, [[1, 2, 3], [1, 2]], max_new_tokens=2)


@pytest.mark.parametrize("variant", ["gqa", "tied", "llama3_rope"])
def test_greedy_equals_transformers_generate(hf_model_factory, tmp_path, variant):
    model = hf_model_factory(variant)
    model.save_pretrained(tmp_path, safe_serialization=True)
    cfg, params = load_hf(tmp_path)
    prompt = torch.randint(0, cfg.vocab_size, (2, 6), generator=torch.Generator().manual_seed(3))
    n_new = 16
    expected = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                              max_new_tokens=n_new, min_new_tokens=n_new, eos_token_id=None,
                              pad_token_id=0)[:, prompt.shape[1]:]
    assert expected.shape == (2, n_new)
    assert generate(params, cfg, prompt, max_new_tokens=n_new) == expected.tolist()


# ---------------------------------------------------------------------------------------------- sampling


def test_sampling_is_reproducible_per_seed_and_leaves_global_rng_alone(model):
    cfg, params = model
    prompt = prompts(cfg)
    state = torch.get_rng_state()
    a = generate(params, cfg, prompt, max_new_tokens=16, temperature=1.0, seed=7)
    b = generate(params, cfg, prompt, max_new_tokens=16, temperature=1.0, seed=7)
    c = generate(params, cfg, prompt, max_new_tokens=16, temperature=1.0, seed=8)
    assert torch.equal(torch.get_rng_state(), state)
    assert a == b
    assert a != c
    assert a != generate(params, cfg, prompt, max_new_tokens=16)  # sampling at T=1 is not greedy here


@pytest.mark.parametrize("kw", [{"temperature": 1e-5}, {"temperature": 1.0, "top_k": 1},
                                {"temperature": 1.0, "top_p": 1e-6}])
def test_degenerate_sampling_equals_greedy(model, kw):
    cfg, params = model
    prompt = prompts(cfg)
    greedy = generate(params, cfg, prompt, max_new_tokens=16)
    for seed in range(3):
        assert generate(params, cfg, prompt, max_new_tokens=16, seed=seed, **kw) == greedy


def test_top_k_and_top_p_restrict_the_draw():
    # probabilities 0.5, 0.3, 0.15, 0.05 in that order of ids
    lg = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log().expand(4000, 4)
    gen = torch.Generator().manual_seed(0)
    assert set(sample(lg, temperature=1.0, generator=gen).tolist()) == {0, 1, 2, 3}
    assert set(sample(lg, temperature=1.0, top_k=2, generator=gen).tolist()) == {0, 1}
    # 0.5 + 0.3 reach 0.75, so the nucleus is {0, 1}; at 0.85 it takes id 2 too
    assert set(sample(lg, temperature=1.0, top_p=0.75, generator=gen).tolist()) == {0, 1}
    assert set(sample(lg, temperature=1.0, top_p=0.85, generator=gen).tolist()) == {0, 1, 2}
    draws = sample(lg, temperature=1.0, top_k=2, generator=gen)
    assert abs((draws == 0).float().mean().item() - 0.5 / 0.8) < 0.03  # renormalised over the two kept


@pytest.mark.parametrize(("kw", "part"), [
    ({"temperature": -1.0}, "temperature"), ({"top_k": 0}, "top_k"), ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"), ({"max_new_tokens": -1}, "max_new_tokens"),
])
def test_bad_sampling_arguments_are_refused(model, kw, part):
    cfg, params = model
    with pytest.raises(ValueError, match=part):
        generate(params, cfg, prompts(cfg), **{"max_new_tokens": 4, **kw})


# ------------------------------------------------------------------------------------------------ eos


def test_eos_stops_only_the_sequence_that_produced_it(model):
    cfg, params = model
    prompt = prompts(cfg, B=2, T=5, seed=1)
    free = generate(params, cfg, prompt, max_new_tokens=12)
    # Pick as eos a token row 0 produces at step 3 and row 1 never produces before then.
    eos = free[0][3]
    assert eos not in free[0][:3]
    assert eos not in free[1]
    got = generate(params, cfg, prompt, max_new_tokens=12, eos_id=eos)
    assert got[0] == free[0][:4]  # stops after the eos, which ends the list
    assert got[1] == free[1]


def test_eos_in_every_sequence_ends_early(model):
    cfg, params = model
    prompt = prompts(cfg, B=1, T=5)
    first = generate(params, cfg, prompt, max_new_tokens=1)[0][0]
    assert generate(params, cfg, prompt, max_new_tokens=30, eos_id=first) == [[first]]


# ------------------------------------------------------------------------------------------- adapters


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_adapters_change_generation_and_match_full_forward(model, dora):
    cfg, params = model
    settings = LoraSettings(rank=4, alpha=8.0, targets=("wq", "wk", "wv", "wo", "w1", "w2"), dropout=0.1,
                            dora=dora)
    adapted = add_adapters(params, cfg, settings, seed=0)
    gen = torch.Generator().manual_seed(1)
    for n in trainable_names(adapted):
        if n.endswith(".lora_b"):  # fresh B is zero, which would make the adapter a no-op
            adapted[n] = 0.5 * torch.randn(adapted[n].shape, generator=gen)
    prompt = prompts(cfg, B=2, T=5)
    got = generate(adapted, cfg, prompt, max_new_tokens=16, adapters=settings)
    assert got != generate(params, cfg, prompt, max_new_tokens=16)
    assert got == greedy_by_full_forward(adapted, cfg, prompt, 16, adapters=settings)
    with pytest.raises(ValueError, match="adapters=None"):
        generate(adapted, cfg, prompt, max_new_tokens=2)


# ------------------------------------------------------------------------------------------------- CLI


@pytest.fixture
def trained_run(tiny_spec, tmp_path):
    """A finished full fine-tuning run of the tiny preset (2 steps): RUN/model/ with tokenizer.model."""
    from lowmem.plan import plan
    from lowmem.train import execute

    execute(plan(tiny_spec("train.steps=2"), "cpu"), tmp_path, progress=False)
    return tmp_path


def test_cli_generate_prints_the_continuation(trained_run):
    from lowmem.data.tokenizer import load_tokenizer

    args = ["generate", str(trained_run), "--prompt", "In the beginning", "--max-new-tokens", "8"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip()
    # The printed text is the greedy continuation of [bos] + prompt.
    tok = load_tokenizer(trained_run / "model" / "tokenizer.model")
    cfg, params = load_hf(trained_run / "model")
    ids = generate(params, cfg, [[tok.bos_id] + tok.encode(["In the beginning"])[0]], max_new_tokens=8,
                   eos_id=tok.eos_id)[0]
    assert result.stdout == tok.decode([t for t in ids if t != tok.eos_id]) + "\n"
    # and sampling flags reach it: the same seed twice prints the same, the model directory works directly
    sampled = ["--temperature", "1.5", "--top-k", "50", "--top-p", "0.95", "--seed", "3"]
    a = CliRunner().invoke(app, args + sampled)
    b = CliRunner().invoke(app, ["generate", str(trained_run / "model"), *args[2:], *sampled])
    assert a.exit_code == 0 and a.stdout == b.stdout
    _one_clean_error(CliRunner().invoke(app, [*args, "--top-p", "2"]), "top_p = 2.0")


def _one_clean_error(result, *parts: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and result.stdout == ""
    assert [line.startswith("error:") for line in result.stderr.splitlines()] == [True]
    for part in parts:
        assert part in result.stderr, result.stderr


def test_cli_generate_without_a_model_is_one_clean_error(tmp_path):
    result = CliRunner().invoke(app, ["generate", str(tmp_path), "--prompt", "x"])
    _one_clean_error(result, str(tmp_path), "no model found")


def test_cli_generate_without_a_tokenizer_is_one_clean_error(tmp_path, model):
    from lowmem.nn.hf import save_hf

    cfg, params = model
    save_hf(params, cfg, tmp_path / "m")
    result = CliRunner().invoke(app, ["generate", str(tmp_path / "m"), "--prompt", "x"])
    _one_clean_error(result, "no tokenizer (tokenizer.model, tokenizer.json")


def test_cli_generate_and_export_with_a_tokenizer_json_model(tmp_path):
    """Qwen2 / HF-layout Llama 3 directories carry tokenizer.json only: generate reads it, export copies it."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from lowmem.data.tokenizer import load_tokenizer
    from lowmem.nn.hf import save_hf

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>"], show_progress=False)
    tok.train_from_iterator(["In the beginning God created the heaven and the earth."] * 20, trainer)
    cfg = msgspec.structs.replace(CFG, vocab_size=tok.get_vocab_size())
    params = sharp_params(cfg)
    save_hf(params, cfg, tmp_path / "m")
    tok.save(str(tmp_path / "m" / "tokenizer.json"))
    result = CliRunner().invoke(app, ["generate", str(tmp_path / "m"), "--prompt", "In the", "--max-new-tokens", "6"])
    assert result.exit_code == 0, result.output
    lowmem_tok = load_tokenizer(tmp_path / "m")
    ids = generate(params, cfg, [lowmem_tok.encode(["In the"])[0]], max_new_tokens=6, eos_id=lowmem_tok.eos_id)[0]
    assert result.stdout == lowmem_tok.decode([t for t in ids if t != lowmem_tok.eos_id]) + "\n"
    result = CliRunner().invoke(app, ["export", str(tmp_path / "m"), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out/tokenizer.json").read_bytes() == (tmp_path / "m/tokenizer.json").read_bytes()


# ------------------------------------------------------------------------------------ sliding-window cache


@pytest.mark.parametrize("layers", ["all", "even"], ids=["mistral", "gemma2-even-layers"])
def test_sliding_window_cache_is_bounded_and_changes_no_token(layers):
    """Window 8, prompt 6 + 30 new tokens: the windowed layers keep 8 positions, and greedy decoding equals
    re-running the whole sequence through `forward` (whose mask applies the window) token for token."""
    window, T, n_new = 8, 6, 30
    cfg = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48, max_seq_len=64,
                      sliding_window=window, sliding_layers=layers)
    full = msgspec.structs.replace(cfg, sliding_window=None)
    params = sharp_params(cfg)
    prompt = prompts(cfg, B=2, T=T, seed=3)
    expected = greedy_by_full_forward(params, cfg, prompt, n_new)
    assert generate(params, cfg, prompt, max_new_tokens=n_new) == expected
    assert generate(params, full, prompt, max_new_tokens=n_new) != expected  # the window matters here

    cache, full_cache = init_cache(cfg, 2, T + n_new), init_cache(full, 2, T + n_new)
    windowed = [i for i in range(cfg.n_layers) if cfg.layer_window(i) is not None]
    assert windowed == ([0, 1] if layers == "all" else [0])
    for i in range(cfg.n_layers):
        assert cache.keys[i].shape[2] == (window if i in windowed else T + n_new)
    per_position = 2 * 2 * cfg.n_kv_heads * cfg.head_dim * 4  # keys + values, B = 2, fp32
    assert cache.n_bytes == per_position * sum(window if i in windowed else T + n_new for i in range(2))
    assert full_cache.n_bytes == per_position * 2 * (T + n_new)

    # step by step: logits equal the full forward's at every position, before and after the window fills
    tokens = torch.cat([prompt, torch.tensor(expected)], dim=1)
    ref = logits(params, forward(params, tokens, cfg), cfg)  # (B, T + n_new, V)
    torch.testing.assert_close(prefill(params, tokens[:, :T], cfg, cache), ref[:, T - 1], atol=1e-5, rtol=0)
    for p in range(T, T + n_new - 1):
        got = decode_step(params, tokens[:, p], cfg, cache)
        torch.testing.assert_close(got, ref[:, p], atol=1e-5, rtol=0)
    assert cache.length == T + n_new - 1 and cache.n_bytes < full_cache.n_bytes


def test_sliding_window_prompt_longer_than_the_window():
    """Prefill of 20 tokens through a window of 4 keeps the last 4 positions and continues exactly."""
    cfg = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48, max_seq_len=64,
                      sliding_window=4)
    params = sharp_params(cfg, seed=1)
    prompt = prompts(cfg, B=1, T=20, seed=5)
    assert generate(params, cfg, prompt, max_new_tokens=10) == greedy_by_full_forward(params, cfg, prompt, 10)
