"""lowmem: fine-tune LLMs with PyTorch in as little memory as the job allows.

The three steps of a run are the public API::

    spec = load_spec("run.toml", overrides=["train.steps=100"])
    p = plan(spec)                  # pure: picks strategies, predicts memory; allocates nothing
    result = execute(p, "runs/x")   # runs exactly that plan

`lowmem.spec` is importable without torch; `plan` and `execute` import it lazily.
"""

import logging
import re

from lowmem.spec import RunSpec, load_spec

__version__ = "0.1.0"


class _DropMessages(logging.Filter):
    """Drops the records of one logger whose message matches `pattern`; every other record passes."""

    def __init__(self, pattern: str):
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


# Import noise that says nothing about a lowmem run (issue #16 item 13), dropped by logger and message
# only: torchao's optional kernels built for other GPUs or torch builds (_C_mxfp8, _C_cutlass_90a) fail to
# load and torchao logs it, though lowmem uses none of them; torchao's own Enum registration trips
# torch's deprecation of `register_constant` on Enums. Both are log records, not `warnings`.
_IMPORT_NOISE = {
    "torchao": r"^Failed to load \S*torchao[/\\]_C_\w+\S*\.so: ",
    "torch.utils._pytree": r"is an Enum subclass and is now natively supported by torch\.compile",
}
for _logger, _pattern in _IMPORT_NOISE.items():
    logging.getLogger(_logger).addFilter(_DropMessages(_pattern))


def plan(spec, hardware=None, world_size: int = 1):
    """Compile a RunSpec into a Plan for `world_size` processes (see `lowmem.plan.plan`)."""
    from lowmem.plan import plan as _plan

    return _plan(spec, hardware, world_size)


def execute(plan_or_spec, out_dir=None, **kwargs):
    """Run a Plan (or plan a RunSpec first) and return the run's result (see `lowmem.train.execute`)."""
    from lowmem.train import execute as _execute

    return _execute(plan_or_spec, out_dir, **kwargs)


__all__ = ["RunSpec", "execute", "load_spec", "plan", "__version__"]
