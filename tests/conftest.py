"""Shared fixtures: a tiny run spec on the shipped corpus, with one tokenizer/data cache per test session."""

import msgspec
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


def forced(p, **strategies):
    """The plan with strategies the spec cannot force (selective or partial checkpointing), its memory re-estimated
    as the planner would."""
    from lowmem.plan.estimate import estimate_memory
    from lowmem.plan.planner import trainable_shapes

    s = msgspec.structs.replace(p.strategies, **strategies)
    shapes, trainable = trainable_shapes(p.spec, p.model)
    memory = estimate_memory(p.model, s, p.spec.train, p.spec.optimizer, shapes, trainable)
    return msgspec.structs.replace(p, strategies=s, memory=memory)
