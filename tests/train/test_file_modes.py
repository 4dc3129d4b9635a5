"""What a run writes (its JSON files, checkpoints, the data cache) gets ordinary permissions under the user's umask,
not the 0600/0700 that mkstemp, mkdtemp and safetensors give."""

import os
import stat

import pytest

from lowmem.plan import plan
from lowmem.train import execute


@pytest.mark.parametrize(("umask", "dir_mode", "file_mode"), [(0o022, 0o755, 0o644), (0o027, 0o750, 0o640)])
def test_a_runs_files_checkpoints_and_cache_have_ordinary_permissions(tiny_spec, tmp_path, umask, dir_mode,
                                                                      file_mode):
    cache = tmp_path / "cache"  # a fresh cache, so its tokenizer and packed rows are written under this umask
    previous = os.umask(umask)
    try:
        p = plan(tiny_spec("train.steps=2", "output.save_every=1", "output.save_final=false",
                           f"data.cache_dir={cache}"), "cpu")
        execute(p, tmp_path / "run", progress=False)
    finally:
        os.umask(previous)
    written = [f for f in [*(tmp_path / "run").rglob("*"), *cache.rglob("*")] if f.name != ".lock"]
    checkpoints = [f for f in written if f.suffix == ".safetensors"]
    assert checkpoints and any(f.suffix == ".arrow" for f in written) and any(f.name == "plan.json" for f in written)
    modes = {str(f.relative_to(tmp_path)): stat.S_IMODE(f.stat().st_mode) for f in written}
    assert {k: m for k, m in modes.items() if m != (dir_mode if (tmp_path / k).is_dir() else file_mode)} == {}
