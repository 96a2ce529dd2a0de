"""The ``cpu`` backend: C++ kernels in ``drmm_kernels._C`` (csrc/cpu), registered as ``drmm_C::*`` ops."""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from . import _extension

_DTYPES = (torch.float32, torch.float64)


def status() -> Tuple[bool, str]:
    if not _extension.load():
        return False, _extension.error()
    return True, "C++ kernels (drmm_kernels._C, at::parallel_for); float32/float64, other dtypes via reference"


def supports(device: torch.device) -> bool:
    return device.type == "cpu"
