"""Run specs: frozen msgspec Structs, their codecs and `--set` overrides. Imports no torch."""

from lowmem.spec.load import SpecError, apply_override, decode_spec, encode_spec, load_spec
from lowmem.spec.structs import (
    SGD,
    Adafactor,
    AdamW,
    AdamW4bit,
    AdamW8bit,
    DataSpec,
    Dora,
    FileTokenizer,
    Full,
    Lora,
    MemorySpec,
    MethodSpec,
    ModelSpec,
    OptimizerSpec,
    OutputSpec,
    QLora,
    RunSpec,
    ScheduleSpec,
    StrategySpec,
    TokenizerSpec,
    TrainSpec,
    TrainTokenizer,
)
from lowmem.spec.units import format_bytes, parse_bytes

__all__ = [
    "SGD", "Adafactor", "AdamW", "AdamW4bit", "AdamW8bit", "DataSpec", "Dora", "FileTokenizer", "Full",
    "Lora", "MemorySpec", "MethodSpec", "ModelSpec", "OptimizerSpec", "OutputSpec", "QLora", "RunSpec",
    "ScheduleSpec", "SpecError", "StrategySpec", "TokenizerSpec", "TrainSpec", "TrainTokenizer",
    "apply_override", "decode_spec", "encode_spec", "format_bytes", "load_spec", "parse_bytes",
]
