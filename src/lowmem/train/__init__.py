"""Executing a plan: strategies applied, the step and the loop, measured memory."""

from lowmem.train.loop import RunResult, describe_memory, execute

__all__ = ["RunResult", "describe_memory", "execute"]
