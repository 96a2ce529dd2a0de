"""Build script for drmm / drmm_kernels and the compiled extension ``drmm_kernels._C``.

Environment switches (flash-attention style):
  DRMM_SKIP_CUDA_BUILD=1   never compile csrc/cuda (C++ CPU kernels only)
  DRMM_FORCE_CUDA=1        compile csrc/cuda even if torch/nvcc detection says no
  DRMM_NO_EXTENSION=1      build no extension (pure-Python install; the CPU kernels are then built on first use,
                           drmm_kernels/jit.py)
  DRMM_CPU_ARCH=<flag>     -march value for the CPU kernels (default: "x86-64-v3" for a wheel, which may be
                           installed on another machine, "native" for an editable build; "none": no -march)
  TORCH_CUDA_ARCH_LIST     defaults to "9.0a" when no GPU is visible
  MAX_JOBS                 parallel compile jobs for ninja (default: all cores)
"""

import glob
import importlib.util
import os
import shutil
import sys

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

ROOT = os.path.dirname(os.path.abspath(__file__))


def _load_jit():
    # drmm_kernels/jit.py imports no torch at import time: one definition of the CPU sources and flags for this
    # build and for the build on first use.
    spec = importlib.util.spec_from_file_location("_drmm_jit", os.path.join(ROOT, "drmm_kernels", "jit.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


jit = _load_jit()
# A wheel (`pip install .`, `pip wheel`) may be cached or copied to another machine: portable -march. An editable
# or in-place build runs where it was compiled: native (docs/kernels.md#installing).
PORTABLE = "bdist_wheel" in sys.argv


class BuildPyWithSources(build_py):
    """Copies the C++ CPU sources into the package (drmm_kernels/_csrc), so an install without a compiled
    extension (no torch at build time, DRMM_NO_EXTENSION=1) can build it on first use."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):  # an editable install finds csrc/ in the checkout
            return
        target = os.path.join(self.build_lib, "drmm_kernels", "_csrc")
        for rel in jit.CPU_SOURCE_DIRS:
            shutil.rmtree(os.path.join(target, rel), ignore_errors=True)
            shutil.copytree(os.path.join(ROOT, "csrc", rel), os.path.join(target, rel))
        shutil.copy2(os.path.join(ROOT, "csrc", "schema.cpp"), target)


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def extensions():
    cmdclass = {"build_py": BuildPyWithSources}
    if _flag("DRMM_NO_EXTENSION"):
        return [], cmdclass
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        # pip's default build isolation hides torch (and this line, without -v); the package still works:
        # drmm_kernels/jit.py compiles the CPU kernels on first use from the sources copied by build_py.
        print(
            "drmm: torch is not installed in the build environment; building without drmm_kernels._C: the C++ "
            "CPU kernels will be built on first use (or install torch first and use "
            "`pip install --no-build-isolation .`)"
        )
        return [], cmdclass

    # One file per op and device (csrc/cpu/<op>_kernel.cpp, csrc/cuda/<op>_kernel.cu); csrc/schema.cpp declares the
    # ops, and csrc/cuda/torch_glue.cpp is the only torch-facing file of the CUDA build.
    cpu_sources = [os.path.relpath(p, ROOT) for p in jit.cpu_sources(os.path.join(ROOT, "csrc"))]
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu")) + ["csrc/cuda/torch_glue.cpp"]
    with_cuda = False
    if cuda_sources and not _flag("DRMM_SKIP_CUDA_BUILD"):
        with_cuda = _flag("DRMM_FORCE_CUDA") or (torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None)
    if with_cuda and not torch.cuda.is_available():
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0a")
    os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 2))

    arch = jit.default_arch(portable=PORTABLE)
    cxx = jit.cxx_flags(arch)
    define_macros = [("WITH_CUDA", None)] if with_cuda else []
    sources = cpu_sources
    kwargs = dict(
        name="drmm_kernels._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        define_macros=define_macros,
        extra_link_args=list(jit.LDFLAGS),
    )
    if with_cuda:
        nvcc = ["-O3", "-DNDEBUG", "--threads", "4", "-Xptxas=-v", "-lineinfo", "--expt-relaxed-constexpr"]
        kwargs["sources"] = sources + cuda_sources
        ext = cpp_extension.CUDAExtension(extra_compile_args={"cxx": cxx, "nvcc": nvcc}, **kwargs)
    else:
        ext = cpp_extension.CppExtension(extra_compile_args={"cxx": cxx}, **kwargs)
    print(
        f"drmm: building drmm_kernels._C ({'CPU + CUDA' if with_cuda else 'CPU only'}; torch {torch.__version__}; "
        f"-march={arch or 'compiler default'})"
    )
    cmdclass["build_ext"] = cpp_extension.BuildExtension.with_options(use_ninja=True)
    return [ext], cmdclass


ext_modules, cmdclass = extensions()

setup(
    packages=find_packages(include=["drmm", "drmm.*", "drmm_kernels", "drmm_kernels.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
