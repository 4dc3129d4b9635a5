"""The planner's search, explanations, refusals and the plan's JSON form."""

import msgspec
import pytest

from lowmem.plan import PROFILES, Plan, PlanError, plan, render_plan
from lowmem.spec.units import parse_bytes


def test_unconstrained_plan_picks_the_fastest_and_records_alternatives(tiny_spec):
    p = plan(tiny_spec("memory.precision=auto"), "cpu")
    # the named 'cpu' profile has no native bf16, so fp32 compute is faster there
    assert p.strategies.precision == "fp32"
    assert p.strategies.activation_checkpointing == "off"
    assert len(p.alternatives) == 12 and sum(a.chosen for a in p.alternatives) == 1  # 2 x 2 x 3 losses
    chosen = next(a for a in p.alternatives if a.chosen)
    assert chosen.tokens_per_s == max(a.tokens_per_s for a in p.alternatives if a.fits)
    reasons = {d.strategy: d.reason for d in p.decisions}
    assert "no native bf16" in reasons["precision"]


def test_gpu_profile_prefers_bf16(tiny_spec):
    p = plan(tiny_spec("memory.precision=auto"), "h100-80gb")
    assert p.strategies.precision == "bf16"


def test_tight_budget_turns_on_checkpointing(tiny_spec):
    # the loss strategies are held off, so checkpointing is the only lever
    fixed = ("train.seq_len=512", "train.micro_batch=8", "memory.strategies.chunked_cross_entropy=off",
             "memory.strategies.fused_cross_entropy=off")
    off = plan(tiny_spec(*fixed), "cpu")
    on = plan(tiny_spec(*fixed, "memory.strategies.activation_checkpointing=on"), "cpu")
    assert on.memory.peak_bytes < off.memory.peak_bytes
    budget = (on.memory.peak_bytes + off.memory.peak_bytes) // 2 / 0.9  # between the two, before the margin
    p = plan(tiny_spec(*fixed, f"memory.budget={int(budget)}"), "cpu")
    assert p.strategies.activation_checkpointing == "full"
    assert p.memory.peak_bytes <= p.usable_bytes
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
    ("memory.precision=fp16", "memory.precision"),
    ("memory.strategies.activation_offloading=on", "memory.strategies.activation_offloading"),
    ("optimizer.kind=adamw4bit", "optimizer.kind"),
])
def test_unavailable_requests_are_refused_by_name(tiny_spec, override, field):
    with pytest.raises(PlanError, match=field.replace(".", r"\.")):
        plan(tiny_spec(override), "cpu")


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
    text = render_plan(plan(tiny_spec(), "cpu"))
    for word in ("parameters", "optimizer_state", "activations", "logits", "activation_checkpointing",
                 "estimated speed", "alternatives considered"):
        assert word in text


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
    budget = int(standard.memory.peak_bytes * 0.9 / 0.9)  # just under the standard plan's need
    p = plan(tiny_spec("memory.strategies.activation_checkpointing=off", f"memory.budget={budget - 1}"), "cpu")
    assert p.strategies.cross_entropy in ("chunked", "fused")
    # with room to spare the faster standard loss is kept
    assert plan(tiny_spec(), "cpu").strategies.cross_entropy == "standard"


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
    p = plan(tiny_spec(*shape, f"memory.budget={int(off.memory.peak_bytes * 0.95 / 0.9)}"), "cpu")
    assert p.strategies.optimizer_in_backward
    # with clipping on, auto never picks it, and says why
    clipped = plan(tiny_spec("train.micro_batch=1", "train.seq_len=16"), "cpu")
    decision = next(d for d in clipped.decisions if d.strategy == "optimizer_in_backward")
    assert decision.value == "off" and "clip_grad_norm" in decision.reason


@pytest.mark.parametrize("what,field", [("batch", "micro_batch"), ("seq_len", "seq_len")])
def test_maximize_finds_the_largest_value_that_fits(tiny_spec, what, field):
    from lowmem.plan.planner import maximize

    spec = tiny_spec("memory.budget=64MiB", "train.seq_len=64")
    best = maximize(spec, what, "cpu")
    value = getattr(best.spec.train, field)
    assert best.memory.peak_bytes <= best.usable_bytes
    step = 1 if field == "micro_batch" else 64
    bigger = tiny_spec("memory.budget=64MiB", "train.seq_len=64", f"train.{field}={value + step}")
    if value + step <= (best.model.max_seq_len if field == "seq_len" else 1 << 16):
        with pytest.raises(PlanError, match="nothing fits"):
            plan(bigger, "cpu")


def test_png_chart_is_written(tiny_spec, tmp_path):
    pytest.importorskip("matplotlib")
    from lowmem.plan.chart import write_memory_chart

    out = tmp_path / "plan.png"
    write_memory_chart(plan(tiny_spec("memory.budget=64MiB"), "cpu"), out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


def test_budget_between_off_and_full_picks_every_k_checkpointing(tiny_spec):
    fixed = ("model.preset=quickstart-5m", "train.seq_len=256", "memory.strategies.chunked_cross_entropy=off",
             "memory.strategies.fused_cross_entropy=off", "memory.precision=fp32")
    p_all = plan(tiny_spec(*fixed), "cpu")
    by_value = {a.strategies.activation_checkpointing: a for a in p_all.alternatives}
    assert by_value["full"].peak_bytes < by_value["every-2"].peak_bytes < by_value["every-4"].peak_bytes \
        < by_value["off"].peak_bytes
    assert by_value["every-2"].tokens_per_s > by_value["full"].tokens_per_s
    budget = int((by_value["every-2"].peak_bytes + by_value["every-4"].peak_bytes) / 2 / 0.9)
    chosen = plan(tiny_spec(*fixed, f"memory.budget={budget}"), "cpu")
    assert chosen.strategies.activation_checkpointing == "every-2"
