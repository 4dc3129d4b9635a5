from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import lowmem.data.pack as pack_module
from lowmem.data import PackedDataset, Tokenizer, pack_token_lists, prepare_packed_dataset, read_documents

token_lists = st.lists(st.lists(st.integers(1, 50_000), min_size=1, max_size=40), min_size=1, max_size=25)
seq_lens = st.integers(2, 17)


@settings(max_examples=200, deadline=None)
@given(docs=token_lists, seq_len=seq_lens)
def test_packing_loses_and_duplicates_nothing(docs: list[list[int]], seq_len: int):
    tokens, doc_ids = pack_token_lists(docs, seq_len, pad_id=0)
    n_total = sum(map(len, docs))
    assert tokens.dtype == doc_ids.dtype == np.int32
    assert tokens.shape == doc_ids.shape == (-(-n_total // seq_len), seq_len)
    flat_t, flat_d = tokens.reshape(-1), doc_ids.reshape(-1)
    # Real tokens come first, in document order, then only padding.
    assert (flat_d[:n_total] > 0).all() and (flat_d[n_total:] == 0).all() and (flat_t[n_total:] == 0).all()
    assert (np.diff(flat_d[:n_total]) >= 0).all()
    for doc_id, doc in enumerate(docs, start=1):
        assert flat_t[flat_d == doc_id].tolist() == doc


@settings(max_examples=100, deadline=None)
@given(docs=token_lists, seq_len=seq_lens, split_every=st.integers(1, 7))
def test_streaming_packer_equals_the_pure_one(docs: list[list[int]], seq_len: int, split_every: int):
    batches = [docs[i : i + split_every] for i in range(0, len(docs), split_every)]
    blocks = list(pack_module.iter_packed_rows(batches, seq_len, pad_id=7))
    expected_t, expected_d = pack_token_lists(docs, seq_len, pad_id=7)
    np.testing.assert_array_equal(np.concatenate([b[0] for b in blocks]), expected_t)
    np.testing.assert_array_equal(np.concatenate([b[1] for b in blocks]), expected_d)


def test_a_long_document_spans_rows():
    tokens, doc_ids = pack_token_lists([[1, 2], list(range(10, 20)), [3]], seq_len=4, pad_id=9)
    assert tokens.tolist() == [[1, 2, 10, 11], [12, 13, 14, 15], [16, 17, 18, 19], [3, 9, 9, 9]]
    assert doc_ids.tolist() == [[1, 1, 2, 2], [2, 2, 2, 2], [2, 2, 2, 2], [3, 0, 0, 0]]


def test_bad_seq_len():
    with pytest.raises(ValueError, match=r"seq_len=1; use an integer >= 2"):
        pack_token_lists([[1, 2]], 1)


def test_prepared_file_matches_the_pure_packer(
    kjv_slice: Path, small_tokenizer: Tokenizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    # Small record batches and document batches, so rows and documents cross both kinds of boundary.
    monkeypatch.setattr(pack_module, "TOKENS_PER_RECORD_BATCH", 64 * 5)
    seq_len = 64
    path = prepare_packed_dataset(kjv_slice, small_tokenizer, seq_len, tmp_path, docs_per_batch=3)
    assert path.parent == tmp_path / "packed" and path.suffix == ".arrow"
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temp files left

    tok = small_tokenizer
    docs = list(read_documents(kjv_slice))
    expected_t, expected_d = pack_token_lists(
        [[tok.bos_id, *ids, tok.eos_id] for ids in tok.encode(docs)], seq_len, pad_id=tok.pad_id
    )
    with pa.memory_map(str(path)) as source:
        reader = pa.ipc.open_file(source)  # an IPC *file*, with a footer
        assert reader.num_record_batches > 2
        table = reader.read_all()
    assert table.schema.field("tokens").type == pa.list_(pa.int32(), seq_len)
    assert table.schema.field("doc_ids").type == pa.list_(pa.int32(), seq_len)
    got_t = table.column("tokens").combine_chunks().flatten().to_numpy().reshape(-1, seq_len)
    got_d = table.column("doc_ids").combine_chunks().flatten().to_numpy().reshape(-1, seq_len)
    np.testing.assert_array_equal(got_t, expected_t)
    np.testing.assert_array_equal(got_d, expected_d)

    meta = PackedDataset(path).metadata
    n_real = int((expected_d != 0).sum())
    assert meta["seq_len"] == seq_len and meta["tokenizer_key"] == tok.key
    assert meta["n_documents"] == len(docs) and meta["n_tokens"] == n_real
    assert meta["n_padding"] == expected_d.size - n_real and meta["n_rows"] == len(expected_t)


def test_second_prepare_reuses_the_file(
    kjv_slice: Path, small_tokenizer: Tokenizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    first = prepare_packed_dataset(kjv_slice, small_tokenizer, 32, tmp_path)
    mtime = first.stat().st_mtime_ns

    def no_tokenizing(texts):
        raise AssertionError("re-tokenized although the packed file is cached")

    monkeypatch.setattr(small_tokenizer, "encode", no_tokenizing)
    assert prepare_packed_dataset(kjv_slice, small_tokenizer, 32, tmp_path) == first
    assert first.stat().st_mtime_ns == mtime
    with pytest.raises(AssertionError, match="re-tokenized"):  # another seq_len is another file
        prepare_packed_dataset(kjv_slice, small_tokenizer, 48, tmp_path)


def test_interrupted_prepare_leaves_no_file(
    kjv_slice: Path, small_tokenizer: Tokenizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    encode = small_tokenizer.encode
    n_calls = 0

    def encode_then_fail(texts):
        nonlocal n_calls
        n_calls += 1
        if n_calls == 3:
            raise KeyboardInterrupt  # as if the user pressed ^C mid-write
        return encode(texts)

    monkeypatch.setattr(pack_module, "TOKENS_PER_RECORD_BATCH", 256)  # some batches are already on disk
    monkeypatch.setattr(small_tokenizer, "encode", encode_then_fail)
    with pytest.raises(KeyboardInterrupt):
        prepare_packed_dataset(kjv_slice, small_tokenizer, 32, tmp_path, docs_per_batch=4)
    assert list((tmp_path / "packed").iterdir()) == []

    monkeypatch.setattr(small_tokenizer, "encode", encode)
    path = prepare_packed_dataset(kjv_slice, small_tokenizer, 32, tmp_path, docs_per_batch=4)
    assert len(PackedDataset(path)) > 0


def test_empty_corpus_is_an_error(small_tokenizer: Tokenizer, tmp_path: Path):
    corpus = tmp_path / "empty.jsonl"
    corpus.write_text("\n")
    with pytest.raises(ValueError, match="no rows to write; the corpus has no documents"):
        prepare_packed_dataset(corpus, small_tokenizer, 16, tmp_path)
    assert list((tmp_path / "packed").iterdir()) == []
