from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lowmem.data.prepare as prepare_module
import lowmem.data.tokenizer as tokenizer_module
from lowmem.data import (
    Tokenizer,
    load_or_train_tokenizer,
    load_tokenizer,
    read_documents,
    shipped_corpus,
    train_tokenizer,
)

SMALL_VOCAB = 512  # as in conftest.small_tokenizer


def test_special_ids(small_tokenizer: Tokenizer):
    tok = small_tokenizer
    assert tok.vocab_size == SMALL_VOCAB
    ids = {tok.bos_id, tok.eos_id, tok.pad_id}
    assert len(ids) == 3 and all(0 < i < tok.vocab_size for i in ids)


def test_round_trip_on_real_corpus_text(small_tokenizer: Tokenizer, kjv_slice: Path):
    # Chapters the tokenizer was trained on, and later ones it never saw.
    n_seen = sum(1 for _ in read_documents(kjv_slice))
    docs = list(itertools.islice(read_documents(shipped_corpus()), n_seen + 5))
    docs = docs[:3] + docs[n_seen:]
    ids = small_tokenizer.encode(docs)
    assert [small_tokenizer.decode(x) for x in ids] == docs
    # Merges were learned: well under one token per character on English.
    assert sum(map(len, ids)) < 0.5 * sum(map(len, docs))


def test_batched_encode_matches_one_at_a_time(small_tokenizer: Tokenizer):
    texts = ["And God said, Let there be light.", "", "  two  spaces\nnewline", "Ünïcödé ✓"]
    assert small_tokenizer.encode(texts) == [small_tokenizer.encode([t])[0] for t in texts]


def test_encode_rejects_a_bare_string(small_tokenizer: Tokenizer):
    with pytest.raises(TypeError, match="list of strings"):
        small_tokenizer.encode("text")  # type: ignore[arg-type]


# U+2581 is sentencepiece's own space marker and decodes to " ", so it is the one character that cannot
# round-trip (surrogates cannot be encoded as UTF-8 at all).
round_trip_text = st.text(st.characters(exclude_characters="\u2581", exclude_categories=("Cs",)), max_size=60)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=round_trip_text)
def test_any_text_round_trips_by_byte_fallback(small_tokenizer: Tokenizer, text: str):
    (ids,) = small_tokenizer.encode([text])
    assert all(0 <= i < small_tokenizer.vocab_size for i in ids)
    assert 0 not in ids  # byte fallback: never unk
    assert small_tokenizer.decode(ids) == text


def test_training_is_deterministic_and_atomic(kjv_slice: Path, small_tokenizer: Tokenizer, tmp_path: Path):
    again = train_tokenizer(read_documents(kjv_slice), SMALL_VOCAB, tmp_path / "again.model")
    assert again.path.read_bytes() == small_tokenizer.path.read_bytes()
    assert again.key == small_tokenizer.key
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again.model"]  # no temp file left behind


def test_sampling_caps_training_input(kjv_slice: Path, tmp_path: Path):
    sampled = tokenizer_module._sample_pieces(read_documents(kjv_slice), 50, seed=0)
    assert len(sampled) == 50
    assert sampled == tokenizer_module._sample_pieces(read_documents(kjv_slice), 50, seed=0)
    assert sampled != tokenizer_module._sample_pieces(read_documents(kjv_slice), 50, seed=1)


def test_long_documents_are_cut_at_whitespace():
    text = " ".join(["word"] * 2000)  # 9999 chars on one line
    pieces = list(tokenizer_module._split_piece(text))
    assert all(len(p) <= tokenizer_module.TRAIN_PIECE_CHARS for p in pieces)
    assert "".join(pieces) == text


def test_vocab_too_small_is_explained(tmp_path: Path):
    with pytest.raises(ValueError, match=r"vocab_size=100 is too small.*use vocab_size >="):
        train_tokenizer(["some text"], 100, tmp_path / "t.model")


def test_too_little_text_for_the_vocab_names_the_spec_field_and_the_most_it_allows(tmp_path: Path):
    text = list(itertools.islice(read_documents(shipped_corpus()), 3))  # three chapters: a few thousand pieces
    with pytest.raises(ValueError) as err:
        train_tokenizer(text, 20000, tmp_path / "t.model")
    message = str(err.value)
    assert message.startswith("data.tokenizer.vocab_size = 20000 is more than sentencepiece can train on this")
    limit = int(message.split("at most ")[1].split(")")[0])
    assert 0 < limit < 20000 and f"set data.tokenizer.vocab_size <= {limit}" in message
    train_tokenizer(text, limit, tmp_path / "t.model")  # the figure it names is one that trains


def test_a_text_too_small_for_any_vocab_asks_for_more_text(tmp_path: Path):
    with pytest.raises(ValueError, match=r"^data.tokenizer.vocab_size = 4096: this text \(1 pieces\) trains at most "
                       r"\d+ pieces, fewer than the \d+ a byte-fallback tokenizer needs; give data.source more text"):
        train_tokenizer(["hello world"], 4096, tmp_path / "t.model")


def test_load_or_train_reuses_the_cache(kjv_slice: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    first = load_or_train_tokenizer(kjv_slice, SMALL_VOCAB, tmp_path)
    assert first.path.parent.parent == tmp_path / "tokenizers" and first.path.name == "tokenizer.model"

    def no_training(*args, **kwargs):
        raise AssertionError("retrained although a cached tokenizer exists")

    monkeypatch.setattr(prepare_module, "train_tokenizer", no_training)
    second = load_or_train_tokenizer(kjv_slice, SMALL_VOCAB, tmp_path)
    assert second.path == first.path and second.key == first.key

    # A different vocab size or different corpus bytes is a different key, so it would train.
    with pytest.raises(AssertionError, match="retrained"):
        load_or_train_tokenizer(kjv_slice, SMALL_VOCAB + 64, tmp_path)
    other = tmp_path / "other.jsonl"
    other.write_text('{"text": "x"}\n')
    with pytest.raises(AssertionError, match="retrained"):
        load_or_train_tokenizer(other, SMALL_VOCAB, tmp_path)


def test_spec_minimum_vocab_matches_the_tokenizer():
    import msgspec

    from lowmem.data.tokenizer import MIN_VOCAB_SIZE
    from lowmem.spec import TrainTokenizer

    TrainTokenizer(vocab_size=MIN_VOCAB_SIZE)
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"kind": "train", "vocab_size": MIN_VOCAB_SIZE - 1}, TrainTokenizer)


# ------------------------------------------------------------------ byte-level BPE (Llama 3, Qwen2) and loading

BPE_VOCAB = 2048  # as in conftest.train_byte_level_bpe
N_BPE_DOCS = 80


@pytest.fixture(scope="module")
def llama3_style(train_byte_level_bpe, tmp_path_factory: pytest.TempPathFactory):
    """(tokenizers oracle, its tokenizer.json path, the same vocab as a tiktoken ranks file path)."""
    from lowmem.data.hf_tokenizer import LLAMA3_SPECIAL_TOKENS

    oracle = train_byte_level_bpe(list(LLAMA3_SPECIAL_TOKENS))
    out = tmp_path_factory.mktemp("llama3")
    oracle.save(str(out / "tokenizer.json"))
    oracle.encode_special_tokens = True  # as lowmem: a special token's text in a document is plain text
    (out / "original").mkdir()
    write_tiktoken_ranks(out / "tokenizer.json", out / "original" / "tokenizer.model")
    return oracle, out / "tokenizer.json", out / "original" / "tokenizer.model"


@pytest.fixture(scope="module")
def llama3_json(llama3_style) -> Tokenizer:
    return load_tokenizer(llama3_style[1])


def write_tiktoken_ranks(tokenizer_json: Path, out: Path) -> None:
    """The byte-level vocab of `tokenizer_json` (added tokens left out) as `base64(bytes) rank` lines."""
    import base64
    import json

    from lowmem.data.hf_tokenizer import unicode_to_byte

    spec = json.loads(tokenizer_json.read_text())
    added = {t["id"] for t in spec["added_tokens"]}
    to_byte = unicode_to_byte()
    lines = [
        f"{base64.b64encode(bytes(to_byte[c] for c in token)).decode()} {i}"
        for token, i in sorted(spec["model"]["vocab"].items(), key=lambda kv: kv[1])
        if i not in added
    ]
    out.write_text("\n".join(lines) + "\n")


SAMPLE_TEXTS = [
    "And God said, Let there be light: and there was light.",
    "Hello  world!!\n\n\n  x 12345 3.14159 — I'M here, you'll see; they've 'd",
    "  leading and trailing spaces  \t\n",
    "emoji 😀👍🏽 and CJK 漢字かな, accents éèê Ünïcödé, RTL שלום",
    "\r\n\r\nwindows newlines\r\n",
    "",
]

# Text tokenizers must agree on: any unicode (surrogates cannot be UTF-8), weighted towards digits, spaces and
# newlines, where the Llama 3 regex has its special cases.
any_text = st.text(
    st.one_of(st.characters(exclude_categories=("Cs",)), st.sampled_from(list(" \n\t\r0123456789'sdSD😀é"))),
    max_size=80,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(texts=st.lists(any_text, min_size=1, max_size=4))
def test_tokenizer_json_ids_equal_the_tokenizers_library(llama3_style, llama3_json: Tokenizer, texts: list[str]):
    oracle, _, _ = llama3_style
    tok = llama3_json
    ids = tok.encode(texts)
    assert ids == [e.ids for e in oracle.encode_batch(texts, add_special_tokens=False)]
    assert [tok.decode(x) for x in ids] == texts


def test_tokenizer_json_on_corpus_text(llama3_style):
    oracle, json_path, _ = llama3_style
    tok = load_tokenizer(json_path)
    texts = [*itertools.islice(read_documents(shipped_corpus()), N_BPE_DOCS, N_BPE_DOCS + 40), *SAMPLE_TEXTS]
    ids = tok.encode(texts)
    assert ids == [e.ids for e in oracle.encode_batch(texts, add_special_tokens=False)]
    assert sum(map(len, ids[:40])) < 0.35 * sum(map(len, texts[:40]))  # merges were used
    # Special tokens keep their ids, and are never produced from text.
    assert tok.special_id("<|eot_id|>") == oracle.token_to_id("<|eot_id|>") == BPE_VOCAB + 9
    assert tok.special_id("<|no_such_token|>") is None
    assert tok.encode(["<|eot_id|>"])[0] != [tok.special_id("<|eot_id|>")]
    assert tok.decode([tok.special_id("<|eot_id|>")]) == "<|eot_id|>"
    assert tok.vocab_size == oracle.get_vocab_size() == BPE_VOCAB + 256
    # No tokenizer_config.json: bos is what the post-processor would put first (none here), no eos.
    assert tok.bos_id is None and tok.eos_id is None and tok.pad_id == 0


def test_qwen2_nfc_and_gpt2_pre_tokenizers(llama3_style, tmp_path: Path):
    """Qwen2 normalizes to NFC; a plain ByteLevel pre-tokenizer splits by GPT-2's regex. Same vocab, both ways."""
    import tokenizers
    from tokenizers import normalizers, pre_tokenizers

    oracle, _, _ = llama3_style
    texts = [*SAMPLE_TEXTS, "cafe\u0301 n\u0303 A\u030a", "Ω ℃ ﬁ", "they'll   go  ,,; 2024-01-01"]
    for name, change in (
        ("nfc", lambda t: setattr(t, "normalizer", normalizers.NFC())),
        ("gpt2", lambda t: setattr(t, "pre_tokenizer", pre_tokenizers.ByteLevel(add_prefix_space=False))),
    ):
        variant = tokenizers.Tokenizer.from_str(oracle.to_str())
        change(variant)
        variant.save(str(tmp_path / f"{name}.json"))
        variant.encode_special_tokens = True
        ids = load_tokenizer(tmp_path / f"{name}.json").encode(texts)
        assert ids == [e.ids for e in variant.encode_batch(texts, add_special_tokens=False)], name
    assert ids != load_tokenizer(tmp_path / "nfc.json").encode(texts)  # the two really split differently


def test_tiktoken_ranks_file_gives_identical_ids(llama3_style):
    oracle, json_path, ranks_path = llama3_style
    ranks = load_tokenizer(ranks_path)
    texts = [*itertools.islice(read_documents(shipped_corpus()), 100, 120), *SAMPLE_TEXTS]
    assert ranks.encode(texts) == load_tokenizer(json_path).encode(texts)
    assert ranks.encode(texts) == [e.ids for e in oracle.encode_batch(texts, add_special_tokens=False)]
    # Llama 3's specials follow the ranks; bos / eos are begin_of_text / end_of_text.
    for text in ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|eot_id|>"):
        assert ranks.special_id(text) == oracle.token_to_id(text)
    assert (ranks.bos_id, ranks.eos_id) == (BPE_VOCAB, BPE_VOCAB + 1)
    assert ranks.vocab_size == BPE_VOCAB + 256 and ranks.key != load_tokenizer(json_path).key


def test_model_directory_picks_the_tokenizer_file(llama3_style, small_tokenizer: Tokenizer, tmp_path: Path):
    import shutil

    _, json_path, ranks_path = llama3_style
    # Llama 3 layout: tokenizer.json beside original/tokenizer.model → tokenizer.json.
    assert load_tokenizer(json_path.parent).path == json_path
    # Only original/tokenizer.model → the ranks file.
    only_original = tmp_path / "only_original"
    (only_original / "original").mkdir(parents=True)
    shutil.copy(ranks_path, only_original / "original" / "tokenizer.model")
    assert load_tokenizer(only_original).path == only_original / "original" / "tokenizer.model"
    # A sentencepiece tokenizer.model wins over a tokenizer.json (sentencepiece families ship both).
    both = tmp_path / "both"
    both.mkdir()
    shutil.copy(small_tokenizer.path, both / "tokenizer.model")
    shutil.copy(json_path, both / "tokenizer.json")
    picked = load_tokenizer(both)
    assert picked.path == both / "tokenizer.model" and picked.key == small_tokenizer.key
    with pytest.raises(ValueError, match=r"no tokenizer.json, tokenizer.model or original/tokenizer.model"):
        load_tokenizer(tmp_path)  # holds only subdirectories
    assert load_tokenizer(both / "tokenizer.model").files == (both / "tokenizer.model",)


def test_tokenizer_config_sets_bos_eos_pad(llama3_style, tmp_path: Path):
    import json
    import shutil

    _, json_path, _ = llama3_style
    shutil.copy(json_path, tmp_path / "tokenizer.json")
    config = tmp_path / "tokenizer_config.json"
    # Llama 3 Instruct: bos begin_of_text, eos eot_id.
    config.write_text(json.dumps({"bos_token": "<|begin_of_text|>", "eos_token": {"content": "<|eot_id|>"}}))
    tok = load_tokenizer(tmp_path)
    assert (tok.bos_id, tok.eos_id) == (BPE_VOCAB, BPE_VOCAB + 9)
    assert tok.files == (tmp_path / "tokenizer.json", config)
    # Qwen2: bos_token null → no bos; pad named.
    config.write_text(json.dumps({"bos_token": None, "eos_token": "<|end_of_text|>", "pad_token": "<|eot_id|>"}))
    tok = load_tokenizer(tmp_path)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (None, BPE_VOCAB + 1, BPE_VOCAB + 9)
    # add_bos_token = false: nothing is put before documents.
    config.write_text(json.dumps({"bos_token": "<|begin_of_text|>", "add_bos_token": False}))
    assert load_tokenizer(tmp_path).bos_id is None
    config.write_text(json.dumps({"eos_token": "<|nope|>"}))
    with pytest.raises(ValueError, match=r"tokenizer_config.json: eos_token is '<\|nope\|>', which is not a token"):
        load_tokenizer(tmp_path)


def test_sentencepiece_added_tokens_from_config(small_tokenizer: Tokenizer, tmp_path: Path):
    """Phi-3 keeps its chat tokens in tokenizer_config.json's added_tokens_decoder, beyond the .model vocab."""
    import json
    import shutil

    shutil.copy(small_tokenizer.path, tmp_path / "tokenizer.model")
    added = {str(SMALL_VOCAB + i): {"content": t, "special": True} for i, t in enumerate(["<|user|>", "<|end|>"])}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": added, "eos_token": "<|end|>"}))
    tok = load_tokenizer(tmp_path)
    assert tok.vocab_size == SMALL_VOCAB + 2
    assert tok.special_id("<|user|>") == SMALL_VOCAB and tok.eos_id == SMALL_VOCAB + 1
    assert tok.special_id("<s>") == small_tokenizer.bos_id == tok.bos_id  # a control piece of the model
    assert tok.special_id("[INST]") is None
    ids = [SMALL_VOCAB, *tok.encode(["In the beginning"])[0], SMALL_VOCAB + 1]
    assert tok.decode(ids) == "<|user|>In the beginning<|end|>"
    assert tok.key != small_tokenizer.key  # the config changes what documents become


def test_unsupported_tokenizer_json_is_explained(tmp_path: Path):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers

    # A sentencepiece-style BPE (Llama 2 / Mistral tokenizer.json): Metaspace, byte fallback.
    sp_style = tokenizers.Tokenizer(models.BPE(vocab={"<unk>": 0, "▁a": 1}, merges=[], byte_fallback=True))
    sp_style.pre_tokenizer = pre_tokenizers.Metaspace()
    sp_style.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match=r"tokenizer\.json: model\.byte_fallback = True.*point data\.tokenizer\.path "
                                         r"at the model's tokenizer\.model"):
        load_tokenizer(tmp_path / "tokenizer.json")
    wordpiece = tokenizers.Tokenizer(models.WordPiece(vocab={"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    wordpiece.save(str(tmp_path / "wp.json"))
    with pytest.raises(ValueError, match=r"wp\.json: the tokenizer model is 'WordPiece', not byte-level BPE"):
        load_tokenizer(tmp_path / "wp.json")


def test_merges_out_of_rank_order_are_rejected(llama3_style, tmp_path: Path):
    import json

    _, json_path, _ = llama3_style
    spec = json.loads(json_path.read_text())
    spec["model"]["merges"] = spec["model"]["merges"][::-1]
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match=r"merges are not consistent with rank order: merge #1 "):
        load_tokenizer(tmp_path / "tokenizer.json")
    spec["model"]["merges"] = spec["model"]["merges"][::-1][:-1]  # the last token is made by no merge
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match=r"is made by no merge"):
        load_tokenizer(tmp_path / "tokenizer.json")


def test_not_a_tokenizer_file_is_explained(tmp_path: Path):
    junk = tmp_path / "tokenizer.model"
    junk.write_bytes(b"\x00\x01 not a model")
    with pytest.raises(ValueError, match=r"tokenizer\.model: not a sentencepiece model, tiktoken ranks file or "
                                         r"tokenizer\.json"):
        load_tokenizer(junk)
    with pytest.raises(ValueError, match=r"no such file"):
        load_tokenizer(tmp_path / "missing.model")


def test_pretrained_model_uses_its_own_tokenizer():
    import msgspec

    from lowmem.spec import DataSpec, FileTokenizer, TrainTokenizer

    assert DataSpec().resolved_tokenizer("/models/qwen") == FileTokenizer(path="/models/qwen")
    assert DataSpec().resolved_tokenizer(None) == TrainTokenizer()
    explicit = FileTokenizer(path="/t/tokenizer.json")
    assert DataSpec(tokenizer=explicit).resolved_tokenizer("/models/qwen") == explicit
    with pytest.raises(ValueError, match=r"data.tokenizer.kind = 'train' with model.path = '/models/qwen': a "
                                         r"pretrained model must be trained with its own tokenizer"):
        DataSpec(tokenizer=TrainTokenizer()).resolved_tokenizer("/models/qwen")
    assert msgspec.convert({"tokenizer": {"kind": "train"}}, DataSpec).tokenizer == TrainTokenizer()
