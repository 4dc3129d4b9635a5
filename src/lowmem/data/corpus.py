"""Text sources: the shipped corpora and a streaming reader for `.jsonl`, `.jsonl.gz` and `.txt` files."""

from __future__ import annotations

import gzip
import hashlib
import importlib.resources
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import msgspec

SHIPPED_CORPORA = ("kjv",)
SUFFIXES = (".jsonl", ".jsonl.gz", ".txt")


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
    """Hex sha256 of a file's bytes, read in chunks (memory stays flat with file size)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def read_documents(path: str | Path, text_field: str = "text") -> Iterator[str]:
    """Yield the documents of a corpus file one at a time, never holding the whole file.

    `.jsonl` / `.jsonl.gz`: one JSON object per line, the document is `obj[text_field]` (blank lines skipped).
    `.txt`: documents are separated by one or more blank lines; a document's lines are joined with "\\n".
    Raises ValueError naming `file:line` for invalid UTF-8, invalid JSON, a missing or non-string field,
    or an empty document.
    """
    path = Path(path)
    name = path.name
    if name.endswith(".jsonl.gz"):
        return _read_jsonl(path, gzip.open(path, "rb"), text_field)
    if name.endswith(".jsonl"):
        return _read_jsonl(path, open(path, "rb"), text_field)
    if name.endswith(".txt"):
        return _read_txt(path, open(path, "rb"))
    raise ValueError(f"{path}: unsupported corpus file type; use one of {list(SUFFIXES)}")


def _decode_line(path: Path, line_no: int, raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{path}:{line_no}: invalid UTF-8 ({e.reason} at byte {e.start}); re-encode the file as UTF-8"
        ) from None


def _read_jsonl(path: Path, f: BinaryIO, text_field: str) -> Iterator[str]:
    with f:
        for line_no, raw in enumerate(f, start=1):
            line = _decode_line(path, line_no, raw)
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                record = msgspec.json.decode(line)
            except msgspec.DecodeError as e:
                raise ValueError(
                    f"{where}: invalid JSON ({e}): {_preview(line)}; each line must be one JSON object"
                ) from None
            if not isinstance(record, dict):
                raise ValueError(
                    f"{where}: found a JSON {type(record).__name__}, expected an object "
                    f'like {{"{text_field}": "..."}}; write one object per line'
                )
            if text_field not in record:
                raise ValueError(
                    f"{where}: no field {text_field!r}; the object has fields {sorted(record)[:10]}; "
                    f"add {text_field!r} or pass text_field= naming the field that holds the text"
                )
            text = record[text_field]
            if not isinstance(text, str):
                raise ValueError(
                    f"{where}: field {text_field!r} is a {type(text).__name__} ({_preview(repr(text))}), "
                    f"expected a string; store the document text as a JSON string"
                )
            if not text.strip():
                raise ValueError(
                    f"{where}: field {text_field!r} is empty ({text!r}); remove the line or give it text"
                )
            yield text


def _read_txt(path: Path, f: BinaryIO) -> Iterator[str]:
    with f:
        lines: list[str] = []
        for line_no, raw in enumerate(f, start=1):
            line = _decode_line(path, line_no, raw).rstrip("\r\n")
            if line.strip():
                lines.append(line)
            elif lines:
                yield "\n".join(lines)
                lines = []
        if lines:
            yield "\n".join(lines)


def _preview(text: str, n_chars: int = 60) -> str:
    text = text.strip()
    return repr(text if len(text) <= n_chars else text[:n_chars] + "...")
