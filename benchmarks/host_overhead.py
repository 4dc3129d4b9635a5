"""What a CPU run holds in RSS beyond the live tensors the planner budgets: on lowmem's caching allocator (the
plan's default, lowmem.hostmem), on glibc's allocator as it is, and with large allocations always returned.

    python benchmarks/host_overhead.py            # quickstart-5m, micro-batch 8 x 256, five configurations
    python benchmarks/host_overhead.py --smoke    # tiny sizes, to keep the script working

Each row runs `execute` in a fresh process. `execute` imports the libraries the plan needs, resets the kernel's
peak-RSS mark (5 > /proc/self/clear_refs) and takes RSS as its baseline; memory.json's `process` block gives the
peak since, less that baseline (the view the plan's device_bytes and the budget take); "beyond tensors" = that
- the measured live-tensor peak (`LiveTensorTracker`, weights included). It counts
what neither the plan nor the tracker sees: the allocator's free-but-kept memory (glibc's dynamic mmap
threshold rises after the first large free, so later large tensors come from the heap, which fragments),
thread-pool and kernel workspaces, Python objects.

"lowmem caching" is the plan as it comes (host_caching_allocator auto: tensors of 1 MiB or more from lowmem's
size-class cache); the other rows plan with it off, on torch's default allocator (glibc).
"returned" sets glibc's M_MMAP_THRESHOLD to 1 MiB for the run (mallopt): every tensor of 1 MiB or more is its
own mapping, unmapped when freed, and RSS follows the live tensors more closely, at the price of a page fault
per fresh page on every step. "trimmed" keeps glibc's defaults and calls malloc_trim(0) after every step (free
heap pages go back to the system between steps; the peak inside a step is what it would be without).

    python benchmarks/host_overhead.py --threads 1 2   # the same rows under torch.set_num_threads(1) and (2)
"""

import argparse
import itertools
import json
import subprocess
import sys
import tempfile
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
MiB = 1024 * 1024
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)

CONFIGS = {
    "full, nothing on": [],
    "full, checkpointing": ["memory.strategies.activation_checkpointing=on"],
    "full, micro-batch 2": ["train.micro_batch=2"],
    "LoRA": ["method.kind=lora"],
    "LoRA, fused CE": ["method.kind=lora", "memory.strategies.fused_cross_entropy=on"],
    "LoRA, checkpointing": ["method.kind=lora", "memory.strategies.activation_checkpointing=on"],
    "QLoRA": ["method.kind=qlora"],
}
ALLOCATORS = ("lowmem caching", "glibc default", "returned", "trimmed")


def child(allocator: str, overrides: list[str], smoke: bool, threads: int) -> dict:
    import ctypes

    import torch

    torch.set_num_threads(threads)
    libc = ctypes.CDLL("libc.so.6")
    if allocator == "returned":
        libc.mallopt(M_MMAP_THRESHOLD, MiB)
    if allocator == "trimmed":
        _trim_after_each_step(libc)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _spec import spec_text

    from lowmem.plan import plan
    from lowmem.spec import decode_spec
    from lowmem.train import execute

    size = (dict(preset="tiny", vocab=1024, steps=3, micro_batch=2, seq_len=64) if smoke
            else dict(preset="quickstart-5m", vocab=4096, steps=6, micro_batch=8, seq_len=256))
    text = spec_text("host-overhead", size, Path(".lowmem_cache").resolve(), "fp32", schedule="constant")
    system = [] if allocator == "lowmem caching" else ["memory.strategies.host_caching_allocator=off"]
    p = plan(decode_spec(text, "toml", overrides=overrides + system), "cpu")
    with tempfile.TemporaryDirectory() as out:
        result = execute(p, out, progress=False)
        # what the run added to RSS from its own start, libraries loaded (memory.json's process block): the view
        # the plan's device_bytes and the budget take
        process = json.loads((Path(out) / "memory.json").read_text())["process"]
    added = process["rss_added_bytes"]
    # the caching allocator's peak of mapped blocks and its mappings, where the plan ran on it
    cache_figures = {k: v for k, v in process.items() if k.startswith("allocator_")}
    return {"planned_tensor_bytes": p.memory.peak_bytes, "tensor_peak_bytes": result.measured_peak_bytes,
            "planned_rss_bytes": p.memory.device_bytes,
            "rss_peak_extra_bytes": added, "beyond_tensors_bytes": added - result.measured_peak_bytes,
            "tokens_per_s": result.tokens_per_s, "threads": threads, "torch": torch.__version__,
            "host_allocator": p.strategies.host_allocator, **cache_figures}


def _trim_after_each_step(libc) -> None:
    """Wrap the training loop's step so that glibc returns its free heap pages after each one (malloc_trim)."""
    from lowmem.train import loop

    step = loop._guarded_step

    def trimmed(*args, **kwargs):
        out = step(*args, **kwargs)
        libc.malloc_trim(0)
        return out

    loop._guarded_step = trimmed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where host_overhead.md/.json go")
    parser.add_argument("--threads", type=int, nargs="+", default=[1], help="torch threads, one set of rows each")
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS), metavar="CONFIG",
                        help="a subset of the rows")
    parser.add_argument("--allocators", nargs="+", choices=ALLOCATORS, default=list(ALLOCATORS))
    parser.add_argument("--child", nargs=3, metavar=("CONFIG", "ALLOCATOR", "THREADS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child[1], CONFIGS[args.child[0]], args.smoke, int(args.child[2]))))
        return
    rows = []
    for threads, name, allocator in itertools.product(args.threads, args.configs, args.allocators):
        cmd = [sys.executable, __file__, "--child", name, allocator, str(threads)] + (["--smoke"] if args.smoke else [])
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        line = next(ln for ln in done.stdout.splitlines() if ln.startswith("RESULT "))
        rows.append({"config": name, "allocator": allocator, **json.loads(line.removeprefix("RESULT "))})
        print(rows[-1], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "host_overhead.json").write_text(json.dumps(rows, indent=2))
    lines = ["# RSS beyond the planned tensors on CPU", "",
             f"`python benchmarks/host_overhead.py{' --smoke' if args.smoke else ''}`; see the script's docstring.", "",
             "| torch, threads | config | allocator | tensor peak (planned / measured) | RSS peak - baseline (planned / "
             "measured) | beyond tensors (planned / measured) | tokens/s |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['torch']}, {r['threads']} | {r['config']} | {r['allocator']} | "
                     f"{r['planned_tensor_bytes'] / MiB:.1f} / "
                     f"{r['tensor_peak_bytes'] / MiB:.1f} MiB | {r.get('planned_rss_bytes', 0) / MiB:.1f} / "
                     f"{r['rss_peak_extra_bytes'] / MiB:.1f} MiB | "
                     f"{(r['planned_rss_bytes'] - r['planned_tensor_bytes']) / MiB:.1f} / "
                     f"{r['beyond_tensors_bytes'] / MiB:.1f} MiB | {r['tokens_per_s']:,.0f} |")
    (args.out / "host_overhead.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
