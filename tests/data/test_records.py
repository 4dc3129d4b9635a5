from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lowmem.data import PackedDataset, Tokenizer, inspect_rows, make_batch, prepare_packed_dataset
from lowmem.data.records import BadRecord, SkipLog, encode_segments, iter_segments, record_segments
from lowmem.spec.structs import DataSpec

ALPACA = {"instruction": "Name the first book.", "input": "Of the Bible", "output": "Genesis is first."}
CHAT = {
    "messages": [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Who built the ark?"},
        {"role": "assistant", "content": "Noah built it."},
        {"role": "user", "content": "How many of each?"},
        {"role": "assistant", "content": "Two of every sort."},
    ]
}


def trained_text(record: dict, data: DataSpec, tok: Tokenizer) -> tuple[str, str]:
    """(decoded trained tokens without specials, decoded full document) of one record."""
    ((tokens, mask),) = encode_segments([record_segments(record, data, "x:1")], tok)
    trained = [t for t, m in zip(tokens.tolist(), mask.tolist(), strict=True) if m and t != tok.eos_id]
    return tok.decode(trained), tok.decode(tokens)


def test_text_format_trains_everything(small_tokenizer: Tokenizer):
    ((tokens, mask),) = encode_segments(
        [record_segments({"body": "In the beginning"}, DataSpec(text_field="body"), "x")], small_tokenizer
    )
    assert tokens[0] == small_tokenizer.bos_id and tokens[-1] == small_tokenizer.eos_id
    assert mask.dtype == np.uint8 and mask.all()


def test_instruct_trains_only_the_response(small_tokenizer: Tokenizer):
    trained, full = trained_text(ALPACA, DataSpec(format="instruct"), small_tokenizer)
    assert trained == "Genesis is first."
    assert "### Instruction:\nName the first book.\n\n### Input:\nOf the Bible" in full
    no_input = trained_text({**ALPACA, "input": ""}, DataSpec(format="instruct"), small_tokenizer)[1]
    assert "### Input" not in no_input and "paired with an input" not in no_input
    everything, full = trained_text(
        ALPACA, DataSpec(format="instruct", train_on_prompt=True), small_tokenizer
    )
    assert everything == full


def test_chat_trains_only_assistant_turns(small_tokenizer: Tokenizer):
    data = DataSpec(format="chat")
    ((tokens, mask),) = encode_segments([record_segments(CHAT, data, "x")], small_tokenizer)
    # Each trained run, decoded, is one assistant reply (then its </s>).
    runs = np.split(tokens, np.flatnonzero(np.diff(mask.astype(np.int8))) + 1)
    trained_runs = [
        small_tokenizer.decode(r[r != small_tokenizer.eos_id])
        for r in runs
        if mask[tokens.tolist().index(r[0])]
    ]
    assert trained_runs == ["Noah built it. ", "Two of every sort. "]  # Llama 2 writes " {reply} </s>"
    assert int((tokens[mask == 1] == small_tokenizer.eos_id).sum()) == 2
    full = small_tokenizer.decode(tokens)
    assert "[INST] <<SYS>>\nAnswer briefly.\n<</SYS>>\n\nWho built the ark? [/INST]" in full


def test_llama2_chat_equals_meta_reference_encoding(small_tokenizer: Tokenizer):
    """Meta's Llama 2 chat_completion encodes each exchange as one sentencepiece text
    `[INST] {user} [/INST] {reply} ` between bos and eos; the segments (the reply a separate, trained text whose
    leading space the dummy prefix stands for) must give the same ids."""
    tok = small_tokenizer
    messages = CHAT["messages"] + [{"role": "user", "content": "  And then?  "},
                                   {"role": "assistant", "content": " The rain fell.\n"}]
    system, turns = messages[0]["content"], messages[1:]
    expected: list[int] = []
    for i in range(0, len(turns), 2):
        user, reply = turns[i]["content"], turns[i + 1]["content"]
        if i == 0:
            user = f"<<SYS>>\n{system}\n<</SYS>>\n\n{user}"
        text = f"[INST] {user.strip()} [/INST] {reply.strip()} "
        expected += [tok.bos_id, *tok.encode([text])[0], tok.eos_id]
    ((tokens, mask),) = encode_segments([record_segments({"messages": messages}, DataSpec(format="chat"), "x")], tok)
    assert tok.dummy_prefix and tokens.tolist() == expected
    assert tok.decode(tokens[mask == 1]) == "Noah built it.  Two of every sort.  The rain fell. "  # </s> decodes to ""


def test_special_tokens_bos_and_adjacent_text_in_segments(small_tokenizer: Tokenizer):
    tok = small_tokenizer
    from lowmem.data.templates import BOS, EOS, SpecialToken

    inst = SpecialToken("[INST]", "mistral", or_text=True)
    segments = [(BOS, False), (inst, False), (" hi", False), (SpecialToken("</s>", "t"), True)]
    ((tokens, mask),) = encode_segments([segments], tok)
    # [INST] is no piece of this tokenizer: it is text, encoded together with the text after it.
    assert tokens.tolist() == [tok.bos_id, *tok.encode(["[INST] hi"])[0], tok.eos_id]
    assert mask.tolist() == [0] * (len(tokens) - 1) + [1]
    with pytest.raises(ValueError, match=r"chat template 'chatml' writes the special token '<\|im_start\|>'"):
        encode_segments([[(SpecialToken("<|im_start|>", "chatml"), False), (EOS, True)]], tok)


def test_columns_rename_fields(small_tokenizer: Tokenizer):
    renamed = {"prompt": ALPACA["instruction"], "context": ALPACA["input"], "answer": ALPACA["output"]}
    data = DataSpec(
        format="instruct", columns={"instruction": "prompt", "input": "context", "output": "answer"}
    )
    assert trained_text(renamed, data, small_tokenizer) == trained_text(
        ALPACA, DataSpec(format="instruct"), small_tokenizer
    )
    sharegpt = {"conversations": [{"from": m["role"], "value": m["content"]} for m in CHAT["messages"]]}
    data = DataSpec(format="chat", columns={"messages": "conversations", "role": "from", "content": "value"})
    assert trained_text(sharegpt, data, small_tokenizer) == trained_text(
        CHAT, DataSpec(format="chat"), small_tokenizer
    )
    with pytest.raises(
        ValueError, match=r"data.columns has keys \['instrution'\].*\['instruction', 'input', 'output'\]"
    ):
        list(
            iter_segments(
                "unused", DataSpec(format="instruct", columns={"instrution": "q"}), SkipLog("error")
            )
        )


@pytest.mark.parametrize(
    ("data", "record", "message"),
    [
        (DataSpec(format="instruct"), {"instruction": "a"}, r"no field 'output'.*\['instruction'\]"),
        (DataSpec(format="instruct"), {"instruction": "a", "output": 3}, r"field 'output' is a int"),
        (DataSpec(format="instruct"), {"instruction": " ", "output": "b"}, r"field 'instruction' is empty"),
        (DataSpec(format="chat"), {"messages": "hi"}, r"expected a non-empty list"),
        (
            DataSpec(format="chat"),
            {"messages": [{"role": "bot", "content": "x"}]},
            r"messages\[0\]\.role is 'bot'",
        ),
        (
            DataSpec(format="chat"),
            {"messages": [{"role": "user", "content": "x"}]},
            r"roles \['user'\].*ending with",
        ),
        (
            DataSpec(format="chat"),
            {"messages": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]},
            r"starting with user",
        ),
        (DataSpec(), {"text": ""}, r"field 'text' is empty"),
    ],
)
def test_bad_records_say_what_and_where(data: DataSpec, record: dict, message: str):
    with pytest.raises(BadRecord, match=rf"^f\.jsonl:7: .*{message}"):
        record_segments(record, data, "f.jsonl:7")


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


BAD_LINES = [json.dumps(ALPACA), "{not json", json.dumps({"instruction": "x"}), json.dumps(ALPACA), "[1]"]


def test_bad_rows_error_names_file_and_line(small_tokenizer: Tokenizer, tmp_path: Path):
    path = write_jsonl(tmp_path / "sft.jsonl", BAD_LINES)
    with pytest.raises(ValueError, match=r"sft\.jsonl:2: invalid JSON.*data.bad_rows = \"skip\""):
        prepare_packed_dataset(path, small_tokenizer, 64, tmp_path, DataSpec(format="instruct"))
    assert list((tmp_path / "packed").iterdir()) == []


def test_bad_rows_skip_counts_them(small_tokenizer: Tokenizer, tmp_path: Path):
    path = write_jsonl(tmp_path / "sft.jsonl", BAD_LINES)
    out = prepare_packed_dataset(
        path, small_tokenizer, 256, tmp_path, DataSpec(format="instruct", bad_rows="skip")
    )
    meta = PackedDataset(out).metadata
    assert meta["n_skipped"] == 3 and meta["n_documents"] == 2
    examples = meta["skipped_examples"]
    assert [e.split(": ")[0].rsplit("/", 1)[-1] for e in examples] == [
        "sft.jsonl:2",
        "sft.jsonl:3",
        "sft.jsonl:5",
    ]
    assert "no field 'output'" in examples[1]


def test_csv_row_numbers(small_tokenizer: Tokenizer, tmp_path: Path):
    path = tmp_path / "d.csv"
    path.write_text('instruction,output\n"a",b\n"c",\n')
    with pytest.raises(ValueError, match=r"d\.csv:row 1: field 'output'"):
        prepare_packed_dataset(path, small_tokenizer, 64, tmp_path, DataSpec(format="instruct"))


def test_packed_masks_and_inspect(small_tokenizer: Tokenizer, tmp_path: Path):
    path = write_jsonl(
        tmp_path / "chat.jsonl", [json.dumps(CHAT), json.dumps({"messages": CHAT["messages"][1:3]})]
    )
    out = prepare_packed_dataset(path, small_tokenizer, 256, tmp_path, DataSpec(format="chat"))
    ds = PackedDataset(out)
    tokens, doc_ids, loss_mask = ds.rows(np.arange(len(ds)))
    labels = make_batch(tokens, doc_ids, loss_mask)["labels"].numpy()
    trained = labels[labels != -100]
    eos = small_tokenizer.eos_id
    trained_text_ = small_tokenizer.decode(trained[trained != eos])
    assert trained_text_.count("Noah built it.") == 2 and trained_text_.count("Two of every sort.") == 1
    assert "ark" not in trained_text_ and "INST" not in trained_text_ and "briefly" not in trained_text_
    assert int((trained == eos).sum()) == 3
    text = inspect_rows(out, small_tokenizer, n=1)
    assert "[[<s>[INST] <<SYS>>" in text and "[/INST]]]" in text and "Noah built it. </s>" in text
    assert text.count("  doc ") == 2
