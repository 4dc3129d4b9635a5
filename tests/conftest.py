"""Shared fixtures: a tiny run spec on the shipped corpus, with one tokenizer/data cache per test session."""

import pytest

from lowmem.spec import decode_spec

TINY_SPEC = """
name = "tiny"
[model]
preset = "tiny"
[data]
source = "builtin:kjv"
tokenizer = { kind = "train", vocab_size = 1024 }
[optimizer]
kind = "adamw"
lr = 3e-3
[train]
steps = 4
micro_batch = 4
seq_len = 128
eval_every = 0
schedule = { kind = "cosine", warmup_steps = 1 }
[memory]
precision = "fp32"
"""


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("lowmem-cache")


@pytest.fixture
def tiny_spec(data_cache):
    """A function: tiny_spec("train.steps=3", ...) -> RunSpec on the tiny preset, cache shared per session."""

    def make(*overrides: str):
        return decode_spec(TINY_SPEC, "toml", overrides=[f"data.cache_dir={data_cache}", *overrides])

    return make

