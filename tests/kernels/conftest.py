"""Fixtures of the kernel tests. Its folder is on sys.path (pytest's rootdir-less conftest), so tests in
tests/kernels/ops and tests/kernels/backends import the shared case modules (op_cases, cpu_cases, ...) by name."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _exact_fp32_for_small_triton_cases(request):
    """The small Triton cases compare fp32 at 1e-4, so TF32 (which the kernels follow from cuDNN's flag) is off
    for them on a GPU; the realistic-shape ``gpu`` tests keep the default and their wider tolerance."""
    if not request.node.get_closest_marker("triton") or request.node.get_closest_marker("gpu"):
        yield
        return
    before = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = before
