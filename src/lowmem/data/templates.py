"""Prompt templates: a record's parts → text segments, each marked trainable (in the loss) or not.

A template returns `list[Segment]`, a segment being `(piece, trainable)` where `piece` is text or a `Special`
token (`BOS` / `EOS`, mapped to the tokenizer's ids). Segments are tokenized separately, so no token straddles
a prompt/response boundary and the mask is exact. `trainable` applies to the segment's tokens as *targets*:
the loss includes predicting them.

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

chat (Llama-2 style [INST] turns; a system message, if any, sits inside the first user turn)::

    <s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST] {assistant}</s><s>[INST] {user} [/INST] ...
                                                      trained: each {assistant}</s>

Model-family templates (Llama 3, ChatML, ...) plug in through CHAT_TEMPLATES: name → render function.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence

# Bump when any template's output changes: it is part of the packed-file cache key.
TEMPLATE_VERSION = 1


class Special(enum.Enum):
    """A control token, mapped to the tokenizer's id when encoding (never produced from text)."""

    BOS = "<s>"
    EOS = "</s>"


BOS, EOS = Special.BOS, Special.EOS

Segment = tuple[str | Special, bool]
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


def render_instruct(instruction: str, input: str | None, output: str) -> list[Segment]:
    """Alpaca prompt (masked) and response (trained); `input` None or "" selects the no-input preamble."""
    if input:
        prompt = f"{ALPACA_PREAMBLE_WITH_INPUT}### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n"
    else:
        prompt = f"{ALPACA_PREAMBLE}### Instruction:\n{instruction}\n\n"
    return [(BOS, False), (prompt + "### Response:\n", False), (output, True), (EOS, True)]


def render_chat(messages: Sequence[Message]) -> list[Segment]:
    """Llama-2 style turns: user/system text masked, each assistant reply and its `</s>` trained.

    Expects validated messages: an optional system message first, then user and assistant alternating,
    starting with user and ending with assistant (see `lowmem.data.records.check_messages`).
    """
    system = None
    if messages and messages[0]["role"] == "system":
        system, messages = messages[0]["content"], messages[1:]
    segments: list[Segment] = []
    for i in range(0, len(messages), 2):
        user, assistant = messages[i]["content"], messages[i + 1]["content"]
        if system is not None and i == 0:
            user = f"<<SYS>>\n{system}\n<</SYS>>\n\n{user}"
        segments += [(BOS, False), (f"[INST] {user} [/INST]", False), (assistant, True), (EOS, True)]
    return segments


# The seam for model-family chat templates: DataSpec will name one; "llama2" is the generic default.
CHAT_TEMPLATES: dict[str, Callable[[Sequence[Message]], list[Segment]]] = {"llama2": render_chat}
DEFAULT_CHAT_TEMPLATE = "llama2"
