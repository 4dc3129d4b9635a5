"""The run spec: what to train, declared as frozen msgspec Structs.

The tree mirrors the spec file::

    RunSpec
      model      ModelSpec           a preset (random init) or a local HF-format directory
      data       DataSpec            corpus, tokenizer, cache
      method     Full | Lora | QLora | Dora            (tag field "kind")
      optimizer  AdamW | SGD | Adafactor | AdamW8bit | AdamW4bit   (tag field "kind")
      train      TrainSpec           steps/epochs, batch, seq_len, schedule, clipping, seed, eval
      memory     MemorySpec          budget and a per-strategy auto | on | off override
      output     OutputSpec          where the run writes

Validation happens while decoding: types by msgspec, cross-field rules in ``__post_init__``; both end up as
a `msgspec.ValidationError` naming the ``$.path``. This module imports no torch.
"""

from typing import Annotated, Literal

import msgspec
from msgspec import Meta, Struct

from lowmem.spec.units import parse_bytes

PositiveInt = Annotated[int, Meta(gt=0)]
NonNegInt = Annotated[int, Meta(ge=0)]
PositiveFloat = Annotated[float, Meta(gt=0)]
Fraction = Annotated[float, Meta(ge=0, le=1)]
Toggle = Literal["auto", "on", "off"]

_STRUCT = {"frozen": True, "kw_only": True, "forbid_unknown_fields": True}


class Spec(Struct, **_STRUCT):
    """Base of every spec Struct: frozen, keyword-only, unknown fields rejected."""


# ---------------------------------------------------------------------------------------------- model


class ModelSpec(Spec, kw_only=True):
    """Which model to train: exactly one of `preset` (random init) or `path` (HF-format directory).

    A preset is built from its config with random weights; its `vocab_size` follows the tokenizer when the
    tokenizer is trained by lowmem.
    """

    preset: str | None = None
    path: str | None = None
    init_seed: int = 0

    def __post_init__(self):
        if (self.preset is None) == (self.path is None):
            raise ValueError(
                "set exactly one of `preset` (e.g. preset = \"quickstart-5m\") or `path` "
                "(a local Hugging Face model directory)"
            )


# ----------------------------------------------------------------------------------------------- data


class TrainTokenizer(Spec, kw_only=True, tag="train", tag_field="kind"):
    """Train a sentencepiece BPE tokenizer on the corpus (cached by content)."""

    # 256 byte-fallback pieces + 4 specials + room for merges: lowmem.data.tokenizer.MIN_VOCAB_SIZE (tested equal)
    vocab_size: Annotated[int, Meta(ge=324, le=262144)] = 4096


class FileTokenizer(Spec, kw_only=True, tag="file", tag_field="kind"):
    """Use an existing tokenizer: a sentencepiece `tokenizer.model` (Llama 2, Mistral, Gemma, Phi-3), a tiktoken
    ranks file (Llama 3's `original/tokenizer.model`), a byte-level BPE `tokenizer.json` (Llama 3, Qwen2), or
    a model directory holding one (see `lowmem.data.tokenizer.load_tokenizer`)."""

    path: str


TokenizerSpec = TrainTokenizer | FileTokenizer


class DataSpec(Spec, kw_only=True):
    """The training data and how it becomes packed token rows.

    `source` is a file (`.jsonl`, `.jsonl.gz`, `.json`, `.parquet`, `.csv`, `.txt`) or a directory of them, or
    `builtin:kjv` for the corpus lowmem ships. `format` says how a record becomes text: `text` (one field),
    `instruct` (alpaca-style instruction / input / output) or `chat` (a list of role/content messages rendered
    by the model family's chat template). `columns` renames fields, e.g. `{ instruction = "prompt" }`.
    `chat_template` picks the chat format: `auto` is the family's (from `model.path`'s config.json: Llama 3 or
    2, Mistral, ChatML for Qwen2, Gemma, Phi-3), or llama2 without a checkpoint.
    `train_on_prompt = false` masks prompts and user turns out of the loss. `packing` packs documents into
    `seq_len` rows (`best-fit`: best-fit decreasing, `greedy`: in order); a document longer than a row is
    split, truncated or dropped (`too_long`). A malformed record stops the run (`bad_rows = "error"`) or is
    skipped and counted (`"skip"`). `tokenizer` left out means the checkpoint's own tokenizer with
    `model.path` (a pretrained model is trained with its own tokenizer; `kind = "train"` with it is an error),
    and a trained one (TrainTokenizer's defaults) with `model.preset`; see `resolved_tokenizer`.
    """

    source: str = "builtin:kjv"
    format: Literal["text", "instruct", "chat"] = "text"
    text_field: str = "text"
    columns: dict[str, str] = {}
    train_on_prompt: bool = False
    packing: Literal["best-fit", "greedy"] = "best-fit"
    too_long: Literal["split", "truncate", "drop"] = "split"
    bad_rows: Literal["error", "skip"] = "error"
    tokenizer: TokenizerSpec | None = None
    chat_template: Literal["auto", "llama2", "llama3", "mistral", "chatml", "gemma", "phi3", "phi4", "qwen3"] = "auto"
    cache_dir: str = ".lowmem_cache"
    eval_rows: NonNegInt = 0

    def resolved_tokenizer(self, model_path: str | None) -> TokenizerSpec:
        """The tokenizer this data uses with a model at `model_path` (None for a preset).

        Raises:
            ValueError for `kind = "train"` with a pretrained model: it must keep its own tokenizer.
        """
        if model_path is None:
            return self.tokenizer if self.tokenizer is not None else TrainTokenizer()
        if isinstance(self.tokenizer, TrainTokenizer):
            raise ValueError(
                f"data.tokenizer.kind = 'train' with model.path = {model_path!r}: a pretrained model must be "
                "trained with its own tokenizer, not a new one; leave data.tokenizer out to use the model "
                'directory\'s, or set data.tokenizer = { kind = "file", path = "<its tokenizer file>" }'
            )
        return self.tokenizer if self.tokenizer is not None else FileTokenizer(path=model_path)


# --------------------------------------------------------------------------------------------- method

LoraTarget = Literal["wq", "wk", "wv", "wo", "w1", "w2", "w3", "output"]


class Full(Spec, kw_only=True, tag="full", tag_field="kind"):
    """Full fine-tuning: every parameter trainable."""


class Lora(Spec, kw_only=True, tag="lora", tag_field="kind"):
    """LoRA adapters on the chosen projections; base weights frozen."""

    rank: PositiveInt = 8
    alpha: PositiveFloat = 16.0
    dropout: Fraction = 0.0
    targets: tuple[LoraTarget, ...] = ("wq", "wk", "wv", "wo")


class QLora(Spec, kw_only=True, tag="qlora", tag_field="kind"):
    """LoRA over a 4-bit (NF4) quantized, frozen base."""

    rank: PositiveInt = 8
    alpha: PositiveFloat = 16.0
    dropout: Fraction = 0.0
    targets: tuple[LoraTarget, ...] = ("wq", "wk", "wv", "wo")
    quant_block_size: PositiveInt = 64


class Dora(Spec, kw_only=True, tag="dora", tag_field="kind"):
    """Weight-decomposed LoRA (magnitude vector plus a LoRA direction)."""

    rank: PositiveInt = 8
    alpha: PositiveFloat = 16.0
    dropout: Fraction = 0.0
    targets: tuple[LoraTarget, ...] = ("wq", "wk", "wv", "wo")


MethodSpec = Full | Lora | QLora | Dora


# ------------------------------------------------------------------------------------------ optimizer


class AdamW(Spec, kw_only=True, tag="adamw", tag_field="kind"):
    """torch's AdamW; `offload = true` runs it on the host instead (torchao's CPUOffloadOptimizer, CUDA only).

    Offloaded, the moments and an fp32 master copy of each weight of 4,096 elements or more live in pinned host
    memory; each gradient is copied there as backward finishes it, the host steps, and the weights are copied
    back. `offload_gradients = true` also frees each device gradient once copied, so the gradients are never all
    on the device; they then cannot accumulate there (no gradient accumulation, no micro-batch split).
    """

    lr: PositiveFloat = 3e-4
    betas: tuple[Fraction, Fraction] = (0.9, 0.95)
    eps: PositiveFloat = 1e-8
    weight_decay: Annotated[float, Meta(ge=0)] = 0.0
    offload: bool = False
    offload_gradients: bool = False

    def __post_init__(self):
        if self.offload_gradients and not self.offload:
            raise ValueError("offload_gradients = true needs offload = true (the gradients go where the optimizer "
                             "steps); set offload = true or offload_gradients = false")


class SGD(Spec, kw_only=True, tag="sgd", tag_field="kind"):
    lr: PositiveFloat = 1e-2
    momentum: Fraction = 0.9
    weight_decay: Annotated[float, Meta(ge=0)] = 0.0


class Adafactor(Spec, kw_only=True, tag="adafactor", tag_field="kind"):
    lr: PositiveFloat = 1e-2
    weight_decay: Annotated[float, Meta(ge=0)] = 0.0


class AdamW8bit(Spec, kw_only=True, tag="adamw8bit", tag_field="kind"):
    lr: PositiveFloat = 3e-4
    betas: tuple[Fraction, Fraction] = (0.9, 0.95)
    eps: PositiveFloat = 1e-8
    weight_decay: Annotated[float, Meta(ge=0)] = 0.0
    backend: Literal["bitsandbytes", "torchao"] = "bitsandbytes"
    paged: bool = False  # bitsandbytes PagedAdamW8bit: states in CUDA unified memory, paged out under pressure


class AdamW4bit(Spec, kw_only=True, tag="adamw4bit", tag_field="kind"):
    lr: PositiveFloat = 3e-4
    betas: tuple[Fraction, Fraction] = (0.9, 0.95)
    eps: PositiveFloat = 1e-8
    weight_decay: Annotated[float, Meta(ge=0)] = 0.0


OptimizerSpec = AdamW | SGD | Adafactor | AdamW8bit | AdamW4bit


# ---------------------------------------------------------------------------------------------- train


class ScheduleSpec(Spec, kw_only=True):
    """Learning-rate schedule: linear warmup, then `kind` decay to `min_lr_ratio` × lr."""

    kind: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: NonNegInt = 0
    min_lr_ratio: Fraction = 0.1


class TrainSpec(Spec, kw_only=True):
    """How long and how: optimizer steps (or epochs), batch shape, schedule, clipping, seed, eval."""

    steps: PositiveInt | None = None
    epochs: PositiveFloat | None = None
    micro_batch: PositiveInt = 1
    grad_accum: PositiveInt = 1
    seq_len: PositiveInt = 512
    schedule: ScheduleSpec = ScheduleSpec()
    clip_grad_norm: Annotated[float, Meta(ge=0)] = 1.0  # global-norm clipping; 0 turns it off
    seed: int = 0
    eval_every: NonNegInt = 0
    eval_batches: PositiveInt = 4
    log_every: PositiveInt = 1

    def __post_init__(self):
        if (self.steps is None) == (self.epochs is None):
            raise ValueError("set exactly one of `steps` (optimizer steps) or `epochs` (passes over the data)")
        if self.steps is not None and self.schedule.warmup_steps > self.steps:
            raise ValueError(
                f"schedule.warmup_steps = {self.schedule.warmup_steps} exceeds steps = {self.steps}; "
                "lower the warmup or raise the steps"
            )


# --------------------------------------------------------------------------------------------- memory


class StrategySpec(Spec, kw_only=True):
    """Per-strategy override: `auto` lets the planner decide, `on`/`off` force it.

    `activation_checkpointing = "on"` checkpoints every block; `auto` may also choose the first n blocks (about a
    quarter, a half, three quarters, all but the last) or `selective` (matmul and attention outputs kept,
    elementwise ops recomputed). `compile = "auto"` compiles the block only when the run's steps repay the
    compile time.

    Two strategies trade exactness or speed for memory, so `auto` uses them only when no plan without them
    fits: `micro_batch_split` runs each micro-batch of `train.micro_batch` rows as 2, 4, ... smaller pieces
    whose gradients accumulate (the same step, up to float summation order); `low_bit_optimizer` keeps
    AdamW's moments in 8 bits (bitsandbytes AdamW8bit, same hyper-parameters; the updates change slightly).
    `fsdp_cpu_offload` (CUDA, several processes under torchrun) keeps FSDP2's parameter, gradient and
    optimizer-state shards in host memory and steps the optimizer there; `auto` uses it last of all.
    `bf16_stochastic_rounding` (pure bf16 with `optimizer.kind = "adamw"`, one process) computes each update in
    fp32 and rounds the new bf16 weight up or down at random (torchao), so that updates below bf16's spacing
    still move the weights on average; `auto` turns it on where the learning rate is below that spacing.
    `host_caching_allocator` (CPU runs) allocates the step's tensors of 1 MiB or more from lowmem's size-class
    cache (lowmem.hostmem) instead of glibc's heap, which keeps about twice the live tensors; `auto` uses it
    wherever it can be built (Linux and a C++ compiler, once).
    """

    activation_checkpointing: Toggle = "auto"
    activation_offloading: Toggle = "auto"
    chunked_cross_entropy: Toggle = "auto"
    fused_cross_entropy: Toggle = "auto"
    optimizer_in_backward: Toggle = "auto"
    compile: Toggle = "auto"
    micro_batch_split: Toggle = "auto"
    low_bit_optimizer: Toggle = "auto"
    fsdp_cpu_offload: Toggle = "auto"
    bf16_stochastic_rounding: Toggle = "auto"
    host_caching_allocator: Toggle = "auto"


class MemorySpec(Spec, kw_only=True):
    """The memory budget and the strategy overrides.

    `budget` is a size like "8GiB"; unset means "the device's memory". `safety_margin` is the fraction of the
    budget the planner keeps free for what it cannot see (allocator fragmentation, library workspaces).
    """

    budget: str | None = None
    safety_margin: Annotated[float, Meta(ge=0, lt=1)] = 0.1
    precision: Literal["auto", "fp32", "bf16", "mixed-bf16", "fp16"] = "auto"
    strategies: StrategySpec = StrategySpec()
    # a step that runs out of device memory: "replan" frees it, re-plans for what was really available and
    # continues from the last completed step; "stop" checkpoints that step and stops with the error
    on_oom: Literal["replan", "stop"] = "replan"

    def __post_init__(self):
        if self.budget is not None:
            try:
                n_bytes = parse_bytes(self.budget)
            except ValueError as err:
                raise ValueError(f"budget: {err}") from None
            if n_bytes == 0:
                raise ValueError("budget = '0': a budget must be more than 0 bytes; leave it out to use the device's memory")

    @property
    def budget_bytes(self) -> int | None:
        return None if self.budget is None else parse_bytes(self.budget)


# --------------------------------------------------------------------------------------------- output


class OutputSpec(Spec, kw_only=True):
    """Where the run writes (relative paths are relative to the working directory).

    Every logged step goes to `metrics.jsonl`; `log_to` adds TensorBoard (event files in `DIR/tensorboard`)
    and/or Weights & Biases (project `wandb_project`, default the run's name; its mode — online, offline —
    is wandb's own setting, e.g. `WANDB_MODE=offline`). Each needs its package: `pip install 'lowmem[tensorboard]'`.
    """

    dir: str = "runs/{name}"
    save_final: bool = True
    save_every: NonNegInt = 0  # a resumable checkpoint every N optimizer steps (0: only on SIGINT/SIGTERM)
    keep: PositiveInt = 2  # checkpoints kept; older ones are deleted after a new one is complete
    log_to: tuple[Literal["tensorboard", "wandb"], ...] = ()
    wandb_project: str | None = None


# ------------------------------------------------------------------------------------------------ run


class RunSpec(Spec, kw_only=True):
    """A whole run: the one object a spec file decodes into."""

    name: Annotated[str, Meta(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")] = "run"
    model: ModelSpec
    data: DataSpec = DataSpec()
    method: MethodSpec = Full()
    optimizer: OptimizerSpec = AdamW()
    train: TrainSpec
    memory: MemorySpec = MemorySpec()
    output: OutputSpec = OutputSpec()

    @property
    def out_dir(self) -> str:
        return self.output.dir.format(name=self.name)


def replace(spec: Struct, **changes) -> Struct:
    """A copy of a frozen Struct with some fields changed (validation re-run)."""
    return msgspec.convert(msgspec.to_builtins(msgspec.structs.replace(spec, **changes)), type(spec))
