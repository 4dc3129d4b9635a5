"""Steady tokens/s of quickstart-5m (fp32, 8 x 256 tokens) under a few strategies, for the planner's speed
constants (`lowmem.plan.estimate`: SPLIT_EFFICIENCY, the fused loss's overhead).

    python benchmarks/strategy_speed.py [ROUNDS]    # default 3 interleaved rounds; the best of each is kept

Each variant is the same plan with one strategy changed (a plan is data), run by `execute` for 8 steps; its
steady tokens/s excludes the first, measured steps. Run it on a quiet machine: other load moves every figure.
"""

import json
import sys
import tempfile
from pathlib import Path

import msgspec
from _spec import spec_text

from lowmem.plan import plan
from lowmem.spec import decode_spec
from lowmem.train import execute

RESULTS = Path(__file__).resolve().parent / "results"
SIZE = dict(preset="quickstart-5m", vocab=4096, steps=8, micro_batch=8, seq_len=256)
OFF = ("activation_checkpointing", "chunked_cross_entropy", "fused_cross_entropy", "optimizer_in_backward", "compile",
       "micro_batch_split", "low_bit_optimizer")
VARIANTS = {"standard": {}, "fused CE": {"cross_entropy": "fused"}, "chunked CE": {"cross_entropy": "chunked"},
            "split 2": {"micro_batch_split": 2}, "split 4": {"micro_batch_split": 4}}


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    text = spec_text("speed", SIZE, Path(".lowmem_cache").resolve(), "fp32", off=OFF, schedule="constant")
    base = plan(decode_spec(text, "toml"), "cpu")
    best = dict.fromkeys(VARIANTS, 0.0)
    for r in range(rounds):
        for name, change in VARIANTS.items():
            p = msgspec.structs.replace(base, strategies=msgspec.structs.replace(base.strategies, **change))
            with tempfile.TemporaryDirectory() as out:
                best[name] = max(best[name], execute(p, out, progress=False).tokens_per_s)
            print(r, name, round(best[name]), flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "strategy_speed.json").write_text(json.dumps(best, indent=2))
    lines = ["# Steady tokens/s by strategy, quickstart-5m fp32 8 x 256", "",
             f"`python benchmarks/strategy_speed.py {rounds}` (best of {rounds} interleaved runs)", "",
             "| variant | tokens/s | vs standard |", "| --- | --- | --- |"]
    lines += [f"| {k} | {v:,.0f} | {v / best['standard']:.3f}x |" for k, v in best.items()]
    (RESULTS / "strategy_speed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
