"""``bn_pool``: per-channel affine + activation + max-pool + switch byte on a materialized conv output z.

Used by conv_bn_relu_pool (drmm_kernels/ops/conv_bn_relu_pool.py): training-mode BN needs the batch statistics
before any window max can be decided, so z is materialized once by cuDNN and this pass reads it
once, writing only the pooled y and the switch bytes. Tiles are (pooled pixels x channels) like the
fused forward, so NCHW and channels_last z are both read through strides. Any max_pool2d window, as in
conv_relu_pool_kernel: positions outside z never win, the argmax starts at the window's first real position.
"""

from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl

from ..contract import pooled_size
from ._common import device_guard, first_inside, pick_configs, store_pooled, window_update, on_kernel_dtypes

_CONFIGS = [
    triton.Config({"BLOCK_P": 64, "BLOCK_C": 32}, num_warps=4),
    triton.Config({"BLOCK_P": 128, "BLOCK_C": 32}, num_warps=4),
    triton.Config({"BLOCK_P": 64, "BLOCK_C": 64}, num_warps=4),
    triton.Config({"BLOCK_P": 256, "BLOCK_C": 16}, num_warps=8),
]


@triton.autotune(configs=pick_configs(_CONFIGS), key=["P", "C", "POOL", "PS", "PP"])
@triton.jit
def _bn_pool_kernel(
    z_ptr,
    scale_ptr,
    shift_ptr,
    y_ptr,
    sw_ptr,
    P,
    C,
    Hp,
    Wp,
    Hc,
    Wc,
    slope,
    szn,
    szc,
    szh,
    szw,
    POOL: tl.constexpr,
    PS: tl.constexpr,
    PP: tl.constexpr,
    LEAKY: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    offs_p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_p = offs_p < P
    mask_c = offs_c < C
    mask = mask_p[:, None] & mask_c[None, :]
    wp = offs_p % Wp
    rest = offs_p // Wp
    hp = rest % Hp
    n = (rest // Hp).to(tl.int64)
    scale = tl.load(scale_ptr + offs_c, mask=mask_c, other=1.0).to(tl.float32)
    shift = tl.load(shift_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
    base = (n * szn)[:, None] + offs_c.to(tl.int64)[None, :] * szc
    m = tl.full((BLOCK_P, BLOCK_C), float("-inf"), dtype=tl.float32)
    arg = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.int32) + first_inside(hp, wp, POOL, PS, PP)[:, None]
    for t in range(POOL * POOL):
        oh = hp * PS - PP + t // POOL
        ow = wp * PS - PP + t % POOL
        inside = ((oh >= 0) & (oh < Hc) & (ow >= 0) & (ow < Wc))[:, None]
        z = tl.load(z_ptr + base + (oh * szh + ow * szw)[:, None], mask=mask & inside, other=0.0).to(tl.float32)
        m, arg = window_update(z * scale[None, :] + shift[None, :], m, arg, t, inside)
    out = (n[:, None] * C + offs_c[None, :]) * (Hp * Wp) + (hp * Wp + wp)[:, None]
    store_pooled(y_ptr, sw_ptr, out, mask, m, arg, slope, LEAKY)


@on_kernel_dtypes
def bn_pool(
    *,
    z: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    pool: int,
    pool_stride: int,
    pool_padding: int,
    ceil_mode: bool,
    negative_slope: float,
) -> Tuple[torch.Tensor, torch.Tensor]:
    n, c, hc, wc = z.shape
    hp, wp = pooled_size((hc, wc), pool, pool_stride, pool_padding, ceil_mode)
    y = torch.empty((n, c, hp, wp), dtype=z.dtype, device=z.device)
    sw = torch.empty((n, c, hp, wp), dtype=torch.uint8, device=z.device)
    p = n * hp * wp
    if p == 0 or c == 0:
        return y, sw
    grid = lambda meta: (triton.cdiv(p, meta["BLOCK_P"]), triton.cdiv(c, meta["BLOCK_C"]))  # noqa: E731
    with device_guard(z):
        _bn_pool_kernel[grid](
            z,
            scale,
            shift,
            y,
            sw,
            p,
            c,
            hp,
            wp,
            hc,
            wc,
            float(negative_slope),
            *z.stride(),
            POOL=pool,
            PS=pool_stride,
            PP=pool_padding,
            LEAKY=negative_slope > 0,
        )
    return y, sw
