"""Shared fixtures: a small slice of the shipped corpus and a tokenizer trained on it (fast on 2 cores)."""

from __future__ import annotations

import gzip
import itertools
from pathlib import Path

import pytest

from lowmem.data import Tokenizer, read_documents, shipped_corpus, train_tokenizer

N_SLICE_DOCS = 40  # Genesis 1 .. Exodus 10: about 150 kB of text
SMALL_VOCAB = 512


@pytest.fixture(scope="session")
def kjv_slice(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first N_SLICE_DOCS chapters of the shipped corpus as a `.jsonl.gz` file."""
    src = shipped_corpus("kjv")
    out = tmp_path_factory.mktemp("corpus") / "kjv_slice.jsonl.gz"
    with gzip.open(src, "rb") as f, gzip.open(out, "wb") as g:
        g.writelines(itertools.islice(f, N_SLICE_DOCS))
    return out


@pytest.fixture(scope="session")
def small_tokenizer(kjv_slice: Path, tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    out = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    return train_tokenizer(read_documents(kjv_slice), SMALL_VOCAB, out)


N_BPE_DOCS = 80  # chapters of the shipped corpus the byte-level BPE trains on (well under a second)
BPE_VOCAB = 2048


@pytest.fixture(scope="session")
def train_byte_level_bpe():
    """A function: train_byte_level_bpe(special_tokens) -> a `tokenizers` byte-level BPE shaped like Llama 3's
    (Split(Llama 3 regex) + ByteLevel), trained on N_BPE_DOCS chapters, the special tokens after its vocab."""
    return _train_byte_level_bpe


def _train_byte_level_bpe(special_tokens: list[str], vocab_size: int = BPE_VOCAB):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from lowmem.data.hf_tokenizer import LLAMA3_PATTERN

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(tokenizers.Regex(LLAMA3_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(itertools.islice(read_documents(shipped_corpus()), N_BPE_DOCS), trainer)
    tok.add_special_tokens(special_tokens)
    return tok
