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


# The drmm_C ops are called positionally, their arguments in schema order (tests/test_schema.py checks every call
# here against the schema): torch's argument parser takes microseconds longer for keywords.


def conv_relu_pool(
    *,
    x: Tensor,
    weight: Tensor,
    scale: Optional[Tensor],
    shift: Optional[Tensor],
    stride: int,
    padding: int,
    pool: int,
    negative_slope: float,
) -> Tuple[Tensor, Tensor]:
    if not _native(x, weight, scale, shift):
        return reference.conv_relu_pool(
            x=x,
            weight=weight,
            scale=scale,
            shift=shift,
            stride=stride,
            padding=padding,
            pool=pool,
            negative_slope=negative_slope,
        )
    return torch.ops.drmm_C.conv_relu_pool(x, weight, scale, shift, stride, padding, pool, negative_slope)


def bn_pool(*, z: Tensor, scale: Tensor, shift: Tensor, pool: int, negative_slope: float) -> Tuple[Tensor, Tensor]:
    if not _native(z, scale, shift):
        return reference.bn_pool(z=z, scale=scale, shift=shift, pool=pool, negative_slope=negative_slope)
    return torch.ops.drmm_C.bn_pool(z, scale, shift, pool, negative_slope)


def render(
    *,
    mu: Tensor,
    switches: Tensor,
    weight: Tensor,
    scale: Optional[Tensor],
    stride: int,
    padding: int,
    pool: int,
    out_h: int,
    out_w: int,
    negative_slope: float,
) -> Tensor:
    if not _native(mu, weight, scale):
        return reference.render(
            mu=mu,
            switches=switches,
            weight=weight,
            scale=scale,
            stride=stride,
            padding=padding,
            pool=pool,
            out_h=out_h,
            out_w=out_w,
            negative_slope=negative_slope,
        )
    return torch.ops.drmm_C.render(
        mu, switches, weight, scale, stride, padding, pool, int(out_h), int(out_w), negative_slope
    )


def gather_conv(*, src: Tensor, weight: Tensor, switches: Tensor, stride: int, padding: int, pool: int) -> Tensor:
    if not _native(src, weight):
        return reference.gather_conv(
            src=src, weight=weight, switches=switches, stride=stride, padding=padding, pool=pool
        )
    return torch.ops.drmm_C.gather_conv(src, weight, switches, stride, padding, pool)


def render_wgrad(
    *,
    src: Tensor,
    mu: Tensor,
    switches: Tensor,
    scale: Optional[Tensor],
    stride: int,
    padding: int,
    pool: int,
    negative_slope: float,
    kernel_h: int,
    kernel_w: int,
) -> Tensor:
    if not _native(src, mu, scale):
        return reference.render_wgrad(
            src=src,
            mu=mu,
            switches=switches,
            scale=scale,
            stride=stride,
            padding=padding,
            pool=pool,
            negative_slope=negative_slope,
            kernel_h=kernel_h,
            kernel_w=kernel_w,
        )
    return torch.ops.drmm_C.render_wgrad(
        src, mu, switches, scale, stride, padding, pool, negative_slope, int(kernel_h), int(kernel_w)
    )


def masked_values(*, mu: Tensor, switches: Tensor, scale: Optional[Tensor], negative_slope: float) -> Tensor:
    if not _native(mu, scale):
        return reference.masked_values(mu=mu, switches=switches, scale=scale, negative_slope=negative_slope)
    return torch.ops.drmm_C.masked_values(mu, switches, scale, negative_slope)


def unpool(*, values: Tensor, switches: Tensor, pool: int, out_h: int, out_w: int) -> Tensor:
    if not _native(values):
        return reference.unpool(values=values, switches=switches, pool=pool, out_h=out_h, out_w=out_w)
    return torch.ops.drmm_C.unpool(values, switches, pool, int(out_h), int(out_w))


def batch_stats(*, z: Tensor) -> Tuple[Tensor, Tensor]:
    # One pass, shifted sums in double per channel (faster than ATen's Welford update: the BN rows of
    # bench/results/cpu_ops.md); NCHW only.
    if not _native(z) or not z.is_contiguous():
        return reference.batch_stats(z=z)
    return torch.ops.drmm_C.batch_stats(z)
