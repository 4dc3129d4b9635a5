"""lowmem beside its peers (HF transformers Trainer + peft, torchtune): same model, data, batch and steps.

    python benchmarks/peers.py                    # quickstart-5m, 8 x 256 tokens, 10 steps; both tables
    python benchmarks/peers.py --features best    # only "each tool at its best" (keeps the other table)
    python benchmarks/peers.py --smoke            # tiny model, 3 steps, lowmem and HF, features off (CI)

Two comparisons (`--features`): "off", every memory feature off in every tool, so the three do the same math
and should use about the same memory; and "best", each tool with the memory features its users would turn
on for the job (HF: gradient checkpointing, paged 8-bit AdamW, peft's k-bit preparation for QLoRA;
torchtune: activation checkpointing, chunked cross-entropy, and for full fine-tuning optimizer-in-backward
with 8-bit AdamW, as its llama3_2 configs; lowmem: the planner's own choice under a memory budget equal to
the smallest memory a peer measured for that method, and under half of it). Precision stays fp32 for all.

The parent process packs the data with lowmem, writes the batches lowmem's loader would draw (tokens, labels,
positions, doc ids) to an .npz file and the initial weights (lowmem's init, seed 0) as an HF checkpoint in a
temporary directory; then every (method, tool) pair trains from exactly those in its own subprocess:

- lowmem: `build_training` + `train_step`, the pieces `execute` runs, with the strategies planned (all off,
  or "best": all `auto` under the budget);
- HF: `LlamaForCausalLM.from_pretrained` (sdpa attention, packed documents from position_ids) trained by
  `transformers.Trainer` in order, LoRA/QLoRA through peft (QLoRA: bitsandbytes NF4, double quantized);
- torchtune: its `llama3_2` / `lora_llama3_2` builders with the same dimensions (rope scale factor 1, i.e.
  plain RoPE), weights through `hf_to_tune`, the step its recipes take (block-diagonal document mask,
  standard cross-entropy). torchtune runs from another interpreter (`--peers-python`, default
  /tmp/peers-venv/bin/python) because it needs its own torchao; a tool that is missing is skipped with the
  reason in the table. torchtune 0.6.1 imports `torchao.dtypes.nf4tensor`, which torchao 0.18 removed, so
  that interpreter pins torchao 0.17:

      python3 -m venv /tmp/peers-venv
      PIP_FIND_LINKS=/opt/wheels /tmp/peers-venv/bin/pip install torch==2.13.0   # or your torch build
      /tmp/peers-venv/bin/pip install -e '.[dev]' torchtune 'torchao==0.17.0'

Everyone uses AdamW (8-bit where "best" says so) with the same lr/betas/eps, no weight decay, constant lr, no
clipping, fp32, LoRA r=8,
alpha=16 on q, k, v, o. Memory is measured the same way for every tool: the subprocess's peak RSS (VmHWM,
reset through /proc/self/clear_refs right before the first step) minus its RSS at that moment, so it counts
what training adds on top of the built model (gradients, optimizer state, activations, allocator and library
overhead), not the weights. For lowmem its own planned and measured (live tensor bytes, one extra tracked
step after the timed ones) peaks are given beside it; those include the weights. tokens/s is over the steps
after the first (warm-up) one, each step timed from the end of the previous one (data, forward, backward,
optimizer and the tool's own loop overhead). Writes benchmarks/results/peers.md and peers.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULT_TAG = "PEERS_RESULT "
DEFAULT_PEERS_PYTHON = "/tmp/peers-venv/bin/python"
TOOLS = ("lowmem", "hf", "torchtune")
TOOL_NAMES = {"lowmem": "lowmem", "hf": "HF Trainer + peft", "torchtune": "torchtune"}
METHODS = ("full", "lora", "qlora")
HF_TARGETS = {"wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj"}
TUNE_TARGETS = {"wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "output_proj"}

FEATURES = ("off", "best")
TIGHT_FRACTION = 0.5  # features "best": lowmem also planned under this fraction of the best peer's memory
# issue #16's target: lowmem's RSS delta at most this share of the best peer's, at this many times its tokens/s,
# for every method; lowmem is planned with that share of the peer's memory as its budget (budget kind "target")
TARGET_RSS_RATIO, TARGET_SPEED_RATIO = 0.7, 1.1
BUDGET_FRACTIONS = {"peer": 1.0, "target": TARGET_RSS_RATIO, "tight": TIGHT_FRACTION}
# what each peer turns on in features "best" (the memory settings its docs and shipped configs use)
PEER_FEATURES = {
    "hf": {"full": "gradient checkpointing (non-reentrant), paged_adamw_8bit",
           "lora": "gradient checkpointing (non-reentrant), paged_adamw_8bit",
           "qlora": "prepare_model_for_kbit_training + gradient checkpointing (non-reentrant), paged_adamw_8bit"},
    "torchtune": {"full": "activation checkpointing, CEWithChunkedOutputLoss (8), optimizer_in_bwd, "
                          "bnb PagedAdamW8bit",
                  "lora": "activation checkpointing, CEWithChunkedOutputLoss (8), torch AdamW",
                  "qlora": "activation checkpointing, CEWithChunkedOutputLoss (8), torch AdamW"},
}

SIZES = {
    "smoke": dict(preset="tiny", vocab=1024, steps=3, micro_batch=2, seq_len=64),
    "full": dict(preset="quickstart-5m", vocab=4096, steps=10, micro_batch=8, seq_len=256),
}


# ------------------------------------------------------------------------------------------ measuring


def _status_kib(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    return int(match.group(1)) if match else 0


class RssMeter:
    """Peak RSS of this process from `start()` on: VmHWM after a reset through /proc/self/clear_refs."""

    def start(self) -> None:
        gc.collect()
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
            self.reset = True
        except OSError:
            self.reset = False
        self.before = _status_kib("VmRSS") * 1024
        if not self.reset:  # VmHWM may then hold a peak from before the first step: the delta is an upper bound
            self.before = min(self.before, _status_kib("VmHWM") * 1024)

    def stop(self) -> dict:
        peak = _status_kib("VmHWM") * 1024
        return {"rss_before_bytes": self.before, "rss_peak_bytes": peak, "rss_delta_bytes": peak - self.before,
                "hwm_reset": self.reset}


class StepClock:
    """Per-step wall times, each from the end of the previous step (the first from `start()`)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.losses: list[float] = []
        self._last = None

    def start(self) -> None:
        self._last = time.perf_counter()

    def step_done(self, loss: float | None = None) -> None:
        now = time.perf_counter()
        self.times.append(now - self._last)
        self._last = now
        if loss is not None:
            self.losses.append(float(loss))


def _summary(job: dict, clock: StepClock, rss: dict, losses: list[float]) -> dict:
    warm = job["warmup"]
    timed = clock.times[warm:] or clock.times
    tokens_per_step = job["micro_batch"] * job["seq_len"]
    return {**rss, "steps": len(clock.times), "step_times_s": clock.times,
            "tokens_per_s": tokens_per_step * len(timed) / sum(timed), "losses": losses,
            "first_loss": losses[0] if losses else None, "final_loss": losses[-1] if losses else None}


def _set_threads(n: int, seed: int = 0) -> None:
    import torch

    torch.set_num_threads(n)
    torch.manual_seed(seed)  # the peers draw their LoRA A matrices from the global generator


def _load_batches(job: dict):
    import numpy as np
    import torch

    data = np.load(job["data"])
    keys = ("tokens", "labels", "positions", "doc_ids")
    return [{k: torch.from_numpy(data[k][i]) for k in keys} for i in range(job["steps"])]


def _versions(*names: str) -> dict:
    from importlib import metadata

    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


# ------------------------------------------------------------------------------------------ workers


def worker_lowmem(job: dict) -> dict:
    """lowmem's own training step (`lowmem.train.step.train_step`), strategies as planned (all off here)."""
    _set_threads(job["threads"], job["seed"])
    import inspect

    import msgspec
    import torch  # noqa: F401

    from lowmem.nn import load_hf
    from lowmem.plan import plan
    from lowmem.spec import decode_spec
    from lowmem.train.memory import LiveTensorTracker
    from lowmem.train.session import build_training, state_tensors
    from lowmem.train.step import train_step
    from lowmem.train.strategies import param_dtype

    spec = decode_spec(job["spec"], "toml", overrides=job["overrides"])
    p = plan(spec)
    split = p.strategies.micro_batch_split if hasattr(p.strategies, "micro_batch_split") else 1
    step_kw = {"split": split} if "split" in inspect.signature(train_step).parameters else {}
    _, params = load_hf(job["weights"], dtype=param_dtype(p.strategies))
    tracker = LiveTensorTracker()
    training = build_training(p, params, tracker)
    del params  # QLoRA: only the NF4 copies stay
    trainable = list(training.trainable_params.values())
    batches = _load_batches(job)
    loader = iter(batches)
    meter, clock = RssMeter(), StepClock()
    meter.start()
    clock.start()
    for step in range(job["steps"]):
        stats = train_step(step, job["steps"], spec, training.loss_of, loader, trainable, training.optimizer, None,
                           training.loss_scaler, **step_kw)
        clock.step_done(stats.loss)
    rss = meter.stop()
    # lowmem's own view: live tensor bytes over one more (steady-state) step, the weights included
    tracker.add_existing(training.params.values(), "parameters")
    tracker.add_existing(state_tensors(training.optimizer), "optimizer_state")
    with tracker:
        train_step(job["steps"], job["steps"] + 1, spec, training.loss_of, iter(batches[:1]), trainable,
                   training.optimizer, tracker, training.loss_scaler, **step_kw)
    snap = tracker.snapshot()
    out = _summary(job, clock, rss, clock.losses)
    out.update(planned_tensor_peak_bytes=p.memory.peak_bytes, measured_tensor_peak_bytes=snap["peak_bytes"],
               strategies=msgspec.structs.asdict(p.strategies), budget_bytes=p.budget_bytes,
               usable_bytes=p.usable_bytes, planned_tokens_per_s=p.tokens_per_s,
               n_trainable=sum(t.numel() for t in trainable),
               versions=_versions("lowmem", "torch", "torchao", "bitsandbytes"))
    return out


def worker_hf(job: dict) -> dict:
    """transformers.Trainer (+ peft for LoRA/QLoRA) over the same rows, in the same order."""
    _set_threads(job["threads"], job["seed"])
    import torch
    from torch.utils.data import SequentialSampler
    from transformers import LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

    method = job["method"]
    kwargs = dict(dtype=torch.float32, attn_implementation="sdpa")
    if method == "qlora":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32)
    model = LlamaForCausalLM.from_pretrained(job["weights"], **kwargs)
    model.config.use_cache = False
    best = job["features"] == "best"
    checkpointing = {"use_reentrant": False}
    if best and method == "qlora":  # peft's QLoRA preparation (it turns gradient checkpointing on itself)
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                                gradient_checkpointing_kwargs=checkpointing)
    if method in ("lora", "qlora"):
        from peft import LoraConfig, get_peft_model

        lora = job["lora"]
        model = get_peft_model(model, LoraConfig(
            r=lora["rank"], lora_alpha=lora["alpha"], lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
            target_modules=[HF_TARGETS[t] for t in lora["targets"]]))

    rows = []
    for b in _load_batches(job):
        # lowmem's labels are already the next token (labels[t] = tokens[t + 1]); HF shifts them itself
        labels = torch.full_like(b["labels"], -100)
        labels[:, 1:] = b["labels"][:, :-1]
        for i in range(len(labels)):
            rows.append({"input_ids": b["tokens"][i], "labels": labels[i], "position_ids": b["positions"][i]})

    meter, clock = RssMeter(), StepClock()
    losses: list[float] = []

    class Measure(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == 0 and not clock.times and clock._last is None:
                meter.start()
                clock.start()

        def on_step_end(self, args, state, control, **kw):
            clock.step_done()

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    class InOrder(Trainer):
        def _get_train_sampler(self, *args, **kw):  # the rows in the order lowmem's loader drew them
            return SequentialSampler(self.train_dataset)

    a = job["optim"]
    args = TrainingArguments(
        output_dir=job["tmp"], max_steps=job["steps"], per_device_train_batch_size=job["micro_batch"],
        gradient_accumulation_steps=1, learning_rate=a["lr"], adam_beta1=a["betas"][0], adam_beta2=a["betas"][1],
        adam_epsilon=a["eps"], weight_decay=0.0, lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=0.0,
        optim="paged_adamw_8bit" if best else "adamw_torch", gradient_checkpointing=best,
        gradient_checkpointing_kwargs=checkpointing if best else None, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
        dataloader_num_workers=0, dataloader_pin_memory=False, remove_unused_columns=False, seed=job["seed"],
        disable_tqdm=True)
    trainer = InOrder(model=model, args=args, train_dataset=rows, callbacks=[Measure()])
    trainer.train()
    rss = meter.stop()
    out = _summary(job, clock, rss, losses)
    out.update(n_trainable=sum(p.numel() for p in model.parameters() if p.requires_grad),
               versions=_versions("torch", "transformers", "peft", "accelerate", "bitsandbytes"))
    return out


def worker_torchtune(job: dict) -> dict:
    """torchtune's Llama 3.2 builders with the same dimensions, trained the way its recipes step."""
    _set_threads(job["threads"], job["seed"])
    import torch
    import torch.nn.functional as F
    from safetensors.torch import load_file
    from torchtune.models.convert_weights import hf_to_tune
    from torchtune.models.llama3_2 import llama3_2, lora_llama3_2
    from torchtune.modules.peft import get_adapter_params, set_trainable_params

    m, method = job["model"], job["method"]
    dims = dict(vocab_size=m["vocab_size"], num_layers=m["n_layers"], num_heads=m["n_heads"],
                num_kv_heads=m["n_kv_heads"], embed_dim=m["dim"], max_seq_len=m["max_seq_len"],
                intermediate_dim=m["ffn_dim"], norm_eps=m["norm_eps"], rope_base=m["rope_theta"],
                scale_factor=1, tie_word_embeddings=m["tie_embeddings"])
    if method == "full":
        model = llama3_2(**dims)
    else:
        lora = job["lora"]
        model = lora_llama3_2([TUNE_TARGETS[t] for t in lora["targets"]], lora_rank=lora["rank"],
                              lora_alpha=lora["alpha"], lora_dropout=0.0, quantize_base=method == "qlora", **dims)
    state = hf_to_tune(load_file(str(Path(job["weights"]) / "model.safetensors")), num_heads=m["n_heads"],
                       num_kv_heads=m["n_kv_heads"], dim=m["dim"])
    missing, unexpected = model.load_state_dict(state, strict=False)
    del state
    if unexpected or any("lora" not in k for k in missing):
        raise RuntimeError(f"torchtune state dict mismatch: missing {missing[:4]}, unexpected {unexpected[:4]}")
    if method == "full":
        params = list(model.parameters())
    else:
        set_trainable_params(model, get_adapter_params(model))
        params = [p for p in model.parameters() if p.requires_grad]
    a = job["optim"]
    hyper = dict(lr=a["lr"], betas=tuple(a["betas"]), eps=a["eps"], weight_decay=0.0)
    best = job["features"] == "best"
    in_bwd = best and method == "full"  # the full-finetune recipe's optimizer_in_bwd (the LoRA recipe has none)
    chunked = None
    if best:
        # what its recipes do with enable_activation_checkpointing / optimizer_in_bwd / CEWithChunkedOutputLoss.
        # torchtune.training does not import beside torchao 0.17 (its quantization module wants
        # torchao.quantization.int4_weight_only), so its memory utilities are loaded from their own file
        import importlib.util

        import torchtune
        from torchtune.modules import TransformerSelfAttentionLayer
        from torchtune.modules.loss import CEWithChunkedOutputLoss

        path = Path(torchtune.__file__).parent / "training" / "memory.py"
        loader = importlib.util.spec_from_file_location("torchtune_training_memory", path)
        memory = importlib.util.module_from_spec(loader)
        loader.loader.exec_module(memory)
        memory.set_activation_checkpointing(model, auto_wrap_policy={TransformerSelfAttentionLayer})
        chunked = CEWithChunkedOutputLoss()
        model.set_num_output_chunks(chunked.num_output_chunks)
    if in_bwd:  # full: its llama3_2 full_single_device config's bitsandbytes PagedAdamW8bit, one per parameter
        import bitsandbytes as bnb

        optim_dict = {p: bnb.optim.PagedAdamW8bit([p], **hyper) for p in params}
        memory.register_optim_in_bwd_hooks(model=model, optim_dict=optim_dict)
        optimizer = None
    else:  # its LoRA/QLoRA configs keep torch AdamW
        optimizer = torch.optim.AdamW(params, **hyper)
    model.train()
    batches = _load_batches(job)
    causal = torch.ones(job["seq_len"], job["seq_len"], dtype=torch.bool).tril()
    meter, clock = RssMeter(), StepClock()
    meter.start()
    clock.start()
    for b in batches:
        # the block-diagonal causal mask of the packed documents (torchtune builds it in its collate)
        mask = causal & (b["doc_ids"][:, :, None] == b["doc_ids"][:, None, :])
        logits = model(b["tokens"], mask=mask, input_pos=b["positions"])
        if chunked is not None:  # a list of num_output_chunks pieces along the sequence
            loss = chunked(logits, b["labels"])
        else:
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), b["labels"].reshape(-1),
                                   ignore_index=-100)
        del logits
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        clock.step_done(loss.item())
    rss = meter.stop()
    out = _summary(job, clock, rss, clock.losses)
    out.update(n_trainable=sum(p.numel() for p in params),
               versions=_versions("torch", "torchtune", "torchao", *(["bitsandbytes"] if in_bwd else [])))
    return out


WORKERS = {"lowmem": worker_lowmem, "hf": worker_hf, "torchtune": worker_torchtune}


def run_worker(tool: str, job_path: Path) -> None:
    job = json.loads(job_path.read_text())
    result = WORKERS[tool](job)
    print(RESULT_TAG + json.dumps(result), flush=True)


# ------------------------------------------------------------------------------------------ parent


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def lowmem_spec(size: dict, cache: Path, features: str) -> str:
    """lowmem's spec for the comparison: every strategy off, or (features "best") every one left to the planner."""
    from _spec import spec_text

    from lowmem.spec.structs import StrategySpec

    off = tuple(StrategySpec.__struct_fields__) if features == "off" else ()
    return spec_text("peers", size, cache, "fp32", off=off, schedule="constant")


def outside_the_loop(job: dict) -> int:
    """What lowmem's plan counts that the measured RSS delta leaves out: the weights (loaded before step 1, in every
    tool's "RSS before") and the plan's `runtime` line (execute's data loader, metrics and thread pools; the
    benchmark runs the training step alone). A budget of this plus a peer's delta asks the planner for what that
    delta holds: the step's tensors and the allocator's cache."""
    from lowmem.plan import plan
    from lowmem.spec import decode_spec

    memory = plan(decode_spec(job["spec"], "toml", overrides=job["overrides"])).memory
    return memory.by_name()["parameters"] + sum(c.bytes for c in memory.overheads if c.name == "runtime")


def prepare(tmp: Path, size: dict, cache: Path) -> dict:
    """Pack the data with lowmem, export the batches and the initial weights; return the model's dims."""
    import numpy as np

    from lowmem.data.loader import BatchLoader, split_rows
    from lowmem.nn import init_params, save_hf
    from lowmem.plan import plan
    from lowmem.spec import decode_spec
    from lowmem.train.inputs import prepare_data

    spec = decode_spec(lowmem_spec(size, cache, "off"), "toml")
    p = plan(spec)
    _, dataset = prepare_data(spec)
    train_rows, _ = split_rows(len(dataset), spec.data.eval_rows, spec.train.seed)
    loader = BatchLoader(dataset, train_rows, spec.train.micro_batch, spec.train.seed, prefetch=0)
    batches = [next(loader) for _ in range(size["steps"])]
    loader.close()
    np.savez(tmp / "batches.npz", **{k: np.stack([b[k].numpy() for b in batches])
                                     for k in ("tokens", "labels", "positions", "doc_ids")})
    save_hf(init_params(p.model, seed=spec.model.init_seed), p.model, tmp / "base")
    cfg = p.model
    model = {k: getattr(cfg, k) for k in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim",
                                           "max_seq_len", "norm_eps", "rope_theta", "tie_embeddings")}
    model["n_params"] = p.n_params
    return model


def spawn(tool: str, python: str, job: dict, tmp: Path, threads: int, timeout: int) -> dict:
    job_path = tmp / f"job-{tool}-{job['method']}-{job['features']}-{job.get('budget_kind', '')}.json"
    job_path.write_text(json.dumps(job))
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_NO_ADVISORY_WARNINGS="1")
    try:
        proc = subprocess.run([python, str(Path(__file__).resolve()), "--worker", tool, "--job", str(job_path)],
                              capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"status": "failed", "reason": f"timed out after {timeout} s"}
    except OSError as err:
        return {"status": "skipped", "reason": f"cannot start {python}: {err}"}
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return {"status": "ok", **json.loads(line[len(RESULT_TAG):])}
    return {"status": "failed", "reason": _last_error(proc.stderr) or f"exit code {proc.returncode}",
            "stderr_tail": proc.stderr[-3000:]}


def _last_error(stderr: str) -> str:
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if re.match(r"^[\w.]*(Error|Exception)\b", ln)]
    return (errors or lines or [""])[-1][:300]


def tool_available(tool: str, python: str) -> str | None:
    """None when `python` can import what `tool` needs, else why not."""
    modules = {"lowmem": "lowmem", "hf": "transformers, peft", "torchtune": "torchtune"}[tool]
    # lowmem and HF: is it installed (cheap); torchtune: does it import (it breaks on a too new torchao)
    check = (f"import {modules}" if tool == "torchtune" else
             f"import importlib.util as u; missing = [m for m in {modules.split(', ')!r} if u.find_spec(m) is None]; "
             "missing and exit('ModuleNotFoundError: no module ' + ', '.join(missing))")
    try:
        proc = subprocess.run([python, "-c", check], capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"{python}: {err}"
    if proc.returncode:
        return f"import {modules} failed with {python}: {_last_error(proc.stderr)}"
    return None


def run(args) -> dict:
    size = SIZES["smoke" if args.smoke else "full"]
    if args.steps:
        size = dict(size, steps=args.steps)
    tools = args.tools or (["lowmem", "hf"] if args.smoke else list(TOOLS))
    methods = args.methods or (["full", "lora"] if args.smoke else list(METHODS))
    features = list(FEATURES) if args.features == "both" else [args.features]
    pythons = {"lowmem": sys.executable, "hf": sys.executable, "torchtune": args.peers_python}
    cache = Path(args.cache).resolve()
    report = {"size": size, "threads": args.threads, "warmup": args.warmup, "repeat": args.repeat,
              "cpu": cpu_model(), "n_cores": os.cpu_count(), "tight_fraction": TIGHT_FRACTION,
              "load_average": {"start": list(os.getloadavg())}}
    with tempfile.TemporaryDirectory(prefix="lowmem-peers-") as tmp_name:
        tmp = Path(tmp_name)
        report["model"] = prepare(tmp, size, cache)
        unavailable = {t: tool_available(t, pythons[t]) for t in tools}
        for feature in features:
            rows = []
            for method in methods:
                job = {"method": method, "features": feature, "spec": lowmem_spec(size, cache, feature),
                       "overrides": [f"method.kind={method}"],
                       "data": str(tmp / "batches.npz"), "weights": str(tmp / "base"), "tmp": str(tmp / "hf-out"),
                       "steps": size["steps"], "warmup": args.warmup, "threads": args.threads,
                       "micro_batch": size["micro_batch"], "seq_len": size["seq_len"], "seed": 0,
                       "model": report["model"], "lora": {"rank": 8, "alpha": 16.0, "targets": ["wq", "wk", "wv", "wo"]},
                       "optim": {"lr": 1e-3, "betas": [0.9, 0.95], "eps": 1e-8}}
                if feature == "off":
                    variants = {tool: job for tool in tools}
                    rows += _run_interleaved(method, feature, variants, tools, pythons, unavailable, tmp, args)
                    continue
                # best: the peers first; lowmem is then planned under the smallest memory a peer measured
                peers = [t for t in tools if t != "lowmem"]
                peer_rows = _run_interleaved(method, feature, {t: job for t in peers}, peers, pythons, unavailable,
                                             tmp, args)
                rows += peer_rows
                if "lowmem" not in tools:
                    continue
                fits = [r for r in peer_rows if r["status"] == "ok"]
                best_peer = min(fits, key=lambda r: r["rss_delta_bytes"]) if fits else None
                outside = outside_the_loop(job)
                budgets = ({kind: best_peer["rss_delta_bytes"] * share + outside
                            for kind, share in BUDGET_FRACTIONS.items()} if best_peer else {"none": None})
                variants = {}
                for name, budget in budgets.items():
                    over = [] if budget is None else [f"memory.budget={int(budget)}B"]
                    variants[f"lowmem@{name}"] = dict(job, overrides=job["overrides"] + over, budget_kind=name,
                                                      budget_from=best_peer and best_peer["tool"])
                lm = _run_interleaved(method, feature, variants, ["lowmem"] * len(variants), pythons, unavailable,
                                      tmp, args)
                rows += lm
            add_ratios(rows)
            report["rows" if feature == "off" else "best_rows"] = rows
    versions = {}  # per tool: torchtune runs from another interpreter, with its own torchao
    for r in report.get("rows", []) + report.get("best_rows", []):
        versions.setdefault(r["tool"], {}).update(r.get("versions", {}))
    report["versions"] = versions
    report["load_average"]["end"] = list(os.getloadavg())
    return report


def _run_interleaved(method: str, feature: str, jobs: dict, tools: list[str], pythons: dict, unavailable: dict,
                     tmp: Path, args) -> list[dict]:
    """Each job `args.repeat` times, interleaved (a busy spell on the machine hits every one); one row per job."""
    runs: dict[str, list[dict]] = {key: [] for key in jobs}
    for repeat in range(args.repeat):
        for key, tool in zip(jobs, tools, strict=True):
            job = jobs[key]
            if unavailable[tool]:
                result = {"status": "skipped", "reason": unavailable[tool]}
            elif runs[key] and runs[key][-1]["status"] != "ok":
                continue  # failed once: it fails again
            else:
                result = spawn(tool, pythons[tool], job, tmp, args.threads, args.timeout)
            runs[key].append(result)
            label = TOOL_NAMES[tool] + (f" ({job['budget_kind']} budget)" if "budget_kind" in job else "")
            print(f"{feature:>4} {method:>5} {label:<24} #{repeat + 1} {_brief(result)}", flush=True)
    rows = []
    for key, tool in zip(jobs, tools, strict=True):
        row = {"method": method, "tool": tool, "features": feature, **combine(runs[key])}
        if "budget_kind" in jobs[key]:
            row.update(budget_kind=jobs[key]["budget_kind"], budget_from=jobs[key]["budget_from"])
        if feature == "best" and tool != "lowmem":
            row["peer_features"] = PEER_FEATURES[tool][method]
        rows.append(row)
    return rows


def combine(results: list[dict]) -> dict:
    """One row from repeated runs: the median run's figures (each measure's own median), all runs kept."""
    ok = [r for r in results if r["status"] == "ok"]
    if len(ok) < 2:
        return ok[0] if ok else results[-1]
    row = dict(sorted(ok, key=lambda r: r["tokens_per_s"])[len(ok) // 2])
    for key in ("tokens_per_s", "rss_delta_bytes", "rss_before_bytes", "rss_peak_bytes"):
        row[key] = statistics.median(r[key] for r in ok)
    row["repeats"] = [{k: r[k] for k in ("tokens_per_s", "rss_delta_bytes", "rss_before_bytes", "rss_peak_bytes",
                                         "step_times_s")} for r in ok]
    return row


def _brief(row: dict) -> str:
    if row["status"] != "ok":
        return f"{row['status']}: {row['reason']}"
    return (f"RSS +{_mib(row['rss_delta_bytes'])}, {row['tokens_per_s']:,.0f} tokens/s, "
            f"loss {row['first_loss']:.3f} -> {row['final_loss']:.3f}")


def add_ratios(rows: list[dict]) -> None:
    """Each row's memory and tokens/s over lowmem's (features "best": lowmem under the best peer's budget)."""
    base = {r["method"]: r for r in rows
            if r["tool"] == "lowmem" and r["status"] == "ok" and r.get("budget_kind", "peer") == "peer"}
    for r in rows:
        ref = base.get(r["method"])
        if r["status"] == "ok" and ref and r is not ref:
            r["rss_delta_ratio"] = r["rss_delta_bytes"] / max(ref["rss_delta_bytes"], 1)
            r["tokens_per_s_ratio"] = r["tokens_per_s"] / ref["tokens_per_s"]


def _mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def to_markdown(report: dict, smoke: bool) -> str:
    size, m = report["size"], report["model"]
    v = report["versions"]
    names = ("lowmem", "torch", "transformers", "peft", "accelerate", "torchtune", "torchao", "bitsandbytes")
    lines = [
        f"## lowmem and its peers: {size['preset']} {'(smoke) ' if smoke else ''}on {report['cpu']}",
        "",
        f"{m['n_params']:,} parameters (dim {m['dim']}, {m['n_layers']} layers, vocab {m['vocab_size']}), fp32 for "
        f"every tool, micro-batch {size['micro_batch']} x {size['seq_len']} packed tokens, {size['steps']} steps "
        "of AdamW (lr 1e-3, betas 0.9/0.95, constant), LoRA r=8 alpha=16 on q/k/v/o; the same rows and initial "
        f"weights for every tool, each in its own subprocess, {report['threads']} torch thread(s) on "
        f"{report['n_cores']} cores.",
        "Memory: peak RSS minus RSS right before the first step (what training adds on top of the built model), "
        "measured the same way for every tool; lowmem's own planned / measured live-tensor peak (weights "
        f"included) beside it. tokens/s over steps {report['warmup'] + 1}-{size['steps']}"
        + (f"; each figure the median of {report['repeat']} interleaved runs" if report.get("repeat", 1) > 1 else "")
        + ". Losses are the tools' own per-step means (LoRA A matrices differ between tools, so LoRA losses "
        "part after step 1).",
        "",
        *([f"Load average (1/5/15 min) of this run: at the start {_load(report['load_average']['start'])}, "
           f"at the end {_load(report['load_average']['end'])}" + (f"; sampled during the run: {report['load_average']['during']}"
                                                        if report["load_average"].get("during") else "")
           + f" (other processes share the {report['n_cores']} cores: timings are noisy).", ""]
          if report.get("load_average") else []),
        *([f"The {' and '.join(KEPT_NAMES[k] for k in report['kept_from_earlier_run'])} table comes from an "
           "earlier run (same sizes and threads); `--features` ran only the other one.", ""]
          if report.get("kept_from_earlier_run") else []),
        "Versions, per training subprocess:",
        "",
        *(f"- {TOOL_NAMES[tool]}: " + ", ".join(f"{n} {tv[n]}" for n in names if n in tv)
          for tool, tv in v.items() if tv),
    ]
    if report.get("rows"):
        lines += ["", "### Every memory feature off", "",
                  "Ratios are peer / lowmem.", "",
                  "| method | tool | peak RSS - RSS before step 1 | vs lowmem | tokens/s | vs lowmem | loss step 1 | "
                  f"loss step {size['steps']} | RSS before step 1 | lowmem tensor peak (measured / planned) |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in report["rows"]:
            name = TOOL_NAMES[r["tool"]]
            if r["status"] != "ok":
                lines.append(f"| {r['method']} | {name} | {r['status']}: {r['reason'].replace('|', '/')} "
                             "| | | | | | | |")
                continue
            peer = r["tool"] != "lowmem"
            lines.append(f"| {r['method']} | {name} | {_mib(r['rss_delta_bytes'])} | "
                         f"{_ratio(r, 'rss_delta_ratio') if peer else ''} | {r['tokens_per_s']:,.0f} | "
                         f"{_ratio(r, 'tokens_per_s_ratio') if peer else ''} | {r['first_loss']:.3f} | "
                         f"{r['final_loss']:.3f} | {_mib(r['rss_before_bytes'])} | {_tensors(r)} |")
    if report.get("best_rows"):
        lines += ["", "### Each tool at its best for memory", "", BEST_NOTE.format(
            tight=report.get("tight_fraction", TIGHT_FRACTION), target=TARGET_RSS_RATIO), "",
                  "| method | tool | memory features (lowmem: the plan's choice) | peak RSS - RSS before step 1 | "
                  f"vs lowmem | tokens/s | vs lowmem | loss step 1 | loss step {size['steps']} | "
                  "RSS before step 1 | lowmem tensor peak (measured / planned) |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in report["best_rows"]:
            name = TOOL_NAMES[r["tool"]]
            if r.get("budget_kind") in BUDGET_FRACTIONS:
                name += f", {BUDGET_NAMES[r['budget_kind']]} budget"
            if r["status"] != "ok":
                lines.append(f"| {r['method']} | {name} | | {r['status']}: {r['reason'].replace('|', '/')} "
                             "| | | | | | | |")
                continue
            feats = (r.get("peer_features", "") if r["tool"] != "lowmem" else
                     f"budget {_mib(r['budget_bytes'])}: " + describe_strategies(r["strategies"]))
            lines.append(f"| {r['method']} | {name} | {feats} | {_mib(r['rss_delta_bytes'])} | "
                         f"{_ratio(r, 'rss_delta_ratio')} | {r['tokens_per_s']:,.0f} | "
                         f"{_ratio(r, 'tokens_per_s_ratio')} | {r['first_loss']:.3f} | {r['final_loss']:.3f} | "
                         f"{_mib(r['rss_before_bytes'])} | {_tensors(r)} |")
    target = target_rows(report)
    if target:
        lines += ["", "### The target: lowmem in less memory than the best peer, and faster", "",
                  f"lowmem against the best peer, its RSS delta at most {TARGET_RSS_RATIO:g}x the peer's at "
                  f"{TARGET_SPEED_RATIO:g}x its tokens/s or more (issue #16). lowmem is planned with "
                  f"`memory.budget` = the peer's memory ({BUDGET_NAMES['peer']}), {TARGET_RSS_RATIO:g}x it and "
                  f"{TIGHT_FRACTION:g}x it; the planner spends a budget on speed, so the {TARGET_RSS_RATIO:g}x row "
                  "is the one the target is judged on.", "",
                  "| method | best peer | lowmem's budget | lowmem's plan | RSS delta / peer's | tokens/s / peer's | "
                  "target |", "| --- | --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {t['method']} | {TOOL_NAMES[t['peer']]} | {BUDGET_NAMES[t['budget']]} | {t['plan']} | "
                  f"{t['rss_ratio']:.2f}x | {t['speed_ratio']:.2f}x | "
                  f"{('met' if t['met'] else 'not met') if t['budget'] == 'target' else ''} |" for t in target]
    return "\n".join(lines)


BUDGET_NAMES = {"peer": "best peer", "target": f"{TARGET_RSS_RATIO:g}x peer", "tight": "tight"}


def target_rows(report: dict) -> list[dict]:
    """Per method and lowmem budget: lowmem against the best peer, and (budget "target") whether it met the target."""
    rows, out = report.get("best_rows", []), []
    for method in METHODS:
        for kind in BUDGET_FRACTIONS:
            ours = next((r for r in rows if r["method"] == method and r["tool"] == "lowmem"
                         and r.get("budget_kind") == kind and r["status"] == "ok"), None)
            peer = ours and next((r for r in rows if r["method"] == method and r["tool"] == ours["budget_from"]),
                                 None)
            if peer is None:
                continue
            rss = ours["rss_delta_bytes"] / peer["rss_delta_bytes"]
            speed = ours["tokens_per_s"] / peer["tokens_per_s"]
            out.append({"method": method, "budget": kind, "peer": peer["tool"], "rss_ratio": rss,
                        "speed_ratio": speed, "plan": describe_strategies(ours["strategies"]),
                        "met": rss <= TARGET_RSS_RATIO and speed >= TARGET_SPEED_RATIO})
    return out


BEST_NOTE = (
    "Each tool with the memory features its users turn on for this job. HF Trainer: gradient checkpointing "
    "(use_reentrant=False) and `optim=\"paged_adamw_8bit\"` (bitsandbytes; it runs on CPU, where there is "
    "nothing to page), QLoRA through peft's `prepare_model_for_kbit_training`; it has no chunked loss of its "
    "own (Liger's fused loss needs Triton, i.e. a GPU). torchtune: what its llama3_2 single-device configs "
    "set, plus activation checkpointing for LoRA/QLoRA too: `enable_activation_checkpointing` (every "
    "`TransformerSelfAttentionLayer`), `CEWithChunkedOutputLoss` (8 chunks), and for full fine-tuning "
    "`optimizer_in_bwd` with bitsandbytes `PagedAdamW8bit` (its LoRA configs keep torch AdamW, and its LoRA "
    "recipe has no optimizer_in_bwd). lowmem: every strategy `auto` (precision kept fp32, like the others, so "
    "that only the memory features differ), planned with `memory.budget` = the smallest peak RSS delta a peer "
    "measured for that method (the question: does lowmem fit where the best peer fits, and how fast), and "
    "again at {target:g}x and {tight:g}x that; the plan's choice is printed. On a CPU the planner fits the process's "
    "RSS to the budget, less its 10% safety margin: the tensors (weights included) plus its runtime and allocator "
    "lines, while the column compared counts the RSS added from step 1 on (weights excluded), and the benchmark "
    "runs lowmem's step without execute's loader and metrics. So each budget is that share of the peer's delta "
    "plus what the plan counts outside it: the weights and the runtime line (`outside_the_loop`). lowmem runs on "
    "its caching allocator (lowmem.hostmem) here, the peers on glibc's. Ratios are row / lowmem under the best "
    "peer's budget. bitsandbytes keeps the state of tensors under 4,096 elements in 32 bits, so the 8-bit "
    "optimizers change only full fine-tuning's losses (the LoRA adapters here have 2,048 elements each), and "
    "HF Trainer keeps `nn.Embedding` weights (here tied with the output head) in 32-bit state; full "
    "fine-tuning's step-10 losses therefore differ a little between tools that went 8-bit and those that did not."
)


def describe_strategies(st: dict) -> str:
    """A plan's strategies in a few words: only what differs from plain training."""
    out = [st["precision"]]
    if st["activation_checkpointing"] != "off":
        out.append(f"checkpointing {st['activation_checkpointing']}")
    if st["cross_entropy"] != "standard":
        out.append(f"{st['cross_entropy']} CE")
    for key, words in (("activation_offloading", "activation offloading"),
                       ("optimizer_in_backward", "optimizer in backward"), ("compile", "compile")):
        if st.get(key):
            out.append(words)
    if st.get("micro_batch_split", 1) > 1:
        out.append(f"micro-batch split {st['micro_batch_split']}")
    if st.get("optimizer_state", "full") != "full":
        out.append(f"{st['optimizer_state']} AdamW states")
    if st.get("nf4_block_size"):
        out.append(f"NF4 blocks {st['nf4_block_size']}")
    if st.get("host_allocator") == "caching":
        out.append("caching allocator")
    return ", ".join(out) if len(out) > 1 else out[0] + ", nothing else"


KEPT_NAMES = {"rows": '"every memory feature off"', "best_rows": '"each tool at its best"'}


def _load(values: list[float]) -> str:
    return "/".join(f"{v:.2f}" for v in values)


def _ratio(r: dict, key: str) -> str:
    return f"{r[key]:.2f}x" if key in r else ""


def _tensors(r: dict) -> str:
    if r["tool"] != "lowmem":
        return ""
    return f"{_mib(r['measured_tensor_peak_bytes'])} / {_mib(r['planned_tensor_peak_bytes'])}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny model, 3 steps, lowmem and HF only")
    parser.add_argument("--features", choices=("off", "best", "both"),
                        help="off: every memory feature off; best: each tool with the memory features its users "
                             "turn on (lowmem under the best peer's budget and a tighter one); both (the default; "
                             "smoke: off). Running one keeps the other's table from an earlier peers.json in --out")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per training subprocess")
    parser.add_argument("--steps", type=int, default=0, help="override the steps per run")
    parser.add_argument("--repeat", type=int, default=1, help="runs per (method, tool); medians reported")
    parser.add_argument("--warmup", type=int, default=1, help="steps left out of tokens/s")
    parser.add_argument("--tools", nargs="+", choices=TOOLS, help="default: all (smoke: lowmem hf)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, help="default: all (smoke: full lora)")
    parser.add_argument("--peers-python", default=os.environ.get("LOWMEM_PEERS_PYTHON", DEFAULT_PEERS_PYTHON),
                        help="interpreter with torchtune installed")
    parser.add_argument("--cache", default=".lowmem_cache", help="lowmem's data cache")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per training subprocess")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--worker", choices=TOOLS, help=argparse.SUPPRESS)
    parser.add_argument("--job", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        run_worker(args.worker, args.job)
        return
    args.features = args.features or ("off" if args.smoke else "both")
    name = "peers_smoke" if args.smoke else "peers"
    report = run(args)
    earlier = args.out / f"{name}.json"
    if args.features != "both" and earlier.exists():  # keep the other mode's table when its run matches this one
        old = json.loads(earlier.read_text())
        other = "best_rows" if args.features == "off" else "rows"
        if old.get(other) and old.get("size") == report["size"] and old.get("threads") == report["threads"]:
            report[other] = old[other]
            report["versions"] = {t: {**old.get("versions", {}).get(t, {}), **tv}
                                  for t, tv in {**old.get("versions", {}), **report["versions"]}.items()}
            report.setdefault("kept_from_earlier_run", []).append(other)
    report["target"] = target_rows(report)
    table = to_markdown(report, args.smoke)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.md").write_text(table + "\n")
    (args.out / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
