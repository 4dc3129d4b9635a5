from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lowmem.data.tokenizer as tokenizer_module
from lowmem.data import Tokenizer, load_or_train_tokenizer, read_documents, shipped_corpus, train_tokenizer

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


def test_load_or_train_reuses_the_cache(kjv_slice: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    first = load_or_train_tokenizer(kjv_slice, SMALL_VOCAB, tmp_path)
    assert first.path.parent.parent == tmp_path / "tokenizers" and first.path.name == "tokenizer.model"

    def no_training(*args, **kwargs):
        raise AssertionError("retrained although a cached tokenizer exists")

    monkeypatch.setattr(tokenizer_module, "train_tokenizer", no_training)
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
