"""The ``cuda`` backend: CUDA C++ kernels in ``drmm_kernels._C`` (csrc/cuda/<op>_kernel.cu).

Each primitive has the keyword-only signature of drmm_kernels/schema.py and calls the ``drmm_C::*`` op, whose
CUDA kernel is registered in csrc/cuda/torch_glue.cpp. drmm_kernels/dispatch.py imports this module only
once the extension has loaded. fp16/bf16 (and fp32 when
``torch.backends.cudnn.allow_tf32`` is on, as for ``F.conv2d``) run on tensor cores through WMMA;
fp64 and fp32 with TF32 off run exact CUDA-core kernels. Any other dtype falls back to ``reference``.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from . import _C  # noqa: F401  (registers the drmm_C ops; drmm_kernels/dispatch.py reports a missing build)
from .dispatch import native_or_reference

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def status() -> Tuple[bool, str]:
    if not torch.ops.drmm_C.built_with_cuda():
        return (
            False,
            "drmm_kernels._C was built without CUDA sources (CPU-only torch, no nvcc, or DRMM_SKIP_CUDA_BUILD=1)",
        )
    if not torch.cuda.is_available():
        return False, "built with CUDA kernels, but no CUDA device is visible"
    return True, "CUDA C++ kernels in drmm_kernels._C"


def supports(device: torch.device) -> bool:
    return device.type == "cuda"


# fp16/bf16/fp32/fp64 run here; the reference computes any other dtype.
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
    y, sw = torch.ops.drmm_C.conv_relu_pool(
        x, weight, scale, shift, stride, padding, pool, pool_stride, pool_padding, ceil_mode, float(negative_slope)
    )
    return y, sw


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
        float(negative_slope),
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
        float(negative_slope),
        int(kernel_h),
        int(kernel_w),
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
    y, sw = torch.ops.drmm_C.bn_pool(z, scale, shift, pool, pool_stride, pool_padding, ceil_mode, float(negative_slope))
    return y, sw


# masked_values, unpool and batch_stats are left to the reference (drmm_kernels/dispatch.py falls back to it for a
# primitive a backend lacks): a dense elementwise pass, one zero fill plus a scatter, and ATen's batch-norm
# statistics kernel are already bandwidth-bound in PyTorch's own CUDA kernels.
