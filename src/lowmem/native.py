"""Small C++ libraries lowmem compiles against the installed torch on first use (the fake-CUDA shim, the host
allocator), cached per source, torch and Python version in `$LOWMEM_CACHE` or `~/.cache/lowmem`.

`torch.utils.cpp_extension` builds them (a C++ compiler, g++ or clang++, and ninja, a dependency, are needed;
about 2-10 s each), in a child process: building imports torch, and the fake-CUDA shim must be loaded before it.
The library is written under a temporary name and renamed into place, so an interrupted build leaves nothing
that a later run would load.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

__all__ = ["NativeBuildError", "compiled_library", "compiler", "torch_dir"]


class NativeBuildError(RuntimeError):
    """A library could not be compiled (no compiler, no torch headers, a compiler error)."""


def torch_dir() -> Path:
    found = importlib.util.find_spec("torch")
    if found is None or found.origin is None:
        raise NativeBuildError("lowmem needs torch installed: bash scripts/install.sh")
    return Path(found.origin).parent


def compiler() -> str | None:
    """The C++ compiler torch.utils.cpp_extension would use ($CXX, else c++), or None when there is none."""
    return shutil.which(os.environ.get("CXX", "c++"))


def _build_dir(name: str, source: str) -> Path:
    root = Path(os.environ.get("LOWMEM_CACHE", Path.home() / ".cache" / "lowmem"))
    torch_version = (torch_dir() / "version.py").read_text()
    key = hashlib.sha256((source + torch_version + sys.version).encode()).hexdigest()[:16]
    return root / name / key


def cached_library(name: str, source: str) -> Path | None:
    """The library if it was built already (no compiler needed then), else None."""
    lib = _build_dir(name, source) / f"{name}.so"
    return lib if lib.exists() else None


def compiled_library(name: str, source: str, what: str) -> Path:
    """`name`.so compiled from the C++ `source`, built on first use; `what` names it in errors."""
    build = _build_dir(name, source)
    lib = build / f"{name}.so"
    if lib.exists():
        return lib
    build.mkdir(parents=True, exist_ok=True)
    staging = f"{name}_{os.getpid()}"  # built under its own name, renamed into place when complete
    (build / f"{staging}.cpp").write_text(source)
    code = ("from torch.utils.cpp_extension import load; "
            f"load(name={staging!r}, sources=[{str(build / (staging + '.cpp'))!r}], "
            f"build_directory={str(build)!r}, is_python_module=False, extra_cflags=['-O2'])")
    # cpp_extension builds with ninja, which it looks up on PATH: the `ninja` wheel installs it beside this python
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "PATH": path})
    built = build / f"{staging}.so"
    if done.returncode != 0 or not built.exists():
        raise NativeBuildError(f"building {what} in {build} failed (it needs a C++ compiler, g++ or clang++, "
                               f"and the torch headers):\n{done.stderr[-2000:]}")
    os.replace(built, lib)
    return lib
