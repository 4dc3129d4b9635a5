"""Model references: a local directory, or a Hugging Face Hub repo that is already in the local HF cache.

    lowmem download meta-llama/Llama-3.2-1B          # needs network: fills the HF cache
    model.path = "meta-llama/Llama-3.2-1B"           # in a spec: resolved from that cache, offline
    model.path = "meta-llama/Llama-3.2-1B@v1.0"      # a branch, tag or commit of the repo

Only `download` talks to the network. `resolve_model_dir` reads the cache (`local_files_only`), so planning
and training never download anything by surprise. The cache directory, offline mode and the access token
are huggingface_hub's own (`HF_HUB_CACHE`/`HF_HOME`, `HF_HUB_OFFLINE`, `HF_TOKEN` or `hf auth login`):
lowmem passes none of them and reads none itself.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

__all__ = ["DEFAULT_INCLUDE", "download", "resolve_model_dir", "split_model_ref"]

# What lowmem reads from a model repo: configs (model, generation, tokenizer), safetensors weights and a
# sentencepiece tokenizer (Llama 3 repos keep theirs in original/). Never pickled *.bin / *.pth weights.
DEFAULT_INCLUDE = ("*.json", "*.safetensors", "tokenizer.model", "original/tokenizer.model")


def split_model_ref(ref: str) -> tuple[str, str | None]:
    """`org/name@revision` → ("org/name", "revision"); without `@`, the revision is None (the repo's main)."""
    repo_id, sep, revision = ref.partition("@")
    if sep and not revision:
        raise ValueError(f"{ref!r}: nothing after '@'; write org/name@<branch, tag or commit> or drop the '@'")
    return repo_id, revision or None


def resolve_model_dir(ref: str | os.PathLike[str], *, where: str = "model.path") -> Path:
    """The directory holding the model `ref` names: `ref` itself when it is a directory, else the snapshot
    of the hub repo `org/name` (or `org/name@revision`) in the local Hugging Face cache.

    No network: a repo that is not cached is an error telling how to fetch it. `where` names the setting
    in that error (a spec path such as "model.path").

    Raises:
        ValueError when `ref` is neither a directory nor a cached repo.
    """
    path = Path(ref)
    if path.is_dir():
        return path
    ref = str(ref)
    from huggingface_hub import constants, try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    repo_id, revision = split_model_ref(ref)
    fix = (f"run `lowmem download {repo_id}" + (f" --revision {revision}" if revision else "")
           + f"` (needs network) or point {where} at a directory")
    try:
        # config.json is in every model repo lowmem can load; its cached copy lies in the snapshot directory.
        config = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    except HFValidationError:
        raise ValueError(f"{where} = {ref!r}: no such directory ({path.absolute()}), and not a Hugging Face repo "
                         f"id (org/name or org/name@revision); point {where} at a model directory") from None
    if not isinstance(config, str):  # None: not cached; a sentinel object: cached as absent upstream
        raise ValueError(f"{where} = {ref!r}: not a local directory ({path.absolute()}) and not in the Hugging "
                         f"Face cache ({constants.HF_HUB_CACHE}); {fix}")
    return Path(config).parent


def download(repo_id: str, *, revision: str | None = None, include: Sequence[str] | None = None,
             exclude: Sequence[str] | None = None, local_dir: str | os.PathLike[str] | None = None) -> Path:
    """Download a model repo with huggingface_hub's `snapshot_download` and return its directory.

    Args:
        repo_id: `org/name`, or `org/name@revision`.
        revision: branch, tag or commit (default: main); not together with `@revision` in repo_id.
        include: glob patterns of the files to fetch, replacing `DEFAULT_INCLUDE`.
        exclude: glob patterns of files to skip among those.
        local_dir: put the files there instead of the HF cache. A spec then names that directory; without
            it, a spec names the repo id (see `resolve_model_dir`).

    Returns:
        The snapshot directory in the cache, or `local_dir`.

    Raises:
        ValueError with huggingface_hub's reason and what to do, when the repo, revision or network is
        unavailable (also in offline mode, HF_HUB_OFFLINE=1, for a repo not yet cached), or when what
        arrived holds no config.json or no *.safetensors.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    repo_id, ref_revision = split_model_ref(repo_id)
    if ref_revision and revision and ref_revision != revision:
        raise ValueError(f"{repo_id}@{ref_revision} and --revision {revision}: give the revision once")
    revision = revision or ref_revision
    try:
        out = snapshot_download(repo_id, revision=revision, local_dir=local_dir,
                                allow_patterns=list(include or DEFAULT_INCLUDE),
                                ignore_patterns=list(exclude) if exclude else None)
    except HFValidationError as e:
        raise ValueError(f"{repo_id!r} is not a Hugging Face repo id ({e}); write org/name") from None
    except GatedRepoError:
        raise ValueError(f"{repo_id}: a gated repo; accept its terms on huggingface.co, then log in "
                         "(`hf auth login`) or set HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise ValueError(f"{repo_id}: no such model repo, or a private one this token cannot read; check the "
                         "id, or log in (`hf auth login`) or set HF_TOKEN") from None
    except RevisionNotFoundError:
        raise ValueError(f"{repo_id}: no revision {revision!r} (branch, tag or commit)") from None
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as e:
        raise ValueError(f"{repo_id}: cannot download: the Hugging Face Hub is unreachable or offline mode "
                         f"is on (HF_HUB_OFFLINE), and the repo is not cached ({_first_line(e)})") from None
    except HfHubHTTPError as e:
        raise ValueError(f"{repo_id}: download failed ({_first_line(e)})") from None
    root = Path(out)
    if not (root / "config.json").is_file() or not any(root.glob("*.safetensors")):
        raise ValueError(f"{repo_id}: downloaded to {root}, but it holds no config.json or no *.safetensors "
                         "(lowmem reads safetensors checkpoints only; check --include / --exclude)")
    return root


def _first_line(err: BaseException) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
