"""Optimizers from the spec, and the learning-rate schedule.

Which tensors the low-bit optimizers quantize (read from the installed sources; `optimizer_state_bytes` in
`lowmem.plan.estimate` counts the same way and tests/train/test_optim.py measures it):

- bitsandbytes 0.50 `AdamW8bit` / `PagedAdamW8bit` (bitsandbytes/optim/optimizer.py, `Optimizer2State.init_state`):
  a tensor with fewer than `min_8bit_size` = 4096 elements keeps both moments in fp32 (whatever the
  parameter's dtype); a larger one gets two uint8 moments, one fp32 absmax per 256-element block each (the last
  block may be partial) and the two 256-entry fp32 quantization maps, which every parameter of the optimizer
  shares. `step` is a Python int. On CPU the update is plain torch ops (bitsandbytes/backends/cpu/ops.py,
  `_optimizer_update_8bit_blockwise_cpu`), so it is deterministic; paged buffers are CUDA-only
  (`get_state_buffer` falls back to ordinary tensors on CPU, with a warning).
- torchao 0.18 `AdamW8bit` / `AdamW4bit` (torchao/optim/adam.py, `_AdamBase._new_buffer`): a tensor is
  quantized only if it has at least 4096 elements *and* its element count is a multiple of the block size
  (256 for 8-bit, 128 for 4-bit); otherwise both moments are plain tensors in the parameter's dtype. A
  quantized moment holds its codes (uint8, two 4-bit codes per byte for 4-bit), one fp32 scale per block and its
  own fp32 quantization map (256 or 16 entries; torchao/optim/subclass_8bit.py, subclass_4bit.py). Each
  parameter also has a 0-d fp32 `step`. The update runs under `torch.compile(dynamic=False)`, so every new
  parameter shape compiles once (about 10-25 s each on a CPU).
- torchao 0.18 `CPUOffloadOptimizer` (torchao/optim/cpu_offload.py; `optimizer.offload`, CUDA only): a tensor of
  at least `minimal_size` elements gets a pinned host copy and a pinned host gradient, allocated up front in its
  dtype, and its own torch AdamW (fused, on the host). The smaller ones share one AdamW on the device. A
  post-accumulate-grad hook copies each gradient to the host on a side stream as backward finishes it (and, with
  `offload_gradients`, frees the device gradient). `step` waits for those copies, steps each host AdamW and
  copies the weights back.
"""

import functools
import importlib
import math

import torch

from lowmem.plan.estimate import CPU_OFFLOAD_MIN_NUMEL
from lowmem.spec.structs import SGD, Adafactor, AdamW, AdamW4bit, AdamW8bit, OptimizerSpec, ScheduleSpec


def build_optimizer(spec: OptimizerSpec, params: list[torch.Tensor], *,
                    stochastic_rounding: bool = False) -> torch.optim.Optimizer:
    """The torch optimizer the spec names, over `params` (all trainable).

    The learning rate of every optimizer returned can be changed between steps by assigning a float to
    `param_groups[i]["lr"]`, which is how the training loop applies its schedule. `stochastic_rounding` (the
    plan's `bf16_stochastic_rounding`, an on-device AdamW over bf16 weights): torchao's `_AdamW`, which computes
    each update in fp32 and rounds the new bf16 weight up or down at random, in proportion to where it falls
    between the two, so that updates smaller than bf16's spacing still move the weights on average.
    """
    if stochastic_rounding:
        assert isinstance(spec, AdamW) and not spec.offload, "the planner rounds stochastically only on-device AdamW"
        optim = _import_backend("torchao.optim", "memory.strategies.bf16_stochastic_rounding", "torchao")
        return _torchao(optim._AdamW, spec, params, bf16_stochastic_round=True)
    if isinstance(spec, AdamW) and spec.offload:
        return _cpu_offload(spec, params)
    if isinstance(spec, AdamW):
        return torch.optim.AdamW(params, lr=spec.lr, betas=spec.betas, eps=spec.eps,
                                 weight_decay=spec.weight_decay, **_fused_on_cuda(params))
    if isinstance(spec, SGD):
        if any(_is_fake(p) for p in params):
            _register_fake_fused_sgd()
        return torch.optim.SGD(params, lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay,
                               **_fused_on_cuda(params))
    if isinstance(spec, Adafactor):
        # torch's Adafactor (Shazeer & Stern 2018, no first moment): a factored second moment for
        # tensors with 2+ dims, relative step size min(lr, 1/sqrt(step)), decoupled weight decay. It has no
        # fused kernel; its foreach path (torch's default on CUDA) allocates an update the size of all the
        # parameters at once, the per-tensor path twice the largest one (tests/train/test_cuda_optim.py
        # measures both). On a CPU the per-tensor path is the default already.
        return torch.optim.Adafactor(params, lr=spec.lr, weight_decay=spec.weight_decay, foreach=False)
    if isinstance(spec, AdamW8bit):
        if spec.backend == "bitsandbytes":
            return _bitsandbytes_adamw8bit(spec, params)
        if spec.paged:
            raise ValueError("optimizer.paged = true needs optimizer.backend = 'bitsandbytes' (torchao has no "
                             "paged optimizers); set optimizer.paged = false or switch the backend")
        optim = _import_backend("torchao.optim", "optimizer.backend = 'torchao'", "torchao")
        return _torchao(optim.AdamW8bit, spec, params)
    if isinstance(spec, AdamW4bit):
        optim = _import_backend("torchao.optim", "optimizer.kind = 'adamw4bit'", "torchao")
        return _torchao(optim.AdamW4bit, spec, params)
    raise AssertionError(f"unhandled optimizer {type(spec).__name__}")


def backend_module(spec: OptimizerSpec, *, stochastic_rounding: bool = False) -> str | None:
    """The optional package `build_optimizer` imports for `spec` (None: one of torch's own optimizers)."""
    torchao = (stochastic_rounding or isinstance(spec, AdamW4bit) or (isinstance(spec, AdamW) and spec.offload)
               or (isinstance(spec, AdamW8bit) and spec.backend == "torchao"))
    if torchao:
        return "torchao.optim"
    return "bitsandbytes.optim" if isinstance(spec, AdamW8bit) else None


def _fused_on_cuda(params: list[torch.Tensor]) -> dict[str, bool]:
    """`fused=True` for torch's AdamW and SGD when every parameter is on a CUDA device; on a CPU, nothing.

    torch's default on CUDA is the foreach path, whose update allocates one temporary the size of all the
    parameters together (+1.32 GiB on a fake-CUDA trace of llama3.2-1b full bf16, issue 14); the fused kernel
    updates each tensor in place and allocates nothing (tests/train/test_cuda_optim.py measures both). On a CPU
    the default stays, so CPU runs compute the same bits as before.
    """
    if not params or any(p.device.type != "cuda" for p in params):
        return {}
    return {"fused": True}


def _is_fake(t: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor)


@functools.cache
def _register_fake_fused_sgd() -> None:
    """Give `aten::_fused_sgd_` the fake (shape-only) kernel torch 2.13 lacks, so fused SGD steps on fake tensors.

    torch registers one for `_fused_adam(w)_` (torch/_meta_registrations.py) but not for `_fused_sgd_`, which
    then fails under FakeTensorMode (`lowmem.train.dryrun`, fake CUDA). The op updates its tensor lists in place
    and returns nothing, so its fake kernel does nothing. Registered once per process, and only when fused SGD
    is built over fake parameters, so real runs never see it.
    """
    for name in ("aten::_fused_sgd_", "aten::_fused_sgd_.tensor_lr"):
        torch.library.register_fake(name)(_fused_sgd_fake)


def _fused_sgd_fake(self, grads, momentum_buffer_list, *, weight_decay, momentum, lr, dampening, nesterov,
                    maximize, is_first_step, grad_scale=None, found_inf=None) -> None:
    return None


def stepped_params(optimizer: torch.optim.Optimizer, params: list[torch.Tensor]) -> list[torch.Tensor]:
    """The tensors whose `.grad` the optimizer's next step reads, one for each of `params`.

    Usually these are `params` themselves. A host-stepped optimizer (`optimizer.offload`) reads the host copies
    that the gradients went to during backward. The loop normalizes and clips the gradients of these tensors, so
    that it changes what the step will use.
    """
    host_params = getattr(optimizer, "host_params", None)
    return params if host_params is None else host_params(params)


def _cpu_offload(spec: AdamW, params: list[torch.Tensor]) -> torch.optim.Optimizer:
    """torch's AdamW stepped on the host by torchao's CPUOffloadOptimizer (`optimizer.offload`), extended with
    what lowmem's loop and checkpoints need (`_host_offloaded`)."""
    elsewhere = sorted({str(p.device) for p in params if p.device.type != "cuda"})
    if elsewhere:
        raise ValueError(
            f"optimizer.offload = true moves the optimizer from a CUDA device to the host, but these parameters are "
            f"on {', '.join(elsewhere)}. Set optimizer.offload = false (on a CPU the optimizer runs on the host "
            "already)"
        )
    if any(_is_fake(p) for p in params) and not torch.cuda.is_available():
        # fake CUDA (`lowmem.fakecuda`, a torch built without CUDA): torchao's CPUOffloadOptimizer reaches for the
        # CUDA runtime itself, with no seam to stand in for it: its constructor asserts that a CUDA device is
        # available (torchao.utils.get_available_devices) and makes a `torch.cuda.Stream` ("torch.cuda.Stream
        # requires CUDA support"), and each gradient hook and step waits on streams and records and synchronizes
        # events. None of that exists here, so stop with the reason instead of torchao's bare assertion.
        raise NotImplementedError(
            "optimizer.offload = true cannot run on fake CUDA (a torch built without CUDA): torchao's "
            "CPUOffloadOptimizer needs CUDA streams and events when it is built and in every backward and step. "
            "lowmem.train.dryrun traces such a plan with the optimizer on the device (an upper bound); run it on a GPU"
        )
    optim = _import_backend("torchao.optim", "optimizer.offload = true", "torchao")
    return _host_offloaded(optim.CPUOffloadOptimizer)(
        params, torch.optim.AdamW, offload_gradients=spec.offload_gradients, minimal_size=CPU_OFFLOAD_MIN_NUMEL,
        lr=spec.lr, betas=spec.betas, eps=spec.eps, weight_decay=spec.weight_decay)


@functools.cache
def _host_offloaded(cls: type[torch.optim.Optimizer]) -> type[torch.optim.Optimizer]:
    """`cls` (torchao's CPUOffloadOptimizer) with three additions that lowmem's loop and checkpoints need.

    - `host_params`: see `stepped_params`. torchao copies each gradient to the host as soon as backward makes it,
      before the loop divides the summed-loss gradients by the step's token count and clips them. So the loop
      has to scale the host copies: scaling the device gradients would not reach the step.
    - `state`: the states of all the inner optimizers (torchao never calls `Optimizer.__init__`, so it has none).
      `execute` reads it.
    - `load_state_dict` also refreshes the host copies of the weights from the device. A checkpoint restores the
      device weights in place after the optimizer is built (`lowmem.train.checkpoint.load_checkpoint`), but
      torchao took its host copies when it was built, and stepping from those would undo the restore.
    """

    class HostOffloaded(cls):
        def host_params(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
            for copied in self.queue.values():  # the gradients' copies to the host are complete
                copied.synchronize()
            return [self.param_d2h_map[p] if p in self.queue else p for p in params]

        @property
        def state(self) -> dict:
            inner = [*self.optim_dict.values(), *([self.d_opt] if self.d_opt is not None else [])]
            return {k: v for optimizer in inner for k, v in optimizer.state.items()}

        def load_state_dict(self, state_dict: dict) -> None:
            super().load_state_dict(state_dict)
            with torch.no_grad():
                for p_device, p_host in self.param_d2h_map.items():
                    p_host.copy_(p_device)

    HostOffloaded.__name__ = HostOffloaded.__qualname__ = cls.__name__
    return HostOffloaded


def _bitsandbytes_adamw8bit(spec: AdamW8bit, params: list[torch.Tensor]) -> torch.optim.Optimizer:
    """bitsandbytes' 8-bit AdamW (paged when `spec.paged`; on CPU tensors paging is a no-op).

    Built with any fake-tensor mode set aside: bitsandbytes makes its two 256-entry quantization maps from Python
    lists, which a fake tensor cannot give (`lowmem.train.dryrun` builds the optimizer on fake parameters). The
    maps are real constants then, as they are in a real run; over fake parameters they are replaced by fake
    copies on the parameters' device (`_fake_quantization_maps`).
    """
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    optim = _import_backend("bitsandbytes.optim", "optimizer.backend = 'bitsandbytes'", "bitsandbytes")
    cls = _traceable_bitsandbytes(optim.PagedAdamW8bit if spec.paged else optim.AdamW8bit)
    with unset_fake_temporarily():
        optimizer = cls(params, lr=spec.lr, betas=spec.betas, eps=spec.eps, weight_decay=spec.weight_decay)
    if _on_fake_tensors(optimizer):
        _fake_quantization_maps(optimizer)
    return optimizer


def _fake_quantization_maps(optimizer: torch.optim.Optimizer) -> None:
    """Replace a bitsandbytes optimizer's real quantization maps by fake copies on its parameters' device.

    bitsandbytes keeps the maps in `name2qmap` and moves them to a parameter's device when it first makes that
    parameter's states (`Optimizer2State.init_state`: `name2qmap["dynamic"].to(p.device)`). Real tensors moved
    to `cuda` under FakeTensorMode raise ("Please convert all Tensors to FakeTensors first"), and there is no
    CUDA to move them to. Fake copies carry the same shapes and dtypes, so the states made from them hold the
    bytes a GPU run's would; their values are never read (a fake step stops after the states, `_traceable_...`).
    """
    fake = next(p for group in optimizer.param_groups for p in group["params"] if _is_fake(p))
    optimizer.name2qmap = {name: fake.fake_mode.from_tensor(qmap).to(fake.device)
                           for name, qmap in optimizer.name2qmap.items()}


@functools.cache
def _traceable_bitsandbytes(cls: type[torch.optim.Optimizer]) -> type[torch.optim.Optimizer]:
    """`cls` (a bitsandbytes 8-bit optimizer) whose step on fake parameters creates the states and stops there.

    bitsandbytes' update reads values (its block-wise quantization) and, on CUDA, calls its own compiled kernels
    and `torch.cuda.synchronize()`, none of which a fake tensor can go through; a trace needs only the states'
    bytes, and bitsandbytes' own `init_state` makes them, as a real first step would.

    A paged optimizer's large states (1e5 elements and up) are CUDA unified memory that bitsandbytes' C library
    allocates (`F.get_paged`, `cudaMallocManaged`) and wraps as a CPU tensor, which fake parameters cannot have.
    Over fake parameters they are ordinary tensors on the parameter's device instead: the bytes a GPU holds while
    the pages are resident, which is the upper bound (the CUDA allocator's `max_memory_allocated` does not count
    managed memory, so a GPU run measures less there than a trace).
    """
    class Traceable(cls):
        @torch.no_grad()
        def step(self, closure=None):
            if not _on_fake_tensors(self):
                return super().step(closure)
            for gindex, group in enumerate(self.param_groups):
                for pindex, p in enumerate(group["params"]):
                    if p.grad is not None and not self.state[p]:
                        self.init_state(group, p, gindex, pindex)
            return None

        def get_state_buffer(self, p, dtype=torch.float32):
            if _is_fake(p):
                return torch.zeros_like(p, dtype=dtype)
            return super().get_state_buffer(p, dtype)

    Traceable.__name__ = Traceable.__qualname__ = cls.__name__
    return Traceable


def _torchao(cls: type[torch.optim.Optimizer], spec: AdamW | AdamW8bit | AdamW4bit,
             params: list[torch.Tensor], **options) -> torch.optim.Optimizer:
    """A torchao AdamW (low-bit, or `_AdamW` with `options`) that also accepts a float `lr` assigned between
    steps, and steps under the memory tracker (see `_measurable`)."""
    _prime_torchao_qmaps()
    optimizer = _measurable(cls)(params, lr=spec.lr, betas=spec.betas, eps=spec.eps,
                                 weight_decay=spec.weight_decay, **options)
    optimizer.register_step_pre_hook(_lr_as_tensor)
    return optimizer


def _on_fake_tensors(optimizer: torch.optim.Optimizer) -> bool:
    """Whether the optimizer holds fake parameters (`lowmem.train.dryrun`): its update cannot run on them."""
    from torch._subclasses.fake_tensor import FakeTensor

    return any(isinstance(p, FakeTensor) for group in optimizer.param_groups for p in group["params"])


@functools.cache
def _prime_torchao_qmaps() -> None:
    """Compute torchao's quantization maps on real tensors, before any fake-tensor trace can.

    torchao 0.18 builds each map once per process (`get_qmap_signed` / `get_qmap_unsigned` in subclass_8bit.py
    and subclass_4bit.py, behind `lru_cache`) from tensor values. Built first under `lowmem.train.dryrun`, they
    would be the trace's placeholder values, cached for every later real run in the process (seen: a torchao
    AdamW8bit diverged after a trace).
    """
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with unset_fake_temporarily():
        for module in ("torchao.optim.subclass_8bit", "torchao.optim.subclass_4bit"):
            mod = importlib.import_module(module)
            for name in ("get_qmap_signed", "get_qmap_unsigned"):
                if hasattr(mod, name):
                    getattr(mod, name)()


@functools.cache
def _measurable(cls: type[torch.optim.Optimizer]) -> type[torch.optim.Optimizer]:
    """`cls` (a torchao AdamW) with a step that also runs while a TorchDispatchMode is active.

    torchao's step runs its update through `torch.compile(fullgraph=True)`, which refuses to trace under a
    user dispatch mode ("non-infra torch dispatch mode present"), such as the `LiveTensorTracker` that
    `execute` measures the first steps with. This step creates missing states first, where the caller's modes
    see them (the tracker counts them as optimizer state), then runs torchao's own step with those modes
    set aside: the same compiled update as without a tracker, so measured and unmeasured steps (and a resumed
    run's first steps) compute the same bits. The update's transient temporaries go uncounted.

    On fake tensors (`lowmem.train.dryrun`) the states are created and the update is skipped: compiled code run on
    fake tensors outside their mode reads data pointers that do not exist (it crashed the process), and a trace
    needs only the states' bytes, which creating them gives.
    """
    from torch.utils._python_dispatch import _disable_current_modes, _get_current_dispatch_mode

    class Measurable(cls):
        @torch.no_grad()
        def step(self, closure=None):
            if _get_current_dispatch_mode() is None:
                return super().step(closure)
            for group in self.param_groups:
                for p in group["params"]:
                    state = self.state[p]
                    if p.grad is not None and not state:  # what torchao's step would create (no amsgrad)
                        assert not group["amsgrad"], "lowmem never asks torchao for amsgrad"
                        state["step"] = torch.tensor(0.0)
                        state["exp_avg"] = self._new_buffer(p, True)
                        state["exp_avg_sq"] = self._new_buffer(p, False)
            if _on_fake_tensors(self):
                return None
            with _disable_current_modes():
                return super().step(closure)

    Measurable.__name__ = Measurable.__qualname__ = cls.__name__
    return Measurable


def _import_backend(module: str, where: str, package: str):
    """Import an optional optimizer backend, or say which spec field needs it and how to get it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ValueError(f"{where} needs the {package} package, which does not import here ({e}); "
                         f"install it (pip install {package}) or choose another optimizer") from e


def _lr_as_tensor(optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
    """Step pre-hook: turn a float `lr` in any param group into the 0-d fp32 tensor torchao requires.

    torchao's low-bit AdamW keeps `lr` as a tensor so that its compiled step does not recompile when the
    value changes, and raises on a float (torchao/optim/adam.py, `_AdamBase.step`); the loop assigns floats.
    """
    for group in optimizer.param_groups:
        if not isinstance(group["lr"], torch.Tensor):
            group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float32)


def lr_at(step: int, total_steps: int, base_lr: float, schedule: ScheduleSpec) -> float:
    """Learning rate for optimizer step `step` (0-based) of `total_steps`.

    Linear warmup from base_lr / warmup_steps to base_lr over `warmup_steps`, then cosine or linear decay
    to `min_lr_ratio * base_lr` at the last step (or constant).
    """
    warmup = schedule.warmup_steps
    if step < warmup:
        return base_lr * (step + 1) / warmup
    if schedule.kind == "constant":
        return base_lr
    decay_steps = max(total_steps - warmup - 1, 1)
    progress = min((step - warmup) / decay_steps, 1.0)
    floor = schedule.min_lr_ratio * base_lr
    if schedule.kind == "linear":
        return base_lr - (base_lr - floor) * progress
    return floor + (base_lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))
