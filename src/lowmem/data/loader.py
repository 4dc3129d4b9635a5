"""Reading packed Arrow files: a memory-mapped dataset, batch construction, and a resumable prefetching loader."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import msgspec
import numpy as np
import pyarrow as pa
import torch

from lowmem.data.tokenizer_base import Tokenizer

IGNORE_INDEX = -100  # torch.nn.functional.cross_entropy's default ignore_index


class PackedDataset:
    """A packed Arrow IPC file (from `prepare_packed_dataset`), memory-mapped; rows are read on demand."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._mmap = pa.memory_map(str(self.path))
        try:
            reader = pa.ipc.open_file(self._mmap)
        except pa.ArrowInvalid as e:
            raise ValueError(
                f"{self.path}: not an Arrow IPC file ({e}); delete it and run prepare_packed_dataset again"
            ) from None
        schema = reader.schema
        self.metadata: dict[str, object] = {
            k.decode(): msgspec.json.decode(v) for k, v in (schema.metadata or {}).items()
        }
        self.seq_len = self._check_schema(schema)
        # Zero-copy (n_rows, seq_len) int32 views into the mapped file, one per record batch.
        # (n_rows, seq_len) uint8 views of the loss mask likewise.
        self._tokens: list[np.ndarray] = []
        self._doc_ids: list[np.ndarray] = []
        self._loss_mask: list[np.ndarray] = []
        for i in range(reader.num_record_batches):
            batch = reader.get_batch(i)
            self._tokens.append(_column_view(batch.column("tokens"), self.seq_len))
            self._doc_ids.append(_column_view(batch.column("doc_ids"), self.seq_len))
            self._loss_mask.append(_column_view(batch.column("loss_mask"), self.seq_len))
        sizes = [len(t) for t in self._tokens]
        self._starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])

    def _check_schema(self, schema: pa.Schema) -> int:
        for name, value_type in (("tokens", pa.int32()), ("doc_ids", pa.int32()), ("loss_mask", pa.uint8())):
            field = schema.field(name) if name in schema.names else None
            if (
                field is None
                or not pa.types.is_fixed_size_list(field.type)
                or field.type.value_type != value_type
            ):
                raise ValueError(
                    f"{self.path}: column {name!r} is missing or not fixed_size_list<{value_type}> "
                    f"(schema: {schema}); this is not a current lowmem packed file: delete it and make one "
                    "with prepare_packed_dataset"
                )
        seq_len = schema.field("tokens").type.list_size
        if (
            schema.field("doc_ids").type.list_size != seq_len
            or schema.field("loss_mask").type.list_size != seq_len
            or self.metadata.get("seq_len", seq_len) != seq_len
        ):
            raise ValueError(
                f"{self.path}: inconsistent seq_len in schema {schema}; delete it and prepare again"
            )
        return seq_len

    def __len__(self) -> int:
        return int(self._starts[-1])

    def rows(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Gather rows by global index.

        Args:
            indices: (B,) integer row indices in [0, len(self)).
        Returns:
            tokens (B, T) int64, doc_ids (B, T) int64 and loss_mask (B, T) bool, T = seq_len; only these rows
            are copied.
        """
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        if len(indices) and (indices.min() < 0 or indices.max() >= len(self)):
            bad = indices[(indices < 0) | (indices >= len(self))][0]
            raise IndexError(f"row {bad} out of range for {self.path} with {len(self)} rows")
        tokens = np.empty((len(indices), self.seq_len), np.int64)
        doc_ids = np.empty((len(indices), self.seq_len), np.int64)
        loss_mask = np.empty((len(indices), self.seq_len), bool)
        which = np.searchsorted(self._starts, indices, side="right") - 1
        for b in np.unique(which):
            sel = which == b
            local = indices[sel] - self._starts[b]
            tokens[sel] = self._tokens[b][local]
            doc_ids[sel] = self._doc_ids[b][local]
            loss_mask[sel] = self._loss_mask[b][local] != 0
        return tokens, doc_ids, loss_mask

    def __repr__(self) -> str:
        return f"PackedDataset({str(self.path)!r}, rows={len(self)}, seq_len={self.seq_len})"


def _column_view(column: pa.FixedSizeListArray, seq_len: int) -> np.ndarray:
    flat = column.flatten().to_numpy(zero_copy_only=True)  # honours the array's offset; no copy
    return flat.reshape(-1, seq_len)


def make_batch(
    tokens: np.ndarray, doc_ids: np.ndarray, loss_mask: np.ndarray | None = None
) -> dict[str, torch.Tensor]:
    """Model inputs and next-token labels for packed rows.

    Args:
        tokens: (B, T) integer token ids.
        doc_ids: (B, T) integer document index per token, 0 for padding.
        loss_mask: (B, T) bool/0-1, whether token t is trained *as a target*; None trains every target.
    Returns:
        tokens (B, T) int64; labels (B, T) int64 = tokens[t+1] where tokens t and t+1 are in the same
        non-padding document and loss_mask[t+1] is set, else -100 (so the last column is always -100);
        positions (B, T) int64, 0 at each document start (and at the row start) and counting up within it;
        doc_ids (B, T) int64.
    """
    tokens = np.asarray(tokens, dtype=np.int64)
    doc_ids = np.asarray(doc_ids, dtype=np.int64)
    if tokens.ndim != 2 or tokens.shape != doc_ids.shape:
        raise ValueError(f"tokens {tokens.shape} and doc_ids {doc_ids.shape} must both be (B, T)")
    B, T = tokens.shape
    labels = np.full((B, T), IGNORE_INDEX, np.int64)
    same_doc = (doc_ids[:, 1:] == doc_ids[:, :-1]) & (doc_ids[:, :-1] != 0)  # (B, T-1)
    if loss_mask is not None:
        loss_mask = np.asarray(loss_mask)
        if loss_mask.shape != tokens.shape:
            raise ValueError(f"loss_mask {loss_mask.shape} must match tokens {tokens.shape}")
        same_doc &= loss_mask[:, 1:] != 0  # the mask belongs to the target token t+1
    labels[:, :-1] = np.where(same_doc, tokens[:, 1:], IGNORE_INDEX)
    starts = np.ones((B, T), bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    t = np.broadcast_to(np.arange(T, dtype=np.int64), (B, T))
    last_start = np.maximum.accumulate(np.where(starts, t, 0), axis=1)
    return {
        "tokens": torch.from_numpy(np.ascontiguousarray(tokens)),
        "labels": torch.from_numpy(labels),
        "positions": torch.from_numpy(t - last_start),
        "doc_ids": torch.from_numpy(np.ascontiguousarray(doc_ids)),
    }


def split_rows(n_rows: int, eval_rows: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A deterministic held-out split: (train_idx, eval_idx), disjoint, each sorted int64, covering all rows."""
    if not 0 <= eval_rows < n_rows:
        raise ValueError(
            f"eval_rows={eval_rows} with {n_rows} rows; use 0 <= eval_rows < n_rows so training keeps some rows"
        )
    perm = np.random.default_rng(seed).permutation(n_rows)
    return np.sort(perm[eval_rows:]), np.sort(perm[:eval_rows])


class RowSource(Protocol):
    def __len__(self) -> int: ...
    def rows(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]: ...


class _EpochSchedule:
    """Which rows make batch (epoch, cursor): a pure function of the seed, shared by loader and thread."""

    def __init__(
        self, dataset: RowSource, row_indices: np.ndarray, micro_batch: int, seed: int, shuffle: bool,
        rank: int = 0, world_size: int = 1, pin_memory: bool = False,
    ):
        self.dataset = dataset
        self.pin_memory = pin_memory  # page-locked batches (made in the prefetch thread): async copies to a GPU
        self.row_indices = row_indices
        self.micro_batch = micro_batch
        self.seed = seed
        self.shuffle = shuffle
        self.rank, self.world_size = rank, world_size
        self.batches_per_epoch = len(row_indices) // (micro_batch * world_size)
        self._order: tuple[int, np.ndarray] | None = None  # the last epoch's order, reused within it

    def order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return self.row_indices
        cached = self._order
        if cached is None or cached[0] != epoch:
            perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.row_indices))
            cached = self._order = (epoch, self.row_indices[perm])
        return cached[1]

    def batch(self, epoch: int, cursor: int) -> dict[str, torch.Tensor]:
        global_batch = self.micro_batch * self.world_size
        start = cursor * global_batch + self.rank * self.micro_batch  # this rank's slice of the global batch
        rows = self.order(epoch)[start : start + self.micro_batch]
        batch = make_batch(*self.dataset.rows(rows))
        if self.pin_memory:
            batch = {k: v.pin_memory() for k, v in batch.items()}
        return batch

    def advance(self, epoch: int, cursor: int) -> tuple[int, int]:
        cursor += 1
        return (epoch + 1, 0) if cursor == self.batches_per_epoch else (epoch, cursor)


class BatchLoader:
    """Infinite, epoch-aware batches of packed rows, prefetched in a background thread, resumable exactly.

    Epoch e visits `row_indices` in the order `np.random.default_rng([seed, e]).permutation` (or as given
    when shuffle=False), `micro_batch` rows at a time, dropping the last incomplete batch, then goes on to
    epoch e + 1. Batch (e, c) depends only on (seed, e, c), so `state_dict()` — the (epoch, cursor) of the
    next batch the consumer will get — is all it takes to resume.

    Data parallel: with `world_size` W > 1, the schedule is that of one loader with `micro_batch * W` rows
    per batch, and rank r gets rows [r * micro_batch, (r + 1) * micro_batch) of each such global batch. So the
    ranks' batches are disjoint, their union is the single-process batch of `micro_batch * W` rows, and the
    state (epoch, cursor) is the same on every rank.

    Args:
        dataset: a PackedDataset (anything with `rows(indices)` and `__len__`).
        row_indices: (N,) rows to draw from, e.g. the train side of `split_rows`.
        micro_batch: rows per batch (per rank).
        seed: shuffling seed.
        shuffle: permute each epoch.
        prefetch: batches made ahead in a daemon thread; 0 makes them in the caller's thread.
        rank, world_size: this process's share of each global batch (see above); 0, 1 in a single process.
        pin_memory: pin each batch (in the prefetch thread) so that its copy to a GPU runs without blocking.
    """

    def __init__(
        self,
        dataset: RowSource,
        row_indices: np.ndarray,
        micro_batch: int,
        seed: int,
        *,
        shuffle: bool = True,
        prefetch: int = 2,
        rank: int = 0,
        world_size: int = 1,
        pin_memory: bool = False,
    ):
        row_indices = np.asarray(row_indices, dtype=np.int64)
        if row_indices.ndim != 1:
            raise ValueError(f"row_indices has shape {row_indices.shape}; pass a 1-D array of row numbers")
        if len(row_indices) and (row_indices.min() < 0 or row_indices.max() >= len(dataset)):
            raise ValueError(
                f"row_indices must lie in [0, {len(dataset)}) for a dataset of {len(dataset)} rows"
            )
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} with world_size={world_size}; use 0 <= rank < world_size")
        if micro_batch < 1 or len(row_indices) < micro_batch * world_size:
            raise ValueError(
                f"micro_batch={micro_batch} x world_size={world_size} with {len(row_indices)} rows gives no full "
                "batch; use 1 <= micro_batch x world_size <= the number of rows"
            )
        if prefetch < 0:
            raise ValueError(f"prefetch={prefetch}; use 0 (no thread) or a positive queue size")
        self.dataset = dataset
        self.micro_batch = micro_batch
        self.seed = seed
        self.prefetch = prefetch
        self._schedule = _EpochSchedule(dataset, row_indices, micro_batch, seed, shuffle, rank, world_size,
                                        pin_memory)
        self.batches_per_epoch = self._schedule.batches_per_epoch
        self._epoch, self._cursor = 0, 0
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue | None = None
        self._stop: threading.Event | None = None

    def state_dict(self) -> dict[str, int]:
        """Where the next batch handed to the consumer comes from (read-ahead by the thread is not counted)."""
        return {"epoch": self._epoch, "cursor": self._cursor}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from a `state_dict()`: the following batches are those the saved loader would have given."""
        epoch, cursor = int(state["epoch"]), int(state["cursor"])
        if epoch < 0 or not 0 <= cursor < self.batches_per_epoch:
            raise ValueError(
                f"loader state {state} does not fit {self.batches_per_epoch} batches per epoch; "
                "resume with the same rows and micro_batch the state was saved with"
            )
        self._stop_thread()
        self._epoch, self._cursor = epoch, cursor

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self.prefetch == 0:
            batch = self._schedule.batch(self._epoch, self._cursor)
        else:
            if self._thread is None:
                self._start_thread()
            assert self._queue is not None
            item = self._queue.get()
            if isinstance(item, BaseException):
                self._stop_thread()
                raise item
            where, batch = item
            assert where == (self._epoch, self._cursor), (where, self.state_dict())
        self._epoch, self._cursor = self._schedule.advance(self._epoch, self._cursor)
        return batch

    def _start_thread(self) -> None:
        self._queue = queue.Queue(maxsize=self.prefetch)
        self._stop = threading.Event()
        # The thread holds the schedule, not the loader, so a loader dropped without close() is still
        # collected and its __del__ stops the thread.
        self._thread = threading.Thread(
            target=_produce,
            args=(self._schedule, self._epoch, self._cursor, self._queue, self._stop),
            name="lowmem-batch-prefetch",
            daemon=True,
        )
        self._thread.start()

    def _stop_thread(self) -> None:
        if self._thread is None:
            return
        assert self._stop is not None
        self._stop.set()
        self._thread.join()
        self._thread = self._queue = self._stop = None

    def close(self) -> None:
        """Stop the prefetch thread; iterating again restarts it from the current state."""
        self._stop_thread()

    def __enter__(self) -> BatchLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        stop = getattr(self, "_stop", None)
        if stop is not None:
            stop.set()


def _produce(
    schedule: _EpochSchedule, epoch: int, cursor: int, out: queue.Queue, stop: threading.Event
) -> None:
    """Prefetch thread: put ((epoch, cursor), batch) items in order; an exception is put for the consumer."""
    try:
        while not stop.is_set():
            if not _put_unless_stopped(out, ((epoch, cursor), schedule.batch(epoch, cursor)), stop):
                return
            epoch, cursor = schedule.advance(epoch, cursor)
    except BaseException as e:
        _put_unless_stopped(out, e, stop)


def _put_unless_stopped(out: queue.Queue, item: object, stop: threading.Event, poll_s: float = 0.05) -> bool:
    """Put `item`, waiting for room, unless `stop` is set first; True if it was put."""
    while not stop.is_set():
        try:
            out.put(item, timeout=poll_s)
            return True
        except queue.Full:
            continue
    return False


def inspect_rows(path: str | Path, tokenizer: Tokenizer, n: int = 3) -> str:
    """Decode the first `n` rows of a packed file for reading: documents one per line, `[[...]]` untrained.

    A span is "untrained" when its tokens are not targets in the loss: masked by loss_mask, or the first token
    of a document in the row (nothing in the row predicts it). bos/eos show as `<s>` / `</s>`.
    """
    ds = PackedDataset(path)
    n = min(n, len(ds))
    tokens, doc_ids, loss_mask = ds.rows(np.arange(n))
    meta = ds.metadata
    lines = [
        f"{ds.path.name}: {len(ds)} rows of {ds.seq_len} tokens, format {meta.get('format')!r}, "
        f"packing {meta.get('packing')!r}, padding {meta.get('padding_fraction', 0.0):.2%}, "
        f"skipped records {meta.get('n_skipped', 0)}"
    ]
    for r in range(n):
        trained = _trained_targets(doc_ids[r], loss_mask[r])
        lines.append(
            f"--- row {r}: {int(np.count_nonzero(doc_ids[r]))} tokens, "
            f"{len(np.unique(doc_ids[r][doc_ids[r] != 0]))} documents, {int(trained.sum())} trained"
        )
        for doc_id in dict.fromkeys(doc_ids[r].tolist()):
            where = doc_ids[r] == doc_id
            if doc_id == 0:
                lines.append(f"  [padding x{int(where.sum())}]")
                continue
            lines.append(f"  doc {doc_id}: " + _render_spans(tokenizer, tokens[r][where], trained[where]))
    return "\n".join(lines)


def _trained_targets(doc_ids: np.ndarray, loss_mask: np.ndarray) -> np.ndarray:
    """(T,) bool: token t is a target in the loss (same rule as make_batch's labels, seen from the target)."""
    trained = np.zeros(len(doc_ids), bool)
    trained[1:] = (doc_ids[1:] == doc_ids[:-1]) & (doc_ids[1:] != 0) & (loss_mask[1:] != 0)
    return trained


def _render_spans(tokenizer: Tokenizer, ids: np.ndarray, trained: np.ndarray) -> str:
    cuts = np.flatnonzero(np.diff(trained.astype(np.int8))) + 1
    out = []
    for span_ids, span_trained in zip(np.split(ids, cuts), np.split(trained, cuts), strict=True):
        text = _decode_with_specials(tokenizer, span_ids)
        out.append(text if span_trained[0] else f"[[{text}]]")
    return repr("".join(out))[1:-1]  # one line per document: newlines shown as \\n


def _decode_with_specials(tokenizer: Tokenizer, ids: np.ndarray) -> str:
    names = {tokenizer.bos_id: "<s>", tokenizer.eos_id: "</s>"}
    parts, run = [], []
    for i in ids.tolist():
        if i in names:
            if run:
                parts.append(tokenizer.decode(run))
                run = []
            parts.append(names[i])
        else:
            run.append(i)
    if run:
        parts.append(tokenizer.decode(run))
    return "".join(parts)
