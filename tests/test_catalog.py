"""Getting started through the real CLI: `lowmem presets`, `lowmem recipes`, `lowmem init`, and the charts
(`report`, `plan --png`) on an install without matplotlib, which print their text, say how to get the PNG and
exit 0."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lowmem.cli import app
from lowmem.nn.config import PRESETS, count_params, preset
from lowmem.recipes import copy_recipe, recipe_names, recipe_text

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def test_presets_lists_every_preset_with_its_parameter_count(runner):
    result = runner.invoke(app, ["presets"])
    assert result.exit_code == 0, result.output
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines()[1:-1]}
    assert list(rows) == list(PRESETS)
    assert rows["llama3.1-8b"][1] == "8.03B" and rows["quickstart-5m"][1] == "5.48M"
    assert count_params(preset("quickstart-5m")) == 5_475_584  # the README's figure, 5.48M above
    assert rows["llama3.1-8b"][2:] == ["llama", "32", "4096", "32/8", "14336", "128256", "131072"]
    assert max(len(line) for line in result.stdout.splitlines()) <= 100
    # the columns line up whatever the family name's length (gemma3_text, qwen3_moe)
    lines = result.stdout.splitlines()[:-1]
    assert len({line.index(" " + line.split()[3] + " ", len(line.split()[0]) + 20) + len(line.split()[3])
                for line in lines[1:]} | {lines[0].index("layers") + 5}) == 1


def test_recipes_lists_each_shipped_spec_with_its_first_line(runner):
    result = runner.invoke(app, ["recipes"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert [line.split()[0] for line in lines[:-1]] == recipe_names()
    quickstart = next(line for line in lines if line.startswith("quickstart "))
    assert quickstart.split(None, 1)[1] == recipe_text("quickstart").splitlines()[0].removeprefix("# ")
    assert "lowmem init NAME" in lines[-1]
    assert max(len(line) for line in lines) <= 100


def test_init_copies_the_recipe_into_a_new_directory(runner, tmp_path):
    result = runner.invoke(app, ["init", "quickstart", str(tmp_path / "a" / "b")])
    assert result.exit_code == 0, result.output
    written = tmp_path / "a" / "b" / "quickstart.toml"
    assert written.read_text() == (REPO / "examples" / "quickstart.toml").read_text()
    assert f"lowmem plan {written}" in result.stdout
    # the name may carry its .toml suffix
    again = runner.invoke(app, ["init", "quickstart.toml", str(tmp_path), "--force"])
    assert again.exit_code == 0, again.output
    assert (tmp_path / "quickstart.toml").read_text() == written.read_text()


def test_init_defaults_to_the_current_directory(runner, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["init", "qwen2.5-0.5b-full"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["qwen2.5-0.5b-full.toml"]


def _one_error_line(result) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_init_refuses_to_overwrite_unless_forced(runner, tmp_path):
    target = tmp_path / "quickstart.toml"
    target.write_text("# mine\n")
    line = _one_error_line(runner.invoke(app, ["init", "quickstart", str(tmp_path)]))
    assert str(target) in line and "--force" in line
    assert target.read_text() == "# mine\n"  # untouched
    result = runner.invoke(app, ["init", "quickstart", str(tmp_path), "--force"])
    assert result.exit_code == 0, result.output
    assert target.read_text() == recipe_text("quickstart")


def test_init_of_an_unknown_recipe_names_the_known_ones(runner, tmp_path):
    line = _one_error_line(runner.invoke(app, ["init", "quikstart", str(tmp_path)]))
    assert "'quikstart'" in line and "did you mean 'quickstart'?" in line
    assert all(name in line for name in recipe_names())
    assert list(tmp_path.iterdir()) == []


def test_init_into_a_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("")
    with pytest.raises(ValueError, match="is a file, not a directory"):
        copy_recipe("quickstart", tmp_path / "f")


def test_recipes_are_package_data_in_the_wheel_config():
    import tomllib

    package_data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert package_data["lowmem.recipes"] == ["*.toml"]


# --------------------------------------------------------------------------- without matplotlib

# runs the console-script entry point with matplotlib made unimportable (None in sys.modules), as on the
# default install, which has no matplotlib
NO_MATPLOTLIB = "import sys; sys.modules['matplotlib'] = None; from lowmem.cli import main; sys.argv[0] = 'lowmem'; main()"
WITH_MATPLOTLIB = "from lowmem.cli import main; main()"


def _lowmem(code: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def _fake_run(run_dir: Path) -> Path:
    run_dir.mkdir()
    records = [{"step": s, "loss": 8.0 - s, "lr": 1e-3, "tokens_per_s": 1000.0, "elapsed_s": float(s)}
               for s in (1, 2, 3)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return run_dir


@pytest.mark.parametrize("code", [NO_MATPLOTLIB, WITH_MATPLOTLIB], ids=["without", "with"])
def test_report_without_matplotlib_prints_the_text_and_how_to_get_the_chart(tmp_path, code):
    if code == WITH_MATPLOTLIB:
        pytest.importorskip("matplotlib")
    run_dir = _fake_run(tmp_path / "run")
    done = _lowmem(code, "report", str(run_dir), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "3 steps, loss 7.0000 -> 5.0000" in done.stdout
    assert "Traceback" not in done.stderr
    if code == NO_MATPLOTLIB:
        assert not (run_dir / "report.png").exists()
        note = [line for line in done.stderr.splitlines() if "matplotlib" in line]
        assert len(note) == 1 and "pip install 'lowmem[plot]'" in note[0] and "report.png" in note[0]
    else:
        assert (run_dir / "report.png").read_bytes()[:4] == b"\x89PNG"
        assert "matplotlib" not in done.stderr


def test_plan_png_without_matplotlib_prints_the_plan_and_how_to_get_the_chart(tmp_path):
    png = tmp_path / "plan.png"
    done = _lowmem(NO_MATPLOTLIB, "plan", str(REPO / "examples" / "quickstart.toml"), "--png", str(png),
                   cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert re.search(r"^memory at peak", done.stdout, re.M)
    assert not png.exists()
    note = [line for line in done.stderr.splitlines() if "matplotlib" in line]
    assert len(note) == 1 and "--png" in note[0] and "pip install 'lowmem[plot]'" in note[0]
