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
from . import reference

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


def _native(t: Tensor) -> bool:
    return t.dtype in _DTYPES and t.is_cuda


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
    if not _native(x):
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
    y, sw = torch.ops.drmm_C.conv_relu_pool(x, weight, scale, shift, stride, padding, pool, float(negative_slope))
    return y, sw


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
    if not _native(mu):
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
        mu, switches, weight, scale, stride, padding, pool, int(out_h), int(out_w), float(negative_slope)
    )


def gather_conv(*, src: Tensor, weight: Tensor, switches: Tensor, stride: int, padding: int, pool: int) -> Tensor:
    if not _native(src):
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
    if not _native(src):
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
        src, mu, switches, scale, stride, padding, pool, float(negative_slope), int(kernel_h), int(kernel_w)
    )


def bn_pool(*, z: Tensor, scale: Tensor, shift: Tensor, pool: int, negative_slope: float) -> Tuple[Tensor, Tensor]:
    if not _native(z):
        return reference.bn_pool(z=z, scale=scale, shift=shift, pool=pool, negative_slope=negative_slope)
    y, sw = torch.ops.drmm_C.bn_pool(z, scale, shift, pool, float(negative_slope))
    return y, sw


def masked_values(*, mu: Tensor, switches: Tensor, scale: Optional[Tensor], negative_slope: float) -> Tensor:
    # A dense elementwise pass (pool=1 backward): PyTorch's own CUDA kernels are already bandwidth-bound here.
    return reference.masked_values(mu=mu, switches=switches, scale=scale, negative_slope=negative_slope)


def unpool(*, values: Tensor, switches: Tensor, pool: int, out_h: int, out_w: int) -> Tensor:
    # One zero fill and one scatter: PyTorch's CUDA kernels are bandwidth-bound here too.
    return reference.unpool(values=values, switches=switches, pool=pool, out_h=out_h, out_w=out_w)


def batch_stats(*, z: Tensor) -> Tuple[Tensor, Tensor]:
    # ATen's CUDA batch-norm statistics kernel.
    return reference.batch_stats(z=z)
