"""A plan as people read it: decisions, a per-component memory table and a stacked bar."""

import textwrap

import msgspec

from lowmem.plan.estimate import COMPILE_SECONDS_PER_BLOCK, HOST_PINNED_SHARE
from lowmem.plan.planner import why_not_chosen
from lowmem.plan.structs import Plan
from lowmem.spec.units import format_bytes

WIDTH = 100  # the widest line `render_plan` writes (issue #16: a newcomer's terminal)
BAR_WIDTH = 60
TAGS_LEGEND = "  [auto] the planner's choice  [fixed] the only option  [user] set in the spec  (more: --explain)"
# what the short notes of the alternatives table mean (`planner.why_not_chosen`)
NOTES_LEGEND = ("  notes: 'bf16: loses decay/updates': pure bf16 would round them away (see precision); 'N/s w/ compile':"
                f" est. tokens/s over the whole run, about {COMPILE_SECONDS_PER_BLOCK:.0f} s of compiling counted")
# one fill character per component, so the stacked bar reads without colour
FILL = {"parameters": "P", "gradients": "G", "optimizer_state": "O", "activations": "A", "logits": "L",
        "batch": "b", "temporaries": "t", "cublas_workspace": "w", "allocator_slack": "s", "cuda_context": "x",
        "nccl_buffers": "n", "runtime": "r", "heap_retained": "h",
        "allocator_cache": "c"}


MAX_ALTERNATIVES_SHOWN = 12

def render_plan(p: Plan, explain: bool = False) -> str:
    """The plan as a terminal report, every line within WIDTH columns. `explain`: every reason in full and what the
    abbreviations mean; by default each reason is cut to its first clauses (whole ones) and says so."""
    lines = _header(p) + ["", "strategies"] + _strategy_lines(p, explain)
    lines += _glossary(p) if explain else [TAGS_LEGEND]
    lines += _memory_lines(p)
    if p.memory.host:
        lines += ["", "pinned host memory (beside the device's)"]
        lines += [line for c in p.memory.host for line in _noted(f"  {c.name:<16} {format_bytes(c.bytes):>12}  ",
                                                                  c.note)]
    lines += ["", "  " + stacked_bar(p)] + _wrapped("  " + _legend(p), "  ") + [""]
    lines += _speed_lines(p)
    lines += _alternative_lines(p)
    lines += [line for w in p.warnings for line in _wrapped(f"warning: {w}", "  ")]
    return "\n".join(line for raw in lines for line in _wrapped(raw, " " * (len(raw) - len(raw.lstrip()) + 2)))


def _header(p: Plan) -> list[str]:
    cfg, spec, hw = p.model, p.spec, p.hardware
    return [
        f"lowmem plan · {spec.name}",
        f"  model      {spec.model.preset or spec.model.path}: {p.n_params / 1e6:,.2f}M parameters "
        f"({cfg.n_layers} layers, dim {cfg.dim}, vocab {cfg.vocab_size:,}), {p.n_trainable / 1e6:,.2f}M trainable",
        f"  method     {_method(spec)}, optimizer {spec.optimizer.__struct_config__.tag}",
        f"  batch      {spec.train.micro_batch} x {spec.train.seq_len} tokens x {spec.train.grad_accum} accumulation "
        + (f"x {p.world_size} processes " if p.world_size > 1 else "")
        + f"= {p.tokens_per_step:,} tokens/step, "
        + (f"{p.total_steps} steps" if p.total_steps else f"{spec.train.epochs} epochs"),
        f"  hardware   {hw.name} ({hw.device}, {format_bytes(hw.memory_bytes)}), host RAM "
        f"{format_bytes(hw.host_ram_bytes)} (--host-ram), at most {HOST_PINNED_SHARE:.0%} pinned",
        f"  budget     {format_bytes(p.budget_bytes)}, {format_bytes(p.usable_bytes)} usable "
        f"({spec.memory.safety_margin:.0%} margin)" + _per_process(p),
    ]


def _strategy_lines(p: Plan, explain: bool) -> list[str]:
    """One decision per line, its reason wrapped in the column after the tag (cut to whole clauses by default)."""
    width = max(len(d.strategy) for d in p.decisions)
    lines = []
    for d in p.decisions:
        prefix = f"  {d.strategy:<{width}}  {d.value:<10} {'[' + d.source + ']':<7} "
        reason = d.reason if explain else _short_reason(d.reason, WIDTH - len(prefix))
        lines += _noted(prefix, reason)
    return lines


def _short_reason(reason: str, width: int, max_lines: int = 2) -> str:
    """The reason's first clauses (split at top-level "; ") that fit in `max_lines` lines of `width`, never a cut
    clause; what is left out is counted and left to --explain."""
    clauses = _clauses(reason)
    kept = [clauses[0]]
    for clause in clauses[1:]:
        more = f" (+{len(clauses) - len(kept) - 1} more: --explain)" if len(clauses) > len(kept) + 1 else ""
        if len(textwrap.wrap("; ".join(kept + [clause]) + more, width)) > max_lines:
            break
        kept.append(clause)
    left = len(clauses) - len(kept)
    return "; ".join(kept) + (f" (+{left} more: --explain)" if left else "")


def _clauses(reason: str) -> list[str]:
    """`reason` split at the "; " that are outside parentheses."""
    clauses, depth, start = [], 0, 0
    for i, ch in enumerate(reason):
        depth += (ch == "(") - (ch == ")")
        if depth == 0 and reason.startswith("; ", i):
            clauses.append(reason[start:i])
            start = i + 2
    return clauses + [reason[start:]]


def _glossary(p: Plan) -> list[str]:
    """--explain: the tags, the abbreviations of the tables, and where the logits line's token count comes from."""
    rows = p.spec.train.micro_batch // p.strategies.micro_batch_split
    return [
        TAGS_LEGEND,
        "  first-n: blocks 0..n-1 keep only their input and are recomputed in backward, the later ones save "
        "everything (every-k, in older plans: blocks 0, k, 2k, ...); full: every block does; selective: every "
        "block keeps its input and its matmul and attention outputs and recomputes the elementwise ops",
        "  opt-in-bwd: optimizer_in_backward, each parameter stepped (and its gradient freed) as soon as backward "
        "makes its gradient",
        f"  logits: N tokens = the rows run at once x train.seq_len = {rows} x {p.spec.train.seq_len} = "
        f"{rows * p.spec.train.seq_len:,}; standard CE holds 3 fp32 (N, vocab) tensors at its peak: the "
        "log-probabilities, their gradient and the logits' gradient",
    ]


def _noted(prefix: str, note: str) -> list[str]:
    """`prefix` then `note`, the note wrapped in the column where it starts."""
    return textwrap.wrap(note, WIDTH, initial_indent=prefix, subsequent_indent=" " * len(prefix),
                         break_on_hyphens=False) or [prefix.rstrip()]


def _wrapped(line: str, indent: str) -> list[str]:
    """`line` as is when it fits in WIDTH, else wrapped at spaces with `indent` before each continuation."""
    if len(line) <= WIDTH:
        return [line]
    return textwrap.wrap(line, WIDTH, subsequent_indent=indent, break_on_hyphens=False, drop_whitespace=True)


def _speed_lines(p: Plan) -> list[str]:
    """Tokens/s (in total and per process under torchrun) and the run time they give."""
    hw = p.hardware
    line = f"estimated speed  {p.tokens_per_s:,.0f} tokens/s on {hw.name}"
    if p.world_size > 1:
        line += (f", in total over {p.world_size} processes ({p.tokens_per_s / p.world_size:,.0f} each"
                 + (", sharing its cores)" if hw.device == "cpu" else ", one device each)"))
    step_s = p.tokens_per_step / p.tokens_per_s
    compile_s = COMPILE_SECONDS_PER_BLOCK if p.strategies.compile else 0.0
    plus_compile = f" + about {_duration(compile_s)} to compile" if compile_s else ""
    if p.total_steps:
        run = (f"estimated run time  {p.total_steps:,} steps x {p.tokens_per_step:,} tokens / "
               f"{p.tokens_per_s:,.0f} tokens/s = {_duration(p.total_steps * step_s)}{plus_compile}")
        if compile_s:
            run += f" = {_duration(p.total_steps * step_s + compile_s)}"
    else:
        run = (f"estimated run time  {_duration(step_s)} per step of {p.tokens_per_step:,} tokens{plus_compile}; "
               f"the step count of {p.spec.train.epochs:g} epoch(s) is known once the data is prepared")
    return [line, run]


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def _alternative_lines(p: Plan) -> list[str]:
    """The chosen plan and the fastest others, with headers; a faster one that fits says why it was passed over."""
    if len(p.alternatives) <= 1:
        return []
    ranked = sorted(p.alternatives, key=lambda a: -a.tokens_per_s)
    # the chosen plan, and the fastest others: the rest are in `lowmem plan --json`
    shown = [a for a in ranked if a.chosen] + [a for a in ranked if not a.chosen][:MAX_ALTERNATIVES_SHOWN]
    shown.sort(key=lambda a: -a.tokens_per_s)
    others = {id(a): _extras(a.strategies) for a in shown}
    w = max(len(e) for e in others.values())
    other = f"{'other':<{w}} " if w else ""
    lines = ["", "alternatives considered, fastest first (fits / over: within the usable budget or not)",
             f"  {'':6} {'precision':<10} {'ckpt':<9} {'loss':<8} {'opt-in-bwd':<10} {'compile':<7} {other}"
             f"{'peak':>10} {'tokens/s':>9}"]
    for a in shown:
        s = a.strategies
        mark = "chosen" if a.chosen else ("fits" if a.fits else "over")
        row = (f"  {mark:>6} {s.precision:<10} {s.activation_checkpointing:<9} {s.cross_entropy:<8} "
               f"{'on' if s.optimizer_in_backward else 'off':<10} {'on' if s.compile else 'off':<7} "
               + (f"{others[id(a)]:<{w}} " if w else "")
               + f"{format_bytes(a.device_bytes or a.peak_bytes):>10} {a.tokens_per_s:>9,.0f}")
        note = _alternative_note(p, a)
        if not note:
            lines.append(row)
        elif len(row) + 2 + len(note) <= WIDTH:
            lines.append(f"{row}  {note}")
        else:  # on its own line under the row it belongs to
            lines += [row, f"{'':9}^ {note}"]
    if len(ranked) > len(shown):
        lines.append(f"  ... and {len(ranked) - len(shown)} more (lowmem plan --json lists every one)")
    if any(a.fits and not a.chosen and a.tokens_per_s > p.tokens_per_s for a in shown):
        lines += _wrapped(NOTES_LEGEND, "    ")
    return lines


def _extras(s) -> str:
    return " ".join(x for x in (f"split {s.micro_batch_split}" if s.micro_batch_split > 1 else "",
                                "8-bit" if s.optimizer_state == "8bit" else "",
                                "offloaded" if s.activation_offloading else "",
                                "fsdp-offload" if s.fsdp_cpu_offload else "") if x)


def _alternative_note(p: Plan, a) -> str:
    """The chosen row's mark, or for a faster row that fits, why it was passed over; a row that is the chosen plan
    with compile on says so."""
    if a.chosen:
        return "<- the plan"
    twin = msgspec.structs.replace(a.strategies, compile=not a.strategies.compile) == p.strategies
    label = f"the plan, compile {'on' if a.strategies.compile else 'off'}" if twin else ""
    if a.fits and a.tokens_per_s > p.tokens_per_s:
        why = why_not_chosen(p.spec, a.strategies, a.tokens_per_s, p.strategies, p.tokens_per_s)
        return f"{label}: {why}" if label else why
    return label


def _memory_lines(p: Plan) -> list[str]:
    """The memory table: components at the peak, then on CUDA the overhead lines and the nvidia-smi total."""
    m = p.memory
    scope = f", per process, {p.world_size} processes" if p.world_size > 1 else ""
    lines = ["", f"memory at peak ({m.peak_phase}{scope})"]
    for c in m.components:
        share = c.bytes / m.peak_bytes if m.peak_bytes else 0
        lines += _noted(f"  {c.name:<16} {format_bytes(c.bytes):>12}  {share:6.1%}  ", c.note)
    if m.overheads:  # what the runtime holds beside the tensors, each line with its source
        lines.append(f"  {'tensors':<16} {format_bytes(m.peak_bytes):>12}  {'':6}  live at the peak")
        lines += [line for c in m.overheads
                  for line in _noted(f"  {c.name:<16} {format_bytes(c.bytes):>12}  {'':6}  ", c.note)]
    lines.append(f"  {'total':<16} {format_bytes(m.device_bytes):>12}  {m.device_bytes / p.usable_bytes:6.1%} of "
                 "usable budget" + (_total_view(p) if m.overheads else ""))
    if m.overheads and p.hardware.device == "cuda":
        lines.append(f"  torch's view: max_memory_allocated {format_bytes(m.allocated_bytes)}, max_memory_reserved "
                     f"{format_bytes(m.reserved_bytes)}")
    return lines


def _total_view(p: Plan) -> str:
    # on a CPU: what the run adds to RSS once torch and lowmem are imported (about 257 MiB more here, torch 2.13)
    return ", as nvidia-smi shows the process" if p.hardware.device == "cuda" else ", the RSS the run adds to the imports'"


def _per_process(p: Plan) -> str:
    if p.world_size == 1:
        return ""
    if p.hardware.device == "cpu":
        return f" per process: {p.world_size} processes (FSDP2) share this machine's memory"
    return f" per process: {p.world_size} processes (FSDP2), one device each"


def _method(spec) -> str:
    m = spec.method
    tag = m.__struct_config__.tag
    if tag == "full":
        return "full fine-tuning"
    return f"{tag} (rank {m.rank}, alpha {m.alpha:g}, targets {' '.join(m.targets)})"


def stacked_bar(p: Plan, width: int = BAR_WIDTH) -> str:
    """One line: each component's (and CUDA overhead's) share of the usable budget as a run of its letter; '.' is
    headroom."""
    scale = width / max(p.usable_bytes, p.memory.device_bytes)
    bar = "".join(FILL[c.name] * round(c.bytes * scale) for c in p.memory.components + p.memory.overheads)
    bar = bar[:width]
    return "[" + bar + "." * (width - len(bar)) + "]"


def _legend(p: Plan) -> str:
    return "  ".join(f"{FILL[c.name]}={c.name}" for c in p.memory.components + p.memory.overheads if c.bytes) + (
        "  .=headroom")
