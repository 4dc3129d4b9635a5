"""The optimization ladder (torchtune README style), measured, with the planner's prediction beside each row.

    python benchmarks/ladder.py            # quickstart-5m shapes on this CPU (a few minutes)
    python benchmarks/ladder.py --smoke    # tiny model, seconds (what CI runs)

Each row adds one strategy to the row above (as torchtune's ladder does), then LoRA and QLoRA branch off
the last full fine-tuning row. Then the planner chooses by itself (every strategy `auto`, precision kept) for
budgets of 100%, 50%, 30% and 20% of the baseline's planned peak: those rows show what it picked. Measured
memory is peak live tensor bytes (LiveTensorTracker) on CPU, or torch.cuda.max_memory_allocated on a GPU;
tokens/s is over the steps after the first two (memory-tracked) ones. Writes a Markdown table, JSON and (with
matplotlib) a PNG chart under benchmarks/results/.
"""

import argparse
import json
import platform
import tempfile
from pathlib import Path

import torch
from _spec import spec_text

from lowmem.plan import plan
from lowmem.spec import decode_spec, format_bytes
from lowmem.train import execute

# the ladder starts with these off and turns them on row by row
LADDER_OFF = ("activation_checkpointing", "chunked_cross_entropy", "fused_cross_entropy", "optimizer_in_backward")

# (row name, overrides added to everything above it)
LADDER = [
    ("baseline (packed, standard CE)", []),
    ("+ fused linear CE", ["memory.strategies.fused_cross_entropy=on"]),
    ("+ activation checkpointing", ["memory.strategies.activation_checkpointing=on"]),
    ("+ optimizer in backward", ["memory.strategies.optimizer_in_backward=on"]),
    ("+ 8-bit AdamW (bitsandbytes)", ["optimizer.kind=adamw8bit"]),
]
BRANCHES = [
    ("LoRA r=8 (all attention projections)", ["method.kind=lora"]),
    ("QLoRA r=8 (NF4 base)", ["method.kind=qlora"]),
]
# the planner's own choice, every strategy auto, at these fractions of the baseline's planned peak
AUTO_BUDGETS = (1.0, 0.5, 0.3, 0.2)
AUTO = [f"memory.strategies.{name}=auto" for name in LADDER_OFF]


def chosen(p) -> str:
    """The strategies a plan turned on, in a few words."""
    s = p.strategies
    parts = [s.precision]
    if s.activation_checkpointing != "off":
        parts.append(f"ckpt {s.activation_checkpointing}")
    if s.cross_entropy != "standard":
        parts.append(f"{s.cross_entropy} CE")
    if s.optimizer_in_backward:
        parts.append("opt-in-bwd")
    if s.compile:
        parts.append("compile")
    if s.micro_batch_split > 1:
        parts.append(f"micro-batch split {s.micro_batch_split}")
    if s.optimizer_state != "full":
        parts.append(f"{s.optimizer_state} AdamW states")
    return ", ".join(parts)


def run(smoke: bool, threads: int) -> list[dict]:
    torch.set_num_threads(threads)
    size = (dict(preset="quickstart-5m", vocab=1024, steps=3, micro_batch=2, seq_len=64) if smoke
            else dict(preset="quickstart-5m", vocab=4096, steps=8, micro_batch=8, seq_len=256))
    precision = "bf16" if torch.cuda.is_available() else "fp32"
    text = spec_text("ladder", size, Path(".lowmem_cache").resolve(), precision, off=LADDER_OFF)
    rows, overrides = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, extra) in enumerate(LADDER + BRANCHES):
            # the branches start from the ladder's full-finetuning strategies but with the standard optimizer
            current = overrides + extra if i < len(LADDER) else overrides[:-1] + extra
            if i < len(LADDER):
                overrides = current
            p = plan(decode_spec(text, "toml", overrides=current))
            if i == 0:  # the baseline
                beyond = p.memory.device_bytes - p.memory.peak_bytes
            rows.append(_measure(name, p, Path(tmp) / str(i)))
        baseline_bytes = rows[0]["planned_bytes"]
        for fraction in AUTO_BUDGETS:
            # usable = fraction x the baseline's tensors, plus what the process holds beside them (the baseline's
            # overhead lines: runtime and retained heap on a CPU, the CUDA runtime's on a GPU), which no strategy
            # shrinks below what a leaner plan needs
            budget = int((baseline_bytes * fraction + beyond) / (1 - SAFETY_MARGIN))
            spec = decode_spec(text, "toml", overrides=[*AUTO, f"memory.budget={budget}B",
                                                        f"memory.safety_margin={SAFETY_MARGIN}"])
            try:
                p = plan(spec)
            except ValueError as err:  # no plan fits: the row says so (the planner names the smallest budget)
                rows.append({"row": f"auto, {fraction:.0%} of baseline", "refused": str(err).splitlines()[0]})
                continue
            rows.append(_measure(f"auto, {fraction:.0%} of baseline: {chosen(p)}", p, Path(tmp) / f"auto{fraction}"))
    return rows


SAFETY_MARGIN = 0.05


def _measure(name: str, p, out: Path) -> dict:
    result = execute(p, out, progress=False)
    print(f"{name}: {format_bytes(result.measured_peak_bytes)}", flush=True)
    return {"row": name, "planned_bytes": result.planned_peak_bytes, "measured_bytes": result.measured_peak_bytes,
            "error": (result.planned_peak_bytes - result.measured_peak_bytes) / result.measured_peak_bytes,
            "planned_tokens_per_s": p.tokens_per_s, "tokens_per_s": result.tokens_per_s,
            "loss": result.final_loss, "steps": result.steps}


def to_markdown(rows: list[dict], header: str) -> str:
    lines = [header, "", "| row | measured peak | planned peak | error | tokens/s | est. tokens/s | loss |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if "refused" in r:
            lines.append(f"| {r['row']} | — | — | — | — | — | planner refused: {r['refused']} |")
            continue
        lines.append(f"| {r['row']} | {format_bytes(r['measured_bytes'])} | {format_bytes(r['planned_bytes'])} | "
                     f"{r['error']:+.1%} | {r['tokens_per_s']:,.0f} | {r['planned_tokens_per_s']:,.0f} | "
                     f"{r['loss']:.3f} |")
    return "\n".join(lines)


def write_chart(rows: list[dict], path: Path, title: str) -> bool:
    """Measured and planned peak per row as paired horizontal bars; False when matplotlib is absent."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [r for r in rows if "refused" not in r][::-1]
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(rows) + 1.2))
    ys = range(len(rows))
    mib = 2**20
    ax.barh([y + 0.2 for y in ys], [r["measured_bytes"] / mib for r in rows], height=0.4, label="measured")
    ax.barh([y - 0.2 for y in ys], [r["planned_bytes"] / mib for r in rows], height=0.4, label="planned")
    ax.set_yticks(list(ys), [r["row"] for r in rows], fontsize=8)
    ax.set_xlabel("peak memory (MiB)")
    ax.set_title(title, fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    rows = run(args.smoke, args.threads)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({platform.machine()})"
    header = (f"## Ladder: quickstart-5m {'(smoke) ' if args.smoke else ''}on {device}\n\n"
              f"torch {torch.__version__}, {args.threads} threads; each row adds to the row above, the last two "
              "branch off the full fine-tuning rows (standard AdamW).")
    table = to_markdown(rows, header)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    name = "ladder_smoke" if args.smoke else "ladder"
    (args.out / f"{name}.md").write_text(table + "\n")
    (args.out / f"{name}.json").write_text(json.dumps(rows, indent=2) + "\n")
    if write_chart(rows, args.out / f"{name}.png", header.splitlines()[0].removeprefix("## ")):
        print(f"wrote {args.out / f'{name}.png'}")


if __name__ == "__main__":
    main()
