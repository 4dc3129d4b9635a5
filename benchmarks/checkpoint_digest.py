"""What recording a sha256 per checkpoint file costs: a checkpoint's write with and without the digests.

    python benchmarks/checkpoint_digest.py            # ~1 GiB checkpoint (weights + AdamW's two states), 3 repeats
    python benchmarks/checkpoint_digest.py --smoke    # 24 MiB, to keep the script working

Each repeat writes the same checkpoint twice with `lowmem.train.checkpoint.save_checkpoint`, side by side in one
process: as it runs (every file hashed in a thread while the main thread fsyncs them) and with the hashing
replaced by plain fsyncs. It also times verifying the digests (`verify_digests`, what a resume adds) and hashing
the files serially. The page cache is warm for the hashes: the files were just written. Times are the median
of the repeats; the machine is shared, so compare the columns of one run, not runs.
"""

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from lowmem.train import checkpoint

RESULTS = Path(__file__).resolve().parent / "results"
MiB = 1024 * 1024


def _params(total_bytes: int) -> dict[str, torch.Tensor]:
    """fp32 weights whose checkpoint (weights + AdamW's exp_avg and exp_avg_sq) is about `total_bytes`."""
    n_tensors = 16
    numel = total_bytes // 3 // 4 // n_tensors
    return {f"layers.{i}.w": torch.randn(numel) for i in range(n_tensors)}


def _optimizer(params: dict[str, torch.Tensor]) -> torch.optim.Optimizer:
    for t in params.values():
        t.requires_grad_(True)
        t.grad = torch.randn_like(t)
    opt = torch.optim.AdamW(list(params.values()), lr=1e-3)
    opt.step()
    return opt


def _plain_sync(files: list[Path]) -> dict[str, str]:
    for f in files:
        checkpoint._fsync_file(f)
    return {}


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(total_bytes: int, repeats: int) -> dict:
    params = _params(total_bytes)
    opt = _optimizer(params)
    rows = {"with digests": [], "without": [], "verify": [], "hash serially": []}
    with tempfile.TemporaryDirectory(dir=os.environ.get("LOWMEM_BENCH_DIR")) as tmp:
        run_dir = Path(tmp)
        size = 0
        for i in range(repeats):
            # alternate which write goes first: the second one finds the disk busy with the first's writeback
            for with_digests in ((True, False) if i % 2 == 0 else (False, True)):
                step = 2 * i + (1 if with_digests else 2)
                real = checkpoint._digest_and_sync
                if not with_digests:
                    checkpoint._digest_and_sync = _plain_sync
                try:
                    seconds = _time(lambda s=step: checkpoint.save_checkpoint(run_dir, s, params, opt, {},
                                                                              {"x": "y"}, keep=2))
                finally:
                    checkpoint._digest_and_sync = real
                rows["with digests" if with_digests else "without"].append(seconds)
            hashed = checkpoint.checkpoint_dir(run_dir, 2 * i + 1)
            size = sum(f.stat().st_size for f in hashed.iterdir())
            rows["verify"].append(_time(lambda d=hashed: checkpoint.verify_digests(d)))
            rows["hash serially"].append(_time(lambda d=hashed: [checkpoint._file_digest(f) for f in d.iterdir()]))
    median = {k: statistics.median(v) for k, v in rows.items()}
    return {"checkpoint_bytes": size, "repeats": repeats, "threads": torch.get_num_threads(), "seconds": median,
            "overhead": median["with digests"] / median["without"] - 1}


def render(r: dict) -> str:
    s = r["seconds"]
    return "\n".join([
        f"# Checkpoint digests (sha256 per file): cost on a {r['checkpoint_bytes'] / 2**30:.2f} GiB checkpoint",
        "",
        f"Median of {r['repeats']} repeats, {r['threads']} torch threads, `python benchmarks/checkpoint_digest.py`.",
        "",
        "| | seconds |",
        "| --- | ---: |",
        f"| save_checkpoint, without digests | {s['without']:.2f} |",
        f"| save_checkpoint, with digests (as it runs) | {s['with digests']:.2f} |",
        f"| verify on resume (`verify_digests`) | {s['verify']:.2f} |",
        f"| hashing the files serially | {s['hash serially']:.2f} |",
        "",
        f"The digests change the write by {r['overhead']:+.1%} (hashing overlaps the fsyncs; on this shared disk "
        "a difference of a few tens of percent either way is noise). Hashing alone takes "
        f"{s['hash serially'] / s['without']:.0%} of a write without digests.",
    ]) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="24 MiB, one repeat; writes nothing to results/")
    args = parser.parse_args()
    result = measure(24 * MiB if args.smoke else 1024 * MiB, 1 if args.smoke else 6)
    text = render(result)
    print(text)
    if not args.smoke:
        (RESULTS / "checkpoint_digest.json").write_text(json.dumps(result, indent=2) + "\n")
        (RESULTS / "checkpoint_digest.md").write_text(text)


if __name__ == "__main__":
    main()
