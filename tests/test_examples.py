"""The shipped recipes (src/lowmem/recipes, package data; examples/ links to them): every one decodes, each
real-model recipe plans within its budget without its weights by exactly the command its header gives, run where
`lowmem init` put the copy (the preset of the same architecture, a tokenizer of the same size), and the
quickstart plans from an empty directory with nothing but its copy."""

import json
import shlex
from pathlib import Path

import pytest
import tomllib
from typer.testing import CliRunner

from lowmem.cli import app
from lowmem.recipes import recipe_names, recipe_text
from lowmem.spec import load_spec

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "src" / "lowmem" / "recipes"
RECIPES = [name for name in recipe_names() if name != "quickstart"]


def _weightless_plan_command(text: str) -> list[str]:
    lines = text.splitlines()
    i = next(i for i, line in enumerate(lines) if line.startswith("# Plan it without the weights"))
    return shlex.split(lines[i + 1].removeprefix("#").strip())


def _init(name: str, directory: Path) -> Path:
    result = CliRunner().invoke(app, ["init", name, str(directory)])
    assert result.exit_code == 0, result.output
    return directory / f"{name}.toml"


def test_there_are_recipes_for_the_families_users_bring():
    assert len(RECIPES) >= 3


def test_examples_are_the_shipped_recipes_not_copies():
    # one source of truth: examples/ holds exactly the packaged recipes, byte for byte, as links to them
    examples = sorted((REPO / "examples").glob("*.toml"))
    assert [p.stem for p in examples] == recipe_names()
    for path in examples:
        assert path.is_symlink() and path.resolve() == (SHIPPED / path.name).resolve(), path
        assert path.read_text() == recipe_text(path.stem)


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_decodes_and_plans_within_its_budget_by_its_own_header(name, tmp_path, monkeypatch):
    spec = _init(name, tmp_path)
    text = spec.read_text()
    assert load_spec(spec).model.path == tomllib.loads(text)["model"]["path"]
    command = _weightless_plan_command(text)
    assert command[:3] == ["lowmem", "plan", f"{name}.toml"]
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, [*command[1:], "--json"])
    assert result.exit_code == 0, result.output
    p = json.loads(result.stdout)
    assert p["memory"]["peak_bytes"] <= p["usable_bytes"]
    assert p["spec"]["model"]["preset"] in command[-3]


def test_quickstart_plans_from_an_empty_directory_by_its_header(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    text = _init("quickstart", Path(".")).read_text()
    header = [line.removeprefix("#").strip() for line in text.splitlines() if line.startswith("#   lowmem ")]
    plan_line = next(line for line in header if line.startswith("lowmem plan"))
    command = shlex.split(plan_line.split("#")[0])
    assert command == ["lowmem", "plan", "quickstart.toml"]
    result = CliRunner().invoke(app, [*command[1:], "--json"])
    assert result.exit_code == 0, result.output
    p = json.loads(result.stdout)
    assert p["memory"]["peak_bytes"] <= p["usable_bytes"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["quickstart.toml"]  # plan writes nothing
