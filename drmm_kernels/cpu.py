"""The ``cpu`` backend: C++ kernels in ``drmm_kernels._C`` (csrc/cpu/<op>_kernel.cpp), registered as ``drmm_C::*``
ops. drmm_kernels/dispatch.py imports this module only once the extension has loaded."""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from . import _C  # noqa: F401  (registers the drmm_C ops; drmm_kernels/dispatch.py reports a missing build)
from . import reference

_DTYPES = (torch.float32, torch.float64)

def status() -> Tuple[bool, str]:
    return True, "C++ kernels (drmm_kernels._C); float32/float64, other dtypes via reference"


def supports(device: torch.device) -> bool:
    return device.type == "cpu"


def _native(*tensors: Optional[Tensor]) -> bool:
    """The C++ kernels cover float32/float64; anything else goes to the reference."""
    return all(t is None or t.dtype in _DTYPES for t in tensors)


def conv_relu_pool(x: Tensor, weight: Tensor, scale: Optional[Tensor], shift: Optional[Tensor], stride: int,
                   padding: int, pool: int, negative_slope: float) -> Tuple[Tensor, Tensor]:
    if not _native(x, weight, scale, shift):
        return reference.conv_relu_pool(x, weight, scale, shift, stride, padding, pool, negative_slope)
    return torch.ops.drmm_C.conv_relu_pool(x, weight, scale, shift, stride, padding, pool, negative_slope)


def bn_pool(z: Tensor, scale: Tensor, shift: Tensor, pool: int, negative_slope: float) -> Tuple[Tensor, Tensor]:
    if not _native(z, scale, shift):
        return reference.bn_pool(z, scale, shift, pool, negative_slope)
    return torch.ops.drmm_C.bn_pool(z, scale, shift, pool, negative_slope)


def render(mu: Tensor, switches: Tensor, weight: Tensor, scale: Optional[Tensor], stride: int, padding: int,
           pool: int, out_hw: Tuple[int, int], negative_slope: float) -> Tensor:
    if not _native(mu, weight, scale):
        return reference.render(mu, switches, weight, scale, stride, padding, pool, out_hw, negative_slope)
    return torch.ops.drmm_C.render(mu, switches, weight, scale, stride, padding, pool, int(out_hw[0]),
                                   int(out_hw[1]), negative_slope)


def gather_conv(src: Tensor, weight: Tensor, switches: Tensor, stride: int, padding: int, pool: int) -> Tensor:
    if not _native(src, weight):
        return reference.gather_conv(src, weight, switches, stride, padding, pool)
    return torch.ops.drmm_C.gather_conv(src, weight, switches, stride, padding, pool)


def render_wgrad(src: Tensor, mu: Tensor, switches: Tensor, scale: Optional[Tensor], stride: int, padding: int,
                 pool: int, negative_slope: float, kernel_hw: Tuple[int, int]) -> Tensor:
    if not _native(src, mu, scale):
        return reference.render_wgrad(src, mu, switches, scale, stride, padding, pool, negative_slope, kernel_hw)
    return torch.ops.drmm_C.render_wgrad(src, mu, switches, scale, stride, padding, pool, negative_slope,
                                         int(kernel_hw[0]), int(kernel_hw[1]))


def masked_values(mu: Tensor, switches: Tensor, scale: Optional[Tensor], negative_slope: float) -> Tensor:
    if not _native(mu, mu, scale):
        return reference.masked_values(mu, switches, scale, negative_slope)
    return torch.ops.drmm_C.masked_values(mu, switches, scale, negative_slope)


def unpool(values: Tensor, switches: Tensor, pool: int, conv_hw: Tuple[int, int]) -> Tensor:
    if not _native(values):
        return reference.unpool(values, switches, pool, conv_hw)
    return torch.ops.drmm_C.unpool(values, switches, pool, int(conv_hw[0]), int(conv_hw[1]))


def batch_stats(z: Tensor) -> Tuple[Tensor, Tensor]:
    # One pass, shifted sums in double per channel (faster than ATen's Welford update: the BN rows of
    # bench/results/cpu_ops.md); NCHW only.
    if not _native(z) or not z.is_contiguous():
        return reference.batch_stats(z)
    return torch.ops.drmm_C.batch_stats(z)
