"""Partial activation checkpointing: the first n blocks (the planner's ladder) against every k-th, off and full.

    python benchmarks/partial_checkpointing.py            # quickstart-5m (6 blocks), full / LoRA / QLoRA, fused CE
    python benchmarks/partial_checkpointing.py --smoke    # tiny sizes, to keep the script working

Each row is the same run with `activation_checkpointing` set to one value in the plan (the spec can only say
auto / on / off), its memory and speed re-estimated as the planner would (`lowmem.plan.with_strategies`). It runs
`execute` for a few steps: "measured" is the peak of live tensor bytes (LiveTensorTracker, weights included) and
the run's tokens/s; "traced" is `lowmem plan --trace` (fake tensors, nothing allocated). Rows are interleaved over
`--repeat` rounds and tokens/s is the median; the speed column compares each row with full checkpointing in the
same rounds, at 1 torch thread. Losses are compared with checkpointing off: checkpointing must change no number.
"""

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _spec import spec_text  # noqa: E402
from peers import cpu_model  # noqa: E402

from lowmem.plan import plan, with_strategies  # noqa: E402
from lowmem.spec import decode_spec, format_bytes  # noqa: E402
from lowmem.train import execute  # noqa: E402
from lowmem.train.dryrun import trace_memory  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SIZES = {
    "smoke": dict(preset="tiny", vocab=1024, steps=3, micro_batch=2, seq_len=64),
    "full": dict(preset="quickstart-5m", vocab=4096, steps=6, micro_batch=8, seq_len=256),
}
VALUES = {"smoke": ("off", "first-1", "full"),
          "full": ("off", "first-2", "first-3", "every-2", "first-5", "full")}
METHODS = {"smoke": ("lora",), "full": ("full", "lora", "qlora")}


def run_rows(size_name: str, repeat: int, cache: Path) -> list[dict]:
    size = SIZES[size_name]
    text = spec_text("partial", size, cache, "fp32")
    plans = {}  # (method, value) -> the plan each round runs
    for method in METHODS[size_name]:
        base = plan(decode_spec(text, "toml", overrides=[f"method.kind={method}",
                                                         "memory.strategies.fused_cross_entropy=on"]))
        for value in VALUES[size_name]:
            plans[method, value] = with_strategies(base, activation_checkpointing=value)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(repeat):
            for (method, value), p in plans.items():
                run_dir = Path(tmp) / f"{method}-{value}-{round_}"
                result = execute(p, run_dir, progress=False)
                if round_ == 0:  # memory, the trace and the losses are the same every round
                    rows[method, value] = {
                        "method": method, "checkpointing": value, "planned_bytes": p.memory.peak_bytes,
                        "planned_phase": p.memory.peak_phase, "traced_bytes": trace_memory(p).peak_bytes,
                        "measured_bytes": result.measured_peak_bytes, "estimated_tokens_per_s": p.tokens_per_s,
                        "tokens_per_s": [], "losses": _losses(run_dir)}
                rows[method, value]["tokens_per_s"].append(result.tokens_per_s)
    out = list(rows.values())
    for row in out:
        row["median_tokens_per_s"] = statistics.median(row["tokens_per_s"])
        full = rows[(row["method"], "full")]
        off = rows[(row["method"], "off")]
        row["speed_vs_full"] = row["median_tokens_per_s"] / statistics.median(full["tokens_per_s"])
        row["max_loss_diff"] = max(abs(a - b) for a, b in zip(row["losses"], off["losses"], strict=True))
    return out


def _losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def to_markdown(rows: list[dict], size_name: str, repeat: int) -> str:
    size = SIZES[size_name]
    lines = [f"## Partial activation checkpointing: {size['preset']}, micro-batch {size['micro_batch']} x "
             f"{size['seq_len']}, fused CE, fp32",
             "",
             f"CPU: {cpu_model()}, torch {torch.__version__}, 1 torch thread; tokens/s the median of {repeat} "
             "interleaved rounds, each over the run's steps. measured = peak live tensor bytes (weights included); "
             "traced = `lowmem plan --trace`. Loss diff: the largest per-step difference from checkpointing off.",
             "",
             "| method | checkpointing | planned peak (phase) | traced | measured | planned / measured | est. tok/s | "
             "tok/s | vs full | loss diff |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['checkpointing']} | {format_bytes(r['planned_bytes'])} ({r['planned_phase']}) | "
            f"{format_bytes(r['traced_bytes'])} | {format_bytes(r['measured_bytes'])} | "
            f"{r['planned_bytes'] / r['measured_bytes'] - 1:+.1%} | {r['estimated_tokens_per_s']:,.0f} | "
            f"{r['median_tokens_per_s']:,.0f} | {r['speed_vs_full']:.2f}x | {r['max_loss_diff']:.1e} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, a few seconds")
    parser.add_argument("--repeat", type=int, default=2, help="interleaved rounds (default 2)")
    parser.add_argument("--cache", type=Path, default=Path(".lowmem_cache").resolve(), help="data cache")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    args = parser.parse_args()
    torch.set_num_threads(1)
    size_name = "smoke" if args.smoke else "full"
    rows = run_rows(size_name, 1 if args.smoke else args.repeat, args.cache)
    table = to_markdown(rows, size_name, 1 if args.smoke else args.repeat)
    print(table)
    name = "partial_checkpointing" + ("_smoke" if args.smoke else "")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.md").write_text(table + "\n")
    (args.out / f"{name}.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
