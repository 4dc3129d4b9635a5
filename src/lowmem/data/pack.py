"""Packing: records → (tokens, loss mask) documents → rows of `seq_len` tokens in a cached Arrow IPC file.

A document longer than `seq_len` is first handled by `too_long`: `split` into pieces of `seq_len` (the last
shorter; each piece is its own document), `truncate` to its first `seq_len` tokens, or `drop`. Documents then
never cross a row, so no label is lost at a row boundary. Two ways to fill rows:

- `best-fit` (default): best-fit decreasing (Johnson 1973) within windows of at most WINDOW_DOCS documents and
  WINDOW_TOKENS tokens: the window's documents, longest first, each go into the open row with the least room
  that still fits them, else a new row. The last pieces of split documents (already cut, so cutting them again
  costs one label per cut, not a document's context) are instead poured into the rows' free space, cut where
  a row is full: with `split`, padding is then almost only rows' last < MIN_FILL tokens. Memory is bounded
  by the window, not the corpus. Rows left more than
  1/CARRY_FRACTION empty at the end of a window are not written: their documents go back into the next
  window (at most CARRY_FRACTION of it), so a window's ragged tail is packed with the next window's documents.
- `greedy`: in document order, each document goes into the current row if it fits, else the row is padded
  and a new one started (next-fit). Kept to compare against.

Each token carries its document index (1, 2, ... in file order; 0 = padding), so the loader keeps attention,
labels and positions inside a document, and a 0/1 `loss_mask` for the token as a *target* (see records.py).
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from itertools import islice
from pathlib import Path
from typing import NamedTuple

import msgspec
import numpy as np
import pyarrow as pa

from lowmem.data.corpus import source_sha256
from lowmem.data.records import SkipLog, check_columns, encode_segments, iter_segments
from lowmem.data.templates import TEMPLATE_VERSION
from lowmem.data.tokenizer_base import Tokenizer
from lowmem.files import share
from lowmem.spec.structs import DataSpec

# Bump when the packing rule or the file layout changes.
PACK_FORMAT_VERSION = 2

# Rows are written in record batches of about this many tokens (4 MiB per int32 column).
TOKENS_PER_RECORD_BATCH = 1 << 20

# Best-fit windows: ~20 MB of tokens and masks at most; big enough that the packing is near optimal
# (measured: < 1% padding on the shipped corpus at seq_len 256 and 1024), small enough to stay flat.
WINDOW_DOCS = 50_000
WINDOW_TOKENS = 1 << 22
MIN_FILL = 8  # free space (tokens) below which a row is not topped up with a fragment of a split document
CARRY_FRACTION = 8  # rows more than 1/8 empty are re-packed with the next window, up to 1/8 of a window

DOCS_PER_BATCH = 256  # records tokenized per sentencepiece batch call

Document = tuple[np.ndarray, np.ndarray]  # tokens (L,) int32, loss_mask (L,) uint8


class RowBlock(NamedTuple):
    """Packed rows: tokens (R, T) int32, doc_ids (R, T) int32 (0 = padding), loss_mask (R, T) uint8."""

    tokens: np.ndarray
    doc_ids: np.ndarray
    loss_mask: np.ndarray


class PackCounts(msgspec.Struct, kw_only=True):
    """What packing did to the documents (written into the packed file's metadata)."""

    n_documents: int = 0  # documents that reached the packer
    n_split: int = 0  # longer than seq_len, split into pieces
    n_truncated: int = 0  # longer than seq_len, cut to seq_len
    n_dropped: int = 0  # longer than seq_len, left out
    n_tokens_dropped: int = 0  # tokens lost to truncate and drop
    n_pieces: int = 0  # documents in rows (after splitting)


# --------------------------------------------------------------------------------------------- pure


def fit_to_row(document: Document, seq_len: int, too_long: str, counts: PackCounts) -> list[Document]:
    """The pieces of one document that go into rows, per the `too_long` policy ('split'|'truncate'|'drop')."""
    tokens, mask = document
    counts.n_documents += 1
    if len(tokens) <= seq_len:
        return [document]
    if too_long == "split":
        counts.n_split += 1
        return [(tokens[i : i + seq_len], mask[i : i + seq_len]) for i in range(0, len(tokens), seq_len)]
    if too_long == "truncate":
        counts.n_truncated += 1
        counts.n_tokens_dropped += len(tokens) - seq_len
        return [(tokens[:seq_len], mask[:seq_len])]
    if too_long == "drop":
        counts.n_dropped += 1
        counts.n_tokens_dropped += len(tokens)
        return []
    raise ValueError(f"too_long={too_long!r}; use 'split', 'truncate' or 'drop'")


def best_fit_decreasing(lengths: Sequence[int], seq_len: int) -> list[list[int]]:
    """Bins (rows) of item indices: each item, longest first, into the fullest bin it fits, else a new bin.

    Args:
        lengths: item sizes, each in [1, seq_len].
        seq_len: bin capacity.
    Returns:
        one list of item indices per bin, in the order the bins were opened.
    """
    bins: list[list[int]] = []
    free_sizes: list[int] = []  # distinct free space of open bins, ascending
    bins_by_free: dict[int, list[int]] = {}  # free space -> open bins with exactly that much
    for i in np.argsort(-np.asarray(lengths, np.int64), kind="stable").tolist():
        size = lengths[i]
        k = bisect.bisect_left(free_sizes, size)
        if k < len(free_sizes):  # the tightest open bin that fits
            free = free_sizes[k]
            candidates = bins_by_free[free]
            b = candidates.pop()
            if not candidates:
                del bins_by_free[free]
                free_sizes.pop(k)
        else:
            b, free = len(bins), seq_len
            bins.append([])
        bins[b].append(i)
        if free - size > 0:
            if free - size not in bins_by_free:
                bins_by_free[free - size] = []
                bisect.insort(free_sizes, free - size)
            bins_by_free[free - size].append(b)
    return bins


def next_fit(lengths: Sequence[int], seq_len: int) -> list[list[int]]:
    """Bins of item indices in order: an item joins the current bin if it fits, else opens a new one."""
    bins: list[list[int]] = []
    free = 0
    for i, size in enumerate(lengths):
        if size > free:
            bins.append([])
            free = seq_len
        bins[-1].append(i)
        free -= size
    return bins


def assemble_rows(
    documents: Sequence[Document], bins: Sequence[Sequence[int]], seq_len: int, pad_id: int, first_doc_id: int
) -> RowBlock:
    """Rows holding each bin's documents in order, then padding; doc ids count up from `first_doc_id`."""
    n_rows = len(bins)
    tokens = np.full((n_rows, seq_len), pad_id, np.int32)
    doc_ids = np.zeros((n_rows, seq_len), np.int32)
    loss_mask = np.zeros((n_rows, seq_len), np.uint8)
    doc_id = first_doc_id
    for r, members in enumerate(bins):
        pos = 0
        for i in members:
            t, m = documents[i]
            end = pos + len(t)
            assert end <= seq_len, (end, seq_len)
            tokens[r, pos:end] = t
            loss_mask[r, pos:end] = m
            doc_ids[r, pos:end] = doc_id
            doc_id += 1
            pos = end
    return RowBlock(tokens, doc_ids, loss_mask)


def pack_documents(
    documents: Iterable[Document],
    seq_len: int,
    *,
    packing: str = "best-fit",
    too_long: str = "split",
    pad_id: int = 0,
    window_docs: int = WINDOW_DOCS,
    window_tokens: int = WINDOW_TOKENS,
    counts: PackCounts | None = None,
) -> Iterator[RowBlock]:
    """Stream row blocks from a stream of documents, holding at most one window (plus carried rows).

    Args:
        documents: (tokens (L,) int32, loss_mask (L,) uint8) per document, L >= 1.
        seq_len: tokens per row.
        packing: 'best-fit' or 'greedy' (see the module docstring).
        too_long: 'split', 'truncate' or 'drop' for documents longer than seq_len.
        pad_id: token that fills the end of a row.
        window_docs, window_tokens: a window is packed once it holds this many documents or tokens.
        counts: filled with what happened to the documents.
    Yields:
        RowBlock of (R, seq_len) arrays; doc ids are unique over the whole stream.
    """
    _check_seq_len(seq_len)
    if packing not in ("best-fit", "greedy"):
        raise ValueError(f"packing={packing!r}; use 'best-fit' or 'greedy'")
    counts = counts if counts is not None else PackCounts()
    window: list[_Piece] = []
    n_window_tokens = 0
    next_doc_id = 1
    for document in documents:
        pieces = fit_to_row(document, seq_len, too_long, counts)
        for tokens, mask in pieces:
            # The pieces of a split document may be cut again to fill rows (see _fill_gaps).
            window.append(_Piece(tokens, mask, len(pieces) > 1 and len(tokens) < seq_len))
            n_window_tokens += len(tokens)
        if len(window) >= window_docs or n_window_tokens >= window_tokens:
            block, window = _pack_window(
                window,
                seq_len,
                packing,
                pad_id,
                next_doc_id,
                final=False,
                max_carry_docs=window_docs // CARRY_FRACTION,
            )
            n_window_tokens = sum(len(p.tokens) for p in window)
            if len(block.tokens):
                next_doc_id = int(block.doc_ids.max()) + 1
                yield block
    if window:
        block, _ = _pack_window(window, seq_len, packing, pad_id, next_doc_id, final=True)
        next_doc_id = int(block.doc_ids.max()) + 1
        yield block
    counts.n_pieces = next_doc_id - 1


class _Piece(NamedTuple):
    tokens: np.ndarray
    loss_mask: np.ndarray
    cuttable: bool  # the tail of a split document: may be cut into fragments to fill rows


def _pack_window(
    window: list[_Piece],
    seq_len: int,
    packing: str,
    pad_id: int,
    first_doc_id: int,
    *,
    final: bool,
    max_carry_docs: int = 0,
) -> tuple[RowBlock, list[_Piece]]:
    """Rows for a window, and the pieces held back for the next one (none when `final`)."""
    if packing == "greedy":
        lengths = [len(p.tokens) for p in window]
        bins = next_fit(lengths, seq_len)
        keep, carry = (bins, []) if final else (bins[:-1], bins[-1:])  # the open row continues
    else:
        rigid = [i for i, p in enumerate(window) if not p.cuttable]
        bins = best_fit_decreasing([len(window[i].tokens) for i in rigid], seq_len)
        bins = [[rigid[j] for j in members] for members in bins]
        window, bins = _fill_gaps(window, bins, [i for i, p in enumerate(window) if p.cuttable], seq_len)
        lengths = [len(p.tokens) for p in window]
        keep, carry = bins, []
        if not final:
            budget, docs_budget = sum(lengths) // CARRY_FRACTION, max_carry_docs
            keep, carry = [], []
            for members in bins:
                used = sum(lengths[i] for i in members)
                if (
                    seq_len - used > seq_len // CARRY_FRACTION
                    and used <= budget
                    and len(members) <= docs_budget
                ):
                    carry.append(members)
                    budget -= used
                    docs_budget -= len(members)
                else:
                    keep.append(members)
    block = assemble_rows([(p.tokens, p.loss_mask) for p in window], keep, seq_len, pad_id, first_doc_id)
    return block, [window[i] for members in carry for i in members]


def _fill_gaps(
    window: list[_Piece], bins: list[list[int]], cuttable: list[int], seq_len: int
) -> tuple[list[_Piece], list[list[int]]]:
    """Pour the cuttable pieces, in order, into the bins' free space (largest first), then into new bins.

    A piece that does not fit the space left is cut there (one fragment fills it, the rest goes on), so only
    gaps under MIN_FILL tokens and the last new bin stay padded. Returns the window with the fragments added
    and the bins.
    """
    window = list(window)
    queue = list(reversed(cuttable))  # pop() takes them in order
    used = [sum(len(window[i].tokens) for i in members) for members in bins]
    order = sorted(range(len(bins)), key=lambda b: used[b])
    n_old_bins = len(bins)
    for b in [*order, *range(n_old_bins, n_old_bins + len(window))]:
        if not queue:
            break
        if b == len(bins):
            bins.append([])
            used.append(0)
        min_room = MIN_FILL if b < n_old_bins else 1  # a new bin takes everything it can
        while queue and seq_len - used[b] >= min_room:
            i = queue.pop()
            room = seq_len - used[b]
            if len(window[i].tokens) > room:
                piece = window[i]
                window.append(_Piece(piece.tokens[:room], piece.loss_mask[:room], True))
                window[i] = _Piece(piece.tokens[room:], piece.loss_mask[room:], True)
                queue.append(i)
                i = len(window) - 1
            bins[b].append(i)
            used[b] += len(window[i].tokens)
    assert not queue, "a new bin per piece is always enough"
    return window, bins


def pack_token_lists(
    token_lists: Sequence[Sequence[int]],
    seq_len: int,
    *,
    loss_masks: Sequence[Sequence[int]] | None = None,
    packing: str = "best-fit",
    too_long: str = "split",
    pad_id: int = 0,
    window_docs: int = WINDOW_DOCS,
    window_tokens: int = WINDOW_TOKENS,
) -> RowBlock:
    """In-memory `pack_documents`: all rows at once (loss masks default to all ones)."""
    masks = loss_masks if loss_masks is not None else [np.ones(len(t), np.uint8) for t in token_lists]
    documents = [
        (np.asarray(t, np.int32), np.asarray(m, np.uint8)) for t, m in zip(token_lists, masks, strict=True)
    ]
    blocks = list(
        pack_documents(
            documents,
            seq_len,
            packing=packing,
            too_long=too_long,
            pad_id=pad_id,
            window_docs=window_docs,
            window_tokens=window_tokens,
        )
    )
    if not blocks:
        empty = np.zeros((0, seq_len), np.int32)
        return RowBlock(empty, empty.copy(), empty.astype(np.uint8))
    return RowBlock(*(np.concatenate([getattr(b, f) for b in blocks]) for f in RowBlock._fields))


# ------------------------------------------------------------------------------------- from a source


def packed_cache_key(source: str | Path, tokenizer: Tokenizer, seq_len: int, data: DataSpec) -> str:
    """Everything the packed rows depend on: source bytes, tokenizer, seq_len, how records are read and packed."""
    parts = [
        f"source={source_sha256(source)}",
        f"tokenizer={tokenizer.key}",
        f"seq_len={seq_len}",
        f"format={data.format}",
        f"text_field={data.text_field}",
        f"columns={sorted(data.columns.items())}",
        f"train_on_prompt={data.train_on_prompt}",
        f"packing={data.packing}",
        f"too_long={data.too_long}",
        f"bad_rows={data.bad_rows}",
        f"template={TEMPLATE_VERSION},{data.chat_template}",
        f"window={WINDOW_DOCS},{WINDOW_TOKENS},{CARRY_FRACTION}",
        f"pack_format={PACK_FORMAT_VERSION}",
    ]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]


def prepare_packed_dataset(
    source_path: str | Path,
    tokenizer: Tokenizer,
    seq_len: int,
    cache_dir: str | Path,
    data: DataSpec,
    *,
    progress: Callable[[int, int], None] | None = None,
    docs_per_batch: int = DOCS_PER_BATCH,
) -> Path:
    """Read, tokenize and pack a source into `cache_dir/packed/<key>.arrow`, or return that file if it exists.

    Args:
        source_path: a data file or directory (see lowmem.data.corpus).
        tokenizer: encodes `docs_per_batch` records per batch call.
        seq_len: tokens per row.
        cache_dir: where `packed/` lives.
        data: format, columns, chat_template, train_on_prompt, packing, too_long and bad_rows are used (all in
            the key; resolve chat_template "auto" first, see lowmem.data.templates.resolve_chat_template).
        progress: called after each batch with (records read, bytes of the source read); the total is
            `lowmem.data.corpus.source_size_bytes(source_path)`.
    Returns:
        The packed file: columns tokens / doc_ids (int32) and loss_mask (uint8), each fixed_size_list of
        seq_len, and metadata with the counts (n_rows, n_tokens, n_padding, padding_fraction, n_skipped, ...).
    Memory stays flat with source size (one tokenizer batch plus one packing window). The file appears only
    when complete (temp file + `os.replace`).
    """
    _check_seq_len(seq_len)
    check_columns(data)
    out_path = packed_path(source_path, tokenizer, seq_len, cache_dir, data)
    if out_path.is_file():
        return out_path
    skip_log = SkipLog(data.bad_rows)
    counts = PackCounts()
    documents = tokenized_documents(source_path, data, tokenizer, skip_log, docs_per_batch, progress)
    rows = pack_documents(
        documents,
        seq_len,
        packing=data.packing,
        too_long=data.too_long,
        pad_id=tokenizer.pad_id,
        window_docs=WINDOW_DOCS,
        window_tokens=WINDOW_TOKENS,
        counts=counts,
    )
    try:
        # The metadata is read once the rows are written: the skip log and counts are complete only then.
        metadata = functools.partial(pack_metadata, tokenizer, data, skip_log, counts)
        write_packed_arrow(out_path, rows, seq_len, metadata)
    except EmptyPackError:
        raise ValueError(_no_rows_message(source_path, seq_len, skip_log, counts)) from None
    return out_path


def packed_path(
    source: str | Path, tokenizer: Tokenizer, seq_len: int, cache_dir: str | Path, data: DataSpec
) -> Path:
    """Where `prepare_packed_dataset` keeps these inputs' packed rows: `cache_dir/packed/<key>.arrow`."""
    return Path(cache_dir) / "packed" / f"{packed_cache_key(source, tokenizer, seq_len, data)}.arrow"


def tokenized_documents(
    source: str | Path,
    data: DataSpec,
    tokenizer: Tokenizer,
    skip_log: SkipLog,
    docs_per_batch: int = DOCS_PER_BATCH,
    progress: Callable[[int, int], None] | None = None,
) -> Iterator[Document]:
    """(tokens, loss mask) of each usable record of a source, encoded `docs_per_batch` records per batch call.

    Bad records go to `skip_log`; `progress`, if given, is called after each batch with (records read, bytes
    of the source read).
    """
    segments = iter_segments(source, data, skip_log)
    n_read = 0
    while batch := list(islice(segments, docs_per_batch)):
        yield from encode_segments([s for _, s in batch], tokenizer)
        n_read += len(batch)
        if progress is not None:
            progress(n_read + skip_log.n_skipped, batch[-1][0].bytes_done)


def pack_metadata(
    tokenizer: Tokenizer, data: DataSpec, skip_log: SkipLog, counts: PackCounts
) -> dict[str, object]:
    """What a packed file records about how it was made (beside the row counts `write_packed_arrow` adds)."""
    return {
        "tokenizer_key": tokenizer.key,
        "format": data.format,
        "packing": data.packing,
        "too_long": data.too_long,
        "train_on_prompt": data.train_on_prompt,
        "template_version": TEMPLATE_VERSION,
        "n_skipped": skip_log.n_skipped,
        "skipped_examples": skip_log.examples,
        **msgspec.structs.asdict(counts),
    }


def _no_rows_message(source: str | Path, seq_len: int, skip_log: SkipLog, counts: PackCounts) -> str:
    """Why a source gave no rows: the records skipped and the documents dropped as too long, where any."""
    return (
        f"{source}: no rows to write: no usable records"
        + (f" ({skip_log.n_skipped} skipped, e.g. {skip_log.examples[0]})" if skip_log.n_skipped else "")
        + (f" ({counts.n_dropped} dropped as longer than seq_len={seq_len})" if counts.n_dropped else "")
    )


# ---------------------------------------------------------------------------------------- arrow file


class EmptyPackError(ValueError):
    """No rows were produced."""


def packed_schema(seq_len: int, metadata: Mapping[str, object] | None = None) -> pa.Schema:
    """Arrow schema of a packed file; metadata values are stored JSON-encoded."""
    encoded = {k: msgspec.json.encode(v) for k, v in (metadata or {}).items()}
    return pa.schema(
        [
            ("tokens", pa.list_(pa.int32(), seq_len)),
            ("doc_ids", pa.list_(pa.int32(), seq_len)),
            ("loss_mask", pa.list_(pa.uint8(), seq_len)),
        ],
        metadata=encoded or None,
    )


def write_packed_arrow(
    path: str | Path,
    row_blocks: Iterable[RowBlock],
    seq_len: int,
    metadata: Mapping[str, object] | Callable[[], Mapping[str, object]],
) -> None:
    """Write row blocks to an Arrow IPC file at `path`, atomically.

    The schema metadata gets `metadata` (or what it returns once the rows are written, if callable) plus the
    format version, seq_len, n_rows, n_tokens (non-padding), n_padding, padding_fraction and n_trained
    (targets in the loss). Those counts are known only at the end, and an IPC file's schema is fixed when it
    is opened, so rows go to a first temp file and are then copied (from a memory map, batch by batch) into a
    second one that carries the counts; that one is renamed into place.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows_tmp = _temp_path(path, "rows")
    final_tmp = _temp_path(path, "final")
    try:
        stats = _write_rows(rows_tmp, row_blocks, seq_len)
        if not stats["n_rows"]:
            raise EmptyPackError(f"{path}: no rows to write; the source has no usable documents")
        extra = metadata() if callable(metadata) else metadata
        full_metadata = {"format_version": PACK_FORMAT_VERSION, "seq_len": seq_len, **extra, **stats}
        # Read back through a plain file, not a memory map: mapped pages would count as RSS for the whole file.
        with pa.OSFile(str(rows_tmp), "rb") as source, pa.OSFile(str(final_tmp), "wb") as sink:
            reader = pa.ipc.open_file(source)
            with pa.ipc.new_file(sink, packed_schema(seq_len, full_metadata)) as writer:
                for i in range(reader.num_record_batches):
                    writer.write_batch(reader.get_batch(i))
        _fsync(final_tmp)
        os.replace(final_tmp, path)
    finally:
        rows_tmp.unlink(missing_ok=True)
        final_tmp.unlink(missing_ok=True)


def _write_rows(path: Path, row_blocks: Iterable[RowBlock], seq_len: int) -> dict[str, object]:
    """Write row blocks in record batches of about TOKENS_PER_RECORD_BATCH tokens; return the counts."""
    rows_per_batch = max(1, TOKENS_PER_RECORD_BATCH // seq_len)
    schema = packed_schema(seq_len)
    n_rows = n_tokens = n_trained = 0
    pending: list[RowBlock] = []
    n_pending = 0
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:

        def flush(final: bool = False) -> None:
            """Write whole record batches of rows_per_batch rows (and, if `final`, the rest)."""
            nonlocal n_pending
            if not n_pending:
                return
            columns = [np.concatenate([getattr(b, f) for b in pending]) for f in RowBlock._fields]
            n_write = n_pending if final else n_pending // rows_per_batch * rows_per_batch
            for start in range(0, n_write, rows_per_batch):
                writer.write_batch(
                    _record_batch(
                        *(c[start : min(start + rows_per_batch, n_write)] for c in columns), schema=schema
                    )
                )
            pending.clear()
            if n_write < n_pending:
                pending.append(RowBlock(*(c[n_write:] for c in columns)))
            n_pending -= n_write

        for block in row_blocks:
            tokens, doc_ids, loss_mask = block
            assert tokens.shape == doc_ids.shape == loss_mask.shape == (len(tokens), seq_len), (
                tokens.shape,
                doc_ids.shape,
                loss_mask.shape,
            )
            n_rows += len(tokens)
            n_tokens += int(np.count_nonzero(doc_ids))
            n_trained += count_trained_targets(doc_ids, loss_mask)
            pending.append(block)
            n_pending += len(tokens)
            if n_pending >= rows_per_batch:
                flush()
        flush(final=True)
    n_slots = n_rows * seq_len
    return {
        "n_rows": n_rows,
        "n_tokens": n_tokens,
        "n_padding": n_slots - n_tokens,
        "padding_fraction": (n_slots - n_tokens) / n_slots if n_slots else 0.0,
        "n_trained": n_trained,
    }


def count_trained_targets(doc_ids: np.ndarray, loss_mask: np.ndarray) -> int:
    """Targets in the loss: token t with loss_mask 1 whose predecessor t-1 is in the same (real) document."""
    same_doc = (doc_ids[:, 1:] == doc_ids[:, :-1]) & (doc_ids[:, 1:] != 0)
    return int(np.count_nonzero(same_doc & (loss_mask[:, 1:] != 0)))


def _record_batch(
    tokens: np.ndarray, doc_ids: np.ndarray, loss_mask: np.ndarray, *, schema: pa.Schema
) -> pa.RecordBatch:
    seq_len = tokens.shape[1]
    columns = [
        pa.FixedSizeListArray.from_arrays(
            pa.array(np.ascontiguousarray(a, dtype).reshape(-1), type=arrow_type), seq_len
        )
        for a, dtype, arrow_type in (
            (tokens, np.int32, pa.int32()),
            (doc_ids, np.int32, pa.int32()),
            (loss_mask, np.uint8, pa.uint8()),
        )
    ]
    return pa.RecordBatch.from_arrays(columns, schema=schema)


def _temp_path(path: Path, tag: str) -> Path:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{tag}.", suffix=".tmp")
    os.close(fd)
    share(tmp)  # mkstemp's 0600 -> what the umask gives an ordinary file
    return Path(tmp)


def _fsync(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _check_seq_len(seq_len: int) -> None:
    if not isinstance(seq_len, (int, np.integer)) or seq_len < 2:
        raise ValueError(f"seq_len={seq_len!r}; use an integer >= 2 (a row needs an input and a next token)")
