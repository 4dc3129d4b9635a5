"""lowmem's CPU caching allocator: what a CPU run's tensors are allocated from (plan strategy `host_allocator`).

With glibc's defaults a training step's RSS grows to about twice its live tensors and stays there: after the first
large free glibc serves later tensors from its heap, which fragments and keeps what it frees (measured: LoRA on
quickstart-5m, 207 MiB of step tensors, 406 MiB of RSS). Returning every large free to the system instead (a fixed
mmap threshold) keeps RSS at the tensors but costs 30-45% of the speed: every step faults in and zeroes its pages
again. This allocator keeps both: tensors of 1 MiB or more come from mmap'd blocks, rounded up to one of eight
size classes per power of two, kept when freed and handed to the next tensor of that class (or of the next one
up), so after the first step no page is faulted in again, and RSS stays at the step's peak of live tensors plus
the rounding and the blocks cached in classes not in use at that moment. Smaller tensors go to torch's own CPU
allocator. `set_limit` bounds the mapped bytes: past it, cached blocks are unmapped (largest first) before a new
one is mapped.

The allocator is C++ (hostalloc.cpp beside this file), compiled once by lowmem.native; `install()` makes it torch's
CPU allocator for the tensors allocated from then on (tensors allocated before keep their own deleter).
"""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import NamedTuple

from lowmem import native

__all__ = ["HostAllocatorStats", "available", "empty_cache", "install", "installed", "reset_peak", "set_limit",
           "stats", "uninstall"]

_NAME = "lowmem_host_alloc"
_SOURCE = (Path(__file__).with_name("hostalloc.cpp")).read_text()
LARGE_BYTES = 1 << 20  # hostalloc.cpp's kLarge: smaller tensors go to torch's allocator
SIZE_CLASSES_PER_OCTAVE = 8  # hostalloc.cpp's kPerOctave

_lib: ctypes.CDLL | None = None
_priority = 0  # torch keeps the CPU allocator of the highest priority so far (c10::SetCPUAllocator)
_installed = False


class HostAllocatorStats(NamedTuple):
    live_bytes: int  # mapped blocks in use by tensors (rounded to their size class)
    cached_bytes: int  # mapped blocks kept for reuse
    peak_bytes: int  # the largest live + cached since the last reset_peak()
    maps: int  # blocks mapped (each one faulted in once)
    unmaps: int  # blocks returned to the system (the limit, or empty_cache)
    mapped_bytes: int  # bytes ever mapped
    hits: int  # allocations served from the cache
    limit_bytes: int


def available() -> bool:
    """Whether the allocator can be used here: built already, or a C++ compiler to build it (glibc Linux only)."""
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        return native.cached_library(_NAME, _SOURCE) is not None or native.compiler() is not None
    except native.NativeBuildError:
        return False


def _library() -> ctypes.CDLL:
    global _lib
    if _lib is None:
        import torch  # noqa: F401  (loads libc10, which the library links to)

        lib = ctypes.CDLL(str(native.compiled_library(_NAME, _SOURCE, "lowmem's host allocator")))
        for fn in ("lowmem_host_install", "lowmem_host_uninstall"):
            getattr(lib, fn).argtypes = [ctypes.c_int]
        lib.lowmem_host_set_limit.argtypes = [ctypes.c_uint64]
        lib.lowmem_host_stats.argtypes = [ctypes.POINTER(ctypes.c_uint64)]
        _lib = lib
    return _lib


def install(limit_bytes: int | None = None) -> None:
    """Make the caching allocator torch's CPU allocator (idempotent); `limit_bytes` as in `set_limit`."""
    global _priority, _installed
    lib = _library()
    if not _installed:
        _priority += 1
        lib.lowmem_host_install(_priority)
        _installed = True
    set_limit(limit_bytes)


def uninstall() -> None:
    """Give torch its default CPU allocator back and unmap the cached blocks (live tensors stay valid)."""
    global _priority, _installed
    if not _installed:
        return
    _priority += 1
    _lib.lowmem_host_uninstall(_priority)
    _installed = False
    empty_cache()


def installed() -> bool:
    return _installed


def set_limit(limit_bytes: int | None) -> None:
    """Unmap cached blocks rather than let live + cached pass `limit_bytes` (None: no limit)."""
    _library().lowmem_host_set_limit(2**64 - 1 if limit_bytes is None else max(int(limit_bytes), 0))


def empty_cache() -> None:
    if _lib is not None:
        _lib.lowmem_host_empty_cache()


def reset_peak() -> None:
    if _lib is not None:
        _lib.lowmem_host_reset_peak()


def stats() -> HostAllocatorStats:
    out = (ctypes.c_uint64 * 8)()
    _library().lowmem_host_stats(out)
    return HostAllocatorStats(*[int(v) for v in out])
