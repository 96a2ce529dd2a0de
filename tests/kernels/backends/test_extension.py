"""The compiled extension: built, loadable, its CPU kernels registered (required under `make test`)."""

import os

import pytest
import torch

import drmm_kernels as dk
from drmm_kernels import dispatch

REQUIRED = os.environ.get("DRMM_REQUIRE_EXTENSION") == "1"
CPU_OPS = (
    "conv_relu_pool",
    "bn_pool",
    "render",
    "gather_conv",
    "render_wgrad",
    "masked_values",
    "unpool",
    "batch_stats",
)


def test_extension_state_is_reported():
    status = dk.available_backends()["cpu"]
    if dispatch.load_extension():
        assert status.available and "C++" in status.reason
    else:
        assert not status.available and "drmm_kernels._C" in status.reason
        assert not REQUIRED, f"make test must build the extension: {status.reason}"


@pytest.mark.skipif(not REQUIRED and not dispatch.load_extension(), reason="extension not built (outside make test)")
def test_extension_registers_cpu_kernels():
    assert dispatch.load_extension(), dispatch.extension_error()
    for op in CPU_OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"drmm_C::{op}", "CPU"), op
    # Every primitive of the cpu backend is its own, not the reference fallback.
    for op in dispatch.PRIMITIVES:
        assert dispatch.primitive_source("cpu", op) == "cpu", op
    # auto picks the compiled backend for CPU tensors.
    assert dispatch.resolve(torch.device("cpu")) == "cpu"


def test_import_without_extension_falls_back_to_reference(tmp_path):
    import subprocess
    import sys

    # Shadow drmm_kernels._C with a module that fails to import: the package must still work.
    code = (
        "import sys, types, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name == 'drmm_kernels._C': raise ImportError('blocked for the test')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import torch, drmm_kernels as dk\n"
        "st = dk.available_backends()\n"
        "assert not st['cpu'].available and 'blocked for the test' in st['cpu'].reason, st\n"
        "y, sw = dk.conv_relu_pool(torch.randn(1, 1, 4, 4), torch.ones(1, 1, 1, 1))\n"
        "assert y.shape == (1, 1, 2, 2)\n"
        "try:\n"
        "    dk.set_backend('cpu')\n"
        "except RuntimeError as e:\n"
        "    assert 'not available' in str(e); print('ok')\n"
    )
    # DRMM_JIT=0: without it the missing extension would be compiled on first use (tests/test_install.py).
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ, DRMM_JIT="0")
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
