"""What a run reads: the tokenizer and packed dataset of its spec, and batches on the run's device."""

import math
from pathlib import Path

import msgspec
import torch

from lowmem.data import (
    BatchLoader,
    PackedDataset,
    load_or_train_tokenizer,
    prepare_packed_dataset,
    shipped_corpus,
)
from lowmem.data.corpus import source_size_bytes
from lowmem.data.templates import resolve_chat_template
from lowmem.data.tokenizer import Tokenizer, load_tokenizer
from lowmem.nn.hub import resolve_model_dir
from lowmem.spec.load import RELATIVE_PATHS
from lowmem.spec.structs import FileTokenizer, RunSpec
from lowmem.train.device import to_device


def prepare_data(spec: RunSpec, progress=None, world: int = 1) -> tuple[Tokenizer, PackedDataset]:
    """Tokenizer (trained and cached, or from a file) and the packed, memory-mapped dataset.

    `progress(records_read, bytes_read, total_bytes)` is called while a new packed file is written.
    `world`: the data-parallel processes, each taking `train.micro_batch` rows per batch.
    """
    source = spec.data.source
    corpus = shipped_corpus(source.removeprefix("builtin:")) if source.startswith("builtin:") else Path(source)
    if not corpus.exists():
        raise ValueError(f"data.source = {source!r}: no such file or directory (looked at {corpus.absolute()}; "
                         f"{RELATIVE_PATHS}); give a .jsonl, .jsonl.gz, .json, .parquet, .csv or .txt file, or a "
                         "directory of them")
    cache = Path(spec.data.cache_dir)
    model_dir = str(resolve_model_dir(spec.model.path)) if spec.model.path else None
    tok_spec = spec.data.resolved_tokenizer(model_dir)
    if isinstance(tok_spec, FileTokenizer):
        tokenizer = load_tokenizer(tok_spec.path)
    else:
        tokenizer = load_or_train_tokenizer(corpus, tok_spec.vocab_size, cache, data=spec.data)
    data = spec.data
    if data.format == "chat":  # "auto" becomes the checkpoint family's template, which the packed cache keys on
        data = msgspec.structs.replace(data, chat_template=resolve_chat_template(data.chat_template, model_dir,
                                                                                 tokenizer))
    hook = None
    if progress is not None:
        total = source_size_bytes(corpus)

        def hook(records: int, read: int) -> None:
            progress(records, read, total)

    path = prepare_packed_dataset(corpus, tokenizer, spec.train.seq_len, cache, data, progress=hook)
    dataset = PackedDataset(path)
    needed = spec.data.eval_rows + spec.train.micro_batch * world
    if len(dataset) < needed:
        per = f" x {world} processes" if world > 1 else ""
        raise ValueError(
            f"data.source = {source!r} packs into {len(dataset)} rows of {spec.train.seq_len} tokens; "
            f"data.eval_rows ({spec.data.eval_rows}) + train.micro_batch ({spec.train.micro_batch}){per} need "
            f"{needed}. Use more data, a shorter train.seq_len or fewer eval rows."
        )
    return tokenizer, dataset


def training_rows(spec: RunSpec) -> int | None:
    """The packed dataset's rows less the held-out ones (preparing and caching it if needed), or None where the
    data cannot be read or packed (the reason is `lowmem data prepare`'s to give)."""
    one_row = msgspec.structs.replace(spec, train=msgspec.structs.replace(spec.train, micro_batch=1))
    try:
        _, dataset = prepare_data(one_row)
    except (ValueError, OSError):
        return None
    return len(dataset) - spec.data.eval_rows


def steps_for_epochs(spec: RunSpec, n_train_rows: int, world: int = 1) -> int:
    rows_per_step = spec.train.micro_batch * spec.train.grad_accum * world
    return max(1, math.ceil(spec.train.epochs * n_train_rows / rows_per_step))


class DeviceBatches:
    """The loader's batches on the run's device (pinned host batches copied without blocking on a GPU)."""

    def __init__(self, loader: BatchLoader, device: str):
        self.loader, self.device = loader, device

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        return to_device(next(self.loader), self.device)

    def state_dict(self) -> dict[str, int]:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.loader.load_state_dict(state)

    def close(self) -> None:
        self.loader.close()
