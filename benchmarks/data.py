"""Data pipeline throughput: tokenization (pipeline vs the raw tokenizer) and packing 100M tokens, with RSS.

    python benchmarks/data.py            # shipped corpus x 8 for tokenization; 100M tokens packed
    python benchmarks/data.py --smoke    # seconds (what CI runs)

Tokenization: `prepare_packed_dataset` end to end (read, render, encode, pack, write Arrow) against
sentencepiece's own batch encode of the same texts with all cores; the pipeline should be within 20% of it.
Packing: `pack_documents` (best-fit decreasing in bounded windows) over synthetic documents with lengths drawn
like the shipped corpus's chapters, streamed, so RSS stays flat. Peak RSS is read from /proc (VmHWM).
"""

import argparse
import gzip
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from lowmem.data import load_or_train_tokenizer, prepare_packed_dataset, read_documents, shipped_corpus
from lowmem.data.pack import pack_documents
from lowmem.spec import DataSpec, format_bytes


def peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def tokenization(copies: int, tmp: Path) -> dict:
    corpus = tmp / "corpus.jsonl.gz"
    lines = gzip.open(shipped_corpus(), "rt").read()
    with gzip.open(corpus, "wt") as f:
        for _ in range(copies):
            f.write(lines)
    data = DataSpec(source=str(corpus), cache_dir=str(tmp / "cache"))
    tokenizer = load_or_train_tokenizer(shipped_corpus(), 4096, tmp / "cache")
    texts = list(read_documents(corpus))
    n_bytes = sum(len(t.encode()) for t in texts)
    start = time.perf_counter()
    ids = tokenizer.encode(texts)
    raw_s = time.perf_counter() - start
    n_tokens = sum(len(x) for x in ids)
    del ids, texts
    start = time.perf_counter()
    prepare_packed_dataset(corpus, tokenizer, 1024, tmp / "cache", data)
    pipeline_s = time.perf_counter() - start
    return {"text_bytes": n_bytes, "tokens": n_tokens, "raw_tokens_per_s": n_tokens / raw_s,
            "pipeline_tokens_per_s": n_tokens / pipeline_s, "pipeline_over_raw": raw_s / pipeline_s}


def packing(n_tokens: int, seq_len: int = 2048, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)

    def documents():
        made = 0
        while made < n_tokens:
            length = int(min(max(rng.lognormal(6.6, 0.6), 16), 8 * seq_len))  # ~900 tokens, like KJV chapters
            made += length
            yield np.ones(length, np.int32), np.ones(length, np.uint8)

    rss_before = peak_rss()
    start = time.perf_counter()
    rows = padding = 0
    for block in pack_documents(documents(), seq_len):
        rows += len(block.tokens)
        padding += int((block.doc_ids == 0).sum())
    seconds = time.perf_counter() - start
    return {"tokens": n_tokens, "seq_len": seq_len, "seconds": seconds, "tokens_per_s": n_tokens / seconds,
            "padding_fraction": padding / (rows * seq_len), "peak_rss_before": rss_before,
            "peak_rss_after": peak_rss()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tok = tokenization(1 if args.smoke else 8, Path(tmp))
    pack = packing(2_000_000 if args.smoke else 100_000_000)
    lines = [
        "## Data pipeline throughput (CPU, all cores)", "",
        "| measure | value |", "| --- | --- |",
        f"| text tokenized | {format_bytes(tok['text_bytes'])}, {tok['tokens']:,} tokens |",
        f"| raw sentencepiece batch encode | {tok['raw_tokens_per_s']:,.0f} tokens/s |",
        f"| pipeline (read, encode, pack, write Arrow) | {tok['pipeline_tokens_per_s']:,.0f} tokens/s "
        f"({tok['pipeline_over_raw']:.0%} of raw) |",
        f"| best-fit packing of {pack['tokens']:,} tokens into {pack['seq_len']}-token rows | "
        f"{pack['seconds']:.1f} s ({pack['tokens_per_s']:,.0f} tokens/s), padding {pack['padding_fraction']:.2%} |",
        f"| peak RSS before / after packing | {format_bytes(pack['peak_rss_before'])} / "
        f"{format_bytes(pack['peak_rss_after'])} |",
    ]
    table = "\n".join(lines)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    name = "data_smoke" if args.smoke else "data"
    (args.out / f"{name}.md").write_text(table + "\n")
    (args.out / f"{name}.json").write_text(json.dumps({"tokenization": tok, "packing": pack}, indent=2) + "\n")


if __name__ == "__main__":
    main()
