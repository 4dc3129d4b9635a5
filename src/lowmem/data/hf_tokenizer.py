"""Byte-level BPE tokenizers (Llama 3, Qwen2) encoded by tiktoken, read from either file they ship in.

- A tiktoken ranks file (Llama 3's `original/tokenizer.model`): lines `base64(token bytes) rank`; the 256
  Llama 3 special tokens follow the ranks.
- A Hugging Face `tokenizer.json` whose model is byte-level BPE: its vocab, mapped back from the GPT-2
  byte-to-unicode alphabet to bytes, *is* a tiktoken rank table once the merges are checked to agree with
  the ids (see `check_merges`); the pre-tokenizer's Split regex is tiktoken's pattern; `added_tokens` are
  the special tokens.

Encoding always goes through `tiktoken.Encoding`; nothing here runs BPE by hand.
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import unicodedata
from pathlib import Path

import numpy as np
import tiktoken

from lowmem.data.tokenizer_base import TokenConfig, Tokenizer, files_key, read_token_config

# Llama 3's pre-tokenizer (Meta's `llama3/tokenizer.py`, and the Split regex of its tokenizer.json).
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
    r"\s+(?!\S)|\s+"
)
# GPT-2's, which a ByteLevel pre-tokenizer with use_regex = true applies.
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"

# Llama 3.1's special tokens, ids len(ranks) + index (128000...128255 for the real model). The ids the chat
# template uses (begin/end_of_text, start/end_header_id, eot_id) are the same in Llama 3 and 3.x.
_LLAMA3_NAMED = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|reserved_special_token_2|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
)
N_LLAMA3_SPECIAL = 256
LLAMA3_SPECIAL_TOKENS = _LLAMA3_NAMED + tuple(
    f"<|reserved_special_token_{3 + i}|>" for i in range(N_LLAMA3_SPECIAL - len(_LLAMA3_NAMED))
)
LLAMA3_DEFAULTS = {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"}

USE_INSTEAD = (
    "lowmem reads sentencepiece tokenizer.model files, tiktoken ranks files and byte-level BPE tokenizer.json "
    "files (Llama 3, Qwen2); for a sentencepiece family (Llama 2, Mistral, Gemma, Phi-3) point "
    "data.tokenizer.path at the model's tokenizer.model"
)


class TiktokenTokenizer(Tokenizer):
    """A byte-level BPE vocabulary encoded by tiktoken.

    Args:
        path: the file it came from (`tokenizer.json` or a ranks file).
        mergeable_ranks: token bytes → id; the id is also the BPE merge priority.
        pattern: the pre-tokenizer regex.
        special_tokens: text → id of every added token; none is ever produced from text by `encode` except
            those in `text_tokens` (added tokens that are not special, which Hugging Face matches in text).
        config: bos / eos / pad from tokenizer_config.json, over `defaults`.
        nfc: apply Unicode NFC before encoding (Qwen2's normalizer).
    """

    def __init__(
        self,
        path: Path,
        *,
        mergeable_ranks: dict[bytes, int],
        pattern: str,
        special_tokens: dict[str, int],
        text_tokens: frozenset[str] = frozenset(),
        config: TokenConfig,
        defaults: dict[str, str | None],
        nfc: bool = False,
        num_threads: int = 8,
    ):
        self.path = path
        self.files = (path, *config.files)
        self.key = files_key(self.files)
        self.num_threads = num_threads
        self._nfc = nfc
        self._text_tokens = text_tokens
        self._special = dict(special_tokens)
        self._enc = tiktoken.Encoding(
            f"lowmem-{self.key[:16]}", pat_str=pattern, mergeable_ranks=mergeable_ranks, special_tokens=special_tokens
        )
        self.vocab_size = self._enc.n_vocab
        self.bos_id, self.eos_id, self.pad_id = config.resolve(self, defaults)

    def special_id(self, text: str) -> int | None:
        return self._special.get(text)

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text (no bos/eos); special tokens in the text are encoded as plain text."""
        if isinstance(texts, str):
            raise TypeError("encode takes a list of strings; wrap a single text as [text]")
        if self._nfc:
            texts = [unicodedata.normalize("NFC", t) for t in texts]
        if not self._text_tokens:
            return self._enc.encode_ordinary_batch(texts, num_threads=self.num_threads)
        return self._enc.encode_batch(
            texts, num_threads=self.num_threads, allowed_special=self._text_tokens, disallowed_special=()
        )

    def decode(self, ids: list[int] | np.ndarray) -> str:
        return self._enc.decode_bytes([int(i) for i in ids]).decode("utf-8", errors="replace")


# ------------------------------------------------------------------------------------- tiktoken ranks file


def is_tiktoken_file(path: Path) -> bool:
    """Whether `path` looks like a tiktoken ranks file (its first line is `base64 rank`), not a protobuf."""
    with open(path, "rb") as f:
        first = f.readline(4096).split()
    if len(first) != 2 or not first[1].isdigit():
        return False
    try:
        base64.b64decode(first[0], validate=True)
    except binascii.Error:
        return False
    return True


def load_tiktoken_file(path: str | Path) -> TiktokenTokenizer:
    """Llama 3's `original/tokenizer.model`: ranks, the Llama 3 regex and its 256 special tokens after them."""
    path = Path(path)
    ranks: dict[bytes, int] = {}
    for n, line in enumerate(path.read_bytes().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        try:
            token, rank = base64.b64decode(parts[0], validate=True), int(parts[1])
            if len(parts) != 2:
                raise ValueError
        except (binascii.Error, ValueError, IndexError):
            raise ValueError(
                f"{path}:{n}: expected `<base64 token> <rank>`, found {line[:60]!r}; a tiktoken ranks file has "
                "one token per line"
            ) from None
        ranks[token] = rank
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{path}: ranks are not 0..{len(ranks) - 1} each once; the file is damaged or not tiktoken")
    special = {text: len(ranks) + i for i, text in enumerate(LLAMA3_SPECIAL_TOKENS)}
    return TiktokenTokenizer(
        path,
        mergeable_ranks=ranks,
        pattern=LLAMA3_PATTERN,
        special_tokens=special,
        config=read_token_config(path.parent),
        defaults=LLAMA3_DEFAULTS,
    )


# ---------------------------------------------------------------------------------------- tokenizer.json


@functools.cache
def unicode_to_byte() -> dict[str, int]:
    """The inverse of GPT-2's byte → printable character map that byte-level BPE vocabularies are written in."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return {c: b for b, c in chars.items()}


def load_tokenizer_json(path: str | Path) -> TiktokenTokenizer:
    """A Hugging Face `tokenizer.json` with a byte-level BPE model, as tiktoken ranks plus added tokens.

    Raises:
        ValueError naming the file and the part lowmem cannot reproduce exactly (another model type, a
        normalizer other than NFC, a pre-tokenizer other than Split(regex) + ByteLevel, merges that disagree
        with the ids).
    """
    path = Path(path)
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    model = spec.get("model") or {}

    def unsupported(what: str) -> ValueError:
        return ValueError(f"{path}: {what}, which lowmem does not support; {USE_INSTEAD}")

    if model.get("type") != "BPE":
        raise unsupported(f"the tokenizer model is {model.get('type')!r}, not byte-level BPE")
    for option in ("byte_fallback", "dropout", "continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(option):
            raise unsupported(f"model.{option} = {model[option]!r} (a sentencepiece-style or non-byte-level BPE)")
    pattern = _pre_tokenizer_pattern(spec.get("pre_tokenizer"), unsupported)
    nfc = _is_nfc(spec.get("normalizer"), unsupported)
    decoder = spec.get("decoder")
    if decoder is not None and decoder.get("type") != "ByteLevel":
        raise unsupported(f"decoder type {decoder.get('type')!r} (expected ByteLevel)")

    added = spec.get("added_tokens") or []
    added_ids = {t["id"] for t in added}
    to_byte = unicode_to_byte()
    ranks: dict[bytes, int] = {}
    for token, i in model["vocab"].items():
        if i in added_ids:
            continue
        try:
            ranks[bytes(to_byte[c] for c in token)] = i
        except KeyError:
            raise unsupported(f"vocab token {token!r} is not written in the byte-level alphabet") from None
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise unsupported(f"the vocab lacks single-byte tokens for bytes {missing[:8]} (not byte-level)")
    check_merges(model.get("merges") or [], model["vocab"], added_ids, unsupported)

    for t in added:
        if not t.get("special") and (t.get("lstrip") or t.get("rstrip") or t.get("single_word")):
            raise unsupported(f"added token {t['content']!r} strips whitespace or matches single words only")
    return TiktokenTokenizer(
        path,
        mergeable_ranks=ranks,
        pattern=pattern,
        special_tokens={t["content"]: t["id"] for t in added},
        text_tokens=frozenset(t["content"] for t in added if not t.get("special")),
        config=read_token_config(path.parent),
        defaults={"bos_token": _post_processor_bos(spec.get("post_processor")), "eos_token": None},
        nfc=nfc,
    )


def check_merges(merges: list, vocab: dict[str, int], added_ids: set[int], unsupported) -> None:
    """Check that BPE by these merges equals tiktoken's BPE by id rank, or raise `unsupported(...)`.

    tiktoken merges the adjacent pair whose concatenation has the lowest id. That is what the merges do when
    (1) each merge `a b` joins two vocab tokens into a vocab token, (2) merges come in non-decreasing order of
    the id they make, and (3) every multi-byte token is made by some merge. Llama 3's and Qwen2's
    tokenizer.json (both converted from tiktoken) satisfy this; a vocab whose merges were reordered does not.
    """
    made = set()
    last = -1
    for n, merge in enumerate(merges):
        a, b = merge.split(" ", 1) if isinstance(merge, str) else merge
        ia, ib, it = vocab.get(a), vocab.get(b), vocab.get(a + b)
        if ia is None or ib is None or it is None:
            raise unsupported(f"merge #{n} {a!r} + {b!r} uses or makes a token that is not in the vocab")
        if it < last:
            raise unsupported(
                f"merges are not consistent with rank order: merge #{n} {a!r} + {b!r} makes id {it}, "
                f"after a merge that made id {last}"
            )
        last = it
        made.add(it)
    to_byte = unicode_to_byte()
    for token, i in vocab.items():
        if i not in made and i not in added_ids and len(token) > 1 and all(c in to_byte for c in token):
            raise unsupported(f"vocab token {token!r} (id {i}) is made by no merge")


def _pre_tokenizer_pattern(pre: dict | None, unsupported) -> str:
    """The regex tiktoken splits by: a Split(Regex, Isolated) before ByteLevel, or ByteLevel's GPT-2 regex."""
    steps = (pre.get("pretokenizers") or []) if pre and pre.get("type") == "Sequence" else [pre] if pre else []
    pattern = None
    byte_level = False
    for step in steps:
        kind = step.get("type")
        if kind == "Split" and pattern is None and not byte_level:
            regex = (step.get("pattern") or {}).get("Regex")
            if regex is None or step.get("behavior") != "Isolated" or step.get("invert"):
                raise unsupported(f"pre-tokenizer Split {step.get('pattern')} {step.get('behavior')} is not an "
                                  "isolating regex split")
            pattern = regex
        elif kind == "ByteLevel" and not byte_level:
            if step.get("add_prefix_space"):
                raise unsupported("the ByteLevel pre-tokenizer has add_prefix_space = true")
            if step.get("use_regex", True):
                if pattern is not None:
                    raise unsupported("the pre-tokenizer splits twice (a Split and ByteLevel's own regex)")
                pattern = GPT2_PATTERN
            byte_level = True
        else:
            raise unsupported(f"pre-tokenizer step {kind!r} (expected an optional Split regex, then ByteLevel)")
    if not byte_level:
        raise unsupported("the pre-tokenizer is not ByteLevel (not a byte-level BPE)")
    if pattern is None:
        raise unsupported("the pre-tokenizer has no regex split")
    return pattern


def _is_nfc(normalizer: dict | None, unsupported) -> bool:
    steps = (normalizer.get("normalizers") or []) if normalizer and normalizer.get("type") == "Sequence" else (
        [normalizer] if normalizer else []
    )
    kinds = [s.get("type") for s in steps]
    if kinds not in ([], ["NFC"]):
        raise unsupported(f"normalizer {kinds} (only none or NFC)")
    return kinds == ["NFC"]


def _post_processor_bos(post: dict | None) -> str | None:
    """The special token a TemplateProcessing post-processor puts first (Llama 3's <|begin_of_text|>), if any."""
    steps = (post.get("processors") or []) if post and post.get("type") == "Sequence" else [post] if post else []
    for step in steps:
        if step.get("type") == "TemplateProcessing" and step.get("single"):
            first = step["single"][0]
            if "SpecialToken" in first:
                return first["SpecialToken"]["id"]
    return None

