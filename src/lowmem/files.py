"""File modes for what lowmem publishes: mkstemp/mkdtemp and safetensors create files private to their creator
(0600/0700); a run directory, checkpoint, cache entry or model is shared like any file the user makes, so before
it is renamed into place it gets the mode an ordinary `open`/`mkdir` would give under the process's umask."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["share", "umask"]


def umask() -> int:
    """This process's umask (os.umask only reads it by setting it, so it is set back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def share(*paths: Path | str) -> None:
    """Give each path (a directory: it and the files directly in it) 0666 / 0777 less the umask."""
    mask = umask()
    for path in map(Path, paths):
        if path.is_dir():
            os.chmod(path, 0o777 & ~mask)
            for f in path.iterdir():
                if f.is_file():
                    os.chmod(f, 0o666 & ~mask)
        else:
            os.chmod(path, 0o666 & ~mask)
