"""Every example spec decodes, and each real-model recipe plans within its budget without its weights, by
exactly the command its header gives (the preset of the same architecture, a tokenizer of the same size)."""

import json
import shlex
from pathlib import Path

import pytest
import tomllib
from typer.testing import CliRunner

from lowmem.cli import app
from lowmem.spec import load_spec

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted(p.name for p in (REPO / "examples").glob("*.toml") if p.name != "quickstart.toml")


def _weightless_plan_command(text: str) -> list[str]:
    lines = text.splitlines()
    i = next(i for i, line in enumerate(lines) if line.startswith("# Plan it without the weights"))
    return shlex.split(lines[i + 1].removeprefix("#").strip())


def test_there_are_recipes_for_the_families_users_bring():
    assert len(RECIPES) >= 3


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_decodes_and_plans_within_its_budget_by_its_own_header(name, monkeypatch):
    text = (REPO / "examples" / name).read_text()
    assert load_spec(REPO / "examples" / name).model.path == tomllib.loads(text)["model"]["path"]
    command = _weightless_plan_command(text)
    assert command[:3] == ["lowmem", "plan", f"examples/{name}"]
    monkeypatch.chdir(REPO)
    result = CliRunner().invoke(app, [*command[1:], "--json"])
    assert result.exit_code == 0, result.output
    p = json.loads(result.stdout)
    assert p["memory"]["peak_bytes"] <= p["usable_bytes"]
    assert p["spec"]["model"]["preset"] in command[-3]
