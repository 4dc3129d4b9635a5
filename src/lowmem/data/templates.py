"""Prompt templates: a record's parts → text segments, each marked trainable (in the loss) or not.

A template returns `list[Segment]`, a segment being `(piece, trainable)` where `piece` is text, `BOS` / `EOS`
(the tokenizer's own bos / eos ids) or a `SpecialToken` named by its text (`<|eot_id|>`, mapped to its id;
a tokenizer without it is an error naming the template). Segments are tokenized separately (adjacent text
segments with the same mask together), so no token straddles a prompt/response boundary and the mask is
exact. `trainable` applies to the segment's tokens as *targets*: the loss includes predicting them.

Templates shipped here (bump TEMPLATE_VERSION whenever their output changes; packed caches key on it):

instruct (Alpaca, Taori et al. 2023)::

    <s>Below is an instruction that describes a task[, paired with an input that provides further
    context]. Write a response that appropriately completes the request.

    ### Instruction:
    {instruction}

    [### Input:
    {input}

    ]### Response:
    {output}</s>                                      trained: {output}</s>

Chat templates (`data.chat_template`; each reproduces the model family's Hugging Face `chat_template`, with
its special tokens emitted as special ids; trained: each assistant reply and its end-of-turn token)::

    llama2   <s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST] {assistant} </s><s>[INST] {user} [/INST] ...
    llama3   <|begin_of_text|><|start_header_id|>system<|end_header_id|>\\n\\n{system}<|eot_id|>
             <|start_header_id|>user<|end_header_id|>\\n\\n{user}<|eot_id|>
             <|start_header_id|>assistant<|end_header_id|>\\n\\n{assistant}<|eot_id|> ...
    mistral  <s>[INST] {system}\\n\\n{user} [/INST] {assistant}</s>[INST] {user} [/INST] ...
             ([INST] / [/INST] are special tokens where the tokenizer has them (v0.3), else text)
    chatml   <|im_start|>system\\n{system, default "You are a helpful assistant."}<|im_end|>\\n
             <|im_start|>user\\n{user}<|im_end|>\\n<|im_start|>assistant\\n{assistant}<|im_end|>\\n ...   (Qwen2)
    gemma    <bos><start_of_turn>user\\n{system}\\n\\n{user}<end_of_turn>\\n<start_of_turn>model\\n{assistant}<end_of_turn>\\n
    phi3     <|system|>\\n{system}<|end|>\\n<|user|>\\n{user}<|end|>\\n<|assistant|>\\n{assistant}<|end|>\\n ... <|endoftext|>
    phi4     <|system|>{system}<|end|><|user|>{user}<|end|><|assistant|>{assistant}<|end|> ... <|endoftext|>  (Phi-4-mini)
    qwen3    <|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n{user}<|im_end|>\\n
             <|im_start|>assistant\\n{answer}<|im_end|>\\n ...   (earlier replies: their <think>...</think> dropped)
             <|im_start|>assistant\\n<think>\\n{reasoning}\\n</think>\\n\\n{answer}<|im_end|>\\n   (the last reply, always)

Where a family's template trims message text (llama2, llama3, gemma), so does lowmem's. `<s>`, `</s>`,
`<bos>` and `<|begin_of_text|>` above are the tokenizer's bos / eos (BOS / EOS), dropped where it has none.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lowmem.data.tokenizer_base import Tokenizer

# Bump when any template's output changes: it is part of the packed-file cache key.
TEMPLATE_VERSION = 2


class Special(enum.Enum):
    """The tokenizer's own bos / eos, whatever their text (mapped to its ids when encoding)."""

    BOS = "<s>"
    EOS = "</s>"


BOS, EOS = Special.BOS, Special.EOS


@dataclass(frozen=True)
class SpecialToken:
    """A special token named by its text, e.g. `SpecialToken("<|eot_id|>", "llama3")`, never produced from text.

    `template` names the chat template writing it (for the error when the tokenizer lacks the token);
    `or_text`: where the tokenizer has no such special token, the text stands for itself (Mistral's [INST]).
    """

    text: str
    template: str
    or_text: bool = False


Segment = tuple[str | Special | SpecialToken, bool]
Message = dict[str, str]  # {"role": "system" | "user" | "assistant", "content": str}

CHAT_ROLES = ("system", "user", "assistant")

ALPACA_PREAMBLE = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
)
ALPACA_PREAMBLE_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
)
QWEN2_DEFAULT_SYSTEM = "You are a helpful assistant."


def render_instruct(instruction: str, input: str | None, output: str) -> list[Segment]:
    """Alpaca prompt (masked) and response (trained); `input` None or "" selects the no-input preamble."""
    if input:
        prompt = f"{ALPACA_PREAMBLE_WITH_INPUT}### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n"
    else:
        prompt = f"{ALPACA_PREAMBLE}### Instruction:\n{instruction}\n\n"
    return [(BOS, False), (prompt + "### Response:\n", False), (output, True), (EOS, True)]


# Every chat template below takes validated messages: an optional system message first, then user and
# assistant alternating, starting with user and ending with assistant (lowmem.data.records.check_messages).


def _split_system(messages: Sequence[Message]) -> tuple[str | None, Sequence[Message]]:
    if messages and messages[0]["role"] == "system":
        return messages[0]["content"], messages[1:]
    return None, messages


def _pairs(messages: Sequence[Message]) -> list[tuple[str, str]]:
    return [(messages[i]["content"], messages[i + 1]["content"]) for i in range(0, len(messages), 2)]


def render_chat(messages: Sequence[Message]) -> list[Segment]:
    """Llama 2 chat (Meta's reference format): `<s>[INST] {user} [/INST] {assistant} </s>` per exchange."""
    system, turns = _split_system(messages)
    segments: list[Segment] = []
    for i, (user, assistant) in enumerate(_pairs(turns)):
        if system is not None and i == 0:
            user = f"<<SYS>>\n{system}\n<</SYS>>\n\n{user}"
        segments += [(BOS, False), (f"[INST] {user.strip()} [/INST]", False), (f" {assistant.strip()} ", True),
                     (EOS, True)]
    return segments


def render_llama3(messages: Sequence[Message]) -> list[Segment]:
    """Llama 3 Instruct: each message in a `<|start_header_id|>role<|end_header_id|>` block ending `<|eot_id|>`."""
    start, end, eot = (SpecialToken(t, "llama3") for t in ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"))
    segments: list[Segment] = [(BOS, False)]
    for m in messages:
        reply = m["role"] == "assistant"
        segments += [(start, False), (m["role"], False), (end, False)]
        if reply:
            segments += [("\n\n", False), (m["content"].strip(), True), (eot, True)]
        else:
            segments += [("\n\n" + m["content"].strip(), False), (eot, False)]
    return segments


def render_mistral(messages: Sequence[Message]) -> list[Segment]:
    """Mistral Instruct: `<s>[INST] {user} [/INST] {assistant}</s>`; a system message opens the first user turn."""
    inst, end_inst = SpecialToken("[INST]", "mistral", or_text=True), SpecialToken("[/INST]", "mistral", or_text=True)
    system, turns = _split_system(messages)
    segments: list[Segment] = [(BOS, False)]
    for i, (user, assistant) in enumerate(_pairs(turns)):
        if system is not None and i == 0:
            user = f"{system}\n\n{user}"
        segments += [(inst, False), (f" {user} ", False), (end_inst, False), (f" {assistant}", True), (EOS, True)]
    return segments


def render_chatml(messages: Sequence[Message]) -> list[Segment]:
    """ChatML as Qwen2 writes it: `<|im_start|>role\\n...<|im_end|>\\n`, with a default system message."""
    start, end = SpecialToken("<|im_start|>", "chatml"), SpecialToken("<|im_end|>", "chatml")
    if messages[0]["role"] != "system":
        messages = [{"role": "system", "content": QWEN2_DEFAULT_SYSTEM}, *messages]
    segments: list[Segment] = []
    for m in messages:
        if m["role"] == "assistant":
            segments += [(start, False), ("assistant\n", False), (m["content"], True), (end, True), ("\n", False)]
        else:
            segments += [(start, False), (f"{m['role']}\n{m['content']}", False), (end, False), ("\n", False)]
    return segments


def render_gemma(messages: Sequence[Message]) -> list[Segment]:
    """Gemma: `<start_of_turn>user|model\\n...<end_of_turn>\\n`; a system message opens the first user turn."""
    start, end = SpecialToken("<start_of_turn>", "gemma"), SpecialToken("<end_of_turn>", "gemma")
    system, turns = _split_system(messages)
    segments: list[Segment] = [(BOS, False)]
    for i, (user, assistant) in enumerate(_pairs(turns)):
        prefix = f"{system}\n\n" if system is not None and i == 0 else ""
        segments += [(start, False), (f"user\n{prefix}{user.strip()}", False), (end, False), ("\n", False)]
        segments += [(start, False), ("model\n", False), (assistant.strip(), True), (end, True), ("\n", False)]
    return segments


def render_phi3(messages: Sequence[Message]) -> list[Segment]:
    """Phi-3: `<|role|>\\n...<|end|>\\n` per message, then the eos (masked: it follows the last turn's newline)."""
    end = SpecialToken("<|end|>", "phi3")
    segments: list[Segment] = []
    for m in messages:
        role = SpecialToken(f"<|{m['role']}|>", "phi3")
        if m["role"] == "assistant":
            segments += [(role, False), ("\n", False), (m["content"], True), (end, True), ("\n", False)]
        else:
            segments += [(role, False), ("\n" + m["content"], False), (end, False), ("\n", False)]
    return [*segments, (EOS, False)]


def render_phi4(messages: Sequence[Message]) -> list[Segment]:
    """Phi-4-mini: `<|role|>...<|end|>` per message, no newlines, then the eos (masked, as Phi-3's)."""
    end = SpecialToken("<|end|>", "phi4")
    segments: list[Segment] = []
    for m in messages:
        role = SpecialToken(f"<|{m['role']}|>", "phi4")
        reply = m["role"] == "assistant"
        segments += [(role, False), (m["content"], reply), (end, reply)]
    return [*segments, (EOS, False)]


def split_thinking(content: str) -> tuple[str, str]:
    """(reasoning, answer) of an assistant reply written `<think>...</think>answer`, as Qwen3's template splits it
    (text before `</think>` after the last `<think>`, newlines trimmed at the seams); ("", content) without one."""
    if "</think>" not in content:
        return "", content
    reasoning = content.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
    return reasoning, content.split("</think>")[-1].lstrip("\n")


def render_qwen3(messages: Sequence[Message]) -> list[Segment]:
    """Qwen3 (chatml, no default system message) with its `<think>` handling as its Hugging Face template renders
    a conversation without tools: replies after the last user message (here: the last reply) are written
    `<think>\\n{reasoning}\\n</think>\\n\\n{answer}`, an empty think block when the reply has none; earlier
    replies keep only their answer. `<think>` and `</think>` are text (added, non-special tokens in Qwen3's
    tokenizer, which both tokenizers match in text). Trained: what each reply writes, and its `<|im_end|>`.
    """
    start, end = SpecialToken("<|im_start|>", "qwen3"), SpecialToken("<|im_end|>", "qwen3")
    last_query = max(i for i, m in enumerate(messages) if m["role"] == "user")
    segments: list[Segment] = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            segments += [(start, False), (f"{m['role']}\n{m['content']}", False), (end, False), ("\n", False)]
            continue
        reasoning, answer = split_thinking(m["content"])
        if i > last_query:  # the last reply: messages alternate and end with one
            reasoning, answer = reasoning.strip("\n"), answer.lstrip("\n")
            answer = f"<think>\n{reasoning}\n</think>\n\n{answer}"
        segments += [(start, False), ("assistant\n", False), (answer, True), (end, True), ("\n", False)]
    return segments


CHAT_TEMPLATES: dict[str, Callable[[Sequence[Message]], list[Segment]]] = {
    "llama2": render_chat,
    "llama3": render_llama3,
    "mistral": render_mistral,
    "chatml": render_chatml,
    "gemma": render_gemma,
    "phi3": render_phi3,
    "phi4": render_phi4,
    "qwen3": render_qwen3,
}
DEFAULT_CHAT_TEMPLATE = "llama2"  # data.chat_template = "auto" without a checkpoint

# config.json model_type → template ("llama" is llama3 or llama2 by the tokenizer; see resolve_chat_template).
FAMILY_TEMPLATES = {
    "mistral": "mistral",
    "qwen2": "chatml",
    "gemma": "gemma",
    "gemma2": "gemma",
    "gemma3_text": "gemma",  # Gemma 3's template writes string messages as Gemma's does
    "gemma3": "gemma",
    "phi3": "phi3",  # Phi-4-mini (also model_type phi3): phi4, by its tokenizer (resolve_chat_template)
    "qwen3": "qwen3",
}


def chat_template_name(name: str) -> str:
    """The template `data.chat_template` names once resolved; "auto" unresolved is the generic default."""
    return DEFAULT_CHAT_TEMPLATE if name == "auto" else name


def resolve_chat_template(name: str, model_path: str | None, tokenizer: Tokenizer) -> str:
    """The template `data.chat_template = name` means for this model: "auto" follows the checkpoint's family.

    Family: `model_type` of `model_path/config.json` (llama → llama3 if the tokenizer has
    <|start_header_id|>, else llama2; mistral; qwen2 → chatml; qwen3; gemma, gemma2, gemma3 → gemma; phi3 →
    phi4 if the tokenizer has <|tool|> (Phi-4-mini), else phi3). Without a checkpoint
    "auto" is llama2.

    Raises:
        ValueError when the checkpoint's model_type has no known template.
    """
    if name != "auto" or model_path is None:
        return chat_template_name(name)
    config_path = Path(model_path) / "config.json"
    try:
        model_type = json.loads(config_path.read_text()).get("model_type")
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"data.chat_template = 'auto' reads the model family from {config_path}: {err}") from None
    if model_type == "llama":
        return "llama3" if tokenizer.special_id("<|start_header_id|>") is not None else "llama2"
    if model_type == "phi3" and tokenizer.special_id("<|tool|>") is not None:
        return "phi4"  # Phi-4-mini's tokenizer has tool tokens; Phi-3's and Phi-3.5's do not
    if model_type in FAMILY_TEMPLATES:
        return FAMILY_TEMPLATES[model_type]
    raise ValueError(
        f"data.chat_template = 'auto': {config_path} has model_type {model_type!r}, whose chat template lowmem "
        f"does not know; set data.chat_template to one of {sorted(CHAT_TEMPLATES)}"
    )
