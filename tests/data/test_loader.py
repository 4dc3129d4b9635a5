from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lowmem.data.pack as pack_module
from lowmem.data import BatchLoader, PackedDataset, make_batch, pack_token_lists, split_rows

token_lists = st.lists(st.lists(st.integers(1, 1000), min_size=1, max_size=30), min_size=1, max_size=20)


@settings(max_examples=200, deadline=None)
@given(docs=token_lists, seq_len=st.integers(2, 13), packing=st.sampled_from(["best-fit", "greedy"]))
def test_labels_and_positions_stay_inside_documents(docs: list[list[int]], seq_len: int, packing: str):
    tokens, doc_ids, _ = pack_token_lists(docs, seq_len, packing=packing)
    batch = make_batch(tokens, doc_ids)
    assert all(v.dtype == torch.int64 and v.shape == tokens.shape for v in batch.values())
    labels, positions = batch["labels"].numpy(), batch["positions"].numpy()
    d = doc_ids.astype(np.int64)

    same = np.zeros_like(d, dtype=bool)
    same[:, :-1] = (d[:, 1:] == d[:, :-1]) & (d[:, :-1] != 0)
    # A label exists exactly where the next token is in the same real document, and it is that token.
    assert ((labels != -100) == same).all()
    assert (labels[:, :-1][same[:, :-1]] == tokens[:, 1:][same[:, :-1]]).all()
    assert (labels[:, -1] == -100).all()

    # Positions restart at 0 where a document (or a row) starts, else count up by one.
    starts = np.ones_like(d, dtype=bool)
    starts[:, 1:] = d[:, 1:] != d[:, :-1]
    assert (positions[starts] == 0).all()
    assert (positions[:, 1:][~starts[:, 1:]] == positions[:, :-1][~starts[:, 1:]] + 1).all()

    # Every next-token pair inside a document piece is learned: one label lost per extra piece.
    n_pieces = len(np.unique(d[d != 0]))
    assert int(same.sum()) == int((d != 0).sum()) - n_pieces


@settings(max_examples=100, deadline=None)
@given(
    rows=st.lists(
        st.lists(st.tuples(st.integers(0, 3), st.booleans()), min_size=6, max_size=6), min_size=1, max_size=4
    )
)
def test_loss_mask_masks_the_target(rows: list[list[tuple[int, bool]]]):
    doc_ids = np.array([[d for d, _ in r] for r in rows])
    loss_mask = np.array([[m for _, m in r] for r in rows])
    tokens = np.arange(doc_ids.size).reshape(doc_ids.shape) + 10
    unmasked = make_batch(tokens, doc_ids)["labels"].numpy()
    labels = make_batch(tokens, doc_ids, loss_mask)["labels"].numpy()
    # The label at t predicts token t+1, so it survives exactly where loss_mask[t+1] is set.
    expected = unmasked.copy()
    expected[:, :-1][~loss_mask[:, 1:]] = -100
    np.testing.assert_array_equal(labels, expected)


def test_make_batch_masked_example():
    batch = make_batch(np.array([[5, 6, 7, 8]]), np.array([[1, 1, 1, 1]]), np.array([[0, 0, 1, 1]]))
    assert batch["labels"].tolist() == [[-100, 7, 8, -100]]


def test_make_batch_example():
    batch = make_batch(np.array([[5, 6, 7, 8, 0]]), np.array([[1, 1, 2, 2, 0]]))
    assert batch["labels"].tolist() == [[6, -100, 8, -100, -100]]
    assert batch["positions"].tolist() == [[0, 1, 0, 1, 0]]


def test_split_rows_is_deterministic_and_disjoint():
    train, held = split_rows(100, 10, seed=3)
    assert len(held) == 10 and len(train) == 90
    assert sorted(np.concatenate([train, held]).tolist()) == list(range(100))
    again = split_rows(100, 10, seed=3)
    assert (again[0] == train).all() and (again[1] == held).all()
    assert not (split_rows(100, 10, seed=4)[1] == held).all()
    with pytest.raises(ValueError, match="eval_rows=100 with 100 rows"):
        split_rows(100, 100, seed=0)


@pytest.fixture
def packed_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """43 rows of 8 tokens in record batches of 5 rows; row r holds tokens r*8 .. r*8+7 (1 doc per 3 rows)."""
    monkeypatch.setattr(pack_module, "TOKENS_PER_RECORD_BATCH", 5 * 8)
    tokens = np.arange(43 * 8, dtype=np.int32).reshape(43, 8)
    doc_ids = (np.arange(43 * 8, dtype=np.int32) // 24 + 1).reshape(43, 8)
    loss_mask = (tokens % 3 != 0).astype(np.uint8)
    path = tmp_path / "rows.arrow"
    blocks = [
        pack_module.RowBlock(tokens[i : i + 7], doc_ids[i : i + 7], loss_mask[i : i + 7])
        for i in range(0, 43, 7)
    ]
    pack_module.write_packed_arrow(path, blocks, 8, {"tokenizer_key": "test"})
    return path


def test_packed_dataset_reads_rows_across_record_batches(packed_file: Path):
    allocated = pa.total_allocated_bytes()
    ds = PackedDataset(packed_file)
    assert len(ds) == 43 and ds.seq_len == 8
    assert ds.metadata["tokenizer_key"] == "test" and ds.metadata["n_rows"] == 43
    idx = np.array([42, 0, 4, 5, 17, 5])
    tokens, doc_ids, loss_mask = ds.rows(idx)
    assert tokens.dtype == doc_ids.dtype == np.int64 and tokens.shape == (6, 8) and loss_mask.dtype == bool
    np.testing.assert_array_equal(tokens, idx[:, None] * 8 + np.arange(8))
    np.testing.assert_array_equal(loss_mask, tokens % 3 != 0)
    np.testing.assert_array_equal(doc_ids, (idx[:, None] * 8 + np.arange(8)) // 24 + 1)
    # Memory-mapped: opening and reading allocated nothing in Arrow's memory pool.
    assert pa.total_allocated_bytes() == allocated
    assert not ds._tokens[0].flags.owndata
    with pytest.raises(IndexError, match="row 43 out of range"):
        ds.rows(np.array([43]))


def test_packed_dataset_rejects_other_files(tmp_path: Path):
    bad = tmp_path / "bad.arrow"
    bad.write_bytes(b"not arrow at all")
    with pytest.raises(ValueError, match=r"bad\.arrow: not an Arrow IPC file.*prepare_packed_dataset"):
        PackedDataset(bad)


def take(loader: BatchLoader, n: int) -> list[np.ndarray]:
    """First-column tokens // 8 of n batches: the row numbers each batch holds (the loader is infinite)."""
    return [batch["tokens"][:, 0].numpy() // 8 for _, batch in zip(range(n), loader, strict=False)]


def test_loader_epochs_and_determinism(packed_file: Path):
    ds = PackedDataset(packed_file)
    rows = np.arange(3, 43)  # 40 rows; with micro_batch 6: 6 batches per epoch, 4 rows dropped each epoch
    with BatchLoader(ds, rows, 6, seed=1) as loader, BatchLoader(ds, rows, 6, seed=1, prefetch=0) as inline:
        assert loader.batches_per_epoch == 6
        got = take(loader, 13)
        assert loader.state_dict() == {"epoch": 2, "cursor": 1}
        assert all((a == b).all() for a, b in zip(got, take(inline, 13), strict=True))
    epoch0, epoch1 = np.concatenate(got[:6]), np.concatenate(got[6:12])
    for epoch, seen in enumerate([epoch0, epoch1]):
        assert len(set(seen.tolist())) == 36 and set(seen.tolist()) <= set(rows.tolist())
        expected = rows[np.random.default_rng([1, epoch]).permutation(40)][:36]
        np.testing.assert_array_equal(seen, expected)
    assert not (epoch0 == epoch1).all()
    with BatchLoader(ds, rows, 6, seed=2) as other_seed:
        assert not (np.concatenate(take(other_seed, 6)) == epoch0).all()
    with BatchLoader(ds, rows, 6, seed=1, shuffle=False) as ordered:
        np.testing.assert_array_equal(np.concatenate(take(ordered, 6)), rows[:36])


@pytest.mark.parametrize("n_before", [0, 4, 6, 11])
def test_loader_resumes_exactly(packed_file: Path, n_before: int):
    ds = PackedDataset(packed_file)
    rows = np.arange(40)
    with BatchLoader(ds, rows, 7, seed=5) as reference:
        expected = take(reference, n_before + 8)
    with BatchLoader(ds, rows, 7, seed=5, prefetch=3) as first:
        take(first, n_before)
        state = first.state_dict()  # the thread has read ahead; the state must not include that
    with BatchLoader(ds, rows, 7, seed=5) as resumed:
        resumed.load_state_dict(state)
        got = take(resumed, 8)
    assert all((a == b).all() for a, b in zip(got, expected[n_before:], strict=True))
    # Loading a state into a loader that is already running also works.
    with BatchLoader(ds, rows, 7, seed=5) as running:
        take(running, 3)
        running.load_state_dict(state)
        assert all((a == b).all() for a, b in zip(take(running, 8), expected[n_before:], strict=True))


def test_loader_batch_contents(packed_file: Path):
    ds = PackedDataset(packed_file)
    with BatchLoader(ds, np.arange(43), 4, seed=0) as loader:
        batch = next(loader)
    tokens, doc_ids, loss_mask = ds.rows(batch["tokens"][:, 0].numpy() // 8)
    expected = make_batch(tokens, doc_ids, loss_mask)
    assert all(torch.equal(batch[k], expected[k]) for k in expected)
    assert (batch["labels"] == -100).sum() > (make_batch(tokens, doc_ids)["labels"] == -100).sum()


class FailingRows:
    def __init__(self, fail_on_call: int):
        self.n_calls = 0
        self.fail_on_call = fail_on_call

    def __len__(self) -> int:
        return 10

    def rows(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self.n_calls += 1
        if self.n_calls == self.fail_on_call:
            raise OSError("disk went away")
        return (
            np.zeros((len(indices), 4), np.int64),
            np.ones((len(indices), 4), np.int64),
            np.ones((len(indices), 4), bool),
        )


def test_thread_errors_reach_the_consumer():
    with BatchLoader(FailingRows(fail_on_call=3), np.arange(10), 2, seed=0) as loader:
        next(loader)
        next(loader)
        with pytest.raises(OSError, match="disk went away"):
            next(loader)
        assert loader.state_dict() == {"epoch": 0, "cursor": 2}  # the failed batch was not consumed


def prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "lowmem-batch-prefetch"]


def test_close_stops_the_thread(packed_file: Path):
    before = set(prefetch_threads())
    loader = BatchLoader(PackedDataset(packed_file), np.arange(43), 2, seed=0, prefetch=2)
    next(loader)
    (thread,) = set(prefetch_threads()) - before
    assert thread.daemon
    loader.close()
    assert not thread.is_alive()
    next(loader)  # iterating again restarts it from where the consumer is
    assert loader.state_dict() == {"epoch": 0, "cursor": 2}
    loader.close()


def test_ranks_split_each_global_batch(packed_file: Path):
    # data parallel: rank r's batch is its slice of the single-process batch of micro_batch x world rows
    ds, rows = PackedDataset(packed_file), np.arange(3, 43)
    single = take(BatchLoader(ds, rows, 6, seed=1, prefetch=0), 9)  # crosses into the second epoch
    ranks = [take(BatchLoader(ds, rows, 2, seed=1, prefetch=0, rank=r, world_size=3), 9) for r in range(3)]
    for step, batch in enumerate(single):
        np.testing.assert_array_equal(np.concatenate([r[step] for r in ranks]), batch)
    assert BatchLoader(ds, rows, 2, seed=1, rank=2, world_size=3).batches_per_epoch == 6
    with pytest.raises(ValueError, match="use 0 <= rank < world_size"):
        BatchLoader(ds, rows, 2, seed=1, rank=3, world_size=3)


def test_loader_rejects_bad_arguments(packed_file: Path):
    ds = PackedDataset(packed_file)
    with pytest.raises(ValueError, match="gives no full batch"):
        BatchLoader(ds, np.arange(3), 4, seed=0)
    with pytest.raises(ValueError, match=r"must lie in \[0, 43\)"):
        BatchLoader(ds, np.arange(40, 44), 2, seed=0)
    loader = BatchLoader(ds, np.arange(10), 2, seed=0)
    with pytest.raises(ValueError, match="does not fit 5 batches per epoch"):
        loader.load_state_dict({"epoch": 0, "cursor": 5})
