"""Precision (mixed-bf16, fp16 with loss scaling), selective checkpointing and compile: numbers and memory."""

import json
import shutil
from itertools import repeat

import msgspec
import pytest
import torch
from safetensors.torch import load_file

from lowmem.nn import init_params
from lowmem.nn.config import preset
from lowmem.nn.llama import block, block_param_names, rope_cache
from lowmem.plan import plan
from lowmem.plan.estimate import estimate_memory, selective_block_bytes
from lowmem.plan.planner import trainable_shapes
from lowmem.train import execute
from lowmem.train.memory import LiveTensorTracker
from lowmem.train.session import build_training
from lowmem.train.step import train_step
from lowmem.train.strategies import InBackwardOptimizer, LossScaler, block_runner, param_dtype


def _losses(run_dir):
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _peak(run_dir):
    return json.loads((run_dir / "memory.json").read_text())["measured_peak_bytes"]


def _with(p, **strategies):
    """The plan with some strategies set as the planner would (values the spec cannot force)."""
    return msgspec.structs.replace(p, strategies=msgspec.structs.replace(p.strategies, **strategies))


def _batch(cfg, B=2, T=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"tokens": torch.randint(0, cfg.vocab_size, (B, T), generator=g),
            "labels": torch.randint(0, cfg.vocab_size, (B, T), generator=g),
            "positions": torch.arange(T).expand(B, T).contiguous(),
            "doc_ids": torch.zeros(B, T, dtype=torch.int64)}


def _grads(p, batch):
    run = build_training(p, init_params(p.model, seed=0, dtype=param_dtype(p.strategies)), LiveTensorTracker())
    loss, _ = run.loss_of(batch)
    loss.backward()
    return loss.detach(), {n: t.grad for n, t in run.trainable_params.items()}


# -- mixed-bf16 ------------------------------------------------------------------------------------------


def test_mixed_bf16_keeps_fp32_masters_and_computes_in_bf16(tiny_spec):
    p = plan(tiny_spec("memory.precision=mixed-bf16"), "cpu")
    run = build_training(p, init_params(p.model, seed=0, dtype=param_dtype(p.strategies)), LiveTensorTracker())
    assert {t.dtype for t in run.params.values()} == {torch.float32}
    cfg = p.model
    seen = []

    def probe(h, *tensors):  # stands in for the block: records the dtypes it is given
        seen.extend(t.dtype for t in (h, *tensors[:-3]))
        return block(h, *tensors, cfg=cfg)

    cos, sin = rope_cache(cfg, torch.arange(8).expand(1, 8))
    weights = [run.params[f"layers.0.{n}"] for n in block_param_names(cfg)]
    out = block_runner(p.strategies, run.params)(probe, torch.randn(1, 8, cfg.dim), *weights, cos, sin, None)
    assert out.dtype == torch.bfloat16 and set(seen) == {torch.bfloat16}
    loss, _ = run.loss_of(_batch(cfg))
    loss.backward()
    run.optimizer.step()
    assert {t.grad.dtype for t in run.trainable_params.values()} == {torch.float32}
    states = [v for s in run.optimizer.state.values() for k, v in s.items() if k != "step"]
    assert states and {v.dtype for v in states} == {torch.float32}
    assert {t.dtype for t in run.params.values()} == {torch.float32}


def test_mixed_bf16_losses_stay_close_to_fp32(tiny_spec, tmp_path):
    # bf16 has 8 mantissa bits (relative rounding 2**-9): four steps of a fresh tiny model stay within 0.3% of fp32
    ref = _run(tiny_spec("train.steps=4"), tmp_path / "fp32")
    mixed = _run(tiny_spec("train.steps=4", "memory.precision=mixed-bf16"), tmp_path / "mixed")
    assert mixed == pytest.approx(ref, rel=3e-3)
    assert mixed != ref  # it really computed in bf16


def _run(spec, out):
    execute(plan(spec, "cpu"), out, progress=False)
    return _losses(out)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_mixed_bf16_memory_sits_between_bf16_and_fp32(tiny_spec, tmp_path, method):
    # activations dominate: fused loss (no logits), 256 tokens per row
    shape = ("train.steps=2", "train.seq_len=256", "output.save_final=false", f"method.kind={method}",
             "memory.strategies.fused_cross_entropy=on", "memory.strategies.chunked_cross_entropy=off",
             "memory.strategies.activation_checkpointing=off")
    peaks, reports = {}, {}
    for precision in ("fp32", "mixed-bf16", "bf16"):
        out = tmp_path / precision
        execute(plan(tiny_spec(*shape, f"memory.precision={precision}"), "cpu"), out, progress=False)
        peaks[precision] = _peak(out)
        reports[precision] = json.loads((out / "memory.json").read_text())
    assert abs(reports["mixed-bf16"]["error"]) < 0.05, reports["mixed-bf16"]
    assert peaks["bf16"] < peaks["mixed-bf16"] < peaks["fp32"], peaks
    by = {k: {c["component"]: c["measured_bytes"] for c in r["components"]} for k, r in reports.items()}
    # fp32 masters, gradients and states: for full fine-tuning the same bytes as fp32; under LoRA the frozen
    # base is held in bf16, so the parameters are nearly bf16's
    if method == "full":
        assert by["mixed-bf16"]["optimizer_state"] == by["fp32"]["optimizer_state"]
        assert by["mixed-bf16"]["parameters"] == by["fp32"]["parameters"]
    else:
        assert by["mixed-bf16"]["parameters"] < 0.6 * by["fp32"]["parameters"]


def test_mixed_bf16_checkpointing_drops_the_weight_copies(tiny_spec, tmp_path):
    shape = ("train.steps=2", "train.seq_len=256", "output.save_final=false", "memory.precision=mixed-bf16",
             "memory.strategies.fused_cross_entropy=on", "memory.strategies.chunked_cross_entropy=off")
    for value in ("off", "on"):
        p = plan(tiny_spec(*shape, f"memory.strategies.activation_checkpointing={value}"), "cpu")
        execute(p, tmp_path / value, progress=False)
        report = json.loads((tmp_path / value / "memory.json").read_text())
        # full checkpointing with the fused loss at this shape is planned 5.5% high in fp32 as well (the fitted
        # gradients-around-the-recompute term), so 6% here
        assert abs(report["error"]) < 0.06, report
    assert _peak(tmp_path / "on") < 0.8 * _peak(tmp_path / "off")


# -- fp16 and the loss scaler ----------------------------------------------------------------------------


def test_loss_scaler_skips_an_overflowing_step_lowers_the_scale_and_recovers(tiny_spec):
    spec = tiny_spec("train.grad_accum=1", "train.clip_grad_norm=1.0", "optimizer.kind=sgd", "optimizer.lr=0.1",
                     "optimizer.momentum=0", "train.schedule.warmup_steps=0", "train.schedule.kind=constant")
    w = torch.full((4,), 0.01, requires_grad=True)
    optimizer = torch.optim.SGD([w], lr=0.1)
    scaler = LossScaler(init_scale=2.0**10, growth_interval=2)

    def loss_of(batch):
        # the fp16 region: a gradient of x * scale overflows fp16 (max 65504) when x is large
        loss = (w.half() * batch["x"].half()).sum().float()
        return loss, torch.tensor(1)

    def step(x):
        return train_step(0, 10, spec, loss_of, repeat({"x": torch.full((4,), x)}), [w], optimizer, None, scaler)

    stats = step(1000.0)  # 1000 * 1024 > 65504: inf in the fp16 gradient
    assert stats.grad_norm == float("inf")
    assert torch.equal(w.detach(), torch.full((4,), 0.01))  # the step was skipped
    assert w.grad is None and (scaler.scale, scaler.skipped_steps) == (2.0**9, 1)
    step(1.0)  # finite: the update happens, unscaled (the gradient of sum(w * 1) is 1 per element)
    torch.testing.assert_close(w.detach(), torch.full((4,), 0.01 - 0.1 * 0.5))  # clipped to norm 1: 0.5 each
    assert scaler.scale == 2.0**9
    step(1.0)  # the second finite step in a row: growth_interval reached
    assert scaler.scale == 2.0**10 and scaler.growth_tracker == 0
    state = scaler.state_dict()
    again = LossScaler()
    again.load_state_dict(state)
    assert again.state_dict() == state
    with pytest.raises(ValueError, match="loss scaler state"):
        again.load_state_dict({"scale": 1.0})


def test_fp16_losses_stay_close_to_fp32_and_memory_matches_mixed(tiny_spec, tmp_path):
    # fp16 has 11 mantissa bits, bf16 8: the first loss (same weights, forward only) is closer to fp32's. Later
    # steps are not compared: Adam's normalized updates amplify rounding noise into either direction (on an
    # AVX512-BF16 CPU mixed-bf16's step-4 loss was closer than fp16's). No step overflows at the initial scale.
    shape = ("train.steps=4", "memory.strategies.activation_checkpointing=off")
    ref = _run(tiny_spec(*shape), tmp_path / "fp32")
    fp16 = _run(tiny_spec(*shape, "memory.precision=fp16"), tmp_path / "fp16")
    assert fp16 == pytest.approx(ref, rel=1e-3)
    mixed = _run(tiny_spec(*shape, "memory.precision=mixed-bf16"), tmp_path / "mixed")
    assert 0 < abs(fp16[0] - ref[0]) < abs(mixed[0] - ref[0]) / 2
    # same dtype sizes, same tensors (but the scaled loss, a 0-d fp32 tensor)
    assert _peak(tmp_path / "fp16") == pytest.approx(_peak(tmp_path / "mixed"), abs=8)
    assert _peak(tmp_path / "fp16") < _peak(tmp_path / "fp32")


def test_fp16_resume_restores_the_loss_scale(tiny_spec, tmp_path):
    spec = tiny_spec("train.steps=4", "memory.precision=fp16", "output.save_every=2", "output.keep=3")
    execute(plan(spec, "cpu"), tmp_path / "ref", progress=False)
    execute(plan(spec, "cpu"), tmp_path / "part", progress=False)
    trainer = json.loads((tmp_path / "part/checkpoints/step-00000002/trainer.json").read_text())
    # 4 x 128 tokens per micro-batch: 2**16 / 2**9
    assert trainer["loader"]["loss_scaler"]["scale"] == 2.0**7
    shutil.rmtree(tmp_path / "part/model")
    execute(plan(spec, "cpu"), tmp_path / "part", progress=False, resume=True)
    assert _losses(tmp_path / "part") == _losses(tmp_path / "ref")


# -- selective activation checkpointing ------------------------------------------------------------------


@pytest.mark.parametrize("method", ["full", "lora"])
def test_selective_checkpointing_changes_no_gradients(tiny_spec, method):
    targets = ["method.targets=[wq,wv,w1,w2]"] if method == "lora" else []
    p = plan(tiny_spec(f"method.kind={method}", *targets, "memory.strategies.activation_checkpointing=off"), "cpu")
    batch = _batch(p.model)
    loss_off, off = _grads(p, batch)
    loss_sel, sel = _grads(_with(p, activation_checkpointing="selective"), batch)
    assert torch.equal(loss_off, loss_sel)
    for name in off:  # the same kernels on the same inputs: bitwise on CPU
        torch.testing.assert_close(sel[name], off[name], rtol=0, atol=1e-6)


def test_selective_block_keeps_what_the_estimator_counts():
    cfg = preset("tiny")
    params = init_params(cfg, seed=0)
    for t in params.values():
        t.requires_grad_(True)
    B, T = 2, 64
    cos, sin = rope_cache(cfg, torch.arange(T).expand(B, T))
    weights = [params[f"layers.0.{n}"] for n in block_param_names(cfg)]
    run = block_runner(_selective_strategies())
    h = torch.randn(B, T, cfg.dim, requires_grad=True)
    tracker = LiveTensorTracker()
    with tracker:
        out = run(lambda *a: block(*a, cfg=cfg), h, *weights, cos, sin, None)
        kept = tracker.current_bytes - out.untyped_storage().nbytes()
    # the estimator's count includes the block input, which the caller (h) holds here
    assert kept == selective_block_bytes(cfg, B * T, B, "fp32") - B * T * cfg.dim * 4
    out.sum().backward()


def _selective_strategies():
    from lowmem.plan.structs import Strategies

    return Strategies(precision="fp32", activation_checkpointing="selective", cross_entropy="standard")


def test_selective_checkpointing_memory_sits_between_off_and_full(tiny_spec, tmp_path):
    shape = ("train.steps=2", "train.seq_len=256", "output.save_final=false",
             "memory.strategies.fused_cross_entropy=on", "memory.strategies.chunked_cross_entropy=off",
             "memory.strategies.activation_checkpointing=off")
    base = plan(tiny_spec(*shape), "cpu")
    peaks, losses = {}, {}
    for value in ("off", "selective", "full"):
        p = plan(tiny_spec(*shape[:-1], f"memory.strategies.activation_checkpointing="
                                       f"{'on' if value == 'full' else 'off'}"), "cpu")
        if value == "selective":
            p = _with(base, activation_checkpointing="selective")
            p = msgspec.structs.replace(p, memory=_estimate(p))
        execute(p, tmp_path / value, progress=False)
        report = json.loads((tmp_path / value / "memory.json").read_text())
        assert abs(report["error"]) < (0.06 if value == "full" else 0.05), (value, report)  # full: see above
        peaks[value], losses[value] = report["measured_peak_bytes"], _losses(tmp_path / value)
    assert peaks["full"] < peaks["selective"] < peaks["off"], peaks
    assert losses["selective"] == losses["off"]


def _estimate(p):
    from lowmem.plan.estimate import estimate_memory
    from lowmem.plan.planner import trainable_shapes

    shapes, trainable = trainable_shapes(p.spec, p.model)
    return estimate_memory(p.model, p.strategies, p.spec.train, p.spec.optimizer, shapes, trainable)


# -- compile ---------------------------------------------------------------------------------------------


def test_compiled_block_trains_like_eager(tiny_spec):
    """torch.compile of the block (inductor on this CPU) changes the losses and gradients only by rounding.

    About 40 s with a cold inductor cache on two shared cores, a few seconds warm.
    """
    import torch._dynamo

    p = plan(tiny_spec("memory.strategies.compile=off", "memory.strategies.activation_checkpointing=off"), "cpu")
    batches = [_batch(p.model, B=2, T=32, seed=s) for s in range(3)]
    results = {}
    torch._dynamo.reset()
    for compiled in (False, True):
        q = _with(p, compile=compiled)
        run = build_training(q, init_params(q.model, seed=0), LiveTensorTracker())
        stats = [train_step(i, 3, q.spec, run.loss_of, iter([b]), list(run.trainable_params.values()),
                            run.optimizer, None) for i, b in enumerate(batches)]
        results[compiled] = [s.loss for s in stats], {n: t.detach().clone() for n, t in run.params.items()}
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # it really compiled
    assert results[True][0] == pytest.approx(results[False][0], rel=1e-5)
    # after three AdamW steps: fused kernels round differently, and Adam's division by sqrt(v) turns a last-bit
    # difference in a near-zero gradient into ~1e-5 of a weight (measured max 1.6e-5)
    for name, ref in results[False][1].items():
        torch.testing.assert_close(results[True][1][name], ref, rtol=1e-4, atol=5e-5)


# -- micro-batch split and 8-bit AdamW states (the planner's last resorts) --------------------------------------

SPLIT_BASE = ("memory.strategies.activation_checkpointing=off", "memory.strategies.fused_cross_entropy=off",
              "memory.strategies.chunked_cross_entropy=off", "memory.strategies.compile=off",
              "memory.strategies.low_bit_optimizer=off", "train.clip_grad_norm=0",
              "memory.strategies.optimizer_in_backward=off")


def test_micro_batch_split_changes_no_numbers_and_lowers_the_peak_as_planned(tiny_spec, tmp_path):
    runs = {}
    for k, toggle in ((1, "off"), (2, "on"), (4, "on")):
        p = plan(tiny_spec(*SPLIT_BASE, f"memory.strategies.micro_batch_split={toggle}"), "cpu")
        if k == 4:  # "on" takes the fewest pieces that fit: record 4 as the planner would, with its estimate
            p = _with(p, micro_batch_split=4)
            shapes, trains = trainable_shapes(p.spec, p.model)
            p = msgspec.structs.replace(p, memory=estimate_memory(p.model, p.strategies, p.spec.train,
                                                                  p.spec.optimizer, shapes, trains))
        assert p.strategies.micro_batch_split == k
        result = execute(p, tmp_path / str(k), progress=False)
        runs[k] = (_losses(tmp_path / str(k)), _peak(tmp_path / str(k)), result.planned_peak_bytes)
    # the same step: the loss sums and gradients of 4 rows taken as 2 x 2 or 4 x 1 (float summation order only)
    for k in (2, 4):
        assert runs[k][0] == pytest.approx(runs[1][0], rel=1e-5, abs=0)
    # activations and loss tensors of one piece: measured peaks fall, and each is planned within 5%
    assert runs[4][1] < runs[2][1] < 0.9 * runs[1][1], {k: v[1] for k, v in runs.items()}
    for k, (_, measured, planned) in runs.items():
        assert planned == pytest.approx(measured, rel=0.05), (k, planned, measured)


def test_auto_splits_only_when_no_whole_micro_batch_fits(tiny_spec):
    whole = plan(tiny_spec(*SPLIT_BASE[:-2]), "cpu")
    assert whole.strategies.micro_batch_split == 1
    split_peak = plan(tiny_spec(*SPLIT_BASE, "memory.strategies.micro_batch_split=on"), "cpu").memory.device_bytes
    budget = (split_peak + whole.memory.device_bytes) // 2  # the split plan fits, no whole one does
    p = plan(tiny_spec(*SPLIT_BASE[:-2], f"memory.budget={budget}B", "memory.safety_margin=0"), "cpu")
    assert p.strategies.micro_batch_split == 2
    decision = next(d for d in p.decisions if d.strategy == "micro_batch_split")
    assert decision.source == "auto" and "no plan with whole micro-batches of 4 rows fits" in decision.reason
    # optimizer in backward needs the whole step in one backward, so a split plan never has it
    assert all(not a.strategies.optimizer_in_backward for a in p.alternatives if a.strategies.micro_batch_split > 1)


def test_auto_uses_8bit_adamw_states_only_when_nothing_exact_fits(tiny_spec, tmp_path):
    off = tiny_spec(*SPLIT_BASE[:4], "memory.strategies.low_bit_optimizer=off", "memory.strategies.micro_batch_split=off")
    smallest_exact = min(a.device_bytes for a in plan(off, "cpu").alternatives)
    on = plan(tiny_spec(*SPLIT_BASE[:4], "memory.strategies.low_bit_optimizer=on",
                        "memory.strategies.micro_batch_split=off"), "cpu")
    assert on.strategies.optimizer_state == "8bit"
    smallest_8bit = min(a.device_bytes for a in on.alternatives)
    assert smallest_8bit < smallest_exact
    budget = (smallest_8bit + smallest_exact) // 2
    p = plan(tiny_spec(*SPLIT_BASE[:4], "memory.strategies.micro_batch_split=off", f"memory.budget={budget}B",
                       "memory.safety_margin=0"), "cpu")
    assert p.strategies.optimizer_state == "8bit"
    assert "bitsandbytes AdamW8bit" in next(d.reason for d in p.decisions if d.strategy == "low_bit_optimizer")
    # it runs as bitsandbytes AdamW8bit, its state measured as planned
    result = execute(p, tmp_path, progress=False)
    assert result.planned_peak_bytes == pytest.approx(result.measured_peak_bytes, rel=0.05)
    assert result.final_loss < result.first_loss


def test_last_resorts_forced_where_they_cannot_work_are_clear_errors(tiny_spec):
    from lowmem.plan import PlanError

    with pytest.raises(PlanError, match="low_bit_optimizer = 'on' applies to optimizer.kind = 'adamw'"):
        plan(tiny_spec("optimizer.kind=sgd", "memory.strategies.low_bit_optimizer=on"), "cpu")
    with pytest.raises(PlanError, match="one row cannot be split"):
        plan(tiny_spec("train.micro_batch=1", "memory.strategies.micro_batch_split=on"), "cpu")
    with pytest.raises(PlanError, match="micro_batch_split and optimizer_in_backward are both 'on'"):
        plan(tiny_spec("train.clip_grad_norm=0", "memory.strategies.micro_batch_split=on",
                       "memory.strategies.optimizer_in_backward=on"), "cpu")


@pytest.mark.parametrize(("precision", "lr", "low", "high"), [
    # Adam's first update is lr x sign(g): it survives where |w| < about 2**8 * lr = 2.6e-3, a tenth of N(0, 0.02)
    # weights and more of the smaller-initialized wo/w2 (measured: 20.6% moved)
    ("bf16", 1e-5, 0.0, 0.3),
    ("bf16", 1e-3, 0.95, 1.0),     # every weight above BF16_MIN_LR's 0.02 x 2**-8 keeps its update
    ("mixed-bf16", 1e-5, 0.95, 1.0),  # fp32 master weights keep every update
])
def test_bf16_weights_lose_updates_below_bf16_min_lr(tiny_spec, tmp_path, precision, lr, low, high):
    # the measurement behind the planner's BF16_MIN_LR: one AdamW step, the share of projection weights it moved
    spec = tiny_spec("train.steps=1", f"optimizer.lr={lr}", "optimizer.weight_decay=0", f"memory.precision={precision}",
                     "train.schedule.warmup_steps=0", "train.schedule.kind=constant",
                     "memory.strategies.bf16_stochastic_rounding=off")
    p = plan(spec, "cpu")
    execute(p, tmp_path, progress=False)
    moved = float((_moved(tmp_path, p) != 0).float().mean())
    assert low <= moved <= high, moved


def _moved(run_dir, p) -> torch.Tensor:
    """Every block matrix's change from its initial value, flattened (in the dtype the run trained it in)."""
    from lowmem.nn.hf import load_hf

    _, trained = load_hf(run_dir / "model", dtype=torch.float32)
    initial = init_params(p.model, p.spec.model.init_seed, dtype=param_dtype(p.strategies))
    names = [n for n in initial if n.startswith("layers.") and initial[n].ndim == 2]
    return torch.cat([(trained[n] - initial[n].float()).flatten() for n in names])


def test_stochastic_rounding_keeps_the_updates_bf16_rounds_away(tiny_spec, tmp_path):
    # 4 AdamW steps at lr 1e-5, below BF16_MIN_LR: regressed on fp32's weight changes, plain bf16's changes have a
    # slope of about 0.24 (most updates rounded away; measured 0.231), stochastically rounded bf16's about 1
    # (measured 0.986): unbiased, with rounding noise around it
    shape = ("train.steps=4", "optimizer.lr=1e-5", "optimizer.weight_decay=0", "train.schedule.warmup_steps=0",
             "train.schedule.kind=constant")
    runs = {}
    for name, overrides in {"fp32": ("memory.precision=fp32",),
                            "bf16": ("memory.precision=bf16", "memory.strategies.bf16_stochastic_rounding=off"),
                            "sr": ("memory.precision=bf16", "memory.strategies.bf16_stochastic_rounding=on"),
                            # one torchao optimizer per parameter, stepped in backward (Adam ignores the clipping
                            # the others do: it rescales every gradient alike)
                            "sr-in-backward": ("memory.precision=bf16", "memory.strategies.bf16_stochastic_rounding=on",
                                               "memory.strategies.optimizer_in_backward=on", "train.clip_grad_norm=0")
                            }.items():
        p = plan(tiny_spec(*shape, *overrides), "cpu")
        execute(p, tmp_path / name, progress=False)
        runs[name] = (p, _moved(tmp_path / name, p))
    ref = runs["fp32"][1]
    slope = {name: float(runs[name][1] @ ref / (ref @ ref)) for name in ("bf16", "sr", "sr-in-backward")}
    assert slope["bf16"] < 0.5 and 0.9 < slope["sr"] < 1.1 and 0.9 < slope["sr-in-backward"] < 1.1, slope
    assert runs["sr"][0].strategies.bf16_stochastic_rounding and not runs["bf16"][0].strategies.bf16_stochastic_rounding
    # the same bytes as plain bf16: torchao keeps the moments in the weights' dtype, as torch's AdamW does
    assert _peak(tmp_path / "sr") == pytest.approx(_peak(tmp_path / "bf16"), rel=0.01)
    report = json.loads((tmp_path / "sr/memory.json").read_text())
    assert report["measured_peak_bytes"] == pytest.approx(report["planned_peak_bytes"], rel=0.05)


def test_stochastic_rounding_resumes_bitwise(tiny_spec, tmp_path):
    # its random draws come from torch's generator, which checkpoints carry
    spec = tiny_spec("train.steps=4", "optimizer.lr=1e-5", "memory.precision=bf16", "output.save_every=2",
                     "output.keep=3", "memory.strategies.bf16_stochastic_rounding=on")
    execute(plan(spec, "cpu"), tmp_path / "ref", progress=False)
    execute(plan(spec, "cpu"), tmp_path / "part", progress=False)
    shutil.rmtree(tmp_path / "part/checkpoints/step-00000004", ignore_errors=True)
    shutil.rmtree(tmp_path / "part/model")
    execute(plan(spec, "cpu"), tmp_path / "part", progress=False, resume=True)
    assert _losses(tmp_path / "part") == _losses(tmp_path / "ref")
    ref = load_file(tmp_path / "ref/model/model.safetensors")
    part = load_file(tmp_path / "part/model/model.safetensors")
    assert all(torch.equal(ref[n], part[n]) for n in ref)


def test_weight_decay_rounds_away_in_pure_bf16_unless_rounded_stochastically(tiny_spec, tmp_path):
    # lr 3e-3 x weight_decay 0.1 = 3e-4 per step, below bf16's 2**-9: rounding to nearest undoes every decay step
    # (the planner warns); stochastic rounding keeps it on average (the weights shrink by about 4 x 3e-4)
    shape = ("train.steps=4", "optimizer.lr=3e-3", "memory.precision=bf16", "train.schedule.warmup_steps=0",
             "train.schedule.kind=constant")
    for rounding in ("off", "on"):
        for decay in ("0", "0.1"):
            spec = tiny_spec(*shape, f"optimizer.weight_decay={decay}",
                             f"memory.strategies.bf16_stochastic_rounding={rounding}")
            p = plan(spec, "cpu")
            assert any("has no effect in pure bf16" in w for w in p.warnings) == (rounding == "off" and decay != "0")
            execute(p, tmp_path / f"{rounding}-{decay}", progress=False)
    weights = {run: load_file(tmp_path / run / "model/model.safetensors") for run in ("off-0", "off-0.1", "on-0", "on-0.1")}
    blocks = [n for n in weights["off-0"] if ".layers." in n and weights["off-0"][n].ndim == 2]
    assert all(torch.equal(weights["off-0"][n], weights["off-0.1"][n]) for n in blocks)

    def size(run):
        return sum(float(weights[run][n].float().abs().sum()) for n in blocks)

    assert size("on-0.1") / size("on-0") == pytest.approx(1 - 4 * 3e-4, abs=4e-4)


# -- optimizer in backward ----------------------------------------------------------------------------------


def test_optimizer_in_backward_sums_the_gradient_norm_on_the_device():
    """The hooks add each gradient's squared norm into one 0-d fp32 tensor (no host read per parameter;
    tests/train/test_cuda_optim.py counts them on fake CUDA): `grad_norm()` is the global norm of the gradients
    they stepped with, `reset_grad_norm()` (or `grad_sq_sum = 0.0`, as the loop sets it) starts the next step."""
    g = torch.Generator().manual_seed(0)
    init = [torch.randn(32, 16, generator=g), torch.randn(16, 8, generator=g), torch.randn(8, generator=g)]
    x = torch.randn(4, 32, generator=g)

    def loss(params):
        w1, w2, b = params
        return (torch.tanh(x @ w1) @ w2 + b).pow(2).sum()

    reference = [t.clone().requires_grad_() for t in init]
    loss(reference).backward()
    expected = torch.cat([t.grad.flatten() for t in reference]).norm()
    params = [t.clone().requires_grad_() for t in init]
    optimizer = InBackwardOptimizer(lambda ps: torch.optim.SGD(ps, lr=0.0), params)
    for reset in (optimizer.reset_grad_norm, lambda: setattr(optimizer, "grad_sq_sum", 0.0)):
        reset()
        loss(params).backward()
        norm = optimizer.grad_norm()
        assert norm.dim() == 0 and norm.dtype == torch.float32
        torch.testing.assert_close(norm, expected, rtol=1e-5, atol=0)
        assert optimizer.grad_sq_sum == pytest.approx(float(expected) ** 2, rel=1e-5)
        assert all(p.grad is None for p in params)  # each hook freed its gradient


# -- the newer families' per-layer RoPE through the checkpointing seam -----------------------------------


@pytest.mark.parametrize("value,blocks", [("first-1", [0]), ("first-3", [0, 1, 2]), ("every-2", [0, 2]),
                                          ("full", [0, 1, 2, 3]), ("off", [])])
def test_the_seam_checkpoints_exactly_the_blocks_the_value_names(value, blocks, monkeypatch):
    from lowmem.nn.llama import forward
    from lowmem.plan.structs import Strategies, checkpointed
    from lowmem.train import strategies as seam

    cfg = msgspec.structs.replace(preset("tiny"), n_layers=4)
    params = init_params(cfg, seed=0)
    layer_of = {id(t): int(n.split(".")[1]) for n, t in params.items() if n.endswith(".attn_norm")}
    seen = []
    real = seam._checkpointed

    def spy(fn, h, *tensors):
        seen.append(layer_of[id(tensors[0])])
        return real(fn, h, *tensors)

    monkeypatch.setattr(seam, "_checkpointed", spy)
    strategies = Strategies(precision="fp32", activation_checkpointing=value, cross_entropy="standard")
    tokens = torch.randint(0, cfg.vocab_size, (1, 8), generator=torch.Generator().manual_seed(0))
    forward(params, tokens, cfg, run_block=block_runner(strategies, params))
    assert seen == blocks == [i for i in range(4) if checkpointed(value, i)]


@pytest.mark.parametrize("value", ["full", "selective", "every-2", "first-3"])
def test_checkpointing_changes_no_gradients_with_nope_local_and_partial_rope(value):
    """NoPE layers pass cos and sin as None through `run_block`; Gemma 3's local layers another table pair."""
    from lowmem.nn.llama import forward
    from lowmem.plan.structs import Strategies

    cfg = msgspec.structs.replace(preset("tiny"), n_layers=4, nope_layers=(1,), sliding_window=5,
                                  sliding_layers=(0, 2), rope_local_theta=100.0, partial_rotary_factor=0.5,
                                  qk_norm="head")
    assert [cfg.layer_rope(i) for i in range(4)] == ["local", None, "local", "global"]
    tokens = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))

    def grads(checkpointing):
        params = {n: t.requires_grad_(True) for n, t in init_params(cfg, seed=0).items()}
        strategies = Strategies(precision="fp32", activation_checkpointing=checkpointing, cross_entropy="standard")
        forward(params, tokens, cfg, run_block=block_runner(strategies, params)).square().mean().backward()
        return {n: t.grad for n, t in params.items()}

    off, checkpointed = grads("off"), grads(value)
    for name, grad in off.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=0, atol=1e-6, msg=name)
