"""Chat templates against the model families' own Hugging Face jinja templates, token for token.

Each family's published `chat_template` (written out below) goes into a byte-level BPE tokenizer built for the
test with that family's special tokens; `transformers` renders and tokenizes conversations with it, and
lowmem's segments must give the same ids, with exactly the assistant replies (and their end-of-turn token)
trained.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from lowmem.data import load_tokenizer
from lowmem.data.records import encode_segments, record_segments
from lowmem.data.templates import CHAT_TEMPLATES, TEMPLATE_VERSION, resolve_chat_template
from lowmem.spec import DataSpec

# The families' chat templates as their Hugging Face tokenizer_config.json publish them.
LLAMA2_JINJA = r"""{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\n' + system_message + '\n<</SYS>>\n\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"""  # noqa: E501

LLAMA3_JINJA = r"""{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"""  # noqa: E501

MISTRAL_JINJA = r"""{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] %}{%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}{%- endif %}{{- bos_token }}{%- for message in loop_messages %}{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{- raise_exception('After the optional system message, conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif %}{%- if message['role'] == 'user' %}{%- if loop.first and system_message is defined %}{{- '[INST] ' + system_message + '\n\n' + message['content'] + ' [/INST]' }}{%- else %}{{- '[INST] ' + message['content'] + ' [/INST]' }}{%- endif %}{%- elif message['role'] == 'assistant' %}{{- ' ' + message['content'] + eos_token }}{%- else %}{{- raise_exception('Only user and assistant roles are supported, with the exception of an initial optional system message!') }}{%- endif %}{%- endfor %}"""  # noqa: E501

CHATML_JINJA = r"""{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"""  # noqa: E501

GEMMA_JINJA = r"""{{ bos_token }}{%- if messages[0]['role'] == 'system' -%}{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}{%- set loop_messages = messages[1:] -%}{%- else -%}{%- set first_user_prefix = "" -%}{%- set loop_messages = messages -%}{%- endif -%}{%- for message in loop_messages -%}{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}{{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}{%- endif -%}{%- if (message['role'] == 'assistant') -%}{%- set role = "model" -%}{%- else -%}{%- set role = message['role'] -%}{%- endif -%}{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}{%- endfor -%}{%- if add_generation_prompt -%}{{'<start_of_turn>model\n'}}{%- endif -%}"""  # noqa: E501

PHI3_JINJA = r"""{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"""  # noqa: E501

QWEN3_JINJA = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}"""  # noqa: E501

PHI4_JINJA = r"""{% for message in messages %}{% if message['role'] == 'system' and 'tools' in message and message['tools'] is not none %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|tool|>' + message['tools'] + '<|/tool|>' + '<|end|>' }}{% else %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% else %}{{ eos_token }}{% endif %}"""  # noqa: E501

# template → (jinja, special tokens, bos, eos, end-of-turn token after each reply, config.json model_type)
FAMILIES = {
    "llama2": (LLAMA2_JINJA, ["<s>", "</s>"], "<s>", "</s>", "</s>", "llama"),
    "llama3": (
        LLAMA3_JINJA,
        ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        "<|begin_of_text|>", "<|eot_id|>", "<|eot_id|>", "llama",
    ),
    "mistral": (MISTRAL_JINJA, ["<s>", "</s>"], "<s>", "</s>", "</s>", "mistral"),
    "chatml": (CHATML_JINJA, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None, "<|im_end|>", "<|im_end|>",
               "qwen2"),
    "gemma": (GEMMA_JINJA, ["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"], "<bos>", "<eos>",
              "<end_of_turn>", "gemma2"),
    "phi3": (PHI3_JINJA, ["<s>", "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"], "<s>",
             "<|endoftext|>", "<|end|>", "phi3"),
    "phi4": (PHI4_JINJA, ["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|tool|>",
                          "<|/tool|>"], None, "<|endoftext|>", "<|end|>", "phi3"),
    "qwen3": (QWEN3_JINJA, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None, "<|im_end|>", "<|im_end|>",
              "qwen3"),
}
# Qwen3's <think> and </think> are added tokens that are not special: tokenizers match them in text.
TEXT_TOKENS = {"qwen3": ["<think>", "</think>"]}


def conversation(*turns: str, system: str | None = None) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": system}] if system is not None else []
    roles = ["user", "assistant"] * len(turns)
    return messages + [{"role": r, "content": t} for r, t in zip(roles, turns, strict=False)]


CONVERSATIONS = [
    conversation("Who built the ark?", "Noah built it.", system="Answer briefly."),
    conversation("Who built the ark?", "Noah built it."),
    conversation("How many of each?", "Two of every sort.", "And the birds?", "Seven, male and female.",
                 system="You are a scribe.\nCite chapter and verse."),
    conversation("  padded question  ", "  padded answer, with 3 numbers 1234 \n", "Ünïcödé ✓ 😀",
                 "Réponse: ça va.\n\nSecond paragraph.", "last?", "Yes — the end.  "),
]
# Replies that think (Qwen3): reasoning kept on the last reply only, dropped from earlier ones; an empty think block
# for a last reply without any; newlines at the seams trimmed.
THINKING = [
    conversation("2 + 2?", "<think>\nTwo and two.\n</think>\n\nFour."),
    conversation("2 + 2?", "<think>Two and two.</think>Four.", "And 3 + 3?", "<think>\n\nThree twice.\n\n</think>Six.",
                 system="Think first."),
    conversation("Hi", "Hello!", "Bye", "Goodbye."),
    conversation("x?", "<think>a</think>\n\nmid <think>b</think> y", "z?", "plain <think>not a block"),
]


@pytest.fixture(scope="module")
def base_bpe(train_byte_level_bpe):
    return train_byte_level_bpe([])


def family_tokenizers(base_bpe, template: str, tmp_path: Path, specials: list[str] | None = None):
    """(transformers tokenizer with the family's jinja template, the lowmem tokenizer of its saved files)."""
    transformers = pytest.importorskip("transformers")
    import tokenizers

    jinja, family_specials, bos, eos, _, _ = FAMILIES[template]
    tok = tokenizers.Tokenizer.from_str(base_bpe.to_str())
    tok.add_special_tokens(family_specials if specials is None else specials)
    tok.add_tokens(TEXT_TOKENS.get(template, []))
    kwargs = {"bos_token": bos} if bos is not None else {}
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, **kwargs)
    hf.chat_template = jinja
    hf.save_pretrained(tmp_path)
    return hf, load_tokenizer(tmp_path)


def lowmem_encode(messages, template: str, tokenizer, train_on_prompt: bool = False):
    data = DataSpec(format="chat", chat_template=template, train_on_prompt=train_on_prompt)
    ((tokens, mask),) = encode_segments([record_segments({"messages": messages}, data, "x:1")], tokenizer)
    return tokens, mask


def trained_runs(tokens: np.ndarray, mask: np.ndarray, tokenizer) -> list[str]:
    """Each maximal run of trained tokens, decoded."""
    cuts = np.flatnonzero(np.diff(mask.astype(np.int8))) + 1
    return [tokenizer.decode(t) for t, m in zip(np.split(tokens, cuts), np.split(mask, cuts), strict=True) if m[0]]


def reply_as_written(template: str, reply: str) -> str:
    """How the family's template writes an assistant reply (trimmed, spaced) before its end-of-turn token."""
    return {"llama2": f" {reply.strip()} ", "llama3": reply.strip(), "mistral": f" {reply}",
            "gemma": reply.strip()}.get(template, reply)


@pytest.mark.parametrize("template", sorted(FAMILIES))
def test_ids_equal_the_family_jinja_template(base_bpe, template: str, tmp_path: Path):
    hf, tok = family_tokenizers(base_bpe, template, tmp_path)
    end = FAMILIES[template][4]
    for messages in CONVERSATIONS + (THINKING if template == "qwen3" else []):
        expected = hf.apply_chat_template(messages, tokenize=True, return_dict=False)
        tokens, mask = lowmem_encode(messages, template, tok)
        assert tokens.tolist() == expected, (template, hf.apply_chat_template(messages, tokenize=False))
        # Trained: each assistant reply as the template writes it, then its end-of-turn token; nothing else.
        replies = [m["content"] for m in messages if m["role"] == "assistant"]
        if template == "qwen3":  # what each reply writes, read off transformers' rendering
            rendered = hf.apply_chat_template(messages, tokenize=False)
            replies = re.findall(r"<\|im_start\|>assistant\n(.*?)<\|im_end\|>", rendered, flags=re.S)
        assert trained_runs(tokens, mask, tok) == [reply_as_written(template, r) + end for r in replies]
        everything = lowmem_encode(messages, template, tok, train_on_prompt=True)
        assert everything[0].tolist() == expected and everything[1].all()


def test_mistral_inst_is_a_special_token_where_the_tokenizer_has_one(base_bpe, tmp_path: Path):
    """Mistral v0.3 tokenizers have [INST] / [/INST] as control tokens; older ones spell them as text."""
    hf, tok = family_tokenizers(base_bpe, "mistral", tmp_path, specials=["<s>", "</s>", "[INST]", "[/INST]"])
    for messages in CONVERSATIONS:
        tokens, mask = lowmem_encode(messages, "mistral", tok)
        assert tokens.tolist() == hf.apply_chat_template(messages, tokenize=True, return_dict=False)
        assert int((tokens == tok.special_id("[INST]")).sum()) == len(messages) // 2


def test_chatml_has_no_bos_and_a_default_system_message(base_bpe, tmp_path: Path):
    _, tok = family_tokenizers(base_bpe, "chatml", tmp_path)
    assert tok.bos_id is None
    tokens, _ = lowmem_encode(CONVERSATIONS[1], "chatml", tok)
    assert tok.decode(tokens).startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")
    text_format = encode_segments([record_segments({"text": "In the beginning"}, DataSpec(), "x")], tok)[0][0]
    assert tok.decode(text_format) == "In the beginning<|im_end|>"  # eos only, no bos


def test_template_token_missing_from_the_tokenizer_is_explained(base_bpe, tmp_path: Path):
    _, llama2_tok = family_tokenizers(base_bpe, "llama2", tmp_path)
    with pytest.raises(ValueError, match=r"chat template 'chatml' writes the special token '<\|im_start\|>', which "
                                         r"TiktokenTokenizer\(.*\) does not have; use the template of the model's"):
        lowmem_encode(CONVERSATIONS[0], "chatml", llama2_tok)


@pytest.mark.parametrize("template", sorted(FAMILIES))
def test_auto_picks_the_family_template_from_config_json(base_bpe, template: str, tmp_path: Path):
    _, tok = family_tokenizers(base_bpe, template, tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": FAMILIES[template][5]}))
    assert resolve_chat_template("auto", str(tmp_path), tok) == template  # llama: 3 or 2 by <|start_header_id|>
    assert resolve_chat_template("auto", None, tok) == "llama2"
    assert resolve_chat_template("gemma", str(tmp_path), tok) == "gemma"
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match=r"config.json has model_type 'gpt2'.*set data.chat_template to one of"):
        resolve_chat_template("auto", str(tmp_path), tok)


def test_qwen3_keeps_only_the_last_replys_thinking(base_bpe, tmp_path: Path):
    _, tok = family_tokenizers(base_bpe, "qwen3", tmp_path)
    tokens, mask = lowmem_encode(THINKING[1], "qwen3", tok)
    assert trained_runs(tokens, mask, tok) == ["Four.<|im_end|>", "<think>\nThree twice.\n</think>\n\nSix.<|im_end|>"]
    assert tok.decode(tokens).startswith("<|im_start|>system\nThink first.<|im_end|>\n<|im_start|>user\n")  # no default
    assert int((tokens == tok.special_id("<think>")).sum()) == 1  # one token, as the text token it is
    no_thinking = trained_runs(*lowmem_encode(THINKING[2], "qwen3", tok), tok)
    assert no_thinking == ["Hello!<|im_end|>", "<think>\n\n</think>\n\nGoodbye.<|im_end|>"]


def test_every_template_is_tested_and_versioned():
    assert set(CHAT_TEMPLATES) == set(FAMILIES)
    assert TEMPLATE_VERSION == 2


def test_checkpoint_without_tokenizer_spec_uses_its_own(base_bpe, tmp_path: Path):
    """A spec with model.path and no data.tokenizer: the directory's tokenizer, the family's chat template."""
    from lowmem.nn.config import preset
    from lowmem.plan.planner import PlanError, resolve_model
    from lowmem.spec import decode_spec
    from lowmem.train.inputs import prepare_data

    model_dir = tmp_path / "qwen"
    _, tok = family_tokenizers(base_bpe, "chatml", model_dir)
    config = preset("tiny").to_hf_config() | {"model_type": "qwen2", "vocab_size": tok.vocab_size}
    (model_dir / "config.json").write_text(json.dumps(config))
    source = tmp_path / "chat.jsonl"
    source.write_text("".join(json.dumps({"messages": m}) + "\n" for m in CONVERSATIONS * 8))
    spec_text = f"""
[model]
path = "{model_dir}"
[data]
source = "{source}"
format = "chat"
cache_dir = "{tmp_path / "cache"}"
[train]
steps = 1
micro_batch = 1
seq_len = 64
"""
    spec = decode_spec(spec_text, "toml")
    assert spec.data.tokenizer is None and spec.data.chat_template == "auto"
    assert resolve_model(spec).vocab_size == tok.vocab_size
    tokenizer, dataset = prepare_data(spec)
    assert tokenizer.key == tok.key and {f.name for f in tokenizer.files} >= {"tokenizer.json", "tokenizer_config.json"}
    tokens = dataset.rows(np.arange(len(dataset)))[0]
    assert (tokens == tok.special_id("<|im_start|>")).sum() == 8 * sum(len(m) + (m[0]["role"] != "system")
                                                                         for m in CONVERSATIONS)
    with_train = decode_spec(spec_text, "toml", overrides=["data.tokenizer.kind=train"])
    with pytest.raises(PlanError, match=r"a pretrained model must be trained with its own tokenizer"):
        resolve_model(with_train)
    with pytest.raises(ValueError, match=r"a pretrained model must be trained with its own tokenizer"):
        prepare_data(with_train)
