"""fsdp_cpu_offload: FSDP2's CPUOffloadPolicy, planned for CUDA processes only, last of all the strategies.

Its memory effect exists only on a GPU (no GPU was lent to this project's CI); tests/train/test_distributed.py
runs the executor's wiring of the policy on CPU processes, where it must change no number.
"""

import msgspec
import pytest

from lowmem.plan import plan
from lowmem.plan.hardware import resolve_hardware
from lowmem.plan.planner import PlanError

LLAMA_8B = ["model.preset=llama3.1-8b", "train.seq_len=2048", "train.micro_batch=1", "train.steps=100",
            "optimizer.lr=1e-5"]


def _decision(p):
    return next(d for d in p.decisions if d.strategy == "fsdp_cpu_offload")


def test_refused_on_a_cpu_and_in_one_process_with_the_reason(tiny_spec):
    with pytest.raises(PlanError, match=r"fsdp_cpu_offload = 'on' on cpu: .*already live in host memory.*'auto' or 'off'"):
        plan(tiny_spec("memory.strategies.fsdp_cpu_offload=on"), "cpu", world_size=2)
    with pytest.raises(PlanError, match=r"fsdp_cpu_offload = 'on' for one process.*--nproc N"):
        plan(tiny_spec(*LLAMA_8B, "memory.strategies.fsdp_cpu_offload=on"), "h100-80gb")


def test_auto_never_offloads_on_a_cpu(tiny_spec):
    p = plan(tiny_spec(), "cpu", world_size=2)
    assert not p.strategies.fsdp_cpu_offload
    assert _decision(p).source == "fixed" and "already live in host memory" in _decision(p).reason
    assert not any(a.strategies.fsdp_cpu_offload for a in p.alternatives)
    with pytest.raises(PlanError, match="nothing fits"):  # and not offloaded to fit
        plan(tiny_spec("memory.budget=1MiB"), "cpu", world_size=2)


def test_chosen_on_cuda_only_when_nothing_else_fits(tiny_spec):
    roomy = plan(tiny_spec(*LLAMA_8B, "memory.budget=40GB"), "h100-80gb", world_size=4)
    assert not roomy.strategies.fsdp_cpu_offload and roomy.memory.host == ()
    assert _decision(roomy).reason.startswith("not needed")
    tight = plan(tiny_spec(*LLAMA_8B, "memory.budget=10GB"), "h100-80gb", world_size=4)
    assert tight.strategies.fsdp_cpu_offload
    on_device = [a for a in tight.alternatives if not a.strategies.fsdp_cpu_offload]
    assert on_device and not any(a.fits for a in on_device)
    assert "no plan with the shards on the device fits" in _decision(tight).reason
    # the shards, their gradients and AdamW's states (fp32, as the spec says) are host memory: 1/4 of each
    host = {c.name: c.bytes for c in tight.memory.host}
    assert host["parameters"] == pytest.approx(tight.n_params / 4 * 4, rel=0.01)
    assert host["optimizer_state"] == pytest.approx(2 * host["gradients"], rel=0.01)
    device = tight.memory.by_name()
    assert device["optimizer_state"] == 0 and device["parameters"] < host["parameters"] / 2
    # the host step and the copies cost speed: slower than the same strategies with the shards on the device
    same = msgspec.structs.replace(tight.strategies, fsdp_cpu_offload=False)
    twin = next(a for a in tight.alternatives if a.strategies == same)
    assert tight.tokens_per_s < twin.tokens_per_s


def test_forced_on_under_torchrun_on_cuda(tiny_spec):
    p = plan(tiny_spec(*LLAMA_8B, "memory.strategies.fsdp_cpu_offload=on"), "h100-80gb", world_size=4)
    assert p.strategies.fsdp_cpu_offload and _decision(p).source == "user"
    assert all(a.strategies.fsdp_cpu_offload for a in p.alternatives)


def test_every_process_pins_its_shards_in_the_same_host_ram(tiny_spec):
    """4 processes x ~13 GiB of pinned shards do not fit half of a 64 GiB host: not offered there."""
    hw = msgspec.structs.replace(resolve_hardware("h100-80gb"), host_ram_bytes=64 * 2**30)
    with pytest.raises(PlanError, match="nothing fits"):
        plan(tiny_spec(*LLAMA_8B, "memory.budget=10GB"), hw, world_size=4)
