"""The ``cpu`` backend: C++ kernels in ``drmm_kernels._C`` (csrc/cpu/<op>_kernel.cpp), registered as ``drmm_C::*``
ops. drmm_kernels/dispatch.py imports this module only once the extension has loaded."""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from . import _C  # noqa: F401  (registers the drmm_C ops; drmm_kernels/dispatch.py reports a missing build)
from . import reference
from .contract import conv_size
from .dispatch import native_or_reference

_DTYPES = (torch.float32, torch.float64)


def status() -> Tuple[bool, str]:
    return True, "C++ kernels (drmm_kernels._C); float32/float64, other dtypes via reference"


def supports(device: torch.device) -> bool:
    return device.type == "cpu"


# The C++ kernels cover float32/float64 and every max_pool2d window (the switch-sparse render, gather and weight
# gradient place each window's value at its recorded position, so overlapping windows add up); the reference
# computes any other dtype.
_native = native_or_reference(lambda t: t.dtype in _DTYPES)


# The drmm_C ops are called positionally, their arguments in schema order
# (tests/kernels/test_schema.py checks every call here against the schema): torch's argument parser takes
# microseconds longer for keywords.


@_native
def conv_relu_pool(
    *,
    x: Tensor,
    weight: Tensor,
    scale: Optional[Tensor],
    shift: Optional[Tensor],
    stride: int,
    padding: int,
    pool: int,
    pool_stride: int,
    pool_padding: int,
    ceil_mode: bool,
    negative_slope: float,
) -> Tuple[Tensor, Tensor]:
    return torch.ops.drmm_C.conv_relu_pool(
        x, weight, scale, shift, stride, padding, pool, pool_stride, pool_padding, ceil_mode, negative_slope
    )


@_native
def bn_pool(
    *,
    z: Tensor,
    scale: Tensor,
    shift: Tensor,
    pool: int,
    pool_stride: int,
    pool_padding: int,
    ceil_mode: bool,
    negative_slope: float,
) -> Tuple[Tensor, Tensor]:
    return torch.ops.drmm_C.bn_pool(z, scale, shift, pool, pool_stride, pool_padding, ceil_mode, negative_slope)


@_native
def render(
    *,
    mu: Tensor,
    switches: Tensor,
    weight: Tensor,
    scale: Optional[Tensor],
    stride: int,
    padding: int,
    pool: int,
    pool_stride: int,
    pool_padding: int,
    ceil_mode: bool,
    out_h: int,
    out_w: int,
    negative_slope: float,
) -> Tensor:
    if pool > 1 and mu.shape[0] == 1:
        # One sample: the switch-sparse kernel splits the batch across threads, so it would run on one; ATen's dense
        # transposed convolution of the unpooled map uses them all (2x faster on VGG's layers at 224 px, 2 threads).
        window = dict(pool=pool, pool_stride=pool_stride, pool_padding=pool_padding, ceil_mode=ceil_mode)
        hc, wc = conv_size((int(out_h), int(out_w)), weight.shape[-2:], stride, padding)
        masked = masked_values(mu=mu, switches=switches, scale=scale, negative_slope=negative_slope)
        try:
            g = unpool(values=masked, switches=switches, out_h=hc, out_w=wc, **window)
        except RuntimeError as e:  # bad switches: name the op the caller called
            raise RuntimeError(str(e).replace("drmm_kernels.unpool:", "drmm_kernels.render:", 1)) from None
        return reference.transposed_conv(g, weight, stride, padding, (int(out_h), int(out_w)))
    return torch.ops.drmm_C.render(
        mu,
        switches,
        weight,
        scale,
        stride,
        padding,
        pool,
        pool_stride,
        pool_padding,
        ceil_mode,
        int(out_h),
        int(out_w),
        negative_slope,
    )


@_native
def gather_conv(
    *,
    src: Tensor,
    weight: Tensor,
    switches: Tensor,
    stride: int,
    padding: int,
    pool: int,
    pool_stride: int,
    pool_padding: int,
    ceil_mode: bool,
) -> Tensor:
    return torch.ops.drmm_C.gather_conv(
        src, weight, switches, stride, padding, pool, pool_stride, pool_padding, ceil_mode
    )


@_native
def render_wgrad(
    *,
    src: Tensor,
    mu: Tensor,
    switches: Tensor,
    scale: Optional[Tensor],
    stride: int,
    padding: int,
    pool: int,
    pool_stride: int,
    pool_padding: int,
    ceil_mode: bool,
    negative_slope: float,
    kernel_h: int,
    kernel_w: int,
) -> Tensor:
    return torch.ops.drmm_C.render_wgrad(
        src,
        mu,
        switches,
        scale,
        stride,
        padding,
        pool,
        pool_stride,
        pool_padding,
        ceil_mode,
        negative_slope,
        int(kernel_h),
        int(kernel_w),
    )


@_native
def masked_values(*, mu: Tensor, switches: Tensor, scale: Optional[Tensor], negative_slope: float) -> Tensor:
    return torch.ops.drmm_C.masked_values(mu, switches, scale, negative_slope)


@_native
def unpool(
    *,
    values: Tensor,
    switches: Tensor,
    pool: int,
    pool_stride: int,
    pool_padding: int,
    ceil_mode: bool,
    out_h: int,
    out_w: int,
) -> Tensor:
    return torch.ops.drmm_C.unpool(values, switches, pool, pool_stride, pool_padding, ceil_mode, int(out_h), int(out_w))


def batch_stats(*, z: Tensor) -> Tuple[Tensor, Tensor]:
    # One pass, shifted sums in double per channel (faster than ATen's Welford update: the BN rows of
    # bench/results/cpu_ops.md); NCHW only.
    if z.dtype not in _DTYPES or not z.is_contiguous():
        return reference.batch_stats(z=z)
    return torch.ops.drmm_C.batch_stats(z)
