"""Peak memory of loading an HF checkpoint with `lowmem.nn.hf.load_hf`, against the bytes of what it loads.

    python benchmarks/load_memory.py            # ~430 MB fp32 Llama checkpoint in 64 MB shards
    python benchmarks/load_memory.py --smoke    # ~70 MB checkpoint (what tests/nn/test_load_memory.py runs)

A random Llama checkpoint (fp32, sharded, written by `save_hf`) is loaded three ways, each in a fresh Python
process: to fp32; to bf16 (a cast from the fp32 file); and to NF4 for QLoRA (`load_hf(convert=nf4_converter
(cfg))`: fp32, each projection quantized as it is read). The child imports everything and warms up first,
then resets the kernel's peak-RSS mark (writing 5 to /proc/self/clear_refs), takes its RSS as the baseline,
loads, and reads the peak back (VmHWM). "peak extra" = peak - baseline; "model" = the bytes of the loaded
tensors' storages (for NF4 the codes, scales and lookup tables); ratio = peak extra / model.

What RSS counts. load_hf reads tensors with plain file reads into their own memory, so none of the
checkpoint's file pages are mapped into the process: the file passes through the kernel's page cache, which
is no process's RSS, and VmHWM is the process's own (anonymous) memory plus its libraries. Had it used
safetensors' memory map (`safe_open(...).get_tensor`), every page of the checkpoint it touched would count in
RSS (as RssFile) until unmapped: clean and reclaimable, but in VmHWM. The RssAnon and RssFile columns show
the split after the load.

NF4: at most one fp32 weight is alive at a time (the NF4 tensors equal quantizing the loaded fp32 model, bit
for bit: tests/nn/test_hf.py), and the quantization's own workspace is measured alone for the largest
projection (a few MB, with `lowmem.nn.quant`'s chunked quantizer; torchao's `to_nf4` needs about 130 MB for
fp32). Before load_hf fixed glibc's mmap threshold while converting (`_large_allocations_returned`), the
peak was 2.3-3.2x the NF4 model: glibc's dynamic threshold rose after the first large free, later
temporaries came from the heap, and the heap could not shrink past the small NF4 tensors kept between them.
"""

import argparse
import gc
import json
import subprocess
import sys
import tempfile
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
MiB = 1024 * 1024

# Llama-shaped configs (GQA, SwiGLU) whose projections NF4 can quantize (multiples of 64 * 256 elements).
CONFIGS = {
    "full": dict(vocab_size=8192, dim=1024, n_layers=8, n_heads=16, n_kv_heads=4, ffn_dim=2816),
    "smoke": dict(vocab_size=8192, dim=512, n_layers=4, n_heads=8, n_kv_heads=2, ffn_dim=1536),
}
SHARD_BYTES = {"full": 64 * MiB, "smoke": 16 * MiB}
MODES = ("fp32", "bf16", "nf4")
NOTE = ("peak extra = VmHWM after the load - VmRSS before it (no checkpoint page is mapped into the process: "
        "see RssFile). NF4 loads with glibc's mmap threshold fixed at 64 KiB, so freed quantization "
        "temporaries go back to the OS (see the script's docstring).")


# --------------------------------------------------------------------------------------------- child side


def _status() -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile of this process, in bytes (/proc/self/status)."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) * 1024
    return out


def measure(model_dir: str, mode: str) -> dict:
    """Load `model_dir` as `mode` in this process and return the memory figures (run in a fresh process)."""
    import torch

    from lowmem.nn.hf import load_hf, read_hf_config
    from lowmem.nn.quant import nf4_converter
    from lowmem.train.memory import LiveTensorTracker

    cfg = read_hf_config(model_dir)
    convert = nf4_converter(cfg) if mode == "nf4" else None
    dtype = torch.bfloat16 if mode == "bf16" else torch.float32
    torch.ones(MiB // 4).to(dtype)  # page in the cast kernels' code: the load's data is what is measured
    workspace = 0
    if convert is not None:  # torchao's lazy set-up outside the measurement; then its workspace for one weight
        convert("layers.0.mlp.w1", torch.randn(256, 256))
        shape = (cfg.ffn_dim, cfg.dim)
        probe = torch.randn(shape)
        gc.collect()
        _reset_peak()
        before = _status()["VmRSS"]
        convert("layers.0.mlp.w1", probe)
        workspace = _status()["VmHWM"] - before
        del probe
    gc.collect()
    _reset_peak()
    baseline = _status()
    _, params = load_hf(model_dir, dtype=dtype, convert=convert)
    after = _status()
    model_bytes = LiveTensorTracker().add_existing(params.values(), "parameters")
    return {"mode": mode, "model_bytes": model_bytes, "peak_extra_bytes": after["VmHWM"] - baseline["VmRSS"],
            "rss_anon_extra_bytes": after["RssAnon"] - baseline["RssAnon"],
            "rss_file_extra_bytes": after["RssFile"] - baseline["RssFile"],
            "nf4_workspace_bytes": workspace}


def _reset_peak() -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0: `echo 5 > /proc/PID/clear_refs`)."""
    Path("/proc/self/clear_refs").write_text("5")


# -------------------------------------------------------------------------------------------- parent side


def write_checkpoint(size: str, out: Path) -> tuple[Path, int]:
    """A random fp32 Llama checkpoint of config `size`, sharded; returns its directory and its weight bytes."""
    import torch

    from lowmem.nn.config import ModelConfig
    from lowmem.nn.hf import save_hf
    from lowmem.nn.llama import init_params

    cfg = ModelConfig(**CONFIGS[size])
    params = init_params(cfg, seed=0, dtype=torch.float32)
    path = save_hf(params, cfg, out / f"llama-{size}", max_shard_bytes=SHARD_BYTES[size])
    return path, sum(t.numel() * t.element_size() for t in params.values())


def run_child(model_dir: Path, mode: str) -> dict:
    result = subprocess.run([sys.executable, __file__, "--child", str(model_dir), mode],
                            capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        raise RuntimeError(f"child ({mode}) failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def table(rows: list[dict], checkpoint_bytes: int, n_shards: int) -> str:
    lines = [
        f"Checkpoint: {checkpoint_bytes / MiB:,.1f} MiB of fp32 weights in {n_shards} safetensors shards.",
        "",
        "| load as | model MiB | peak extra RSS MiB | ratio | RssAnon extra MiB | RssFile extra MiB "
        "| NF4 workspace MiB | ratio without workspace |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        ws = r["nf4_workspace_bytes"]
        lines.append(
            f"| {r['mode']} | {r['model_bytes'] / MiB:,.1f} | {r['peak_extra_bytes'] / MiB:,.1f} "
            f"| {r['ratio']:.3f} | {r['rss_anon_extra_bytes'] / MiB:,.1f} | {r['rss_file_extra_bytes'] / MiB:,.1f} "
            f"| {ws / MiB:,.1f} | {(r['peak_extra_bytes'] - ws) / r['model_bytes']:.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a ~70 MB checkpoint instead of ~430 MB")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where load_memory.md/.json go")
    parser.add_argument("--child", nargs=2, metavar=("MODEL_DIR", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(*args.child)))
        return
    size = "smoke" if args.smoke else "full"
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, checkpoint_bytes = write_checkpoint(size, Path(tmp))
        n_shards = len(list(model_dir.glob("*.safetensors")))
        rows = [run_child(model_dir, mode) for mode in MODES]
    for r in rows:
        r["ratio"] = r["peak_extra_bytes"] / r["model_bytes"]
    text = table(rows, checkpoint_bytes, n_shards)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "load_memory.md").write_text(
        "# Peak RSS of load_hf\n\n`python benchmarks/load_memory.py" + (" --smoke" if args.smoke else "")
        + "`\n\n" + text + "\n\n" + NOTE + "\n")
    (args.out / "load_memory.json").write_text(json.dumps(
        {"config": CONFIGS[size], "checkpoint_bytes": checkpoint_bytes, "n_shards": n_shards, "rows": rows},
        indent=2) + "\n")


if __name__ == "__main__":
    main()
