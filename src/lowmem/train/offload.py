"""activation_offloading: saved activations wait for backward in pinned host memory instead of on the GPU.

`ActivationOffload` is a `torch.autograd.graph.saved_tensors_hooks` context that the executor wraps around the
model's forward (not around the loss: backward needs the loss's tensors first, so moving them out would only
add a round trip). Every tensor autograd saves inside it is copied to pinned host memory on a side CUDA stream,
so the copy overlaps the kernels that follow, and the device memory is freed once the copy is done. In backward
each one is copied back on the same side stream, and the next one backward will need (the one saved just
before it) is fetched ahead while the current one is used. What stays on the device:

- tensors under `min_bytes`: a copy's fixed cost (a launch and an event) buys too little memory;
- tensors past `max_host_bytes` of one forward: the host budget the planner gave this run;
- the parameters and frozen weights (`keep`, matched by storage so views such as `w.t()` count): they stay on
  the device anyway, so copying them would free nothing;
- tensor subclasses (NF4 weights) and tensors on another device.

A tensor saved by several ops (a norm's input that is also a residual) is copied once. With non-reentrant
activation checkpointing (`torch.utils.checkpoint`, as `lowmem.train.strategies.block_runner` applies it) a
checkpointed block saves only its inputs under these hooks: its inner tensors go to the checkpoint's own hooks
and are recomputed in backward. So the block inputs are what moves. Under selective checkpointing the matmul
outputs it keeps are held by the checkpoint itself and stay on the device.

Stream safety on CUDA, where `torch.autograd.graph.save_on_cpu` (no side stream, no prefetch) and torchtune's
`OffloadActivations` were the models:

- Forward: the side stream waits for the compute stream before copying, so the tensor is complete. The device
  tensor is marked used by the side stream (`Tensor.record_stream`), so the caching allocator does not give
  its memory to a new tensor before the copy has read it, even though autograd now holds only the host copy.
- Backward: the device buffer is allocated on the compute stream. The side stream waits for the compute stream
  before writing into it, so the memory's previous user has finished. The compute stream waits for the copy's
  event before the backward op reads the buffer. The buffer is marked used by the side stream too, so freeing
  it is safe even if backward never asks for it (a graph dropped without backward).
- Host buffers come from torch's pinned caching host allocator, which keeps a buffer until the copies using it
  have finished.

Saved-tensor hooks turn off autograd's check that a saved tensor is not modified in place before backward
(torch 2.13, `save_on_cpu` included). lowmem's forward never modifies a saved tensor: without hooks autograd
would report it, and tests/train/test_offload.py shows that the gradients match exactly with and without
offloading.

Every stream, event and pinned-memory call sits behind one seam, the copier (`_copier`): `_StreamCopier` on a
CUDA device of a torch with a CUDA runtime (the above), `_PlainCopier` everywhere else, with synchronous plain
copies and nothing to wait for. The bookkeeping around it (what moves, the budget, fetching ahead) is the same.

- On fake CUDA (`lowmem.fakecuda`: fake tensors on `cuda` in a torch built without CUDA, which has no streams,
  events or pinned memory) the plain copier moves fake tensors between `cuda` and the host, so the device bytes
  saved for backward are what a GPU run holds, and tests/train/test_cuda_optim.py measures them.
- On a CPU it frees nothing, because the activations already live in host memory (the copy back is the host
  tensor itself), which is why the planner never offloads on a CPU. Tests use it to check which tensors move and
  that the gradients do not change.
"""

import weakref
from collections.abc import Iterable

import torch
from torch._subclasses.fake_tensor import FakeTensor


class _PlainCopier:
    """Copies between `device` and host memory as plain synchronous copies: no stream, no event, no pinned memory.

    For a CPU (the copy back is the host tensor itself) and for fake CUDA (a torch built without CUDA has no
    streams to overlap with; fake tensors move between `cuda` and the host as shapes).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def to_host(self, t: torch.Tensor) -> torch.Tensor:
        host = torch.empty_like(t, device="cpu")
        host.copy_(t)
        return host

    def to_device(self, host: torch.Tensor) -> tuple[torch.Tensor, None]:
        """The tensor on the device, and what to wait for before reading it (nothing: the copy is done)."""
        return host.to(self.device), None

    def wait(self, ready: None) -> None:
        pass


class _StreamCopier:
    """Copies on a side CUDA stream that overlap the compute stream's kernels (the module docstring's stream
    safety rules), into and out of pinned host memory. Kept across steps: each new stream would get its own pool
    in the caching allocator."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device)

    def to_host(self, t: torch.Tensor) -> torch.Tensor:
        host = torch.empty_like(t, device="cpu", pin_memory=True)
        self.stream.wait_stream(torch.cuda.current_stream(self.device))  # t is complete
        with torch.cuda.stream(self.stream):
            host.copy_(t, non_blocking=True)
        t.record_stream(self.stream)  # its memory is not reused before the copy has read it
        return host

    def to_device(self, host: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event]:
        """Start the copy back; returns the device tensor and the event recorded after its copy."""
        t = torch.empty_like(host, device=self.device)  # from the compute stream's pool
        self.stream.wait_stream(torch.cuda.current_stream(self.device))  # the memory's previous user is done
        with torch.cuda.stream(self.stream):
            t.copy_(host, non_blocking=True)
        ready = self.stream.record_event()
        t.record_stream(self.stream)  # safe to free even if backward never takes it
        return t, ready

    def wait(self, ready: torch.cuda.Event) -> None:
        """The compute stream waits for the copy back before backward reads the tensor."""
        torch.cuda.current_stream(self.device).wait_event(ready)


def _copier(device: torch.device) -> _PlainCopier | _StreamCopier:
    """The copier for `device`: side-stream copies on a CUDA device when the CUDA runtime is there, plain copies
    on a CPU and on fake CUDA (`torch.cuda.is_available()` is False there; `lowmem.fakecuda` keeps it so)."""
    if device.type == "cuda" and torch.cuda.is_available():
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        return _StreamCopier(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", 0)  # where a fake tensor made on "cuda" says it is
    return _PlainCopier(device)


class _Moved:
    """A saved tensor's host copy, its place in the forward's save order, and its way back to the device."""

    __slots__ = ("__weakref__", "fetched", "forward", "host", "index", "ready", "taken")

    def __init__(self, host: torch.Tensor, index: int, forward: "_Forward") -> None:
        self.host = host
        self.index = index
        self.forward = forward
        self.fetched: torch.Tensor | None = None  # on the device again, waiting for backward to take it
        self.ready: torch.cuda.Event | None = None  # the copier's event after the copy back (None: plain copy)
        self.taken = False  # backward has taken it at least once


class _Forward:
    """What one forward under the hooks moved: its records in save order, held weakly (autograd owns them),
    the host bytes they hold, and the tensors already moved, so that a tensor saved twice is copied once."""

    def __init__(self) -> None:
        self.records: list[weakref.ref] = []
        self.host_bytes = 0
        # id(source) -> (weak source, its version when copied, weak record)
        self.by_source: dict[int, tuple[weakref.ref, int, weakref.ref]] = {}


class ActivationOffload(torch.autograd.graph.saved_tensors_hooks):
    """Saved activations copied to host memory during forward and back for backward (see the module docstring).

    Build it once per run and enter it around every forward: the side stream is kept across steps, since each new
    stream would get its own pool in the caching allocator. Each `with` starts a new budget of `max_host_bytes`.

    Args:
        device: the device whose saved tensors move: a CUDA device (pinned host copies on a side stream; plain
            copies on fake CUDA), or "cpu" (plain copies, synchronous; frees nothing, for tests).
        min_bytes: tensors smaller than this stay where they are.
        max_host_bytes: host bytes one forward may fill; tensors that would go past it stay on the device.
        keep: tensors never moved, nor any view of their storage (the parameters and frozen weights).
    """

    def __init__(self, device: torch.device | str, *, min_bytes: int, max_host_bytes: int,
                 keep: Iterable[torch.Tensor] = ()) -> None:
        self._copier = _copier(torch.device(device))
        self.device = self._copier.device
        self.min_bytes = min_bytes
        self.max_host_bytes = max_host_bytes
        # storages by their StorageImpl address, which fake tensors have too (a fake storage has no data pointer)
        self._kept = frozenset(t.untyped_storage()._cdata for t in keep if _is_plain(t))
        self._forward = _Forward()
        super().__init__(self._pack, self._unpack)

    def __enter__(self) -> "ActivationOffload":
        self._forward = _Forward()
        super().__enter__()
        return self

    @property
    def host_bytes(self) -> int:
        """Bytes the latest forward moved to host memory."""
        return self._forward.host_bytes

    @property
    def n_moved(self) -> int:
        """Distinct tensors the latest forward moved to host memory."""
        return len(self._forward.records)

    # -------------------------------------------------------------------------------------------- forward

    def _pack(self, t: torch.Tensor) -> "torch.Tensor | _Moved":
        forward = self._forward
        if not self._movable(t):
            return t.detach()  # not `t`: a saved output must not hold its own grad_fn (a reference cycle)
        seen = forward.by_source.get(id(t))
        if seen is not None:
            source, version, record = seen[0](), seen[1], seen[2]()
            if source is t and version == t._version and record is not None:
                return record
        n_bytes = t.numel() * t.element_size()
        if forward.host_bytes + n_bytes > self.max_host_bytes:
            return t.detach()
        record = _Moved(self._copier.to_host(t), len(forward.records), forward)
        forward.host_bytes += n_bytes
        forward.records.append(weakref.ref(record))
        forward.by_source[id(t)] = (weakref.ref(t), t._version, weakref.ref(record))
        return record

    def _movable(self, t: torch.Tensor) -> bool:
        return (_is_plain(t) and t.layout == torch.strided and t.device == self.device
                and t.numel() * t.element_size() >= self.min_bytes
                and t.untyped_storage()._cdata not in self._kept)

    # ------------------------------------------------------------------------------------------- backward

    def _unpack(self, packed: "torch.Tensor | _Moved") -> torch.Tensor:
        if not isinstance(packed, _Moved):
            return packed
        if packed.fetched is None:
            self._fetch(packed)
        t = packed.fetched
        packed.fetched = None  # autograd owns it now; a tensor saved twice is fetched again for its second use
        packed.taken = True
        self._copier.wait(packed.ready)
        self._prefetch_before(packed)
        return t

    def _fetch(self, record: _Moved) -> None:
        """Start copying `record` back to the device (on the side stream, with a stream copier)."""
        record.fetched, record.ready = self._copier.to_device(record.host)

    def _prefetch_before(self, record: _Moved) -> None:
        """Fetch the nearest tensor saved before `record` that is still on the host: backward runs in about
        the reverse order of forward, so that is the one it needs next. One ahead at most, so prefetching holds
        at most one extra saved tensor on the device."""
        records = record.forward.records
        for i in range(record.index - 1, -1, -1):
            earlier = records[i]()
            if earlier is None or (earlier.taken and earlier.fetched is None):
                continue  # released by autograd, or already taken: backward is past it
            if earlier.fetched is None:
                self._fetch(earlier)
            return


def _is_plain(t: torch.Tensor) -> bool:
    """A plain tensor (a fake one included), not a subclass such as an NF4 weight: only those move."""
    return type(t) is torch.Tensor or type(t) is FakeTensor
