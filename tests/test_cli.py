import json
import math
import re
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest
from typer.testing import CliRunner

from lowmem.cli import app
from lowmem.plan import PLAN_FORMAT, Plan
from lowmem.spec import RunSpec, load_spec, parse_bytes

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "examples" / "quickstart.toml"
COMPONENTS = ("parameters", "gradients", "optimizer_state", "activations", "logits", "batch")
STRATEGIES = ("precision", "activation_checkpointing")


def tiny_overrides(cache_dir: Path) -> list[str]:
    """`--set` arguments that make the quickstart run in a few seconds on one CPU core."""
    sets = {
        "model.preset": "tiny",
        "data.tokenizer.vocab_size": "512",
        "data.eval_rows": "0",
        "data.cache_dir": str(cache_dir),
        "train.steps": "2",
        "train.schedule.warmup_steps": "0",
        "train.micro_batch": "2",
        "train.seq_len": "64",
        "train.eval_every": "0",
        "memory.precision": "fp32",
    }
    return [arg for key, value in sets.items() for arg in ("--set", f"{key}={value}")]


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def assert_clean_error(result, *parts: str, quiet_stdout: bool = True) -> str:
    """Exit code 2, exactly one `error:` line on stderr that contains every part, and no traceback."""
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    if quiet_stdout:
        assert result.stdout == ""
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1, result.stderr
    for part in parts:
        assert part in result.stderr
    return result.stderr


# ------------------------------------------------------------------------------------------- surface


def test_top_level_help_lists_the_commands(runner):
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    commands = re.findall(r"^│ (\w+)\s", result.stdout.split("Commands")[1], re.M)
    assert commands == ["validate", "plan", "execute", "export", "report", "runs", "generate", "download",
                        "presets", "recipes", "init", "data"]


def test_version_prints_the_installed_version(runner):
    from importlib.metadata import version

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0, result.output
    assert result.stdout == f"lowmem {version('lowmem')}\n"
    # the distribution's version is read from the package's (pyproject: dynamic version), so the two agree
    import lowmem

    assert version("lowmem") == lowmem.__version__


def test_no_arguments_shows_help(runner):
    result = runner.invoke(app, [])
    assert "validate" in result.output and "execute" in result.output


@pytest.mark.parametrize(
    ("command", "options"),
    [
        ("validate", {"--set", "-s", "--help"}),
        ("plan", {"--set", "-s", "--hardware", "--host-ram", "--json", "--maximize", "--png", "--trace", "--nproc", "--explain", "--help"}),
        ("execute", {"--set", "-s", "--out", "--quiet", "-q", "--resume", "--overwrite", "--cap-memory", "--help"}),
        ("generate", {"--prompt", "--max-new-tokens", "--temperature", "--top-k", "--top-p", "--seed", "--help"}),
        ("export", {"--out", "--merge", "--help"}),
        ("report", {"--png", "--help"}),
        ("runs", {"--help"}),
        ("presets", {"--help"}),
        ("recipes", {"--help"}),
        ("init", {"--force", "--help"}),
    ],
)
def test_each_command_has_exactly_its_options(runner, command, options):
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0
    assert set(re.findall(r"(?<![\w-])(--?[a-z][\w-]*)", result.stdout.split("Options")[1])) >= options
    # a command with a required option marks it `*` and indents the other rows to match
    found = set(re.findall(r"^│ (?:[* ]  )?(--[\w-]+)", result.stdout, re.M))
    assert found == {o for o in options if o.startswith("--")}


# ------------------------------------------------------------------------------------------ validate


def test_validate_prints_the_full_spec(runner):
    result = runner.invoke(app, ["validate", str(QUICKSTART)])
    assert result.exit_code == 0, result.output
    printed = msgspec.toml.decode(result.stdout)
    # defaults are filled in: sections absent from the file are printed too
    assert printed["method"] == {"kind": "full"}
    assert printed["memory"]["strategies"]["compile"] == "auto"
    assert msgspec.convert(printed, RunSpec) == load_spec(QUICKSTART)
    assert "valid" in result.stderr


def test_validate_applies_overrides(runner):
    result = runner.invoke(app, ["validate", str(QUICKSTART), "--set", "train.steps=70", "-s", "method.kind=lora"])
    assert result.exit_code == 0, result.output
    printed = msgspec.toml.decode(result.stdout)
    assert printed["train"]["steps"] == 70
    assert printed["method"]["kind"] == "lora" and printed["method"]["rank"] == 8


@pytest.mark.parametrize(
    ("overrides", "parts"),
    [
        (["train.steps=0"], ["$.train.steps", ": 0", "allowed: an integer"]),
        (["train.stepz=3"], ["--set train.stepz", "did you mean 'steps'?"]),
        (["train.steps"], ["--set 'train.steps'", "KEY=VALUE"]),
        (["method.kind=lorax"], ["$.method.kind", "'lorax'", "'full', 'lora', 'qlora', 'dora'"]),
        (["method.kind=lroa"], ["--set method.kind=lroa", "`$.method.kind`: 'lroa'",
                                "allowed: one of 'full', 'lora', 'qlora', 'dora'; did you mean 'lora'?"]),
        (["memory.precision=bf17"], ["--set memory.precision=bf17", "'bf17'", "did you mean 'bf16'?"]),
    ],
)
def test_validate_bad_override_is_one_clean_error(runner, overrides, parts):
    args = ["validate", str(QUICKSTART)] + [a for o in overrides for a in ("--set", o)]
    assert_clean_error(runner.invoke(app, args), *parts)


def test_validate_bad_file_is_one_clean_error(runner, tmp_path):
    spec = tmp_path / "bad.yaml"
    spec.write_text("model: {preset: tiny}\ntrain: {steps: 10, micro_batch: -2}\n")
    assert_clean_error(runner.invoke(app, ["validate", str(spec)]),
                       str(spec), "`$.train.micro_batch`: -2", ">= 1")


@pytest.mark.parametrize(("name", "part"), [("absent.toml", "no such spec file"), ("spec.ini", "unknown spec format")])
def test_validate_unreadable_spec_is_one_clean_error(runner, tmp_path, name, part):
    if name.endswith(".ini"):
        (tmp_path / name).write_text("x = 1\n")
    assert_clean_error(runner.invoke(app, ["validate", str(tmp_path / name)]), name, part)


# ---------------------------------------------------------------------------------------------- plan


def test_plan_prints_strategies_and_memory_table(runner):
    # standard CE: the peak is backward's start, where every component (the logits too) is a line
    result = runner.invoke(app, ["plan", str(QUICKSTART), "--set", "memory.strategies.fused_cross_entropy=off",
                                 "--set", "memory.strategies.chunked_cross_entropy=off"])
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "lowmem plan · quickstart" in out
    strategies, memory = out.split("\nstrategies\n")[1].split("\nmemory at peak")
    for name in STRATEGIES:
        assert re.search(rf"^  {name}\s+\S+\s+\[(auto|user|fixed)\]", strategies, re.M), name
    for name in COMPONENTS:
        assert re.search(rf"^  {name}\s+[\d.]+ (B|KiB|MiB|GiB)\s", memory, re.M), name
    assert re.search(r"^  total\s+[\d.]+ (KiB|MiB|GiB)\s+[\d.]+% of usable budget", memory, re.M)


def test_plan_for_a_named_gpu(runner):
    result = runner.invoke(app, ["plan", str(QUICKSTART), "--hardware", "rtx4090-24gb",
                                 "--set", "memory.budget=4GiB"])
    assert result.exit_code == 0, result.output
    assert "hardware   rtx4090-24gb (cuda, 23.65 GiB)" in result.stdout
    assert "budget     4.00 GiB" in result.stdout


def test_plan_unknown_hardware_is_one_clean_error(runner):
    assert_clean_error(runner.invoke(app, ["plan", str(QUICKSTART), "--hardware", "nope"]),
                       "unknown hardware profile 'nope'", "rtx4090-24gb", "h100-80gb")


def test_plan_json_decodes_into_a_plan_of_the_loaded_spec(runner):
    result = runner.invoke(app, ["plan", str(QUICKSTART), "--json", "--hardware", "a100-40gb",
                                 "--set", "train.micro_batch=4", "--set", "train.seq_len=128"])
    assert result.exit_code == 0, result.output
    p = msgspec.json.decode(result.stdout, type=Plan)
    assert p.format == PLAN_FORMAT
    assert p.spec == load_spec(QUICKSTART, ["train.micro_batch=4", "train.seq_len=128"])
    assert p.hardware.name == "a100-40gb"
    assert p.tokens_per_step == 4 * 128
    assert {c.name for c in p.memory.components} >= set(COMPONENTS)
    assert p.memory.peak_bytes <= p.usable_bytes


def test_plan_over_budget_names_the_smallest_budget_that_works(runner):
    result = runner.invoke(app, ["plan", str(QUICKSTART), "--hardware", "cpu", "--set", "memory.budget=1MiB"])
    stderr = assert_clean_error(result, "nothing fits memory.budget = 1.00 MiB", "Set memory.budget to at least")
    need = re.search(r"at least ([\d.]+ [KMGT]iB)", stderr).group(1)
    assert parse_bytes(need) > 1024**2
    result = runner.invoke(app, ["plan", str(QUICKSTART), "--hardware", "cpu", "--set", f"memory.budget={need}"])
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize(("micro_batch", "seq_len"), [(1, 256), (4, 64), (8, 32), (8, 64), (2, 128)])
def test_plan_suggested_budget_is_never_rounded_down(runner, micro_batch, seq_len):
    sets = ["--hardware", "cpu", "--set", f"train.micro_batch={micro_batch}", "--set", f"train.seq_len={seq_len}"]
    result = runner.invoke(app, ["plan", str(QUICKSTART), *sets, "--set", "memory.budget=1KiB"])
    assert result.exit_code == 2
    need = re.search(r"at least ([\d.]+ [KMGT]iB)", result.stderr).group(1)
    result = runner.invoke(app, ["plan", str(QUICKSTART), *sets, "--set", f"memory.budget={need}"])
    assert result.exit_code == 0, result.stderr
    # and it is the smallest such figure at two decimals
    unit = need.split()[1]
    smaller = f"{float(need.split()[0]) - 0.01:.2f} {unit}"
    result = runner.invoke(app, ["plan", str(QUICKSTART), *sets, "--set", f"memory.budget={smaller}"])
    assert result.exit_code == 2, smaller


# ------------------------------------------------------------------------------------------- execute


def read_metrics(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """One tiny `lowmem execute` of the quickstart, shared by the tests below."""
    root = tmp_path_factory.mktemp("execute")
    run_dir = root / "run"
    args = ["execute", str(QUICKSTART), *tiny_overrides(root / "cache"), "--out", str(run_dir)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert f"run directory: {run_dir}" in result.stdout
    assert "done: 2 steps" in result.stdout
    return run_dir


def test_execute_writes_the_run_directory(tiny_run):
    for name in ("plan.json", "metrics.jsonl", "memory.json", "model/config.json", "model/model.safetensors",
                 "model/tokenizer.model"):
        assert (tiny_run / name).is_file(), name
        assert (tiny_run / name).stat().st_size > 0, name
    p = msgspec.json.decode((tiny_run / "plan.json").read_bytes(), type=Plan)
    assert p.spec.model.preset == "tiny" and p.spec.train.steps == 2
    assert p.strategies.precision == "fp32"
    assert json.loads((tiny_run / "model" / "config.json").read_text())["vocab_size"] == 512
    memory = json.loads((tiny_run / "memory.json").read_text())
    assert memory["measured_peak_bytes"] > 0


def test_execute_logs_one_json_object_per_step(tiny_run):
    records = read_metrics(tiny_run)
    assert [r["step"] for r in records] == [1, 2]
    for r in records:
        assert isinstance(r["loss"], float) and math.isfinite(r["loss"])
        # an untrained model predicts about uniformly over the 512-token vocabulary
        assert abs(r["loss"] - math.log(512)) < 1.0


def test_execute_of_the_saved_plan_repeats_the_losses_exactly(tiny_run, tmp_path, runner):
    other = tmp_path / "again"
    result = runner.invoke(app, ["execute", str(tiny_run / "plan.json"), "--out", str(other), "--quiet"])
    assert result.exit_code == 0, result.output
    assert "strategies" not in result.stdout  # --quiet skips the plan report
    assert (other / "model" / "model.safetensors").is_file()
    first, again = read_metrics(tiny_run), read_metrics(other)
    assert [r["step"] for r in again] == [r["step"] for r in first]
    assert [r["loss"] for r in again] == [r["loss"] for r in first]  # bitwise: CPU fp32 is deterministic
    assert (other / "model" / "model.safetensors").read_bytes() == (
        tiny_run / "model" / "model.safetensors").read_bytes()


def test_execute_saved_plan_refuses_overrides(tiny_run, tmp_path, runner):
    result = runner.invoke(app, ["execute", str(tiny_run / "plan.json"), "--out", str(tmp_path / "x"),
                                 "--set", "train.steps=3"])
    assert_clean_error(result, "--set cannot change a saved plan")
    assert not (tmp_path / "x").exists()


def test_execute_cuda_plan_on_a_torch_without_cuda_is_one_clean_error(runner, tmp_path):
    result = runner.invoke(app, ["plan", str(QUICKSTART), "--json", "--hardware", "h100-80gb"])
    plan_path = tmp_path / "plan.json"
    plan_path.write_text(result.stdout)
    result = runner.invoke(app, ["execute", str(plan_path), "--out", str(tmp_path / "run")])
    # the plan report is printed before the run starts, the error after it
    # one line naming the card and the fix: a CUDA build, or a plan for this machine
    assert_clean_error(result, "h100-80gb", "built without CUDA", quiet_stdout=False)
    assert "download.pytorch.org" in result.output and "lowmem plan SPEC" in result.output
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


# --------------------------------------------------------------------------------------- subprocess


def test_module_entry_point_plans_the_quickstart():
    result = subprocess.run([sys.executable, "-m", "lowmem.cli", "plan", "examples/quickstart.toml"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "memory at peak" in result.stdout


def test_console_script_reports_a_bad_spec_without_traceback():
    script = Path(sys.executable).with_name("lowmem")
    result = subprocess.run([str(script), "validate", "examples/quickstart.toml", "--set", "train.steps=-1"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    # the bad value came from --set, so --set is named, not the file; one line
    assert result.stderr.startswith("error: --set train.steps=-1: invalid value at `$.train.steps`: -1")
    assert result.stderr.count("\n") == 1


def test_export_merge_and_report(tmp_path, data_cache):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("matplotlib")
    import torch
    from tests.conftest import TINY_SPEC

    from lowmem.nn import forward, load_hf, logits
    from lowmem.nn.generate import find_model_files, load_model
    from lowmem.plan import plan as make_plan
    from lowmem.spec import decode_spec
    from lowmem.train import execute as run

    spec = decode_spec(TINY_SPEC, "toml", overrides=[f"data.cache_dir={data_cache}", "train.steps=3",
                                                    "method.kind=lora", "optimizer.lr=1e-2"])
    run(make_plan(spec, "cpu"), tmp_path / "run", progress=False)
    runner = CliRunner()
    refused = runner.invoke(app, ["export", str(tmp_path / "run"), "--out", str(tmp_path / "x")])
    assert refused.exit_code == 2 and "--merge" in refused.output
    result = runner.invoke(app, ["export", str(tmp_path / "run"), "--out", str(tmp_path / "merged"), "--merge"])
    assert result.exit_code == 0, result.output
    cfg, adapted, settings = load_model(find_model_files(tmp_path / "run"))
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    tokens = torch.randint(0, cfg.vocab_size, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens).logits,
                                   logits(adapted, forward(adapted, tokens, cfg, adapters=settings), cfg),
                                   rtol=1e-4, atol=1e-4)
    assert (tmp_path / "merged/tokenizer.model").is_file() and load_hf(tmp_path / "merged")[0] == cfg
    result = runner.invoke(app, ["report", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert "3 steps" in result.output and (tmp_path / "run/report.png").read_bytes()[:4] == b"\x89PNG"
    assert runner.invoke(app, ["report", str(tmp_path)]).exit_code == 2


def test_data_prepare_and_inspect(tmp_path):
    records = [{"instruction": f"Name the number {i}.", "output": f"It is {i}."} for i in range(40)]
    source = tmp_path / "sft.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in records))
    overrides = ["--set", f"data.source={source}", "--set", "data.format=instruct", "--set",
                 f"data.cache_dir={tmp_path / 'cache'}", "--set", "data.tokenizer.vocab_size=400",
                 "--set", "train.seq_len=64", "--set", "data.eval_rows=0"]
    runner = CliRunner()
    result = runner.invoke(app, ["data", "prepare", "examples/quickstart.toml", *overrides])
    assert result.exit_code == 0, result.output
    assert "n_documents       40" in result.output
    shown = runner.invoke(app, ["data", "inspect", "examples/quickstart.toml", *overrides, "-n", "1"])
    assert shown.exit_code == 0, shown.output
    # prompts are masked out of the loss: the instruction text appears inside [[...]], the answer outside
    line = next(ln for ln in shown.output.splitlines() if "Name the number" in ln)
    assert "[[" in line and "It is" in line.split("]]")[-1]
    bad = runner.invoke(app, ["data", "prepare", "examples/quickstart.toml", "--set", "data.source=/nope.jsonl"])
    assert bad.exit_code == 2 and "/nope.jsonl" in bad.output


def test_a_missing_relative_data_source_says_where_it_looked(runner, tmp_path):
    spec = tmp_path / "sub" / "q.toml"
    spec.parent.mkdir()
    spec.write_text(QUICKSTART.read_text().replace('"builtin:kjv"', '"data/mine.jsonl"'))
    result = runner.invoke(app, ["data", "prepare", str(spec)])
    assert_clean_error(result, f"data.source = '{spec.parent / 'data/mine.jsonl'}'",
                       f"looked at {spec.parent / 'data/mine.jsonl'}", "taken from its directory")


def test_plan_with_a_decimal_budget_says_once_what_it_means(runner):
    result = runner.invoke(app, ["plan", str(QUICKSTART), "--set", "model.preset=tiny", "--set", "memory.budget=1GB"])
    assert result.exit_code == 0, result.output
    notes = [line for line in result.output.splitlines() if "10^9" in line]
    assert notes == ["warning: memory.budget = '1GB' means 1 x 10^9 bytes (953.67 MiB); write '1GiB' for 1 x 2^30"]
    binary = runner.invoke(app, ["plan", str(QUICKSTART), "--set", "model.preset=tiny", "--set", "memory.budget=1GiB"])
    assert binary.exit_code == 0 and "10^" not in binary.output


def test_plan_trace_shows_analytic_and_traced_side_by_side():
    result = CliRunner().invoke(app, ["plan", "examples/quickstart.toml", "--trace", "--set", "model.preset=tiny",
                                      "--set", "data.tokenizer.vocab_size=512", "--set", "train.seq_len=64"])
    assert result.exit_code == 0, result.output
    assert "analytic" in result.output and "traced" in result.output


def test_import_drops_torchao_and_pytree_noise_only():
    # importing torchao (lowmem.nn.quant) logs a failed _C_mxfp8 / _C_cutlass_90a load on machines without
    # those kernels and trips torch's _pytree Enum deprecation; other records of the same loggers still show
    code = ("import logging, lowmem.cli, lowmem.nn.quant, lowmem.train; "
            "logging.getLogger('torchao').warning('Failed to load the user kernel'); "
            "logging.getLogger('torch.utils._pytree').warning('another pytree record')")
    result = subprocess.run([sys.executable, "-W", "default", "-c", code], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "_C_mxfp8" not in result.stderr and "_C_cutlass" not in result.stderr
    assert "_pytree.py" not in result.stderr and "register_constant" not in result.stderr
    assert "Failed to load the user kernel" in result.stderr and "another pytree record" in result.stderr


def test_validate_does_not_import_torch():
    code = ("import sys; from typer.testing import CliRunner; from lowmem.cli import app; "
            "r = CliRunner().invoke(app, ['validate', 'examples/quickstart.toml']); "
            "assert r.exit_code == 0, r.output; print('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "False"


def test_plan_nproc_plans_per_process(runner):
    result = runner.invoke(app, ["plan", "examples/quickstart.toml", "--set", "model.preset=tiny", "--nproc", "2",
                                 "--json"])
    assert result.exit_code == 0, result.output
    p = json.loads(result.stdout)
    assert p["world_size"] == 2
    assert p["tokens_per_step"] == 2 * p["spec"]["train"]["micro_batch"] * p["spec"]["train"]["grad_accum"] * \
        p["spec"]["train"]["seq_len"]
    shown = runner.invoke(app, ["plan", "examples/quickstart.toml", "--set", "model.preset=tiny", "--nproc", "2"])
    assert "per process, 2 processes" in shown.stdout


def _continuation(lines: list[str]) -> list[str]:
    """The lines that continue a wrapped decision: indented past the strategy column, up to the next decision."""
    out = []
    for ln in lines:
        if not ln.startswith(" " * 10):
            break
        out.append(ln)
    return out


def test_plan_maximize_batch_is_capped_by_the_rows_of_the_data(tmp_path, runner):
    # 40 one-line records, each longer than half a row of 64 tokens: at most one per packed row, so few rows
    records = [{"instruction": f"Name the number {i} " + "and say it again " * 4, "output": f"It is {i}."}
               for i in range(40)]
    source = tmp_path / "sft.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in records))
    overrides = ["--set", f"data.source={source}", "--set", "data.format=instruct", "--set",
                 f"data.cache_dir={tmp_path / 'cache'}", "--set", "data.tokenizer.vocab_size=400", "--set",
                 "train.seq_len=64", "--set", "data.eval_rows=2", "--set", "model.preset=tiny",
                 "--set", "memory.budget=2GiB", "--set", "train.grad_accum=2"]
    result = runner.invoke(app, ["plan", "examples/quickstart.toml", *overrides, "--maximize", "batch"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("  train.micro_batch"))
    # the decision and its reason's continuation lines (wrapped at 100 columns), as one line
    line = " ".join([lines[start]] + [ln.strip() for ln in _continuation(lines[start + 1:])])
    rows = int(re.search(r"its ([\d,]+) training rows", line).group(1).replace(",", ""))
    assert "capped by the data" in line and line.split()[1] == str(rows // 2)
