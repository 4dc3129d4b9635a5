"""The recipes lowmem ships: example specs a user copies (`lowmem recipes`, `lowmem init RECIPE [DIR]`).

The `.toml` files next to this module are package data, so a pip install has them; the repository's
`examples/` holds links to these same files, so there is one copy of each. A recipe's first comment line is its
one-line description; the lines after it give the commands that plan and run it from the copy `lowmem init`
makes.
"""

import difflib
from importlib.resources import files
from pathlib import Path
from typing import NamedTuple


class Recipe(NamedTuple):
    name: str  # the file name without .toml: what `lowmem init` takes
    description: str  # the file's first comment line


def recipe_names() -> list[str]:
    """The shipped recipes' names, sorted."""
    return sorted(f.name.removesuffix(".toml") for f in files(__name__).iterdir() if f.name.endswith(".toml"))


def recipe_text(name: str) -> str:
    """The text of the recipe called `name` (`quickstart` or `quickstart.toml`); ValueError naming the known ones."""
    name = name.removesuffix(".toml")
    known = recipe_names()
    if name not in known:
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ValueError(f"unknown recipe {name!r}; {hint}known recipes: {', '.join(known)} (`lowmem recipes`)")
    return files(__name__).joinpath(f"{name}.toml").read_text(encoding="utf-8")


def list_recipes() -> list[Recipe]:
    """Every shipped recipe with its one-line description."""
    return [Recipe(name, describe(recipe_text(name))) for name in recipe_names()]


def describe(text: str) -> str:
    """A recipe's one-line description: its first line, a `#` comment."""
    first = text.splitlines()[0] if text else ""
    assert first.startswith("# "), f"a recipe starts with a one-line `# ` description, not {first!r}"
    return first.removeprefix("# ").strip()


def copy_recipe(name: str, directory: str | Path = ".", force: bool = False) -> Path:
    """Write recipe `name` to `directory`/NAME.toml (directories made as needed) and return that path.

    An existing file is kept unless `force`: ValueError naming it and the two ways on.
    """
    text = recipe_text(name)
    target = Path(directory) / f"{name.removesuffix('.toml')}.toml"
    elsewhere = f"give another directory (`lowmem init {target.stem} DIR`)"
    if Path(directory).exists() and not Path(directory).is_dir():
        raise ValueError(f"{directory} is a file, not a directory; {elsewhere}")
    if target.is_dir():
        raise ValueError(f"{target} is a directory; {elsewhere}")
    if target.exists() and not force:
        raise ValueError(f"{target} exists; pass --force to overwrite it, or {elsewhere}")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text, encoding="utf-8")
    return target
