"""The analytic memory estimate against what `execute` measures (LiveTensorTracker) on CPU."""

import itertools
import json

import pytest

from lowmem.plan import plan, with_strategies
from lowmem.plan.estimate import flops_per_token
from lowmem.train import execute

MATRIX = list(itertools.product(["fp32", "bf16"], ["off", "on"], [1, 2]))
# method x loss x adapter dropout, fp32, no checkpointing
PEFT_MATRIX = list(itertools.product(["full", "lora", "dora"], ["standard", "chunked", "fused"]))


@pytest.mark.parametrize("precision,checkpointing,accum", MATRIX)
def test_planned_peak_within_5_percent_of_measured(tiny_spec, tmp_path, precision, checkpointing, accum):
    spec = tiny_spec("train.steps=2", f"memory.precision={precision}",
                     f"memory.strategies.activation_checkpointing={checkpointing}", f"train.grad_accum={accum}",
                     "output.save_final=false",
                     # the standard loss: the planner's headroom rule would take the fused one (within the speed
                     # model's error); PEFT_MATRIX checks each loss
                     "memory.strategies.fused_cross_entropy=off", "memory.strategies.chunked_cross_entropy=off")
    p = plan(spec, "cpu")
    execute(p, tmp_path, progress=False)
    report = json.loads((tmp_path / "memory.json").read_text())
    assert report["measured_peak_bytes"] > 0
    assert abs(report["error"]) < 0.05, report


def test_checkpointing_measurably_lowers_peak_activations(tiny_spec, tmp_path):
    # a longer sequence so activations, not logits, dominate
    measured = {}
    for ck in ("off", "on"):
        spec = tiny_spec("train.steps=1", "train.seq_len=256", f"memory.strategies.activation_checkpointing={ck}",
                         "output.save_final=false")
        execute(plan(spec, "cpu"), tmp_path / ck, progress=False)
        measured[ck] = json.loads((tmp_path / ck / "memory.json").read_text())["measured_peak_bytes"]
    # 2 layers: from 2 blocks of saved tensors to 2 block inputs; the loss tensors stay
    assert measured["on"] < 0.8 * measured["off"], measured


def test_recompute_costs_flops(tiny_spec):
    spec = tiny_spec()
    off = plan(spec, "cpu")
    on = plan(tiny_spec("memory.strategies.activation_checkpointing=on"), "cpu")
    assert flops_per_token(on.model, on.strategies, 128) > flops_per_token(off.model, off.strategies, 128)
    assert on.tokens_per_s < off.tokens_per_s


@pytest.mark.parametrize("method,loss", PEFT_MATRIX)
def test_planned_peak_within_5_percent_for_methods_and_losses(tiny_spec, tmp_path, method, loss):
    overrides = ["train.steps=2", f"method.kind={method}", "output.save_final=false",
                 f"memory.strategies.chunked_cross_entropy={'on' if loss == 'chunked' else 'off'}",
                 f"memory.strategies.fused_cross_entropy={'on' if loss == 'fused' else 'off'}"]
    if method != "full":
        overrides += ["method.targets=[wq,wk,wv,wo,w1,w2,w3]", "method.dropout=0.1"]
    p = plan(tiny_spec(*overrides), "cpu")
    assert p.strategies.cross_entropy == loss
    execute(p, tmp_path, progress=False)
    report = json.loads((tmp_path / "memory.json").read_text())
    assert abs(report["error"]) < 0.05, report


def test_fused_loss_measurably_lowers_peak(tiny_spec, tmp_path):
    measured = {}
    for loss in ("standard", "fused"):
        spec = tiny_spec("train.steps=1", "output.save_final=false", "memory.strategies.chunked_cross_entropy=off",
                         f"memory.strategies.fused_cross_entropy={'on' if loss == 'fused' else 'off'}")
        execute(plan(spec, "cpu"), tmp_path / loss, progress=False)
        measured[loss] = json.loads((tmp_path / loss / "memory.json").read_text())["measured_peak_bytes"]
    # the tiny model's 3 x (512 x 1024) fp32 logits copies are 6 MiB of a ~15 MiB peak
    assert measured["fused"] < 0.75 * measured["standard"], measured


def test_optimizer_in_backward_measurably_lowers_peak_and_is_predicted(tiny_spec, tmp_path):
    # a short sequence, so the optimizer step (all gradients alive) is the peak without the strategy
    measured = {}
    for toggle in ("off", "on"):
        spec = tiny_spec("train.steps=2", "train.micro_batch=1", "train.seq_len=16", "train.clip_grad_norm=0",
                         "output.save_final=false", f"memory.strategies.optimizer_in_backward={toggle}")
        p = plan(spec, "cpu")
        execute(p, tmp_path / toggle, progress=False)
        report = json.loads((tmp_path / toggle / "memory.json").read_text())
        measured[toggle] = report["measured_peak_bytes"]
        assert abs(report["error"]) < 0.10, report
    assert measured["on"] < 0.9 * measured["off"], measured


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_qlora_base_is_measurably_smaller_and_predicted(tiny_spec, tmp_path, method):
    # quickstart-5m shapes: every projection divides into torchao's NF4 blocks
    spec = tiny_spec("train.steps=2", f"method.kind={method}", "model.preset=quickstart-5m",
                     "train.seq_len=64", "output.save_final=false")
    p = plan(spec, "cpu")
    execute(p, tmp_path, progress=False)
    report = json.loads((tmp_path / "memory.json").read_text())
    assert abs(report["error"]) < 0.10, report
    params = {c["component"]: c["measured_bytes"] for c in report["components"]}["parameters"]
    if method == "qlora":
        assert p.strategies.nf4_block_size == 64
        # projections are ~80% of this model's fp32 bytes; NF4 keeps ~13% of them
        assert params < 0.25 * 4 * p.n_params, params
    else:
        assert params > 4 * p.n_params


# precision x checkpointing x method; the fused loss so that activations (not logits) dominate at 256 tokens
MIXED_MATRIX = [("mixed-bf16", "off", "full"), ("mixed-bf16", "full", "full"), ("mixed-bf16", "selective", "full"),
                ("mixed-bf16", "off", "lora"), ("fp16", "off", "full"), ("fp32", "selective", "full"),
                ("bf16", "selective", "full"), ("fp32", "selective", "dora")]


@pytest.mark.parametrize("precision,checkpointing,method", MIXED_MATRIX)
def test_mixed_precision_and_selective_planned_within_5_percent(tiny_spec, tmp_path, precision, checkpointing,
                                                                 method):
    spec = tiny_spec("train.steps=2", "train.seq_len=256", f"memory.precision={precision}", f"method.kind={method}",
                     "memory.strategies.activation_checkpointing=off", "memory.strategies.fused_cross_entropy=on",
                     "memory.strategies.chunked_cross_entropy=off", "output.save_final=false")
    p = with_strategies(plan(spec, "cpu"), activation_checkpointing=checkpointing)
    execute(p, tmp_path, progress=False)
    report = json.loads((tmp_path / "memory.json").read_text())
    # full checkpointing with the fused loss at 256 tokens is planned 5.5% high in fp32 too (the fitted term for
    # the gradients around a recompute), and LoRA/DoRA blocks 4.5-5.6% low without any checkpointing at this
    # shape (block_activation_bytes' adapter terms); what mixed precision and selective add is within that
    tolerance = 0.065 if method != "full" else 0.06 if checkpointing == "full" else 0.05
    assert abs(report["error"]) < tolerance, report


def test_selective_costs_fewer_flops_than_full(tiny_spec):
    p = plan(tiny_spec(), "cpu")
    flops = {v: flops_per_token(p.model, with_strategies(p, activation_checkpointing=v).strategies, 128)
             for v in ("off", "selective", "full")}
    assert flops["off"] < flops["selective"] < flops["full"]


@pytest.mark.parametrize("precision", ["fp32", "mixed-bf16"])
def test_with_the_fused_loss_the_peak_is_the_final_norms_backward_and_is_predicted(tiny_spec, tmp_path, precision):
    # the fused loss's tensors are small, so the peak comes after it, in the final RMSNorm's backward (issue #16)
    spec = tiny_spec("train.steps=2", "train.seq_len=256", "output.save_final=false", f"memory.precision={precision}",
                     "memory.strategies.fused_cross_entropy=on", "memory.strategies.chunked_cross_entropy=off",
                     "memory.strategies.activation_checkpointing=off")
    p = plan(spec, "cpu")
    assert p.memory.peak_phase == "final norm's backward"
    execute(p, tmp_path, progress=False)
    report = json.loads((tmp_path / "memory.json").read_text())
    assert abs(report["error"]) < 0.03, report  # tiny: 0.8% fp32, 2.0-2.2% mixed-bf16
