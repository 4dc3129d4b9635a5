"""A plan as people read it: decisions, a per-component memory table and a stacked bar."""

from lowmem.plan.estimate import HOST_PINNED_SHARE
from lowmem.plan.structs import Plan
from lowmem.spec.units import format_bytes

BAR_WIDTH = 60
# one fill character per component, so the stacked bar reads without colour
FILL = {"parameters": "P", "gradients": "G", "optimizer_state": "O", "activations": "A", "logits": "L",
        "batch": "b", "temporaries": "t", "cublas_workspace": "w", "allocator_slack": "s", "cuda_context": "x",
        "nccl_buffers": "n", "runtime": "r", "heap_retained": "h"}


MAX_ALTERNATIVES_SHOWN = 12

def render_plan(p: Plan) -> str:
    """The plan as a terminal report."""
    cfg, spec, hw = p.model, p.spec, p.hardware
    lines = [
        f"lowmem plan · {spec.name}",
        f"  model      {spec.model.preset or spec.model.path}: {p.n_params / 1e6:,.2f}M parameters "
        f"({cfg.n_layers} layers, dim {cfg.dim}, vocab {cfg.vocab_size:,}), {p.n_trainable / 1e6:,.2f}M trainable",
        f"  method     {_method(spec)}, optimizer {spec.optimizer.__struct_config__.tag}",
        f"  batch      {spec.train.micro_batch} x {spec.train.seq_len} tokens x {spec.train.grad_accum} accumulation "
        + (f"x {p.world_size} processes " if p.world_size > 1 else "")
        + f"= {p.tokens_per_step:,} tokens/step, "
        + (f"{p.total_steps} steps" if p.total_steps else f"{spec.train.epochs} epochs"),
        f"  hardware   {hw.name} ({hw.device}, {format_bytes(hw.memory_bytes)}), host RAM "
        f"{format_bytes(hw.host_ram_bytes)} (--host-ram), at most {HOST_PINNED_SHARE:.0%} of it pinned",
        f"  budget     {format_bytes(p.budget_bytes)}, {format_bytes(p.usable_bytes)} usable "
        f"({spec.memory.safety_margin:.0%} margin)" + _per_process(p),
        "",
        "strategies",
    ]
    width = max(len(d.strategy) for d in p.decisions)
    for d in p.decisions:
        lines.append(f"  {d.strategy:<{width}}  {d.value:<8} [{d.source}] {d.reason}")
    lines += _memory_lines(p)
    if p.memory.host:
        lines += ["", "pinned host memory (beside the device's)"]
        for c in p.memory.host:
            lines.append(f"  {c.name:<16} {format_bytes(c.bytes):>12}  {c.note}")
    lines += ["", "  " + stacked_bar(p), "  " + _legend(p), ""]
    lines.append(f"estimated speed  {p.tokens_per_s:,.0f} tokens/s on {hw.name}")
    if len(p.alternatives) > 1:
        lines += ["", "alternatives considered"]
        ranked = sorted(p.alternatives, key=lambda a: -a.tokens_per_s)
        # the chosen plan, and the fastest others: the rest are in `lowmem plan --json`
        shown = [a for a in ranked if a.chosen] + [a for a in ranked if not a.chosen][:MAX_ALTERNATIVES_SHOWN]
        for a in sorted(shown, key=lambda a: -a.tokens_per_s):
            mark = "*" if a.chosen else ("fits" if a.fits else "over")
            s = a.strategies
            extra = (f" split {s.micro_batch_split}" if s.micro_batch_split > 1 else "") + (
                " 8-bit AdamW" if s.optimizer_state == "8bit" else "") + (
                " offloaded" if s.activation_offloading else "")
            lines.append(f"  {mark:>4}  precision {s.precision:<10} checkpointing {s.activation_checkpointing:<9} "
                         f"loss {s.cross_entropy:<8} opt-in-bwd {'on ' if s.optimizer_in_backward else 'off'} "
                         f"compile {'on ' if s.compile else 'off'}{extra} "
                         f"{format_bytes(a.device_bytes or a.peak_bytes):>12}  {a.tokens_per_s:>10,.0f} tokens/s")
        if len(ranked) > len(shown):
            lines.append(f"        ... and {len(ranked) - len(shown)} more (lowmem plan --json lists every one)")
    for w in p.warnings:
        lines.append(f"warning: {w}")
    return "\n".join(lines)


def _memory_lines(p: Plan) -> list[str]:
    """The memory table: components at the peak, then on CUDA the overhead lines and the nvidia-smi total."""
    m = p.memory
    scope = f", per process, {p.world_size} processes" if p.world_size > 1 else ""
    lines = ["", f"memory at peak ({m.peak_phase}{scope})"]
    for c in m.components:
        share = c.bytes / m.peak_bytes if m.peak_bytes else 0
        lines.append(f"  {c.name:<16} {format_bytes(c.bytes):>12}  {share:6.1%}  {c.note}")
    if m.overheads:  # what the runtime holds beside the tensors, each line with its source
        lines.append(f"  {'tensors':<16} {format_bytes(m.peak_bytes):>12}  {'':6}  live at the peak")
        lines += [f"  {c.name:<16} {format_bytes(c.bytes):>12}  {'':6}  {c.note}" for c in m.overheads]
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
