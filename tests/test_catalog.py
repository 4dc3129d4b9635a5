"""Getting started through the real CLI: `lowmem presets`, `lowmem recipes`, `lowmem init`."""

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
