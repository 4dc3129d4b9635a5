"""The plan as a newcomer reads it: within 100 columns, with its legend (issue #16 items 1, 2, 5)."""

import shlex
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lowmem.cli import app
from lowmem.plan import plan, render_plan
from lowmem.plan.render import WIDTH
from lowmem.spec import load_spec

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted(p.name for p in (REPO / "examples").glob("*.toml"))


def _plan_args(name: str) -> list[str]:
    """The example's plan command without weights (its header's), or the quickstart's own."""
    lines = (REPO / "examples" / name).read_text().splitlines()
    i = next((i for i, line in enumerate(lines) if line.startswith("# Plan it without the weights")), None)
    if i is None:
        return ["plan", f"examples/{name}"]
    args = shlex.split(lines[i + 1].removeprefix("#").strip())[1:]
    args[1] = f"examples/{name}"  # the header names the copy `lowmem init` makes, in the current directory
    if "--hardware" in args:  # the hardware comes from the test
        j = args.index("--hardware")
        del args[j:j + 2]
    return args


@pytest.mark.parametrize("nproc", [1, 2])
@pytest.mark.parametrize("hardware", ["cpu", "h100-80gb"])
@pytest.mark.parametrize("name", EXAMPLES)
def test_every_line_of_every_examples_plan_fits_in_100_columns(name, hardware, nproc, monkeypatch):
    monkeypatch.chdir(REPO)
    args = [*_plan_args(name), "--hardware", hardware, "--nproc", str(nproc)]
    if CliRunner().invoke(app, args + ["--json"]).exit_code:  # nothing fits the example's budget here: more room
        args += ["--set", "memory.budget=1TiB"]
    for explain in ([], ["--explain"]):
        result = CliRunner().invoke(app, args + explain)
        assert result.exit_code == 0, result.output
        wide = [line for line in result.stdout.splitlines() if len(line) > WIDTH]
        assert not wide, "\n".join(wide)
        assert "lowmem plan ·" in result.stdout and "alternatives considered" in result.stdout


def test_the_plan_explains_its_tags_and_explain_its_abbreviations():
    p = plan(load_spec(REPO / "examples" / "quickstart.toml"), "cpu")
    short, full = render_plan(p), render_plan(p, explain=True)
    assert "[auto] the planner's choice  [fixed] the only option  [user] set in the spec" in short
    assert "(more: --explain)" in short
    for term in ("first-n:", "selective:", "opt-in-bwd:", "logits: N tokens = the rows run at once x train.seq_len "
                 "= 8 x 256 = 2,048"):
        assert term in full and term not in short
    # --explain gives every reason whole
    for d in p.decisions:
        assert " ".join(d.reason.split()) in " ".join(full.split())


def test_a_long_reason_is_cut_at_whole_clauses_and_says_how_many_are_left():
    from lowmem.plan.render import _short_reason

    reason = "a is slower (x; y); b is slower; c would not fit"
    assert _short_reason(reason, 30, max_lines=1) == "a is slower (x; y) (+2 more: --explain)"
    assert _short_reason(reason, 200) == reason


def test_the_alternatives_table_has_headers_marks_the_plan_and_says_why_faster_ones_lost():
    p = plan(load_spec(REPO / "examples" / "quickstart.toml"), "cpu")
    lines = render_plan(p).splitlines()
    start = lines.index(next(line for line in lines if line.startswith("alternatives considered")))
    header = lines[start + 1].split()
    assert header == ["precision", "ckpt", "loss", "opt-in-bwd", "compile", "peak", "tokens/s"]
    rows = lines[start + 2:]
    chosen = [line for line in rows if line.lstrip().startswith("chosen")]
    assert len(chosen) == 1 and chosen[0].endswith("<- the plan")
    faster = rows[:rows.index(chosen[0])]
    fits = [i for i, line in enumerate(faster) if line.lstrip().startswith("fits")]
    assert fits
    for i in fits:  # a note on the row or on the line under it
        row, below = faster[i], faster[i + 1] if i + 1 < len(faster) else ""
        assert row.rstrip().endswith(("decay", "compile", "unknown", "updates", "above)")) or "^" in below, row
    # the chosen plan with compile on is labelled as such
    assert any("the plan, compile on" in line for line in rows)


def test_the_plan_gives_its_run_time_and_under_torchrun_says_tokens_per_s_are_the_total(tiny_spec):
    p = plan(tiny_spec("train.steps=100"), "h100-80gb")
    text = render_plan(p)
    seconds = 100 * p.tokens_per_step / p.tokens_per_s
    assert f"estimated run time  100 steps x {p.tokens_per_step:,} tokens / {p.tokens_per_s:,.0f} tokens/s" in text
    assert f"{seconds:.1f} s" in text or f"{seconds:.0f} s" in text
    compiled = plan(tiny_spec("train.steps=100", "memory.strategies.compile=on"), "h100-80gb")
    assert "+ about 45 s to compile" in render_plan(compiled)
    two = plan(tiny_spec("train.steps=100"), "h100-80gb", world_size=2)
    assert f"in total over 2 processes ({two.tokens_per_s / 2:,.0f} each" in render_plan(two)
    epochs = plan(tiny_spec("train.steps=none", "train.epochs=1"), "cpu")
    assert "is known once the data is prepared" in " ".join(render_plan(epochs).split())
