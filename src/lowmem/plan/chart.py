"""`lowmem plan --png`: the memory breakdown of the chosen plan beside its nearest alternatives, as a PNG.

Two panels share the rows: the device's memory by component with the usable budget as a line, and the pinned host
memory each plan fills beside it (offloaded activations, a host optimizer, FSDP's CPU offload). Each row is named
on the axis, left of its bars, by what sets it apart from the others, so no label covers a bar and no two agree.
"""

from pathlib import Path

from lowmem.plan.estimate import HOST_PINNED_SHARE, estimate_memory, with_overheads
from lowmem.plan.planner import trainable_shapes
from lowmem.plan.structs import Alternative, MemoryReport, Plan, Strategies, run_optimizer

COLORS = {"parameters": "#4c72b0", "gradients": "#dd8452", "optimizer_state": "#55a868", "activations": "#c44e52",
          "logits": "#8172b3", "batch": "#937860", "temporaries": "#da8bc3",
          # what the CUDA runtime adds beside the tensors (MemoryReport.overheads), in greys
          "cublas_workspace": "#8c8c8c", "allocator_slack": "#b0b0b0", "cuda_context": "#606060",
          "nccl_buffers": "#d0d0d0", "runtime": "#707070", "heap_retained": "#a0a0a0",
          "allocator_cache": "#b8b8b8"}
MAX_ALTERNATIVES = 5
# the device axis runs to this much past the largest of the chosen plan, the budget and the rows drawn whole
X_ROOM = 1.15
# a row is drawn whole when it is within this factor of the larger of the chosen plan and the budget; past it, its
# bar is cut at the axis' end and its size written there (`--maximize batch` rivals run to thousands of GiB)
NEAR = 2.0


def write_memory_chart(p: Plan, path: str | Path) -> None:
    """The chart of `memory_figure` as a PNG."""
    plt = _pyplot()
    fig = memory_figure(p)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("--png needs matplotlib: pip install 'lowmem[plot]'") from None
    return plt


def chart_rows(p: Plan) -> list[tuple[str, Alternative]]:
    """(label, alternative) for the chosen plan and its nearest rivals in device memory, fastest first.

    Nearest: the rivals whose device bytes are closest to the chosen plan's (those a user would trade for it), at
    most MAX_ALTERNATIVES. Each label names the fields in which the rows differ, and tokens/s.
    """
    chosen = next((a for a in p.alternatives if a.chosen), None) or Alternative(
        strategies=p.strategies, peak_bytes=p.memory.peak_bytes, tokens_per_s=p.tokens_per_s, fits=True,
        chosen=True, device_bytes=p.memory.device_bytes)
    rivals = [a for a in p.alternatives if not a.chosen]
    rivals.sort(key=lambda a: abs(_device(a) - _device(chosen)))
    rows = sorted([chosen] + rivals[:MAX_ALTERNATIVES], key=lambda a: -a.tokens_per_s)
    differing = _differing_fields([a.strategies for a in rows])
    labels = [_label(a, differing) for a in rows]
    # distinct strategies differ in a labelled field: equal labels would be a defect here
    assert len(set(labels)) == len(labels), f"chart rows with equal labels: {labels}"
    return list(zip(labels, rows, strict=True))


def _device(a: Alternative) -> int:
    return a.device_bytes or a.peak_bytes


def _differing_fields(strategies: list[Strategies]) -> list[str]:
    fields = [f for f in Strategies.__struct_fields__ if len({getattr(s, f) for s in strategies}) > 1]
    return fields or ["precision"]


SHORT = {"precision": "", "activation_checkpointing": "ckpt ", "cross_entropy": "CE ", "micro_batch_split": "split ",
         "optimizer_state": "optimizer ", "attention_kernel": "attention ", "projection_dtype": "projection "}


# the strategies that make a plan fit by moving or splitting memory, named on every row that uses one
FITTING = {"activation_offloading": lambda s: "activations offloaded", "fsdp_cpu_offload": lambda s: "FSDP CPU offload",
           "micro_batch_split": lambda s: f"split {s.micro_batch_split}",
           "optimizer_state": lambda s: f"optimizer {s.optimizer_state}"}


def _label(a: Alternative, fields: list[str]) -> str:
    """What sets this row apart: each differing field's value (booleans by name), then its tokens/s."""
    s = a.strategies
    parts = []
    used = {"activation_offloading": s.activation_offloading, "fsdp_cpu_offload": s.fsdp_cpu_offload,
            "micro_batch_split": s.micro_batch_split > 1, "optimizer_state": s.optimizer_state != "full"}
    parts += [FITTING[f](s) for f in FITTING if used[f] and f not in fields]  # what made it fit, on every row
    for f in fields:
        value = getattr(s, f)
        if isinstance(value, bool):
            parts.append(f.replace("_", " ") if value else f"no {f.replace('_', ' ')}")
        elif f in ("offload_min_bytes", "offload_max_host_bytes", "nf4_block_size", "nf4_scaler_block_size"):
            continue  # these follow the booleans above
        else:
            parts.append(f"{SHORT.get(f, f + ' ')}{value}")
    mark = "chosen: " if a.chosen else ("" if a.fits else "over: ")
    return f"{mark}{', '.join(parts)}\n{a.tokens_per_s:,.0f} tokens/s"


def _report(p: Plan, strategies: Strategies) -> MemoryReport:
    shapes, trains = trainable_shapes(p.spec, p.model)
    optimizer = run_optimizer(p.spec.optimizer, strategies)
    report = estimate_memory(p.model, strategies, p.spec.train, optimizer, shapes, trains, world_size=p.world_size,
                             device=p.hardware.device)
    return with_overheads(report, p.hardware, p.world_size, strategies.host_allocator)


def memory_figure(p: Plan):
    """The matplotlib Figure: device memory by component per row, with the usable budget; host memory beside."""
    plt = _pyplot()
    rows = chart_rows(p)
    reports = [p.memory if a.chosen else _report(p, a.strategies) for _, a in rows]
    host = [sum(c.bytes for c in r.host) for r in reports]
    fig, (ax, host_ax) = plt.subplots(1, 2, figsize=(12, 2.2 + 0.7 * len(rows)), sharey=True,
                                      gridspec_kw={"width_ratios": [3, 1]})
    shown = [r.device_bytes for r, (_, a) in zip(reports, rows, strict=True)
             if a.chosen or r.device_bytes <= NEAR * max(p.memory.device_bytes, p.usable_bytes)]
    top = max(shown + [p.usable_bytes]) * X_ROOM
    unit, scale = ("GiB", 1024**3) if top >= 1024**3 else ("MiB", 1024**2)
    ys = list(range(len(rows)))[::-1]  # the fastest on top
    for y, report in zip(ys, reports, strict=True):
        _draw_device_row(ax, y, report, top / scale, scale)
    ax.axvline(p.usable_bytes / scale, color="black", linestyle="--", linewidth=1, label="usable budget")
    ax.set_xlim(0, top / scale)
    ax.set_yticks(ys, [label for label, _ in rows], fontsize=8)
    for tick, (_, a) in zip(ax.get_yticklabels(), rows, strict=True):
        tick.set_fontweight("bold" if a.chosen else "normal")
    ax.set_xlabel(f"device {unit} at the predicted peak" + (" (as nvidia-smi shows it)" if p.memory.overheads else ""))
    ax.set_title(f"{p.spec.name}: {p.spec.model.preset or p.spec.model.path} on {p.hardware.name}", fontsize=10)
    _draw_host_panel(host_ax, ys, host, p)
    handles, names = ax.get_legend_handles_labels()
    # below both panels, where it covers no bar
    fig.legend(handles, names, loc="lower center", ncol=min(len(names), 6), fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.35 / (1 + 0.35 * len(rows)) + 0.03 * (len(names) > 6), 1, 1))
    return fig


def _draw_device_row(ax, y: int, report: MemoryReport, x_max: float, scale: float) -> None:
    """One row's stacked components, cut at `x_max`, with its total written just past the bar's end."""
    left = 0.0
    for c in report.components + report.overheads:
        width = min(c.bytes / scale, max(x_max - left, 0.0))
        ax.barh(y, width, left=left, color=COLORS[c.name], label=c.name if c.name not in _labels(ax) else None)
        left += c.bytes / scale
    total = report.device_bytes / scale
    if total <= x_max:
        ax.text(total, y, f" {total:,.1f}", va="center", ha="left", fontsize=8)
    else:  # cut: the size at the axis' end, inside the panel
        ax.text(x_max, y, f"{total:,.0f} →", va="center", ha="right", fontsize=8, color="white",
                fontweight="bold")


def _labels(ax) -> set[str]:
    return set(ax.get_legend_handles_labels()[1])


def _draw_host_panel(ax, ys: list[int], host: list[int], p: Plan) -> None:
    """Pinned host memory per row (what made a plan fit by moving tensors off the device), against its limit."""
    top = max(host + [1])
    unit, scale = ("GiB", 1024**3) if top >= 1024**3 else ("MiB", 1024**2)
    for y, n_bytes in zip(ys, host, strict=True):
        ax.barh(y, n_bytes / scale, color="#999999")
        ax.text(n_bytes / scale, y, f" {n_bytes / scale:,.1f}", va="center", ha="left", fontsize=8)
    limit = HOST_PINNED_SHARE * p.hardware.host_ram_bytes / scale
    ax.set_xlim(0, max(top / scale * 1.4, 1.0))
    if limit <= ax.get_xlim()[1]:
        ax.axvline(limit, color="black", linestyle=":", linewidth=1)
    ax.set_title(f"pinned host memory, {unit}", fontsize=9)
    ax.set_xlabel(f"at most {HOST_PINNED_SHARE:.0%} of {p.hardware.host_ram_bytes / 1024**3:,.0f} GiB of RAM",
                  fontsize=8)
    ax.tick_params(axis="y", left=False)
