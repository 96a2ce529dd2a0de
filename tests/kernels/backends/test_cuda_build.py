"""CUDA checks that need no GPU: the csrc/cuda sources compile for sm_90a without register spills, stay
torch-free, and (with a CUDA torch and nvcc, as in CI) drmm_kernels._C carries the CUDA kernels.

The ptxas report of every kernel is saved to ``build/ptxas/<file>.log`` (override with
``DRMM_PTXAS_LOG_DIR``) so register and shared-memory figures can be read after a CI run.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[3]
CUDA_DIR = ROOT / "csrc" / "cuda"
CU_FILES = sorted(CUDA_DIR.glob("*.cu"))
ARCH = "sm_90a"

# Kernels whose spills would cost real performance (the implicit-GEMM main loops and the exact paths).
MAIN_KERNELS = (
    "crp_tc_kernel",
    "crp_simple_kernel",
    "bn_pool_kernel",
    "render_tc_kernel",
    "render_simple_kernel",
    "wgrad_tc_kernel",
    "wgrad_simple_kernel",
    "wgrad_reduce_kernel",
)


def _nvcc():
    cands = []
    if os.environ.get("CUDA_HOME"):
        cands.append(os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc"))
    cands += ["/usr/local/cuda/bin/nvcc", shutil.which("nvcc")]
    for c in cands:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


NVCC = _nvcc()
needs_nvcc = pytest.mark.skipif(
    NVCC is None,
    reason="nvcc not found (CUDA_HOME/bin, /usr/local/cuda/bin, PATH): the CUDA compile check needs the CUDA toolkit",
)

_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\w+)'")
_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")


def parse_ptxas(log: str):
    """{mangled kernel name: dict(regs, stack, spill_stores, spill_loads)} from `-Xptxas -v` output."""
    kernels, current = {}, None
    for line in log.splitlines():
        m = _ENTRY.search(line)
        if m:
            current = m.group(1)
            kernels[current] = {}
            continue
        if current is None:
            continue
        m = _SPILL.search(line)
        if m:
            kernels[current].update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        m = _REGS.search(line)
        if m:
            kernels[current]["regs"] = int(m.group(1))
    return kernels


def _compile(cu: Path, out_dir: str):
    obj = os.path.join(out_dir, cu.stem + ".o")
    cmd = [
        NVCC,
        "-c",
        "-std=c++17",
        "-O3",
        "-DNDEBUG",
        "--expt-relaxed-constexpr",
        f"-gencode=arch=compute_{ARCH[3:]},code={ARCH}",
        "-Xptxas",
        "-v",
        "-I",
        str(ROOT / "csrc"),
        str(cu),
        "-o",
        obj,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    return cu.name, proc.returncode, proc.stdout + proc.stderr, " ".join(cmd)


@pytest.fixture(scope="module")
def ptxas_reports():
    """Compile every .cu once (two at a time: CI has two cores) and save the ptxas logs."""
    log_dir = Path(os.environ.get("DRMM_PTXAS_LOG_DIR", ROOT / "build" / "ptxas"))
    log_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda cu: _compile(cu, tmp), CU_FILES))
    reports = {}
    for name, rc, log, cmd in results:
        (log_dir / f"{Path(name).stem}.log").write_text(f"$ {cmd}\n{log}")
        reports[name] = (rc, log, parse_ptxas(log))
    return reports


def test_cuda_sources_exist():
    assert CU_FILES, f"no .cu files under {CUDA_DIR}"


def test_cuda_sources_are_torch_free():
    # The .cu/.cuh/.h files compile with nvcc alone (fast, CPU-torch friendly); all ATen glue is in torch_glue.cpp.
    bad = []
    for f in sorted(CUDA_DIR.glob("*")):
        if f.suffix not in (".cu", ".cuh", ".h"):
            continue
        for i, line in enumerate(f.read_text().splitlines(), 1):
            if re.match(r"\s*#\s*include\s*[<\"](torch|ATen|c10|pybind11)/", line):
                bad.append(f"{f.name}:{i}: {line.strip()}")
    assert not bad, "torch headers in csrc/cuda:\n" + "\n".join(bad)


@needs_nvcc
@pytest.mark.parametrize("cu", [f.name for f in CU_FILES])
def test_compiles_without_spills(ptxas_reports, cu):
    rc, log, kernels = ptxas_reports[cu]
    assert rc == 0, f"nvcc failed on {cu}:\n{log[-4000:]}"
    assert kernels, f"no kernels found in the ptxas report of {cu}:\n{log[-2000:]}"
    for name, info in kernels.items():
        assert "spill_stores" in info, f"{name}: no spill line in the ptxas report"
        if any(k in name for k in MAIN_KERNELS):
            assert info["spill_stores"] == 0 and info["spill_loads"] == 0, (
                f"{cu}: {name} spills registers ({info}); see build/ptxas/{Path(cu).stem}.log"
            )


@needs_nvcc
def test_main_kernels_present(ptxas_reports):
    names = " ".join(n for _, _, ks in ptxas_reports.values() for n in ks)
    missing = [k for k in MAIN_KERNELS if k not in names]
    assert not missing, f"kernels missing from the sm_90a build: {missing}"


def _cuda_build_expected() -> str:
    """Empty when this environment must have built the CUDA kernels, else why not."""
    if torch.version.cuda is None:
        return "torch is a CPU-only build"
    if NVCC is None:
        return "nvcc not found"
    if os.environ.get("DRMM_SKIP_CUDA_BUILD", "0").strip().lower() in ("1", "true", "yes", "on"):
        return "DRMM_SKIP_CUDA_BUILD is set"
    return ""


def test_extension_built_with_cuda():
    why = _cuda_build_expected()
    if why:
        pytest.skip(f"CUDA kernels are not expected here: {why}")
    from drmm_kernels import dispatch

    assert dispatch.load_extension(), dispatch.extension_error()
    assert torch.ops.drmm_C.built_with_cuda(), (
        "torch is a CUDA build and nvcc is present, but drmm_kernels._C was built without csrc/cuda (run `make build`)"
    )
    for op in ("conv_relu_pool", "bn_pool", "render", "gather_conv", "render_wgrad"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"drmm_C::{op}", "CUDA"), (
            f"drmm_C::{op} has no CUDA kernel registered"
        )


def test_cuda_backend_reports_status():
    from drmm_kernels import dispatch

    st = dispatch.status("cuda")
    if not torch.cuda.is_available():
        assert not st.available and st.reason
    if not dispatch.load_extension():
        pytest.skip(f"the cuda backend module needs the extension: {dispatch.extension_error()}")
    from drmm_kernels import cuda as cuda_backend

    # The CUDA kernels cover the fused forward and the top-down pass; the bandwidth-bound rest is the reference's,
    # and primitive_source says so (a forwarding wrapper would make it answer "cuda").
    by_reference = {"masked_values", "unpool", "batch_stats"}
    for prim in dispatch.PRIMITIVES:
        assert callable(dispatch.primitive("cuda", prim)), prim
        assert hasattr(cuda_backend, prim) == (prim not in by_reference), prim
        assert dispatch.primitive_source("cuda", prim) == ("reference" if prim in by_reference else "cuda"), prim
