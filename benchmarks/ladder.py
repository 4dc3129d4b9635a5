"""The optimization ladder (torchtune README style), measured, with the planner's prediction beside each row.

    python benchmarks/ladder.py            # quickstart-5m shapes on this CPU (a few minutes)
    python benchmarks/ladder.py --smoke    # tiny model, seconds (what CI runs)

Each row adds one strategy to the row above (as torchtune's ladder does), then LoRA and QLoRA branch off
the last full fine-tuning row. Measured memory is peak live tensor bytes (LiveTensorTracker) on CPU, or
torch.cuda.max_memory_allocated on a GPU; tokens/s is over the steps after the first two (memory-tracked)
ones. Writes a Markdown table and JSON under benchmarks/results/.
"""

import argparse
import json
import platform
import tempfile
from pathlib import Path

import torch

from lowmem.plan import plan
from lowmem.spec import decode_spec, format_bytes
from lowmem.train import execute

BASE = """
name = "ladder"
[model]
preset = "{preset}"
[data]
tokenizer = {{ kind = "train", vocab_size = {vocab} }}
cache_dir = "{cache}"
[optimizer]
kind = "adamw"
lr = 1e-3
[train]
steps = {steps}
micro_batch = {micro_batch}
seq_len = {seq_len}
eval_every = 0
clip_grad_norm = 0
[memory]
precision = "{precision}"
[memory.strategies]
activation_checkpointing = "off"
chunked_cross_entropy = "off"
fused_cross_entropy = "off"
optimizer_in_backward = "off"
[output]
save_final = false
"""

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


def run(smoke: bool, threads: int) -> list[dict]:
    torch.set_num_threads(threads)
    size = (dict(preset="quickstart-5m", vocab=1024, steps=3, micro_batch=2, seq_len=64) if smoke
            else dict(preset="quickstart-5m", vocab=4096, steps=8, micro_batch=8, seq_len=256))
    precision = "bf16" if torch.cuda.is_available() else "fp32"
    text = BASE.format(cache=Path(".lowmem_cache").resolve(), precision=precision, **size)
    rows, overrides = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, extra) in enumerate(LADDER + BRANCHES):
            # the branches start from the ladder's full-finetuning strategies but with the standard optimizer
            current = overrides + extra if i < len(LADDER) else overrides[:-1] + extra
            if i < len(LADDER):
                overrides = current
            spec = decode_spec(text, "toml", overrides=current)
            p = plan(spec)
            result = execute(p, Path(tmp) / str(i), progress=False)
            rows.append({"row": name, "planned_bytes": result.planned_peak_bytes,
                         "measured_bytes": result.measured_peak_bytes,
                         "error": (result.planned_peak_bytes - result.measured_peak_bytes) / result.measured_peak_bytes,
                         "planned_tokens_per_s": p.tokens_per_s, "tokens_per_s": result.tokens_per_s,
                         "loss": result.final_loss, "steps": result.steps})
            print(f"{name}: {format_bytes(result.measured_peak_bytes)}", flush=True)
    return rows


def to_markdown(rows: list[dict], header: str) -> str:
    lines = [header, "", "| row | measured peak | planned peak | error | tokens/s | est. tokens/s | loss |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['row']} | {format_bytes(r['measured_bytes'])} | {format_bytes(r['planned_bytes'])} | "
                     f"{r['error']:+.1%} | {r['tokens_per_s']:,.0f} | {r['planned_tokens_per_s']:,.0f} | "
                     f"{r['loss']:.3f} |")
    return "\n".join(lines)


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


if __name__ == "__main__":
    main()
