"""execute(plan, out_dir): run exactly what the plan says, and report measured memory beside planned.

A run directory holds::

    plan.json        the plan that ran (`lowmem execute plan.json` runs it again)
    metrics.jsonl    one JSON record per logged step and per evaluation
    memory.json      planned versus measured peak memory, by component
    model/           final weights in Hugging Face format (config.json, model.safetensors, tokenizer.model)
"""

import json
import math
import shutil
import sys
import time
from pathlib import Path

import msgspec
import torch

from lowmem.data import (
    BatchLoader,
    PackedDataset,
    load_or_train_tokenizer,
    prepare_packed_dataset,
    shipped_corpus,
)
from lowmem.data.loader import split_rows
from lowmem.data.tokenizer import Tokenizer
from lowmem.nn import cross_entropy_sum, forward, init_params, load_hf, output_weight, save_hf
from lowmem.plan import Plan, plan
from lowmem.spec.structs import FileTokenizer, RunSpec
from lowmem.spec.units import format_bytes
from lowmem.train.memory import LiveTensorTracker, measure_cuda_peak  # noqa: F401  (CUDA path: issue 5)
from lowmem.train.optim import build_optimizer, lr_at
from lowmem.train.strategies import block_runner, param_dtype

# Memory is measured over the first steps only: step 1 creates the optimizer state, step 2 is the
# steady state; every later step has the same shapes. The tracker slows a step, so it stops after these.
MEASURE_STEPS = 2


class RunResult(msgspec.Struct, frozen=True, kw_only=True):
    """What a finished run reports back to a caller."""

    out_dir: str
    steps: int
    first_loss: float
    final_loss: float
    eval_loss: float | None
    tokens_per_s: float
    planned_peak_bytes: int
    measured_peak_bytes: int
    model_dir: str | None


def execute(plan_or_spec: Plan | RunSpec, out_dir: str | Path | None = None, *, progress: bool = True) -> RunResult:
    """Run a plan (a RunSpec is planned for this machine first) and write the run directory."""
    p = plan_or_spec if isinstance(plan_or_spec, Plan) else plan(plan_or_spec)
    check_executable(p)
    spec = p.spec
    out = Path(out_dir if out_dir is not None else spec.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "plan.json").write_bytes(msgspec.json.format(msgspec.json.encode(p), indent=2))

    torch.manual_seed(spec.train.seed)
    tokenizer, dataset = prepare_data(spec)
    train_rows, eval_rows = split_rows(len(dataset), spec.data.eval_rows, spec.train.seed)
    total_steps = p.total_steps or _steps_for_epochs(spec, len(train_rows))

    dtype = param_dtype(p.strategies)
    params = _initial_params(p, dtype)
    trainable = list(params.values())
    for t in trainable:
        t.requires_grad_(True)
    optimizer = build_optimizer(spec.optimizer, trainable)
    run_block = block_runner(p.strategies)

    tracker = LiveTensorTracker()

    def loss_of(batch):
        hidden = forward(params, batch["tokens"], p.model, positions=batch["positions"],
                         doc_ids=batch["doc_ids"], run_block=run_block)
        with tracker.category("logits"):
            return cross_entropy_sum(hidden, output_weight(params, p.model), batch["labels"])

    loader = BatchLoader(dataset, train_rows, spec.train.micro_batch, spec.train.seed)
    metrics = open(out / "metrics.jsonl", "w")
    printer = _Progress(total_steps, enabled=progress)
    tracker.add_existing(trainable, "parameters")
    losses, measured, eval_loss = [], None, None
    start = time.perf_counter()
    tokens_done = 0
    try:
        for step in range(total_steps):
            measuring = step < MEASURE_STEPS
            if measuring:
                tracker.__enter__()
            lr = lr_at(step, total_steps, spec.optimizer.lr, spec.train.schedule)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum, n_tokens = 0.0, 0
            for _ in range(spec.train.grad_accum):
                batch = next(loader)
                if measuring:
                    tracker.add_existing(batch.values(), "batch")
                micro_loss, micro_n = loss_of(batch)
                micro_loss.backward()
                loss_sum += micro_loss.item()
                n_tokens += int(micro_n)
                if measuring:
                    tracker.reclassify((t.grad for t in trainable), "gradients")
            # normalize by the target tokens of the whole step, not per micro-batch (torchtune #1875)
            scale = 1.0 / max(n_tokens, 1)
            for t in trainable:
                t.grad.mul_(scale)
            grad_norm = _clip(trainable, spec.train.clip_grad_norm)
            if measuring:
                with tracker.category("optimizer_state"):
                    optimizer.step()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if measuring:
                tracker.__exit__(None, None, None)
                measured = tracker.snapshot()
            loss = loss_sum / max(n_tokens, 1)
            if not math.isfinite(loss):
                raise FloatingPointError(
                    f"loss became {loss} at step {step + 1}; lower optimizer.lr ({spec.optimizer.lr}) or use "
                    "precision fp32"
                )
            losses.append(loss)
            tokens_done += p.tokens_per_step
            elapsed = time.perf_counter() - start
            record = {"step": step + 1, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": tokens_done,
                      "tokens_per_s": tokens_done / elapsed, "elapsed_s": elapsed}
            if spec.train.eval_every and len(eval_rows) >= spec.train.micro_batch and (
                (step + 1) % spec.train.eval_every == 0 or step + 1 == total_steps
            ):
                eval_loss = evaluate(loss_of, dataset, eval_rows, spec)
                record["eval_loss"] = eval_loss
            if (step + 1) % spec.train.log_every == 0 or step + 1 == total_steps or "eval_loss" in record:
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
                printer.update(record)
    finally:
        loader.close()
        metrics.close()
        printer.close()
    elapsed = time.perf_counter() - start

    report = memory_report(p, measured)
    (out / "memory.json").write_bytes(msgspec.json.format(msgspec.json.encode(report), indent=2))
    model_dir = None
    if spec.output.save_final:
        model_dir = out / "model"
        save_hf({k: v.detach() for k, v in params.items()}, p.model, model_dir)
        shutil.copyfile(tokenizer.path, model_dir / "tokenizer.model")
    return RunResult(
        out_dir=str(out), steps=total_steps, first_loss=losses[0], final_loss=losses[-1], eval_loss=eval_loss,
        tokens_per_s=tokens_done / elapsed, planned_peak_bytes=p.memory.peak_bytes,
        measured_peak_bytes=report["measured_peak_bytes"], model_dir=str(model_dir) if model_dir else None,
    )


def check_executable(p: Plan) -> None:
    """Refuse, before anything runs, a plan this version cannot execute here."""
    if p.hardware.device != "cpu":
        raise ValueError(
            f"this plan was made for {p.hardware.name} ({p.hardware.device}); this version executes on CPU "
            "only. Re-plan for this machine: lowmem plan SPEC (no --hardware)"
        )


def prepare_data(spec: RunSpec) -> tuple[Tokenizer, PackedDataset]:
    """Tokenizer (trained and cached, or from a file) and the packed, memory-mapped dataset."""
    source = spec.data.source
    corpus = shipped_corpus(source.removeprefix("builtin:")) if source.startswith("builtin:") else Path(source)
    if not corpus.is_file():
        raise ValueError(f"data.source = {source!r}: no such file; give a .jsonl, .jsonl.gz or .txt file")
    cache = Path(spec.data.cache_dir)
    tok_spec = spec.data.tokenizer
    if isinstance(tok_spec, FileTokenizer):
        tokenizer = Tokenizer(tok_spec.path)
    else:
        tokenizer = load_or_train_tokenizer(corpus, tok_spec.vocab_size, cache, text_field=spec.data.text_field)
    path = prepare_packed_dataset(corpus, tokenizer, spec.train.seq_len, cache, text_field=spec.data.text_field)
    dataset = PackedDataset(path)
    needed = spec.data.eval_rows + spec.train.micro_batch
    if len(dataset) < needed:
        raise ValueError(
            f"data.source = {source!r} packs into {len(dataset)} rows of {spec.train.seq_len} tokens; "
            f"data.eval_rows ({spec.data.eval_rows}) + train.micro_batch ({spec.train.micro_batch}) need "
            f"{needed}. Use more data, a shorter train.seq_len or fewer eval rows."
        )
    return tokenizer, dataset


@torch.no_grad()
def evaluate(loss_of, dataset: PackedDataset, eval_rows, spec: RunSpec) -> float:
    """Mean loss per target token over up to `train.eval_batches` batches of the held-out rows, in order."""
    loader = BatchLoader(dataset, eval_rows, spec.train.micro_batch, spec.train.seed, shuffle=False, prefetch=0)
    total, count = 0.0, 0
    for _ in range(min(spec.train.eval_batches, loader.batches_per_epoch)):
        loss_sum, n = loss_of(next(loader))
        total += loss_sum.item()
        count += int(n)
    loader.close()
    return total / max(count, 1)


def memory_report(p: Plan, measured: dict | None) -> dict:
    """Planned versus measured peak bytes, per component and in total."""
    planned = p.memory.by_name()
    measured_by = dict(measured["peak_by_category"]) if measured else {}
    measured_peak = measured["peak_bytes"] if measured else 0
    names = list(dict.fromkeys([*planned, *measured_by]))
    rows = [{"component": n, "planned_bytes": planned.get(n, 0), "measured_bytes": measured_by.get(n, 0)}
            for n in names]
    error = (p.memory.peak_bytes - measured_peak) / measured_peak if measured_peak else None
    return {"device": p.hardware.name, "method": "live tensor bytes (TorchDispatchMode)",
            "planned_peak_bytes": p.memory.peak_bytes, "planned_phase": p.memory.peak_phase,
            "measured_peak_bytes": measured_peak, "error": error, "components": rows}


def _initial_params(p: Plan, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    if p.spec.model.path is not None:
        _, params = load_hf(p.spec.model.path, dtype=dtype)
        return params
    return init_params(p.model, seed=p.spec.model.init_seed, dtype=dtype)


def _clip(params: list[torch.Tensor], max_norm: float) -> float:
    """Clip to the global norm `max_norm` (0: no clipping) and return the norm before clipping."""
    if max_norm == 0:
        norms = torch.stack([t.grad.float().norm() for t in params])
        return float(norms.norm())
    return float(torch.nn.utils.clip_grad_norm_(params, max_norm))


def _steps_for_epochs(spec: RunSpec, n_train_rows: int) -> int:
    rows_per_step = spec.train.micro_batch * spec.train.grad_accum
    return max(1, math.ceil(spec.train.epochs * n_train_rows / rows_per_step))


class _Progress:
    """One live line on a terminal (a line per update otherwise): step, loss, lr, tokens/s, time."""

    def __init__(self, total_steps: int, enabled: bool):
        self.total = total_steps
        self.enabled = enabled
        self.tty = sys.stderr.isatty()

    def update(self, r: dict) -> None:
        if not self.enabled:
            return
        elapsed = r["elapsed_s"]
        left = elapsed / r["step"] * (self.total - r["step"])
        line = (f"step {r['step']:>{len(str(self.total))}}/{self.total}  loss {r['loss']:.4f}  lr {r['lr']:.2e}  "
                f"{r['tokens_per_s']:,.0f} tok/s  {_clock(elapsed)} elapsed, {_clock(left)} left")
        if "eval_loss" in r:
            line += f"  eval {r['eval_loss']:.4f}"
        if self.tty:
            sys.stderr.write("\r\x1b[2K" + line)
            if "eval_loss" in r:
                sys.stderr.write("\n")
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            sys.stderr.write("\n")


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m}:{s:02d}"


def describe_memory(report: dict) -> str:
    """Planned versus measured memory as a small table."""
    lines = [f"{'component':<16} {'planned':>12} {'measured':>12}"]
    for row in report["components"]:
        lines.append(f"{row['component']:<16} {format_bytes(row['planned_bytes']):>12} "
                     f"{format_bytes(row['measured_bytes']):>12}")
    lines.append(f"{'peak':<16} {format_bytes(report['planned_peak_bytes']):>12} "
                 f"{format_bytes(report['measured_peak_bytes']):>12}")
    if report["error"] is not None:
        lines.append(f"planned is {report['error']:+.1%} off measured ({report['method']})")
    return "\n".join(lines)
