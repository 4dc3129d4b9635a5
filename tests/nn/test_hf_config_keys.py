"""Every key of each supported family's transformers config class is used, known to be irrelevant, or refused
by name (issue #17, item 3): a key transformers adds later fails here until it is classified."""

import copy
from typing import Any

import pytest

from lowmem.nn.config import FAMILIES, TEXT_TOWERS, ModelConfig

transformers = pytest.importorskip("transformers")

CONFIG_CLASSES = {
    "llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config", "gemma": "GemmaConfig",
    "gemma2": "Gemma2Config", "phi3": "Phi3Config", "qwen3": "Qwen3Config", "olmo2": "Olmo2Config",
    "gemma3_text": "Gemma3TextConfig", "smollm3": "SmolLM3Config", "gemma3": "Gemma3Config",
    "qwen3_moe": "Qwen3MoeConfig",
}

# Keys that cannot change what lowmem computes from a checkpoint, and why.
IRRELEVANT = {
    "_name_or_path": "where transformers loaded the config from",
    "architectures": "model_type names the family; lowmem writes its own architectures",
    "transformers_version": "the writer's version",
    "dtype": "the load dtype is the plan's precision",
    "use_cache": "transformers' inference KV cache; lowmem's generate always caches",
    "bos_token_id": "special ids come from the tokenizer files (lowmem.data.load_tokenizer)",
    "eos_token_id": "special ids come from the tokenizer files",
    "pad_token_id": "special ids come from the tokenizer files; no embedding row is special in training",
    "initializer_range": "random init of transformers' modules; a checkpoint's weights are loaded",
    "chunk_size_feed_forward": "transformers' chunked FFN computes the same numbers",
    "id2label": "sequence-classification heads only", "label2id": "sequence-classification heads only",
    "problem_type": "sequence-classification heads only",
    "is_encoder_decoder": "the causal-LM classes ignore it",
    "output_attentions": "what transformers returns", "output_hidden_states": "what transformers returns",
    "return_dict": "what transformers returns",
    "pretraining_tp": "transformers 5 no longer splits the projections by it",
    "boi_token_index": "image tokens: the vision tower is left out",
    "eoi_token_index": "image tokens: the vision tower is left out",
    "image_token_index": "image tokens: the vision tower is left out",
    "mm_tokens_per_image": "image tokens: the vision tower is left out",
    "vision_config": "the vision tower is left out (load_hf says so)",
    "text_config.tie_word_embeddings": "the multimodal config's own tie_word_embeddings decides, as transformers does",
}
IRRELEVANT_IN = {
    # Qwen2 slides only with use_sliding_window, which is refused by name where it would apply.
    ("qwen2", "sliding_window"): "read only with use_sliding_window (refused where it applies)",
    ("qwen3_moe", "sliding_window"): "read only with use_sliding_window (refused by name)",
    ("phi3", "original_max_position_embeddings"): "read only by longrope rope_scaling (tested with it)",
}

# Keys whose effect shows only in a context: key → (context merged into the config first, the value to try).
PROBES: dict[str, tuple[dict[str, Any], Any]] = {
    "num_key_value_heads": ({}, 1),
    "num_hidden_layers": ({"layer_types": None, "no_rope_layers": None}, 12),
    "max_window_layers": ({"use_sliding_window": True, "sliding_window": 8, "layer_types": None,
                           "max_window_layers": 64}, 0),
    "_sliding_window_pattern": ({"layer_types": None}, 3),
    "no_rope_layer_interval": ({"no_rope_layers": None}, 2),
    "use_sliding_window": ({"sliding_window": 8, "layer_types": None, "max_window_layers": 0}, True),
    "attention_dropout": ({}, 0.1),
    "resid_pdrop": ({}, 0.1),
    "embd_pdrop": ({}, 0.1),
}
PROBES_IN = {
    ("qwen3", "sliding_window"): ({"layer_types": None, "max_window_layers": 0, "sliding_window": None}, 8),
    ("qwen3", "use_sliding_window"): ({"layer_types": None, "sliding_window": None, "max_window_layers": 0}, True),
    ("smollm3", "sliding_window"): ({"layer_types": None, "use_sliding_window": True, "sliding_window": None}, 8),
    ("smollm3", "use_sliding_window"): ({"layer_types": None, "sliding_window": 8}, True),
    ("gemma3_text", "attn_logit_softcapping"): ({}, 30.0),
    ("gemma3", "text_config.attn_logit_softcapping"): ({}, 30.0),
}


def perturbed(value: Any) -> Any:
    """A different value of the same kind."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return 2 * value if value else 1
    if isinstance(value, float):
        return 2 * value if value else 0.1
    if isinstance(value, str):
        return value + "_other"
    if isinstance(value, list):
        return [perturbed(value[0]), *value[1:]] if value else [1]
    return 1 if value is None else value


def leaf_keys(d: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted paths of the config's leaves; rope_parameters and text_config are walked into."""
    keys = []
    for k, v in d.items():
        if isinstance(v, dict) and (k in ("rope_parameters", "text_config") or prefix.startswith("rope_parameters")
                                    or prefix.startswith("text_config.rope_parameters")):
            keys += leaf_keys(v, f"{prefix}{k}.")
        else:
            keys.append(prefix + k)
    return keys


def with_value(d: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    d = copy.deepcopy(d)
    *parents, leaf = path.split(".")
    node = d
    for p in parents:
        node = node[p]
    node[leaf] = value
    return d


def get(d: dict[str, Any], path: str) -> Any:
    for p in path.split("."):
        d = d[p]
    return d


def outcome(d: dict[str, Any]) -> ModelConfig | str:
    try:
        return ModelConfig.from_hf_config(d, source="config.json")
    except ValueError as e:
        return str(e)


@pytest.mark.parametrize("family", sorted(CONFIG_CLASSES))
def test_every_config_key_is_used_irrelevant_or_refused_by_name(family):
    assert set(CONFIG_CLASSES) == set(FAMILIES) | set(TEXT_TOWERS)
    base = getattr(transformers, CONFIG_CLASSES[family])().to_dict()
    assert isinstance(outcome(base), ModelConfig), outcome(base)  # the class's defaults are a model lowmem runs
    for path in leaf_keys(base):
        leaf = path.split(".")[-1]
        short = path.removeprefix("text_config.")
        reason = IRRELEVANT.get(path) or IRRELEVANT.get(leaf if not path.startswith("rope_") else path) \
            or IRRELEVANT_IN.get((family, short))
        if path.startswith("vision_config"):
            reason = IRRELEVANT["vision_config"]
        context, value = PROBES_IN.get((family, path)) or PROBES_IN.get((family, short)) or PROBES.get(leaf) or (
            {}, perturbed(get(base, path)))
        prefix = "text_config." if path.startswith("text_config.") else ""
        start = base
        for k, v in context.items():
            start = with_value(start, prefix + k, v)
        before, after = outcome(start), outcome(with_value(start, path, value))
        if reason is not None:
            assert after == before, f"{family}: {path} is listed as irrelevant ({reason}) but changes the model"
            continue
        assert isinstance(before, ModelConfig), (family, path, before)
        if isinstance(after, str):
            assert leaf in after, f"{family}: {path} = {value!r} is refused without naming it: {after}"
        else:
            assert after != before, f"{family}: {path} = {value!r} changes nothing and is not listed as irrelevant"
