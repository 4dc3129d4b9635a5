"""The executor's device seam: which CUDA plans run here, and the process group's backends."""

from types import SimpleNamespace

import pytest
import torch

from lowmem.plan.hardware import PROFILES, GiB
from lowmem.train import device
from lowmem.train.distributed import backend_for


def test_gpu_profiles_carry_the_memory_torch_reports_not_the_marketing_size():
    assert PROFILES["h100-80gb"].memory_bytes == int(79.6 * GiB)
    # the nominal size is the HBM's GiB; the driver keeps a part of it
    assert all(p.memory_bytes < int(p.name.split("-")[1].removesuffix("gb")) * GiB
               for p in PROFILES.values() if p.device == "cuda")


def test_nccl_runs_device_collectives_and_gloo_the_host_scalars():
    assert backend_for("cuda") == "cpu:gloo,cuda:nccl"
    assert backend_for("cpu") == "gloo"


def _local_gpu(monkeypatch, name: str, total: int) -> None:
    """This process as if it had one GPU (only what check_local_device asks of torch.cuda)."""
    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda _i: SimpleNamespace(name=name, total_memory=total))


def test_a_plan_for_a_bigger_card_is_refused_naming_both(monkeypatch):
    _local_gpu(monkeypatch, "NVIDIA GeForce RTX 4090", int(23.65 * GiB))
    with pytest.raises(ValueError, match=r"(?s)h100-80gb.*RTX 4090.*lowmem plan SPEC"):
        device.check_local_device(PROFILES["h100-80gb"], needed_bytes=int(70 * GiB))


def test_a_plan_that_fits_the_local_card_runs_with_a_note(monkeypatch):
    _local_gpu(monkeypatch, "NVIDIA H200", int(139.8 * GiB))
    note = device.check_local_device(PROFILES["h100-80gb"], needed_bytes=int(79.6 * GiB))
    assert "h100-80gb" in note and "H200" in note


def test_cpu_plans_and_this_cpu_torch():
    assert device.check_local_device(PROFILES["cpu"], needed_bytes=1) is None
    if not torch.backends.cuda.is_built():
        with pytest.raises(ValueError, match="built without CUDA"):
            device.check_local_device(PROFILES["h100-80gb"], needed_bytes=1)
    assert device.to_device({"x": torch.ones(2)}, "cpu")["x"].device.type == "cpu"
    assert device.CudaMemory("cpu").read() is None and device.cuda_rng_state("cpu") is None
