"""The ``triton`` backend (GPU; runs on CPU tensors under TRITON_INTERPRET=1).

Kernels live in one module per op, ``<op>_kernel.py``: ``conv_relu_pool_kernel`` (conv_relu_pool, and
gather_conv: the same GEMM read at the recorded offsets), ``render_kernel`` (render: the top-down pass, which
is also the input gradient), ``render_wgrad_kernel`` (render_wgrad) and ``conv_bn_relu_pool_kernel``
(bn_pool). They are imported on first use, so ``import drmm_kernels`` works without triton, and so
TRITON_INTERPRET is read when the kernels are defined (the interpreter decides at ``@triton.jit`` time).

conv_bn_relu_pool has no primitive of its own here: drmm_kernels/ops/conv_bn_relu_pool.py materializes
z = conv2d(x) and calls ``bn_pool``.
Why not one fused kernel: training-mode BN needs the statistics of the whole batch before any window
max can be decided (a negative gamma*invstd flips which element wins), so a fused kernel would need a
statistics pass that recomputes the convolution, doubling the conv FLOPs, against one write + one read
of z for the materialized version. bench/kernels.py should confirm this choice on the GPU.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ._status import is_interpreting, status, supports  # noqa: F401


def conv_relu_pool(x: Tensor, weight: Tensor, scale: Optional[Tensor], shift: Optional[Tensor], stride: int,
                   padding: int, pool: int, negative_slope: float) -> Tuple[Tensor, Tensor]:
    from .conv_relu_pool_kernel import conv_relu_pool as impl
    return impl(x, weight, scale, shift, stride, padding, pool, negative_slope)


def gather_conv(src: Tensor, weight: Tensor, switches: Tensor, stride: int, padding: int, pool: int) -> Tensor:
    from .conv_relu_pool_kernel import gather_conv as impl
    return impl(src, weight, switches, stride, padding, pool)


def render(mu: Tensor, switches: Tensor, weight: Tensor, scale: Optional[Tensor], stride: int, padding: int,
           pool: int, out_hw: Tuple[int, int], negative_slope: float) -> Tensor:
    from .render_kernel import render as impl
    return impl(mu, switches, weight, scale, stride, padding, pool, out_hw, negative_slope)


def render_wgrad(src: Tensor, mu: Tensor, switches: Tensor, scale: Optional[Tensor], stride: int, padding: int,
                 pool: int, negative_slope: float, kernel_hw: Tuple[int, int]) -> Tensor:
    from .render_wgrad_kernel import render_wgrad as impl
    return impl(src, mu, switches, scale, stride, padding, pool, negative_slope, kernel_hw)


def bn_pool(z: Tensor, scale: Tensor, shift: Tensor, pool: int, negative_slope: float) -> Tuple[Tensor, Tensor]:
    from .conv_bn_relu_pool_kernel import bn_pool as impl
    return impl(z, scale, shift, pool, negative_slope)
