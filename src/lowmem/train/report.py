"""`lowmem report`: a run's curves as one PNG (loss and eval loss, learning rate, tokens/s, memory over time)."""

from pathlib import Path

MIB = 2**20


def write_run_chart(records: list[dict], path: str | Path, title: str = "", memory: dict | None = None) -> None:
    """Four panels over optimizer steps: train/eval loss, learning rate, throughput, memory.

    The memory panel shows the process's resident memory at each logged step (`rss_bytes`), the tracked tensor
    peak of the measured steps (`tensor_peak_bytes`) and, given the run's `memory.json` as `memory`, the plan's
    peak as a horizontal line. Runs logged before these fields existed get an empty memory panel.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("lowmem report needs matplotlib for its chart: pip install 'lowmem[plot]'") from None
    steps = [r["step"] for r in records]
    fig, (loss_ax, lr_ax, speed_ax, mem_ax) = plt.subplots(4, 1, figsize=(8, 10), sharex=True)
    loss_ax.plot(steps, [r["loss"] for r in records], label="train")
    evals = [r for r in records if "eval_loss" in r]
    if evals:
        loss_ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval")
    loss_ax.set_ylabel("loss (nats/token)")
    loss_ax.legend()
    loss_ax.set_title(title)
    lr_ax.plot(steps, [r["lr"] for r in records])
    lr_ax.set_ylabel("learning rate")
    speed_ax.plot(steps, [r["tokens_per_s"] for r in records])
    speed_ax.set_ylabel("tokens/s (running)")
    _memory_panel(mem_ax, records, memory)
    mem_ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _memory_panel(ax, records: list[dict], memory: dict | None) -> None:
    rss = [(r["step"], r["rss_bytes"] / MIB) for r in records if r.get("rss_bytes")]
    if rss:
        ax.plot(*zip(*rss, strict=True), label="process resident")
    tracked = [(r["step"], r["tensor_peak_bytes"] / MIB) for r in records if "tensor_peak_bytes" in r]
    if tracked:
        ax.plot(*zip(*tracked, strict=True), "o", label="tensor peak (measured steps)")
    if memory and memory.get("planned_peak_bytes"):
        ax.axhline(memory["planned_peak_bytes"] / MIB, linestyle="--", color="gray", label="planned tensor peak")
    ax.set_ylabel("memory (MiB)")
    if rss or tracked or memory:
        ax.legend(fontsize="small")
