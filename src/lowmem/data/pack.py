"""Packing: documents → `[bos] + ids + [eos]` → fixed rows of `seq_len` tokens in a cached Arrow IPC file.

Packing is greedy in document order: the documents are laid end to end and the stream is cut every
`seq_len` tokens, so a document may continue from one row into the next and only the final row is padded.
Each token carries its document index (1, 2, ...; 0 = padding) so the loader can keep attention, labels and
positions inside a document.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from itertools import islice
from pathlib import Path

import msgspec
import numpy as np
import pyarrow as pa

from lowmem.data.corpus import file_sha256, read_documents
from lowmem.data.tokenizer import Tokenizer

# Bump when the packing rule or the file layout changes.
PACK_FORMAT_VERSION = 1

# Rows are written in record batches of about this many tokens (4 MiB per int32 column).
TOKENS_PER_RECORD_BATCH = 1 << 20


def pack_token_lists(
    token_lists: Sequence[Sequence[int]], seq_len: int, *, pad_id: int = 0, first_doc_id: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Pack token sequences end to end into rows of exactly `seq_len` tokens.

    Args:
        token_lists: one sequence of token ids per document, already including any bos/eos.
        seq_len: tokens per row.
        pad_id: token that fills the final partial row.
        first_doc_id: document index of token_lists[0]; the rest count up from it.
    Returns:
        tokens (R, seq_len) int32 and doc_ids (R, seq_len) int32, with doc_ids 0 on padding;
        R = ceil(total tokens / seq_len).
    """
    flat_tokens, flat_doc_ids = concat_documents(token_lists, first_doc_id)
    return pad_rows(flat_tokens, flat_doc_ids, seq_len, pad_id)


def concat_documents(
    token_lists: Sequence[Sequence[int]], first_doc_id: int
) -> tuple[np.ndarray, np.ndarray]:
    """All documents end to end as flat int32 tokens and their doc ids."""
    lengths = np.fromiter((len(t) for t in token_lists), dtype=np.int64, count=len(token_lists))
    if not len(token_lists):
        return np.zeros(0, np.int32), np.zeros(0, np.int32)
    tokens = np.concatenate([np.asarray(t, dtype=np.int32).reshape(-1) for t in token_lists])
    doc_ids = np.repeat(np.arange(first_doc_id, first_doc_id + len(token_lists), dtype=np.int32), lengths)
    return tokens, doc_ids


def cut_rows(
    flat_tokens: np.ndarray, flat_doc_ids: np.ndarray, seq_len: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Split flat streams into full (R, seq_len) rows and the remainder (< seq_len tokens) of each."""
    n_full = len(flat_tokens) // seq_len * seq_len
    return (
        flat_tokens[:n_full].reshape(-1, seq_len),
        flat_doc_ids[:n_full].reshape(-1, seq_len),
        flat_tokens[n_full:],
        flat_doc_ids[n_full:],
    )


def pad_rows(
    flat_tokens: np.ndarray, flat_doc_ids: np.ndarray, seq_len: int, pad_id: int
) -> tuple[np.ndarray, np.ndarray]:
    """Rows of `seq_len` from flat streams, the last one padded with `pad_id` / doc id 0."""
    _check_seq_len(seq_len)
    n_pad = -len(flat_tokens) % seq_len
    tokens = np.concatenate([flat_tokens, np.full(n_pad, pad_id, np.int32)]).astype(np.int32, copy=False)
    doc_ids = np.concatenate([flat_doc_ids, np.zeros(n_pad, np.int32)]).astype(np.int32, copy=False)
    return tokens.reshape(-1, seq_len), doc_ids.reshape(-1, seq_len)


def iter_packed_rows(
    token_list_batches: Iterable[Sequence[Sequence[int]]], seq_len: int, *, pad_id: int = 0
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Streaming `pack_token_lists`: yields (tokens, doc_ids) row blocks as batches of documents arrive.

    Concatenating the yielded blocks equals `pack_token_lists` over all documents at once; only the
    tokens of one batch plus one partial row are held at a time.
    """
    _check_seq_len(seq_len)
    tail_tokens, tail_doc_ids = np.zeros(0, np.int32), np.zeros(0, np.int32)
    next_doc_id = 1
    for batch in token_list_batches:
        if not len(batch):
            continue
        tokens, doc_ids = concat_documents(batch, next_doc_id)
        next_doc_id += len(batch)
        rows_t, rows_d, tail_tokens, tail_doc_ids = cut_rows(
            np.concatenate([tail_tokens, tokens]), np.concatenate([tail_doc_ids, doc_ids]), seq_len
        )
        if len(rows_t):
            yield rows_t, rows_d
    if len(tail_tokens):
        yield pad_rows(tail_tokens, tail_doc_ids, seq_len, pad_id)


def prepare_packed_dataset(
    corpus_path: str | Path,
    tokenizer: Tokenizer,
    seq_len: int,
    cache_dir: str | Path,
    text_field: str = "text",
    *,
    docs_per_batch: int = 256,
) -> Path:
    """Tokenize and pack a corpus into `cache_dir/packed/<key>.arrow`, or return that file if it exists.

    The key covers the corpus bytes, the tokenizer model, `seq_len`, `text_field` and PACK_FORMAT_VERSION.
    Documents are read and tokenized `docs_per_batch` at a time, and rows are written as they fill, so memory
    stays flat with corpus size. The file appears only when complete (temp file + `os.replace`).
    """
    _check_seq_len(seq_len)
    parts = [
        f"corpus={file_sha256(corpus_path)}",
        f"tokenizer={tokenizer.key}",
        f"seq_len={seq_len}",
        f"text_field={text_field}",
        f"format={PACK_FORMAT_VERSION}",
    ]
    key = hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]
    out_path = Path(cache_dir) / "packed" / f"{key}.arrow"
    if out_path.is_file():
        return out_path

    def token_list_batches() -> Iterator[list[list[int]]]:
        documents = read_documents(corpus_path, text_field)
        bos, eos = [tokenizer.bos_id], [tokenizer.eos_id]
        while texts := list(islice(documents, docs_per_batch)):
            yield [bos + ids + eos for ids in tokenizer.encode(texts)]

    rows = iter_packed_rows(token_list_batches(), seq_len, pad_id=tokenizer.pad_id)
    write_packed_arrow(out_path, rows, seq_len, {"tokenizer_key": tokenizer.key})
    return out_path


def packed_schema(seq_len: int, metadata: dict[str, object] | None = None) -> pa.Schema:
    """Arrow schema of a packed file; metadata values are stored JSON-encoded."""
    encoded = {k: msgspec.json.encode(v) for k, v in (metadata or {}).items()}
    return pa.schema(
        [("tokens", pa.list_(pa.int32(), seq_len)), ("doc_ids", pa.list_(pa.int32(), seq_len))],
        metadata=encoded or None,
    )


def write_packed_arrow(
    path: str | Path,
    row_blocks: Iterable[tuple[np.ndarray, np.ndarray]],
    seq_len: int,
    metadata: dict[str, object],
) -> None:
    """Write (tokens, doc_ids) row blocks to an Arrow IPC file at `path`, atomically.

    The schema metadata gets `metadata` plus the format version, seq_len, n_rows, n_documents, n_tokens
    (non-padding) and n_padding. Those counts are known only at the end, and an IPC file's schema is fixed
    when it is opened, so rows go to a first temp file and are then copied (from a memory map, batch by batch)
    into a second one that carries the counts; that one is renamed into place.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows_tmp = _temp_path(path, "rows")
    final_tmp = _temp_path(path, "final")
    try:
        stats = _write_rows(rows_tmp, row_blocks, seq_len)
        if not stats["n_rows"]:
            raise ValueError(f"{path}: no rows to write; the corpus has no documents")
        full_metadata = {"format_version": PACK_FORMAT_VERSION, "seq_len": seq_len, **metadata, **stats}
        with pa.memory_map(str(rows_tmp)) as source, pa.OSFile(str(final_tmp), "wb") as sink:
            reader = pa.ipc.open_file(source)
            with pa.ipc.new_file(sink, packed_schema(seq_len, full_metadata)) as writer:
                for i in range(reader.num_record_batches):
                    writer.write_batch(reader.get_batch(i))
        _fsync(final_tmp)
        os.replace(final_tmp, path)
    finally:
        rows_tmp.unlink(missing_ok=True)
        final_tmp.unlink(missing_ok=True)


def _write_rows(
    path: Path, row_blocks: Iterable[tuple[np.ndarray, np.ndarray]], seq_len: int
) -> dict[str, int]:
    """Write row blocks in record batches of about TOKENS_PER_RECORD_BATCH tokens; return the counts."""
    rows_per_batch = max(1, TOKENS_PER_RECORD_BATCH // seq_len)
    schema = packed_schema(seq_len)
    stats = {"n_rows": 0, "n_documents": 0, "n_tokens": 0, "n_padding": 0}
    pending_t: list[np.ndarray] = []
    pending_d: list[np.ndarray] = []
    n_pending = 0
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:

        def flush() -> None:
            nonlocal n_pending
            if n_pending:
                writer.write_batch(
                    _record_batch(np.concatenate(pending_t), np.concatenate(pending_d), schema)
                )
                pending_t.clear()
                pending_d.clear()
                n_pending = 0

        for tokens, doc_ids in row_blocks:
            assert tokens.shape == doc_ids.shape == (len(tokens), seq_len), (tokens.shape, doc_ids.shape)
            n_real = int(np.count_nonzero(doc_ids))
            stats["n_rows"] += len(tokens)
            stats["n_tokens"] += n_real
            stats["n_padding"] += doc_ids.size - n_real
            if doc_ids.size:
                stats["n_documents"] = max(stats["n_documents"], int(doc_ids.max()))
            pending_t.append(tokens)
            pending_d.append(doc_ids)
            n_pending += len(tokens)
            if n_pending >= rows_per_batch:
                flush()
        flush()
    return stats


def _record_batch(tokens: np.ndarray, doc_ids: np.ndarray, schema: pa.Schema) -> pa.RecordBatch:
    seq_len = tokens.shape[1]
    columns = [
        pa.FixedSizeListArray.from_arrays(pa.array(a.reshape(-1), type=pa.int32()), seq_len)
        for a in (np.ascontiguousarray(tokens, np.int32), np.ascontiguousarray(doc_ids, np.int32))
    ]
    return pa.RecordBatch.from_arrays(columns, schema=schema)


def _temp_path(path: Path, tag: str) -> Path:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{tag}.", suffix=".tmp")
    os.close(fd)
    return Path(tmp)


def _fsync(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _check_seq_len(seq_len: int) -> None:
    if not isinstance(seq_len, (int, np.integer)) or seq_len < 2:
        raise ValueError(f"seq_len={seq_len!r}; use an integer >= 2 (a row needs an input and a next token)")
