"""Optimizer and offloading checks that run on fake CUDA, in a child process
(`lowmem.fakecuda.run("tests/train/cuda_optim_cases.py:NAME", ...)`).

Each function imports torch itself (the fake-CUDA shim must load first), runs its checks in one process (a child
costs about 5 s) and returns JSON-able results that tests/train/test_cuda_optim.py asserts on.
"""

from __future__ import annotations


def _answers():
    """A dispatch mode that answers `.item()` on fake tensors (1, or 1.0) and counts how often it was asked.

    torch's Adafactor reads its step count and two norms per parameter as Python floats; a fake tensor has no
    value to give (the same answer `lowmem.train.dryrun` gives).
    """
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    class Answers(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.n_items = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default:
                self.n_items += 1
                return 1.0 if args[0].is_floating_point() else 1
            return func(*args, **(kwargs or {}))

    return Answers()


def _fake_params(shapes, dtype_name: str = "bfloat16"):
    import torch

    return [torch.zeros(s, dtype=getattr(torch, dtype_name), device="cuda", requires_grad=True) for s in shapes]


def _step_extra_bytes(make, shapes) -> list[int]:
    """Live bytes an optimizer's first and second steps add at their peak, beyond the parameters and gradients
    (the first includes the states it creates; the second is the update alone), on fake CUDA."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from lowmem.train.memory import LiveTensorTracker

    with FakeTensorMode():
        params = _fake_params(shapes)
        optimizer = make(params)
        tracker = LiveTensorTracker()
        extra = []
        for _ in range(2):
            for p in params:
                p.grad = torch.ones_like(p)
            tracker.add_existing([*params, *(p.grad for p in params)], "parameters")
            tracker.reset_peak()
            before = tracker.current_bytes
            with tracker, _answers():
                optimizer.step()
            extra.append(tracker.peak_bytes - before)
        return extra


# eight (512, 512) bf16 weights and a bias: 4 MiB of parameters, no tensor more than an eighth of them
STEP_SHAPES = [(512, 512)] * 8 + [(512,)]


def optimizer_step_peaks() -> dict:
    """Per optimizer: what `build_optimizer` builds on fake CUDA parameters, and the step's extra bytes for it
    and for torch's foreach path (torch's default on a real GPU; on fake tensors torch's default is the
    per-tensor path, since a FakeTensor is not a type its foreach check accepts)."""
    import torch

    from lowmem.spec.structs import SGD, Adafactor, AdamW
    from lowmem.train.optim import build_optimizer

    specs = {"adamw": AdamW(lr=1e-3, weight_decay=0.01), "sgd": SGD(lr=1e-3, momentum=0.9, weight_decay=0.01),
             "adafactor": Adafactor(lr=1e-2, weight_decay=0.01)}
    foreach = {
        "adamw": lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.01, foreach=True),
        "sgd": lambda p: torch.optim.SGD(p, lr=1e-3, momentum=0.9, weight_decay=0.01, foreach=True),
        "adafactor": lambda p: torch.optim.Adafactor(p, lr=1e-2, weight_decay=0.01, foreach=True),
    }
    out = {"param_bytes": sum(2 * _numel(s) for s in STEP_SHAPES), "largest_bytes": 2 * 512 * 512}
    for name, spec in specs.items():
        built = {}

        def make(params, spec=spec, built=built):
            built["optimizer"] = build_optimizer(spec, params)
            return built["optimizer"]

        out[name] = {"lowmem": _step_extra_bytes(make, STEP_SHAPES),
                     "foreach": _step_extra_bytes(foreach[name], STEP_SHAPES),
                     "fused": built["optimizer"].defaults.get("fused"),
                     "foreach_flag": built["optimizer"].defaults.get("foreach")}
    return out


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _state_bytes(optimizer) -> tuple[int, list[str]]:
    """Bytes of the distinct storages behind the optimizer's state tensors (inner tensors of torchao's
    subclasses), keyed by StorageImpl (fake storages have no data pointer), and the devices they are on."""
    import torch

    storages, devices = {}, set()

    def visit(t):
        if hasattr(t, "__tensor_flatten__"):
            for name in t.__tensor_flatten__()[0]:
                visit(getattr(t, name))
            return
        storage = t.untyped_storage()
        storages[storage._cdata] = storage.nbytes()
        devices.add(str(t.device))

    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                visit(value)
    return sum(storages.values()), sorted(devices)


# a (64, 128) weight quantized by every low-bit backend, a (64,) bias kept in full precision, and a (512, 256)
# weight past bitsandbytes' paging threshold (1e5 elements)
LOW_BIT_SHAPES = [(64, 128), (64,), (512, 256)]


def low_bit_on_fake_cuda() -> dict:
    """Per low-bit optimizer: built and stepped twice on fake CUDA bf16 parameters, its state bytes and devices
    against the planner's estimate, or the error it stops with."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from lowmem.plan.estimate import optimizer_state_bytes
    from lowmem.spec.structs import AdamW, AdamW4bit, AdamW8bit
    from lowmem.train.optim import build_optimizer

    cases = {
        "adamw8bit-bnb": (AdamW8bit(lr=1e-2, backend="bitsandbytes"), {}),
        "adamw8bit-bnb-paged": (AdamW8bit(lr=1e-2, backend="bitsandbytes", paged=True), {}),
        "adamw8bit-torchao": (AdamW8bit(lr=1e-2, backend="torchao"), {}),
        "adamw4bit-torchao": (AdamW4bit(lr=1e-2), {}),
        "stochastic-rounding": (AdamW(lr=1e-2), {"stochastic_rounding": True}),
        "offload": (AdamW(lr=1e-2, offload=True), {}),
    }
    out = {}
    for name, (spec, options) in cases.items():
        try:
            with FakeTensorMode():
                params = _fake_params(LOW_BIT_SHAPES)
                optimizer = build_optimizer(spec, params, **options)
                with _answers():
                    for _ in range(2):
                        for p in params:
                            p.grad = torch.ones_like(p)
                        optimizer.step()
                measured, devices = _state_bytes(optimizer)
        except Exception as e:  # reported to the test, which says which error it expects
            out[name] = {"error": f"{type(e).__name__}: {e}"}
            continue
        out[name] = {"bytes": measured, "devices": devices,
                     "predicted": optimizer_state_bytes(spec, LOW_BIT_SHAPES, param_bytes=2)}
    return out


def in_backward_item_calls(n_layers: int) -> dict:
    """Host reads (`aten._local_scalar_dense`) during a backward whose hooks step fused AdamW per parameter
    (`optimizer_in_backward`), and when the loop reads the step's gradient norm afterwards, on fake CUDA."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from lowmem.spec.structs import AdamW
    from lowmem.train.optim import build_optimizer
    from lowmem.train.strategies import InBackwardOptimizer

    with FakeTensorMode():
        params = _fake_params([(32, 32)] * n_layers, "float32")
        optimizer = InBackwardOptimizer(lambda ps: build_optimizer(AdamW(lr=1e-3), ps), params)
        x = torch.ones(4, 32, device="cuda")
        answers = _answers()
        counts = []
        for _ in range(2):  # the first step creates the states
            optimizer.reset_grad_norm()
            h = x
            for w in params:
                h = torch.tanh(h @ w)
            with answers:
                h.sum().backward()
            counts.append(answers.n_items)
            answers.n_items = 0
            with answers:
                norm = float(optimizer.grad_norm())
            counts.append(answers.n_items)
            answers.n_items = 0
        return {"counts": counts, "grads_left": sum(p.grad is not None for p in params),
                "n_states": len(optimizer.state), "norm": norm,
                "fused": all(opt.defaults["fused"] for opt in optimizer._optimizers)}


def _device_bytes():
    """A dispatch mode that tracks live storages by device: `live("cuda")` is the bytes alive there now."""
    import weakref

    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    class DeviceBytes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.storages = {}  # StorageImpl address -> (weakref, device type, bytes)

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (list, tuple)) else [out]:
                if not isinstance(t, torch.Tensor):
                    continue
                storage = t.untyped_storage()
                entry = self.storages.get(storage._cdata)
                if entry is None or entry[0]() is None:
                    self.storages[storage._cdata] = (weakref.ref(storage), t.device.type, storage.nbytes())
            return out

        def add(self, tensors):
            for t in tensors:
                storage = t.untyped_storage()
                self.storages[storage._cdata] = (weakref.ref(storage), t.device.type, storage.nbytes())

        def live(self, device_type: str) -> int:
            return sum(n for ref, d, n in self.storages.values() if d == device_type and ref() is not None)

    return DeviceBytes()


def offload_saved_bytes(T: int) -> dict:
    """A fully checkpointed tiny Llama's forward and backward on fake CUDA, with and without activation
    offloading: the bytes alive on `cuda` and on the host after forward (beyond the parameters and batch), what
    moved, and the devices of the gradients."""
    import gc

    import msgspec
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from lowmem.nn import forward, init_params
    from lowmem.nn.config import preset
    from lowmem.plan.structs import Strategies
    from lowmem.train.offload import ActivationOffload
    from lowmem.train.strategies import block_runner

    cfg = msgspec.structs.replace(preset("tiny"), n_layers=6)
    out = {"n_layers": cfg.n_layers, "block_input_bytes": 2 * T * cfg.dim * 4}
    for offloaded in (False, True):
        with FakeTensorMode():
            params = {n: t.to("cuda").requires_grad_() for n, t in init_params(cfg, seed=0).items()}
            tokens = torch.zeros(2, T, dtype=torch.int64, device="cuda")
            positions = torch.arange(T, device="cuda").expand(2, T)
            run = block_runner(Strategies(precision="fp32", activation_checkpointing="full",
                                          cross_entropy="standard"), params)
            offload = ActivationOffload("cuda", min_bytes=1024, max_host_bytes=1 << 50, keep=params.values())
            tracked = _device_bytes()
            tracked.add([*params.values(), tokens, positions])
            base = tracked.live("cuda")
            with tracked:
                if offloaded:
                    with offload:
                        hidden = forward(params, tokens, cfg, positions=positions, run_block=run)
                else:
                    hidden = forward(params, tokens, cfg, positions=positions, run_block=run)
                loss = hidden.pow(2).mean()
                gc.collect()
                result = {"cuda_after_forward": tracked.live("cuda") - base, "host_after_forward": tracked.live("cpu")}
                loss.backward()
            grads = [t.grad for n, t in params.items() if n != "output"]  # forward returns the hidden states
            result["grad_devices"] = sorted({"none" if g is None else str(g.device) for g in grads})
            result["n_moved"], result["host_bytes"] = offload.n_moved, offload.host_bytes
        out["offloaded" if offloaded else "plain"] = result
    return out


def optimizers(n_layers: int) -> dict:
    """The optimizer checks above in one child process."""
    return {"step_peaks": optimizer_step_peaks(), "low_bit": low_bit_on_fake_cuda(),
            "in_backward": in_backward_item_calls(n_layers)}
