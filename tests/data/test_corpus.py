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
        ('{"body": "no text field"}', r"no field 'text'.*\['body'\].*data\.text_field"),
        ('{"text": 42}', r"field 'text' is a int .*expected a string"),
        ('{"text": "   "}', r"field 'text' is empty.*remove the record"),
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
    path = tmp_path / "c.xml"
    path.write_text("<a/>\n")
    with pytest.raises(ValueError, match=r"c\.xml: unsupported data file type.*\.jsonl"):
        read_documents(path)


RECORDS = [{"text": "alpha one", "n": 1}, {"text": "beta two", "n": 2}, {"text": "gamma three", "n": 3}]


def write_source(path: Path, records: list[dict]) -> Path:
    """`records` written in the format `path`'s suffix names."""
    import pyarrow as pa
    import pyarrow.csv as pa_csv
    import pyarrow.parquet as pq

    name = path.name
    if name.endswith(".jsonl.gz"):
        path.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in records).encode()))
    elif name.endswith(".jsonl"):
        write_lines(path, [json.dumps(r) for r in records])
    elif name.endswith(".json"):
        path.write_text(json.dumps(records))
    elif name.endswith(".parquet"):
        pq.write_table(pa.Table.from_pylist(records), path, row_group_size=2)
    elif name.endswith(".csv"):
        pa_csv.write_csv(pa.Table.from_pylist(records), path)
    elif name.endswith(".txt"):
        path.write_text("\n\n".join(r["text"] for r in records) + "\n")
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".json", ".parquet", ".csv", ".txt"])
def test_each_source_type_reads_the_records(tmp_path: Path, suffix: str):
    from lowmem.data import iter_rows

    path = write_source(tmp_path / f"d{suffix}", RECORDS)
    rows = list(iter_rows(path, string_columns=["text"]))
    assert [r.record["text"] for r in rows] == [r["text"] for r in RECORDS]
    assert all(r.problem == "" for r in rows)
    expected_where = {".jsonl": ":1", ".jsonl.gz": ":1", ".txt": ":1"}.get(suffix, ":row 0")
    assert rows[0].where == f"{path}{expected_where}"
    assert rows[-1].bytes_done == path.stat().st_size  # progress reaches the total
    assert list(read_documents(path)) == [r["text"] for r in RECORDS]


def test_directory_is_read_recursively_in_sorted_order(tmp_path: Path):
    from lowmem.data import source_files

    write_source(tmp_path / "b.jsonl", RECORDS[1:2])
    (tmp_path / "a").mkdir()
    write_source(tmp_path / "a" / "z.parquet", RECORDS[:1])
    write_source(tmp_path / "c.txt", RECORDS[2:])
    (tmp_path / "notes.md").write_text("ignored")
    (tmp_path / ".hidden.jsonl").write_text('{"text": "ignored"}\n')
    assert [p.relative_to(tmp_path).as_posix() for p in source_files(tmp_path)] == [
        "a/z.parquet",
        "b.jsonl",
        "c.txt",
    ]
    assert list(read_documents(tmp_path)) == [r["text"] for r in RECORDS]
    with pytest.raises(ValueError, match="directory holds no data files"):
        (tmp_path / "empty").mkdir()
        source_files(tmp_path / "empty")


def test_hf_save_to_disk_directory(tmp_path: Path):
    import pyarrow as pa

    # What datasets' save_to_disk writes: Arrow *stream* files listed in state.json.
    table = pa.Table.from_pylist(RECORDS)
    with pa.OSFile(str(tmp_path / "data-00000-of-00001.arrow"), "wb") as sink:
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table, max_chunksize=2)
    (tmp_path / "state.json").write_text(
        json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]})
    )
    (tmp_path / "dataset_info.json").write_text("{}")
    assert list(read_documents(tmp_path)) == [r["text"] for r in RECORDS]
    (tmp_path / "dataset_dict.json").write_text("{}")
    with pytest.raises(ValueError, match="DatasetDict.*one split"):
        list(read_documents(tmp_path))


def test_csv_text_column_is_read_as_string(tmp_path: Path):
    path = tmp_path / "nums.csv"
    path.write_text("text,n\n123,1\nword,2\n")
    assert list(read_documents(path)) == ["123", "word"]


def test_the_corpus_digest_is_read_once_per_process_and_again_after_a_change(tmp_path):
    """The tokenizer and the packed data both key on the corpus: one read of a large file, not two."""
    from lowmem.data.corpus import _file_sha256, source_sha256

    corpus = tmp_path / "c.txt"
    corpus.write_text("first text\n")
    first = source_sha256(corpus)
    reads = _file_sha256.cache_info().misses
    assert source_sha256(corpus) == first and _file_sha256.cache_info().misses == reads
    corpus.write_text("other text, longer\n")
    assert source_sha256(corpus) != first
    assert _file_sha256.cache_info().misses == reads + 1
