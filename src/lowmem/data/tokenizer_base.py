"""What lowmem needs of any tokenizer (`Tokenizer`), and how the Hugging Face config files next to a
tokenizer file name its special tokens (`read_token_config`).

Shared by the sentencepiece kind (`lowmem.data.tokenizer`) and the byte-level BPE kinds
(`lowmem.data.hf_tokenizer`); it imports neither, so both can build on it without importing each other
both ways. Code that only *uses* a tokenizer (templates, records, packing, the loader) needs only this.
"""

from __future__ import annotations

import abc
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Hugging Face files next to a tokenizer that say which tokens are bos / eos / pad (and add_bos_token).
CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json")


class Tokenizer(abc.ABC):
    """What lowmem needs of a tokenizer, whatever file it was read from (see `load_tokenizer`).

    Attributes:
        path: the tokenizer file.
        files: the files to copy next to a saved model (`path` and its tokenizer_config.json /
            special_tokens_map.json), so that `load_tokenizer(model_dir)` gives the same tokenizer.
        key: content hash of `files`: packed-data caches key on it.
        vocab_size: one more than the largest id.
        bos_id: the token put before a document, or None when the family has none (Qwen2) or
            tokenizer_config.json says add_bos_token = false.
        eos_id: the token after a document (tokenizer_config.json's eos_token where given), or None.
        pad_id: the id that fills padding (masked anyway): the pad token, or 0 when there is none.
        dummy_prefix: encoding prepends a word boundary ("▁") to every text, as sentencepiece does with
            add_dummy_prefix; a text segment that continues a document then drops one leading space.
    """

    path: Path
    files: tuple[Path, ...]
    key: str
    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    pad_id: int
    dummy_prefix: bool = False

    @abc.abstractmethod
    def encode(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text (no bos/eos); special tokens are never produced from text."""

    @abc.abstractmethod
    def decode(self, ids: list[int] | np.ndarray) -> str:
        """Text of one sequence of ids (special tokens as their text)."""

    @abc.abstractmethod
    def special_id(self, text: str) -> int | None:
        """The id of the special token written `text` (e.g. "<|eot_id|>"), or None if there is none."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(path={str(self.path)!r}, vocab_size={self.vocab_size})"


@dataclass(frozen=True)
class TokenConfig:
    """What tokenizer_config.json / special_tokens_map.json next to a tokenizer file say.

    `tokens` holds bos_token / eos_token / pad_token where a file names them (None: explicitly none);
    `added` is tokenizer_config.json's added_tokens_decoder (text → id).
    """

    tokens: dict[str, str | None]
    add_bos: bool | None
    added: dict[str, int]
    files: tuple[Path, ...]

    def resolve(self, tokenizer: Tokenizer, defaults: dict[str, str | None]) -> tuple[int | None, int | None, int]:
        """(bos_id, eos_id, pad_id): the named tokens' ids, falling back to the family's `defaults`."""

        def token_id(name: str) -> int | None:
            text = self.tokens[name] if name in self.tokens else defaults.get(name)
            if text is None:
                return None
            i = tokenizer.special_id(text)
            if i is None:
                where = self.files[0] if name in self.tokens else tokenizer.path
                raise ValueError(f"{where}: {name} is {text!r}, which is not a token of {tokenizer.path}")
            return i

        bos = None if self.add_bos is False else token_id("bos_token")
        pad = token_id("pad_token")
        return bos, token_id("eos_token"), 0 if pad is None else pad


def read_token_config(directory: Path) -> TokenConfig:
    """The TokenConfig of the tokenizer files in `directory` (tokenizer_config.json wins over the map)."""
    tokens: dict[str, str | None] = {}
    add_bos = None
    added: dict[str, int] = {}
    files = []
    for name in CONFIG_FILES:
        path = directory / name
        if not path.is_file():
            continue
        files.append(path)
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from None
        for key in ("bos_token", "eos_token", "pad_token"):
            if key in config and key not in tokens:
                value = config[key]
                tokens[key] = value.get("content") if isinstance(value, dict) else value
        if add_bos is None and isinstance(config.get("add_bos_token"), bool):
            add_bos = config["add_bos_token"]
        for i, token in (config.get("added_tokens_decoder") or {}).items():
            added.setdefault(token["content"], int(i))
    return TokenConfig(tokens=tokens, add_bos=add_bos, added=added, files=tuple(files))


def files_key(files: tuple[Path, ...]) -> str:
    """sha256 over the names and bytes of `files`."""
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()
