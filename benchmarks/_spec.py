"""The one spec the benchmark scripts (ladder.py, peers.py) start from: a model preset trained with AdamW at a
given size, no evaluation, no clipping, nothing saved; the memory strategies as each script sets them."""

from pathlib import Path

TEMPLATE = """
name = "{name}"
[model]
preset = "{preset}"
[data]
tokenizer = {{ kind = "train", vocab_size = {vocab} }}
cache_dir = "{cache}"
[optimizer]
kind = "adamw"
lr = 1e-3
[train]
steps = {steps}
micro_batch = {micro_batch}
seq_len = {seq_len}
eval_every = 0
clip_grad_norm = 0
{schedule}
[memory]
precision = "{precision}"
{strategies}
[output]
save_final = false
"""


def spec_text(name: str, size: dict, cache: Path, precision: str = "fp32", off: tuple[str, ...] = (),
              schedule: str | None = None) -> str:
    """TOML for `size` (preset, vocab, steps, micro_batch, seq_len): the strategies in `off` forced off, every
    other one left to the planner; `schedule` a learning-rate schedule kind (default: the spec's)."""
    strategies = "[memory.strategies]\n" + "".join(f'{s} = "off"\n' for s in off) if off else ""
    return TEMPLATE.format(name=name, cache=cache, precision=precision, strategies=strategies,
                           schedule=f'schedule = {{ kind = "{schedule}" }}' if schedule else "", **size)
