"""Hardware profiles: the machine a plan is made for, detected or named.

Figures for named GPUs are from the vendors' public spec sheets (dense, no sparsity). CPU figures are
per-core estimates for an AVX2/FMA core (2 FMA units x 8 fp32 lanes x ~3 GHz = 96 GFLOP/s peak); the
machine this project is developed on measured 97 GFLOP/s fp32 on 2 cores and 0.3 GFLOP/s bf16 (no
AVX512-BF16/AMX), see shared/DESIGN.md.
"""

import os
import re
from pathlib import Path
from typing import Literal

import msgspec

GiB = 1024**3


class HardwareProfile(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What the planner needs to know about a device."""

    name: str
    device: Literal["cpu", "cuda"]
    memory_bytes: int  # device memory (for a CPU: the RAM the run may use)
    host_ram_bytes: int
    n_cores: int
    peak_flops_fp32: float
    peak_flops_bf16: float
    bf16_compute: bool  # bf16 matmuls run at (at least) fp32 speed
    pcie_bytes_per_s: float = 0.0
    compute_capability: str | None = None
    # device memory bandwidth (spec sheet); 0: not given. Recorded for the speed model, which does not use it yet
    memory_bytes_per_s: float = 0.0


def _gpu(name, memory_gib, fp32_tflops, bf16_tflops, pcie_gbps, cc, host_gib=256) -> HardwareProfile:
    return HardwareProfile(
        name=name, device="cuda", memory_bytes=int(memory_gib * GiB), host_ram_bytes=host_gib * GiB, n_cores=16,
        peak_flops_fp32=fp32_tflops * 1e12, peak_flops_bf16=bf16_tflops * 1e12, bf16_compute=True,
        pcie_bytes_per_s=pcie_gbps * 1e9, compute_capability=cc,
    )


# name -> profile. H100 SXM: 80 GB, 67 TF fp32, 989 TF bf16 dense, PCIe 5 (64 GB/s); A100: 19.5 / 312 TF,
# PCIe 4 (32 GB/s); RTX 4090: 24 GB, 82.6 TF fp32, 165 TF bf16 (fp32 accumulate); RTX A6000: 48 GB,
# 38.7 TF fp32, 155 TF bf16 (tensor), PCIe 4.
# Memory is what the card gives torch, not the marketing size: "80 GB" is 80e9 bytes at most, and the driver
# keeps some. The figures are the "total capacity" torch prints in its OutOfMemoryError (the device's
# total_memory): H100 80 GB 79.6 GiB (issue #14); the others as that message reads in public bug reports.
# A plan counts the CUDA context (about 0.5 GiB), cuBLAS's workspaces, the allocator's slack and NCCL's buffers
# against this (estimate.cuda_overheads); a plan for the local GPU starts from mem_get_info instead.
PROFILES: dict[str, HardwareProfile] = {
    "h100-80gb": _gpu("h100-80gb", 79.6, 67, 989, 64, "9.0"),
    "h200-141gb": _gpu("h200-141gb", 139.8, 67, 989, 64, "9.0"),
    "a100-80gb": _gpu("a100-80gb", 79.15, 19.5, 312, 32, "8.0"),
    "a100-40gb": _gpu("a100-40gb", 39.39, 19.5, 312, 32, "8.0"),
    "rtx4090-24gb": _gpu("rtx4090-24gb", 23.65, 82.6, 165, 32, "8.9", host_gib=64),
    "a6000-48gb": _gpu("a6000-48gb", 47.54, 38.7, 155, 32, "8.6", host_gib=128),
    "cpu": HardwareProfile(
        name="cpu", device="cpu", memory_bytes=16 * GiB, host_ram_bytes=16 * GiB, n_cores=8,
        peak_flops_fp32=8 * 48e9, peak_flops_bf16=8 * 0.15e9, bf16_compute=False,
    ),
}

CPU_FLOPS_PER_CORE_FP32 = 48e9  # AVX2: 2 FMA x 8 lanes x ~3 GHz
CPU_FLOPS_PER_CORE_FP32_AVX512 = 96e9  # 2 FMA x 16 lanes
# End-to-end a bf16 training step on an AMX/AVX512-BF16 core ran 1.42x the fp32 step (quickstart-5m,
# benchmarks/memory_matrix.py: 3,492 vs 2,466 tokens/s): matmuls are faster, elementwise ops are not. The
# profile's bf16 "peak" is that effective ratio, not the AMX tile peak.
CPU_BF16_OVER_FP32_NATIVE = 1.42
CPU_FLOPS_PER_CORE_BF16_EMULATED = 0.15e9


def resolve_hardware(name: str | None, host_ram: str | int | None = None) -> HardwareProfile:
    """A named profile, a profile file (`*.toml`, `load_hardware_file`), or the local machine for None / "local";
    with `host_ram` (a size: "64GiB") as its host RAM (on a CPU also the memory the run may use)."""
    if name is None or name == "local":
        hw = detect_local()
    elif name.endswith(".toml"):
        hw = load_hardware_file(name)
    elif name not in PROFILES:
        raise ValueError(f"unknown hardware profile {name!r}; known: local, {', '.join(PROFILES)}, or a profile "
                         "file (my-box.toml: see lowmem.plan.hardware.HardwareFile)")
    else:
        hw = PROFILES[name]
    if host_ram is None:
        return hw
    from lowmem.spec.units import parse_bytes

    try:
        ram = parse_bytes(host_ram)
    except ValueError as err:
        raise ValueError(f"--host-ram {host_ram!r}: {err}") from None
    return msgspec.structs.replace(hw, host_ram_bytes=ram, **({"memory_bytes": ram} if hw.device == "cpu" else {}))


class HardwareFile(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A machine without a named profile, as a TOML file for `--hardware my-box.toml`. Sizes are strings
    ("24GiB", "64GB"); speeds are the spec sheet's dense figures."""

    name: str
    device: Literal["cpu", "cuda"] = "cuda"
    memory: str  # what the device gives torch (a CPU: the RAM the run may use)
    host_ram: str
    bf16_tflops: float
    fp32_tflops: float
    memory_bandwidth_gbps: float = 0.0  # GB/s
    pcie_gbps: float = 0.0  # GB/s, one direction (CUDA: activation offloading, a host optimizer)
    n_cores: int = 16
    compute_capability: str | None = None  # "8.9": picks cuBLAS's workspace size
    bf16_compute: bool = True  # bf16 matmuls at least as fast as fp32


# what each field of a profile file holds, for the one-line error a bad one gets
HARDWARE_FIELD_HELP = {
    "name": 'a name for the plan, e.g. "my-box"', "device": '"cuda" or "cpu"',
    "memory": 'a size such as "24GiB"', "host_ram": 'a size such as "64GiB"',
    "bf16_tflops": "a number of TFLOP/s, e.g. 165", "fp32_tflops": "a number of TFLOP/s, e.g. 82.6",
    "memory_bandwidth_gbps": "GB/s, e.g. 1008", "pcie_gbps": "GB/s, e.g. 32", "n_cores": "an integer",
    "compute_capability": 'a string such as "8.9"', "bf16_compute": "true or false",
}


def load_hardware_file(path: str | Path) -> HardwareProfile:
    """The HardwareProfile a TOML file describes (`HardwareFile`); a bad file is one ValueError naming the file,
    the field, its value and what to write instead."""
    import tomllib

    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"--hardware {str(path)!r}: no such profile file (looked at {path.resolve()})") from None
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"{path}: not valid TOML ({err})") from None
    try:
        f = msgspec.convert(raw, HardwareFile)
        memory, host_ram = _file_size(path, "memory", f.memory), _file_size(path, "host_ram", f.host_ram)
    except msgspec.ValidationError as err:
        raise ValueError(_file_error(path, raw, str(err))) from None
    return HardwareProfile(
        name=f.name, device=f.device, memory_bytes=memory, host_ram_bytes=host_ram, n_cores=f.n_cores,
        peak_flops_fp32=f.fp32_tflops * 1e12, peak_flops_bf16=f.bf16_tflops * 1e12, bf16_compute=f.bf16_compute,
        pcie_bytes_per_s=f.pcie_gbps * 1e9, compute_capability=f.compute_capability,
        memory_bytes_per_s=f.memory_bandwidth_gbps * 1e9,
    )


def _file_size(path: Path, field: str, text: str) -> int:
    from lowmem.spec.units import parse_bytes

    try:
        return parse_bytes(text)
    except ValueError:
        raise msgspec.ValidationError(f"not a size - at `$.{field}`") from None


def _file_error(path: Path, raw: dict, message: str) -> str:
    """`file: field = value: what is wrong; write ...` from msgspec's `... - at `$.field`` message."""
    match = re.search(r"`\$\.(\w+)`", message)
    what = message.split(" - at ")[0]
    if match is None:  # a missing or unknown field: msgspec names it in the message
        unknown = re.search(r"unknown field `(\w+)`", message)
        if unknown:
            field = unknown.group(1)
            return (f"{path}: {field} = {raw.get(field)!r}: no such field; the fields are "
                    f"{', '.join(HARDWARE_FIELD_HELP)}")
        missing = re.search(r"missing required field `(\w+)`", message)
        field = missing.group(1) if missing else "?"
        return f"{path}: {field} is missing; add {field} = {HARDWARE_FIELD_HELP.get(field, '...')}"
    field = match.group(1)
    return f"{path}: {field} = {raw.get(field)!r}: {what}; write {field} = {HARDWARE_FIELD_HELP[field]}"


def detect_local() -> HardwareProfile:
    """The machine this process runs on: the first CUDA device if torch sees one, else the CPU."""
    import torch

    host_ram = _host_ram_bytes()
    n_cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        cc = f"{props.major}.{props.minor}"
        known = next((p for p in PROFILES.values() if p.device == "cuda" and p.compute_capability == cc), None)
        # what is left once this process's CUDA context (and anything else on the card) took its share; a plan
        # counts that context as its cuda_context line (estimate.cuda_overheads), so it is added back here
        from lowmem.plan.estimate import CUDA_CONTEXT_BYTES  # estimate imports this module

        free, _total = torch.cuda.mem_get_info(0)
        return HardwareProfile(
            name=props.name, device="cuda", memory_bytes=free + CUDA_CONTEXT_BYTES, host_ram_bytes=host_ram,
            n_cores=n_cores, peak_flops_fp32=known.peak_flops_fp32 if known else 20e12,
            peak_flops_bf16=known.peak_flops_bf16 if known else 150e12, bf16_compute=props.major >= 8,
            pcie_bytes_per_s=known.pcie_bytes_per_s if known else 16e9, compute_capability=cc,
        )
    flags = cpu_flags()
    bf16 = cpu_has_bf16(flags)
    fp32 = n_cores * (CPU_FLOPS_PER_CORE_FP32_AVX512 if "avx512f" in flags else CPU_FLOPS_PER_CORE_FP32)
    return HardwareProfile(
        name=f"local-cpu-{n_cores}c", device="cpu", memory_bytes=host_ram, host_ram_bytes=host_ram,
        n_cores=n_cores, peak_flops_fp32=fp32,
        peak_flops_bf16=fp32 * CPU_BF16_OVER_FP32_NATIVE if bf16 else n_cores * CPU_FLOPS_PER_CORE_BF16_EMULATED,
        bf16_compute=bf16,
    )


def cpu_flags() -> frozenset[str]:
    """The CPU feature flags /proc/cpuinfo lists (empty where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    return frozenset(word for line in text.splitlines() if line.startswith("flags") for word in line.split()[2:])


def cpu_has_bf16(flags: frozenset[str] | None = None) -> bool:
    """True when the CPU has native bf16 arithmetic (AVX512-BF16 or AMX-BF16)."""
    flags = cpu_flags() if flags is None else flags
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def _host_ram_bytes() -> int:
    try:
        meminfo = Path("/proc/meminfo").read_text()
        kib = int(re.search(r"MemTotal:\s+(\d+) kB", meminfo).group(1))
        return kib * 1024
    except (OSError, AttributeError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
