import math

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lowmem.nn.config import (
    FAMILIES,
    PRESETS,
    Llama3RopeScaling,
    ModelConfig,
    count_params,
    param_shapes,
    preset,
)
from lowmem.nn.llama import init_params

# Parameter counts of the published checkpoints (sum of numel over their safetensors files).
PUBLISHED_PARAM_COUNTS = {
    "llama3.2-1b": 1_235_814_400,
    "llama3.2-3b": 3_212_749_824,
    "llama3.1-8b": 8_030_261_248,
    "llama2-7b": 6_738_415_616,
    "mistral-7b": 7_241_732_096,
    "tinyllama-1.1b": 1_100_048_384,
}


def tiny(**overrides) -> ModelConfig:
    return msgspec.structs.replace(preset("tiny"), **overrides)


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAM_COUNTS))
def test_real_presets_have_published_param_counts(name):
    assert count_params(preset(name)) == PUBLISHED_PARAM_COUNTS[name]


def test_preset_hyperparameters():
    assert preset("tiny") == ModelConfig(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=172)
    q = preset("quickstart-5m")
    assert (q.vocab_size, q.dim, q.n_layers, q.n_heads, q.n_kv_heads, q.ffn_dim, q.max_seq_len) == (
        4096, 256, 6, 8, 4, 704, 1024)
    assert q.tie_embeddings
    for name, factor, tied in [("llama3.2-1b", 32.0, True), ("llama3.2-3b", 32.0, True),
                               ("llama3.1-8b", 8.0, False)]:
        c = preset(name)
        assert c.rope_theta == 500000.0 and c.tie_embeddings is tied
        assert c.rope_scaling == Llama3RopeScaling(factor=factor, low_freq_factor=1.0, high_freq_factor=4.0,
                                                   original_max_position_embeddings=8192)
    for name in ("llama2-7b", "mistral-7b", "tinyllama-1.1b"):
        assert preset(name).rope_scaling is None and preset(name).rope_theta == 10000.0


def test_unknown_preset_lists_known_names():
    with pytest.raises(ValueError, match="llama3.2-1b") as e:
        preset("llama-9000")
    assert "llama-9000" in str(e.value) and "tiny" in str(e.value)


@pytest.mark.parametrize("tied", [False, True])
def test_param_shapes_and_count_match_init_params(tied):
    cfg = tiny(tie_embeddings=tied)
    params = init_params(cfg, seed=0)
    assert {n: tuple(t.shape) for n, t in params.items()} == param_shapes(cfg)
    assert list(params) == list(param_shapes(cfg))
    assert count_params(cfg) == sum(t.numel() for t in params.values())
    assert ("output" in params) is not tied


@settings(max_examples=50, deadline=None)
@given(n_kv=st.integers(1, 4), group=st.integers(1, 4), half_hd=st.integers(1, 8), n_layers=st.integers(1, 5),
       ffn=st.integers(1, 300), vocab=st.integers(1, 1000), tied=st.booleans())
def test_count_params_equals_sum_of_shapes(n_kv, group, half_hd, n_layers, ffn, vocab, tied):
    n_heads = n_kv * group
    cfg = ModelConfig(vocab_size=vocab, dim=n_heads * 2 * half_hd, n_layers=n_layers, n_heads=n_heads,
                      n_kv_heads=n_kv, ffn_dim=ffn, tie_embeddings=tied)
    assert count_params(cfg) == sum(math.prod(s) for s in param_shapes(cfg).values())


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        ({"dim": 66}, ["dim", "66", "n_heads", "4"]),
        ({"n_kv_heads": 3}, ["n_kv_heads", "3", "n_heads"]),
        ({"n_layers": 0}, ["n_layers", "0", "positive"]),
        ({"vocab_size": -5}, ["vocab_size", "-5", "positive"]),
        ({"ffn_dim": 1.5}, ["ffn_dim", "1.5", "integer"]),
        ({"norm_eps": 0.0}, ["norm_eps", "0.0", "positive"]),
        ({"dim": 12, "n_heads": 4, "n_kv_heads": 4}, ["head_dim", "3", "even"]),
    ],
)
def test_bad_config_names_field_value_and_rule(overrides, words):
    with pytest.raises(ValueError) as e:
        tiny(**overrides)
    for w in words:
        assert w in str(e.value)


def test_bad_rope_scaling():
    with pytest.raises(ValueError, match="high_freq_factor"):
        Llama3RopeScaling(factor=8.0, low_freq_factor=4.0, high_freq_factor=1.0, original_max_position_embeddings=8)


def test_msgspec_roundtrip_and_validation_on_decode():
    cfg = preset("llama3.1-8b")
    assert msgspec.json.decode(msgspec.json.encode(cfg), type=ModelConfig) == cfg
    bad = msgspec.to_builtins(preset("tiny")) | {"n_kv_heads": 3}
    with pytest.raises(msgspec.ValidationError, match="n_kv_heads"):
        msgspec.convert(bad, ModelConfig)
    with pytest.raises(msgspec.ValidationError, match="n_experts"):
        msgspec.convert(msgspec.to_builtins(preset("tiny")) | {"n_experts": 8}, ModelConfig)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_hf_config_roundtrip(name):
    cfg = preset(name)
    d = cfg.to_hf_config()
    assert d["model_type"] == cfg.family and d["architectures"] == [FAMILIES[cfg.family]]
    assert (cfg.family == "llama") is (name in {"tiny", "quickstart-5m", "llama3.2-1b", "llama3.2-3b", "llama3.1-8b",
                                                 "llama2-7b", "tinyllama-1.1b"})
    assert ModelConfig.from_hf_config(d, source="x/config.json") == cfg


@pytest.mark.parametrize("name", ["tiny", "llama3.2-1b"])
def test_transformers_accepts_to_hf_config(name):
    transformers = pytest.importorskip("transformers")
    cfg = preset(name)
    hf = transformers.LlamaConfig(**cfg.to_hf_config())
    assert (hf.hidden_size, hf.num_hidden_layers, hf.num_key_value_heads, hf.tie_word_embeddings) == (
        cfg.dim, cfg.n_layers, cfg.n_kv_heads, cfg.tie_embeddings)
    # transformers' own serialisation (5.x writes `rope_parameters`) reads back to the same config
    assert ModelConfig.from_hf_config(hf.to_dict(), source="hf") == cfg


def test_from_hf_config_mistral_without_sliding_window():
    d = preset("mistral-7b").to_hf_config() | {"model_type": "mistral", "sliding_window": None,
                                               "architectures": ["MistralForCausalLM"]}
    assert ModelConfig.from_hf_config(d, source="m/config.json") == preset("mistral-7b")


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"model_type": "gpt2"}, ["model_type", "'gpt2'", "'llama'"]),
        ({"model_type": "qwen2", "use_sliding_window": True, "max_window_layers": 1},
         ["use_sliding_window", "True", "false"]),
        ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, ["rope_type", "'linear'", "'llama3'"]),
        ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, ["rope_type", "'dynamic'"]),
        ({"attention_bias": True}, ["attention_bias", "True", "false"]),
        ({"mlp_bias": True}, ["mlp_bias", "True"]),
        ({"hidden_act": "gelu"}, ["hidden_act", "'gelu'", "'silu'"]),
        ({"head_dim": 15}, ["head_dim", "15", "even"]),
        ({"num_key_value_heads": 3}, ["n_kv_heads", "3"]),
    ],
)
def test_from_hf_config_errors_name_source_key_and_value(change, words):
    d = preset("tiny").to_hf_config() | change
    with pytest.raises(ValueError) as e:
        ModelConfig.from_hf_config(d, source="ckpt/config.json")
    assert "ckpt/config.json" in str(e.value)
    for w in words:
        assert w in str(e.value)
