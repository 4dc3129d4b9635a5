from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from lowmem.data import read_documents, shipped_corpus


def test_shipped_corpus_is_the_kjv():
    path = shipped_corpus()
    assert path.is_file() and path.name == "kjv.jsonl.gz"
    docs = read_documents(path)
    first = next(docs)
    assert first.startswith("In the beginning God created the heaven and the earth.")
    assert 1 + sum(1 for _ in docs) == 1189


def test_unknown_shipped_corpus_lists_the_names():
    with pytest.raises(ValueError, match=r"unknown shipped corpus 'nope'.*\['kjv'\]"):
        shipped_corpus("nope")


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_jsonl_and_gz_read_the_same(tmp_path: Path):
    lines = [json.dumps({"text": t, "id": i}) for i, t in enumerate(["alpha", "béta\ngamma", "  delta  "])]
    plain = write_lines(tmp_path / "c.jsonl", lines[:2] + [""] + lines[2:])  # a blank line is skipped
    packed = tmp_path / "c.jsonl.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    expected = ["alpha", "béta\ngamma", "  delta  "]
    assert list(read_documents(plain)) == expected
    assert list(read_documents(packed)) == expected


def test_custom_text_field(tmp_path: Path):
    path = write_lines(tmp_path / "c.jsonl", [json.dumps({"body": "x", "text": 3})])
    assert list(read_documents(path, text_field="body")) == ["x"]


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ('{"text": "unterminated', r"invalid JSON"),
        ('["a list"]', r"found a JSON list, expected an object"),
        ('{"body": "no text field"}', r"no field 'text'.*\['body'\].*text_field="),
        ('{"text": 42}', r"field 'text' is a int .*expected a string"),
        ('{"text": "   "}', r"field 'text' is empty.*remove the line"),
    ],
)
def test_bad_jsonl_names_file_and_line(tmp_path: Path, bad_line: str, message: str):
    path = write_lines(tmp_path / "bad.jsonl", ['{"text": "fine"}', '{"text": "also fine"}', bad_line])
    docs = read_documents(path)
    # Streaming: the good lines come out before the bad one is reached.
    assert next(docs) == "fine" and next(docs) == "also fine"
    with pytest.raises(ValueError, match=rf"bad\.jsonl:3: {message}"):
        next(docs)


def test_invalid_utf8_names_file_and_line(tmp_path: Path):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"good line\n\nbad \xff byte\n")
    with pytest.raises(ValueError, match=r"bad\.txt:3: invalid UTF-8.*re-encode"):
        list(read_documents(path))


def test_txt_documents_are_separated_by_blank_lines(tmp_path: Path):
    path = tmp_path / "c.txt"
    path.write_text("\n\none\ntwo\n\n \n\t\nthree\r\n\nfour", encoding="utf-8")
    assert list(read_documents(path)) == ["one\ntwo", "three", "four"]


def test_unsupported_suffix(tmp_path: Path):
    path = tmp_path / "c.csv"
    path.write_text("a,b\n")
    with pytest.raises(ValueError, match=r"c\.csv: unsupported corpus file type.*\.jsonl"):
        read_documents(path)
