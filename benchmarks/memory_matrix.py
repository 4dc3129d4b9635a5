"""Planned versus measured peak memory (and tokens/s) across strategy combinations, on this machine.

    python benchmarks/memory_matrix.py                 # quickstart-5m model, 3 steps per row
    python benchmarks/memory_matrix.py --smoke         # tiny model, seconds (what CI runs)

Prints a Markdown table and writes it, with a JSON copy, under benchmarks/results/. Measured memory is peak
live tensor bytes (LiveTensorTracker) on CPU; tokens/s is over the steps after the measured ones.
"""

import argparse
import itertools
import json
import platform
import tempfile
from pathlib import Path

import torch

from lowmem.plan import plan
from lowmem.spec import decode_spec, format_bytes
from lowmem.train import execute

BASE = """
name = "matrix"
[model]
preset = "{preset}"
[data]
tokenizer = {{ kind = "train", vocab_size = {vocab} }}
cache_dir = "{cache}"
[train]
steps = {steps}
micro_batch = {micro_batch}
seq_len = {seq_len}
eval_every = 0
[output]
save_final = false
"""


def run_matrix(smoke: bool, threads: int) -> list[dict]:
    torch.set_num_threads(threads)
    size = (dict(preset="tiny", vocab=1024, steps=2, micro_batch=4, seq_len=128) if smoke
            else dict(preset="quickstart-5m", vocab=4096, steps=4, micro_batch=8, seq_len=256))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        text = BASE.format(cache=Path(".lowmem_cache").resolve(), **size)
        for precision, ckpt, accum in itertools.product(["fp32", "bf16"], ["off", "on"], [1, 2]):
            spec = decode_spec(text, "toml", overrides=[
                f"memory.precision={precision}", f"memory.strategies.activation_checkpointing={ckpt}",
                f"train.grad_accum={accum}"])
            p = plan(spec)
            result = execute(p, Path(tmp) / f"{precision}-{ckpt}-{accum}", progress=False)
            rows.append({
                "precision": precision, "checkpointing": ckpt, "grad_accum": accum,
                "planned_bytes": result.planned_peak_bytes, "measured_bytes": result.measured_peak_bytes,
                "error": (result.planned_peak_bytes - result.measured_peak_bytes) / result.measured_peak_bytes,
                "planned_tokens_per_s": p.tokens_per_s, "measured_tokens_per_s": result.tokens_per_s,
                "final_loss": result.final_loss,
            })
    return rows


def to_markdown(rows: list[dict], header: str) -> str:
    lines = [header, "",
             "| precision | checkpointing | accum | planned peak | measured peak | error | est. tok/s | measured tok/s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['precision']} | {r['checkpointing']} | {r['grad_accum']} | "
                     f"{format_bytes(r['planned_bytes'])} | {format_bytes(r['measured_bytes'])} | {r['error']:+.1%} | "
                     f"{r['planned_tokens_per_s']:,.0f} | {r['measured_tokens_per_s']:,.0f} |")
    worst = max(abs(r["error"]) for r in rows)
    lines += ["", f"worst |error|: {worst:.1%}"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny model, a few seconds")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results", help="results folder")
    args = parser.parse_args()
    rows = run_matrix(args.smoke, args.threads)
    header = (f"## Planned vs measured peak memory ({'tiny' if args.smoke else 'quickstart-5m'} model)\n\n"
              f"CPU: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
              f"{args.threads} threads; measured = peak live tensor bytes (LiveTensorTracker).")
    table = to_markdown(rows, header)
    print(table)
    name = "memory_matrix_smoke" if args.smoke else "memory_matrix"
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.md").write_text(table + "\n")
    (out / f"{name}.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
