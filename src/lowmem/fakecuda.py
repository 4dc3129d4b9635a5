"""Fake CUDA on a CPU-only torch: run a CUDA plan's real code on FakeTensorMode tensors whose device is `cuda`.

A CPU-only torch can create fake tensors on `cuda`, but the first autograd op on one aborts: the engine asks the
CUDA device guard and the CUDA hooks, and a CPU build registers neither. A small C++ shim registers both:

- a stand-in CUDA device guard, `c10::impl::FakeGuardImpl<CUDA>` (it keeps a current-device index, touches no
  driver);
- CUDA hooks that say "built, no device available".

With it, forward, backward and the optimizer step run on fake CUDA tensors, and a tensor left on the host (a batch
not copied, a parameter created on the CPU) raises `FakeTensorDeviceMismatchError` at the op that mixes them, as
a GPU run would fail. `torch.cuda.is_available()` stays False, so nothing tries a real kernel.

The hooks must be registered before torch asks for them, i.e. before `import torch`: `enable()` loads the shim's
library (and the torch libraries it links to, with ctypes) into a process that has not imported torch yet. So
fake CUDA runs in a child process: `run(target, *args)` starts `python -m lowmem.fakecuda TARGET` with the
arguments as JSON on stdin (or ARGS_JSON after TARGET), which enables the shim, imports `module:function` (or
`path/file.py:function`) and calls it with the arguments; the function's JSON-able return value comes back.
The shim is compiled once per torch version by `lowmem.native` (a C++ compiler and ninja, a dependency, are
needed; about 2 s) into `$LOWMEM_CACHE` or `~/.cache/lowmem`.

On a torch built with CUDA none of this is needed: fake CUDA tensors work there already (`is_needed()`).
"""

from __future__ import annotations

import ctypes
import importlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

from lowmem import native

__all__ = ["FakeCudaError", "enable", "is_needed", "run", "shim_library"]

SHIM_SOURCE = r"""
#include <c10/core/impl/FakeGuardImpl.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <ATen/detail/CUDAHooksInterface.h>

namespace {
C10_REGISTER_GUARD_IMPL(CUDA, c10::impl::FakeGuardImpl<c10::DeviceType::CUDA>);
}

namespace at { namespace lowmem_fake {
struct CUDAHooks : public at::CUDAHooksInterface {
  CUDAHooks(at::CUDAHooksArgs) {}
  bool isBuilt() const override { return true; }
  bool isAvailable() const override { return false; }
  bool hasCUDA() const override { return false; }
  bool hasPrimaryContext(c10::DeviceIndex) const override { return false; }
  c10::DeviceIndex deviceCount() const override { return 1; }
};
}}

namespace at {
using CUDAHooks = lowmem_fake::CUDAHooks;  // the registry key torch looks up is the class name "CUDAHooks"
REGISTER_CUDA_HOOKS(CUDAHooks);
}
"""

_NAME = "lowmem_fake_cuda"


class FakeCudaError(RuntimeError):
    """The shim could not be built or loaded, or the fake-CUDA child process failed."""


def _torch_dir() -> Path:
    try:
        return native.torch_dir()
    except native.NativeBuildError as err:
        raise FakeCudaError(str(err)) from None


def _torch_version() -> str:
    return (_torch_dir() / "version.py").read_text()


def is_needed() -> bool:
    """Whether this torch is built without CUDA (fake CUDA tensors then need the shim)."""
    if "torch" in sys.modules:
        return not sys.modules["torch"].backends.cuda.is_built()
    return "+cpu" in _torch_version() or not any((_torch_dir() / "lib").glob("libtorch_cuda*"))


def shim_library() -> Path:
    """The shim's shared library, compiled on first use (lowmem.native)."""
    try:
        return native.compiled_library(_NAME, SHIM_SOURCE, "the fake-CUDA shim")
    except native.NativeBuildError as err:
        raise FakeCudaError(str(err)) from None


def enable() -> None:
    """Register the fake CUDA guard and hooks in this process. Must run before `import torch`."""
    if "torch" in sys.modules:
        raise FakeCudaError("lowmem.fakecuda.enable() must run before torch is imported (the CUDA hooks are read "
                            "once, at the first CUDA query); call it first, or use lowmem.fakecuda.run(...)")
    lib = shim_library()
    torch_lib = _torch_dir() / "lib"
    for name in ("libc10.so", "libtorch_cpu.so"):
        ctypes.CDLL(str(torch_lib / name), mode=ctypes.RTLD_GLOBAL)
    ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)
    os.environ["LOWMEM_FAKE_CUDA"] = "1"  # children (a traced plan's, a test's) know they are on fake CUDA


def is_active() -> bool:
    """Whether this process runs on fake CUDA (`enable()` was called here or in a parent)."""
    return os.environ.get("LOWMEM_FAKE_CUDA") == "1"


def _resolve(target: str):
    where, _, func = target.rpartition(":")
    if not where or not func:
        raise FakeCudaError(f"target {target!r}: give module:function or path/to/file.py:function")
    if where.endswith(".py"):
        spec = importlib.util.spec_from_file_location(Path(where).stem, where)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        module = importlib.import_module(where)
    return getattr(module, func)


def run(target: str, *args, timeout: float = 600, env: dict[str, str] | None = None):
    """Call `target(*args)` in a child process on fake CUDA and return what it returned (JSON round trip).

    Raises FakeCudaError with the child's stderr when it fails; its exception's type and message come first.
    """
    shim_library()  # build here, so that a compiler error is reported once and plainly
    # the arguments go on stdin: Linux caps one argv string at 128 KiB, and a plan with its alternatives is more
    cmd = [sys.executable, "-m", "lowmem.fakecuda", target]
    done = subprocess.run(cmd, input=json.dumps(list(args)), capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    marker = "\nLOWMEM_FAKECUDA_RESULT "
    if done.returncode != 0 or marker not in done.stdout:
        raise FakeCudaError(f"{target} on fake CUDA failed (exit {done.returncode}):\n{done.stderr[-6000:]}")
    return json.loads(done.stdout.rsplit(marker, 1)[1])


def _main(argv: list[str]) -> int:
    target, args = argv[0], json.loads(argv[1] if len(argv) > 1 else sys.stdin.read() or "[]")
    enable()
    result = _resolve(target)(*args)
    sys.stdout.write("\nLOWMEM_FAKECUDA_RESULT " + json.dumps(result) + "\n")
    return 0


def _exit_without_teardown(code: int) -> None:
    """End the child with `code` once its output is flushed, skipping the interpreter's teardown.

    Under load the child sometimes aborted after writing its result ("terminate called without an active
    exception"; 10 of 30 exits of a small backward-then-exit target under two CPU hogs, 0 of 30 with this). The
    core dump's aborting thread is one of the autograd engine's device threads, which a fake-CUDA backward starts
    (`Engine::thread_main`): it drops its last reference to a finished `GraphTask` after the main thread has
    returned from `backward()` and reached `Py_FinalizeEx`; the task's saved thread-local state holds Python
    objects (the dispatch modes, FakeTensorMode), whose decref takes the GIL (`pybind11::gil_scoped_acquire`), and
    CPython ends a thread that asks for the GIL during finalization with `pthread_exit`, whose forced unwind
    through a noexcept frame calls `std::terminate`. This is upstream's open race, pytorch/pytorch#117762 (same
    stack; #38228 for the pthread_exit part), not something the child can wait for: the engine offers no way to
    join its device threads. Nothing is left to do at this point (the result is written, the child holds no
    files), so `os._exit` skips the teardown the race needs.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    _exit_without_teardown(_main(sys.argv[1:]))
