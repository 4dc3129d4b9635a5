from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import lowmem.data.pack as pack_module
from lowmem.data import (
    PackCounts,
    PackedDataset,
    Tokenizer,
    make_batch,
    pack_documents,
    pack_token_lists,
    prepare_packed_dataset,
    read_documents,
    shipped_corpus,
)
from lowmem.spec.structs import DataSpec

token_lists = st.lists(st.lists(st.integers(4, 50_000), min_size=1, max_size=40), min_size=1, max_size=25)
seq_lens = st.integers(2, 17)
policies = st.sampled_from(["split", "truncate", "drop"])


def pieces_of(doc_ids: np.ndarray, tokens: np.ndarray, mask: np.ndarray) -> list[tuple[list[int], list[int]]]:
    """The (tokens, mask) of each document piece in the rows, in doc-id order."""
    flat_d, flat_t, flat_m = doc_ids.reshape(-1), tokens.reshape(-1), mask.reshape(-1)
    return [
        (flat_t[flat_d == d].tolist(), flat_m[flat_d == d].tolist()) for d in np.unique(flat_d[flat_d != 0])
    ]


@settings(max_examples=150, deadline=None)
@given(
    docs=token_lists,
    seq_len=seq_lens,
    too_long=policies,
    packing=st.sampled_from(["best-fit", "greedy"]),
    window=st.integers(1, 40),
    data=st.data(),
)
def test_packing_loses_and_duplicates_nothing(docs, seq_len, too_long, packing, window, data):
    masks = [data.draw(st.lists(st.integers(0, 1), min_size=len(d), max_size=len(d))) for d in docs]
    counts = PackCounts()
    blocks = list(
        pack_documents(
            [(np.array(d, np.int32), np.array(m, np.uint8)) for d, m in zip(docs, masks, strict=True)],
            seq_len,
            packing=packing,
            too_long=too_long,
            pad_id=1,
            window_docs=window,
            window_tokens=window * 5,
            counts=counts,
        )
    )
    empty = np.zeros((0, seq_len), np.int32)
    blocks = blocks or [(empty, empty, empty.astype(np.uint8))]  # everything dropped
    tokens, doc_ids, mask = (np.concatenate([b[i] for b in blocks]) for i in range(3))
    assert tokens.shape == doc_ids.shape == mask.shape and tokens.shape[1] == seq_len
    assert (tokens[doc_ids == 0] == 1).all() and (mask[doc_ids == 0] == 0).all()
    # Each document's (token, mask) pairs survive exactly, in order, unless too_long cuts or drops them;
    # a document's pieces are consecutive doc ids, so joining pieces in id order rebuilds the stream.
    kept = [(d, m) for d, m in zip(docs, masks, strict=True) if too_long != "drop" or len(d) <= seq_len]
    expected_t = [t for d, _ in kept for t in (d[:seq_len] if too_long == "truncate" else d)]
    expected_m = [x for d, m in kept for x in (m[:seq_len] if too_long == "truncate" else m)]
    pieces = pieces_of(doc_ids, tokens, mask)
    if too_long != "split":  # documents stay whole: the pieces are exactly the kept documents
        assert sorted(t for t, _ in pieces) == sorted(
            (d[:seq_len] if too_long == "truncate" else d) for d, _ in kept
        )
    assert sorted(t for p, _ in pieces for t in p) == sorted(expected_t)
    assert sum(m for _, pm in pieces for m in pm) == sum(expected_m)
    for p_tokens, p_mask in pieces:  # mask stays aligned with its tokens
        assert len(p_tokens) == len(p_mask) <= seq_len
    assert counts.n_documents == len(docs)
    assert counts.n_dropped == (sum(len(d) > seq_len for d in docs) if too_long == "drop" else 0)
    assert counts.n_pieces == len(pieces)
    # Labels never cross a document: every label is the next token of the same piece, and masked targets drop.
    labels = make_batch(tokens, doc_ids, mask)["labels"].numpy()
    ok = (doc_ids[:, 1:] == doc_ids[:, :-1]) & (doc_ids[:, 1:] != 0) & (mask[:, 1:] == 1)
    assert ((labels[:, :-1] != -100) == ok).all() and (labels[:, -1] == -100).all()


def test_split_pieces_are_in_order_and_rejoin(small_tokenizer: Tokenizer):
    docs = [list(range(10, 33)), [5, 6, 7], [8, 9]]
    tokens, doc_ids, _ = pack_token_lists(docs, 8, too_long="split")
    pieces = [t for t, _ in pieces_of(doc_ids, tokens, np.ones_like(tokens))]
    joined = [t for p in pieces for t in p if t >= 10]
    assert sorted(joined) == joined == list(range(10, 33))
    assert max(map(len, pieces)) <= 8


def test_best_fit_beats_greedy_on_a_small_example():
    docs = [[1] * 6, [2] * 5, [3] * 3, [4] * 2]  # greedy: 6 | 5 3 | 2 → 3 rows; best fit: 6 2 | 5 3 → 2
    assert len(pack_token_lists(docs, 8, packing="greedy").tokens) == 3
    best = pack_token_lists(docs, 8, packing="best-fit")
    assert len(best.tokens) == 2 and (best.doc_ids != 0).all()


def test_too_long_policies():
    docs = [list(range(1, 11)), [20, 21]]
    split = pack_token_lists(docs, 4, too_long="split", packing="greedy")
    assert sorted(split.tokens[split.doc_ids != 0].tolist()) == sorted(docs[0] + docs[1])
    trunc = pack_token_lists(docs, 4, too_long="truncate", packing="greedy")
    assert trunc.tokens.tolist() == [[1, 2, 3, 4], [20, 21, 0, 0]]
    drop = pack_token_lists(docs, 4, too_long="drop", packing="greedy")
    assert drop.tokens.tolist() == [[20, 21, 0, 0]]
    with pytest.raises(ValueError, match=r"seq_len=1; use an integer >= 2"):
        pack_token_lists([[1, 2]], 1)


@pytest.fixture(scope="session")
def kjv_documents(small_tokenizer: Tokenizer) -> list[list[int]]:
    """The whole shipped corpus, tokenized with the small tokenizer (about 1.8M tokens)."""
    tok = small_tokenizer
    return [[tok.bos_id, *ids, tok.eos_id] for ids in tok.encode(list(read_documents(shipped_corpus())))]


@pytest.mark.parametrize("seq_len", [256, 1024])
def test_best_fit_waste_on_the_shipped_corpus(kjv_documents: list[list[int]], seq_len: int):
    waste = {}
    for packing in ("greedy", "best-fit"):
        # Small windows, so the measurement includes the window boundaries a big corpus would have.
        rows = pack_token_lists(kjv_documents, seq_len, packing=packing, window_tokens=1 << 18)
        waste[packing] = float((rows.doc_ids == 0).mean())
    print(f"seq_len {seq_len}: padding greedy {waste['greedy']:.2%}, best-fit {waste['best-fit']:.2%}")
    assert waste["best-fit"] < 0.02 < waste["greedy"]


def test_prepared_file_matches_the_pure_packer(
    kjv_slice: Path, small_tokenizer: Tokenizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    # Small record batches and tokenizer batches, so rows and documents cross both kinds of boundary.
    monkeypatch.setattr(pack_module, "TOKENS_PER_RECORD_BATCH", 64 * 5)
    seq_len = 64
    progress: list[tuple[int, int]] = []
    path = prepare_packed_dataset(
        kjv_slice,
        small_tokenizer,
        seq_len,
        tmp_path,
        DataSpec(),
        docs_per_batch=3,
        progress=lambda n, b: progress.append((n, b)),
    )
    assert path.parent == tmp_path / "packed" and path.suffix == ".arrow"
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temp files left
    assert progress[-1] == (40, kjv_slice.stat().st_size) and progress == sorted(progress)

    tok = small_tokenizer
    docs = [[tok.bos_id, *ids, tok.eos_id] for ids in tok.encode(list(read_documents(kjv_slice)))]
    expected = pack_token_lists(docs, seq_len, pad_id=tok.pad_id)
    with pa.memory_map(str(path)) as source:
        reader = pa.ipc.open_file(source)  # an IPC *file*, with a footer
        assert reader.num_record_batches > 2
        table = reader.read_all()
    assert table.schema.field("loss_mask").type == pa.list_(pa.uint8(), seq_len)
    for name in ("tokens", "doc_ids", "loss_mask"):
        got = table.column(name).combine_chunks().flatten().to_numpy().reshape(-1, seq_len)
        np.testing.assert_array_equal(got, getattr(expected, name))

    meta = PackedDataset(path).metadata
    n_real = int((expected.doc_ids != 0).sum())
    assert meta["seq_len"] == seq_len and meta["tokenizer_key"] == tok.key and meta["n_skipped"] == 0
    assert meta["n_documents"] == len(docs) and meta["n_tokens"] == n_real and meta["packing"] == "best-fit"
    assert meta["n_padding"] == expected.doc_ids.size - n_real and meta["n_rows"] == len(expected.tokens)
    assert meta["padding_fraction"] == pytest.approx(1 - n_real / expected.doc_ids.size)


def test_second_prepare_reuses_the_file_and_settings_change_the_key(
    kjv_slice: Path, small_tokenizer: Tokenizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    first = prepare_packed_dataset(kjv_slice, small_tokenizer, 32, tmp_path, DataSpec())
    mtime = first.stat().st_mtime_ns
    key = pack_module.packed_cache_key
    base = key(kjv_slice, small_tokenizer, 32, DataSpec())
    changed = [
        DataSpec(format="instruct"),
        DataSpec(columns={"text": "body"}),
        DataSpec(train_on_prompt=True),
        DataSpec(packing="greedy"),
        DataSpec(too_long="drop"),
        DataSpec(bad_rows="skip"),
        DataSpec(text_field="b"),
    ]
    assert len({base, *(key(kjv_slice, small_tokenizer, 32, d) for d in changed)}) == len(changed) + 1
    monkeypatch.setattr(pack_module, "TEMPLATE_VERSION", 99)
    assert key(kjv_slice, small_tokenizer, 32, DataSpec()) != base
    monkeypatch.undo()

    def no_tokenizing(texts):
        raise AssertionError("re-tokenized although the packed file is cached")

    monkeypatch.setattr(small_tokenizer, "encode", no_tokenizing)
    assert prepare_packed_dataset(kjv_slice, small_tokenizer, 32, tmp_path, DataSpec()) == first
    assert first.stat().st_mtime_ns == mtime
    with pytest.raises(AssertionError, match="re-tokenized"):
        prepare_packed_dataset(kjv_slice, small_tokenizer, 32, tmp_path, DataSpec(packing="greedy"))


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

    monkeypatch.setattr(pack_module, "TOKENS_PER_RECORD_BATCH", 256)
    monkeypatch.setattr(pack_module, "WINDOW_DOCS", 4)  # some batches are already on disk
    monkeypatch.setattr(small_tokenizer, "encode", encode_then_fail)
    with pytest.raises(KeyboardInterrupt):
        prepare_packed_dataset(kjv_slice, small_tokenizer, 32, tmp_path, DataSpec(), docs_per_batch=4)
    assert list((tmp_path / "packed").iterdir()) == []

    monkeypatch.setattr(small_tokenizer, "encode", encode)
    path = prepare_packed_dataset(kjv_slice, small_tokenizer, 32, tmp_path, DataSpec(), docs_per_batch=4)
    assert len(PackedDataset(path)) > 0


def test_empty_source_is_an_error(small_tokenizer: Tokenizer, tmp_path: Path):
    corpus = tmp_path / "empty.jsonl"
    corpus.write_text("\n")
    with pytest.raises(ValueError, match="no rows to write: no usable records"):
        prepare_packed_dataset(corpus, small_tokenizer, 16, tmp_path, DataSpec())
    assert list((tmp_path / "packed").iterdir()) == []


MEASURE_RSS = """
import sys
from lowmem.data import load_tokenizer, prepare_packed_dataset
import lowmem.data.pack as pack
from lowmem.spec.structs import DataSpec

def hwm_kib():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])

# Windows and record batches of 64k tokens: the bounds packing memory is flat at, here below the small corpus.
pack.WINDOW_TOKENS = pack.TOKENS_PER_RECORD_BATCH = int(sys.argv[4])
tok = load_tokenizer(sys.argv[2])
# ru_maxrss (= VmHWM) would be set by importing torch; reset it so the peak is the packing's own.
open("/proc/self/clear_refs", "w").write("5")
before = hwm_kib()
prepare_packed_dataset(sys.argv[1], tok, 256, sys.argv[3], DataSpec())
print(before, hwm_kib())
"""


def peak_rss_kib(corpus: Path, tokenizer: Tokenizer, cache: Path, window_tokens: int) -> tuple[int, int]:
    """(RSS before, peak RSS during) prepare_packed_dataset in a fresh process, in KiB."""
    out = subprocess.run(
        [sys.executable, "-c", MEASURE_RSS, str(corpus), str(tokenizer.path), str(cache), str(window_tokens)],
        capture_output=True,
        text=True,
        check=True,
    )
    before, peak = map(int, out.stdout.split())
    return before, peak


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc to reset peak RSS")
def test_memory_stays_flat_with_corpus_size(small_tokenizer: Tokenizer, tmp_path: Path):
    import gzip

    lines = gzip.open(shipped_corpus(), "rb").readlines()[:150]
    peaks = {}
    for repeat in (1, 10):
        corpus = tmp_path / f"x{repeat}.jsonl"
        corpus.write_bytes(b"".join(lines) * repeat)
        peaks[repeat] = peak_rss_kib(corpus, small_tokenizer, tmp_path / f"cache{repeat}", 1 << 16)
    print("RSS KiB (before packing, peak):", peaks)
    # 10x the data (~2M tokens: 8 MB as int32, ~70 MB as the tokenizer's Python lists) costs < 10% more peak.
    assert peaks[10][1] < 1.10 * peaks[1][1]
