"""plan(spec, hardware) -> Plan: resolve every strategy so the run fits the budget at the best speed.

Pure and deterministic: reads the model's config (a preset, or config.json of a local model) and never
allocates device memory. The search enumerates the strategies left `auto` (the user's `on`/`off` are kept),
estimates each candidate's peak memory and tokens/s, and picks the fastest that fits the usable budget.
"""

import itertools
import json
import math
import shutil

import msgspec

from lowmem import hostmem
from lowmem.nn.config import ModelConfig, count_params, param_shapes, preset
from lowmem.nn.hub import resolve_model_dir
from lowmem.nn.lora import TARGETS
from lowmem.plan.catalogue import (
    AVAILABLE_PRECISIONS,
    BF16_DECAY_MIN,
    BF16_LOST_UPDATES_REASON,
    BF16_MIN_LR,
    CATALOGUE,
    FP16_CPU_REASON,
    FSDP_OFFLOAD_CPU_REASON,
    OFFLOAD_CPU_REASON,
    OFFLOAD_FSDP_REASON,
)
from lowmem.plan.estimate import (
    COMPILE_SECONDS_PER_BLOCK,
    FULL,
    HOST_PINNED_SHARE,
    OFFLOAD_MIN_BYTES,
    Trainable,
    adapter_shapes,
    estimate_memory,
    estimate_tokens_per_s,
    fsdp_offload_seconds,
    host_optimizer_components,
    host_optimizer_seconds,
    step_floor_seconds,
    weight_bytes,
    with_overheads,
    with_step_floor,
)
from lowmem.plan.hardware import HardwareProfile, resolve_hardware
from lowmem.plan.structs import Alternative, Decision, Plan, Strategies, run_optimizer
from lowmem.spec.structs import (
    SGD,
    Adafactor,
    AdamW,
    AdamW4bit,
    AdamW8bit,
    Dora,
    Full,
    Lora,
    QLora,
    RunSpec,
    TrainTokenizer,
)
from lowmem.spec.units import decimal_unit_note, format_bytes

SUPPORTED_METHODS = (Full, Lora, Dora, QLora)
SUPPORTED_OPTIMIZERS = (AdamW, SGD, Adafactor, AdamW8bit, AdamW4bit)


class PlanError(ValueError):
    """The spec cannot be planned: the message names the spec fields involved and what would work."""


class NothingFits(PlanError):
    """No candidate fits the budget: `need_bytes` is the smallest one's (the device view the fit compares)."""

    def __init__(self, message: str, need_bytes: int):
        super().__init__(message)
        self.need_bytes = need_bytes


def plan(spec: RunSpec, hardware: HardwareProfile | str | None = None, world_size: int = 1) -> Plan:
    """Compile a spec into a Plan for `hardware` (a profile, a profile name, or None for this machine).

    `world_size`: the data-parallel processes the plan runs on (torchrun, FSDP2). `train.micro_batch` is per
    process; the memory report is one process's (`estimate.fsdp_bytes`); on a CPU the processes share the
    machine's memory, so each may use 1/world_size of the usable budget; tokens per step count every process.
    """
    hw = hardware if isinstance(hardware, HardwareProfile) else resolve_hardware(hardware)
    _check_spec(spec, hw, world_size)
    cfg = resolve_model(spec)
    if spec.train.seq_len > cfg.max_seq_len:
        raise PlanError(
            f"train.seq_len = {spec.train.seq_len} exceeds the model's max_seq_len = {cfg.max_seq_len}; "
            "lower train.seq_len"
        )
    trainable, what_trains = trainable_shapes(spec, cfg)
    budget = spec.memory.budget_bytes or hw.memory_bytes
    usable = int(budget * (1 - spec.memory.safety_margin)) // (world_size if hw.device == "cpu" else 1)
    candidates = _search(spec, cfg, hw, world_size, trainable, what_trains, usable)
    chosen = _choose(spec, candidates, budget, usable, world_size if hw.device == "cpu" else 1)
    strategies, memory, tps = chosen
    return Plan(
        spec=spec,
        hardware=hw,
        world_size=world_size,
        model=cfg,
        strategies=strategies,
        decisions=_explain(spec, hw, chosen, candidates, usable, world_size),
        n_params=count_params(cfg),
        n_trainable=sum(_numel(s) for s in trainable),
        tokens_per_step=spec.train.micro_batch * spec.train.grad_accum * spec.train.seq_len * world_size,
        total_steps=spec.train.steps,
        budget_bytes=budget,
        usable_bytes=usable,
        memory=memory,
        tokens_per_s=tps,
        alternatives=tuple(
            Alternative(strategies=s, peak_bytes=m.peak_bytes, tokens_per_s=t, fits=m.device_bytes <= usable,
                        chosen=s == strategies, device_bytes=m.device_bytes)
            for s, m, t in candidates
        ),
        warnings=_warnings(spec, hw, strategies, budget),
    )


def with_strategies(p: Plan, **changes) -> Plan:
    """`p` with some strategies set by hand, its memory and tokens/s re-estimated as the search estimates a
    candidate: for benchmarks and tests that pin a value the spec cannot force (partial or selective
    checkpointing) and compare. The decisions and alternatives stay the search's."""
    strategies = msgspec.structs.replace(p.strategies, **changes)
    trainable, what_trains = trainable_shapes(p.spec, p.model)
    evaluated = _evaluate(p.spec, p.model, p.hardware, p.world_size, strategies, trainable, what_trains)
    if evaluated is None:
        raise PlanError(f"{changes} cannot be sharded over {p.world_size} FSDP2 processes")
    _, memory, tokens_per_s = evaluated
    return msgspec.structs.replace(p, strategies=strategies, memory=memory, tokens_per_s=tokens_per_s)


def _check_spec(spec: RunSpec, hw: HardwareProfile, world_size: int) -> None:
    """Refuse, before any estimate, a spec this version or `hw` cannot run (each check names the fields)."""
    _check_supported(spec)
    _check_distributable(spec, world_size)
    _check_compile(spec, hw)
    _check_offload(spec, hw, world_size)
    _check_host_allocator(spec, hw)
    _check_fsdp_offload(spec, hw, world_size)
    _check_stochastic_rounding(spec, hw, world_size)


def _search(spec: RunSpec, cfg: ModelConfig, hw: HardwareProfile, world_size: int,
            trainable: list[tuple[int, ...]], what_trains: Trainable, usable: int) -> list:
    """Every candidate estimated, as (strategies, memory, tokens/s), tier by tier up to the first that fits.

    Exact strategies first; splitting micro-batches (slower), then 8-bit optimizer states (not exact) only when
    nothing before them fits (or when the spec forces them on); FSDP's CPU offload last (`_tiers`).
    """
    candidates = []
    fsdp_offload = hw.device == "cuda" and world_size > 1  # _check_distributable refused a forced "on" elsewhere
    for tier in _tiers(spec, _candidates(spec, cfg, hw, world_size, trainable), fsdp_offload):
        for strategies in tier:
            candidate = _evaluate(spec, cfg, hw, world_size, strategies, trainable, what_trains)
            if candidate is not None:
                candidates.append(candidate)
        if any(c[1].device_bytes <= usable for c in candidates):
            break
    return candidates


def _evaluate(spec: RunSpec, cfg: ModelConfig, hw: HardwareProfile, world_size: int, strategies: Strategies,
              trainable: list[tuple[int, ...]], what_trains: Trainable):
    """(strategies, memory, tokens/s) of one candidate, or None where it cannot run on `world_size` processes."""
    if world_size > 1 and not _shardable(strategies):
        return None
    optimizer = run_optimizer(spec.optimizer, strategies)
    # with what the runtime adds beside the tensors: the fit is nvidia-smi's view, or the CPU process's RSS
    memory = with_overheads(estimate_memory(cfg, strategies, spec.train, optimizer, trainable, what_trains,
                                                 world_size=world_size, device=hw.device), hw, world_size,
                            strategies.host_allocator)
    if strategies.fsdp_cpu_offload and world_size * sum(c.bytes for c in memory.host) > HOST_PINNED_SHARE * hw.host_ram_bytes:
        return None  # every process of the node pins its shards in the same host RAM
    tps = estimate_tokens_per_s(cfg, strategies, spec.train.seq_len, hw, what_trains)
    # a host optimizer's step comes once per step of micro_batch x grad_accum rows
    # and so does FSDP's host step with its shards' copies
    step_tokens = spec.train.micro_batch * spec.train.grad_accum * spec.train.seq_len
    # no step is faster than its ops can be issued; the host steps below come after it, one after the other
    tps = with_step_floor(tps, step_floor_seconds(cfg, strategies, spec.train, len(trainable), hw), step_tokens,
                          hw.device)
    tps = 1 / (1 / tps + (host_optimizer_seconds(optimizer, trainable, strategies.precision, hw)
                          + fsdp_offload_seconds(cfg, strategies, spec.train, optimizer, trainable,
                                                 what_trains, world_size, hw)) / step_tokens)
    # one GPU per process; on a CPU the processes share its cores
    tps *= world_size if hw.device == "cuda" else 1
    return strategies, memory, tps


def _choose(spec: RunSpec, candidates, budget: int, usable: int, sharing: int):
    """The fastest candidate that fits (see `_run_rate`), or PlanError naming the smallest when none does."""
    fitting = [c for c in candidates if c[1].device_bytes <= usable]
    if not fitting:
        raise NothingFits(_nothing_fits(spec, budget, usable, candidates, sharing=sharing),
                          min(c[1].device_bytes for c in candidates))
    # where pure bf16 would round away the updates (a small learning rate) or the weight decay, auto prefers any
    # other precision that fits, then bf16 with stochastic rounding, and plain bf16 only when nothing else fits
    kept = fitting
    if spec.memory.precision == "auto" and _bf16_lossy(spec):
        kept = ([c for c in fitting if c[0].precision != "bf16"]
                or [c for c in fitting if c[0].bf16_stochastic_rounding] or fitting)
    # fastest over the whole run (compile time counted) first; among equals the smaller peak
    fastest = max(kept, key=lambda c: (_run_rate(spec, c[0], c[2]), -c[1].device_bytes))
    return min(_as_fast(spec, kept, fastest), key=lambda c: (c[1].device_bytes, -_run_rate(spec, c[0], c[2])))


# How far apart two estimated speeds must be before the planner believes the faster one. The speed model's
# strategy factors missed what the development CPU measured by 2-10% (SPLIT_EFFICIENCY's comment: the fused loss
# modelled 0.97x, measured median 0.986x; the chunked loss modelled about 0.94x, measured 1.002x; 2 and 4 pieces
# modelled 0.97x / 0.94x, measured 1.068x / 1.007x), and its GPU factors are not measured at all. Within this
# share of the fastest plan's speed, the plan with the most headroom is chosen (issue #16: standard CE's 7.9 GiB of
# logits for a 2% estimated gain over chunked CE is memory left on the table).
SPEED_MODEL_ERROR = 0.05


def _as_fast(spec: RunSpec, fitting, fastest) -> list:
    """The fitting plans within SPEED_MODEL_ERROR of `fastest` that differ from it only in strategies whose cost
    is speed alone (checkpointing, the loss, optimizer in backward): not in precision (numbers), offloading (host
    memory), compile (compile time) or the last resorts."""
    def kind(s: Strategies):
        return (s.precision, s.compile, s.activation_offloading, s.micro_batch_split, s.optimizer_state,
                s.fsdp_cpu_offload, s.bf16_stochastic_rounding)

    floor = (1 - SPEED_MODEL_ERROR) * _run_rate(spec, fastest[0], fastest[2])
    return [c for c in fitting if kind(c[0]) == kind(fastest[0]) and _run_rate(spec, c[0], c[2]) >= floor]


def why_not_chosen(spec: RunSpec, strategies: Strategies, tokens_per_s: float, chosen: Strategies,
                   chosen_tokens_per_s: float) -> str:
    """A short note for an alternative that fits and is estimated faster than the chosen plan: why `_choose` passed
    it over (for the alternatives table; the strategy lines give the long form)."""
    if strategies.precision == "bf16" and chosen.precision != "bf16" and spec.memory.precision == "auto" \
            and _bf16_lossy(spec):
        return "bf16: loses updates" if _bf16_drops_updates(spec) else "bf16: loses decay"
    if strategies.compile and spec.train.steps is None:
        return "compile: length unknown"
    if strategies.compile and _run_rate(spec, strategies, tokens_per_s) < chosen_tokens_per_s:
        return f"{_run_rate(spec, strategies, tokens_per_s):,.0f}/s w/ compile"
    return "not chosen (strategies above)"


def _warnings(spec: RunSpec, hw: HardwareProfile, strategies: Strategies, budget: int) -> tuple[str, ...]:
    """What the chosen plan runs that the user should know about: slow or lossy precisions, an oversized budget."""
    warnings = []
    if strategies.precision == "fp16" and hw.device == "cpu":
        warnings.append(f"memory.precision = 'fp16' on {hw.name}: {FP16_CPU_REASON}")
    if strategies.precision in ("bf16", "mixed-bf16") and not hw.bf16_compute:
        warnings.append(f"memory.precision = {strategies.precision!r}: {hw.name} has no native bf16 arithmetic, so "
                        "bf16 compute is emulated and very slow there; fp32 would be faster")
    if strategies.precision == "bf16" and not strategies.bf16_stochastic_rounding:
        # auto chose plain bf16 only because nothing else fitted (see `_choose`)
        only_fit = "; no mixed-bf16 or fp32 plan fits this budget" if spec.memory.precision == "auto" else ""
        if _bf16_drops_updates(spec):
            warnings.append(f"memory.precision = 'bf16' with optimizer.lr = {spec.optimizer.lr:g} (below "
                            f"{BF16_MIN_LR:.1e}): {BF16_LOST_UPDATES_REASON}{only_fit}")
        if _bf16_drops_decay(spec):
            warnings.append(f"{_decay_lost(spec)}. Use mixed-bf16, or memory.strategies.bf16_stochastic_rounding = "
                            f"'on' (optimizer.kind = 'adamw'){only_fit}")
    if spec.memory.budget is not None and (note := decimal_unit_note(spec.memory.budget)):
        warnings.append(f"memory.budget = {note}")
    if budget > hw.memory_bytes:
        warnings.append(
            f"memory.budget = {spec.memory.budget} is more than {hw.name}'s {format_bytes(hw.memory_bytes)}"
        )
    return tuple(warnings)


def trainable_shapes(spec: RunSpec, cfg: ModelConfig) -> tuple[list[tuple[int, ...]], Trainable]:
    """Shapes of the tensors that train (every parameter, or the adapters) and the estimator's view of them."""
    shapes = param_shapes(cfg)
    method = spec.method
    if isinstance(method, Full):
        return list(shapes.values()), FULL
    out = []
    for i in range(cfg.n_layers):
        for target in method.targets:
            out += adapter_shapes(cfg, target, i, method.rank, isinstance(method, Dora))
    return out, Trainable(full=False, adapted=tuple(method.targets), rank=method.rank,
                          dropout=method.dropout > 0, dora=isinstance(method, Dora))


def nf4_scaler_block_size(cfg: ModelConfig, block_size: int, world_size: int = 1) -> int:
    """The largest scaler block (256, 128, ..., 1) for which torchao can quantize every projection to NF4.

    torchao needs each weight's element count to be a multiple of block_size x scaler_block_size. Sharded over
    `world_size` processes (FSDP2 splits an NF4 weight's rows, and with them its codes, scales and scale
    factors, into equal parts: torchao's `aten.split` for NF4Tensor) each part must hold whole scaler blocks, and
    the row count must divide evenly. Full-size models get 256 on any usual process count; a model this small
    that it does not may quantize slightly differently on W processes than on one.
    """
    shapes = {s for n, s in param_shapes(cfg).items() if len(s) == 2 and n.startswith("layers.")}
    numels = {d_out * d_in for d_out, d_in in shapes}
    uneven = sorted(d_out for d_out, _ in shapes if d_out % world_size)
    if uneven:
        raise PlanError(
            f"method.kind = 'qlora' on {world_size} processes: FSDP2 splits each NF4 weight's rows evenly, and "
            f"this model has projections with {uneven[0]} rows, not a multiple of {world_size}. Use a process "
            "count that divides every projection's rows, or method.kind = 'lora'"
        )
    for scaler in (256, 128, 64, 32, 16, 8, 4, 2, 1):
        if all(n % (block_size * scaler * world_size) == 0 for n in numels):
            return scaler
    per = f" on {world_size} processes (each holding 1/{world_size} of every weight)" if world_size > 1 else ""
    raise PlanError(
        f"method.quant_block_size = {block_size} does not divide every projection of this model{per} "
        f"(element counts {sorted(numels)[:4]}...); use 64 or a smaller power of two"
    )


def _check_weights(model_dir) -> None:
    """The checkpoint's safetensors headers, read and checked against the files' sizes before a run is planned."""
    from lowmem.nn.hf import check_weight_files  # imports torch; only for a model on disk

    try:
        check_weight_files(model_dir)
    except (ValueError, FileNotFoundError) as err:
        raise PlanError(str(err)) from None


def resolve_model(spec: RunSpec) -> ModelConfig:
    """The model's config: a preset (vocab following a tokenizer lowmem trains) or a local config.json."""
    if spec.model.preset is not None:
        try:
            cfg = preset(spec.model.preset)
        except ValueError as err:
            raise PlanError(f"model.preset: {err}") from None
        tok = spec.data.resolved_tokenizer(None)
        if isinstance(tok, TrainTokenizer):
            return msgspec.structs.replace(cfg, vocab_size=tok.vocab_size)
        return msgspec.structs.replace(cfg, vocab_size=_tokenizer_vocab(tok.path))
    try:  # a directory, or an `org/name` repo in the local HF cache
        config_path = resolve_model_dir(spec.model.path) / "config.json"
    except ValueError as err:
        raise PlanError(str(err)) from None
    try:
        raw = json.loads(config_path.read_text())
    except FileNotFoundError:
        raise PlanError(
            f"model.path = {spec.model.path!r}: no config.json there; point it at a Hugging Face model "
            "directory (with config.json and *.safetensors)"
        ) from None
    except json.JSONDecodeError as err:
        raise PlanError(f"{config_path}: not valid JSON ({err})") from None
    try:
        cfg = ModelConfig.from_hf_config(raw, source=str(config_path))
    except (ValueError, msgspec.ValidationError) as err:
        raise PlanError(str(err)) from None
    _check_weights(config_path.parent)
    try:
        tok = spec.data.resolved_tokenizer(str(config_path.parent))
    except ValueError as err:
        raise PlanError(str(err)) from None
    vocab = _tokenizer_vocab(tok.path)
    if vocab > cfg.vocab_size:
        raise PlanError(
            f"the tokenizer {tok.path!r} has {vocab} tokens but the model's vocab_size is {cfg.vocab_size}; "
            "use the tokenizer that came with the model"
        )
    return cfg


def _tokenizer_vocab(path: str) -> int:
    """The vocab size of the tokenizer file or model directory `path` (any kind load_tokenizer reads)."""
    from lowmem.data.tokenizer import load_tokenizer

    try:
        return load_tokenizer(path).vocab_size
    except (ValueError, OSError) as err:
        raise PlanError(f"data.tokenizer.path = {path!r}: {err}") from None


def _check_supported(spec: RunSpec) -> None:
    """Refuse what this version cannot run: a method, optimizer or precision not in it, strategies forced on
    that it lacks, and strategies forced on together that cannot work together (checked in this order)."""
    _check_method(spec)
    _check_in_backward(spec)
    _check_available(spec)
    _check_combinations(spec)
    if spec.memory.precision not in ("auto", *AVAILABLE_PRECISIONS):
        raise PlanError(
            f"memory.precision = {spec.memory.precision!r} is not available in this version yet; "
            f"use one of auto, {', '.join(AVAILABLE_PRECISIONS)}"
        )


def _check_method(spec: RunSpec) -> None:
    """The method and its targets must be ones this version has."""
    if not isinstance(spec.method, SUPPORTED_METHODS):
        raise PlanError(
            f"method.kind = {spec.method.__struct_config__.tag!r} is not available in this version yet; "
            "use method.kind = 'full'"
        )
    if isinstance(spec.method, (Lora, Dora, QLora)) and "output" in spec.method.targets:
        raise PlanError(
            "method.targets: 'output' is not available yet (the output projection feeds the loss as a plain "
            f"matrix); choose from {', '.join(TARGETS)}"
        )


def _check_in_backward(spec: RunSpec) -> None:
    """A forced optimizer_in_backward needs every gradient of the step at once: no accumulation, no clipping."""
    if spec.memory.strategies.optimizer_in_backward != "on":
        return
    if spec.train.grad_accum > 1:
        raise PlanError(
            f"memory.strategies.optimizer_in_backward = 'on' cannot work with train.grad_accum = "
            f"{spec.train.grad_accum}: the step inside backward would run before the other micro-batches' "
            "gradients arrive. Set train.grad_accum = 1 (raise train.micro_batch instead) or turn it 'off'"
        )
    if spec.train.clip_grad_norm > 0:
        raise PlanError(
            f"memory.strategies.optimizer_in_backward = 'on' cannot work with train.clip_grad_norm = "
            f"{spec.train.clip_grad_norm}: global-norm clipping needs every gradient before any step. Set "
            "train.clip_grad_norm = 0 or turn optimizer_in_backward 'off'"
        )


def _check_available(spec: RunSpec) -> None:
    """One loss, an optimizer this version has, and no strategy forced on that this version lacks."""
    strategies = spec.memory.strategies
    if strategies.chunked_cross_entropy == "on" and strategies.fused_cross_entropy == "on":
        raise PlanError(
            "memory.strategies.chunked_cross_entropy and memory.strategies.fused_cross_entropy are both 'on'; "
            "they are two ways of computing the same loss: turn one of them to 'auto' or 'off'"
        )
    if not isinstance(spec.optimizer, SUPPORTED_OPTIMIZERS):
        raise PlanError(
            f"optimizer.kind = {spec.optimizer.__struct_config__.tag!r} is not available in this version yet; use "
            "optimizer.kind = 'adamw', 'sgd', 'adafactor', 'adamw8bit' or 'adamw4bit'"
        )
    for name, info in CATALOGUE.items():
        if name != "precision" and getattr(strategies, name) == "on" and not info.available:
            raise PlanError(
                f"memory.strategies.{name} = 'on': {info.unavailable_reason}; set it to 'auto' or 'off'"
            )


def _check_combinations(spec: RunSpec) -> None:
    """Strategies forced on must apply to the spec and not exclude one another."""
    strategies = spec.memory.strategies
    if strategies.low_bit_optimizer == "on" and not isinstance(spec.optimizer, AdamW):
        raise PlanError(
            f"memory.strategies.low_bit_optimizer = 'on' applies to optimizer.kind = 'adamw' (its states kept in "
            f"8 bits), not {spec.optimizer.__struct_config__.tag!r}: choose optimizer.kind = 'adamw8bit' or "
            "'adamw4bit' directly, or set low_bit_optimizer to 'auto'"
        )
    if strategies.micro_batch_split == "on" and spec.train.micro_batch == 1:
        raise PlanError(
            "memory.strategies.micro_batch_split = 'on' with train.micro_batch = 1: one row cannot be split; "
            "raise train.micro_batch (and lower train.grad_accum to keep the step) or set it to 'auto'"
        )
    if strategies.micro_batch_split == "on" and strategies.optimizer_in_backward == "on":
        raise PlanError(
            "memory.strategies.micro_batch_split and optimizer_in_backward are both 'on': a step inside backward "
            "would run before the other pieces' gradients arrive; turn one of them to 'auto' or 'off'"
        )
    if spec.memory.precision == "fp16" and strategies.optimizer_in_backward == "on":
        raise PlanError(
            "memory.precision = 'fp16' cannot work with memory.strategies.optimizer_in_backward = 'on': fp16's loss "
            "scaling must skip a step whose gradients overflow, but the in-backward optimizer has already stepped. "
            "Use memory.precision = 'mixed-bf16' (no loss scaling) or turn optimizer_in_backward 'off'"
        )


# Why a strategy or method cannot run under FSDP2 in this version (lowmem.train.distributed)
FSDP_IN_BACKWARD_REASON = ("its per-parameter hooks step on the local gradient before FSDP's reduce-scatter has "
                           "summed the other processes' gradients")
FSDP_LOW_BIT_REASON = "bitsandbytes' 8-bit AdamW is not tested on sharded (DTensor) parameters"


def _check_distributable(spec: RunSpec, world_size: int) -> None:
    """Refuse, for `world_size` > 1 processes, a spec forcing what cannot run sharded with FSDP2."""
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise PlanError(f"world_size = {world_size!r}: the number of processes must be a positive integer")
    if world_size == 1:
        return
    toggles = spec.memory.strategies
    problems = [
        (toggles.optimizer_in_backward == "on", f"memory.strategies.optimizer_in_backward = 'on': "
         f"{FSDP_IN_BACKWARD_REASON}; set it to 'auto' or 'off'"),
        (toggles.low_bit_optimizer == "on", f"memory.strategies.low_bit_optimizer = 'on': {FSDP_LOW_BIT_REASON}; "
         "set it to 'auto' or 'off'"),
        (not isinstance(spec.optimizer, AdamW | SGD), f"optimizer.kind = {spec.optimizer.__struct_config__.tag!r} "
         "is not tested on sharded (DTensor) parameters; use 'adamw' or 'sgd'"),
    ]
    reasons = [why for bad, why in problems if bad]
    if reasons:
        raise PlanError(f"planning for {world_size} processes (FSDP2): " + "; ".join(reasons)
                        + ". Or plan for one process (--nproc 1, no torchrun).")


def _check_fsdp_offload(spec: RunSpec, hw: HardwareProfile, world_size: int) -> None:
    """A forced fsdp_cpu_offload needs a CUDA device and several processes."""
    if spec.memory.strategies.fsdp_cpu_offload != "on":
        return
    if hw.device == "cpu":
        raise PlanError(f"memory.strategies.fsdp_cpu_offload = 'on' on {hw.name}: {FSDP_OFFLOAD_CPU_REASON}. Set it "
                        "to 'auto' or 'off' (or plan for a CUDA device with --hardware)")
    if world_size == 1:
        raise PlanError("memory.strategies.fsdp_cpu_offload = 'on' for one process: lowmem shards with FSDP2 only "
                        "under torchrun. Plan for N processes (lowmem plan --nproc N, torchrun --nproc_per_node N), "
                        "or set it to 'auto' or 'off' (activation_offloading and optimizer.offload work in one)")


def _why_no_stochastic_rounding(spec: RunSpec, hw: HardwareProfile, world_size: int) -> str:
    """Why bf16_stochastic_rounding cannot run for this spec ("" if it can): see its catalogue entry."""
    if not isinstance(spec.optimizer, AdamW):
        return f"optimizer.kind = {spec.optimizer.__struct_config__.tag!r}: it is torchao's AdamW, so it needs 'adamw'"
    if spec.optimizer.offload:
        return "optimizer.offload = true: the host optimizer is torch's AdamW, which rounds to nearest"
    if world_size > 1:
        return f"not under FSDP ({world_size} processes): torchao's rounding step is not tested on sharded weights here"
    if _cannot_compile(hw):
        return "its step runs through torch.compile, whose CPU backend needs a C++ compiler (none on PATH)"
    return ""


def _check_stochastic_rounding(spec: RunSpec, hw: HardwareProfile, world_size: int) -> None:
    """A forced bf16_stochastic_rounding needs pure bf16 and an AdamW it can run in."""
    if spec.memory.strategies.bf16_stochastic_rounding != "on":
        return
    if spec.memory.precision not in ("bf16", "auto"):
        raise PlanError(f"memory.strategies.bf16_stochastic_rounding = 'on' with memory.precision = "
                        f"{spec.memory.precision!r}: it rounds bf16 weights, and only pure bf16 keeps its weights in "
                        "bf16. Set memory.precision = 'bf16', or the strategy to 'auto'")
    why = _why_no_stochastic_rounding(spec, hw, world_size)
    if why:
        raise PlanError(f"memory.strategies.bf16_stochastic_rounding = 'on': {why}. Set it to 'auto' or 'off'")


def _shardable(strategies: Strategies) -> bool:
    """Whether a candidate can run under FSDP2: no step inside backward, no 8-bit states."""
    return not strategies.optimizer_in_backward and strategies.optimizer_state == "full"


def _cannot_compile(hw: HardwareProfile) -> bool:
    """Whether torch.compile cannot build here: inductor on this CPU needs a C++ compiler. A named profile is
    another machine, whose compiler cannot be checked from here (assumed present)."""
    return (hw.device == "cpu" and hw.name.startswith("local")
            and not any(shutil.which(cxx) for cxx in ("g++", "c++", "clang++")))


def _check_compile(spec: RunSpec, hw: HardwareProfile) -> None:
    """A forced compile must be able to run: inductor on this CPU needs a C++ compiler."""
    if spec.memory.strategies.compile == "on" and _cannot_compile(hw):
        raise PlanError(
            "memory.strategies.compile = 'on': torch.compile's inductor backend builds C++ kernels on CPU and no "
            "C++ compiler (g++, c++ or clang++) is on PATH. Install one (e.g. apt-get install g++) or set "
            "memory.strategies.compile = 'off'"
        )


def _check_offload(spec: RunSpec, hw: HardwareProfile, world_size: int) -> None:
    """Refuse a forced activation offloading, or a host optimizer (`optimizer.offload`), where it cannot run."""
    toggles = spec.memory.strategies
    if toggles.activation_offloading == "on" and hw.device == "cpu":
        raise PlanError(
            f"memory.strategies.activation_offloading = 'on' on {hw.name}: {OFFLOAD_CPU_REASON}. Set it to 'auto' "
            "or 'off' (activation_checkpointing is what saves activation memory on a CPU), or plan for a CUDA "
            "device (--hardware h100-80gb)"
        )
    if toggles.activation_offloading == "on" and world_size > 1:
        raise PlanError(
            f"memory.strategies.activation_offloading = 'on' with {world_size} processes (FSDP2): "
            f"{OFFLOAD_FSDP_REASON}. Set it to 'auto' or 'off', or plan for one process"
        )
    optimizer = spec.optimizer
    if not (isinstance(optimizer, AdamW) and optimizer.offload):
        return
    problems = [
        (hw.device == "cpu", f"{hw.name} is a CPU: torchao's CPUOffloadOptimizer moves the optimizer from a CUDA "
         "device to the host, and there it is already; set optimizer.offload = false or plan for a CUDA device "
         "(--hardware h100-80gb)"),
        (world_size > 1, f"it serves a single GPU, not {world_size} processes (FSDP2 shards the optimizer state "
         "instead); set optimizer.offload = false"),
        (toggles.optimizer_in_backward == "on", "memory.strategies.optimizer_in_backward = 'on' cannot step "
         "inside backward on the device when the host steps after it; turn one of them off"),
        (toggles.low_bit_optimizer == "on", "memory.strategies.low_bit_optimizer = 'on' would run bitsandbytes' "
         "8-bit AdamW on the device instead; the host keeps full-precision states (host memory is the cheap "
         "kind), so set low_bit_optimizer to 'auto' or 'off'"),
        (optimizer.offload_gradients and spec.train.grad_accum > 1, f"optimizer.offload_gradients = true frees "
         f"each device gradient once copied, so with train.grad_accum = {spec.train.grad_accum} the next "
         "micro-batch's gradient cannot add to it; set train.grad_accum = 1 (raise train.micro_batch instead) "
         "or optimizer.offload_gradients = false"),
        (optimizer.offload_gradients and toggles.micro_batch_split == "on", "optimizer.offload_gradients = true "
         "frees each device gradient once copied, so memory.strategies.micro_batch_split = 'on' cannot add the "
         "pieces' gradients; set micro_batch_split to 'auto' or 'off', or offload_gradients = false"),
    ]
    reasons = [why for bad, why in problems if bad]
    if reasons:
        raise PlanError("optimizer.offload = true: " + "; ".join(reasons))


def _pinned_host_budgets(spec: RunSpec, hw: HardwareProfile, precisions: tuple[str, ...],
                         trainable: list[tuple[int, ...]]) -> dict[str, int]:
    """The pinned host bytes left for offloaded activations, for each precision the host optimizer's copies fit.

    The pinned limit is HOST_PINNED_SHARE of the host's RAM. A host optimizer (`optimizer.offload`) takes its
    copies and states from it first. If they fit no precision, the spec cannot run here.
    """
    pinned = int(HOST_PINNED_SHARE * hw.host_ram_bytes)
    need = {p: sum(c.bytes for c in host_optimizer_components(spec.optimizer, trainable, weight_bytes(p)))
            for p in precisions}
    budgets = {p: pinned - n for p, n in need.items() if n <= pinned}
    if not budgets:
        raise PlanError(
            f"optimizer.offload = true: the host copies, gradients and AdamW states need at least "
            f"{format_bytes(min(need.values()))} of pinned memory, more than {HOST_PINNED_SHARE:.0%} of {hw.name}'s "
            f"{format_bytes(hw.host_ram_bytes)} of RAM; set optimizer.offload = false or train fewer parameters "
            "(method.kind = 'lora')"
        )
    return budgets


def _bf16_drops_updates(spec: RunSpec) -> bool:
    """Whether pure bf16 weights would round away most of this run's updates (`BF16_MIN_LR`)."""
    return spec.optimizer.lr < BF16_MIN_LR


def _bf16_drops_decay(spec: RunSpec) -> bool:
    """Whether pure bf16 weights would round away every step of decoupled weight decay (`BF16_DECAY_MIN`)."""
    opt = spec.optimizer
    return isinstance(opt, AdamW | AdamW8bit | AdamW4bit | Adafactor) and 0 < opt.lr * opt.weight_decay < BF16_DECAY_MIN


def _bf16_lossy(spec: RunSpec) -> bool:
    """Whether pure bf16 rounding to nearest would lose the run's updates or its weight decay."""
    return _bf16_drops_updates(spec) or _bf16_drops_decay(spec)


def _decay_lost(spec: RunSpec) -> str:
    opt = spec.optimizer
    return (f"optimizer.weight_decay = {opt.weight_decay:g} has no effect in pure bf16: each step scales the weights "
            f"by 1 - lr x weight_decay = 1 - {opt.lr * opt.weight_decay:.1e}, which rounds back to 1 (bf16 rounds "
            f"away any relative change below {BF16_DECAY_MIN:.1e})")


def _auto_precisions(hw: HardwareProfile) -> tuple[str, ...]:
    """What `precision = auto` may choose on `hw`: 16-bit compute only where the device runs it fast.

    bf16 and mixed-bf16 need native bf16 arithmetic (emulated it is hundreds of times slower); fp16 only on a GPU
    without bf16 (pre-Ampere), where it is the fast 16-bit type: elsewhere mixed-bf16 is as fast without loss
    scaling, and on CPU fp16 is slower than fp32 (`FP16_CPU_REASON`).
    """
    if hw.bf16_compute:
        return ("fp32", "bf16", "mixed-bf16")
    return ("fp32", "fp16") if hw.device == "cuda" else ("fp32",)


def _run_rate(spec: RunSpec, strategies: Strategies, tokens_per_s: float) -> float:
    """Tokens per second over the whole run: compile time counted against the run's tokens (when known)."""
    if not strategies.compile:
        return tokens_per_s
    if spec.train.steps is None:  # length known only from the data: compile cannot be shown to pay
        return 0.0
    tokens = spec.train.steps * spec.train.micro_batch * spec.train.grad_accum * spec.train.seq_len
    return tokens / (tokens / tokens_per_s + COMPILE_SECONDS_PER_BLOCK)


def _candidates(spec: RunSpec, cfg: ModelConfig, hw: HardwareProfile, world_size: int,
                trainable: list[tuple[int, ...]]) -> list[Strategies]:
    precisions = _auto_precisions(hw) if spec.memory.precision == "auto" else (spec.memory.precision,)
    if spec.memory.strategies.optimizer_in_backward == "on":
        precisions = tuple(p for p in precisions if p != "fp16")
    host_budgets = _pinned_host_budgets(spec, hw, precisions, trainable)
    precisions = tuple(p for p in precisions if p in host_budgets)
    toggles = spec.memory.strategies
    ckpt = {"auto": ("off", *partial_checkpointing(cfg.n_layers), "selective", "full"), "on": ("full",),
            "off": ("off",)}[toggles.activation_checkpointing]
    if toggles.fused_cross_entropy == "on":
        losses = ("fused",)
    elif toggles.chunked_cross_entropy == "on":
        losses = ("chunked",)
    else:
        losses = ("standard",) + tuple(
            kind for kind, toggle in (("chunked", toggles.chunked_cross_entropy), ("fused", toggles.fused_cross_entropy))
            if toggle == "auto"
        )
    nf4 = {}
    if isinstance(spec.method, QLora):
        nf4 = {"nf4_block_size": spec.method.quant_block_size,
               "nf4_scaler_block_size": nf4_scaler_block_size(cfg, spec.method.quant_block_size, world_size)}
    in_backward_allowed = (spec.train.grad_accum == 1 and spec.train.clip_grad_norm == 0
                           and not _host_optimizer(spec))
    in_backward = {"on": (True,), "off": (False,), "auto": (False, True) if in_backward_allowed else (False,)}[
        toggles.optimizer_in_backward]
    compile_ = {"on": (True,), "off": (False,), "auto": (False, True)}[toggles.compile]
    offload_allowed = hw.device == "cuda" and world_size == 1  # _check_offload refused a forced "on" elsewhere
    offloading = {"on": (True,), "off": (False,), "auto": (False, True) if offload_allowed else (False,)}[
        toggles.activation_offloading]

    def offload(on: bool, precision: str) -> dict[str, int | bool]:
        return {"activation_offloading": on, "offload_min_bytes": OFFLOAD_MIN_BYTES if on else 0,
                "offload_max_host_bytes": host_budgets[precision] if on else 0}

    rounding = {"on": True, "off": False, "auto": _bf16_lossy(spec)}[toggles.bf16_stochastic_rounding] \
        and not _why_no_stochastic_rounding(spec, hw, world_size)
    allocator = host_allocator(spec, hw)  # the same for every candidate (it looks for the built library once)

    return [
        Strategies(precision=p, activation_checkpointing=c, cross_entropy=ce, optimizer_in_backward=ob,
                   compile=co, **offload(of, p), **nf4, bf16_stochastic_rounding=rounding and p == "bf16",
                   **device_kernels(p, hw, cfg), host_allocator=allocator)
        for p, c, ce, ob, co, of in itertools.product(precisions, ckpt, losses, in_backward, compile_, offloading)
        # fp16 must be able to skip a step; selective checkpointing needs the aten ops a compiled block hides
        if not (p == "fp16" and ob) and not (co and c == "selective")
    ]


def partial_checkpointing(n_layers: int) -> tuple[str, ...]:
    """The checkpointing values between off and full the planner weighs: the first n blocks for n of about a
    quarter, a half and three quarters of the blocks, and all but the last (none below 4 blocks).

    The first n rather than every k-th: the same recompute, so the same speed, and never more memory. Backward
    meets the blocks after the last checkpointed one first and frees what they saved before any recompute; with
    every-k the recompute of a late block runs beside the activations of the blocks below it."""
    if n_layers < 4:
        return ()
    counts = sorted({math.ceil(n_layers * share) for share in (0.25, 0.5, 0.75)} | {n_layers - 1})
    return tuple(f"first-{n}" for n in counts if 0 < n < n_layers)


def device_kernels(precision: str, hw: HardwareProfile, cfg) -> dict[str, str]:
    """The attention kernel and the vocabulary projection's dtype a precision runs with on `hw`.

    CPU: SDPA with the document mask, and the projection in fp32 (as every CPU plan before). CUDA: flash
    varlen over the packed documents (never T x T) where the blocks compute in bf16/fp16, else the
    memory-efficient kernel (fp32 compute, or attention logit soft-capping, which flash cannot apply); the
    projection in the compute dtype, its logits upcast to fp32 inside the loss's chunks.
    """
    if hw.device != "cuda":
        return {"attention_kernel": "sdpa", "projection_dtype": "fp32"}
    half = {"bf16": "bf16", "mixed-bf16": "bf16", "fp16": "fp16"}.get(precision)
    if cfg.attn_logit_softcap is not None:
        kernel = "sdpa"  # soft-capped scores: neither CUDA kernel applies them (lowmem.nn.llama.forward)
    else:
        kernel = "varlen" if half else "sdpa-efficient"
    return {"attention_kernel": kernel, "projection_dtype": half or "fp32"}


def host_allocator(spec: RunSpec, hw: HardwareProfile) -> str:
    """What a plan's tensors are allocated from: lowmem's caching allocator on a CPU where it can be built
    (lowmem.hostmem; a named profile is another machine, assumed able to, as for compile), else torch's
    default. A forced `on` that cannot be built here is refused by `_check_host_allocator`."""
    toggle = spec.memory.strategies.host_caching_allocator
    if hw.device != "cpu" or toggle == "off":
        return "system"
    return "caching" if toggle == "on" or not _cannot_build_host_allocator(hw) else "system"


def _cannot_build_host_allocator(hw: HardwareProfile) -> bool:
    return hw.name.startswith("local") and not hostmem.available()


def _check_host_allocator(spec: RunSpec, hw: HardwareProfile) -> None:
    """A forced host_caching_allocator needs a CPU plan and a machine that can build it."""
    if spec.memory.strategies.host_caching_allocator != "on":
        return
    if hw.device != "cpu":
        raise PlanError("memory.strategies.host_caching_allocator = 'on' is for CPU runs: on CUDA torch's own "
                        "caching allocator holds the tensors. Set it to 'auto'")
    if _cannot_build_host_allocator(hw):
        raise PlanError("memory.strategies.host_caching_allocator = 'on': it is built on first use and needs Linux "
                        "and a C++ compiler (g++ or clang++, found as $CXX or c++), and none was found. Install "
                        "one, or set it to 'auto' or 'off'")


HOST_ALLOCATOR_REASONS = {
    "caching": "lowmem's caching allocator (lowmem.hostmem): freed tensors of 1 MiB or more are kept per size "
               "class and reused, so RSS stays near the live tensors and no page is faulted in twice",
    "system": "torch's default allocator (glibc), whose heap keeps what a step frees (the heap_retained line)",
}


def _explain_host_allocator(spec: RunSpec, hw: HardwareProfile, strategies: Strategies) -> Decision:
    """The host allocator a CPU plan runs with, and why (fixed on CUDA)."""
    value = "on" if strategies.host_allocator == "caching" else "off"
    toggle = spec.memory.strategies.host_caching_allocator
    if hw.device != "cpu":
        reason, source = "CUDA tensors live in torch's caching allocator", "fixed"
    elif toggle != "auto":
        reason, source = "forced by memory.strategies.host_caching_allocator: " + HOST_ALLOCATOR_REASONS[
            strategies.host_allocator], "user"
    elif value == "off":
        reason, source = "no C++ compiler to build lowmem's caching allocator: " + HOST_ALLOCATOR_REASONS[
            "system"], "fixed"
    else:
        reason, source = HOST_ALLOCATOR_REASONS["caching"], "auto"
    return Decision(strategy="host_caching_allocator", value=value, source=source, reason=reason)


def micro_batch_splits(micro_batch: int) -> list[int]:
    """The ways to split a micro-batch into equal pieces, smallest first (2, 3, 4, ... up to one row each)."""
    return [k for k in range(2, micro_batch + 1) if micro_batch % k == 0]


def _tiers(spec: RunSpec, base: list[Strategies], fsdp_offload: bool = False) -> list[list[Strategies]]:
    """Candidate groups in order of preference: the planner takes the fastest fitting plan of the first group
    that has one. `on` skips the groups without the strategy; `off` drops the groups with it. FSDP's CPU
    offload (where `fsdp_offload` allows it) comes after everything else: all the groups again, with it."""
    toggles = spec.memory.strategies
    offload = {"on": [True], "off": [False], "auto": [False, True]}[toggles.fsdp_cpu_offload] if fsdp_offload \
        else [False]
    return [[msgspec.structs.replace(s, fsdp_cpu_offload=True) for s in tier] if on else tier
            for on in offload for tier in _exact_then_last_resorts(spec, base)]


def _exact_then_last_resorts(spec: RunSpec, base: list[Strategies]) -> list[list[Strategies]]:
    """`_tiers` without FSDP's offload: exact strategies, then micro-batch splits, then 8-bit states."""
    toggles = spec.memory.strategies
    # offloaded gradients are freed on the device once copied: the pieces' gradients could not add up there
    splits = [] if toggles.micro_batch_split == "off" or _offloads_gradients(spec) else (
        micro_batch_splits(spec.train.micro_batch))
    states = ["full"] if (toggles.low_bit_optimizer == "off" or not isinstance(spec.optimizer, AdamW)
                          or _host_optimizer(spec)) else (["8bit"] if toggles.low_bit_optimizer == "on" else
                                                          ["full", "8bit"])
    tiers = []
    for state in states:
        # bitsandbytes' 8-bit AdamW has no stochastic rounding
        with_state = [msgspec.structs.replace(s, optimizer_state=state, bf16_stochastic_rounding=(
            s.bf16_stochastic_rounding and state == "full")) for s in base]
        if toggles.micro_batch_split != "on":
            tiers.append(with_state)
        # one piece at a time has no use for a step inside backward (it needs the whole step's gradients)
        tiers += [[msgspec.structs.replace(s, micro_batch_split=k) for s in with_state if not s.optimizer_in_backward]
                  for k in splits]
    return [t for t in tiers if t]


def _host_optimizer(spec: RunSpec) -> bool:
    """Whether the optimizer steps on the host (`optimizer.offload`, torchao's CPUOffloadOptimizer)."""
    return isinstance(spec.optimizer, AdamW) and spec.optimizer.offload


def _offloads_gradients(spec: RunSpec) -> bool:
    """Whether device gradients are freed once copied to a host optimizer (`optimizer.offload_gradients`)."""
    return _host_optimizer(spec) and spec.optimizer.offload_gradients


def _nothing_fits(spec: RunSpec, budget: int, usable: int, candidates, sharing: int = 1) -> str:
    """The error when no candidate fits; `sharing` processes split the budget (torchrun on one CPU)."""
    smallest = min(candidates, key=lambda c: c[1].device_bytes)
    memory, s = smallest[1], smallest[0]
    need = int(memory.device_bytes * sharing / (1 - spec.memory.safety_margin)) + 1
    # on CUDA the need is nvidia-smi's view: say how much of it is the tensors
    runtime = ("the process's runtime and allocator" if any(c.name == "runtime" for c in memory.overheads)
               else "the CUDA runtime")
    beside = (f"; {format_bytes(memory.peak_bytes)} of tensors, the rest what {runtime} adds"
              if memory.overheads else "")
    return (
        f"nothing fits memory.budget = {format_bytes(budget)} ({format_bytes(usable)} usable after the "
        f"{spec.memory.safety_margin:.0%} safety margin" + (f", per process of {sharing}" if sharing > 1 else "")
        + f"). The smallest plan (precision {s.precision}, "
        f"activation checkpointing {s.activation_checkpointing}) needs {format_bytes(memory.device_bytes)} "
        f"at its peak ({memory.peak_phase}{beside}). Set memory.budget to at least {_size_rounded_up(need)}, or "
        f"lower train.micro_batch ({spec.train.micro_batch}) or train.seq_len ({spec.train.seq_len})."
    )


def _size_rounded_up(n_bytes: int) -> str:
    """A size for a budget: like format_bytes, but rounded up so that the figure shown is enough."""
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n_bytes >= scale:
            return f"{math.ceil(n_bytes / scale * 100) / 100:.2f} {unit}"
    return f"{n_bytes} B"


# strategies `_explain` gives a decision of their own; the catalogue's others are unavailable in this version
EXPLAINED = ("precision", "activation_checkpointing", "activation_offloading", "chunked_cross_entropy",
             "fused_cross_entropy", "optimizer_in_backward", "compile", "micro_batch_split", "low_bit_optimizer",
             "fsdp_cpu_offload", "bf16_stochastic_rounding", "host_caching_allocator")


def _explain(spec: RunSpec, hw: HardwareProfile, chosen, candidates, usable: int,
             world_size: int = 1) -> tuple[Decision, ...]:
    """Every strategy's decision for the chosen candidate: its value, who set it, and why, against its rivals."""
    strategies = chosen[0]

    def others(field: str):
        return Rivals([c for c in candidates if getattr(c[0], field) != getattr(strategies, field)], chosen)

    ckpt_forced = spec.memory.strategies.activation_checkpointing != "auto"
    decisions = [
        _explain_precision(spec, hw, strategies, others("precision"), usable),
        Decision(strategy="activation_checkpointing", value=strategies.activation_checkpointing,
                 source="user" if ckpt_forced else "auto",
                 reason="forced by memory.strategies.activation_checkpointing" if ckpt_forced else _why(
                     strategies, "activation_checkpointing", others("activation_checkpointing"), usable, hw, spec)),
        _explain_cross_entropy(spec, hw, strategies, others("cross_entropy"), usable),
        _explain_in_backward(spec, hw, strategies, others("optimizer_in_backward"), usable, world_size),
        _explain_compile(spec, hw, strategies, others("compile"), usable),
        _explain_offloading(spec, hw, strategies, others("activation_offloading"), usable, world_size),
        *(Decision(strategy=name, value="off", source="fixed", reason=info.unavailable_reason)
          for name, info in CATALOGUE.items() if name not in EXPLAINED),
        *_explain_last_resorts(spec, strategies, candidates, usable, world_size),
        _explain_fsdp_offload(spec, hw, strategies, candidates, usable, world_size),
        _explain_stochastic_rounding(spec, hw, strategies, candidates, usable, world_size),
        _explain_attention(hw, strategies),
        _explain_host_allocator(spec, hw, strategies),
        Decision(strategy="gradient_accumulation", value=str(spec.train.grad_accum), source="user",
                 reason=f"{spec.train.grad_accum} micro-batch(es) of {spec.train.micro_batch} x {spec.train.seq_len} "
                        "tokens per step; gradients normalized by the total count of target tokens"),
    ]
    return tuple(decisions)


def _explain_precision(spec: RunSpec, hw: HardwareProfile, strategies: Strategies, rivals, usable: int) -> Decision:
    """The precision decision: forced, or chosen by fit and speed (bf16 left out where it would lose updates)."""
    if spec.memory.precision != "auto":
        return Decision(strategy="precision", value=strategies.precision, source="user",
                        reason="forced by memory.precision")
    dropped = strategies.precision != "bf16" and _bf16_lossy(spec) and any(c[0].precision == "bf16" for c in rivals)
    if dropped:
        rivals = Rivals([c for c in rivals if c[0].precision != "bf16"], getattr(rivals, "chosen", None))
    reason = _why(strategies, "precision", rivals, usable, hw, spec)
    if dropped:
        why = (f"at optimizer.lr = {spec.optimizer.lr:g} (below {BF16_MIN_LR:.1e}): {BF16_LOST_UPDATES_REASON}"
               if _bf16_drops_updates(spec) else f"because {_decay_lost(spec)}")
        reason = "; ".join(r for r in (reason if rivals else "", f"bf16 is left out {why}") if r)
    return Decision(strategy="precision", value=strategies.precision, source="auto", reason=reason)


def _explain_cross_entropy(spec: RunSpec, hw: HardwareProfile, strategies: Strategies, rivals,
                           usable: int) -> Decision:
    """The loss: one decision over the chunked and fused toggles."""
    toggles = spec.memory.strategies
    forced = toggles.chunked_cross_entropy == "on" or toggles.fused_cross_entropy == "on"
    return Decision(
        strategy="cross_entropy", value=strategies.cross_entropy, source="user" if forced else "auto",
        reason="forced by memory.strategies" if forced else _why(strategies, "cross_entropy", rivals, usable, hw,
                                                                 spec),
    )


def _explain_in_backward(spec: RunSpec, hw: HardwareProfile, strategies: Strategies, rivals, usable: int,
                         world_size: int) -> Decision:
    """The optimizer_in_backward decision: forced, impossible here (why), or chosen by fit and speed."""
    if spec.memory.strategies.optimizer_in_backward != "auto":
        reason, source = "forced by memory.strategies.optimizer_in_backward", "user"
    elif world_size > 1:
        reason, source = f"not under FSDP ({world_size} processes): {FSDP_IN_BACKWARD_REASON}", "fixed"
    elif _host_optimizer(spec):
        reason, source = "optimizer.offload: the host steps after backward, once every gradient is there", "fixed"
    elif not (spec.train.grad_accum == 1 and spec.train.clip_grad_norm == 0):
        reason, source = ("needs train.grad_accum = 1 and train.clip_grad_norm = 0 (both need every gradient "
                          "before any step)"), "fixed"
    else:
        reason, source = _why(strategies, "optimizer_in_backward", rivals, usable, hw, spec), "auto"
    return Decision(strategy="optimizer_in_backward", value="on" if strategies.optimizer_in_backward else "off",
                    source=source, reason=reason)


def _explain_compile(spec: RunSpec, hw: HardwareProfile, strategies: Strategies, rivals, usable: int) -> Decision:
    """The compile decision: forced, or chosen by its rate over the whole run (compile time counted)."""
    value = "on" if strategies.compile else "off"
    if spec.memory.strategies.compile != "auto":
        return Decision(strategy="compile", value=value, source="user", reason="forced by memory.strategies.compile")
    return Decision(strategy="compile", value=value, source="auto",
                    reason=_why(strategies, "compile", rivals, usable, hw, spec)
                    + f"; compiling takes about {COMPILE_SECONDS_PER_BLOCK:.0f} s per distinct block graph")


ATTENTION_REASONS = {
    "sdpa": "scaled_dot_product_attention with the packed documents' (B, 1, T, T) mask",
    "varlen": "flash attention over the packed documents (torch.nn.attention.varlen): saves q, k, v, its output "
              "and the logsumexp, never a T x T tensor",
    "sdpa-efficient": "the memory-efficient SDPA kernel, pinned (fp32 compute, which flash cannot run): saves "
                      "its inputs, output and logsumexp, and one shared additive document mask",
}


def _explain_attention(hw: HardwareProfile, strategies: Strategies) -> Decision:
    """The attention kernel the plan runs and counts, with the projection dtype of the loss."""
    reason = ATTENTION_REASONS[strategies.attention_kernel]
    if hw.device == "cuda":
        reason += f"; the vocabulary projection in {strategies.projection_dtype}, its logits upcast in chunks"
    return Decision(strategy="attention_kernel", value=strategies.attention_kernel, source="fixed", reason=reason)


def _explain_offloading(spec: RunSpec, hw: HardwareProfile, strategies: Strategies, rivals, usable: int,
                        world_size: int) -> Decision:
    """The activation_offloading decision: never on a CPU or under FSDP (why), else forced or chosen by fit."""
    if hw.device == "cpu":
        reason, source = OFFLOAD_CPU_REASON, "fixed"
    elif world_size > 1:
        reason, source = f"not under FSDP ({world_size} processes): {OFFLOAD_FSDP_REASON}", "fixed"
    elif spec.memory.strategies.activation_offloading != "auto":
        reason, source = "forced by memory.strategies.activation_offloading", "user"
    else:
        reason, source = _why(strategies, "activation_offloading", rivals, usable, hw, spec), "auto"
    if strategies.activation_offloading:
        reason += (f"; saved tensors of {format_bytes(strategies.offload_min_bytes)} or more move to pinned host "
                   f"memory, at most {format_bytes(strategies.offload_max_host_bytes)} per forward")
    return Decision(strategy="activation_offloading", value="on" if strategies.activation_offloading else "off",
                    source=source, reason=reason)


def _explain_fsdp_offload(spec: RunSpec, hw: HardwareProfile, strategies: Strategies, candidates, usable: int,
                          world_size: int) -> Decision:
    """The fsdp_cpu_offload decision: never on a CPU or in one process (why), else forced or the last resort."""
    toggle = spec.memory.strategies.fsdp_cpu_offload
    if hw.device == "cpu":
        reason, source = FSDP_OFFLOAD_CPU_REASON, "fixed"
    elif world_size == 1:
        reason, source = "one process: lowmem shards with FSDP2 only under torchrun (plan with --nproc N)", "fixed"
    elif toggle != "auto":
        reason, source = "forced by memory.strategies.fsdp_cpu_offload", "user"
    elif not strategies.fsdp_cpu_offload:
        reason, source = "not needed: a plan with the shards on the device fits", "auto"
    else:
        smallest = min(c[1].device_bytes for c in candidates if not c[0].fsdp_cpu_offload)
        reason, source = (f"no plan with the shards on the device fits (the smallest needs "
                          f"{format_bytes(smallest)} > {format_bytes(usable)} usable): parameter, gradient and "
                          "optimizer-state shards go to host memory, the optimizer steps on the host"), "auto"
    return Decision(strategy="fsdp_cpu_offload", value="on" if strategies.fsdp_cpu_offload else "off",
                    source=source, reason=reason)


def _explain_stochastic_rounding(spec: RunSpec, hw: HardwareProfile, strategies: Strategies, candidates,
                                 usable: int, world_size: int) -> Decision:
    """The bf16_stochastic_rounding decision: only for pure bf16; auto below BF16_MIN_LR, where it is needed."""
    toggle = spec.memory.strategies.bf16_stochastic_rounding
    on = strategies.bf16_stochastic_rounding
    lr = spec.optimizer.lr
    why_not = _why_no_stochastic_rounding(spec, hw, world_size)
    if strategies.precision != "bf16":
        reason, source = f"only pure bf16 weights need it (precision is {strategies.precision})", "fixed"
    elif toggle != "auto":
        reason, source = "forced by memory.strategies.bf16_stochastic_rounding", "user"
    elif strategies.optimizer_state == "8bit":
        reason, source = "bitsandbytes' 8-bit AdamW rounds to nearest", "fixed"
    elif why_not:
        reason, source = why_not, "fixed"
    elif not on:
        reason, source = (f"not needed: at optimizer.lr = {lr:g} (at least {BF16_MIN_LR:.1e}) an update survives "
                          "bf16 rounding, and no weight decay is rounded away"), "auto"
    else:
        others = [c for c in candidates if c[0].precision != "bf16"]
        smallest = min((c[1].device_bytes for c in others), default=0)
        lost = (f"optimizer.lr = {lr:g} is below {BF16_MIN_LR:.1e}, where bf16 weights round most updates away"
                if _bf16_drops_updates(spec) else
                f"bf16 weights round away each step of weight decay (lr x weight_decay < {BF16_DECAY_MIN:.1e})")
        reason, source = (f"{lost}: each update is computed in fp32 and rounded up or down at random (torchao "
                          "_AdamW), so the weights move by it on average"
                          + (f"; mixed-bf16 and fp32 would not fit (at least {format_bytes(smallest)} > "
                             f"{format_bytes(usable)} usable)" if others and spec.memory.precision == "auto" else "")), "auto"
    if on and source == "user":
        reason += " (torchao _AdamW: fp32 update, stochastic rounding to bf16)"
    return Decision(strategy="bf16_stochastic_rounding", value="on" if on else "off", source=source, reason=reason)


def _explain_last_resorts(spec: RunSpec, strategies: Strategies, candidates, usable: int,
                          world_size: int = 1) -> list[Decision]:
    """Decisions for micro_batch_split and low_bit_optimizer, which `auto` uses only when nothing else fits."""
    toggles = spec.memory.strategies
    k, rows = strategies.micro_batch_split, spec.train.micro_batch
    whole = [c for c in candidates if c[0].micro_batch_split == 1]
    if toggles.micro_batch_split != "auto":
        split_reason, split_source = "forced by memory.strategies.micro_batch_split", "user"
    elif _offloads_gradients(spec):
        split_reason, split_source = ("optimizer.offload_gradients frees each device gradient once copied to the "
                                      "host, so the pieces' gradients could not add up"), "fixed"
    elif k == 1:
        split_reason, split_source = "not needed: a plan with whole micro-batches fits", "auto"
    else:
        smallest = min(c[1].device_bytes for c in whole) if whole else 0
        split_reason, split_source = (
            f"no plan with whole micro-batches of {rows} rows fits (the smallest needs {format_bytes(smallest)} > "
            f"{format_bytes(usable)} usable); {k} pieces of {rows // k} row(s), gradients accumulated, is the "
            "fewest that fits (the same step, up to float summation order)", "auto")
    decisions = [Decision(strategy="micro_batch_split", value=str(k), source=split_source, reason=split_reason)]
    state = strategies.optimizer_state
    if not isinstance(spec.optimizer, AdamW):
        reason, source = f"applies to optimizer.kind = 'adamw' only (this run: {spec.optimizer.__struct_config__.tag})", "fixed"
    elif spec.optimizer.offload:
        reason, source = "optimizer.offload keeps AdamW's states in host memory, at full precision", "fixed"
    elif toggles.low_bit_optimizer != "auto":
        reason, source = "forced by memory.strategies.low_bit_optimizer", "user"
    elif world_size > 1:
        reason, source = f"not under FSDP ({world_size} processes): {FSDP_LOW_BIT_REASON}", "fixed"
    elif state == "full":
        reason, source = "not needed: a plan with full-precision AdamW states fits", "auto"
    else:
        full = [c for c in candidates if c[0].optimizer_state == "full"]
        smallest = min(c[1].device_bytes for c in full) if full else 0
        reason, source = (
            f"no plan with full-precision AdamW states fits (the smallest needs {format_bytes(smallest)} > "
            f"{format_bytes(usable)} usable): AdamW runs as bitsandbytes AdamW8bit with the same hyper-parameters "
            "(moments in 8 bits: the updates change slightly)", "auto")
    decisions.append(Decision(strategy="low_bit_optimizer", value="on" if state == "8bit" else "off", source=source,
                              reason=reason))
    return decisions


class Rivals(list):
    """The candidates whose value of one strategy differs from the chosen plan's, with the chosen plan (`_why`)."""

    def __init__(self, items, chosen):
        super().__init__(items)
        self.chosen = chosen


def _why(strategies: Strategies, field: str, rivals, usable: int, hw: HardwareProfile, spec: RunSpec) -> str:
    value = getattr(strategies, field)
    chosen = getattr(rivals, "chosen", None)
    chosen_rate = _run_rate(spec, chosen[0], chosen[2]) if chosen else math.inf
    reasons = []
    for alt in dict.fromkeys(getattr(s, field) for s, _, _ in rivals):
        group = [r for r in rivals if getattr(r[0], field) == alt]
        fitting = [r for r in group if r[1].device_bytes <= usable]
        if fitting:
            best = max(fitting, key=lambda r: (_run_rate(spec, r[0], r[2]), r[2]))
            rate = _run_rate(spec, best[0], best[2])
            if rate > chosen_rate:  # the headroom rule of `_choose` kept a plan this close
                reasons.append(f"{_shown(field, alt)} is est. {rate / chosen_rate - 1:.0%} faster ({rate:,.0f} "
                               f"tokens/s), inside the speed model's {SPEED_MODEL_ERROR:.0%} error: the plan that "
                               f"close with the most headroom is kept ({format_bytes(chosen[1].device_bytes)} "
                               f"against {format_bytes(best[1].device_bytes)})")
                continue
            if best[0].compile and spec.train.steps is None:  # no run length to spread the compile time over
                reasons.append(f"{_shown(field, alt)} is not chosen (best that fits: est. {best[2]:,.0f} "
                               "tokens/s once compiled, before its compile time)")
                continue
            reasons.append(f"{_shown(field, alt)} is slower (best that fits: est. {rate:,.0f} tokens/s"
                           + (" over the run, compile time included)" if best[0].compile else ")"))
        else:
            low = min(r[1].device_bytes for r in group)
            reasons.append(f"{_shown(field, alt)} would not fit (at least {format_bytes(low)} > "
                           f"{format_bytes(usable)} usable)")
    if field == "precision" and value == "fp32" and not hw.bf16_compute:
        reasons.append(f"{hw.name} has no native bf16 arithmetic, so 16-bit compute is not considered"
                       + (f" ({FP16_CPU_REASON})" if hw.device == "cpu" else ""))
    if field == "compile" and value is False and spec.train.steps is None:
        reasons.append("the run's length is known only from the data, so compile time cannot be shown to pay")
    return "; ".join(dict.fromkeys(reasons)) or "the only option"


def _shown(field: str, value) -> str:
    if field in ("compile", "activation_offloading"):
        return f"{'offloading' if field == 'activation_offloading' else field} {'on' if value else 'off'}"
    return str(value)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


MAXIMIZABLE = {"batch": "micro_batch", "seq_len": "seq_len"}
# --maximize batch without the data's row count (data_rows=None): the search stops here and says so
MAX_MICRO_BATCH_SEARCHED = 1 << 16


def maximize(spec: RunSpec, what: str, hardware: HardwareProfile | str | None = None, world_size: int = 1,
             data_rows: int | None = None) -> Plan:
    """The plan with the largest micro-batch (`what="batch"`) or sequence length (`"seq_len"`) that fits.

    Searches by doubling, then bisection, over values that plan without error; the other fields of the spec are
    kept, and the strategies are chosen afresh for each candidate. A micro-batch is searched whole
    (micro_batch_split held at 1): split into k pieces it runs as k passes of 1/k of its rows, which is gradient
    accumulation under another name. It is capped by the data: one step (micro_batch x grad_accum x processes
    rows) takes at most `data_rows`, the training rows of the packed dataset (None: unknown, capped at
    MAX_MICRO_BATCH_SEARCHED). Sequence lengths are multiples of 64 up to the model's max_seq_len. The plan's
    last decision says which limit stopped the search.
    """
    if what not in MAXIMIZABLE:
        raise PlanError(f"--maximize {what!r}: choose one of {', '.join(MAXIMIZABLE)}")
    hw = hardware if isinstance(hardware, HardwareProfile) else resolve_hardware(hardware)
    field = MAXIMIZABLE[what]
    spec = _whole_micro_batches(spec) if field == "micro_batch" else spec
    step = 64 if field == "seq_len" else 1
    limit, limit_reason = _maximize_limit(spec, field, world_size, data_rows)
    refused: dict[int, int] = {}  # value -> the smallest plan's need, for the ones that did not fit

    def attempt(value: int) -> Plan | None:
        try:
            return plan(_with_train(spec, **{field: value * step}), hw, world_size)
        except NothingFits as err:
            refused[value] = err.need_bytes
            return None

    best = attempt(1)
    if best is None:
        return plan(_with_train(spec, **{field: step}), hw, world_size)
    low, high = 1, 2
    while high <= limit and (p := attempt(high)) is not None:
        best, low, high = p, high, high * 2
    high = min(high, limit + 1)
    while high - low > 1:  # low fits, high does not (or is past the limit)
        mid = (low + high) // 2
        p = attempt(mid)
        if p is None:
            high = mid
        else:
            best, low = p, mid
    if low == limit:
        reason = limit_reason
    else:
        need = refused[low + 1]
        reason = (f"the largest that fits: at {(low + 1) * step:,} the smallest plan needs {format_bytes(need)}, "
                  f"{format_bytes(need - best.usable_bytes)} more than the {format_bytes(best.usable_bytes)} usable")
    decisions = tuple(WHOLE_MICRO_BATCHES if d.strategy == "micro_batch_split" and field == "micro_batch" else d
                      for d in best.decisions)
    decision = Decision(strategy=f"train.{field}", value=str(low * step), source="auto",
                        reason=f"--maximize {what}: {reason}")
    return msgspec.structs.replace(best, decisions=decisions + (decision,))


WHOLE_MICRO_BATCHES = Decision(
    strategy="micro_batch_split", value="1", source="fixed",
    reason="--maximize batch searches whole micro-batches: k pieces of a micro-batch are k passes of 1/k of its "
           "rows, gradient accumulation under another name")


def _with_train(spec: RunSpec, **fields) -> RunSpec:
    return msgspec.structs.replace(spec, train=msgspec.structs.replace(spec.train, **fields))


def _whole_micro_batches(spec: RunSpec) -> RunSpec:
    """The spec with micro_batch_split off (`maximize`), refusing a spec that forces it on."""
    if spec.memory.strategies.micro_batch_split == "on":
        raise PlanError("--maximize batch with memory.strategies.micro_batch_split = 'on': a micro-batch split into "
                        "pieces is gradient accumulation under another name, so there is no largest one; set "
                        "micro_batch_split to 'auto' (the search holds it at 1) or raise train.grad_accum instead")
    toggles = msgspec.structs.replace(spec.memory.strategies, micro_batch_split="off")
    return msgspec.structs.replace(spec, memory=msgspec.structs.replace(spec.memory, strategies=toggles))


def _maximize_limit(spec: RunSpec, field: str, world_size: int, data_rows: int | None) -> tuple[int, str]:
    """The largest value (in steps of 64 for seq_len) `maximize` may try, and what to say when it stops there."""
    if field == "seq_len":
        cap = resolve_model(spec).max_seq_len
        return cap // 64, f"stopped at the model's max_seq_len ({cap:,}), not by the budget"
    if data_rows is None:
        return MAX_MICRO_BATCH_SEARCHED, (f"stopped at the search's cap of {MAX_MICRO_BATCH_SEARCHED:,} rows (the "
                                          "data's row count was not known: `lowmem data prepare SPEC` says why), not by the budget")
    per_row = spec.train.grad_accum * world_size
    cap = max(1, data_rows // per_row)
    return cap, (f"capped by the data, not by the budget: its {data_rows:,} training rows of {spec.train.seq_len:,} "
                 f"tokens (packed, less data.eval_rows) make one step of at most {cap:,} rows x "
                 f"{spec.train.grad_accum} accumulation" + (f" x {world_size} processes" if world_size > 1 else ""))
