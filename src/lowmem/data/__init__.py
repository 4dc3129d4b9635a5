"""Data path: corpus → tokenizer → packed Arrow file → batches.

Example::

    path = shipped_corpus("kjv")
    tok = load_or_train_tokenizer(path, vocab_size=4096, cache_dir=cache)
    ds = PackedDataset(prepare_packed_dataset(path, tok, seq_len=256, cache_dir=cache))
    train_idx, eval_idx = split_rows(len(ds), eval_rows=64, seed=0)
    loader = BatchLoader(ds, train_idx, micro_batch=8, seed=0)
"""

from lowmem.data.corpus import read_documents, shipped_corpus
from lowmem.data.loader import BatchLoader, PackedDataset, make_batch, split_rows
from lowmem.data.pack import pack_token_lists, prepare_packed_dataset
from lowmem.data.tokenizer import Tokenizer, load_or_train_tokenizer, train_tokenizer

__all__ = [
    "BatchLoader",
    "PackedDataset",
    "Tokenizer",
    "load_or_train_tokenizer",
    "make_batch",
    "pack_token_lists",
    "prepare_packed_dataset",
    "read_documents",
    "shipped_corpus",
    "split_rows",
    "train_tokenizer",
]
