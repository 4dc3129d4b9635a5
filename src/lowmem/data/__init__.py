"""Data path: source records → (tokens, loss mask) documents → packed Arrow file → batches.

Example::

    path = shipped_corpus("kjv")
    data = DataSpec()  # format, columns, packing, too_long, bad_rows, ...
    tok = load_or_train_tokenizer(path, vocab_size=4096, cache_dir=cache, data=data)
    ds = PackedDataset(prepare_packed_dataset(path, tok, seq_len=256, cache_dir=cache, data=data))
    print(inspect_rows(ds.path, tok, n=2))
    train_idx, eval_idx = split_rows(len(ds), eval_rows=64, seed=0)
    loader = BatchLoader(ds, train_idx, micro_batch=8, seed=0)
"""

from lowmem.data.corpus import iter_rows, shipped_corpus, source_files, source_size_bytes
from lowmem.data.loader import BatchLoader, PackedDataset, inspect_rows, make_batch, split_rows
from lowmem.data.pack import PackCounts, RowBlock, pack_documents, pack_token_lists, prepare_packed_dataset
from lowmem.data.prepare import load_or_train_tokenizer
from lowmem.data.records import read_documents
from lowmem.data.templates import CHAT_TEMPLATES, TEMPLATE_VERSION, render_chat, render_instruct
from lowmem.data.tokenizer import (
    SentencePieceTokenizer,
    Tokenizer,
    load_tokenizer,
    train_tokenizer,
)

__all__ = [
    "CHAT_TEMPLATES",
    "TEMPLATE_VERSION",
    "BatchLoader",
    "PackCounts",
    "PackedDataset",
    "RowBlock",
    "SentencePieceTokenizer",
    "Tokenizer",
    "inspect_rows",
    "iter_rows",
    "load_or_train_tokenizer",
    "load_tokenizer",
    "make_batch",
    "pack_documents",
    "pack_token_lists",
    "prepare_packed_dataset",
    "read_documents",
    "render_chat",
    "render_instruct",
    "shipped_corpus",
    "source_files",
    "source_size_bytes",
    "split_rows",
    "train_tokenizer",
]
