"""The ``cuda`` backend: CUDA C++ kernels in ``drmm_kernels._C`` (csrc/cuda)."""

from __future__ import annotations

from typing import Tuple

import torch

from . import _extension


def status() -> Tuple[bool, str]:
    if not _extension.load():
        return False, _extension.error()
    if not _extension.has_cuda_kernels():
        return False, "drmm_kernels._C was built without CUDA sources (CPU-only torch, no nvcc, or DRMM_SKIP_CUDA_BUILD=1)"
    if not torch.cuda.is_available():
        return False, "built with CUDA kernels, but no CUDA device is visible"
    return True, "CUDA C++ kernels in drmm_kernels._C"


def supports(device: torch.device) -> bool:
    return device.type == "cuda"
