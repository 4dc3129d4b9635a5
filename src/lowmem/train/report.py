"""`lowmem report`: a run's curves as one PNG (loss and eval loss, learning rate, tokens/s)."""

from pathlib import Path


def write_run_chart(records: list[dict], path: str | Path, title: str = "") -> None:
    """Three panels over optimizer steps: train/eval loss, learning rate, throughput."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("lowmem report needs matplotlib for its chart: pip install 'lowmem[plot]'") from None
    steps = [r["step"] for r in records]
    fig, (loss_ax, lr_ax, speed_ax) = plt.subplots(3, 1, figsize=(8, 8), sharex=True)
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
    speed_ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
