"""`lowmem plan --png`: the memory breakdown of the chosen plan beside its main alternatives, as a PNG."""

from pathlib import Path

from lowmem.plan.estimate import estimate_memory, with_overheads
from lowmem.plan.planner import trainable_shapes
from lowmem.plan.structs import Plan

COLORS = {"parameters": "#4c72b0", "gradients": "#dd8452", "optimizer_state": "#55a868", "activations": "#c44e52",
          "logits": "#8172b3", "batch": "#937860", "temporaries": "#da8bc3",
          # what the CUDA runtime adds beside the tensors (MemoryReport.overheads), in greys
          "cublas_workspace": "#8c8c8c", "allocator_slack": "#b0b0b0", "cuda_context": "#606060",
          "nccl_buffers": "#d0d0d0", "runtime": "#707070", "heap_retained": "#a0a0a0"}
MAX_ALTERNATIVES = 5


def write_memory_chart(p: Plan, path: str | Path) -> None:
    """Stacked horizontal bars (GiB) per component for the chosen plan and up to 5 faster-or-smaller rivals; on
    CUDA with the overhead lines, so that a bar's end is what nvidia-smi would show."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("--png needs matplotlib: pip install 'lowmem[plot]'") from None
    cfg = p.model
    shapes, trains = trainable_shapes(p.spec, cfg)
    rivals = sorted((a for a in p.alternatives if not a.chosen), key=lambda a: -a.tokens_per_s)[:MAX_ALTERNATIVES]
    rows = [("chosen", p.strategies, p.tokens_per_s)] + [("", a.strategies, a.tokens_per_s) for a in rivals]
    fig, ax = plt.subplots(figsize=(10, 1.2 + 0.6 * len(rows)))
    biggest = max([p.memory.device_bytes] + [a.device_bytes or a.peak_bytes for a in rivals])
    unit, scale = ("GiB", 1024**3) if biggest >= 1024**3 else ("MiB", 1024**2)
    for y, (tag, strategies, tps) in enumerate(reversed(rows)):
        report = with_overheads(estimate_memory(cfg, strategies, p.spec.train, p.spec.optimizer, shapes, trains,
                                                     world_size=p.world_size, device=p.hardware.device),
                                     p.hardware, p.world_size)
        left = 0.0
        for c in report.components + report.overheads:
            ax.barh(y, c.bytes / scale, left=left, color=COLORS[c.name], label=c.name if y == len(rows) - 1 else None)
            left += c.bytes / scale
        label = (f"{tag + ': ' if tag else ''}{strategies.precision}, ckpt {strategies.activation_checkpointing}, "
                 f"{strategies.cross_entropy} CE" + (", opt-in-bwd" if strategies.optimizer_in_backward else "")
                 + f"  ({tps:,.0f} tok/s)")
        ax.text(left, y, f" {left:,.1f}", va="center", fontsize=8)
        ax.annotate(label, (0, y + 0.32), fontsize=8)
    budget = p.usable_bytes / scale
    if budget <= 2 * biggest / scale:
        ax.axvline(budget, color="black", linestyle="--", linewidth=1)
        ax.text(budget, len(rows) - 0.4, " usable budget", fontsize=8)
    else:  # far off to the right: say so instead of squashing the bars
        ax.set_xlim(0, biggest / scale * 1.3)
        ax.text(0.99, 0.02, f"usable budget {budget:,.0f} {unit} (off scale)", transform=ax.transAxes,
                ha="right", fontsize=8)
    ax.set_yticks([])
    ax.set_xlabel(f"{unit} at the predicted peak")
    ax.set_title(f"{p.spec.name}: {p.spec.model.preset or p.spec.model.path} on {p.hardware.name}")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
