"""Tokenizers behind one interface: sentencepiece `.model`, tiktoken ranks files and byte-level BPE
`tokenizer.json` (`load_tokenizer`); and training a small sentencepiece BPE on an iterable of texts.

Nothing here reads data files or knows record formats: which texts a data source's tokenizer trains on, and
the cache keyed by the source's content, are `lowmem.data.prepare.load_or_train_tokenizer`.

Which file a model directory's tokenizer is read from, and how bos / eos are found, is `load_tokenizer`'s
docstring. The byte-level BPE kinds (Llama 3, Qwen2) live in `lowmem.data.hf_tokenizer`; the `Tokenizer`
interface they all share, in `lowmem.data.tokenizer_base` (also importable from here).
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import sentencepiece as spm

from lowmem.data.tokenizer_base import Tokenizer, files_key, read_token_config
from lowmem.files import share

# Bump when the training recipe below changes what a given (corpus, vocab_size) produces.
TOKENIZER_FORMAT_VERSION = 1

UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
N_BYTE_PIECES = 256  # byte_fallback adds <0x00>..<0xFF>
MIN_VOCAB_SIZE = 4 + N_BYTE_PIECES + 64  # specials + bytes + room for some characters and merges

# sentencepiece skips training sentences longer than max_sentence_length bytes, so documents are cut
# into pieces of at most this many characters (at whitespace, which BPE never merges across anyway).
TRAIN_PIECE_CHARS = 2048


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece model (Llama 2, Mistral, Gemma, Phi-3, or one lowmem trained) with batched encoding.

    Special tokens are its control / user-defined pieces plus tokenizer_config.json's added_tokens_decoder
    (Phi-3's chat tokens exist only there). bos / eos / pad come from tokenizer_config.json where present,
    else from the model.

    Args:
        path: a sentencepiece `.model` file.
        num_threads: threads for batch encode; -1 lets sentencepiece use all hardware threads.
    """

    def __init__(self, path: str | Path, *, num_threads: int = -1):
        self.path = Path(path)
        model_bytes = self.path.read_bytes()
        try:
            self._sp = spm.SentencePieceProcessor(model_proto=model_bytes)
        except RuntimeError as err:
            raise ValueError(
                f"{self.path}: not a sentencepiece model, tiktoken ranks file or tokenizer.json ({err})"
            ) from None
        self.num_threads = num_threads
        config = read_token_config(self.path.parent)
        self.files = (self.path, *config.files)
        # Content key: identifies the model whatever file it was loaded from (used by pack caches).
        self.key = hashlib.sha256(model_bytes).hexdigest() if not config.files else files_key(self.files)
        self._added = config.added
        self._added_text = {i: text for text, i in config.added.items() if i >= self._sp.vocab_size()}
        self.vocab_size = max([self._sp.vocab_size(), *(i + 1 for i in config.added.values())])
        self.dummy_prefix = self._sp.encode("x", out_type=str)[0].startswith("\u2581")
        defaults = {
            name: self._sp.id_to_piece(i) if i >= 0 else None
            for name, i in (("bos_token", self._sp.bos_id()), ("eos_token", self._sp.eos_id()),
                            ("pad_token", self._sp.pad_id()))
        }
        self.bos_id, self.eos_id, self.pad_id = config.resolve(self, defaults)

    def special_id(self, text: str) -> int | None:
        if text in self._added:
            return self._added[text]
        i = self._sp.piece_to_id(text)
        if self._sp.is_unknown(i) and self._sp.id_to_piece(i) != text:
            return None
        return None if self._sp.is_byte(i) or self._sp.is_unused(i) else i

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text (no bos/eos), encoded by sentencepiece's thread pool."""
        if isinstance(texts, str):
            raise TypeError("encode takes a list of strings; wrap a single text as [text]")
        return self._sp.encode(texts, out_type=int, num_threads=self.num_threads)

    def decode(self, ids: list[int] | np.ndarray) -> str:
        """Text of one sequence of ids; added tokens beyond the sentencepiece vocab decode to their text."""
        parts, run = [], []
        for i in (int(i) for i in ids):
            if i in self._added_text:
                parts += [self._sp.decode(run), self._added_text[i]]
                run = []
            else:
                run.append(i)
        return "".join([*parts, self._sp.decode(run)])


def load_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer in a file, or in a model directory.

    A file is read by its content: a sentencepiece model, a tiktoken ranks file (Llama 3's
    `original/tokenizer.model`) or a byte-level BPE `tokenizer.json` (Llama 3, Qwen2). In a directory, a
    sentencepiece `tokenizer.model` comes first (sentencepiece families also ship a `tokenizer.json`
    converted from it, which is not byte-level), then `tokenizer.json`, then a tiktoken `tokenizer.model`,
    then `original/tokenizer.model`. bos / eos / pad follow tokenizer_config.json / special_tokens_map.json
    next to the file when present (Qwen2: no bos; add_bos_token = false: none put before documents).

    Raises:
        ValueError naming the path when there is no tokenizer there or its kind is not supported.
    """
    # Imported here, as before tokenizer_base existed, so that importing lowmem.data does not load tiktoken;
    # hf_tokenizer imports only tokenizer_base, so this is no cycle.
    from lowmem.data.hf_tokenizer import is_tiktoken_file, load_tiktoken_file, load_tokenizer_json

    path = Path(path)
    if path.is_dir():
        path = _tokenizer_file_in(path)
    if not path.is_file():
        raise ValueError(
            f"{path}: no such file (looked at {path.absolute()}); give a tokenizer.model, a tokenizer.json or a "
            "model directory holding one"
        )
    with open(path, "rb") as f:
        head = f.read(64).lstrip()
    if head.startswith(b"{"):
        return load_tokenizer_json(path)
    if is_tiktoken_file(path):
        return load_tiktoken_file(path)
    return SentencePieceTokenizer(path)


def _tokenizer_file_in(directory: Path) -> Path:
    from lowmem.data.hf_tokenizer import is_tiktoken_file

    model = directory / "tokenizer.model"
    if model.is_file() and not is_tiktoken_file(model):
        return model
    for candidate in (directory / "tokenizer.json", model, directory / "original" / "tokenizer.model"):
        if candidate.is_file():
            return candidate
    raise ValueError(
        f"{directory}: no tokenizer.json, tokenizer.model or original/tokenizer.model; point "
        "data.tokenizer.path at the model's tokenizer file"
    )


def train_tokenizer(
    documents: Iterable[str],
    vocab_size: int,
    out_path: str | Path,
    seed: int = 0,
    *,
    max_sentences: int = 300_000,
) -> SentencePieceTokenizer:
    """Train a BPE sentencepiece model on `documents` and write it atomically to `out_path`.

    Byte fallback is on, so any text encodes (no unk for unseen characters); normalization is identity, so
    `decode(encode(text)) == text`. Documents are cut into training pieces of at most TRAIN_PIECE_CHARS
    characters; if there are more than `max_sentences` pieces, a uniform sample of that many (seeded by
    `seed`) is used. The same inputs give the same model bytes.
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size={vocab_size} is too small: byte fallback alone needs {N_BYTE_PIECES} + 4 pieces; "
            f"use vocab_size >= {MIN_VOCAB_SIZE}"
        )
    sentences = _sample_pieces(documents, max_sentences, seed)
    if not sentences:
        raise ValueError("train_tokenizer got no documents; pass a non-empty corpus")
    model = io.BytesIO()
    spm.set_random_generator_seed(seed)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences),
            model_writer=model,
            model_type="bpe",
            vocab_size=vocab_size,
            byte_fallback=True,
            character_coverage=1.0,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            split_digits=True,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            pad_id=PAD_ID,
            input_sentence_size=0,  # we sampled already; sentencepiece must not resample
            shuffle_input_sentence=False,
            max_sentence_length=4 * TRAIN_PIECE_CHARS,  # bytes; a UTF-8 character is at most 4
            num_threads=max(1, os.cpu_count() or 1),
            minloglevel=2,
        )
    except RuntimeError as e:
        raise ValueError(_training_failure(str(e), vocab_size, len(sentences))) from None
    write_bytes_atomic(Path(out_path), model.getvalue())
    return SentencePieceTokenizer(out_path)


def _training_failure(error: str, vocab_size: int, n_sentences: int) -> str:
    """The message for a sentencepiece training error, naming the spec field to change (and the largest
    vocab the text allows, when sentencepiece says it: "Vocabulary size too high (4096). ... <= 288.")."""
    limit = re.search(r"Vocabulary size too high \(\d+\)\. Please set it to a value <= (\d+)", error)
    most = int(limit.group(1)) if limit else 0
    if most >= MIN_VOCAB_SIZE:
        return (f"data.tokenizer.vocab_size = {vocab_size} is more than sentencepiece can train on this text "
                f"({n_sentences} pieces of text give at most {most}); set data.tokenizer.vocab_size <= {most} "
                "or give data.source more text")
    if limit:
        return (f"data.tokenizer.vocab_size = {vocab_size}: this text ({n_sentences} pieces) trains at most "
                f"{most} pieces, fewer than the {MIN_VOCAB_SIZE} a byte-fallback tokenizer needs; give "
                "data.source more text")
    return (f"sentencepiece could not train a {vocab_size}-piece model on {n_sentences} pieces of text: "
            f"{error}; give data.source more text or lower data.tokenizer.vocab_size")


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` via a temp file in the same directory and `os.replace`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        share(tmp)  # mkstemp's 0600 -> what the umask gives an ordinary file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _split_piece(text: str) -> Iterator[str]:
    """Cut a text into lines, and lines into pieces of at most TRAIN_PIECE_CHARS characters at whitespace."""
    for line in text.split("\n"):
        while len(line) > TRAIN_PIECE_CHARS:
            cut = line.rfind(" ", 0, TRAIN_PIECE_CHARS)
            cut = cut if cut > 0 else TRAIN_PIECE_CHARS
            yield line[:cut]
            line = line[cut:]
        if line.strip():
            yield line


def _sample_pieces(documents: Iterable[str], max_sentences: int, seed: int) -> list[str]:
    """All training pieces, or a seeded uniform sample of `max_sentences` of them (reservoir, in order)."""
    if max_sentences < 1:
        raise ValueError(f"max_sentences={max_sentences}; use a positive number")
    rng = np.random.default_rng(seed)
    kept: list[tuple[int, str]] = []
    n_seen = 0
    for doc in documents:
        for piece in _split_piece(doc):
            if len(kept) < max_sentences:
                kept.append((n_seen, piece))
            else:
                slot = int(rng.integers(0, n_seen + 1))
                if slot < max_sentences:
                    kept[slot] = (n_seen, piece)
            n_seen += 1
    kept.sort()
    return [piece for _, piece in kept]
