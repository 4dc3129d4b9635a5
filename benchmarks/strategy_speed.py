"""Steady tokens/s of quickstart-5m (fp32, 8 x 256 tokens) under a few strategies, for the planner's speed
constants (`lowmem.plan.estimate`: SPLIT_EFFICIENCY, the fused loss's overhead).

    python benchmarks/strategy_speed.py [--rounds N]   # default 3 interleaved rounds; the best of each is kept
    python benchmarks/strategy_speed.py --smoke        # tiny sizes, one round, to keep the script working

Each variant is the same plan with one strategy changed (a plan is data), run by `execute` for 8 steps; its
steady tokens/s excludes the first, measured steps. On a CPU with native bf16 (AVX512-BF16 or AMX) the bf16 and
mixed-bf16 variants run too, for the planner's CPU_BF16_OVER_FP32_NATIVE; without it they are left out (bf16
compute is emulated there, hundreds of times slower). Run it on a quiet machine: other load moves every figure.
"""

import argparse
import json
import tempfile
from pathlib import Path

import msgspec
from _spec import spec_text

from lowmem.plan import plan
from lowmem.plan.hardware import cpu_flags, cpu_has_bf16, resolve_hardware
from lowmem.spec import decode_spec
from lowmem.train import execute

RESULTS = Path(__file__).resolve().parent / "results"
SIZE = dict(preset="quickstart-5m", vocab=4096, steps=8, micro_batch=8, seq_len=256)
SMOKE = dict(preset="tiny", vocab=1024, steps=4, micro_batch=2, seq_len=64)
OFF = ("activation_checkpointing", "chunked_cross_entropy", "fused_cross_entropy", "optimizer_in_backward", "compile",
       "micro_batch_split", "low_bit_optimizer")
VARIANTS = {"standard": {}, "fused CE": {"cross_entropy": "fused"}, "chunked CE": {"cross_entropy": "chunked"},
            "split 2": {"micro_batch_split": 2}, "split 4": {"micro_batch_split": 4}}
NATIVE_BF16 = {"bf16": {"precision": "bf16"}, "mixed-bf16": {"precision": "mixed-bf16"}}


def cpu_name() -> str:
    """The CPU's model name and its bf16-relevant flags, as /proc/cpuinfo gives them."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        model = next(line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name"))
    except (OSError, StopIteration):
        model = "unknown CPU"
    flags = sorted(f for f in cpu_flags() if f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16"))
    return f"{model} ({', '.join(flags) or 'no AVX2'})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the best of each variant is kept")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one round")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where strategy_speed.md/.json go")
    args = parser.parse_args()
    rounds = 1 if args.smoke else args.rounds
    size = SMOKE if args.smoke else SIZE
    variants = VARIANTS | (NATIVE_BF16 if cpu_has_bf16() else {})
    text = spec_text("speed", size, Path(".lowmem_cache").resolve(), "fp32", off=OFF, schedule="constant")
    base = plan(decode_spec(text, "toml"), "cpu")
    best = dict.fromkeys(variants, 0.0)
    for r in range(rounds):
        for name, change in variants.items():
            p = msgspec.structs.replace(base, strategies=msgspec.structs.replace(base.strategies, **change))
            with tempfile.TemporaryDirectory() as out:
                best[name] = max(best[name], execute(p, out, progress=False).tokens_per_s)
            print(r, name, round(best[name]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    cpu = cpu_name()
    (args.out / "strategy_speed.json").write_text(json.dumps({"cpu": cpu, "tokens_per_s": best}, indent=2))
    command = "--smoke" if args.smoke else f"--rounds {rounds}"
    lines = [f"# Steady tokens/s by strategy, {size['preset']} fp32 {size['micro_batch']} x {size['seq_len']}", "",
             f"`python benchmarks/strategy_speed.py {command}` (best of {rounds} interleaved runs) on {cpu}, "
             f"{resolve_hardware(None).n_cores} cores", "",
             "| variant | tokens/s | vs standard |", "| --- | --- | --- |"]
    lines += [f"| {k} | {v:,.0f} | {v / best['standard']:.3f}x |" for k, v in best.items()]
    (args.out / "strategy_speed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
