"""Issue #14: the executor sets torch's measured CUDA views beside the same views of the plan, and re-plans after an
out-of-memory error in the view the planner fits (nvidia-smi's: the CUDA overhead lines included)."""

import msgspec

from lowmem.plan import plan
from lowmem.plan.estimate import CUDA_CONTEXT_BYTES
from lowmem.spec.units import parse_bytes
from lowmem.train import oom
from lowmem.train.oom import REPLAN_FRACTION, replan_after_oom
from lowmem.train.progress import describe_memory, memory_report

MiB = 1 << 20


def test_measured_allocated_and_reserved_are_set_against_the_plans_same_views(tiny_spec):
    p = plan(tiny_spec(), "h100-80gb")
    m = p.memory
    tracked = {"peak_bytes": m.peak_bytes, "peak_by_category": m.by_name()}
    cuda = {"max_memory_allocated": m.allocated_bytes, "max_memory_reserved": m.allocated_bytes + 3 * MiB,
            "num_alloc_retries": 0, "num_ooms": 0}
    report = memory_report(p, tracked, cuda)
    # the plan's allocated view counts cuBLAS's workspaces, as torch's does: no error from leaving them out
    assert report["planned_peak_bytes"] == m.allocated_bytes > m.peak_bytes
    assert report["error"] == 0.0
    assert report["planned_tensor_peak_bytes"] == m.peak_bytes
    assert report["cuda"]["planned_reserved_bytes"] == m.reserved_bytes > m.allocated_bytes
    assert report["cuda"]["planned_device_bytes"] == m.device_bytes > m.reserved_bytes
    assert "planned" in describe_memory(report).splitlines()[-1]


def test_a_cpu_report_stays_the_tensor_view(tiny_spec):
    p = plan(tiny_spec(), "cpu")
    report = memory_report(p, {"peak_bytes": p.memory.peak_bytes, "peak_by_category": p.memory.by_name()})
    assert report["planned_peak_bytes"] == p.memory.peak_bytes and "cuda" not in report


def test_a_replan_starts_from_the_failed_plans_nvidia_smi_view(tiny_spec):
    # activations dominate (quickstart-5m, 16 x 1024 tokens), so 90% of the need still leaves a leaner plan
    p = plan(tiny_spec("model.preset=quickstart-5m", "train.seq_len=1024", "train.micro_batch=16",
                       "memory.precision=bf16"), "h100-80gb")
    again = replan_after_oom(p, None)
    # the failed plan needed device_bytes in the planner's own terms; its tensors alone would under-ask by ~0.6 GiB
    assert parse_bytes(again.spec.memory.budget) == int(p.memory.device_bytes * REPLAN_FRACTION)
    assert again.memory.device_bytes <= again.usable_bytes and again.strategies != p.strategies


def test_what_a_gpu_had_counts_the_context_the_drivers_free_lost():
    class Card:
        def available_bytes(self):
            return 10 * 1024 * MiB

    class NoCard:
        def available_bytes(self):
            return None

    assert oom.available_bytes(Card(), None) == 10 * 1024 * MiB + CUDA_CONTEXT_BYTES
    assert oom.available_bytes(Card(), 4 * MiB) == 4 * MiB
    assert oom.available_bytes(NoCard(), 4 * MiB) == 4 * MiB
    assert oom.available_bytes(NoCard(), None) is None


def test_a_plan_json_from_before_the_views_reports_the_tensor_view(tiny_spec):
    p = plan(tiny_spec(), "h100-80gb")
    old = msgspec.structs.replace(p, memory=msgspec.structs.replace(p.memory, overheads=()))
    cuda = {"max_memory_allocated": p.memory.peak_bytes, "max_memory_reserved": p.memory.peak_bytes,
            "num_alloc_retries": 0, "num_ooms": 0}
    assert memory_report(old, None, cuda)["planned_peak_bytes"] == p.memory.peak_bytes
