"""Measured memory: peak live tensor bytes on any device, and the CUDA allocator's peak.

The planner's estimate is checked against what a run measured. On CUDA the allocator keeps the
numbers (`max_memory_allocated`); on CPU nothing does, so `LiveTensorTracker` counts them itself:
a `TorchDispatchMode` that sees every aten op, counts each *storage* once when it first appears
as a freshly allocated output, and subtracts it when the storage is freed.

What it sees and what it cannot see:

- Every op dispatched while the mode is active on the calling thread, including the ops of
  `loss.backward()`: on CPU the autograd engine runs the backward graph on the calling thread,
  and on CUDA its device threads run with the caller's thread-local state, which carries the
  dispatch-mode stack (`at::ThreadLocalState::torch_dispatch_mode_state_`). The mode must still
  be active when `backward()` is *called*: a backward started after leaving the `with` block is
  not seen.
- Not seen: scratch memory a kernel allocates and frees inside one op (workspaces, temporaries
  of a fused kernel or a `_foreach_*` op), allocations made with the Python dispatcher bypassed
  (inside another mode's or a tensor subclass's `__torch_dispatch__`; traceable wrapper
  subclasses such as torchao's NF4 are counted through their inner tensors), and
  `UntypedStorage.resize_` called directly (FSDP2 frees unsharded parameters that way), which
  is not an op; the next op that returns the storage picks the new size up, and `resync()`
  re-reads every live storage.
- Sizes are the storages' `nbytes()`: exact for the CPU allocator; the CUDA caching allocator
  rounds each block up (to 512 bytes), so on CUDA `max_memory_allocated` reads slightly higher.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass

from lowmem.spec.units import format_bytes

__all__ = ["LiveTensorTracker", "ProcessPeak", "measure_cuda_peak", "resident_bytes"]

DEFAULT_CATEGORY = "activations"

# `torch.tensor(data)` builds its tensor before dispatch and hands it to the mode through
# `lift_fresh`, whose schema says the output aliases the input; the storage is new all the same.
_FRESH_DESPITE_ALIAS = frozenset({torch.ops.aten.lift_fresh.default})


class _Live:
    """Book-keeping for one live storage: its weakref, size, category and allocation number."""

    __slots__ = ("ref", "n_bytes", "category", "seq")

    def __init__(self, ref: weakref.ref, n_bytes: int, category: str, seq: int) -> None:
        self.ref = ref
        self.n_bytes = n_bytes
        self.category = category
        self.seq = seq


def _iter_tensors(out: Any) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield (return position, tensor) for the tensors an op returned (tensor, list or tuple)."""
    if isinstance(out, torch.Tensor):
        yield 0, out
    elif isinstance(out, (tuple, list)):
        for position, item in enumerate(out):
            if isinstance(item, torch.Tensor):
                yield position, item
            elif isinstance(item, (tuple, list)):  # a single `Tensor[]` return, or nested returns
                for inner in item:
                    if isinstance(inner, torch.Tensor):
                        yield position, inner


def _storages(tensor: torch.Tensor) -> Iterator[torch.UntypedStorage]:
    """The storages that hold a tensor's data (the inner ones for a traceable wrapper subclass)."""
    if type(tensor) is not torch.Tensor and is_traceable_wrapper_subclass(tensor):
        inner_names, _ = tensor.__tensor_flatten__()
        for name in inner_names:
            inner = getattr(tensor, name)
            if isinstance(inner, torch.Tensor):  # DTensor also flattens to its (opaque) device mesh
                yield from _storages(inner)
        return
    try:
        yield tensor.untyped_storage()
    except (RuntimeError, NotImplementedError):  # sparse and other storage-less layouts
        return


@functools.cache
def _fresh_returns(func: Any) -> tuple[bool, ...] | None:
    """Per return position, whether the op allocates it (no alias annotation); None if unknown."""
    schema = getattr(func, "_schema", None)
    if schema is None:  # higher-order operators have no schema
        return None
    if func in _FRESH_DESPITE_ALIAS:
        return tuple(True for _ in schema.returns)
    return tuple(ret.alias_info is None for ret in schema.returns)


class LiveTensorTracker(TorchDispatchMode):
    """Track live tensor bytes by storage, per category, and their peak.

    Use as a context manager around the work to measure (forward, backward and optimizer step):

        tracker = LiveTensorTracker()
        tracker.add_existing(model.parameters(), "parameters")
        with tracker:
            loss = model(x).sum()
            loss.backward()
            tracker.reclassify([p.grad for p in model.parameters()], "gradients")
            with tracker.category("optimizer"):
                optimizer.step()
        tracker.peak_bytes, tracker.peak_by_category()

    Each storage is counted once, however many tensors view it, under the category that was
    current when it was allocated (`add_existing` for tensors made before entering). A storage
    stays counted until it is freed, also after the `with` block ends.
    """

    def __init__(self, default_category: str = DEFAULT_CATEGORY, cap_bytes: int | None = None) -> None:
        super().__init__()
        # an enforced cap: an op whose output takes the live bytes past it raises torch.OutOfMemoryError, as the
        # CUDA allocator does on a full card (`lowmem execute --cap-memory`: rehearses `memory.on_oom` on a CPU)
        self.cap_bytes = cap_bytes
        self._category = default_category
        self._live: dict[int, _Live] = {}  # key: the StorageImpl address (`storage._cdata`)
        self._by_category: dict[str, int] = {}
        self._current = 0
        self._peak = 0
        self._peak_by_category: dict[str, int] = {}
        self._peak_seq = 0
        self._seq = 0
        # Storages die wherever their last reference drops: in an autograd thread, or inside
        # this class's own book-keeping when the garbage collector runs. The weakref callbacks
        # therefore only queue the death; the counters are updated under the lock, in order.
        self._freed: deque[tuple[int, weakref.ref]] = deque()
        self._lock = threading.Lock()

    # -- the dispatch hook ---------------------------------------------------------------------

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        fresh = _fresh_returns(func)
        input_keys = None
        if fresh is None:  # no schema: an output is new unless it shares an input's storage
            input_keys = {s._cdata for t in _input_tensors(args, kwargs) for s in _storages(t)}
        with self._lock:
            if self._freed:
                self._drain_freed()
            if type(out) is torch.Tensor:  # the common case, kept free of generators
                self._note(out.untyped_storage(), fresh is None or fresh[0], input_keys)
            else:
                for position, tensor in _iter_tensors(out):
                    is_new = fresh is None or fresh[min(position, len(fresh) - 1)]
                    for storage in _storages(tensor):
                        self._note(storage, is_new, input_keys)
            over = self.cap_bytes is not None and self._current > self.cap_bytes
        if over:
            raise torch.OutOfMemoryError(
                f"{func}: live tensor bytes {format_bytes(self._current)} passed the enforced cap "
                f"{format_bytes(self.cap_bytes)} (LiveTensorTracker cap_bytes)")
        return out

    def _note(self, storage: torch.UntypedStorage, is_new: bool, input_keys: set[int] | None) -> None:
        key = storage._cdata
        entry = self._live.get(key)
        if entry is not None:
            self._refresh(entry, storage)  # catches `resize_` and `out=` resizes
        elif is_new and (input_keys is None or key not in input_keys):
            self._track(key, storage, self._category)

    # -- public API ----------------------------------------------------------------------------

    @contextlib.contextmanager
    def category(self, name: str) -> Iterator[None]:
        """Count storages allocated inside the block under `name` (e.g. "optimizer")."""
        previous, self._category = self._category, name
        try:
            yield
        finally:
            self._category = previous

    def backward_category(self, output: torch.Tensor, inputs: torch.Tensor, name: str) -> torch.Tensor:
        """Count what backward allocates from `output`'s gradient until `inputs`' gradient under `name` too.

        `category(name)` sees only the forward of a function: its backward runs later, outside the block, and
        would be counted in the default category. The loss's backward makes the (N, V) gradients that the plan
        counts as logits (issue #16: the quickstart's measured split showed them as 64 MiB of activations).
        Autograd hooks mark the span: `output`'s gradient hook fires when backward enters the function,
        `inputs`' when it leaves. Returns `output`. Nothing is marked when either needs no gradient.
        """
        if not (output.requires_grad and inputs.requires_grad):
            return output
        previous = []

        def enter(grad):
            previous.append(self._category)
            self._category = name

        def leave(grad):
            if previous:
                self._category = previous.pop()

        output.register_hook(enter)
        inputs.register_hook(leave)
        return output

    def add_existing(self, tensors: Iterable[torch.Tensor | None], category: str) -> int:
        """Count tensors allocated before tracking began; returns the bytes newly counted.

        Storages already tracked (a tied weight, a tensor passed twice) are skipped and keep
        their category; None entries (a parameter without `.grad`) are skipped.
        """
        added = 0
        with self._lock:
            self._drain_freed()
            for tensor in tensors:
                if tensor is None:
                    continue
                for storage in _storages(tensor):
                    if storage._cdata not in self._live:
                        added += self._track(storage._cdata, storage, category)
        return added

    def reclassify(self, tensors: Iterable[torch.Tensor | None], category: str) -> int:
        """Move tracked storages to `category`; returns the bytes moved.

        Untracked storages and None entries are skipped. A storage that was live at the peak is
        moved in `peak_by_category()` too, so marking `p.grad` as "gradients" after backward
        also relabels the gradients that were counted as activations at a backward-time peak.
        """
        moved = 0
        with self._lock:
            self._drain_freed()
            seen: set[int] = set()
            for tensor in tensors:
                if tensor is None:
                    continue
                for storage in _storages(tensor):
                    entry = self._live.get(storage._cdata)
                    if entry is None or storage._cdata in seen or entry.category == category:
                        continue
                    seen.add(storage._cdata)
                    _move(self._by_category, entry.category, category, entry.n_bytes)
                    if entry.seq <= self._peak_seq:
                        _move(self._peak_by_category, entry.category, category, entry.n_bytes)
                    entry.category = category
                    moved += entry.n_bytes
        return moved

    @property
    def current_bytes(self) -> int:
        """Bytes of the storages live now."""
        with self._lock:
            self._drain_freed()
            return self._current

    @property
    def peak_bytes(self) -> int:
        """The largest `current_bytes` since creation or the last `reset_peak()`."""
        with self._lock:
            self._drain_freed()
            return self._peak

    def current_by_category(self) -> dict[str, int]:
        """Bytes live now, per category."""
        with self._lock:
            self._drain_freed()
            return {k: v for k, v in self._by_category.items() if v}

    def peak_by_category(self) -> dict[str, int]:
        """Bytes per category at the moment of the peak; the values sum to `peak_bytes`."""
        with self._lock:
            self._drain_freed()
            return {k: v for k, v in self._peak_by_category.items() if v}

    def reset_peak(self) -> None:
        """Start a new peak from what is live now (call between training steps)."""
        with self._lock:
            self._drain_freed()
            self._set_peak()

    def resync(self) -> int:
        """Re-read the size of every live storage (after `UntypedStorage.resize_` outside any op).

        Returns the change in `current_bytes`.
        """
        with self._lock:
            self._drain_freed()
            before = self._current
            for entry in list(self._live.values()):
                storage = entry.ref()
                if storage is not None:
                    self._refresh(entry, storage)
            return self._current - before

    def snapshot(self) -> dict[str, Any]:
        """Plain-data summary: current and peak bytes, both per category, and live storages."""
        with self._lock:
            self._drain_freed()
            return {
                "current_bytes": self._current,
                "peak_bytes": self._peak,
                "current_by_category": {k: v for k, v in self._by_category.items() if v},
                "peak_by_category": {k: v for k, v in self._peak_by_category.items() if v},
                "n_live_storages": len(self._live),
            }

    # -- book-keeping (callers hold the lock) ---------------------------------------------------

    def _track(self, key: int, storage: torch.UntypedStorage, category: str) -> int:
        n_bytes = storage.nbytes()
        freed = self._freed  # the callback must not hold `self`, or the tracker would never die
        ref = weakref.ref(storage, lambda r, key=key: freed.append((key, r)))
        self._seq += 1
        self._live[key] = _Live(ref, n_bytes, category, self._seq)
        self._by_category[category] = self._by_category.get(category, 0) + n_bytes
        self._current += n_bytes
        if self._current > self._peak:
            self._set_peak()
        return n_bytes

    def _refresh(self, entry: _Live, storage: torch.UntypedStorage) -> None:
        n_bytes = storage.nbytes()
        if n_bytes == entry.n_bytes:
            return
        # A resize is a free of the old size and an allocation of the new one; a new sequence
        # number keeps `reclassify` from moving bytes the peak never held.
        delta = n_bytes - entry.n_bytes
        self._by_category[entry.category] += delta
        self._current += delta
        entry.n_bytes = n_bytes
        self._seq += 1
        entry.seq = self._seq
        if self._current > self._peak:
            self._set_peak()

    def _set_peak(self) -> None:
        self._peak = self._current
        self._peak_by_category = dict(self._by_category)
        self._peak_seq = self._seq

    def _drain_freed(self) -> None:
        while self._freed:
            key, ref = self._freed.popleft()
            entry = self._live.get(key)
            if entry is None or entry.ref is not ref:  # the address was reused by a newer storage
                continue
            del self._live[key]
            self._by_category[entry.category] -= entry.n_bytes
            self._current -= entry.n_bytes


def _move(totals: dict[str, int], source: str, target: str, n_bytes: int) -> None:
    totals[source] = totals.get(source, 0) - n_bytes
    totals[target] = totals.get(target, 0) + n_bytes


def _input_tensors(args: tuple, kwargs: dict | None) -> Iterator[torch.Tensor]:
    for value in (*args, *(kwargs or {}).values()):
        yield from (tensor for _, tensor in _iter_tensors(value))


def measure_cuda_peak(fn: Callable[[], Any], device: torch.device | int | None = None) -> int:
    """Run `fn()` and return the CUDA allocator's peak allocated bytes while it ran.

    The number is absolute: it includes what was allocated before `fn` started (parameters,
    optimizer state), which is what a planner's total must match.

    Raises:
        RuntimeError: when CUDA is not available (use `LiveTensorTracker` on CPU).
    """
    if not torch.cuda.is_available():
        raise RuntimeError("measure_cuda_peak needs CUDA, which is not available; "
                           "measure CPU runs with LiveTensorTracker instead")
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device)


def resident_bytes() -> int | None:
    """This process's resident memory now (Linux `/proc/self/statm`), or None where that file does not exist.

    Cheap enough to read every step: it is the memory-over-time series in `metrics.jsonl` (`rss_bytes`), which
    includes what tensors do not (the interpreter, libraries, allocator caches, memory-mapped data pages).
    """
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE_BYTES
    except (OSError, ValueError, IndexError):
        return None


class ProcessPeak:
    """What a run adds to this process's peak RSS, the CPU plan's `device_bytes` view (Linux /proc only).

    `start()` resets the kernel's peak mark (VmHWM, through /proc/self/clear_refs) and takes the RSS then as the
    baseline; `read()` gives the peak since, less the baseline, or None where /proc cannot say.
    """

    def __init__(self) -> None:
        self.baseline: int | None = None

    def start(self) -> None:
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.baseline = status_bytes("VmRSS")
        except OSError:
            self.baseline = None

    def read(self) -> int | None:
        peak = status_bytes("VmHWM") if self.baseline is not None else None
        return None if peak is None else peak - self.baseline


def status_bytes(field: str) -> int | None:
    """A size field of /proc/self/status (VmRSS, VmHWM, ...) in bytes; None where there is no such file."""
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return None


_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
