"""Functional models: parameters are a flat dict of tensors with canonical names, models are functions.

    cfg = preset("tiny")
    params = init_params(cfg, seed=0)
    hidden = forward(params, tokens, cfg)                       # (B, T, D)
    loss_sum, n = cross_entropy_sum(hidden, output_weight(params, cfg), labels)
"""

from lowmem.nn.config import (
    PRESETS,
    LinearRopeScaling,
    Llama3RopeScaling,
    LongRopeScaling,
    ModelConfig,
    count_params,
    param_shapes,
    preset,
)
from lowmem.nn.hf import load_hf, save_hf
from lowmem.nn.llama import forward, init_params, logits, output_weight
from lowmem.nn.loss import cross_entropy_sum

__all__ = [
    "PRESETS",
    "LinearRopeScaling",
    "Llama3RopeScaling",
    "LongRopeScaling",
    "ModelConfig",
    "count_params",
    "cross_entropy_sum",
    "forward",
    "init_params",
    "load_hf",
    "logits",
    "output_weight",
    "param_shapes",
    "preset",
    "save_hf",
]
