"""Model configuration: the shape of a Llama-architecture decoder, its presets, and HF config.json I/O.

Imports no torch: the planner sizes a model from `param_shapes` without allocating anything.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable
from typing import Any, Literal, NamedTuple, NoReturn

import msgspec

__all__ = [
    "FAMILIES",
    "PRESETS",
    "LinearRopeScaling",
    "Llama3RopeScaling",
    "LongRopeScaling",
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


class LinearRopeScaling(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True,
                        tag="linear", tag_field="kind"):
    """Position interpolation (`rope_type: "linear"`): every inverse frequency divided by `factor`.

    Gemma 3 4B and up scale their global layers' RoPE this way (factor 8); the local layers stay unscaled.
    """

    factor: float

    def __post_init__(self) -> None:
        if not self.factor > 0:
            raise ValueError(f"rope_scaling.factor = {self.factor!r}: must be > 0")


class LongRopeScaling(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True,
                      tag="longrope", tag_field="kind"):
    """LongRoPE (`rope_type: "longrope"`, Phi-3.5 / Phi-4-mini; arXiv 2402.13753).

    Inverse frequency i is divided by `short_factor[i]` while a batch's positions stay within
    `original_max_position_embeddings`, by `long_factor[i]` once one goes beyond (transformers decides per
    forward from the largest position); cos and sin are multiplied by `attention_factor`. One factor per
    rotated pair: rotary_dim / 2 of each.
    """

    short_factor: tuple[float, ...]
    long_factor: tuple[float, ...]
    original_max_position_embeddings: int
    attention_factor: float

    def __post_init__(self) -> None:
        if len(self.short_factor) != len(self.long_factor) or not self.short_factor:
            raise ValueError(f"rope_scaling: short_factor has {len(self.short_factor)} values and long_factor "
                             f"{len(self.long_factor)}; both need one per rotated pair (rotary_dim / 2)")
        if not all(f > 0 for f in (*self.short_factor, *self.long_factor)):
            raise ValueError("rope_scaling.short_factor / long_factor: every factor must be > 0")
        if not (self.original_max_position_embeddings > 0 and self.attention_factor > 0):
            raise ValueError(f"rope_scaling: original_max_position_embeddings = "
                             f"{self.original_max_position_embeddings!r} and attention_factor = "
                             f"{self.attention_factor!r} must be > 0")


RopeScaling = Llama3RopeScaling | LinearRopeScaling | LongRopeScaling

# HF `model_type` → the architecture class written to config.json. The family names the checkpoint layout
# (tensor names, fused projections, config keys); what the model computes is set by the flags below.
FAMILIES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "gemma": "GemmaForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "olmo2": "Olmo2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
    "smollm3": "SmolLM3ForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
}
Family = Literal["llama", "mistral", "qwen2", "gemma", "gemma2", "phi3", "qwen3", "olmo2", "gemma3_text", "smollm3",
                 "qwen3_moe"]
# Multimodal `model_type`s whose text tower lowmem loads: model_type → (the text family, the architecture). Their
# config.json holds the text model under `text_config`; the other towers (vision encoder, projector) are left
# out, and `lowmem.nn.hf.load_hf` says so.
TEXT_TOWERS = {"gemma3": ("gemma3_text", "Gemma3ForConditionalGeneration")}


class ModelConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Shape of a decoder in the Llama lineage (RMSNorm, RoPE, GQA attention, gated MLP).

    `n_kv_heads < n_heads` is grouped-query attention; `ffn_dim` is the gated MLP's hidden size;
    `tie_embeddings` shares `tok_embeddings` as the output projection. The defaults are Llama; other
    families are the same layers with these flags set (see `from_hf_config`):

    - `family`: the HF layout the checkpoint is read from and written to (model_type, tensor names).
    - `rope_scaling`: Llama 3.1's (`Llama3RopeScaling`), linear (`LinearRopeScaling`, Gemma 3's global layers) or
      LongRoPE (`LongRopeScaling`, Phi-4-mini); None for plain RoPE.
    - `head_dim_override`: head size when it is not dim / n_heads (Gemma 7B: 3072 / 16 heads of 256).
    - `qkv_bias`: q, k and v projections carry biases `attn.bq/bk/bv` (Qwen2).
    - `sliding_window`: a query attends to at most this many keys, itself included (HF's
      `kv_idx > q_idx - sliding_window`), on the layers `sliding_layers` picks: "all" (Mistral, Phi-3),
      "even" (layers 0, 2, 4, ...; Gemma 2 alternates local and global layers) or the tuple of those layers'
      indices (Gemma 3: five local layers to one global, from HF's `layer_types`).
    - `rope_local_theta`: the RoPE base of the sliding-window layers, which are never rope-scaled; the
      global layers keep `rope_theta` and `rope_scaling` (Gemma 3's `rope_local_base_freq`). None: one RoPE.
    - `nope_layers`: layers whose q and k get no rotary embedding at all (SmolLM3's `no_rope_layers` zeros).
    - `partial_rotary_factor`: RoPE turns the first int(head_dim * factor) dims of each head and passes the
      rest through unchanged (Phi-4-mini: 0.75).
    - `mlp_act`: the gate activation, "silu" (SwiGLU) or "gelu_tanh" (GeGLU, Gemma).
    - `norm_unit_offset`: RMSNorm scales by (1 + weight), so stored norm weights are offsets (Gemma).
    - `embed_scale`: embeddings are multiplied by sqrt(dim), rounded to the compute dtype (Gemma).
    - `sandwich_norms`: attention and MLP outputs are normed again before the residual add, with
      `attn_post_norm` and `mlp_post_norm` (Gemma 2).
    - `query_pre_attn_scalar`: scores are scaled by its -1/2 power instead of head_dim's (Gemma 2).
    - `attn_logit_softcap`, `final_logit_softcap`: scores (resp. logits) become cap * tanh(x / cap)
      (Gemma 2). The final cap is applied by `llama.logits` and by the losses' `softcap` argument.
    - `qk_norm`: q and k are RMS-normed after their projection, before RoPE, by `attn.q_norm` and
      `attn.k_norm`: "head" normalises each head over head_dim with (head_dim,) weights shared by the heads
      (Qwen3); "projection" normalises the whole projection, weights (n_heads * head_dim,) and
      (n_kv_heads * head_dim,) (OLMo 2).
    - `pre_norms`: the sublayers' inputs are normed (`attn_norm`, `mlp_norm`). False (OLMo 2) leaves the
      block's only norms on the sublayer outputs, which then needs `sandwich_norms`.
    - `norm_scale_fp32`: RMSNorm multiplies by its weight in fp32 and casts afterwards, not before (OLMo 2;
      Gemma's unit-offset norm does so too). `rope_fp32`: RoPE rotates q and k in fp32 and casts back
      (OLMo 2's cos/sin stay fp32). Both change only rounding in bf16/fp16.
    - `n_experts` > 0 makes the MLP of the layers `is_moe_layer` picks a mixture of experts (Qwen3-MoE, see
      `lowmem.nn.moe`): a router `moe.router` (n_experts, D) sends each token to its `n_experts_per_token`
      best experts, each a gated MLP of hidden size `expert_ffn_dim`; `norm_topk_prob` renormalises the
      chosen experts' probabilities to sum to 1. A layer is sparse when (layer + 1) % `moe_layer_step` == 0
      and it is not in `dense_mlp_layers` (HF's `decoder_sparse_step`, `mlp_only_layers`); the other layers
      keep the dense MLP of `ffn_dim`. `router_aux_loss` (HF's `output_router_logits`) adds the Switch
      Transformer load-balancing loss times `router_aux_loss_coef` to the training loss, as transformers does.
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
    rope_scaling: RopeScaling | None = None
    family: Family = "llama"
    head_dim_override: int | None = None
    qkv_bias: bool = False
    sliding_window: int | None = None
    sliding_layers: Literal["all", "even"] | tuple[int, ...] = "all"
    mlp_act: Literal["silu", "gelu_tanh"] = "silu"
    norm_unit_offset: bool = False
    embed_scale: bool = False
    sandwich_norms: bool = False
    query_pre_attn_scalar: float | None = None
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    qk_norm: Literal["head", "projection"] | None = None
    pre_norms: bool = True
    norm_scale_fp32: bool = False
    rope_fp32: bool = False
    rope_local_theta: float | None = None
    nope_layers: tuple[int, ...] = ()
    partial_rotary_factor: float = 1.0
    n_experts: int = 0
    n_experts_per_token: int = 0
    expert_ffn_dim: int = 0
    norm_topk_prob: bool = False
    moe_layer_step: int = 1
    dense_mlp_layers: tuple[int, ...] = ()
    router_aux_loss: bool = False
    router_aux_loss_coef: float = 0.0

    def __post_init__(self) -> None:
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "max_seq_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} = {value!r}: must be a positive integer")
        for name in ("head_dim_override", "sliding_window"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise ValueError(f"{name} = {value!r}: must be a positive integer or None")
        for name in ("norm_eps", "rope_theta"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise ValueError(f"{name} = {value!r}: must be a positive number")
        for name in ("query_pre_attn_scalar", "attn_logit_softcap", "final_logit_softcap"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)
                                      or not value > 0):
                raise ValueError(f"{name} = {value!r}: must be a positive number or None")
        if self.head_dim_override is None and self.dim % self.n_heads:
            raise ValueError(
                f"dim = {self.dim}: must be divisible by n_heads = {self.n_heads} "
                f"(head_dim = dim / n_heads); pick a dim that is a multiple of {self.n_heads}, "
                "or set head_dim_override"
            )
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_kv_heads = {self.n_kv_heads}: must divide n_heads = {self.n_heads} "
                "(each kv head serves a whole group of query heads)"
            )
        if not self.pre_norms and not self.sandwich_norms:
            raise ValueError("pre_norms = False with sandwich_norms = False leaves a block without any norm; "
                             "set sandwich_norms = True (OLMo 2: norms on the sublayer outputs only)")
        if self.head_dim % 2:
            raise ValueError(
                f"dim = {self.dim}: head_dim = {self.head_dim} (dim / n_heads, or head_dim_override) must be "
                "even for RoPE"
            )
        self._check_rope_layout()
        if self.n_experts:
            _check_moe_fields(self)

    def _check_rope_layout(self) -> None:
        """Per-layer options name existing layers; the rotated part of a head is even and not empty."""
        for name in ("sliding_layers", "nope_layers"):
            layers = getattr(self, name)
            if isinstance(layers, tuple) and (list(layers) != sorted(set(layers))
                                              or any(not 0 <= i < self.n_layers for i in layers)):
                raise ValueError(f"{name} = {layers!r}: must be increasing layer indices in [0, {self.n_layers})")
        if self.rope_local_theta is not None and not self.rope_local_theta > 0:
            raise ValueError(f"rope_local_theta = {self.rope_local_theta!r}: must be a positive number or None")
        if not 0 < self.partial_rotary_factor <= 1 or self.rotary_dim % 2 or not self.rotary_dim:
            raise ValueError(f"partial_rotary_factor = {self.partial_rotary_factor!r}: must be in (0, 1] and turn an "
                             f"even, non-empty part of head_dim = {self.head_dim} (got rotary_dim {self.rotary_dim})")
        if isinstance(self.rope_scaling, LongRopeScaling) and len(self.rope_scaling.short_factor) * 2 != self.rotary_dim:
            raise ValueError(f"rope_scaling: {len(self.rope_scaling.short_factor)} longrope factors for rotary_dim "
                             f"{self.rotary_dim}; needs rotary_dim / 2 = {self.rotary_dim // 2}")

    @property
    def head_dim(self) -> int:
        return self.head_dim_override or self.dim // self.n_heads

    @property
    def rotary_dim(self) -> int:
        """How many leading dims of each head RoPE turns: int(head_dim * partial_rotary_factor), as HF rounds."""
        return int(self.head_dim * self.partial_rotary_factor)
    def is_moe_layer(self, layer: int) -> bool:
        """True where layer `layer` (0-based) routes its MLP to experts (HF Qwen3MoeDecoderLayer's rule)."""
        return self.n_experts > 0 and layer not in self.dense_mlp_layers and (layer + 1) % self.moe_layer_step == 0

    def layer_window(self, layer: int) -> int | None:
        """The sliding window of layer `layer` (0-based), or None where it attends to every earlier key."""
        if self.sliding_window is None:
            return None
        if self.sliding_layers == "even" and layer % 2:
            return None
        if isinstance(self.sliding_layers, tuple) and layer not in self.sliding_layers:
            return None
        return self.sliding_window

    def layer_rope(self, layer: int) -> Literal["global", "local"] | None:
        """Which RoPE layer `layer` applies: "local" (`rope_local_theta`, sliding layers), "global" (`rope_theta`
        and `rope_scaling`), or None for a NoPE layer."""
        if layer in self.nope_layers:
            return None
        if self.rope_local_theta is not None and self.layer_window(layer) is not None:
            return "local"
        return "global"

    @classmethod
    def from_hf_config(cls, d: dict[str, Any], source: str) -> ModelConfig:
        """Read a Hugging Face `config.json` dict of a Llama, Mistral, Qwen2, Gemma, Gemma 2, Gemma 3, Phi-3 /
        Phi-4-mini, Qwen3, OLMo 2 or SmolLM3 model, or the text tower of a multimodal Gemma 3 (`TEXT_TOWERS`).

        Accepts both the transformers 4.x layout (`rope_theta`, `rope_scaling`) and the 5.x one
        (`rope_parameters`, `layer_types`). Keys a family's config leaves out take that family's transformers
        defaults (`_FAMILY_DEFAULTS`; hub configs of Gemma 3 rely on them). `source` names the file in error
        messages. A key whose value lowmem does not implement is a ValueError naming the file, the key, the value
        and what is supported.
        """
        d, source = _text_config(d, source)
        model_type = _hf_model_type(d, source)
        hf = _HFConfig(_FAMILY_DEFAULTS.get(model_type, {}) | d, source, model_type)
        d = hf.d
        dim, n_heads = hf.need("hidden_size"), hf.need("num_attention_heads")
        # Qwen3Config defaults head_dim to 128, not hidden_size / heads: a Qwen3 config must say it.
        head_dim = hf.need("head_dim") if model_type == "qwen3" else d.get("head_dim")
        gemma = model_type in GEMMA_FAMILIES
        _hf_refuse_unimplemented(hf)
        family_fields = {**_hf_rope(hf), **_hf_sliding_window(hf), **_hf_gemma_options(hf), **_hf_qk_norm_options(hf)}
        try:
            return cls(
                vocab_size=hf.need("vocab_size"),
                dim=dim,
                n_layers=hf.need("num_hidden_layers"),
                n_heads=n_heads,
                n_kv_heads=d.get("num_key_value_heads") or n_heads,
                ffn_dim=hf.need("intermediate_size"),
                norm_eps=float(d.get("rms_norm_eps", 1e-5)),
                max_seq_len=d.get("max_position_embeddings", 2048),
                tie_embeddings=bool(d.get("tie_word_embeddings", gemma)),
                family=model_type,
                head_dim_override=head_dim if head_dim is not None and head_dim * n_heads != dim else None,
                qkv_bias=model_type == "qwen2",
                mlp_act=_hf_mlp_act(hf),
                norm_unit_offset=gemma,
                embed_scale=gemma,
                **family_fields,
                **_hf_moe_options(hf),
            )
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None

    def to_hf_config(self, dtype: str = "float32") -> dict[str, Any]:
        """The `config.json` dict transformers' `AutoConfig` / `AutoModelForCausalLM` accepts for `family`.

        Written in the transformers 4.x layout (`rope_theta`, `rope_scaling`), which 5.x also reads.
        """
        d: dict[str, Any] = {
            "architectures": [FAMILIES[self.family]],
            "model_type": self.family,
            "vocab_size": self.vocab_size,
            "hidden_size": self.dim,
            "intermediate_size": self.ffn_dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu" if self.mlp_act == "silu" else "gelu_pytorch_tanh",
            "max_position_embeddings": self.max_seq_len,
            "rms_norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": None,
            "tie_word_embeddings": self.tie_embeddings,
            "attention_dropout": 0.0,
            "initializer_range": 0.02,
            "torch_dtype": dtype,
            "dtype": dtype,
        }
        return d | _family_hf_keys(self) | {"rope_scaling": _rope_scaling_to_hf(self.rope_scaling)}


def _family_hf_keys(cfg: ModelConfig) -> dict[str, Any]:
    """The config.json keys only `cfg.family`'s transformers config has (windows, layer kinds, Gemma's scalars)."""
    d: dict[str, Any] = {}
    layer_types = ["full_attention" if cfg.layer_window(i) is None else "sliding_attention" for i in range(cfg.n_layers)]
    if cfg.family == "llama":
        d |= {"attention_bias": False, "mlp_bias": False, "pretraining_tp": 1}
    if cfg.family in ("mistral", "phi3", "gemma2", "gemma3_text"):
        d["sliding_window"] = cfg.sliding_window
    if cfg.family in ("qwen2", "qwen3", "qwen3_moe"):
        d |= {"use_sliding_window": False, "sliding_window": None, "max_window_layers": cfg.n_layers}
    if cfg.family == "qwen3_moe":
        d |= _hf_moe_keys(cfg)
    if cfg.family in GEMMA_FAMILIES:
        d["hidden_activation"] = "gelu_pytorch_tanh"
    if cfg.family in ("gemma2", "gemma3_text"):
        d |= {
            # transformers' Gemma2Config validates this field as an int
            "query_pre_attn_scalar": _int_if_whole(cfg.query_pre_attn_scalar),
            "attn_logit_softcapping": cfg.attn_logit_softcap,
            "final_logit_softcapping": cfg.final_logit_softcap,
            "layer_types": layer_types,
        }
    if cfg.family == "gemma3_text":
        d["rope_local_base_freq"] = cfg.rope_local_theta
    if cfg.family == "smollm3":
        # SmolLM3Config's default pad_token_id (128004) is outside a smaller vocabulary, as Phi-3's below
        d |= {"pad_token_id": None, "no_rope_layers": [int(i not in cfg.nope_layers) for i in range(cfg.n_layers)],
              "use_sliding_window": cfg.sliding_window is not None, "sliding_window": cfg.sliding_window,
              "layer_types": layer_types}
    if cfg.family == "phi3":
        long = cfg.rope_scaling if isinstance(cfg.rope_scaling, LongRopeScaling) else None
        # Phi3Config's default pad_token_id (32000) is outside a smaller vocabulary; lowmem keeps no pad id.
        d |= {"original_max_position_embeddings": long.original_max_position_embeddings if long else cfg.max_seq_len,
              "partial_rotary_factor": cfg.partial_rotary_factor, "resid_pdrop": 0.0, "embd_pdrop": 0.0,
              "pad_token_id": None}
    return d


def _rope_scaling_to_hf(s: RopeScaling | None) -> dict[str, Any] | None:
    """The `rope_scaling` dict transformers reads for `s` (4.x layout)."""
    if isinstance(s, LinearRopeScaling):
        return {"rope_type": "linear", "factor": s.factor}
    if isinstance(s, LongRopeScaling):
        return {"rope_type": "longrope", "short_factor": list(s.short_factor), "long_factor": list(s.long_factor),
                "original_max_position_embeddings": s.original_max_position_embeddings,
                "attention_factor": s.attention_factor}
    if isinstance(s, Llama3RopeScaling):
        return {"rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
                "high_freq_factor": s.high_freq_factor,
                "original_max_position_embeddings": s.original_max_position_embeddings}
    return None

def _hf_moe_keys(cfg: ModelConfig) -> dict[str, Any]:
    """Qwen3MoeConfig's mixture-of-experts keys for `cfg` (num_experts 0: every layer dense)."""
    return {
        "num_experts": cfg.n_experts,
        "num_experts_per_tok": cfg.n_experts_per_token or 1,
        "moe_intermediate_size": cfg.expert_ffn_dim or cfg.ffn_dim,
        "norm_topk_prob": cfg.norm_topk_prob,
        "decoder_sparse_step": cfg.moe_layer_step,
        "mlp_only_layers": list(cfg.dense_mlp_layers),
        "output_router_logits": cfg.router_aux_loss,
        "router_aux_loss_coef": cfg.router_aux_loss_coef,
    }


def _check_moe_fields(cfg: ModelConfig) -> None:
    """The mixture-of-experts fields of a config with n_experts > 0; ValueError naming the field otherwise."""
    if isinstance(cfg.n_experts, bool) or not isinstance(cfg.n_experts, int) or cfg.n_experts < 0:
        raise ValueError(f"n_experts = {cfg.n_experts!r}: must be a non-negative integer (0: dense MLP)")
    for name in ("n_experts_per_token", "expert_ffn_dim", "moe_layer_step"):
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} = {value!r}: must be a positive integer when n_experts > 0")
    if cfg.n_experts_per_token > cfg.n_experts:
        raise ValueError(f"n_experts_per_token = {cfg.n_experts_per_token}: must be at most n_experts = "
                         f"{cfg.n_experts} (each token picks that many distinct experts)")
    bad = [i for i in cfg.dense_mlp_layers if not 0 <= i < cfg.n_layers]
    if bad:
        raise ValueError(f"dense_mlp_layers = {list(cfg.dense_mlp_layers)}: {bad} outside layers 0..{cfg.n_layers - 1}")
    if not cfg.router_aux_loss_coef >= 0:
        raise ValueError(f"router_aux_loss_coef = {cfg.router_aux_loss_coef!r}: must be >= 0")


class _HFConfig(NamedTuple):
    """A config.json dict being read, with the file it came from and its (supported) model_type."""

    d: dict[str, Any]
    source: str
    model_type: str

    def need(self, key: str) -> Any:
        """d[key]; a ValueError naming the file and the key when it is missing or null."""
        if self.d.get(key) is None:
            raise ValueError(f"{self.source}: missing key {key!r}, needed to build a {self.model_type!r} model")
        return self.d[key]

    def refuse(self, key: str, supported: str) -> NoReturn:
        """A ValueError naming the file, `key`, its value, the model_type and what is `supported` instead."""
        raise ValueError(f"{self.source}: {key} = {self.d.get(key)!r} is not supported for model_type "
                         f"{self.model_type!r}; supported: {supported}")


def _text_config(d: dict[str, Any], source: str) -> tuple[dict[str, Any], str]:
    """`d` itself, or for a multimodal checkpoint (`TEXT_TOWERS`) its `text_config`, which then names the source.

    The multimodal config's own `tie_word_embeddings` (Gemma3Config's default: true) is the one its text tower's
    lm_head follows, whatever `text_config` says.
    """
    if d.get("model_type") not in TEXT_TOWERS:
        return d, source
    family, _ = TEXT_TOWERS[d["model_type"]]
    text = d.get("text_config")
    if not isinstance(text, dict):
        raise ValueError(f"{source}: model_type = {d['model_type']!r} needs a 'text_config' object (the text tower)")
    if text.get("model_type", family) != family:
        raise ValueError(f"{source}: text_config.model_type = {text['model_type']!r}; supported: {family!r}")
    tie = d.get("tie_word_embeddings", True)
    return {**text, "model_type": family, "tie_word_embeddings": tie}, f"{source} (text_config)"


def _hf_model_type(d: dict[str, Any], source: str) -> Family:
    """config.json's `model_type`, refused unless it is one of `FAMILIES` (naming the closest one)."""
    model_type = d.get("model_type")
    if model_type not in FAMILIES:
        closest = difflib.get_close_matches(str(model_type), [*FAMILIES, *TEXT_TOWERS], n=1, cutoff=0.0)
        raise ValueError(
            f"{source}: model_type = {model_type!r} is not supported; supported: "
            + ", ".join(repr(f) for f in [*FAMILIES, *TEXT_TOWERS])
            + (f" (closest name: {closest[0]!r})" if closest else "")
        )
    return model_type


def _hf_refuse_unimplemented(hf: _HFConfig) -> None:
    """Refuse the keys whose non-default value changes the math in a way lowmem does not implement.

    Only Qwen2's q, k, v biases exist in lowmem (implied by its model_type): `attention_bias` and `mlp_bias`
    must be false. transformers applies `attention_dropout` (and Phi-3's `resid_pdrop`, `embd_pdrop`) in train
    mode, which lowmem's block has no place for: they must be 0 (LoRA dropout is `method.dropout`). Gemma's
    `use_bidirectional_attention` drops causality.
    """
    d = hf.d
    for key in ("attention_bias", "mlp_bias", "use_bidirectional_attention"):
        if d.get(key, False):
            hf.refuse(key, "false")
    for key in ("attention_dropout", "resid_pdrop", "embd_pdrop"):
        if d.get(key) not in (None, 0, 0.0):
            hf.refuse(key, "0.0 (transformers drops out there in training; lowmem does not)")


def _hf_mlp_act(hf: _HFConfig) -> Literal["silu", "gelu_tanh"]:
    """`ModelConfig.mlp_act` from `hidden_activation` / `hidden_act`."""
    d = hf.d
    act = d.get("hidden_activation") or d.get("hidden_act", "silu")
    act_key = "hidden_activation" if d.get("hidden_activation") else "hidden_act"
    if hf.model_type in GEMMA_FAMILIES:
        # Gemma's released configs say "gelu" but the models were trained with the tanh approximation,
        # which transformers substitutes (GemmaConfig warns about it); so does lowmem.
        if act not in ("gelu_pytorch_tanh", "gelu"):
            hf.refuse(act_key, "'gelu_pytorch_tanh' (or legacy 'gelu', read as it)")
        return "gelu_tanh"
    if act != "silu":
        hf.refuse(act_key, "'silu'")
    return "silu"


def _hf_sliding_window(hf: _HFConfig) -> dict[str, Any]:
    """`ModelConfig.sliding_window` and `sliding_layers` from `sliding_window` (Mistral, Gemma 2, Phi-3), or from
    `layer_types` (Gemma 3, SmolLM3: any pattern).

    Refuses Qwen2's `use_sliding_window` where it would apply (on the layers from `max_window_layers` up), and
    a 5.x `layer_types` list other than the pattern lowmem runs for the other families.
    """
    d, model_type = hf.d, hf.model_type
    if model_type == "qwen3_moe" and d.get("use_sliding_window"):
        hf.refuse("use_sliding_window", "false (Qwen3-MoE's sliding window is not implemented)")
    if model_type in ("qwen2", "qwen3") and d.get("use_sliding_window") and \
            d.get("max_window_layers", 0) < hf.need("num_hidden_layers"):
        hf.refuse("use_sliding_window", f"false, or max_window_layers >= num_hidden_layers ({model_type}'s sliding "
                                        "window on the layers from max_window_layers up is not implemented)")
    # transformers 5's Qwen3Config (unlike Qwen2Config) derives sliding layers from `sliding_window` alone,
    # whatever `use_sliding_window` says; where it has no `layer_types` to say so, refuse what it would slide.
    if model_type == "qwen3" and d.get("layer_types") is None and d.get("sliding_window") is not None and \
            d.get("max_window_layers", 28) < hf.need("num_hidden_layers"):
        hf.refuse("sliding_window", "null, or max_window_layers >= num_hidden_layers (transformers 5 slides "
                                    "Qwen3's layers from max_window_layers up; not implemented)")
    if model_type in ("gemma3_text", "smollm3"):
        sliding = tuple(i for i, t in enumerate(_hf_layer_types(hf)) if t == "sliding_attention")
        window = hf.d.get("sliding_window") if sliding else None
        return {"sliding_window": window, "sliding_layers": sliding if window is not None else "all"}
    window = d.get("sliding_window") if model_type in ("mistral", "gemma2", "phi3") else None
    sliding_layers = "even" if model_type == "gemma2" else "all"
    _check_layer_types(d, hf.source, model_type, window, sliding_layers)
    return {"sliding_window": window, "sliding_layers": sliding_layers}


def _hf_layer_types(hf: _HFConfig) -> list[str]:
    """Gemma 3's and SmolLM3's per-layer attention kinds: `layer_types`, or what transformers derives without it
    (Gemma 3: every `sliding_window_pattern`-th layer global, the rest sliding; SmolLM3: sliding only on NoPE
    layers, and only with `use_sliding_window`)."""
    d, n_layers = hf.d, hf.need("num_hidden_layers")
    types = d.get("layer_types")
    if types is None and hf.model_type == "gemma3_text":
        pattern = d.get("sliding_window_pattern", d.get("_sliding_window_pattern", 6))
        types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n_layers)]
    if types is None:
        slides = d.get("use_sliding_window") and d.get("sliding_window") is not None
        types = ["sliding_attention" if slides and i in _hf_nope_layers(hf) else "full_attention"
                 for i in range(n_layers)]
    if len(types) != n_layers or set(types) - {"sliding_attention", "full_attention"}:
        hf.refuse("layer_types", f"{n_layers} entries, each 'sliding_attention' or 'full_attention'")
    if hf.model_type == "smollm3" and "sliding_attention" in types and not d.get("use_sliding_window"):
        return ["full_attention"] * n_layers  # SmolLM3Attention slides only with use_sliding_window
    return list(types)


def _hf_nope_layers(hf: _HFConfig) -> tuple[int, ...]:
    """SmolLM3's NoPE layers: the zeros of `no_rope_layers`, or every `no_rope_layer_interval`-th layer."""
    d, n_layers = hf.d, hf.need("num_hidden_layers")
    flags = d.get("no_rope_layers")
    if flags is None:
        interval = d.get("no_rope_layer_interval", 4)
        flags = [int((i + 1) % interval != 0) for i in range(n_layers)]
    if len(flags) < n_layers or set(flags[:n_layers]) - {0, 1}:
        hf.refuse("no_rope_layers", f"at least {n_layers} entries, each 1 (RoPE) or 0 (NoPE)")
    return tuple(i for i in range(n_layers) if not flags[i])


def _hf_rope(hf: _HFConfig) -> dict[str, Any]:
    """The `ModelConfig` RoPE fields: `rope_theta`, `rope_scaling`, and where the family has them
    `rope_local_theta` (Gemma 3), `nope_layers` (SmolLM3) and `partial_rotary_factor` (Phi-3 / Phi-4-mini), from
    4.x keys or 5.x `rope_parameters` (per layer type for Gemma 3)."""
    d = hf.d
    rope = d.get("rope_parameters") or {}
    if hf.model_type == "gemma3_text":
        return _hf_gemma3_rope(hf)
    partial = rope.get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0))
    if partial != 1.0 and hf.model_type != "phi3":
        raise ValueError(f"{hf.source}: partial_rotary_factor = {partial!r} is not supported for model_type "
                         f"{hf.model_type!r}; supported: 1.0 (RoPE over the whole head), or any factor for 'phi3'")
    theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
    scaling = d.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
    out = {"rope_theta": float(theta), "rope_scaling": _rope_scaling_from_hf(scaling, hf),
           "partial_rotary_factor": float(partial)}
    if hf.model_type == "smollm3":
        out["nope_layers"] = _hf_nope_layers(hf)
    return out


def _hf_gemma3_rope(hf: _HFConfig) -> dict[str, Any]:
    """Gemma 3's two RoPEs: the global layers' (`rope_theta`, scaled by `rope_scaling`) and the sliding layers'
    (`rope_local_base_freq`, never scaled); 5.x keeps them as `rope_parameters.full_attention` and
    `.sliding_attention`."""
    d = hf.d
    rope = d.get("rope_parameters") or {}
    full = rope.get("full_attention") or {}
    local = rope.get("sliding_attention") or {}
    if local.get("rope_type", "default") != "default":
        hf.refuse("rope_parameters", "'default' rope_type for sliding_attention (local layers are never scaled)")
    scaling = d.get("rope_scaling") or (full if full.get("rope_type", "default") != "default" else None)
    return {
        "rope_theta": float(full.get("rope_theta", d.get("rope_theta", 1_000_000.0))),
        "rope_local_theta": float(local.get("rope_theta", d.get("rope_local_base_freq", 10_000.0))),
        "rope_scaling": _rope_scaling_from_hf(scaling, hf),
    }


def _hf_gemma_options(hf: _HFConfig) -> dict[str, Any]:
    """The `ModelConfig` fields Gemma 2 and Gemma 3 set (sandwich norms, query scalar, soft-caps); {} otherwise.

    Gemma 3's attention takes no soft-cap in transformers (its `attn_logit_softcapping` is read but never
    applied): refused rather than guessed at.
    """
    if hf.model_type not in ("gemma2", "gemma3_text"):
        return {}
    d = hf.d
    if hf.model_type == "gemma3_text" and d.get("attn_logit_softcapping") is not None:
        hf.refuse("attn_logit_softcapping", "null (transformers' Gemma 3 reads it but never applies it)")
    return {
        "sandwich_norms": True,
        "query_pre_attn_scalar": float(hf.need("query_pre_attn_scalar")),
        "attn_logit_softcap": _float_or_none(d.get("attn_logit_softcapping")),
        "final_logit_softcap": _float_or_none(d.get("final_logit_softcapping")),
    }


def _hf_qk_norm_options(hf: _HFConfig) -> dict[str, Any]:
    """The `ModelConfig` fields of the q/k-norm families: Qwen3, Qwen3-MoE and Gemma 3 (per head) and OLMo 2 (whole
    projection, norms on the sublayer outputs only, fp32 norm scaling and RoPE); {} otherwise."""
    if hf.model_type in ("qwen3", "gemma3_text", "qwen3_moe"):
        return {"qk_norm": "head"}
    if hf.model_type == "olmo2":
        return {"qk_norm": "projection", "pre_norms": False, "sandwich_norms": True, "norm_scale_fp32": True,
                "rope_fp32": True}
    return {}


def _hf_moe_options(hf: _HFConfig) -> dict[str, Any]:
    """The mixture-of-experts fields of a Qwen3-MoE config.json; {} for the dense families.

    transformers 5 writes `num_experts` as `num_local_experts` (its attribute map); both are read.
    """
    if hf.model_type != "qwen3_moe":
        return {}
    d = hf.d
    n_experts = d.get("num_experts", d.get("num_local_experts"))
    if n_experts is None:
        raise ValueError("missing key 'num_experts', needed to build a 'qwen3_moe' model")  # the caller names the file
    if not n_experts:
        return {}  # every layer dense (HF: `num_experts > 0` is part of the sparse-layer rule)
    return {
        "n_experts": n_experts,
        "n_experts_per_token": hf.need("num_experts_per_tok"),
        "expert_ffn_dim": hf.need("moe_intermediate_size"),
        "norm_topk_prob": bool(d.get("norm_topk_prob", False)),
        "moe_layer_step": d.get("decoder_sparse_step", 1),
        "dense_mlp_layers": tuple(d.get("mlp_only_layers") or ()),
        "router_aux_loss": bool(d.get("output_router_logits", False)),
        "router_aux_loss_coef": float(d.get("router_aux_loss_coef", 0.001)),
    }


def _int_if_whole(value: float | None) -> float | int | None:
    return int(value) if value is not None and float(value).is_integer() else value


def _float_or_none(value: Any) -> float | None:
    return None if value is None else float(value)


def _check_layer_types(d: dict[str, Any], source: str, model_type: str, window: int | None,
                       sliding_layers: str) -> None:
    """Refuse a transformers 5.x `layer_types` list other than the pattern lowmem runs for this family."""
    layer_types = d.get("layer_types")
    if layer_types is None:
        return
    n_layers = d.get("num_hidden_layers", len(layer_types))
    if window is None:
        expected = ["full_attention"] * n_layers
    elif sliding_layers == "all":
        expected = ["sliding_attention"] * n_layers
    else:
        expected = ["full_attention" if i % 2 else "sliding_attention" for i in range(n_layers)]
    if list(layer_types) != expected:
        raise ValueError(
            f"{source}: layer_types = {layer_types!r} is not supported for model_type {model_type!r} with "
            f"sliding_window = {window!r}; supported: {expected!r}"
        )


# rope_type → the families whose transformers config accepts it and lowmem implements for them ("llama3" for all).
_ROPE_TYPES = {"llama3": None, "linear": ("gemma3_text",), "longrope": ("phi3",)}


def _rope_scaling_from_hf(scaling: dict[str, Any] | None, hf: _HFConfig) -> RopeScaling | None:
    if scaling is None:
        return None
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    kind = "longrope" if kind in ("su", "yarn") and hf.model_type == "phi3" else kind  # Phi3Config renames these
    if kind == "default":
        return None
    families = _ROPE_TYPES.get(kind, ())
    if families is not None and hf.model_type not in families:
        allowed = [k for k, f in _ROPE_TYPES.items() if f is None or hf.model_type in f]
        raise ValueError(f"{hf.source}: rope_scaling.rope_type = {kind!r} is not supported for model_type "
                         f"{hf.model_type!r}; supported: {' or '.join(map(repr, allowed))} or none")
    keys = {"llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
            "linear": ("factor",), "longrope": ("short_factor", "long_factor")}[kind]
    missing = [k for k in keys if k not in scaling]
    if missing:
        raise ValueError(f"{hf.source}: rope_scaling is missing {missing} (needed for rope_type {kind!r})")
    if kind == "linear":
        return LinearRopeScaling(factor=float(scaling["factor"]))
    if kind == "longrope":
        return _longrope_from_hf(scaling, hf)
    return Llama3RopeScaling(
        factor=float(scaling["factor"]),
        low_freq_factor=float(scaling["low_freq_factor"]),
        high_freq_factor=float(scaling["high_freq_factor"]),
        original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
    )


def _longrope_from_hf(scaling: dict[str, Any], hf: _HFConfig) -> LongRopeScaling:
    """LongRoPE as transformers resolves it: `factor` defaults to max_position_embeddings over the original
    context, and `attention_factor` to sqrt(1 + ln(factor) / ln(original)) (1 when factor <= 1)."""
    original = scaling.get("original_max_position_embeddings", hf.d.get("original_max_position_embeddings"))
    if original is None:
        hf.refuse("original_max_position_embeddings", "a positive integer (needed by rope_type 'longrope')")
    attention = scaling.get("attention_factor")
    if attention is None:
        factor = scaling.get("factor") or hf.d.get("max_position_embeddings", 2048) / original
        attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    return LongRopeScaling(short_factor=tuple(float(f) for f in scaling["short_factor"]),
                           long_factor=tuple(float(f) for f in scaling["long_factor"]),
                           original_max_position_embeddings=int(original), attention_factor=float(attention))


# Defaults of the families whose hub configs leave keys out (transformers' Gemma3TextConfig, SmolLM3Config;
# tests/nn/test_families.py checks them against those classes).
_FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "gemma3_text": {"vocab_size": 262_208, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
                    "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256,
                    "hidden_activation": "gelu_pytorch_tanh", "max_position_embeddings": 131_072,
                    "rms_norm_eps": 1e-6, "tie_word_embeddings": True, "query_pre_attn_scalar": 256,
                    "sliding_window": 4096},
    "smollm3": {"vocab_size": 128_256, "hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36,
                "num_attention_heads": 16, "num_key_value_heads": 4, "max_position_embeddings": 32768,
                "rms_norm_eps": 1e-6, "rope_theta": 2_000_000.0, "tie_word_embeddings": True},
}
GEMMA_FAMILIES = ("gemma", "gemma2", "gemma3_text")


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
        if cfg.pre_norms:
            shapes[p + "attn_norm"] = (D,)
        shapes[p + "attn.wq"] = (q_dim, D)
        shapes[p + "attn.wk"] = (kv_dim, D)
        shapes[p + "attn.wv"] = (kv_dim, D)
        shapes[p + "attn.wo"] = (D, q_dim)
        if cfg.qkv_bias:
            shapes[p + "attn.bq"] = (q_dim,)
            shapes[p + "attn.bk"] = (kv_dim,)
            shapes[p + "attn.bv"] = (kv_dim,)
        if cfg.qk_norm is not None:
            shapes[p + "attn.q_norm"] = (cfg.head_dim,) if cfg.qk_norm == "head" else (q_dim,)
            shapes[p + "attn.k_norm"] = (cfg.head_dim,) if cfg.qk_norm == "head" else (kv_dim,)
        if cfg.sandwich_norms:
            shapes[p + "attn_post_norm"] = (D,)
        if cfg.pre_norms:
            shapes[p + "mlp_norm"] = (D,)
        if cfg.is_moe_layer(i):
            shapes |= _moe_shapes(cfg, p)
        else:
            shapes[p + "mlp.w1"] = (F, D)
            shapes[p + "mlp.w2"] = (D, F)
            shapes[p + "mlp.w3"] = (F, D)
        if cfg.sandwich_norms:
            shapes[p + "mlp_post_norm"] = (D,)
    shapes["norm"] = (D,)
    if not cfg.tie_embeddings:
        shapes["output"] = (V, D)
    return shapes


def _moe_shapes(cfg: ModelConfig, prefix: str) -> dict[str, tuple[int, ...]]:
    """A sparse layer's router (E, D) and experts, each expert's (out, in) matrix stacked along the rows:
    w1, w3 (E * Fe, D) and w2 (E * D, Fe), so expert e's gate projection is rows e * Fe .. (e + 1) * Fe of w1.

    2-D, not (E, out, in): torchao's NF4 takes at most two dimensions, and HF's per-expert tensors are then
    row blocks of one canonical tensor. `lowmem.nn.moe` views them as (E, out, in).
    """
    D, E, Fe = cfg.dim, cfg.n_experts, cfg.expert_ffn_dim
    return {prefix + "moe.router": (E, D), prefix + "moe.w1": (E * Fe, D), prefix + "moe.w2": (E * D, Fe),
            prefix + "moe.w3": (E * Fe, D)}


def count_params(cfg: ModelConfig) -> int:
    """Number of parameters, counted analytically (tied output counted once)."""
    D, F, V, L = cfg.dim, cfg.ffn_dim, cfg.vocab_size, cfg.n_layers
    q_dim, kv_dim = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    attn = 2 * D * q_dim + 2 * D * kv_dim  # wq, wo; wk, wv
    attn += (q_dim + 2 * kv_dim) if cfg.qkv_bias else 0  # bq, bk, bv
    n_moe = sum(cfg.is_moe_layer(i) for i in range(L))
    mlp = 3 * D * F  # w1, w2, w3 (a dense layer)
    moe = cfg.n_experts * D + 3 * cfg.n_experts * D * cfg.expert_ffn_dim  # router; every expert's w1, w2, w3
    norms = (2 * cfg.pre_norms + 2 * cfg.sandwich_norms) * D  # attn_norm, mlp_norm; attn_post_norm, mlp_post_norm
    if cfg.qk_norm == "head":
        norms += 2 * cfg.head_dim  # q_norm, k_norm
    elif cfg.qk_norm == "projection":
        norms += q_dim + kv_dim
    block = attn + norms
    embed = V * D * (1 if cfg.tie_embeddings else 2)
    return embed + L * block + (L - n_moe) * mlp + n_moe * moe + D


# ---------------------------------------------------------------------------------------------------------
# Presets: functions returning a whole config. Real sizes follow the published HF config.json files.


def _tiny() -> ModelConfig:
    return ModelConfig(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=172)


def _tiny_moe() -> ModelConfig:
    # `_tiny` with Qwen3-MoE's sparse MLP: 8 experts of 32, 2 per token, load-balancing loss on
    return ModelConfig(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=172, family="qwen3_moe",
                       qk_norm="head", n_experts=8, n_experts_per_token=2, expert_ffn_dim=32, norm_topk_prob=True,
                       router_aux_loss=True, router_aux_loss_coef=0.01)


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
    # mistralai/Mistral-7B-v0.1 uses a 4096-token sliding window over a 32768 context; full causal attention
    # equals the sliding window for sequences of at most 4096 tokens, hence max_seq_len 4096 and no window.
    return ModelConfig(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336,
                       max_seq_len=4096, family="mistral")


def _mistral_7b_v03() -> ModelConfig:  # mistralai/Mistral-7B-v0.3 (no sliding window since v0.2)
    return ModelConfig(vocab_size=32768, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336,
                       rope_theta=1000000.0, max_seq_len=32768, family="mistral")


def _qwen25_05b() -> ModelConfig:  # Qwen/Qwen2.5-0.5B
    return ModelConfig(vocab_size=151936, dim=896, n_layers=24, n_heads=14, n_kv_heads=2, ffn_dim=4864,
                       norm_eps=1e-6, rope_theta=1000000.0, max_seq_len=32768, tie_embeddings=True,
                       family="qwen2", qkv_bias=True)


def _qwen25_7b() -> ModelConfig:  # Qwen/Qwen2.5-7B
    return ModelConfig(vocab_size=152064, dim=3584, n_layers=28, n_heads=28, n_kv_heads=4, ffn_dim=18944,
                       norm_eps=1e-6, rope_theta=1000000.0, max_seq_len=131072, family="qwen2", qkv_bias=True)


def _gemma_2b() -> ModelConfig:  # google/gemma-2b
    return ModelConfig(vocab_size=256000, dim=2048, n_layers=18, n_heads=8, n_kv_heads=1, ffn_dim=16384,
                       norm_eps=1e-6, max_seq_len=8192, tie_embeddings=True, family="gemma",
                       mlp_act="gelu_tanh", norm_unit_offset=True, embed_scale=True)  # head_dim 2048 / 8 = 256


def _gemma2_2b() -> ModelConfig:  # google/gemma-2-2b
    return ModelConfig(vocab_size=256000, dim=2304, n_layers=26, n_heads=8, n_kv_heads=4, ffn_dim=9216,
                       norm_eps=1e-6, max_seq_len=8192, tie_embeddings=True, family="gemma2",
                       head_dim_override=256, sliding_window=4096, sliding_layers="even", mlp_act="gelu_tanh",
                       norm_unit_offset=True, embed_scale=True, sandwich_norms=True,
                       query_pre_attn_scalar=256.0, attn_logit_softcap=50.0, final_logit_softcap=30.0)


def _phi3_mini() -> ModelConfig:  # microsoft/Phi-3-mini-4k-instruct
    return ModelConfig(vocab_size=32064, dim=3072, n_layers=32, n_heads=32, n_kv_heads=32, ffn_dim=8192,
                       max_seq_len=4096, family="phi3", sliding_window=2047)


def _qwen3(dim: int, ffn_dim: int, n_layers: int, n_heads: int, tie: bool) -> ModelConfig:
    # Qwen/Qwen3-{0.6B,1.7B,4B,8B} config.json: vocab_size 151936, num_key_value_heads 8, head_dim 128 (so
    # heads * head_dim is not hidden_size for 0.6B and 4B), rms_norm_eps 1e-6, rope_theta 1000000,
    # max_position_embeddings 40960, tie_word_embeddings true up to 4B, no attention bias, no sliding window.
    return ModelConfig(vocab_size=151936, dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=8,
                       ffn_dim=ffn_dim, norm_eps=1e-6, rope_theta=1000000.0, max_seq_len=40960,
                       tie_embeddings=tie, family="qwen3", qk_norm="head",
                       head_dim_override=None if 128 * n_heads == dim else 128)


def _qwen3_30b_a3b() -> ModelConfig:
    # Qwen/Qwen3-30B-A3B config.json: hidden_size 2048, 48 layers, 32 heads of head_dim 128, 4 kv heads,
    # 128 experts of moe_intermediate_size 768, 8 per token, norm_topk_prob true, decoder_sparse_step 1, no
    # mlp_only_layers (so intermediate_size 6144 is unused), vocab 151936, untied, rms_norm_eps 1e-6,
    # rope_theta 1000000, max_position_embeddings 40960, output_router_logits false, router_aux_loss_coef 0.001.
    return ModelConfig(vocab_size=151936, dim=2048, n_layers=48, n_heads=32, n_kv_heads=4, ffn_dim=6144,
                       norm_eps=1e-6, rope_theta=1000000.0, max_seq_len=40960, family="qwen3_moe", qk_norm="head",
                       head_dim_override=128, n_experts=128, n_experts_per_token=8, expert_ffn_dim=768,
                       norm_topk_prob=True, router_aux_loss_coef=0.001)


def _olmo2_1b() -> ModelConfig:
    # allenai/OLMo-2-0425-1B config.json: hidden_size 2048, intermediate_size 8192, 16 layers, 16 heads (no
    # GQA), vocab_size 100352, rms_norm_eps 1e-6, rope_theta 500000, max_position_embeddings 4096, untied.
    return ModelConfig(vocab_size=100352, dim=2048, n_layers=16, n_heads=16, n_kv_heads=16, ffn_dim=8192,
                       norm_eps=1e-6, rope_theta=500000.0, max_seq_len=4096, family="olmo2",
                       qk_norm="projection", pre_norms=False, sandwich_norms=True, norm_scale_fp32=True,
                       rope_fp32=True)


def _gemma3(vocab_size: int, dim: int, ffn_dim: int, n_layers: int, n_heads: int, n_kv_heads: int, window: int,
            max_seq_len: int, scaling: RopeScaling | None) -> ModelConfig:
    # google/gemma-3-{1b-pt, 4b-pt (its text_config)} config.json: head_dim 256, query_pre_attn_scalar 256,
    # rms_norm_eps 1e-6, rope_theta 1000000 (global) and rope_local_base_freq 10000 (local), five sliding layers
    # to one global (sliding_window_pattern 6), tied, no soft-capping.
    return ModelConfig(vocab_size=vocab_size, dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
                       ffn_dim=ffn_dim, norm_eps=1e-6, rope_theta=1_000_000.0, max_seq_len=max_seq_len,
                       tie_embeddings=True, rope_scaling=scaling, family="gemma3_text", head_dim_override=256,
                       sliding_window=window, sliding_layers=tuple(i for i in range(n_layers) if (i + 1) % 6),
                       mlp_act="gelu_tanh", norm_unit_offset=True, embed_scale=True, sandwich_norms=True,
                       query_pre_attn_scalar=256.0, qk_norm="head", rope_local_theta=10_000.0)


def _phi4_mini() -> ModelConfig:
    # microsoft/Phi-4-mini-instruct config.json: hidden_size 3072, 32 layers, 24 heads, 8 kv heads, intermediate
    # 8192, vocab 200064, tied, partial_rotary_factor 0.75 (96 of 128 head dims), rms_norm_eps 1e-5, rope_theta
    # 10000, sliding_window 262144 (longer than its context: no window). Its longrope short/long factors (48
    # each) are the checkpoint's own numbers and come with its config.json; the preset keeps plain RoPE over the
    # original 4096-token context, where the short factors would apply.
    return ModelConfig(vocab_size=200064, dim=3072, n_layers=32, n_heads=24, n_kv_heads=8, ffn_dim=8192,
                       max_seq_len=4096, tie_embeddings=True, family="phi3", partial_rotary_factor=0.75)


def _smollm3_3b() -> ModelConfig:
    # HuggingFaceTB/SmolLM3-3B config.json: hidden_size 2048, 36 layers, 16 heads, 4 kv heads, intermediate
    # 11008, vocab 128256, rope_theta 5000000, max_position_embeddings 65536, rms_norm_eps 1e-6, tied; every
    # fourth layer has no RoPE (no_rope_layer_interval 4: layers 3, 7, ..., 35), no sliding window.
    return ModelConfig(vocab_size=128256, dim=2048, n_layers=36, n_heads=16, n_kv_heads=4, ffn_dim=11008,
                       norm_eps=1e-6, rope_theta=5_000_000.0, max_seq_len=65536, tie_embeddings=True,
                       family="smollm3", nope_layers=tuple(range(3, 36, 4)))


def _tinyllama_1b() -> ModelConfig:  # TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T
    return ModelConfig(vocab_size=32000, dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, ffn_dim=5632,
                       max_seq_len=2048)


PRESETS: dict[str, Callable[[], ModelConfig]] = {
    "tiny": _tiny,
    "tiny-moe": _tiny_moe,
    "quickstart-5m": _quickstart_5m,
    "llama3.2-1b": _llama32_1b,
    "llama3.2-3b": _llama32_3b,
    "llama3.1-8b": _llama31_8b,
    "llama2-7b": _llama2_7b,
    "mistral-7b": _mistral_7b,
    "mistral-7b-v0.3": _mistral_7b_v03,
    "qwen2.5-0.5b": _qwen25_05b,
    "qwen2.5-7b": _qwen25_7b,
    "gemma-2b": _gemma_2b,
    "gemma2-2b": _gemma2_2b,
    "phi3-mini": _phi3_mini,
    "qwen3-0.6b": lambda: _qwen3(dim=1024, ffn_dim=3072, n_layers=28, n_heads=16, tie=True),
    "qwen3-1.7b": lambda: _qwen3(dim=2048, ffn_dim=6144, n_layers=28, n_heads=16, tie=True),
    "qwen3-4b": lambda: _qwen3(dim=2560, ffn_dim=9728, n_layers=36, n_heads=32, tie=True),
    "qwen3-8b": lambda: _qwen3(dim=4096, ffn_dim=12288, n_layers=36, n_heads=32, tie=False),
    "qwen3-30b-a3b": _qwen3_30b_a3b,
    "olmo2-1b": _olmo2_1b,
    "gemma3-1b": lambda: _gemma3(vocab_size=262144, dim=1152, ffn_dim=6912, n_layers=26, n_heads=4, n_kv_heads=1,
                                 window=512, max_seq_len=32768, scaling=None),
    "gemma3-4b": lambda: _gemma3(vocab_size=262208, dim=2560, ffn_dim=10240, n_layers=34, n_heads=8, n_kv_heads=4,
                                 window=1024, max_seq_len=131072, scaling=LinearRopeScaling(factor=8.0)),
    "phi4-mini": _phi4_mini,
    "smollm3-3b": _smollm3_3b,
    "tinyllama-1.1b": _tinyllama_1b,
}


def preset(name: str) -> ModelConfig:
    """The preset config called `name`; ValueError listing the known names otherwise."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]()

