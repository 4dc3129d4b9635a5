"""Model configuration: the shape of a Llama-architecture decoder, its presets, and HF config.json I/O.

Imports no torch: the planner sizes a model from `param_shapes` without allocating anything.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec

__all__ = [
    "PRESETS",
    "Llama3RopeScaling",
    "ModelConfig",
    "count_params",
    "param_shapes",
    "preset",
]


class Llama3RopeScaling(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True,
                        tag="llama3", tag_field="kind"):
    """Llama 3.1+ RoPE frequency scaling (`rope_type: "llama3"` in HF config.json).

    Wavelengths longer than `original_max_position_embeddings / low_freq_factor` are divided by `factor`,
    those shorter than `original_max_position_embeddings / high_freq_factor` are kept, and the band in
    between is interpolated smoothly (Meta's llama-models `apply_scaling`).
    """

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int

    def __post_init__(self) -> None:
        for name in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
            value = getattr(self, name)
            if not value > 0:
                raise ValueError(f"rope_scaling.{name} = {value!r}: must be > 0")
        if not self.high_freq_factor > self.low_freq_factor:
            raise ValueError(
                f"rope_scaling.high_freq_factor = {self.high_freq_factor!r}: must be greater than "
                f"low_freq_factor = {self.low_freq_factor!r} (the smoothing band would be empty)"
            )


class ModelConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Shape of a Llama-architecture decoder (RMSNorm, RoPE, GQA attention, SwiGLU MLP, no biases).

    `n_kv_heads < n_heads` is grouped-query attention; `ffn_dim` is the SwiGLU hidden size;
    `tie_embeddings` shares `tok_embeddings` as the output projection.
    """

    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 2048
    tie_embeddings: bool = False
    rope_scaling: Llama3RopeScaling | None = None

    def __post_init__(self) -> None:
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "max_seq_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} = {value!r}: must be a positive integer")
        for name in ("norm_eps", "rope_theta"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise ValueError(f"{name} = {value!r}: must be a positive number")
        if self.dim % self.n_heads:
            raise ValueError(
                f"dim = {self.dim}: must be divisible by n_heads = {self.n_heads} "
                f"(head_dim = dim / n_heads); pick a dim that is a multiple of {self.n_heads}"
            )
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_kv_heads = {self.n_kv_heads}: must divide n_heads = {self.n_heads} "
                "(each kv head serves a whole group of query heads)"
            )
        if self.head_dim % 2:
            raise ValueError(
                f"dim = {self.dim}: head_dim = dim / n_heads = {self.head_dim} must be even for RoPE"
            )

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @classmethod
    def from_hf_config(cls, d: dict[str, Any], source: str) -> ModelConfig:
        """Read a Hugging Face `config.json` dict (Llama, or Mistral without sliding window).

        Accepts both the transformers 4.x layout (`rope_theta`, `rope_scaling`) and the 5.x one
        (`rope_parameters`). `source` names the file in error messages.
        """
        model_type = d.get("model_type")
        if model_type not in ("llama", "mistral"):
            raise ValueError(
                f"{source}: model_type = {model_type!r} is not supported; supported: 'llama', "
                "'mistral' (without sliding window)"
            )
        if model_type == "mistral" and d.get("sliding_window") is not None:
            raise ValueError(
                f"{source}: sliding_window = {d['sliding_window']!r} is not supported; lowmem runs "
                "full causal attention, so only Mistral configs with sliding_window null load. For "
                "sequences no longer than the window the two agree: set sliding_window to null "
                "and keep max_seq_len <= the window."
            )
        for key in ("attention_bias", "mlp_bias"):
            if d.get(key, False):
                raise ValueError(f"{source}: {key} = {d[key]!r} is not supported; supported: false")
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"{source}: hidden_act = {act!r} is not supported; supported: 'silu'")

        def need(key: str) -> Any:
            if key not in d:
                raise ValueError(f"{source}: missing key {key!r}, needed to build the model")
            return d[key]

        dim = need("hidden_size")
        n_heads = need("num_attention_heads")
        head_dim = d.get("head_dim")
        if head_dim is not None and n_heads and head_dim * n_heads != dim:
            raise ValueError(
                f"{source}: head_dim = {head_dim!r} is not supported; supported: hidden_size / "
                f"num_attention_heads = {dim} / {n_heads}"
            )
        rope = d.get("rope_parameters") or {}
        rope_theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
        scaling = d.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        try:
            return cls(
                vocab_size=need("vocab_size"),
                dim=dim,
                n_layers=need("num_hidden_layers"),
                n_heads=n_heads,
                n_kv_heads=d.get("num_key_value_heads") or n_heads,
                ffn_dim=need("intermediate_size"),
                norm_eps=float(d.get("rms_norm_eps", 1e-5)),
                rope_theta=float(rope_theta),
                max_seq_len=d.get("max_position_embeddings", 2048),
                tie_embeddings=bool(d.get("tie_word_embeddings", False)),
                rope_scaling=_rope_scaling_from_hf(scaling, source),
            )
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None

    def to_hf_config(self, dtype: str = "float32") -> dict[str, Any]:
        """The `config.json` dict transformers' `LlamaConfig` / `AutoModelForCausalLM` accepts.

        Written in the transformers 4.x layout (`rope_theta`, `rope_scaling`), which 5.x also reads.
        """
        d: dict[str, Any] = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.dim,
            "intermediate_size": self.ffn_dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_seq_len,
            "rms_norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": None,
            "tie_word_embeddings": self.tie_embeddings,
            "attention_bias": False,
            "attention_dropout": 0.0,
            "mlp_bias": False,
            "pretraining_tp": 1,
            "initializer_range": 0.02,
            "torch_dtype": dtype,
            "dtype": dtype,
        }
        if self.rope_scaling is not None:
            s = self.rope_scaling
            d["rope_scaling"] = {
                "rope_type": "llama3",
                "factor": s.factor,
                "low_freq_factor": s.low_freq_factor,
                "high_freq_factor": s.high_freq_factor,
                "original_max_position_embeddings": s.original_max_position_embeddings,
            }
        return d


def _rope_scaling_from_hf(scaling: dict[str, Any] | None, source: str) -> Llama3RopeScaling | None:
    if scaling is None:
        return None
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return None
    if kind != "llama3":
        raise ValueError(
            f"{source}: rope_scaling.rope_type = {kind!r} is not supported; supported: 'llama3' or none"
        )
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    missing = [k for k in keys if k not in scaling]
    if missing:
        raise ValueError(f"{source}: rope_scaling is missing {missing} (needed for rope_type 'llama3')")
    return Llama3RopeScaling(
        factor=float(scaling["factor"]),
        low_freq_factor=float(scaling["low_freq_factor"]),
        high_freq_factor=float(scaling["high_freq_factor"]),
        original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
    )


# ---------------------------------------------------------------------------------------------------------
# Parameter inventory


def param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Canonical parameter name → shape, in the order `init_params` creates them. Allocates nothing.

    Matrices use the torch Linear convention (out_features, in_features).
    """
    D, F, V = cfg.dim, cfg.ffn_dim, cfg.vocab_size
    q_dim, kv_dim = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    shapes: dict[str, tuple[int, ...]] = {"tok_embeddings": (V, D)}
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        shapes[p + "attn_norm"] = (D,)
        shapes[p + "attn.wq"] = (q_dim, D)
        shapes[p + "attn.wk"] = (kv_dim, D)
        shapes[p + "attn.wv"] = (kv_dim, D)
        shapes[p + "attn.wo"] = (D, q_dim)
        shapes[p + "mlp_norm"] = (D,)
        shapes[p + "mlp.w1"] = (F, D)
        shapes[p + "mlp.w2"] = (D, F)
        shapes[p + "mlp.w3"] = (F, D)
    shapes["norm"] = (D,)
    if not cfg.tie_embeddings:
        shapes["output"] = (V, D)
    return shapes


def count_params(cfg: ModelConfig) -> int:
    """Number of parameters, counted analytically (tied output counted once)."""
    D, F, V, L = cfg.dim, cfg.ffn_dim, cfg.vocab_size, cfg.n_layers
    q_dim, kv_dim = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    attn = 2 * D * q_dim + 2 * D * kv_dim  # wq, wo; wk, wv
    mlp = 3 * D * F  # w1, w2, w3
    block = attn + mlp + 2 * D  # + attn_norm, mlp_norm
    embed = V * D * (1 if cfg.tie_embeddings else 2)
    return embed + L * block + D


# ---------------------------------------------------------------------------------------------------------
# Presets: functions returning a whole config. Real sizes follow the published HF config.json files.


def _tiny() -> ModelConfig:
    return ModelConfig(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=172)


def _quickstart_5m() -> ModelConfig:
    return ModelConfig(vocab_size=4096, dim=256, n_layers=6, n_heads=8, n_kv_heads=4, ffn_dim=704,
                       tie_embeddings=True, max_seq_len=1024)


def _llama3_rope(factor: float) -> Llama3RopeScaling:
    return Llama3RopeScaling(factor=factor, low_freq_factor=1.0, high_freq_factor=4.0,
                             original_max_position_embeddings=8192)


def _llama32_1b() -> ModelConfig:  # meta-llama/Llama-3.2-1B
    return ModelConfig(vocab_size=128256, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_dim=8192,
                       rope_theta=500000.0, max_seq_len=131072, tie_embeddings=True,
                       rope_scaling=_llama3_rope(32.0))


def _llama32_3b() -> ModelConfig:  # meta-llama/Llama-3.2-3B
    return ModelConfig(vocab_size=128256, dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, ffn_dim=8192,
                       rope_theta=500000.0, max_seq_len=131072, tie_embeddings=True,
                       rope_scaling=_llama3_rope(32.0))


def _llama31_8b() -> ModelConfig:  # meta-llama/Llama-3.1-8B
    return ModelConfig(vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336,
                       rope_theta=500000.0, max_seq_len=131072, rope_scaling=_llama3_rope(8.0))


def _llama2_7b() -> ModelConfig:  # meta-llama/Llama-2-7b-hf
    return ModelConfig(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, ffn_dim=11008,
                       max_seq_len=4096)


def _mistral_7b() -> ModelConfig:
    # mistralai/Mistral-7B-v0.1 uses a 4096-token sliding window over a 32768 context. lowmem runs full
    # causal attention, which equals the sliding window for sequences of at most 4096 tokens, hence
    # max_seq_len 4096 here.
    return ModelConfig(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336,
                       max_seq_len=4096)


def _tinyllama_1b() -> ModelConfig:  # TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T
    return ModelConfig(vocab_size=32000, dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, ffn_dim=5632,
                       max_seq_len=2048)


PRESETS: dict[str, Callable[[], ModelConfig]] = {
    "tiny": _tiny,
    "quickstart-5m": _quickstart_5m,
    "llama3.2-1b": _llama32_1b,
    "llama3.2-3b": _llama32_3b,
    "llama3.1-8b": _llama31_8b,
    "llama2-7b": _llama2_7b,
    "mistral-7b": _mistral_7b,
    "tinyllama-1.1b": _tinyllama_1b,
}


def preset(name: str) -> ModelConfig:
    """The preset config called `name`; ValueError listing the known names otherwise."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]()

