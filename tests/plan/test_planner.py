"""The planner's search, explanations, refusals and the plan's JSON form."""

import msgspec
import pytest

from lowmem.plan import PROFILES, Plan, PlanError, plan, render_plan
from lowmem.plan.estimate import estimate_memory, flops_per_token
from lowmem.plan.planner import SPEED_MODEL_ERROR, partial_checkpointing, trainable_shapes
from lowmem.spec.units import parse_bytes


def test_unconstrained_plan_picks_the_fastest_and_records_alternatives(tiny_spec):
    p = plan(tiny_spec("memory.precision=auto"), "cpu")
    # the named 'cpu' profile has no native bf16: 16-bit compute is not even a candidate there
    assert p.strategies.precision == "fp32"
    assert p.strategies.activation_checkpointing == "off" and not p.strategies.compile
    # 1 precision x 3 checkpointing (off, selective, full) x 3 losses x compile (not with selective)
    assert len(p.alternatives) == 15 and sum(a.chosen for a in p.alternatives) == 1
    assert {a.strategies.precision for a in p.alternatives} == {"fp32"}
    chosen = next(a for a in p.alternatives if a.chosen)
    # compile is faster per step but does not repay its compile time in 4 steps; among the eager plans within the
    # speed model's error of the fastest, the one with the most headroom
    fastest = max(a.tokens_per_s for a in p.alternatives if a.fits and not a.strategies.compile)
    close = [a for a in p.alternatives if not a.strategies.compile and a.tokens_per_s >= (1 - SPEED_MODEL_ERROR) * fastest]
    assert chosen.tokens_per_s >= (1 - SPEED_MODEL_ERROR) * fastest
    assert chosen.device_bytes == min(a.device_bytes for a in close)
    reasons = {d.strategy: d.reason for d in p.decisions}
    assert "no native bf16" in reasons["precision"]


def test_gpu_profile_prefers_bf16(tiny_spec):
    p = plan(tiny_spec("memory.precision=auto"), "h100-80gb")
    assert p.strategies.precision == "bf16"


def test_a_learning_rate_bf16_would_round_away_gets_mixed_bf16(tiny_spec):
    # 2e-5, a usual full fine-tuning rate, is below BF16_MIN_LR: the fast pure-bf16 plan is left out, and said so
    p = plan(tiny_spec("memory.precision=auto", "optimizer.lr=2e-5"), "h100-80gb")
    assert p.strategies.precision == "mixed-bf16" and not p.warnings
    reason = {d.strategy: d.reason for d in p.decisions}["precision"]
    assert "bf16 is left out at optimizer.lr = 2e-05 (below 7.8e-05)" in reason and "fp32 is slower" in reason
    assert any(a.strategies.precision == "bf16" and a.fits and a.tokens_per_s >= p.tokens_per_s
               for a in p.alternatives)


def _below_mixed_bf16(tiny_spec, *overrides: str) -> str:
    """A budget under the smallest mixed-bf16 plan of this spec on an H100 where pure bf16 still fits (halfway
    between the two: on CUDA both include the same ~0.6 GiB the runtime adds beside the tensors)."""
    def needs(precision: str) -> int:
        with pytest.raises(PlanError) as err:
            plan(tiny_spec(*overrides, f"memory.precision={precision}", "memory.budget=1MiB"), "h100-80gb")
        return parse_bytes(str(err.value).split("at least ")[1].split(",")[0].replace(" ", ""))

    bf16, mixed = needs("bf16"), needs("mixed-bf16")
    assert bf16 < mixed
    return f"memory.budget={(bf16 + mixed) // 2}"


def test_where_only_bf16_fits_a_small_learning_rate_gets_stochastic_rounding(tiny_spec):
    small = ("optimizer.lr=2e-5", "memory.strategies.low_bit_optimizer=off")
    p = plan(tiny_spec(*small, "memory.precision=auto", _below_mixed_bf16(tiny_spec, *small)), "h100-80gb")
    assert p.strategies.precision == "bf16" and p.strategies.bf16_stochastic_rounding and not p.warnings
    decision = next(d for d in p.decisions if d.strategy == "bf16_stochastic_rounding")
    assert decision.value == "on" and decision.source == "auto"
    assert "below 7.8e-05" in decision.reason and "mixed-bf16 and fp32 would not fit" in decision.reason
    # where it is not needed, or where precision is not bf16, it stays off and says why
    fast = plan(tiny_spec("memory.precision=bf16"), "h100-80gb")
    assert not fast.strategies.bf16_stochastic_rounding and not fast.warnings
    assert "not needed" in {d.strategy: d.reason for d in fast.decisions}["bf16_stochastic_rounding"]
    mixed = plan(tiny_spec(*small, "memory.precision=auto"), "h100-80gb")
    assert mixed.strategies.precision == "mixed-bf16" and not mixed.strategies.bf16_stochastic_rounding


def test_plain_bf16_at_a_small_learning_rate_warns(tiny_spec):
    # SGD has no stochastic-rounding form here: plain bf16 is the last resort, with a warning
    sgd = ("optimizer.kind=sgd", "optimizer.lr=2e-5")
    p = plan(tiny_spec(*sgd, "memory.precision=auto", _below_mixed_bf16(tiny_spec, *sgd)), "h100-80gb")
    assert p.strategies.precision == "bf16" and not p.strategies.bf16_stochastic_rounding
    assert any("optimizer.lr = 2e-05" in w and "no mixed-bf16 or fp32 plan fits" in w for w in p.warnings)
    assert "'sgd'" in {d.strategy: d.reason for d in p.decisions}["bf16_stochastic_rounding"]
    forced = plan(tiny_spec("optimizer.lr=2e-5", "memory.precision=bf16",
                            "memory.strategies.bf16_stochastic_rounding=off"), "h100-80gb")
    assert any("most updates are lost" in w and "no mixed" not in w for w in forced.warnings)


@pytest.mark.parametrize(("overrides", "named"), [
    (("memory.precision=fp32",), "memory.precision = 'fp32'"),  # the later setting wins
    (("optimizer.kind=sgd",), "optimizer.kind = 'sgd'"),
    (("optimizer.offload=true",), "optimizer.offload = true"),
])
def test_forced_stochastic_rounding_names_what_it_needs(tiny_spec, overrides, named):
    with pytest.raises(PlanError, match=named):
        plan(tiny_spec("memory.precision=bf16", "memory.strategies.bf16_stochastic_rounding=on", *overrides),
             "h100-80gb")


def test_forced_stochastic_rounding_is_refused_under_fsdp_and_auto_leaves_it_off(tiny_spec):
    on = ("memory.precision=bf16", "memory.strategies.bf16_stochastic_rounding=on")
    with pytest.raises(PlanError, match="not under FSDP"):
        plan(tiny_spec(*on), "h100-80gb", world_size=2)
    p = plan(tiny_spec("memory.precision=bf16", "optimizer.lr=2e-5"), "h100-80gb", world_size=2)
    assert not p.strategies.bf16_stochastic_rounding and any("most updates are lost" in w for w in p.warnings)


def test_tight_budget_turns_on_checkpointing(tiny_spec):
    # the loss strategies are held off, so checkpointing is the only lever
    fixed = ("train.seq_len=512", "train.micro_batch=8", "memory.strategies.chunked_cross_entropy=off",
             "memory.strategies.fused_cross_entropy=off")
    off = plan(tiny_spec(*fixed), "cpu")
    on = plan(tiny_spec(*fixed, "memory.strategies.activation_checkpointing=on"), "cpu")
    assert on.memory.peak_bytes < off.memory.peak_bytes
    budget = (on.memory.device_bytes + off.memory.device_bytes) // 2 / 0.9  # between the two, before the margin
    p = plan(tiny_spec(*fixed, f"memory.budget={int(budget)}"), "cpu")
    assert p.strategies.activation_checkpointing in ("selective", "full")
    assert p.memory.device_bytes <= p.usable_bytes
    decision = next(d for d in p.decisions if d.strategy == "activation_checkpointing")
    assert decision.source == "auto" and "off would not fit" in decision.reason


def test_nothing_fits_names_the_smallest_budget(tiny_spec):
    with pytest.raises(PlanError) as err:
        plan(tiny_spec("memory.budget=1MiB"), "cpu")
    message = str(err.value)
    assert "memory.budget" in message and "at least" in message
    need = message.split("at least ")[1].split(",")[0]
    # the named budget really is enough
    assert plan(tiny_spec(f"memory.budget={need.replace(' ', '')}"), "cpu").memory.peak_bytes > 0


def test_forced_choices_are_respected(tiny_spec):
    p = plan(tiny_spec("memory.strategies.activation_checkpointing=on", "memory.precision=bf16"), "cpu")
    assert p.strategies.activation_checkpointing == "full" and p.strategies.precision == "bf16"
    assert {d.strategy: d.source for d in p.decisions}["activation_checkpointing"] == "user"


@pytest.mark.parametrize("override,field", [
    ("memory.strategies.optimizer_in_backward=on", "memory.strategies.optimizer_in_backward"),
    ("memory.strategies.optimizer_in_backward=on", "memory.precision"),
    ("memory.strategies.activation_offloading=on", "memory.strategies.activation_offloading"),
])
def test_unavailable_requests_are_refused_by_name(tiny_spec, override, field):
    extra = ("memory.precision=fp16", "train.clip_grad_norm=0") if field == "memory.precision" else ()
    with pytest.raises(PlanError, match=field.replace(".", r"\.")):
        plan(tiny_spec(override, *extra), "cpu")


def test_seq_len_beyond_model_is_refused(tiny_spec):
    with pytest.raises(PlanError, match="max_seq_len"):
        plan(tiny_spec("train.seq_len=100000"), "cpu")


def test_model_path_needs_a_config(tiny_spec, tmp_path):
    with pytest.raises(PlanError, match="config.json"):
        plan(tiny_spec("model.preset=none", f"model.path={tmp_path}"), "cpu")


def test_plan_json_round_trip(tiny_spec):
    p = plan(tiny_spec(), "rtx4090-24gb")
    again = msgspec.json.decode(msgspec.json.encode(p), type=Plan)
    assert again == p


def test_render_shows_components_and_decisions(tiny_spec):
    # standard CE, so the peak is backward's start, where the logits are a component
    text = render_plan(plan(tiny_spec("memory.strategies.fused_cross_entropy=off",
                                      "memory.strategies.chunked_cross_entropy=off"), "cpu"))
    for word in ("parameters", "optimizer_state", "activations", "logits", "activation_checkpointing",
                 "estimated speed", "alternatives considered"):
        assert word in text


def test_a_cpu_plan_says_the_process_holds_more_than_its_tensors(tiny_spec):
    """On a CPU the budget is the RAM a user has: the report says what the tensor budget leaves out."""
    assert "benchmarks/host_overhead.py" in render_plan(plan(tiny_spec(), "cpu"))
    assert "host_overhead" not in render_plan(plan(tiny_spec(), "h100-80gb"))


def test_real_size_preset_plans_without_weights(tiny_spec):
    spec = tiny_spec("model.preset=llama3.1-8b", "data.tokenizer.vocab_size=128256", "train.seq_len=2048",
                     "train.micro_batch=1", "memory.precision=bf16")
    p = plan(spec, "h100-80gb")
    assert 8.0e9 < p.n_params < 8.1e9
    # bf16 weights + grads + AdamW states in bf16: 8 bytes per parameter at the optimizer step at least
    assert p.memory.peak_bytes > 8 * p.n_params * 0.75
    assert p.memory.peak_bytes < PROFILES["h100-80gb"].memory_bytes


def test_budget_parsing_used(tiny_spec):
    p = plan(tiny_spec("memory.budget=3GiB"), "cpu")
    assert p.budget_bytes == parse_bytes("3GiB") and p.usable_bytes == int(p.budget_bytes * 0.9)


def test_both_losses_forced_on_is_an_error_naming_both(tiny_spec):
    with pytest.raises(PlanError) as err:
        plan(tiny_spec("memory.strategies.chunked_cross_entropy=on", "memory.strategies.fused_cross_entropy=on"), "cpu")
    assert "chunked_cross_entropy" in str(err.value) and "fused_cross_entropy" in str(err.value)


def test_tight_budget_picks_a_loss_without_full_logits(tiny_spec):
    standard = plan(tiny_spec("memory.strategies.chunked_cross_entropy=off",
                              "memory.strategies.fused_cross_entropy=off",
                              "memory.strategies.activation_checkpointing=off"), "cpu")
    budget = int(standard.memory.device_bytes / 0.9)  # its usable part just under the standard plan's need
    p = plan(tiny_spec("memory.strategies.activation_checkpointing=off", f"memory.budget={budget - 1}"), "cpu")
    assert p.strategies.cross_entropy in ("chunked", "fused")
    # with room to spare the fused loss is kept too: 3% slower by the speed model, inside its error, with less memory
    roomy = plan(tiny_spec(), "cpu")
    assert roomy.strategies.cross_entropy == "fused"
    assert "inside the speed model's 5% error" in next(d.reason for d in roomy.decisions if d.strategy == "cross_entropy")


def test_plans_within_the_speed_models_error_keep_the_most_headroom(tiny_spec, monkeypatch):
    from lowmem.plan import planner

    roomy = plan(tiny_spec(), "cpu")
    monkeypatch.setattr(planner, "SPEED_MODEL_ERROR", 0.0)
    fastest = plan(tiny_spec(), "cpu")
    assert fastest.strategies.cross_entropy == "standard"
    assert roomy.memory.device_bytes < fastest.memory.device_bytes
    assert roomy.tokens_per_s >= (1 - SPEED_MODEL_ERROR) * fastest.tokens_per_s
    # never traded for numbers or host memory: precision and offloading stay the fastest plan's
    assert roomy.strategies.precision == fastest.strategies.precision


def test_8b_qlora_on_a_24gb_card_takes_chunked_ce_over_a_2_percent_gain(tiny_spec):
    spec = tiny_spec("model.preset=llama3.1-8b", "data.tokenizer.vocab_size=128256", "method.kind=qlora",
                     "method.rank=16", "method.targets=[wq,wk,wv,wo,w1,w2,w3]", "optimizer.lr=1e-4",
                     "train.micro_batch=2", "train.grad_accum=8", "train.seq_len=2048", "memory.budget=20GiB",
                     "memory.precision=auto")
    p = plan(spec, "rtx4090-24gb")
    standard = max((a for a in p.alternatives if a.fits and a.strategies.cross_entropy == "standard"),
                   key=lambda a: a.tokens_per_s)
    assert p.strategies.cross_entropy != "standard" and standard.tokens_per_s > p.tokens_per_s
    assert p.memory.device_bytes < standard.device_bytes - 4 * 1024**3


def test_lora_trains_only_adapters_and_plans_less_memory(tiny_spec):
    full = plan(tiny_spec(), "cpu")
    lora = plan(tiny_spec("method.kind=lora", "method.rank=4", "method.targets=[wq,wv]"), "cpu")
    cfg = lora.model
    expected = cfg.n_layers * 2 * (4 * cfg.dim + cfg.n_heads * cfg.head_dim * 4)  # wq: A (4, D), B (Q, 4)
    expected = cfg.n_layers * ((4 * cfg.dim + cfg.n_heads * cfg.head_dim * 4)
                               + (4 * cfg.dim + cfg.n_kv_heads * cfg.head_dim * 4))
    assert lora.n_trainable == expected
    assert lora.memory.by_name()["optimizer_state"] < full.memory.by_name()["optimizer_state"] / 10


def test_lora_on_the_output_head_is_refused_by_name(tiny_spec):
    with pytest.raises(PlanError, match="method.targets"):
        plan(tiny_spec("method.kind=lora", "method.targets=[wq,output]"), "cpu")


@pytest.mark.parametrize("override,other", [("train.grad_accum=2", "train.grad_accum"),
                                            ("train.clip_grad_norm=1.0", "train.clip_grad_norm")])
def test_optimizer_in_backward_conflicts_name_both_fields(tiny_spec, override, other):
    with pytest.raises(PlanError) as err:
        plan(tiny_spec("memory.strategies.optimizer_in_backward=on", "train.clip_grad_norm=0", override), "cpu")
    assert "optimizer_in_backward" in str(err.value) and other in str(err.value)


def test_optimizer_in_backward_chosen_when_the_optimizer_step_is_the_peak(tiny_spec):
    shape = ("train.micro_batch=1", "train.seq_len=16", "train.clip_grad_norm=0")
    off = plan(tiny_spec(*shape, "memory.strategies.optimizer_in_backward=off"), "cpu")
    assert off.memory.peak_phase == "optimizer step"
    p = plan(tiny_spec(*shape, f"memory.budget={int((off.memory.device_bytes - 1) / 0.9)}"), "cpu")
    assert p.strategies.optimizer_in_backward
    # with clipping on, auto never picks it, and says why
    clipped = plan(tiny_spec("train.micro_batch=1", "train.seq_len=16"), "cpu")
    decision = next(d for d in clipped.decisions if d.strategy == "optimizer_in_backward")
    assert decision.value == "off" and "clip_grad_norm" in decision.reason


@pytest.mark.parametrize("what,field", [("batch", "micro_batch"), ("seq_len", "seq_len")])
def test_maximize_finds_the_largest_value_that_fits(tiny_spec, what, field):
    from lowmem.plan.planner import maximize

    spec = tiny_spec("memory.budget=120MiB", "train.seq_len=64")
    best = maximize(spec, what, "cpu", data_rows=10**6)
    value = getattr(best.spec.train, field)
    assert best.memory.device_bytes <= best.usable_bytes
    step = 1 if field == "micro_batch" else 64
    # one more does not fit (a micro-batch whole: split, it is accumulation, which --maximize batch does not count)
    whole = ("memory.strategies.micro_batch_split=off",) if field == "micro_batch" else ()
    bigger = tiny_spec("memory.budget=120MiB", "train.seq_len=64", f"train.{field}={value + step}", *whole)
    with pytest.raises(PlanError, match="nothing fits"):
        plan(bigger, "cpu")
    decision = best.decisions[-1]
    assert decision.strategy == f"train.{field}" and decision.value == str(value)
    assert f"at {value + step:,} the smallest plan needs" in decision.reason


def test_maximize_batch_is_not_a_search_cap_of_split_micro_batches(tiny_spec):
    from lowmem.plan.planner import maximize

    # with splits allowed, a 400 MiB budget "fits" any micro-batch in enough pieces: the old answer was the cap
    spec = tiny_spec("memory.budget=400MiB", "train.seq_len=64")
    best = maximize(spec, "batch", "cpu")
    assert best.spec.train.micro_batch < 1000
    split = next(d for d in best.decisions if d.strategy == "micro_batch_split")
    assert split.source == "fixed" and "accumulation" in split.reason
    with pytest.raises(PlanError, match="micro_batch_split = 'on'"):
        maximize(tiny_spec("memory.budget=400MiB", "memory.strategies.micro_batch_split=on", "train.micro_batch=2"),
                 "batch", "cpu")


@pytest.mark.parametrize("accum", [1, 3])
def test_maximize_batch_is_capped_by_the_data(tiny_spec, accum):
    from lowmem.plan.planner import maximize

    spec = tiny_spec("memory.budget=1GiB", "train.seq_len=64", f"train.grad_accum={accum}")
    best = maximize(spec, "batch", "cpu", data_rows=40)
    assert best.spec.train.micro_batch == 40 // accum
    assert "capped by the data" in best.decisions[-1].reason and "40 training rows" in best.decisions[-1].reason
    # without the data's count the search runs on to the budget
    assert maximize(spec, "batch", "cpu").spec.train.micro_batch > 40


def test_maximize_seq_len_says_it_stopped_at_the_models_max_seq_len(tiny_spec):
    from lowmem.plan.planner import maximize

    best = maximize(tiny_spec("memory.budget=4GiB"), "seq_len", "cpu")
    assert best.spec.train.seq_len == best.model.max_seq_len
    assert "max_seq_len" in best.decisions[-1].reason and "not by the budget" in best.decisions[-1].reason


def test_png_chart_is_written(tiny_spec, tmp_path):
    pytest.importorskip("matplotlib")
    from lowmem.plan.chart import write_memory_chart

    out = tmp_path / "plan.png"
    write_memory_chart(plan(tiny_spec("memory.budget=400MiB"), "cpu"), out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


def test_budget_between_off_and_full_picks_first_n_checkpointing(tiny_spec):
    fixed = ("model.preset=quickstart-5m", "train.seq_len=256", "memory.strategies.chunked_cross_entropy=off",
             "memory.strategies.fused_cross_entropy=off", "memory.precision=fp32")
    p_all = plan(tiny_spec(*fixed), "cpu")
    by_value = {a.strategies.activation_checkpointing: a for a in p_all.alternatives}
    assert partial_checkpointing(6) == ("first-2", "first-3", "first-5")  # a quarter, a half, 3/4, all but one
    assert partial_checkpointing(32) == ("first-8", "first-16", "first-24", "first-31")
    assert partial_checkpointing(4) == ("first-1", "first-2", "first-3") and partial_checkpointing(3) == ()
    assert by_value["full"].peak_bytes <= by_value["first-5"].peak_bytes < by_value["first-3"].peak_bytes \
        < by_value["first-2"].peak_bytes < by_value["off"].peak_bytes
    assert by_value["first-5"].tokens_per_s > by_value["full"].tokens_per_s
    budget = int((by_value["first-3"].device_bytes + by_value["first-2"].device_bytes) / 2 / 0.9)
    chosen = plan(tiny_spec(*fixed, f"memory.budget={budget}"), "cpu")
    # first-3, or a plan within the speed model's error of it with more headroom (selective here)
    assert chosen.strategies.activation_checkpointing in ("first-3", "selective")
    first_3 = max((a for a in chosen.alternatives if a.fits and a.strategies.activation_checkpointing == "first-3"
                   and a.strategies.compile == chosen.strategies.compile), key=lambda a: a.tokens_per_s)
    assert chosen.tokens_per_s >= (1 - SPEED_MODEL_ERROR) * first_3.tokens_per_s
    assert chosen.memory.device_bytes <= first_3.device_bytes


@pytest.mark.parametrize("method,loss", [("full", "fused"), ("lora", "fused"), ("lora", "standard")])
def test_first_n_never_plans_more_than_every_k_of_the_same_count(tiny_spec, method, loss):
    # the same blocks recomputed, so the same speed; backward frees the unchecked last blocks before any
    # recompute, so the first n need no more memory than every k-th (the reason the ladder is first-n)
    p = plan(tiny_spec("model.preset=quickstart-5m", f"method.kind={method}", "memory.precision=fp32",
                       f"memory.strategies.fused_cross_entropy={'on' if loss == 'fused' else 'off'}",
                       "memory.strategies.chunked_cross_entropy=off"), "cpu")
    shapes, trainable = trainable_shapes(p.spec, p.model)

    def estimated(value):
        s = msgspec.structs.replace(p.strategies, activation_checkpointing=value)
        return (estimate_memory(p.model, s, p.spec.train, p.spec.optimizer, shapes, trainable).peak_bytes,
                flops_per_token(p.model, s, p.spec.train.seq_len))

    for first, every in (("first-3", "every-2"), ("first-2", "every-4")):
        (first_peak, first_flops), (every_peak, every_flops) = estimated(first), estimated(every)
        assert first_peak <= every_peak, (first, every)
        assert first_flops == every_flops


def _bf16_cpu():
    from lowmem.plan import PROFILES
    from lowmem.plan.hardware import CPU_BF16_OVER_FP32_NATIVE

    cpu = PROFILES["cpu"]
    return msgspec.structs.replace(cpu, name="cpu-amx", bf16_compute=True,
                                   peak_flops_bf16=cpu.peak_flops_fp32 * CPU_BF16_OVER_FP32_NATIVE)


def test_precision_candidates_follow_the_hardware(tiny_spec):
    def precisions(hw):
        return {a.strategies.precision for a in plan(tiny_spec("memory.precision=auto"), hw).alternatives}

    assert precisions("cpu") == {"fp32"}  # no bf16 instructions: compute stays fp32
    assert precisions(_bf16_cpu()) == {"fp32", "bf16", "mixed-bf16"}  # fp16 on CPU: slower than fp32
    assert precisions("h100-80gb") == {"fp32", "bf16", "mixed-bf16"}
    v100 = msgspec.structs.replace(PROFILES["a100-40gb"], name="v100", bf16_compute=False)
    assert precisions(v100) == {"fp32", "fp16"}
    # a tight budget on a bf16 CPU: mixed-bf16 (fp32 masters) when pure bf16 is not needed is never faster, so
    # the planner goes from fp32 straight to bf16; mixed-bf16 is chosen by memory.precision
    p = plan(tiny_spec("memory.precision=mixed-bf16"), _bf16_cpu())
    assert p.strategies.precision == "mixed-bf16" and not p.warnings
    fp32 = plan(tiny_spec("memory.precision=fp32"), _bf16_cpu())
    assert p.memory.by_name()["optimizer_state"] == fp32.memory.by_name()["optimizer_state"]
    assert p.memory.peak_bytes < fp32.memory.peak_bytes


def test_forced_fp16_on_cpu_runs_but_warns_with_the_measurement(tiny_spec):
    p = plan(tiny_spec("memory.precision=fp16"), "cpu")
    assert p.strategies.precision == "fp16"
    assert any("GFLOP/s" in w for w in p.warnings)
    assert p.tokens_per_s < plan(tiny_spec("memory.precision=fp32"), "cpu").tokens_per_s
    bf16 = plan(tiny_spec("memory.precision=bf16"), "cpu")
    assert any("no native bf16" in w for w in bf16.warnings)


def test_budget_between_off_and_full_picks_selective_checkpointing(tiny_spec):
    fixed = ("train.seq_len=256", "memory.strategies.chunked_cross_entropy=off",
             "memory.strategies.fused_cross_entropy=on", "memory.strategies.compile=off")
    by_value = {a.strategies.activation_checkpointing: a for a in plan(tiny_spec(*fixed), "cpu").alternatives}
    assert by_value["full"].peak_bytes < by_value["selective"].peak_bytes < by_value["off"].peak_bytes
    assert by_value["full"].tokens_per_s < by_value["selective"].tokens_per_s < by_value["off"].tokens_per_s
    budget = int((by_value["selective"].device_bytes + by_value["off"].device_bytes) / 2 / 0.9)
    p = plan(tiny_spec(*fixed, f"memory.budget={budget}"), "cpu")
    assert p.strategies.activation_checkpointing == "selective"
    reason = next(d.reason for d in p.decisions if d.strategy == "activation_checkpointing")
    assert "off would not fit" in reason and "full is slower" in reason


def test_compile_is_chosen_only_when_the_run_repays_it(tiny_spec):
    from lowmem.plan.estimate import COMPILE_SECONDS_PER_BLOCK

    short = plan(tiny_spec("train.steps=20"), "cpu")
    assert not short.strategies.compile
    decision = next(d for d in short.decisions if d.strategy == "compile")
    assert decision.value == "off" and "compile on is slower" in decision.reason
    assert f"{COMPILE_SECONDS_PER_BLOCK:.0f} s" in decision.reason
    compiled = next(a for a in short.alternatives if a.strategies.compile and not a.strategies.activation_checkpointing
                    == "selective" and a.strategies == msgspec.structs.replace(short.strategies, compile=True))
    assert compiled.tokens_per_s > short.tokens_per_s  # faster per step, but not over 20 steps
    # long enough: the steady speed-up outweighs the compile time
    steps = int(20 * COMPILE_SECONDS_PER_BLOCK * short.tokens_per_s / short.tokens_per_step)
    long = plan(tiny_spec(f"train.steps={steps}"), "cpu")
    assert long.strategies.compile
    # an epoch count: the length is unknown at planning, so compile is not shown to pay
    epochs = plan(tiny_spec("train.steps=null", "train.epochs=1"), "cpu")
    assert not epochs.strategies.compile


def test_forced_compile_without_a_cxx_compiler_is_refused(tiny_spec, monkeypatch):
    import shutil

    from lowmem.plan import hardware

    monkeypatch.setattr(shutil, "which", lambda name: None)
    local = msgspec.structs.replace(PROFILES["cpu"], name="local-cpu-2c")
    monkeypatch.setattr(hardware, "detect_local", lambda: local)
    with pytest.raises(PlanError, match=r"memory\.strategies\.compile = 'on'.*C\+\+ compiler"):
        plan(tiny_spec("memory.strategies.compile=on"), local)
    assert plan(tiny_spec("memory.strategies.compile=on"), "cpu").strategies.compile  # another machine: kept


def test_weight_decay_that_bf16_rounds_away_steers_auto_and_warns_otherwise(tiny_spec):
    decay = ("optimizer.weight_decay=0.1",)  # lr 3e-3 x 0.1 = 3e-4 < 2**-9
    auto = plan(tiny_spec(*decay, "memory.precision=auto"), "h100-80gb")
    assert auto.strategies.precision == "mixed-bf16" and not auto.warnings
    assert "bf16 is left out because optimizer.weight_decay = 0.1 has no effect in pure bf16" in {
        d.strategy: d.reason for d in auto.decisions}["precision"]
    # forced bf16 with AdamW: rounded stochastically, which keeps the decay on average
    forced = plan(tiny_spec(*decay, "memory.precision=bf16"), "h100-80gb")
    assert forced.strategies.bf16_stochastic_rounding and not forced.warnings
    assert "weight decay" in {d.strategy: d.reason for d in forced.decisions}["bf16_stochastic_rounding"]
    plain = plan(tiny_spec(*decay, "memory.precision=bf16", "memory.strategies.bf16_stochastic_rounding=off"),
                 "h100-80gb")
    assert any("optimizer.weight_decay = 0.1 has no effect in pure bf16" in w for w in plain.warnings)
    adafactor = plan(tiny_spec("memory.precision=bf16", "optimizer.kind=adafactor", "optimizer.lr=3e-3", *decay),
                     "h100-80gb")
    assert any("has no effect in pure bf16" in w for w in adafactor.warnings)
    # SGD adds the decay to the gradient, where it is not a tiny relative step
    assert not plan(tiny_spec("memory.precision=bf16", "optimizer.kind=sgd", *decay), "h100-80gb").warnings
