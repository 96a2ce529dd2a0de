"""Build script for drmm / drmm_kernels and the compiled extension ``drmm_kernels._C``.

Environment switches (flash-attention style):
  DRMM_SKIP_CUDA_BUILD=1   never compile csrc/cuda (C++ CPU kernels only)
  DRMM_FORCE_CUDA=1        compile csrc/cuda even if torch/nvcc detection says no
  DRMM_NO_EXTENSION=1      build no extension at all (pure-Python install, reference backend)
  DRMM_CPU_ARCH=<flag>     -march value for the CPU kernels (default "native": the extension is
                           built on the machine that runs it; use e.g. "x86-64-v3" for portable wheels)
  TORCH_CUDA_ARCH_LIST     defaults to "9.0a" when no GPU is visible
  MAX_JOBS                 parallel compile jobs for ninja (default: all cores)
"""

import glob
import os

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def extensions():
    if _flag("DRMM_NO_EXTENSION"):
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        print("drmm: torch is not installed in the build environment; building without drmm_kernels._C "
              "(install torch first and use `pip install --no-build-isolation .` to get the C++ kernels)")
        return [], {}

    # One file per op and device (csrc/cpu/<op>_kernel.cpp, csrc/cuda/<op>_kernel.cu); csrc/schema.cpp declares the
    # ops, and csrc/cuda/torch_glue.cpp is the only torch-facing file of the CUDA build.
    cpu_sources = sorted(glob.glob("csrc/cpu/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu")) + ["csrc/cuda/torch_glue.cpp"]
    with_cuda = False
    if cuda_sources and not _flag("DRMM_SKIP_CUDA_BUILD"):
        with_cuda = _flag("DRMM_FORCE_CUDA") or (torch.version.cuda is not None
                                                 and cpp_extension.CUDA_HOME is not None)
    if with_cuda and not torch.cuda.is_available():
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0a")
    os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 2))

    arch = os.environ.get("DRMM_CPU_ARCH", "native")
    cxx = ["-O3", "-fopenmp", f"-march={arch}", "-DNDEBUG"]
    define_macros = [("WITH_CUDA", None)] if with_cuda else []
    sources = ["csrc/schema.cpp"] + cpu_sources
    kwargs = dict(name="drmm_kernels._C", sources=sources, include_dirs=[os.path.join(ROOT, "csrc")],
                  define_macros=define_macros, extra_link_args=["-fopenmp"])
    if with_cuda:
        nvcc = ["-O3", "-DNDEBUG", "--threads", "4", "-Xptxas=-v", "-lineinfo",
                "--expt-relaxed-constexpr"]
        kwargs["sources"] = sources + cuda_sources
        ext = cpp_extension.CUDAExtension(extra_compile_args={"cxx": cxx, "nvcc": nvcc}, **kwargs)
    else:
        ext = cpp_extension.CppExtension(extra_compile_args={"cxx": cxx}, **kwargs)
    print(f"drmm: building drmm_kernels._C ({'CPU + CUDA' if with_cuda else 'CPU only'}; torch {torch.__version__})")
    build = cpp_extension.BuildExtension.with_options(use_ninja=True)
    return [ext], {"build_ext": build}


ext_modules, cmdclass = extensions()

setup(
    packages=find_packages(include=["drmm", "drmm.*", "drmm_kernels", "drmm_kernels.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
