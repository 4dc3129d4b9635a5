"""Records → (token ids, loss mask) documents, per DataSpec format, with located errors for bad records.

Formats (field names are spec keys; `data.columns` maps a key to the source column it is read from):

- `text`: field `data.text_field` (a non-empty string) → `[bos] + ids + [eos]`, every token trained.
- `instruct`: `instruction` and `output` (non-empty strings), `input` (optional string) → the Alpaca
  template in `lowmem.data.templates`; prompt tokens masked unless `train_on_prompt`.
- `chat`: `messages`, a list of `{role, content}` (keys renamable via columns `role` / `content`): an
  optional system message, then user and assistant alternating, ending with assistant → the chat template
  `data.chat_template` (resolved from the model family first, see `templates.resolve_chat_template`);
  system and user text masked unless `train_on_prompt`, assistant replies and their end-of-turn token trained.

The loss mask marks *targets*: `loss_mask[t] == 1` means predicting token t (from tokens < t) is in the loss.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from lowmem.data.corpus import Row, iter_rows, preview, source_files
from lowmem.data.templates import (
    CHAT_ROLES,
    CHAT_TEMPLATES,
    Segment,
    Special,
    SpecialToken,
    chat_template_name,
    render_instruct,
)
from lowmem.spec.structs import DataSpec

if TYPE_CHECKING:
    from lowmem.data.tokenizer_base import Tokenizer

# Spec keys each format reads (text reads data.text_field); `columns` may rename only these.
N_SKIP_EXAMPLES = 5  # skipped-record messages kept in the packed file's metadata
FORMAT_KEYS = {"instruct": ("instruction", "input", "output"), "chat": ("messages", "role", "content")}


class BadRecord(ValueError):
    """A record the format cannot use; the message says where, what was found and the fix."""


def format_keys(data: DataSpec) -> tuple[str, ...]:
    """The spec keys `data.format` reads."""
    return (data.text_field,) if data.format == "text" else FORMAT_KEYS[data.format]


def check_columns(data: DataSpec) -> None:
    """Reject `data.columns` keys the format does not read (a typo would otherwise be silently ignored)."""
    allowed = format_keys(data)
    unknown = sorted(set(data.columns) - set(allowed))
    if unknown:
        raise ValueError(
            f"data.columns has keys {unknown}, which format {data.format!r} does not read; "
            f"the keys it reads are {list(allowed)} (map a key to the source column holding it)"
        )


def source_column(data: DataSpec, key: str) -> str:
    """The source column (or message key) the spec key `key` is read from."""
    return data.columns.get(key, key)


def record_segments(record: dict, data: DataSpec, where: str) -> list[Segment]:
    """Template segments of one decoded record; raises BadRecord naming `where` if it is malformed."""
    if data.format == "text":
        segments: list[Segment] = [
            (Special.BOS, True),
            (record_text(record, data.text_field, where, data), True),
            (Special.EOS, True),
        ]
        return segments
    if data.format == "instruct":
        instruction = _string(record, data, "instruction", where)
        output = _string(record, data, "output", where)
        input = _string(record, data, "input", where, optional=True)
        segments = render_instruct(instruction, input, output)
    else:
        messages = check_messages(_field(record, data, "messages", where), data, where)
        segments = CHAT_TEMPLATES[chat_template_name(data.chat_template)](messages)
    if data.train_on_prompt:
        segments = [(piece, True) for piece, _ in segments]
    return segments


def record_text(record: dict, text_field: str, where: str, data: DataSpec | None = None) -> str:
    """The non-empty string a text-format record holds under its text column."""
    column = source_column(data, text_field) if data is not None else text_field
    if column not in record:
        raise BadRecord(
            f"{where}: no field {column!r}; the record has fields {sorted(record)[:10]}; "
            f"set data.text_field (or data.columns) to the field that holds the text"
        )
    text = record[column]
    if not isinstance(text, str):
        raise BadRecord(
            f"{where}: field {column!r} is a {type(text).__name__} ({preview(repr(text))}), expected a string; "
            "store the document text as a string"
        )
    if not text.strip():
        raise BadRecord(f"{where}: field {column!r} is empty ({text!r}); remove the record or give it text")
    return text


def read_documents(path: str | Path, text_field: str = "text") -> Iterator[str]:
    """Yield the `text_field` string of each record of a source, raising on the first malformed one.

    Raises ValueError naming `file:line` (or `file:row N`) for invalid UTF-8 or JSON, a missing or non-string
    field, or an empty document.
    """
    source_files(path)  # a bad path or file type fails here, not at the first next()
    return _texts(iter_rows(path, txt_field=text_field, string_columns=[text_field]), text_field)


def _texts(rows: Iterator[Row], text_field: str) -> Iterator[str]:
    for row in rows:
        if row.problem:
            raise ValueError(f"{row.where}: {row.problem}")
        yield record_text(row.record, text_field, row.where)


def check_messages(messages: object, data: DataSpec, where: str) -> list[dict[str, str]]:
    """Validated `[{"role", "content"}]` (keys renamed back from data.columns), or BadRecord."""
    role_key, content_key = source_column(data, "role"), source_column(data, "content")
    column = source_column(data, "messages")
    if not isinstance(messages, list) or not messages:
        raise BadRecord(
            f"{where}: field {column!r} is {preview(repr(messages))}, expected a non-empty list of "
            f'{{"{role_key}": ..., "{content_key}": ...}} objects'
        )
    out = []
    for i, message in enumerate(messages):
        at = f"{where}: {column}[{i}]"
        if not isinstance(message, dict) or role_key not in message or content_key not in message:
            raise BadRecord(
                f"{at} is {preview(repr(message))}, expected an object with {role_key!r} and {content_key!r}; "
                "map other key names with data.columns (role = ..., content = ...)"
            )
        role, content = message[role_key], message[content_key]
        if role not in CHAT_ROLES:
            raise BadRecord(f"{at}.{role_key} is {role!r}; use one of {list(CHAT_ROLES)}")
        if not isinstance(content, str) or not content.strip():
            raise BadRecord(f"{at}.{content_key} is {preview(repr(content))}, expected a non-empty string")
        out.append({"role": role, "content": content})
    roles = [m["role"] for m in out]
    turns = roles[1:] if roles[0] == "system" else roles
    expected = ["user", "assistant"] * (len(turns) // 2)
    if not turns or turns != expected or len(turns) % 2:
        raise BadRecord(
            f"{where}: roles {roles}; expected an optional system message, then user and assistant "
            "alternating, starting with user and ending with assistant"
        )
    return out


def encode_segments(
    segment_lists: Sequence[list[Segment]], tokenizer: Tokenizer
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(tokens int32 (L,), loss_mask uint8 (L,)) per record; all text goes through one batch encode.

    Special pieces become their ids (BOS is dropped where the tokenizer has no bos); adjacent text pieces with
    the same mask are encoded as one text. With a `dummy_prefix` tokenizer (sentencepiece), a text piece after
    the document's first drops one leading space, which the tokenizer's own word-boundary prefix stands for.
    """
    resolve = _special_resolver(tokenizer)
    parts_per_doc: list[list[tuple[list[int] | str, bool]]] = []
    texts: list[str] = []
    for segments in segment_lists:
        parts: list[tuple[list[int] | str, bool]] = []
        for piece, trainable in segments:
            value = piece if isinstance(piece, str) else resolve(piece)
            if isinstance(value, str) and parts and isinstance(parts[-1][0], str) and parts[-1][1] == trainable:
                parts[-1] = (parts[-1][0] + value, trainable)
            else:
                parts.append((value, trainable))
        first_text = True
        for i, (value, trainable) in enumerate(parts):
            if isinstance(value, str):
                if tokenizer.dummy_prefix and not first_text and value.startswith(" "):
                    parts[i] = (value := value[1:], trainable)
                texts.append(value)
                first_text = False
        parts_per_doc.append(parts)
    encoded = iter(tokenizer.encode(texts))
    documents = []
    for parts in parts_per_doc:
        ids: list[int] = []
        mask: list[int] = []
        for value, trainable in parts:
            piece_ids = next(encoded) if isinstance(value, str) else value
            ids += piece_ids
            mask += [int(trainable)] * len(piece_ids)
        documents.append((np.asarray(ids, np.int32), np.asarray(mask, np.uint8)))
    return documents


def _special_resolver(tokenizer: Tokenizer):
    """piece → its ids (or, for an `or_text` token the tokenizer lacks, its text), memoized per call."""
    cache: dict[Special | SpecialToken, list[int] | str] = {}

    def resolve(piece: Special | SpecialToken) -> list[int] | str:
        if piece not in cache:
            cache[piece] = _special_ids(piece, tokenizer)
        return cache[piece]

    return resolve


def _special_ids(piece: Special | SpecialToken, tokenizer: Tokenizer) -> list[int] | str:
    if piece is Special.BOS:
        return [] if tokenizer.bos_id is None else [tokenizer.bos_id]
    if piece is Special.EOS:
        if tokenizer.eos_id is None:
            raise ValueError(
                f"{tokenizer} has no eos token, which ends every document; name one as eos_token in a "
                "tokenizer_config.json next to the tokenizer file"
            )
        return [tokenizer.eos_id]
    i = tokenizer.special_id(piece.text)
    if i is not None:
        return [i]
    if piece.or_text:
        return piece.text
    raise ValueError(
        f"chat template {piece.template!r} writes the special token {piece.text!r}, which {tokenizer} does not "
        "have; use the template of the model's family (data.chat_template, \"auto\" for a checkpoint) or the "
        "tokenizer that came with the model"
    )


def _field(record: dict, data: DataSpec, key: str, where: str) -> object:
    column = source_column(data, key)
    if column not in record:
        rename = f' or map it with data.columns ({key} = "<column>")' if column == key else ""
        raise BadRecord(
            f"{where}: no field {column!r} (format {data.format!r} reads it as {key!r}); the record has fields "
            f"{sorted(record)[:10]}; add it{rename}"
        )
    return record[column]


def _string(record: dict, data: DataSpec, key: str, where: str, *, optional: bool = False) -> str | None:
    column = source_column(data, key)
    if optional and record.get(column) is None:
        return None
    value = _field(record, data, key, where)
    if not isinstance(value, str):
        raise BadRecord(
            f"{where}: field {column!r} is a {type(value).__name__} ({preview(repr(value))}), expected a string"
        )
    if not optional and not value.strip():
        raise BadRecord(f"{where}: field {column!r} is empty; remove the record or fill it in")
    return value


class SkipLog:
    """Bad records under `bad_rows`: raise at the first, or count them and keep a few messages."""

    def __init__(self, bad_rows: str):
        self.bad_rows = bad_rows
        self.n_skipped = 0
        self.examples: list[str] = []

    def report(self, message: str) -> None:
        if self.bad_rows == "error":
            raise ValueError(f'{message} (or set data.bad_rows = "skip" to skip and count such records)')
        self.n_skipped += 1
        if len(self.examples) < N_SKIP_EXAMPLES:
            self.examples.append(message)


def iter_segments(
    source: str | Path, data: DataSpec, skip_log: SkipLog
) -> Iterator[tuple[Row, list[Segment]]]:
    """(row, template segments) of each usable record of a source; bad records go to `skip_log`."""
    check_columns(data)
    columns = [source_column(data, k) for k in format_keys(data)]
    for row in iter_rows(source, txt_field=source_column(data, data.text_field), string_columns=columns):
        if row.problem:
            skip_log.report(f"{row.where}: {row.problem}")
            continue
        try:
            yield row, record_segments(row.record, data, row.where)
        except BadRecord as e:
            skip_log.report(str(e))


def read_segment_texts(source: str | Path, data: DataSpec) -> Iterator[str]:
    """Each usable record's rendered text (specials left out): what a tokenizer for this data trains on."""
    for _, segments in iter_segments(source, data, SkipLog(data.bad_rows)):
        yield "".join(piece for piece, _ in segments if isinstance(piece, str))
