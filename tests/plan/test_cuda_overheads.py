"""Issue #14: CUDA memory is planned the way nvidia-smi shows it. A CUDA plan names what the process holds beyond
its live tensors (cuBLAS workspaces, the allocator's slack, the CUDA context, NCCL's buffers under torchrun) and fits
that total to the budget; a CPU plan has none of it."""

import types

import msgspec
import pytest
import torch

from lowmem.plan import PROFILES, Plan, PlanError, plan, render_plan
from lowmem.plan import hardware as hardware_module

MiB = 1 << 20
# activations dominate: quickstart-5m, 16 x 1024 tokens, bf16, so leaner strategies save gigabytes
BIG = ("model.preset=quickstart-5m", "train.seq_len=1024", "train.micro_batch=16", "memory.precision=bf16")


def _overheads(p) -> dict[str, int]:
    return {c.name: c.bytes for c in p.memory.overheads}


def test_an_h100_plan_carries_the_overheads_the_sources_give(tiny_spec):
    m = plan(tiny_spec(), "h100-80gb").memory
    cublas = 2 * 32 * MiB  # two handles (the step's thread and autograd's) x torch's sm90 workspace
    assert _overheads(plan(tiny_spec(), "h100-80gb")) == {
        "cublas_workspace": cublas,
        "allocator_slack": int(0.10 * (m.peak_bytes + cublas)),
        "cuda_context": 512 * MiB,
    }
    assert m.allocated_bytes == m.peak_bytes + cublas
    assert m.reserved_bytes == m.allocated_bytes + int(0.10 * m.allocated_bytes)
    assert m.device_bytes == m.reserved_bytes + 512 * MiB
    assert all(c.note for c in m.overheads)  # each line says where its figure comes from


def test_before_hopper_the_cublas_workspace_is_torchs_smaller_default(tiny_spec):
    # ":4096:2:16:8": 4096 KiB x 2 + 16 KiB x 8 per handle
    assert _overheads(plan(tiny_spec(), "a100-80gb"))["cublas_workspace"] == 2 * (8 * MiB + 128 * 1024)


def test_nccl_buffers_only_under_torchrun_on_cuda(tiny_spec):
    assert "nccl_buffers" not in _overheads(plan(tiny_spec(), "h100-80gb"))
    sharded = _overheads(plan(tiny_spec(), "h100-80gb", world_size=2))
    assert sharded["nccl_buffers"] == 32 * 12 * MiB  # 32 ring channels x (10 MiB of receive FIFOs + 2 MiB send)
    assert _overheads(plan(tiny_spec(), "h100-80gb", world_size=4))["nccl_buffers"] == 32 * 12 * MiB  # 2 peers


@pytest.mark.parametrize("allocator", ["on", "off"])
def test_a_cpu_plan_counts_the_process_rss_beyond_its_tensors(tiny_spec, allocator):
    from lowmem.plan.estimate import (
        ALLOCATOR_CACHE_MIN,
        ALLOCATOR_CACHE_SHARE,
        CPU_RUNTIME_BYTES,
        HEAP_RETAINED_MAX,
        PERSISTENT,
    )

    kept = {"on": "allocator_cache", "off": "heap_retained"}[allocator]
    for world_size in (1, 2):
        p = plan(tiny_spec(f"memory.strategies.host_caching_allocator={allocator}"), "cpu", world_size=world_size)
        m = p.memory
        assert p.strategies.host_allocator == {"on": "caching", "off": "system"}[allocator]
        lines = {c.name: c.bytes for c in m.overheads}
        assert set(lines) == {"runtime", kept}
        assert lines["runtime"] == max(CPU_RUNTIME_BYTES.values())
        transient = m.peak_bytes - sum(c.bytes for c in m.components if c.name in PERSISTENT)
        if allocator == "off":
            assert 0 < lines[kept] <= HEAP_RETAINED_MAX
        else:
            assert lines[kept] == max(int(ALLOCATOR_CACHE_SHARE * transient), ALLOCATOR_CACHE_MIN)
        # the executor compares the tracked tensors with peak_bytes; the budget is fitted with the RSS view
        assert m.device_bytes == m.peak_bytes + sum(lines.values())
    # a budget that holds the tensors but not the runtime no longer fits
    roomy = plan(tiny_spec(), "cpu")
    with pytest.raises(PlanError, match="nothing fits"):
        plan(tiny_spec(f"memory.budget={int(roomy.memory.peak_bytes * 2 / 0.9)}B"), "cpu")


def test_a_plan_that_fitted_by_the_thin_margin_now_picks_a_leaner_one(tiny_spec):
    roomy = plan(tiny_spec(*BIG), "h100-80gb")
    runtime = roomy.memory.device_bytes - roomy.memory.peak_bytes
    assert runtime > 600 * MiB
    # a budget whose usable part holds the roomy plan's tensors with 200 MiB to spare, but not what CUDA adds
    budget = int((roomy.memory.peak_bytes + 200 * MiB) / 0.9)
    tight = plan(tiny_spec(*BIG, f"memory.budget={budget}"), "h100-80gb")
    assert roomy.memory.peak_bytes <= tight.usable_bytes < roomy.memory.device_bytes
    assert tight.strategies != roomy.strategies
    assert tight.memory.device_bytes <= tight.usable_bytes < tight.memory.device_bytes + runtime
    twin = next(a for a in tight.alternatives if a.strategies == roomy.strategies)
    assert not twin.fits and twin.device_bytes == roomy.memory.device_bytes


def test_the_rendered_cuda_plan_shows_the_lines_and_the_nvidia_smi_total(tiny_spec):
    p = plan(tiny_spec(), "h100-80gb", world_size=2)
    text = render_plan(p)
    memory = text[text.index("memory at peak"):text.index("estimated speed")]
    for name in ("tensors", "cublas_workspace", "allocator_slack", "cuda_context", "nccl_buffers"):
        assert f"\n  {name} " in memory
    assert "as nvidia-smi shows the process" in memory and "max_memory_reserved" in memory
    assert memory.index("batch") < memory.index("cublas_workspace") < memory.index("total")
    cpu = render_plan(plan(tiny_spec(), "cpu"))
    assert "cuda_context" not in cpu and "nvidia-smi" not in cpu


def test_a_plan_json_written_before_the_overheads_still_decodes(tiny_spec):
    raw = msgspec.json.decode(msgspec.json.encode(plan(tiny_spec(), "h100-80gb")))
    del raw["memory"]["overheads"]
    for alternative in raw["alternatives"]:
        del alternative["device_bytes"]
    old = msgspec.json.decode(msgspec.json.encode(raw), type=Plan)
    assert old.memory.overheads == () and old.memory.device_bytes == old.memory.peak_bytes
    assert all(a.device_bytes == 0 for a in old.alternatives)
    assert "total" in render_plan(old)


def test_a_detected_gpu_gives_back_the_context_its_free_memory_lost(monkeypatch):
    # mem_get_info runs after this process's context exists; the plan counts that context as its own line
    props = types.SimpleNamespace(name="NVIDIA H100 80GB HBM3", major=9, minor=0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda _: props)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda _: (70 * 1024 * MiB, 80 * 1024 * MiB))
    local = hardware_module.detect_local()
    assert local.memory_bytes == 70 * 1024 * MiB + 512 * MiB
    assert local.peak_flops_bf16 == PROFILES["h100-80gb"].peak_flops_bf16
