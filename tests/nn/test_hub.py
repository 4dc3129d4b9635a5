"""Model references: local directories and hub repos in a local Hugging Face cache; `lowmem download`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from huggingface_hub import constants as hub_constants
from typer.testing import CliRunner

from lowmem.cli import app
from lowmem.nn.config import preset
from lowmem.nn.hf import load_hf, save_hf
from lowmem.nn.hub import download, resolve_model_dir, split_model_ref
from lowmem.nn.llama import init_params

MAIN_SHA = "a" * 40
V1_SHA = "b" * 40


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An HF cache holding org/name at two commits (main, and tag v1 with other weights), as huggingface_hub
    lays it out: models--org--name/{refs/<ref> = sha, snapshots/<sha>/files}."""
    cache = tmp_path / "hub"
    repo = cache / "models--org--name"
    cfg = preset("tiny")
    for sha, ref, seed in [(MAIN_SHA, "main", 0), (V1_SHA, "v1", 1)]:
        save_hf(init_params(cfg, seed=seed), cfg, repo / "snapshots" / sha)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(sha)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    # huggingface_hub reads its environment once, at import (already done by the time a test runs): point
    # the value it read at the same place.
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    return cache, cfg


def test_repo_ids_resolve_to_cached_snapshots(hub_cache):
    cache, cfg = hub_cache
    snapshots = cache / "models--org--name" / "snapshots"
    assert resolve_model_dir("org/name") == snapshots / MAIN_SHA
    assert resolve_model_dir("org/name@v1") == snapshots / V1_SHA
    assert resolve_model_dir(f"org/name@{V1_SHA}") == snapshots / V1_SHA
    main, v1 = load_hf(resolve_model_dir("org/name"))[1], load_hf(resolve_model_dir("org/name@v1"))[1]
    assert torch.equal(main["norm"], init_params(cfg, seed=0)["norm"])
    assert not torch.equal(main["output"], v1["output"])


def test_a_local_directory_is_itself(tmp_path, hub_cache):
    assert resolve_model_dir(tmp_path) == tmp_path
    assert resolve_model_dir(str(tmp_path)) == tmp_path


def test_uncached_repo_names_the_cache_and_the_fix(hub_cache):
    cache, _ = hub_cache
    with pytest.raises(ValueError) as e:
        resolve_model_dir("org/other@dev")
    msg = str(e.value)
    # it says where it looked for a directory, too
    assert msg.startswith(f"model.path = 'org/other@dev': not a local directory ({Path.cwd() / 'org/other@dev'}) "
                          "and not in the Hugging Face cache")
    assert str(cache) in msg and "`lowmem download org/other --revision dev` (needs network)" in msg
    with pytest.raises(ValueError, match="no revision v2|not in the Hugging Face cache"):
        resolve_model_dir("org/name@v2")
    with pytest.raises(ValueError, match=r"no such directory \(/no/such/dir/at/all\), and not a Hugging Face repo id"):
        resolve_model_dir("/no/such/dir/at/all")
    with pytest.raises(ValueError, match="nothing after '@'"):
        split_model_ref("org/name@")


def test_download_offline_serves_the_cache_and_explains_a_miss(hub_cache, monkeypatch):
    cache, _ = hub_cache
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)  # read at import, like the cache
    assert download("org/name") == cache / "models--org--name" / "snapshots" / MAIN_SHA
    assert download("org/name", revision="v1") == cache / "models--org--name" / "snapshots" / V1_SHA

    result = CliRunner().invoke(app, ["download", "org/missing", "--include", "*.json"])
    assert result.exit_code == 2
    assert "error: org/missing: cannot download" in result.output and "HF_HUB_OFFLINE" in result.output
    assert "Traceback" not in result.output

    result = CliRunner().invoke(app, ["download", "org/name@v1"])
    assert result.exit_code == 0, result.output
    assert f"org/name@v1: {cache / 'models--org--name' / 'snapshots' / V1_SHA}" in result.output
