"""Traced memory: run the plan's own training step on fake tensors and count what it would hold.

`trace_memory(plan)` builds the run exactly as `execute` does (`lowmem.train.session.build_training`: the
same adapters, trainable mask, optimizer and loss) and runs `lowmem.train.step.train_step` for a few
optimizer steps under `torch._subclasses.fake_tensor.FakeTensorMode`, with `LiveTensorTracker` counting
live storage bytes by category as `execute` does on CPU. Fake tensors carry shapes, dtypes and storages
but no data, so nothing of the model's size is allocated: an 8B plan traces on a laptop in seconds, and
the dataset and tokenizer are never touched. Where the analytic estimate (`lowmem.plan.estimate`) is a
formula someone derived, the trace is the step itself, so the two side by side
(`render_trace_comparison`) show where the formula drifted from the code.

A fake tensor has no values, so the few places where the step reads data back need an answer. Every
one is answered here, and only here (`_FakeDataAnswers`):

- `Tensor.item()` (and `int()`/`float()` of a tensor: `loss.item()`, `int(n_tokens)` in `train_step`,
  the gradient norm of `_clip` and of the in-backward hooks, AdamW's `step` count) returns 1 (1.0 for
  floating dtypes). These values only feed reporting and Python-side scalars (the loss normalizer,
  AdamW's bias correction); no shape depends on them. The traced loss, grad norm and token count are
  therefore meaningless, and `train_step`'s finite-loss check always passes.
- `nonzero` of the labels' keep-mask (the kept-row gather of chunked and fused cross-entropy,
  `lowmem.nn.loss._kept_rows`), for a mask of whole rows (a micro-batch or one of its split pieces), returns
  every position except the last of each row, which `lowmem.data.loader.make_batch` never gives a target.
  Where documents end inside a row depends on the data: assumed nowhere, so the trace keeps slightly more
  tokens than a real batch (the index vector and, for chunked CE, the gathered rows are a few rows larger
  than measured).
- Any other data-dependent op (a boolean `nonzero` of another shape, `.item()` of a bool) raises
  `TraceError` naming the op, rather than guessing.

A plan with `compile` is traced eager: torch.compile cannot trace fake tensors under these modes, and the
compiled block holds what the eager one does or less (inductor fuses elementwise ops and saves fewer of their
intermediates), so the trace is an upper bound for it. In the same way a plan with activation offloading or a host optimizer
(`optimizer.offload`) is traced with everything on the device: those move tensors between a CUDA device and the
host, and fake tensors live on the CPU. The traced device bytes are then an upper bound, and the analytic report
(`MemoryReport.host`) is the only account of the host side.

A torchao optimizer (AdamW8bit, AdamW4bit, and `_AdamW` for bf16 stochastic rounding) steps through
torch.compile, which cannot run on fake tensors: its states are created, where the tracker counts them, and its
update is skipped (`lowmem.train.optim._measurable`). A measured run does not see that update's temporaries
either.

What it does not see, like `LiveTensorTracker` itself: scratch memory inside one kernel, and on CUDA
the caching allocator's block rounding. Fake tensors live on the CPU here, so SDPA takes its CPU
kernels: a CUDA run's flash / memory-efficient attention saves less for backward than the trace counts.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator

import msgspec
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from lowmem.nn import init_params
from lowmem.plan.structs import Component, MemoryReport, Plan
from lowmem.spec.structs import AdamW
from lowmem.spec.units import format_bytes
from lowmem.train.memory import LiveTensorTracker
from lowmem.train.session import Training, build_training
from lowmem.train.step import train_step
from lowmem.train.strategies import param_dtype

__all__ = ["TraceError", "render_trace_comparison", "trace_memory"]

# the components in the order the analytic report lists them; the tracker's categories use the same names
COMPONENT_ORDER = ("parameters", "gradients", "optimizer_state", "activations", "logits", "batch", "temporaries")
NOTES = {
    "parameters": "base weights and adapters, as allocated",
    "gradients": "trainable tensors' .grad after backward",
    "optimizer_state": "state and update temporaries made in the step",
    "activations": "everything else forward and backward hold",
    "logits": "tensors the loss function allocates",
    "batch": "token ids, labels, positions, document ids",
}


class TraceError(RuntimeError):
    """The plan's step did something a fake tensor cannot answer (a value it would have to know)."""


class _FakeDataAnswers(TorchDispatchMode):
    """Answers the data-dependent ops of a training step on fake tensors, and notes the phase of the peak.

    Sits above the tracker, which sits above FakeTensorMode: every other op passes straight through.
    """

    def __init__(self, tracker: LiveTensorTracker, seq_len: int, n_positions: int) -> None:
        super().__init__()
        self.tracker = tracker
        self.seq_len = seq_len
        self.n_positions = n_positions  # a whole micro-batch's; a split micro-batch's pieces hold fewer rows
        self.step = 0
        self.in_forward = False
        self.in_optimizer_step = False
        self.peak_bytes = 0
        self.peak_phase = "before the first step"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._local_scalar_dense.default:
            return self._scalar(args[0])
        if func is torch.ops.aten.nonzero.default:
            out = self._kept_rows(args[0])
        else:
            out = func(*args, **kwargs)
        self._note_peak()
        return out

    def _scalar(self, tensor: torch.Tensor) -> float | int:
        if tensor.dtype == torch.bool:
            raise TraceError("the traced step reads a boolean tensor's value (control flow on data), "
                             "which a fake tensor does not have; trace_memory cannot follow it")
        return 1.0 if tensor.is_floating_point() else 1

    def _kept_rows(self, mask: torch.Tensor) -> torch.Tensor:
        n = mask.shape[0] if mask.dim() == 1 else -1
        if mask.dtype != torch.bool or not (0 < n <= self.n_positions and n % self.seq_len == 0):
            raise TraceError(f"nonzero of a {mask.dtype} tensor of shape {tuple(mask.shape)}: its output size "
                             f"depends on data; trace_memory answers only the labels' keep-mask of whole rows "
                             f"of {self.seq_len} (at most {self.n_positions} positions)")
        kept = n - n // self.seq_len  # every position but the last of each row (`make_batch`)
        return torch.empty((kept, 1), dtype=torch.int64, device=mask.device)  # fake: no data

    def _note_peak(self) -> None:
        peak = self.tracker.peak_bytes
        if peak > self.peak_bytes:
            self.peak_bytes, self.peak_phase = peak, f"{self.phase()}, step {self.step + 1}"

    def phase(self) -> str:
        if self.in_optimizer_step:
            return "optimizer step"
        if torch._C._current_graph_task_id() != -1:  # the autograd engine is running a backward
            return "backward"
        if self.in_forward:
            return "forward"
        return "between backward and optimizer step"


def trace_memory(plan: Plan, *, steps: int = 2) -> MemoryReport:
    """Peak live tensor bytes of `plan`'s training step, traced on fake tensors (nothing real is allocated).

    Args:
        plan: any plan, for any hardware profile; a preset or a local model's config (weights are never read).
        steps: optimizer steps to run (2, as `execute` measures: the first creates the optimizer state).

    Returns:
        A MemoryReport: bytes per tracker category at the peak (they sum to `peak_bytes`), and the phase of
        the step where the peak fell ("backward, step 2", ...).

    Raises:
        TraceError: the step needs a data value the trace cannot supply (see the module docstring).
    """
    if steps < 1:
        raise ValueError(f"steps={steps}: must be >= 1 (2 reaches the steady state)")
    spec = plan.spec
    if plan.strategies.compile:  # traced eager: see the module docstring
        plan = msgspec.structs.replace(plan, strategies=msgspec.structs.replace(plan.strategies, compile=False))
    plan = _on_device(plan)
    device = trace_device(plan)
    if device != plan.hardware.device:  # no fake CUDA in this process: the step traced on host fake tensors
        plan = msgspec.structs.replace(plan, strategies=msgspec.structs.replace(
            plan.strategies, attention_kernel="sdpa", projection_dtype="fp32"))
    B, T = spec.train.micro_batch, spec.train.seq_len
    tracker = LiveTensorTracker()
    answers = _FakeDataAnswers(tracker, seq_len=T, n_positions=B * T)
    total_steps = plan.total_steps or steps  # only the learning rate depends on it
    with FakeTensorMode():
        params = init_params(plan.model, seed=spec.model.init_seed, dtype=param_dtype(plan.strategies),
                             device=device)
        run = build_training(plan, params, tracker)
        del params  # `run.params` holds what is still used (QLoRA replaces the dense weights)
        loss_of = _phase_marked(run, answers)
        batches = _fake_batches(B, T, steps * spec.train.grad_accum, device)
        tracker.add_existing(run.params.values(), "parameters")
        trainable = list(run.trainable_params.values())
        for step in range(steps):
            answers.step = step
            with tracker, answers:
                train_step(step, total_steps, spec, loss_of, _drain(batches), trainable, run.optimizer, tracker,
                           run.loss_scaler, split=plan.strategies.micro_batch_split)
    by_category = tracker.peak_by_category()
    names = [n for n in COMPONENT_ORDER if n in by_category] + sorted(set(by_category) - set(COMPONENT_ORDER))
    components = tuple(Component(name=n, bytes=by_category[n], note=NOTES.get(n, "")) for n in names)
    return MemoryReport(components=components, peak_bytes=tracker.peak_bytes, peak_phase=answers.peak_phase)


def _on_device(plan: Plan) -> Plan:
    """`plan` with nothing moved to the host: no activation offloading, the optimizer on the device."""
    strategies = msgspec.structs.replace(plan.strategies, activation_offloading=False, offload_min_bytes=0,
                                         offload_max_host_bytes=0)
    spec = plan.spec
    if isinstance(spec.optimizer, AdamW) and spec.optimizer.offload:
        optimizer = msgspec.structs.replace(spec.optimizer, offload=False, offload_gradients=False)
        spec = msgspec.structs.replace(spec, optimizer=optimizer)
    return msgspec.structs.replace(plan, spec=spec, strategies=strategies)


def _phase_marked(run: Training, answers: _FakeDataAnswers):
    """`run.loss_of` marking forward for the phase notes, and the optimizer's step when it is a torch one."""
    if isinstance(run.optimizer, torch.optim.Optimizer):  # InBackwardOptimizer steps inside backward
        run.optimizer.register_step_pre_hook(lambda *_: setattr(answers, "in_optimizer_step", True))
        run.optimizer.register_step_post_hook(lambda *_: setattr(answers, "in_optimizer_step", False))

    def loss_of(batch, training: bool = True):
        answers.in_forward = True
        try:
            return run.loss_of(batch, training)
        finally:
            answers.in_forward = False

    return loss_of


def trace_in_fake_cuda(plan: Plan) -> MemoryReport:
    """`trace_memory` of a CUDA plan with its tensors on `cuda`: here on a CUDA torch, else in a fake-CUDA child.

    The child (`lowmem.fakecuda.run`) loads the shim before torch, so the step runs the kernels the plan names
    (flash varlen, the memory-efficient kernel) on fake `cuda` tensors rather than the CPU's math attention.
    """
    from lowmem import fakecuda

    if torch.backends.cuda.is_built() or fakecuda.is_active():
        return trace_memory(plan)
    encoded = msgspec.json.encode(plan).decode()
    return msgspec.json.decode(fakecuda.run("lowmem.train.dryrun:_trace_encoded", encoded).encode(), type=MemoryReport)


def _trace_encoded(plan_json: str) -> str:
    """The fake-CUDA child's side of `trace_in_fake_cuda`: a plan in, its traced MemoryReport out (JSON)."""
    return msgspec.json.encode(trace_memory(msgspec.json.decode(plan_json.encode(), type=Plan))).decode()


def trace_device(plan: Plan) -> str:
    """Where the trace's fake tensors live: the plan's device when this process can fake it, else the host.

    A CUDA plan traces on fake `cuda` tensors with a CUDA torch, or on a CPU-only one whose process loaded the
    shim (`lowmem.fakecuda`; `lowmem plan --trace` runs the trace in such a child). Elsewhere it traces on host
    fake tensors with the CPU's kernels (SDPA math, fp32 projection): an upper bound for the CUDA step.
    """
    from lowmem import fakecuda

    if plan.hardware.device == "cuda" and (torch.backends.cuda.is_built() or fakecuda.is_active()):
        return "cuda"
    return "cpu"


def _fake_batches(B: int, T: int, n: int, device: str = "cpu") -> deque[dict[str, torch.Tensor]]:
    """`n` batches as `BatchLoader` yields them: four (B, T) int64 tensors, made before tracking starts."""
    return deque(
        {k: torch.zeros(B, T, dtype=torch.int64, device=device) for k in ("tokens", "labels", "positions", "doc_ids")}
        for _ in range(n)
    )


def _drain(batches: deque[dict[str, torch.Tensor]]) -> Iterator[dict[str, torch.Tensor]]:
    """Yield and forget each batch, so a used batch dies when the step drops it (as the real loader's do)."""
    while batches:
        yield batches.popleft()


def render_trace_comparison(plan: Plan, traced: MemoryReport) -> str:
    """The analytic estimate (`plan.memory`) and a traced one side by side, per component and in total."""
    analytic = plan.memory.by_name()
    traced_by = traced.by_name()
    names = [n for n in COMPONENT_ORDER if n in analytic or n in traced_by]
    names += sorted((set(analytic) | set(traced_by)) - set(COMPONENT_ORDER))
    lines = [f"{'component':<16} {'analytic':>12} {'traced':>12} {'difference':>12}"]
    for n in names:
        a, t = analytic.get(n, 0), traced_by.get(n, 0)
        lines.append(f"{n:<16} {format_bytes(a):>12} {format_bytes(t):>12} {_signed_bytes(a - t):>12}")
    a, t = plan.memory.peak_bytes, traced.peak_bytes
    lines.append(f"{'peak':<16} {format_bytes(a):>12} {format_bytes(t):>12} {_signed_bytes(a - t):>12}")
    lines.append(f"phase of the peak: analytic {plan.memory.peak_phase}; traced {traced.peak_phase}")
    if t:
        lines.append(f"analytic is {(a - t) / t:+.1%} off traced (FakeTensorMode, live tensor bytes)")
    return "\n".join(lines)


def _signed_bytes(n: int) -> str:
    return ("-" if n < 0 else "+") + format_bytes(abs(n))
