"""The planner's mixture-of-experts terms (expert weights, routed activations, load imbalance) against what a
run measures on CPU."""

import json

import pytest
import torch

from lowmem.nn.config import preset
from lowmem.nn.llama import init_params, residual_block_with_stats
from lowmem.plan import plan
from lowmem.plan.estimate import FULL, MOE_LOAD_IMBALANCE, block_activation_bytes, mlp_token_bytes
from lowmem.train import execute


@pytest.mark.parametrize("method", ["full", "lora"])
def test_moe_planned_peak_within_5_percent_of_measured(tiny_spec, tmp_path, method):
    spec = tiny_spec("model.preset=tiny-moe", "train.steps=2", f"method.kind={method}",
                     "memory.strategies.activation_checkpointing=off", "output.save_final=false",
                     *(["method.targets=[\"wq\",\"wk\",\"wv\",\"wo\",\"w1\",\"w2\",\"w3\"]"] if method == "lora" else []))
    p = plan(spec, "cpu")
    execute(p, tmp_path, progress=False)
    report = json.loads((tmp_path / "memory.json").read_text())
    assert report["measured_peak_bytes"] > 0
    assert abs(report["error"]) < 0.05, report


def _saved_bytes(router_scale: float, collapse: bool) -> tuple[int, torch.Tensor]:
    """Bytes autograd saves in one sparse block's MLP of tiny-moe (distinct storages), and its expert counts."""
    cfg = preset("tiny-moe")
    params = init_params(cfg, seed=0)
    w = {n.removeprefix("layers.0."): t for n, t in params.items() if n.startswith("layers.0.")}
    router = torch.randn(w["moe.router"].shape, generator=torch.Generator().manual_seed(0)) * router_scale
    if collapse:  # every token's top 2 are experts 0 and 1
        router = torch.zeros_like(router)
        router[0], router[1] = 50.0, 49.0
    w["moe.router"] = router
    g = torch.Generator().manual_seed(1)
    # collapsed: positive inputs, so that a router row of 50s outscores one of 49s and both beat the zero rows
    h = torch.rand(2, 64, cfg.dim, generator=g).add(0.5) if collapse else torch.randn(2, 64, cfg.dim, generator=g)
    h.requires_grad_(True)
    x = h * 1.0
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out, stats = residual_block_with_stats(x, w, lambda a: torch.zeros_like(a), cfg)
    kept = {p: n for p, n in storages.items() if p not in {t.untyped_storage().data_ptr() for t in params.values()}}
    return sum(kept.values()), stats[0]


def test_load_imbalance_costs_no_memory_as_the_planner_assumes():
    balanced, counts_b = _saved_bytes(1.0, collapse=False)
    collapsed, counts_c = _saved_bytes(1.0, collapse=True)
    assert (counts_c > 0).sum() == 2 and (counts_b > 0).sum() > 4  # the router really collapsed / spread
    assert MOE_LOAD_IMBALANCE == 1.0 and balanced == collapsed


def test_routed_activations_scale_with_top_k_not_with_the_experts():
    cfg = preset("tiny-moe")
    base = mlp_token_bytes(cfg, 4, FULL)
    more_experts = mlp_token_bytes(cfg.__class__(**{**_fields(cfg), "n_experts": 64}), 4, FULL)
    more_k = mlp_token_bytes(cfg.__class__(**{**_fields(cfg), "n_experts_per_token": 4}), 4, FULL)
    assert more_experts - base == (64 - 8) * (4 + 4)  # only the router's (N, E) probabilities grow
    assert more_k > 1.9 * base - 8 * 8 * 2
    assert block_activation_bytes(cfg, 256, 2, "fp32", packed=False) > 0


def _fields(cfg):
    import msgspec

    return msgspec.structs.asdict(cfg)
