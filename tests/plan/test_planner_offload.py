"""The planner and estimator on activation offloading and the host optimizer (optimizer.offload): refused on a
CPU with the reason, chosen on CUDA only when nothing fits without, and counted in host memory."""

import msgspec
import pytest

from lowmem.plan import PROFILES, PlanError, plan, render_plan
from lowmem.plan.catalogue import OFFLOAD_CPU_REASON
from lowmem.plan.estimate import (
    CPU_OFFLOAD_MIN_NUMEL,
    HOST_PINNED_SHARE,
    OFFLOAD_MIN_BYTES,
    estimate_memory,
    optimizer_state_bytes,
)
from lowmem.plan.planner import trainable_shapes

# activations dominate: quickstart-5m, 16 x 1024 tokens, bf16 on an H100 profile
BIG = ("model.preset=quickstart-5m", "train.seq_len=1024", "train.micro_batch=16", "memory.precision=bf16")


def _decision(p, name):
    return next(d for d in p.decisions if d.strategy == name)


def _smallest(p):
    """The least memory any alternative needs: as nvidia-smi would show it on CUDA (what the budget bounds)."""
    return min(a.device_bytes for a in p.alternatives)


def _budget_between(low: int, high: int) -> int:
    """A memory.budget whose usable part (90%) lies halfway between two needs."""
    return int((low + high) / 2 / 0.9)


# -- activation offloading ------------------------------------------------------------------------------


def test_forced_offloading_on_a_cpu_is_refused_with_the_reason_and_the_fix(tiny_spec):
    with pytest.raises(PlanError) as err:
        plan(tiny_spec("memory.strategies.activation_offloading=on"), "cpu")
    message = str(err.value)
    assert "memory.strategies.activation_offloading = 'on'" in message
    assert OFFLOAD_CPU_REASON in message and "'auto' or 'off'" in message and "--hardware" in message


def test_auto_never_offloads_on_a_cpu_even_when_nothing_else_fits(tiny_spec):
    fixed = ("train.seq_len=512", "train.micro_batch=8", "memory.strategies.micro_batch_split=off",
             "memory.strategies.low_bit_optimizer=off")
    smallest = _smallest(plan(tiny_spec(*fixed), "cpu"))
    with pytest.raises(PlanError, match="nothing fits"):
        plan(tiny_spec(*fixed, f"memory.budget={int(smallest * 0.95 / 0.9)}"), "cpu")
    p = plan(tiny_spec(*fixed, f"memory.budget={int(smallest / 0.9) + 1}"), "cpu")
    assert not any(a.strategies.activation_offloading for a in p.alternatives)
    decision = _decision(p, "activation_offloading")
    assert (decision.value, decision.source, decision.reason) == ("off", "fixed", OFFLOAD_CPU_REASON)
    assert not p.memory.host


def test_cuda_offloads_when_it_fits_only_with_offloading(tiny_spec):
    without = plan(tiny_spec(*BIG, "memory.strategies.activation_offloading=off"), "h100-80gb")
    forced = plan(tiny_spec(*BIG, "memory.strategies.activation_offloading=on"), "h100-80gb")
    assert _smallest(forced) < _smallest(without)
    p = plan(tiny_spec(*BIG, f"memory.budget={_budget_between(_smallest(forced), _smallest(without))}"),
             "h100-80gb")
    s = p.strategies
    assert s.activation_offloading and s.offload_min_bytes == OFFLOAD_MIN_BYTES
    assert s.offload_max_host_bytes == int(HOST_PINNED_SHARE * PROFILES["h100-80gb"].host_ram_bytes)
    decision = _decision(p, "activation_offloading")
    assert decision.source == "auto" and "offloading off would not fit" in decision.reason
    # the same strategies without offloading: the moved bytes are host bytes, not device bytes, and cost speed
    twin = next(a for a in p.alternatives if a.strategies == msgspec.structs.replace(
        s, activation_offloading=False, offload_min_bytes=0, offload_max_host_bytes=0))
    host = {c.name: c.bytes for c in p.memory.host}
    assert host["activations"] > 0 and not twin.fits
    assert twin.peak_bytes - p.memory.peak_bytes == host["activations"]
    assert twin.tokens_per_s > p.tokens_per_s
    assert "pinned host memory" in render_plan(p)


def test_cuda_with_room_keeps_offloading_off_and_says_why(tiny_spec):
    p = plan(tiny_spec(*BIG), "h100-80gb")
    assert not p.strategies.activation_offloading and not p.memory.host
    assert any(a.strategies.activation_offloading for a in p.alternatives)
    decision = _decision(p, "activation_offloading")
    assert decision.source == "auto" and "offloading on is slower" in decision.reason


def test_offloading_under_fsdp_is_refused_or_never_considered(tiny_spec):
    with pytest.raises(PlanError, match=r"activation_offloading = 'on' with 2 processes"):
        plan(tiny_spec("memory.strategies.activation_offloading=on"), "h100-80gb", world_size=2)
    p = plan(tiny_spec(), "h100-80gb", world_size=2)
    assert not any(a.strategies.activation_offloading for a in p.alternatives)
    assert _decision(p, "activation_offloading").source == "fixed"


def test_the_host_budget_caps_what_the_estimate_moves(tiny_spec):
    p = plan(tiny_spec(*BIG, "memory.strategies.activation_offloading=on",
                       "memory.strategies.activation_checkpointing=off"), "h100-80gb")
    shapes, trains = trainable_shapes(p.spec, p.model)

    def estimate(cap: int):
        s = msgspec.structs.replace(p.strategies, offload_max_host_bytes=cap)
        return estimate_memory(p.model, s, p.spec.train, p.spec.optimizer, shapes, trains)

    unbounded = estimate(1 << 50)
    moved = unbounded.host[0].bytes
    capped = estimate(moved // 4)
    assert capped.host[0].bytes == moved // 4
    # what does not fit the budget stays on the device
    assert capped.by_name()["activations"] - unbounded.by_name()["activations"] == moved - moved // 4


# -- optimizer.offload (torchao CPUOffloadOptimizer) ----------------------------------------------------


def test_host_optimizer_on_a_cpu_is_refused(tiny_spec):
    with pytest.raises(PlanError, match=r"optimizer\.offload = true: cpu is a CPU"):
        plan(tiny_spec("optimizer.offload=true"), "cpu")


def test_host_optimizer_counts_its_state_and_copies_in_host_memory(tiny_spec):
    plain = plan(tiny_spec(*BIG), "h100-80gb")
    p = plan(tiny_spec(*BIG, "optimizer.offload=true"), "h100-80gb")
    shapes, _ = trainable_shapes(p.spec, p.model)
    host_shapes = [s for s in shapes if _numel(s) >= CPU_OFFLOAD_MIN_NUMEL]
    device_shapes = [s for s in shapes if _numel(s) < CPU_OFFLOAD_MIN_NUMEL]
    assert host_shapes and device_shapes  # weights on the host, norm vectors on the device
    host = {c.name: c.bytes for c in p.memory.host}
    n_host = sum(_numel(s) for s in host_shapes)
    assert host == {"parameters": 2 * n_host, "gradients": 2 * n_host,
                    "optimizer_state": optimizer_state_bytes(p.spec.optimizer, host_shapes, 2)}
    assert p.memory.by_name()["optimizer_state"] == optimizer_state_bytes(p.spec.optimizer, device_shapes, 2)
    assert p.memory.peak_bytes < plain.memory.peak_bytes
    assert p.tokens_per_s < plain.tokens_per_s  # the host step and the copies back cost time
    # optimizer_in_backward and 8-bit states are never considered with it, and the plan says why
    assert not any(a.strategies.optimizer_in_backward or a.strategies.optimizer_state != "full"
                   for a in plan(tiny_spec(*BIG, "optimizer.offload=true", "train.clip_grad_norm=0",
                                           # the tensors' 64 MiB of old, with the ~0.6 GiB the CUDA runtime adds
                                           "memory.budget=718MiB"), "h100-80gb").alternatives)
    assert "optimizer.offload" in _decision(p, "optimizer_in_backward").reason
    assert "optimizer.offload" in _decision(p, "low_bit_optimizer").reason


def test_offloaded_gradients_leave_the_device_before_the_optimizer_step(tiny_spec):
    shape = ("train.micro_batch=1", "train.seq_len=16", "memory.precision=fp32",
             "memory.strategies.activation_checkpointing=off")  # no recompute phase to take the peak
    kept = plan(tiny_spec(*shape, "optimizer.offload=true"), "h100-80gb")
    freed = plan(tiny_spec(*shape, "optimizer.offload=true", "optimizer.offload_gradients=true"), "h100-80gb")
    # kept, every gradient is on the device at the step; freed, only those of the small tensors the device steps,
    # so the step is no longer the peak
    assert kept.memory.peak_phase == "optimizer step" and kept.memory.by_name()["gradients"] == 4 * kept.n_trainable
    assert freed.memory.peak_phase == "start of backward"
    assert freed.memory.peak_bytes < kept.memory.peak_bytes
    assert {c.name: c.bytes for c in freed.memory.host} == {c.name: c.bytes for c in kept.memory.host}


@pytest.mark.parametrize("overrides,fields", [
    (("optimizer.offload_gradients=true", "train.grad_accum=2"), ("optimizer.offload_gradients", "train.grad_accum")),
    (("optimizer.offload_gradients=true", "train.micro_batch=4", "memory.strategies.micro_batch_split=on"),
     ("optimizer.offload_gradients", "micro_batch_split")),
    (("memory.strategies.optimizer_in_backward=on", "train.clip_grad_norm=0"), ("optimizer_in_backward",)),
    (("memory.strategies.low_bit_optimizer=on",), ("low_bit_optimizer",)),
])
def test_host_optimizer_conflicts_name_the_fields(tiny_spec, overrides, fields):
    with pytest.raises(PlanError) as err:
        plan(tiny_spec("optimizer.offload=true", *overrides), "h100-80gb")
    assert all(f in str(err.value) for f in ("optimizer.offload", *fields)), str(err.value)


def test_host_optimizer_under_fsdp_or_without_host_memory_is_refused(tiny_spec):
    with pytest.raises(PlanError, match=r"optimizer\.offload = true: it serves a single GPU, not 2 processes"):
        plan(tiny_spec("optimizer.offload=true"), "h100-80gb", world_size=2)
    no_ram = msgspec.structs.replace(PROFILES["h100-80gb"], name="h100-no-ram", host_ram_bytes=1024)
    with pytest.raises(PlanError, match=r"optimizer\.offload = true: .* pinned memory"):
        plan(tiny_spec("optimizer.offload=true"), no_ram)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def test_trace_runs_an_offloading_plan_with_everything_on_the_device(tiny_spec):
    """Fake tensors live on the CPU, so `lowmem plan --trace` traces such a plan without the moves: an upper
    bound of the device bytes (the optimizer state all on the device, for one)."""
    from lowmem.train.dryrun import trace_memory

    p = plan(tiny_spec("memory.strategies.activation_offloading=on", "optimizer.offload=true"), "h100-80gb")
    assert p.strategies.activation_offloading and p.memory.host
    traced = trace_memory(p)
    assert traced.by_name()["optimizer_state"] > p.memory.by_name()["optimizer_state"]
    assert not traced.host


@pytest.mark.parametrize("host_gib", [4, 16, 64])
def test_pinned_host_memory_is_never_more_than_half_the_host_ram(tiny_spec, host_gib):
    from lowmem.plan.estimate import HOST_PINNED_SHARE
    from lowmem.plan.hardware import resolve_hardware

    spec = tiny_spec("model.preset=llama3.1-8b", "data.tokenizer.vocab_size=128256", "method.kind=qlora",
                     "method.rank=16", "train.micro_batch=2", "train.grad_accum=8", "train.seq_len=2048",
                     "memory.budget=20GiB", "optimizer.lr=1e-4", "memory.precision=auto")
    p = plan(spec, resolve_hardware("rtx4090-24gb", f"{host_gib}GiB"))
    assert p.hardware.host_ram_bytes == host_gib * 1024**3
    assert p.strategies.activation_offloading  # so the host share is what limits it
    assert sum(c.bytes for c in p.memory.host) <= HOST_PINNED_SHARE * p.hardware.host_ram_bytes
    assert p.strategies.offload_max_host_bytes <= HOST_PINNED_SHARE * p.hardware.host_ram_bytes
