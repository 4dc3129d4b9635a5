"""A data source's tokenizer: reading (`corpus`) → formatting (`records`, `templates`) → texts → training
(`tokenizer.train_tokenizer`), cached by the source's content.

The tokenizer modules only see an iterable of texts; this module is where the source and the DataSpec come in.
Packing a source into rows is the same wiring for token ids, `lowmem.data.pack.prepare_packed_dataset`.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import sentencepiece as spm

from lowmem.data.corpus import source_sha256
from lowmem.data.records import read_documents, read_segment_texts
from lowmem.data.templates import TEMPLATE_VERSION
from lowmem.data.tokenizer import TOKENIZER_FORMAT_VERSION, SentencePieceTokenizer, train_tokenizer
from lowmem.spec.structs import DataSpec


def load_or_train_tokenizer(
    corpus_path: str | Path,
    vocab_size: int,
    cache_dir: str | Path,
    *,
    text_field: str = "text",
    data: DataSpec | None = None,
) -> SentencePieceTokenizer:
    """The tokenizer for (source content, vocab_size), trained once and then loaded from the cache.

    It trains on each record's `text_field`, or, given `data`, on each record rendered by `data.format`'s
    template (bad records per `data.bad_rows`; `text_field` is then ignored for `data.text_field`).
    The cache key covers the source's bytes, `vocab_size`, how records are read, TOKENIZER_FORMAT_VERSION and
    the sentencepiece version; the model lives at `cache_dir/tokenizers/<key>/tokenizer.model`.
    """
    key = tokenizer_cache_key(corpus_path, vocab_size, text_field=text_field, data=data)
    model_path = Path(cache_dir) / "tokenizers" / key / "tokenizer.model"
    if model_path.is_file():
        return SentencePieceTokenizer(model_path)
    texts = read_documents(corpus_path, text_field) if data is None else read_segment_texts(corpus_path, data)
    return train_tokenizer(texts, vocab_size, model_path)


def tokenizer_cache_key(
    corpus_path: str | Path, vocab_size: int, *, text_field: str = "text", data: DataSpec | None = None
) -> str:
    """Content key of the tokenizer `load_or_train_tokenizer` makes for these inputs."""
    if data is None:
        reading = f"text_field={text_field}"  # as before: keeps existing text-only caches valid
    else:
        columns = sorted(data.columns.items())
        reading = (
            f"text_field={data.text_field}"
            if data.format == "text" and not columns
            else (
                f"format={data.format} text_field={data.text_field} columns={columns} bad_rows={data.bad_rows} "
                f"template={TEMPLATE_VERSION},{data.chat_template}"
            )
        )
    parts = [
        f"corpus={source_sha256(corpus_path)}",
        f"vocab_size={vocab_size}",
        reading,
        f"format={TOKENIZER_FORMAT_VERSION}",
        f"sentencepiece={spm.__version__}",
    ]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]
