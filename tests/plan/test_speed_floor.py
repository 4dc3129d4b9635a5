"""The speed model's per-step floor, and notes whose arithmetic equals the bytes they explain (issue #16)."""

import re
from pathlib import Path

import msgspec

from lowmem.nn.loss import loss_peak_bytes, standard_peak_terms
from lowmem.plan import plan
from lowmem.plan.estimate import estimate_tokens_per_s, step_floor_seconds, with_step_floor
from lowmem.plan.hardware import PROFILES
from lowmem.plan.planner import trainable_shapes
from lowmem.spec import load_spec
from lowmem.spec.units import format_bytes

QUICKSTART = Path(__file__).resolve().parents[2] / "examples" / "quickstart.toml"


def test_a_small_model_on_a_big_gpu_is_held_to_its_host_floor():
    p = plan(load_spec(QUICKSTART), "h100-80gb")
    shapes, trains = trainable_shapes(p.spec, p.model)
    floor = step_floor_seconds(p.model, p.strategies, p.spec.train, len(shapes), p.hardware)
    flops_only = estimate_tokens_per_s(p.model, p.strategies, p.spec.train.seq_len, p.hardware, trains)
    # 11.1M tokens/s from FLOPs alone; the ops' issue time bounds a 2,048-token step to well under 1M
    assert flops_only > 5e6
    assert p.tokens_per_s == p.tokens_per_step / floor < 1e6


def test_on_a_cpu_the_floor_adds_to_compute_and_on_cuda_the_longer_wins():
    assert with_step_floor(1000.0, 1.0, 1000, "cpu") == 500.0
    assert with_step_floor(1000.0, 0.5, 1000, "cuda") == 1000.0
    assert with_step_floor(1000.0, 2.0, 1000, "cuda") == 500.0


def test_the_floor_grows_with_micro_batches_and_offloading(tiny_spec):
    p = plan(tiny_spec(), "h100-80gb")
    base = step_floor_seconds(p.model, p.strategies, p.spec.train, 10, p.hardware)
    accum = plan(tiny_spec("train.grad_accum=2"), "h100-80gb")
    assert step_floor_seconds(p.model, p.strategies, accum.spec.train, 10, p.hardware) > 1.9 * base - 1e-4
    offloaded = msgspec.structs.replace(p.strategies, activation_offloading=True)
    assert step_floor_seconds(p.model, offloaded, p.spec.train, 10, p.hardware) > base


def test_standard_loss_terms_add_up_to_its_peak_in_every_dtype_case():
    for b in (2, 4):
        for proj in (2, 4):
            for wg in (False, True):
                terms = standard_peak_terms(4096, 128256, 4096, b, proj, wg)
                assert sum(n for _, n in terms) == loss_peak_bytes("standard", 4096, 128256, 4096, b,
                                                                   weight_grad=wg, projection_bytes=proj)


def test_the_8b_logits_note_shows_the_arithmetic_of_the_bytes_shown():
    # QLoRA's frozen bf16 head with an fp32 projection on a CPU: 3 fp32 (N, V) tensors and the head's fp32 copy
    sets = ["model.path=none", "model.preset=llama3.1-8b", "data.tokenizer.vocab_size=128256", "memory.budget=none",
            "memory.strategies.fused_cross_entropy=off", "memory.strategies.chunked_cross_entropy=off"]
    spec = load_spec(QUICKSTART.parent / "llama3.1-8b-qlora.toml", sets + ["memory.precision=bf16"])
    bf16_cpu = msgspec.structs.replace(PROFILES["cpu"], bf16_compute=True, memory_bytes=64 * 2**30)
    p = plan(spec, bf16_cpu)
    logits = next(c for c in p.memory.components if c.name == "logits")
    assert "3 x 4,096 tokens x 128,256 vocab x fp32 (5.87 GiB)" in logits.note
    assert "(128,256, 4,096) head cast to fp32 (1.96 GiB)" in logits.note
    parts = re.findall(r"\(([\d.]+) GiB\)", logits.note)
    assert abs(sum(float(x) for x in parts) - logits.bytes / 2**30) < 0.011
    assert format_bytes(logits.bytes) == "7.83 GiB"


def test_a_compile_alternative_of_unknown_length_never_claims_0_tokens_per_s(tiny_spec):
    p = plan(tiny_spec("train.steps=none", "train.epochs=1"), "h100-80gb")
    reason = next(d for d in p.decisions if d.strategy == "compile").reason
    assert "est. 0 tokens/s" not in reason and "once compiled, before its compile time" in reason


def test_the_floors_op_and_saved_tensor_counts_are_what_the_benchmark_counts():
    import importlib.util

    from lowmem.plan import estimate

    path = QUICKSTART.parents[1] / "benchmarks" / "step_floor.py"
    spec = importlib.util.spec_from_file_location("step_floor", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    ops = bench.per_block(bench.count_ops)
    assert ops == estimate.OPS_PER_BLOCK
    assert bench.count_ops(2) - 2 * ops == estimate.OPS_ROOT
    assert bench.per_block(bench.count_saved) == estimate.SAVED_TENSORS_PER_BLOCK
