"""Build the C++ CPU kernels on first use when ``drmm_kernels._C`` was not installed (the DeepSpeed op-builder way).

An isolated ``pip install`` (pip's default, e.g. ``pip install git+...``) has no torch at build time, so the wheel
it makes holds no compiled extension; a wheel may also be copied to a machine whose torch does not match. The
wheel therefore carries the C++ sources as package data (``drmm_kernels/_csrc/``, copied from csrc/ by setup.py),
and the first call that needs the ``cpu`` backend compiles them with ``torch.utils.cpp_extension.load`` into the
torch extensions cache (``$TORCH_EXTENSIONS_DIR`` or ``~/.cache/torch_extensions``), for the CPU it runs on
(``-march=native`` unless ``DRMM_CPU_ARCH`` says otherwise). Later processes find the build there and only load it.

Switches: ``DRMM_JIT=0`` turns the build off (the ``cpu`` backend then reports why it is unavailable);
``DRMM_CPU_ARCH`` is the ``-march`` value (``native`` here; setup.py uses :data:`PORTABLE_ARCH` for wheels).
docs/kernels.md#installing explains the whole scheme.

This module imports neither torch nor the package at import time: setup.py loads it by path for the source list
and the compiler flags, so a wheel's extension and a first-use build are compiled the same way.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shlex
import shutil
import sys
import sysconfig
import warnings
from contextlib import contextmanager
from glob import glob
from typing import Iterator, List, Optional

MESSAGE = "building drmm_kernels C++ CPU kernels for this machine (first use only, about 1-2 minutes)..."
# A wheel must run on any x86-64-v3 (AVX2 + FMA) machine; see docs/kernels.md#installing.
PORTABLE_ARCH = "x86-64-v3"
LDFLAGS = ["-fopenmp"]
CPU_SOURCE_DIRS = ("cpu", "common")  # with csrc/schema.cpp, all a CPU-only build compiles or includes
_NAME = "drmm_kernels_cpu"  # the torch extension name (the .so file); the Python module inside is _C

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


class Unavailable(RuntimeError):
    """The kernels cannot be built or loaded here; the message is the reason (one line, with the fix)."""


def _flag_off(value: Optional[str]) -> bool:
    return (value or "").strip().lower() in ("0", "false", "no", "off")


def enabled() -> bool:
    """False when ``DRMM_JIT=0`` (or false/no/off)."""
    return not _flag_off(os.environ.get("DRMM_JIT"))


def default_arch(portable: bool) -> Optional[str]:
    """The ``-march`` value: ``DRMM_CPU_ARCH`` when set ('' or 'none': no -march flag), else ``native`` for a build
    on the machine that runs it, and :data:`PORTABLE_ARCH` (x86-64) or the compiler default (other CPUs) for a
    wheel that may be copied elsewhere."""
    arch = os.environ.get("DRMM_CPU_ARCH")
    if arch is not None:
        arch = arch.strip()
        return None if arch.lower() in ("", "none") else arch
    if not portable:
        return "native"
    return PORTABLE_ARCH if platform.machine().lower() in ("x86_64", "amd64") else None


def cxx_flags(arch: Optional[str]) -> List[str]:
    return ["-O3", "-fopenmp", "-DNDEBUG"] + ([f"-march={arch}"] if arch else [])


def cpu_sources(root: str) -> List[str]:
    """The C++ files of a CPU-only build under a csrc root: the op schemas and one file per op."""
    return [os.path.join(root, "schema.cpp")] + sorted(glob(os.path.join(root, CPU_SOURCE_DIRS[0], "*.cpp")))


def source_root() -> Optional[str]:
    """Where the C++ sources are: the copy inside an installed package, else csrc/ of a source checkout (editable
    installs), else None."""
    for root in (os.path.join(_PACKAGE_DIR, "_csrc"), os.path.join(os.path.dirname(_PACKAGE_DIR), "csrc")):
        if os.path.isfile(os.path.join(root, "schema.cpp")) and os.path.isdir(os.path.join(root, "cpu")):
            return root
    return None


def _use_pip_ninja() -> None:
    # The `ninja` wheel puts its binary next to the venv's python, which is not on PATH unless the venv is
    # activated (`.venv/bin/python script.py`); cpp_extension runs plain `ninja`.
    try:
        import ninja  # type: ignore[import-not-found]
    except Exception:
        return
    bin_dir = getattr(ninja, "BIN_DIR", None)
    path = os.environ.get("PATH", "")
    if bin_dir and os.path.isfile(os.path.join(bin_dir, "ninja")) and bin_dir not in path.split(os.pathsep):
        os.environ["PATH"] = bin_dir + (os.pathsep + path if path else "")


def missing_tools() -> List[str]:
    """What a build would need and is not here, each with its fix ([] when nothing is missing)."""
    missing = []
    cxx = os.environ.get("CXX", "c++")
    cxx_exe = (shlex.split(cxx) or [cxx])[0]
    if shutil.which(cxx_exe) is None:
        how = f"CXX={cxx!r}" if "CXX" in os.environ else "CXX unset"
        missing.append(f"no C++ compiler: `{cxx_exe}` not found ({how}; install g++ or point CXX at a compiler)")
    _use_pip_ninja()
    if shutil.which("ninja") is None:
        missing.append("no `ninja` build tool (pip install ninja)")
    include = sysconfig.get_paths().get("include") or ""
    if not os.path.isfile(os.path.join(include, "Python.h")):
        missing.append(f"no Python headers: {os.path.join(include, 'Python.h')} is missing (install python3-dev)")
    return missing


def _extensions_root() -> str:
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root:
        return root
    import torch
    from torch.utils import cpp_extension

    accel = f"cu{torch.version.cuda.replace('.', '')}" if torch.version.cuda else "cpu"
    return os.path.join(cpp_extension.get_default_build_root(), f"py{sys.version_info[0]}{sys.version_info[1]}_{accel}")


def build_directory(sources: List[str], cflags: List[str]) -> str:
    """One folder per (sources, flags, torch, Python): a build is reused only when all of them match, so a changed
    source or a new torch gets a fresh build instead of a stale or ABI-broken one."""
    import torch

    h = hashlib.sha256()
    for key in (torch.__version__, sys.version, " ".join(cflags + LDFLAGS)):
        h.update(key.encode() + b"\0")
    root = os.path.dirname(sources[0])
    for path in sorted(glob(os.path.join(root, "**", "*"), recursive=True)):
        if path.endswith((".cpp", ".h")):
            h.update(os.path.relpath(path, root).encode() + b"\0")
            with open(path, "rb") as f:
                h.update(f.read())
    return os.path.join(_extensions_root(), f"{_NAME}_{h.hexdigest()[:16]}")


@contextmanager
def _exclusive(directory: str) -> Iterator[None]:
    """An OS lock on the build folder (released if the holder dies), so concurrent first uses build once: the
    others wait, then find the library. Older torch guards its build with a lock *file* that a killed build leaves
    behind forever; under this lock nobody else is building, so such a leftover is removed."""
    try:
        import fcntl
    except ImportError:  # Windows: rely on cpp_extension's own lock
        yield
        return
    with open(os.path.join(directory, "drmm_build.lock"), "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            print(
                f"drmm_kernels: waiting for another process building the C++ CPU kernels in {directory}...",
                file=sys.stderr,
                flush=True,
            )
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            stale = os.path.join(directory, "lock")
            if os.path.exists(stale):
                os.remove(stale)
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def load():
    """Build (first use only) and import the CPU-only extension as ``drmm_kernels._C``; raise :class:`Unavailable`
    with the reason when it cannot be done."""
    if not enabled():
        raise Unavailable("building it on first use is turned off (DRMM_JIT=0)")
    root = source_root()
    if root is None:
        raise Unavailable(
            "the C++ sources are not installed (drmm_kernels/_csrc missing): reinstall drmm from a "
            "wheel or sdist made by this version's setup.py"
        )
    missing = missing_tools()
    if missing:
        raise Unavailable("cannot build it on first use: " + "; ".join(missing))
    import importlib.util

    from torch.utils import cpp_extension

    sources = cpu_sources(root)
    cflags = cxx_flags(default_arch(portable=False))
    directory = build_directory(sources, cflags)
    os.makedirs(directory, exist_ok=True)
    library = os.path.join(directory, _NAME + (".pyd" if sys.platform == "win32" else ".so"))
    failed = os.path.join(directory, "build_error.log")
    with _exclusive(directory):
        if os.path.exists(failed):
            raise Unavailable(
                f"its first-use build failed before (compiler output: {failed}; delete that file to retry)"
            )
        if not os.path.exists(library):
            print(MESSAGE, file=sys.stderr, flush=True)
        try:
            cpp_extension.load(
                name=_NAME,
                sources=sources,
                extra_cflags=cflags,
                extra_ldflags=LDFLAGS,
                extra_include_paths=[root],
                build_directory=directory,
                with_cuda=False,
                is_python_module=False,
                verbose=False,
            )
        except Exception as exc:
            with open(failed, "w") as f:
                f.write(f"{type(exc).__name__}: {exc}\n")
            raise Unavailable(
                f"its first-use build failed ({type(exc).__name__}; compiler output: {failed}; "
                "delete that file to retry)"
            ) from exc
    # The library is loaded (its ops are registered); import it as the package's _C, whose init is PyInit__C.
    spec = importlib.util.spec_from_file_location("drmm_kernels._C", library)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules["drmm_kernels._C"] = module
    package = sys.modules.get("drmm_kernels")
    if package is not None:
        setattr(package, "_C", module)
    return module


_warned = False


def warn_once(reason: str) -> None:
    """One warning per process that the C++ kernels are missing and what to do (not for DRMM_JIT=0, a choice)."""
    global _warned
    if _warned or not enabled():
        return
    _warned = True
    warnings.warn(
        f"drmm_kernels: the C++ CPU kernels are unavailable, CPU tensors use the slow reference backend: "
        f"{reason}. Fix that, or install with torch present (`pip install --no-build-isolation .`); "
        "DRMM_JIT=0 silences this.",
        RuntimeWarning,
        stacklevel=3,
    )
