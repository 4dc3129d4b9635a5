"""Training a Qwen3-MoE adds the router's load-balancing loss as transformers does, and only in training."""

import json

import pytest
import torch

from lowmem.nn.llama import forward_with_router_loss, init_params
from lowmem.plan import plan
from lowmem.train import execute
from lowmem.train.dryrun import trace_memory
from lowmem.train.memory import LiveTensorTracker
from lowmem.train.session import build_training


def test_training_loss_adds_coef_times_aux_per_token(tiny_spec):
    p = plan(tiny_spec("model.preset=tiny-moe", "method.kind=full"), "cpu")
    assert p.model.router_aux_loss and p.model.router_aux_loss_coef == 0.01
    params = init_params(p.model, seed=0)
    run = build_training(p, dict(params), LiveTensorTracker())
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, p.model.vocab_size, (2, 32), generator=g)
    batch = {"tokens": tokens, "positions": torch.arange(32).expand(2, 32), "doc_ids": torch.zeros(2, 32, dtype=torch.long),
             "labels": torch.roll(tokens, -1, 1)}
    with torch.no_grad():
        train_sum, n = run.loss_of(batch, training=True)
        eval_sum, n_eval = run.loss_of(batch, training=False)
        _, aux = forward_with_router_loss(params, tokens, p.model, positions=batch["positions"],
                                          doc_ids=batch["doc_ids"])
    assert n == n_eval and aux > 1.0
    torch.testing.assert_close(train_sum - eval_sum, 0.01 * aux * n, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_moe_traces_on_fake_tensors_to_the_measured_peak(tiny_spec, tmp_path, precision):
    # the fake-tensor rule of torch._grouped_mm takes only bf16: fp32 traces through the loop over experts,
    # which saves the same tensors
    p = plan(tiny_spec("model.preset=tiny-moe", "train.steps=2", "output.save_final=false",
                       f"memory.precision={precision}"))
    traced = trace_memory(p, steps=2)
    execute(p, tmp_path, progress=False)
    measured = json.loads((tmp_path / "memory.json").read_text())
    assert traced.peak_bytes == pytest.approx(measured["measured_peak_bytes"], rel=0.02)
