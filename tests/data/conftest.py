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
