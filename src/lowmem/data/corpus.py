"""Data sources: the shipped corpora and streaming readers that turn files into located records.

Supported sources (`source_files` resolves them):

- `.jsonl` / `.jsonl.gz`: one JSON object per line (blank lines skipped); located as `file:line`.
- `.json`: one JSON list of objects, decoded whole (use `.jsonl` for large data); located as `file:row N`.
- `.parquet`: read one record batch at a time; located as `file:row N`.
- `.csv`: a header line then rows, streamed by pyarrow; fields the format reads are kept as strings;
  located as `file:row N`.
- `.txt`: documents separated by one or more blank lines, each a record `{"text": document}`; located as
  `file:line` of the document's first line.
- a directory: every file above in it, recursively, in sorted path order (names starting with "." skipped);
  or a Hugging Face `datasets` `save_to_disk` directory (`state.json` listing Arrow stream files).

Rows are numbered from 0 (as pandas and `datasets` index them), lines from 1 (as editors do).
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.resources
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, NamedTuple

import msgspec
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

SHIPPED_CORPORA = ("kjv",)
SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".parquet", ".csv", ".txt")
HF_STATE_FILE = "state.json"  # what `datasets.Dataset.save_to_disk` writes beside its Arrow files
ROWS_PER_ARROW_BATCH = 1024


class Row(NamedTuple):
    """One source record: where it is, the decoded object (None if it could not be decoded) and why not."""

    where: str  # "file:line" or "file:row N"
    record: dict | None
    problem: str  # "" when `record` decoded; else what was found and the fix
    bytes_done: int  # bytes of the source read so far (for progress), over all files


def shipped_corpus(name: str = "kjv") -> Path:
    """Path of a corpus shipped inside the package (`kjv`: the King James Bible, one document per chapter)."""
    if name not in SHIPPED_CORPORA:
        raise ValueError(f"unknown shipped corpus {name!r}; the shipped corpora are {list(SHIPPED_CORPORA)}")
    resource = importlib.resources.files("lowmem.data") / "corpora" / f"{name}.jsonl.gz"
    path = Path(str(resource))
    if not path.is_file():
        # Only happens if lowmem is imported from a zip; the readers here need a real file.
        raise ValueError(
            f"shipped corpus {name!r} is not a file on disk ({resource}); install lowmem unzipped"
        )
    return path


def file_sha256(path: str | Path, chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in chunks (memory stays flat with file size).

    A run keys both its tokenizer and its packed data on the corpus: the digest is remembered for the file as
    it is now (device, inode, size, modification time), so a large corpus is read once per process, and again
    only after it changes.
    """
    st = Path(path).stat()
    return _file_sha256(str(Path(path).resolve()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, chunk_bytes)


@functools.lru_cache(maxsize=4096)
def _file_sha256(path: str, dev: int, ino: int, size: int, mtime_ns: int, chunk_bytes: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def source_sha256(source: str | Path) -> str:
    """Content key of a source: its files' bytes and their paths relative to the source."""
    source = Path(source)
    if source.is_file():
        return file_sha256(source)
    digest = hashlib.sha256()
    for path in source_files(source):
        digest.update(f"{path.relative_to(source).as_posix()}\0{file_sha256(path)}\n".encode())
    return digest.hexdigest()


def source_size_bytes(source: str | Path) -> int:
    """Total bytes of a source's files: the denominator for `prepare_packed_dataset`'s progress."""
    return sum(p.stat().st_size for p in source_files(source))


def source_files(source: str | Path) -> list[Path]:
    """The data files a source names, in reading order; raises ValueError if there are none."""
    source = Path(source)
    if source.is_file():
        _file_kind(source)  # raises for an unsupported suffix
        return [source]
    if not source.is_dir():
        raise ValueError(f"{source}: no such file or directory (looked at {source.absolute()}); give a data file "
                         "or a directory of them")
    if (source / "dataset_dict.json").is_file():
        splits = sorted(p.name for p in source.iterdir() if p.is_dir())
        raise ValueError(
            f"{source}: a Hugging Face DatasetDict (splits {splits}); point the source at one split, "
            f"e.g. {source / (splits[0] if splits else 'train')}"
        )
    if (source / HF_STATE_FILE).is_file():
        return _hf_data_files(source)
    files = sorted(
        p
        for p in source.rglob("*")
        if p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(source).parts)
        and p.name.endswith(SUFFIXES)
    )
    if not files:
        raise ValueError(
            f"{source}: directory holds no data files; expected files ending in {list(SUFFIXES)}"
        )
    return files


def _hf_data_files(directory: Path) -> list[Path]:
    state_path = directory / HF_STATE_FILE
    try:
        names = [entry["filename"] for entry in json.loads(state_path.read_text())["_data_files"]]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(
            f"{state_path}: not a datasets save_to_disk state (no _data_files[].filename: {e!r}); "
            "save the dataset again with Dataset.save_to_disk"
        ) from None
    files = [directory / name for name in names]
    missing = [str(p) for p in files if not p.is_file()]
    if missing:
        raise ValueError(f"{state_path} lists missing Arrow files {missing}; save the dataset again")
    return files


def _file_kind(path: Path) -> str:
    name = path.name
    for suffix in (*SUFFIXES, ".arrow"):
        if name.endswith(suffix):
            return suffix
    raise ValueError(
        f"{path}: unsupported data file type; use one of {list(SUFFIXES)} or a directory of them"
    )


def iter_rows(
    source: str | Path, *, txt_field: str = "text", string_columns: Iterable[str] = ()
) -> Iterator[Row]:
    """Stream every record of a source as a located `Row`, never holding a whole file (except `.json`).

    Args:
        source: a file or directory (see the module docstring).
        txt_field: the key a `.txt` document is stored under.
        string_columns: CSV columns read as strings whatever they look like (the fields the format reads).
    """
    files = source_files(source)
    offset = 0
    for path in files:
        kind = _file_kind(path)
        size = path.stat().st_size
        if kind in (".jsonl", ".jsonl.gz"):
            rows = _jsonl_rows(path, gzip_compressed=kind == ".jsonl.gz")
        elif kind == ".json":
            rows = _json_rows(path)
        elif kind == ".txt":
            rows = _txt_rows(path, txt_field)
        elif kind == ".parquet":
            rows = _parquet_rows(path)
        elif kind == ".csv":
            rows = _csv_rows(path, tuple(string_columns))
        else:
            rows = _arrow_stream_rows(path)
        for where, record, problem, done in rows:
            yield Row(where, record, problem, offset + min(done, size))
        offset += size


# ------------------------------------------------------------------------------------------- readers
# Each yields (where, record | None, problem, bytes read of this file).


def _jsonl_rows(path: Path, gzip_compressed: bool) -> Iterator[tuple[str, dict | None, str, int]]:
    with open(path, "rb") as raw:
        f: IO[bytes] = gzip.GzipFile(fileobj=raw, mode="rb") if gzip_compressed else raw
        for line_no, line in enumerate(f, start=1):
            where = f"{path}:{line_no}"
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as e:
                yield where, None, _utf8_problem(e), raw.tell()
                continue
            if not text.strip():
                continue
            try:
                record = msgspec.json.decode(text)
            except msgspec.DecodeError as e:
                problem = f"invalid JSON ({e}): {preview(text)}; each line must be one JSON object"
                yield where, None, problem, raw.tell()
                continue
            yield where, *_as_object(record), raw.tell()


def _json_rows(path: Path) -> Iterator[tuple[str, dict | None, str, int]]:
    size = path.stat().st_size
    try:
        records = msgspec.json.decode(path.read_bytes())
    except msgspec.DecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e}); a .json source must be one list of objects") from None
    if not isinstance(records, list):
        raise ValueError(
            f"{path}: holds a JSON {type(records).__name__}, expected a list of objects; "
            "write [{...}, {...}] or use .jsonl (one object per line)"
        )
    for i, record in enumerate(records):
        yield f"{path}:row {i}", *_as_object(record), size * (i + 1) // len(records)


def _txt_rows(path: Path, txt_field: str) -> Iterator[tuple[str, dict | None, str, int]]:
    with open(path, "rb") as f:
        lines: list[str] = []
        first_line = 0
        for line_no, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                # A document with a bad line cannot be trusted: report it, drop what was gathered.
                yield f"{path}:{line_no}", None, _utf8_problem(e), f.tell()
                lines = []
                continue
            if line.strip():
                if not lines:
                    first_line = line_no
                lines.append(line)
            elif lines:
                yield f"{path}:{first_line}", {txt_field: "\n".join(lines)}, "", f.tell()
                lines = []
        if lines:
            yield f"{path}:{first_line}", {txt_field: "\n".join(lines)}, "", f.tell()


def _parquet_rows(path: Path) -> Iterator[tuple[str, dict | None, str, int]]:
    try:
        parquet = pq.ParquetFile(path)
    except pa.ArrowException as e:
        raise ValueError(f"{path}: not a readable Parquet file ({e}); write it again") from None
    n_rows = max(1, parquet.metadata.num_rows)
    size = path.stat().st_size
    yield from _batch_rows(path, parquet.iter_batches(batch_size=ROWS_PER_ARROW_BATCH), n_rows, size)


def _csv_rows(path: Path, string_columns: tuple[str, ...]) -> Iterator[tuple[str, dict | None, str, int]]:
    convert = pa_csv.ConvertOptions(column_types={c: pa.string() for c in string_columns})
    with open(path, "rb") as f:
        try:
            reader = pa_csv.open_csv(f, convert_options=convert)
        except pa.ArrowException as e:
            raise ValueError(
                f"{path}: not a readable CSV file ({e}); the first line must be a header"
            ) from None
        row = 0
        while True:
            try:
                batch = reader.read_next_batch()
            except StopIteration:
                return
            except pa.ArrowException as e:
                # pyarrow cannot resume a CSV after a parse error, so this ends the file whatever bad_rows says.
                raise ValueError(
                    f"{path}: after row {row - 1}: CSV parse error ({e}); fix the file"
                ) from None
            for record in batch.to_pylist():
                yield f"{path}:row {row}", record, "", f.tell()
                row += 1


def _arrow_stream_rows(path: Path) -> Iterator[tuple[str, dict | None, str, int]]:
    with pa.memory_map(str(path)) as source:
        try:
            reader = pa.ipc.open_stream(source)  # datasets writes the IPC stream format
        except pa.ArrowInvalid:
            source.seek(0)
            file_reader = pa.ipc.open_file(source)
            batches = (file_reader.get_batch(i) for i in range(file_reader.num_record_batches))
            n_rows = max(
                1, sum(file_reader.get_batch(i).num_rows for i in range(file_reader.num_record_batches))
            )
        else:
            batches, n_rows = iter(reader), 0
        yield from _batch_rows(path, batches, n_rows, path.stat().st_size)


def _batch_rows(
    path: Path, batches: Iterable[pa.RecordBatch], n_rows: int, size: int
) -> Iterator[tuple[str, dict | None, str, int]]:
    """Records of record batches; progress is rows done / n_rows of the file size (0 rows: size at the end)."""
    row = 0
    for batch in batches:
        for record in batch.to_pylist():
            yield f"{path}:row {row}", record, "", size * (row + 1) // n_rows if n_rows else 0
            row += 1


def _as_object(record: object) -> tuple[dict | None, str]:
    if isinstance(record, dict):
        return record, ""
    return (
        None,
        f'found a JSON {type(record).__name__}, expected an object like {{"text": ...}}; one object per record',
    )


def _utf8_problem(e: UnicodeDecodeError) -> str:
    return f"invalid UTF-8 ({e.reason} at byte {e.start}); re-encode the file as UTF-8"


def preview(text: str, n_chars: int = 60) -> str:
    """A short repr of a value for error messages."""
    text = text.strip()
    return repr(text if len(text) <= n_chars else text[:n_chars] + "...")
