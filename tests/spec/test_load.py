import json
from pathlib import Path

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lowmem.spec import (
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
    ModelSpec,
    OutputSpec,
    QLora,
    RunSpec,
    ScheduleSpec,
    SpecError,
    StrategySpec,
    TrainSpec,
    TrainTokenizer,
    decode_spec,
    encode_spec,
    load_spec,
)

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "examples" / "quickstart.toml"
FORMATS = ("toml", "json", "yaml")

# one spec with a non-default variant in every tagged union, written by hand in each format
FULL_TOML = """\
name = "ft-1"

[model]
preset = "quickstart-5m"

[data]
source = "builtin:kjv"
tokenizer = { kind = "file", path = "tok/spm.model" }
eval_rows = 32

[method]
kind = "lora"
rank = 4
targets = ["wq", "wv"]

[optimizer]
kind = "sgd"
lr = 3e-3
momentum = 0.5

[train]
steps = 100
micro_batch = 8
seq_len = 256
clip_grad_norm = 0.5
schedule = { kind = "linear", warmup_steps = 10, min_lr_ratio = 0.0 }

[memory]
budget = "4GiB"
precision = "fp32"
strategies = { activation_checkpointing = "on" }

[output]
dir = "runs/{name}"
save_final = false
"""
FULL_JSON = """{
  "name": "ft-1",
  "model": {"preset": "quickstart-5m"},
  "data": {"source": "builtin:kjv", "tokenizer": {"kind": "file", "path": "tok/spm.model"}, "eval_rows": 32},
  "method": {"kind": "lora", "rank": 4, "targets": ["wq", "wv"]},
  "optimizer": {"kind": "sgd", "lr": 3e-3, "momentum": 0.5},
  "train": {"steps": 100, "micro_batch": 8, "seq_len": 256, "clip_grad_norm": 0.5,
            "schedule": {"kind": "linear", "warmup_steps": 10, "min_lr_ratio": 0.0}},
  "memory": {"budget": "4GiB", "precision": "fp32", "strategies": {"activation_checkpointing": "on"}},
  "output": {"dir": "runs/{name}", "save_final": false}
}
"""
FULL_YAML = """\
name: ft-1
model:
  preset: quickstart-5m
data:
  source: "builtin:kjv"
  tokenizer: {kind: file, path: tok/spm.model}
  eval_rows: 32
method:
  kind: lora
  rank: 4
  targets: [wq, wv]
optimizer:
  kind: sgd
  lr: 3.0e-3
  momentum: 0.5
train:
  steps: 100
  micro_batch: 8
  seq_len: 256
  clip_grad_norm: 0.5
  schedule:
    kind: linear
    warmup_steps: 10
    min_lr_ratio: 0.0
memory:
  budget: 4GiB
  precision: fp32
  strategies:
    activation_checkpointing: "on"
output:
  dir: "runs/{name}"
  save_final: false
"""
FULL_SPEC = RunSpec(
    name="ft-1",
    model=ModelSpec(preset="quickstart-5m"),
    data=DataSpec(tokenizer=FileTokenizer(path="tok/spm.model"), eval_rows=32),
    method=Lora(rank=4, targets=("wq", "wv")),
    optimizer=SGD(lr=3e-3, momentum=0.5),
    train=TrainSpec(steps=100, micro_batch=8, seq_len=256, clip_grad_norm=0.5,
                    schedule=ScheduleSpec(kind="linear", warmup_steps=10, min_lr_ratio=0.0)),
    memory=MemorySpec(budget="4GiB", precision="fp32", strategies=StrategySpec(activation_checkpointing="on")),
    output=OutputSpec(save_final=False),
)

MINIMAL_TOML = """\
name = "x"
[model]
preset = "tiny"
[train]
steps = 10
"""


def decode(overrides=(), text=MINIMAL_TOML) -> RunSpec:
    return decode_spec(text, "toml", source="s.toml", overrides=overrides)


def spec_error(text=MINIMAL_TOML, overrides=(), fmt="toml") -> str:
    with pytest.raises(SpecError) as err:
        decode_spec(text, fmt, source="s.toml", overrides=overrides)
    return str(err.value)


# ------------------------------------------------------------------------------------------- formats


def test_quickstart_example_loads():
    spec = load_spec(QUICKSTART)
    assert spec.name == "quickstart"
    assert spec.model == ModelSpec(preset="quickstart-5m")
    assert spec.out_dir == "runs/quickstart"


@pytest.mark.parametrize(("suffix", "text"), [(".toml", FULL_TOML), (".json", FULL_JSON), (".yaml", FULL_YAML),
                                              (".yml", FULL_YAML), (".YAML", FULL_YAML)])
def test_toml_json_and_yaml_files_decode_to_equal_specs(tmp_path, suffix, text):
    path = tmp_path / f"spec{suffix}"
    path.write_text(text)
    # the file's relative tokenizer path is taken from the file's directory
    tokenizer = FileTokenizer(path=str(tmp_path / "tok/spm.model"))
    assert load_spec(path) == msgspec.structs.replace(
        FULL_SPEC, data=msgspec.structs.replace(FULL_SPEC.data, tokenizer=tokenizer))


@pytest.mark.parametrize(("fmt", "text"), [("toml", FULL_TOML), ("json", FULL_JSON), ("yaml", FULL_YAML)])
def test_decode_spec_accepts_bytes_and_str(fmt, text):
    assert decode_spec(text, fmt) == decode_spec(text.encode(), fmt) == FULL_SPEC


def test_load_spec_applies_overrides():
    spec = load_spec(QUICKSTART, ["train.steps=70", "optimizer.lr=1e-3"])
    assert spec.train.steps == 70
    assert spec.optimizer.lr == 1e-3
    assert spec.optimizer.weight_decay == 0.01  # untouched fields keep the file's values


# --------------------------------------------------------------------------------------- round trips

BASE = RunSpec(model=ModelSpec(preset="tiny"), train=TrainSpec(steps=10))
VARIANTS = {
    "defaults": BASE,
    "full-example": FULL_SPEC,
    "lora-sgd": msgspec.structs.replace(
        BASE, method=Lora(rank=4, alpha=8.0, dropout=0.05, targets=("wq", "output")),
        optimizer=SGD(lr=0.1, momentum=0.0, weight_decay=1e-4)),
    "qlora-adamw8bit": msgspec.structs.replace(
        BASE, method=QLora(rank=16, quant_block_size=32, targets=("w1", "w2", "w3")),
        optimizer=AdamW8bit(lr=2e-4, betas=(0.8, 0.999), eps=1e-6, backend="torchao")),
    "dora-adafactor": msgspec.structs.replace(BASE, method=Dora(dropout=0.5), optimizer=Adafactor(lr=1e-3)),
    "adamw4bit": msgspec.structs.replace(BASE, optimizer=AdamW4bit(weight_decay=0.1)),
    "path-file-tokenizer-epochs": RunSpec(
        name="ft.v2", model=ModelSpec(path="/models/llama", init_seed=3),
        data=DataSpec(source="data/train.jsonl.gz", text_field="body", tokenizer=FileTokenizer(path="/t.model"),
                      cache_dir="/tmp/cache", eval_rows=8),
        train=TrainSpec(epochs=1.5, micro_batch=4, grad_accum=2, seq_len=128,
                        schedule=ScheduleSpec(kind="linear", warmup_steps=500, min_lr_ratio=0.0),
                        seed=-1, eval_every=10, eval_batches=2, log_every=5),
        memory=MemorySpec(budget="512MB", safety_margin=0.0, precision="mixed-bf16",
                          strategies=StrategySpec(activation_checkpointing="on", compile="off")),
        output=OutputSpec(dir="out/{name}", save_final=False)),
}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("variant", VARIANTS, ids=str)
def test_encode_decode_round_trips(variant, fmt):
    spec = VARIANTS[variant]
    assert decode_spec(encode_spec(spec, fmt), fmt) == spec


@pytest.mark.parametrize("fmt", ["toml", "json", "yaml"])
def test_clipping_off_round_trips(fmt):
    # TOML has no null, so "off" is 0 rather than None: it must survive every format
    spec = msgspec.structs.replace(BASE, train=TrainSpec(steps=10, clip_grad_norm=0.0))
    assert decode_spec(encode_spec(spec, fmt), fmt).train.clip_grad_norm == 0.0


def test_encode_spec_rejects_unknown_format():
    with pytest.raises(ValueError, match="'ini'.*toml, json or yaml"):
        encode_spec(BASE, "ini")


# generated specs: every variant of every tagged union, optional fields set and unset
_floats = st.floats(min_value=1e-6, max_value=1e3, allow_nan=False, allow_infinity=False)
_fractions = st.floats(min_value=0.0, max_value=1.0, allow_nan=False)
_text = st.text(alphabet="abcXYZ019 ._-/:'\"\\#{}[]\n", min_size=1, max_size=12)
_targets = st.lists(st.sampled_from(["wq", "wk", "wv", "wo", "w1", "w2", "w3", "output"]), max_size=8).map(tuple)
_lora_fields = {"rank": st.integers(1, 512), "alpha": _floats, "dropout": _fractions, "targets": _targets}
_betas = st.tuples(_fractions, _fractions)
_clip_norms = st.one_of(st.just(0.0), _floats)


@st.composite
def train_specs(draw, clip=_clip_norms):
    steps = draw(st.one_of(st.none(), st.integers(1, 10**6)))
    epochs = draw(_floats) if steps is None else None
    warmup = draw(st.integers(0, steps if steps is not None else 10**6))
    schedule = ScheduleSpec(kind=draw(st.sampled_from(["cosine", "linear", "constant"])), warmup_steps=warmup,
                            min_lr_ratio=draw(_fractions))
    return TrainSpec(steps=steps, epochs=epochs, micro_batch=draw(st.integers(1, 64)),
                     grad_accum=draw(st.integers(1, 64)), seq_len=draw(st.integers(1, 8192)), schedule=schedule,
                     clip_grad_norm=draw(clip), seed=draw(st.integers(-(2**31), 2**31)),
                     eval_every=draw(st.integers(0, 1000)))


def run_specs(clip=_clip_norms):
    toggles = st.sampled_from(["auto", "on", "off"])
    return st.builds(
        RunSpec,
        name=st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,10}", fullmatch=True),
        model=st.one_of(st.builds(ModelSpec, preset=_text, init_seed=st.integers(0, 2**31)),
                        st.builds(ModelSpec, path=_text)),
        data=st.builds(DataSpec, source=_text, text_field=_text, cache_dir=_text, eval_rows=st.integers(0, 99),
                       tokenizer=st.one_of(st.builds(TrainTokenizer, vocab_size=st.integers(324, 262144)),
                                           st.builds(FileTokenizer, path=_text))),
        method=st.one_of(st.just(Full()), st.builds(Lora, **_lora_fields),
                         st.builds(QLora, **_lora_fields, quant_block_size=st.integers(1, 256)),
                         st.builds(Dora, **_lora_fields)),
        optimizer=st.one_of(
            st.builds(AdamW, lr=_floats, betas=_betas, eps=_floats, weight_decay=_fractions),
            st.builds(SGD, lr=_floats, momentum=_fractions, weight_decay=_fractions),
            st.builds(Adafactor, lr=_floats),
            st.builds(AdamW8bit, lr=_floats, betas=_betas, backend=st.sampled_from(["bitsandbytes", "torchao"])),
            st.builds(AdamW4bit, eps=_floats)),
        train=train_specs(clip),
        memory=st.builds(
            MemorySpec,
            budget=st.one_of(st.none(), st.builds("{}{}".format, st.integers(1, 10**4),
                                                  st.sampled_from(["GiB", "MB", "k", " TiB", ""]))),
            safety_margin=st.floats(0.0, 0.99), precision=st.sampled_from(["auto", "fp32", "bf16", "fp16"]),
            strategies=st.builds(StrategySpec, activation_checkpointing=toggles, compile=toggles)),
        output=st.builds(OutputSpec, dir=_text, save_final=st.booleans()),
    )


@settings(max_examples=60, deadline=None)
@given(run_specs())
def test_generated_specs_round_trip_through_json_and_yaml(spec):
    for fmt in ("json", "yaml"):
        assert decode_spec(encode_spec(spec, fmt), fmt) == spec


@settings(max_examples=60, deadline=None)
@given(run_specs())
def test_generated_specs_round_trip_through_toml(spec):
    assert decode_spec(encode_spec(spec, "toml"), "toml") == spec


# ----------------------------------------------------------------------------------------- overrides


@pytest.mark.parametrize(
    ("override", "get", "expected"),
    [
        ("train.steps=20", lambda s: s.train.steps, 20),
        ("train.steps= 7 ", lambda s: s.train.steps, 7),
        ("optimizer.lr=3e-4", lambda s: s.optimizer.lr, 3e-4),
        ("train.clip_grad_norm=0.5", lambda s: s.train.clip_grad_norm, 0.5),
        ("train.clip_grad_norm=0", lambda s: s.train.clip_grad_norm, 0.0),
        ("memory.budget=none", lambda s: s.memory.budget, None),
        ("output.save_final=false", lambda s: s.output.save_final, False),
        ("optimizer.betas=[0.8, 0.9]", lambda s: s.optimizer.betas, (0.8, 0.9)),
        ("memory.budget=8GiB", lambda s: s.memory.budget_bytes, 8 * 1024**3),
        ("memory.precision=fp32", lambda s: s.memory.precision, "fp32"),
        ("memory.strategies.compile=off", lambda s: s.memory.strategies.compile, "off"),
        ("train.schedule.kind=linear", lambda s: s.train.schedule, ScheduleSpec(kind="linear")),
        ("data.tokenizer.vocab_size=512", lambda s: s.data.tokenizer, TrainTokenizer(vocab_size=512)),
        ("train.seed=-1", lambda s: s.train.seed, -1),
        # string fields keep text that looks like a number, a bool or a list
        ("name=123", lambda s: s.name, "123"),
        ("model.preset=123", lambda s: s.model.preset, "123"),
        ("model.preset=true", lambda s: s.model.preset, "true"),
        ("model.preset=3e-4", lambda s: s.model.preset, "3e-4"),
        ("data.source=[a, b]", lambda s: s.data.source, "[a, b]"),
        ("output.dir=runs/{name}=x", lambda s: s.output.dir, "runs/{name}=x"),  # split at the first '='
    ],
)
def test_override_converts_by_field_type(override, get, expected):
    value = get(decode([override]))
    assert value == expected
    assert type(value) is type(expected)


@pytest.mark.parametrize("targets", ["[wq, wv]", '["wq", "wv"]', '["wq","wv"]'])
def test_override_lists_in_yaml_flow_or_json(targets):
    spec = decode(["method.kind=lora", f"method.targets={targets}"])
    assert spec.method == Lora(targets=("wq", "wv"))


def test_override_switches_a_tagged_union_then_sets_its_fields():
    spec = decode(["method.kind=lora", "method.rank=4"])
    assert spec.method == Lora(rank=4)
    spec = decode(["method.kind=dora", "method.dropout=0.1"])
    assert spec.method == Dora(dropout=0.1)


def test_override_kind_keeps_fields_shared_by_both_variants():
    text = MINIMAL_TOML + '[optimizer]\nkind = "adamw"\nlr = 0.002\n'
    assert decode(["optimizer.kind=sgd"], text) == msgspec.structs.replace(decode(text=text), optimizer=SGD(lr=0.002))


def test_override_kind_of_an_absent_union_starts_from_the_new_variant():
    assert decode(["optimizer.kind=sgd", "optimizer.momentum=0.5"]).optimizer == SGD(momentum=0.5)


def test_override_tokenizer_kind_to_file():
    spec = decode(["data.tokenizer.kind=file", "data.tokenizer.path=/t.model"])
    assert spec.data.tokenizer == FileTokenizer(path="/t.model")


def test_override_creates_missing_tables_from_defaults():
    spec = decode(["train.schedule.warmup_steps=5", "memory.strategies.activation_checkpointing=on"])
    assert spec.train.schedule == ScheduleSpec(warmup_steps=5)
    assert spec.memory == MemorySpec(strategies=StrategySpec(activation_checkpointing="on"))


def test_overrides_apply_in_order():
    assert decode(["train.steps=3", "train.steps=4"]).train.steps == 4
    # a cross-field rule sees the data after all overrides
    spec = decode(["train.steps=20", "train.schedule.warmup_steps=15"])
    assert (spec.train.steps, spec.train.schedule.warmup_steps) == (20, 15)
    spec = decode(["train.epochs=1", "train.steps=none"])
    assert (spec.train.steps, spec.train.epochs) == (None, 1.0)
    spec = decode(["model.preset=none", "model.path=/models/x"])
    assert spec.model == ModelSpec(path="/models/x")


def test_override_does_not_change_the_text_it_was_given():
    raw = msgspec.toml.decode(MINIMAL_TOML)
    before = json.dumps(raw, sort_keys=True)
    decode_spec(MINIMAL_TOML, "toml", overrides=["train.steps=3"])
    assert json.dumps(msgspec.toml.decode(MINIMAL_TOML), sort_keys=True) == before


@pytest.mark.parametrize("override", ["train.steps", "=3", " =3", ""])
def test_override_without_key_and_value_is_rejected(override):
    message = spec_error(overrides=[override])
    assert f"--set {override!r}" in message
    assert "KEY=VALUE" in message


def test_override_unknown_field_suggests_the_closest():
    message = spec_error(overrides=["train.stepz=3"])
    assert message.startswith("--set train.stepz:")
    assert "unknown field 'stepz' at `$.train`" in message
    assert "micro_batch" in message  # lists what is allowed
    assert "did you mean 'steps'?" in message


def test_override_into_a_value_is_rejected():
    message = spec_error(overrides=["train.steps.x=3"])
    assert "--set train.steps.x" in message
    assert "`$.train.steps` is a value, not a table" in message


def test_override_field_of_a_variant_without_fields():
    message = spec_error(overrides=["method.rank=4"])
    assert "--set method.rank" in message
    assert "(kind = 'full')" in message
    assert "choose another kind first" in message


@pytest.mark.parametrize(
    ("override", "path", "found", "allowed"),
    [
        ("train.steps=abc", "$.train.steps", "'abc'", "an integer"),
        ("train.steps=1.5", "$.train.steps", "1.5", "an integer"),
        ("train.micro_batch=0", "$.train.micro_batch", "0", "an integer"),
        ("optimizer.lr=-1", "$.optimizer.lr", "-1", "a number"),
        ("name=x=y", "$.name", "'x=y'", "a string"),
        ("method.kind=lorax", "$.method.kind", "'lorax'", "'full', 'lora', 'qlora', 'dora'"),
        ("memory.precision=fp8", "$.memory.precision", "'fp8'", "'fp32'"),
        ("output.save_final=maybe", "$.output.save_final", "'maybe'", "true or false"),
    ],
)
def test_override_with_a_bad_value_names_path_value_and_allowed(override, path, found, allowed):
    message = spec_error(overrides=[override])
    assert f"invalid value at `{path}`: {found}" in message
    assert "allowed:" in message and allowed in message.split("allowed:")[1]


# ------------------------------------------------------------------------------------ error messages


def _with(section: str) -> str:
    return MINIMAL_TOML + "\n" + section + "\n"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(MINIMAL_TOML.replace("steps = 10", 'steps = "ten"'),
                     ["invalid value at `$.train.steps`: 'ten'", "got `str`", "allowed: an integer"], id="type"),
        pytest.param(MINIMAL_TOML.replace("steps = 10", "steps = 0"),
                     ["`$.train.steps`: 0", ">= 1"], id="range"),
        pytest.param(_with('[method]\nkind = "lora"\ndropout = 1.5'),
                     ["`$.method.dropout`: 1.5", "<= 1.0", "allowed: a number"], id="fraction"),
        pytest.param(MINIMAL_TOML.replace("steps = 10", "steps = 10\nmicro_bach = 2"),
                     ["unknown field 'micro_bach' at `$.train`", "allowed: steps, epochs, micro_batch",
                      "did you mean 'micro_batch'?"], id="unknown-field"),
        pytest.param(_with("[optimiser]\nlr = 1.0"),
                     ["unknown field 'optimiser' at `$`", "did you mean 'optimizer'?"], id="unknown-table"),
        pytest.param(_with('[method]\nkind = "lora"\nrnak = 4'),
                     ["unknown field 'rnak' at `$.method` (kind = 'lora')", "did you mean 'rank'?"],
                     id="unknown-variant-field"),
        pytest.param(_with('[method]\nkind = "lorax"'),
                     ["invalid value at `$.method.kind`: 'lorax'",
                      "allowed: one of 'full', 'lora', 'qlora', 'dora'"], id="bad-tag"),
        pytest.param(_with('[method]\nkind = "QLORA"'),
                     ["`$.method.kind`: 'QLORA'", "'dora'; did you mean 'qlora'?"], id="bad-tag-did-you-mean"),
        pytest.param(_with('[memory]\nprecision = "mixed-bf61"'),
                     ["'mixed-bf16'; did you mean 'mixed-bf16'?"], id="bad-enum-did-you-mean"),
        pytest.param(_with('[optimizer]\nkind = "adam"'),
                     ["`$.optimizer.kind`: 'adam'", "'adamw', 'sgd', 'adafactor', 'adamw8bit', 'adamw4bit'"],
                     id="bad-optimizer-tag"),
        pytest.param(_with('[memory]\nprecision = "fp8"'),
                     ["invalid value at `$.memory.precision`: 'fp8'",
                      "allowed: one of 'auto', 'bf16', 'fp16', 'fp32', 'mixed-bf16'"], id="bad-enum"),
        pytest.param(_with('[method]\nkind = "lora"\ntargets = ["wq", "q_proj"]'),
                     ["`$.method.targets[1]`: 'q_proj'", "'wq'", "'output'"], id="bad-list-item"),
        pytest.param('name = "x"\n[model]\npreset = "tiny"\n',
                     ["`$.train` is required but missing"], id="missing-table"),
        pytest.param(_with('[data]\ntokenizer = { kind = "file" }'),
                     ["`$.data.tokenizer.path` is required but missing"], id="missing-field"),
        pytest.param(MINIMAL_TOML.replace('preset = "tiny"', 'preset = "tiny"\npath = "/m"'),
                     ["invalid `$.model`", "exactly one of `preset`", "`path`"], id="preset-and-path"),
        pytest.param(MINIMAL_TOML.replace('preset = "tiny"', "init_seed = 1"),
                     ["invalid `$.model`", "exactly one of `preset`", "`path`"], id="neither-preset-nor-path"),
        pytest.param(MINIMAL_TOML.replace("steps = 10", "steps = 10\nepochs = 1.0"),
                     ["invalid `$.train`", "exactly one of `steps`", "`epochs`"], id="steps-and-epochs"),
        pytest.param(MINIMAL_TOML.replace("steps = 10", "seq_len = 64"),
                     ["invalid `$.train`", "exactly one of `steps`", "`epochs`"], id="neither-steps-nor-epochs"),
        pytest.param(MINIMAL_TOML.replace("steps = 10", "steps = 10\nschedule = { warmup_steps = 20 }"),
                     ["invalid `$.train`", "warmup_steps = 20 exceeds steps = 10", "lower the warmup"],
                     id="warmup-over-steps"),
        pytest.param(_with('[memory]\nbudget = "lots"'),
                     ["`$.memory`", "budget", "'lots'", "'8GiB'"], id="bad-budget"),
        pytest.param(MINIMAL_TOML.replace('name = "x"', 'name = "my run"'),
                     ["invalid value at `$.name`: 'my run'", "regex"], id="bad-name"),
    ],
)
def test_validation_errors_name_the_path_the_value_and_what_is_allowed(text, expected):
    message = spec_error(text)
    assert message.startswith("s.toml: ")
    for part in expected:
        assert part in message


def test_a_bad_choice_far_from_every_allowed_one_gets_no_guess():
    message = spec_error(_with('[method]\nkind = "xyz"'))
    assert "allowed: one of 'full', 'lora', 'qlora', 'dora'" in message and "did you mean" not in message


def test_bad_schedule_kind_lists_the_allowed_kinds():
    message = spec_error(MINIMAL_TOML.replace("steps = 10", 'steps = 10\nschedule = { kind = "cos" }'))
    assert "`$.train.schedule.kind`: 'cos'" in message
    assert "allowed: one of 'constant', 'cosine', 'linear'" in message


@pytest.mark.parametrize(
    ("fmt", "text"),
    [("toml", MINIMAL_TOML + "[memory\n"), ("json", '{"name": "x",'), ("yaml", "name: [x\n")],
)
def test_syntax_errors_name_the_source_and_the_format(fmt, text):
    message = spec_error(text, fmt=fmt)
    assert message.startswith(f"s.toml: not valid {fmt.upper()}: ")


def test_toml_syntax_error_from_a_file_names_the_file_and_line(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text(MINIMAL_TOML + "[memory\n")
    with pytest.raises(SpecError) as err:
        load_spec(path)
    message = str(err.value)
    assert message.startswith(f"{path}: not valid TOML")
    assert "line 6" in message


@pytest.mark.parametrize(("fmt", "text"), [("json", "[1, 2]"), ("yaml", "- a\n- b\n"), ("json", '"x"')])
def test_top_level_must_be_a_table(fmt, text):
    assert "the top level must be a table/object, found" in spec_error(text, fmt=fmt)


def test_empty_yaml_reports_what_is_missing():
    assert "`$.model` is required but missing" in spec_error("", fmt="yaml")


def test_unknown_suffix_lists_the_known_ones(tmp_path):
    path = tmp_path / "run.ini"
    path.write_text(MINIMAL_TOML)
    with pytest.raises(SpecError) as err:
        load_spec(path)
    assert str(err.value) == f"{path}: unknown spec format '.ini'; use one of .toml, .json, .yaml, .yml"


def test_decode_spec_rejects_unknown_format_name():
    assert "unknown spec format 'ini'" in spec_error(fmt="ini")


def test_missing_file_is_a_spec_error(tmp_path):
    path = tmp_path / "absent.toml"
    with pytest.raises(SpecError, match="absent.toml: no such spec file"):
        load_spec(path)


def test_spec_errors_are_value_errors():
    # the CLI catches ValueError to print one line without a traceback
    assert issubclass(SpecError, ValueError)


def _spec_in(directory: Path, data: str, model: str = 'preset = "tiny"') -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    spec = directory / "s.toml"
    spec.write_text(MINIMAL_TOML.replace('preset = "tiny"', model) + data)
    return spec


def test_relative_inputs_in_a_spec_file_are_taken_from_its_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub" / "base").mkdir(parents=True)
    spec = _spec_in(Path("sub"), '[data]\nsource = "data/a.jsonl"\ntokenizer = { kind = "file", path = "t.model" }\n'
                    'cache_dir = "cache"\n', model='path = "base"')
    loaded = load_spec(spec)
    assert loaded.data.source == str(Path("sub/data/a.jsonl"))
    assert loaded.data.tokenizer.path == str(Path("sub/t.model"))
    assert loaded.model.path == str(Path("sub/base"))
    assert loaded.data.cache_dir == "cache"  # an output: relative to the working directory
    # a path given with --set is the user's, relative to the working directory
    assert load_spec(spec, ["data.source=here.jsonl"]).data.source == "here.jsonl"


def test_spec_paths_that_are_not_relative_files_stay_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    absolute = str(tmp_path / "a.jsonl")
    spec = _spec_in(Path("sub"), f'[data]\nsource = "{absolute}"\n', model='path = "org/name"')
    loaded = load_spec(spec)
    assert loaded.data.source == absolute and loaded.model.path == "org/name"  # no sub/org/name: a hub id
    assert load_spec(_spec_in(Path("sub2"), '[data]\nsource = "builtin:kjv"\n')).data.source == "builtin:kjv"
    assert load_spec(_spec_in(Path("."), '[data]\nsource = "d.jsonl"\n')).data.source == "d.jsonl"


def test_a_linked_spec_reads_from_the_link_s_directory_not_its_target_s(tmp_path):
    _spec_in(tmp_path / "package", '[data]\nsource = "d.jsonl"\n')
    (tmp_path / "examples").mkdir()
    (tmp_path / "examples" / "s.toml").symlink_to(tmp_path / "package" / "s.toml")
    assert load_spec(tmp_path / "examples" / "s.toml").data.source == str(tmp_path / "examples" / "d.jsonl")


def test_a_missing_spec_file_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SpecError, match=f"nope.toml: no such spec file \\(looked at {tmp_path}/nope.toml\\)"):
        load_spec("nope.toml")
