"""Executing a plan: strategies applied, the step and the loop, measured memory."""

from lowmem.train.loop import RunResult, execute
from lowmem.train.progress import describe_memory

__all__ = ["RunResult", "describe_memory", "execute"]
