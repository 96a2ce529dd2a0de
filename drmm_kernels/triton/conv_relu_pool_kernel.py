"""Fused forward: implicit-GEMM conv + scale/shift + window max/argmax + activation + switch byte.

One program owns BLOCK_P *pooled* pixels (flattened over N*Hp*Wp) x BLOCK_CO output channels. For
each window offset t (row-major, t = dy*pool + dx) it runs the whole K-loop into a fresh fp32
accumulator, applies scale/shift (the contract puts them before the max, so a negative scale needs
no special case), and folds the tile into a running max/argmax. Only y and one switch byte per
pooled element reach memory; the full-resolution conv output never does.

Any max_pool2d window (docs/ops.md#pooling): window (hp, wp) starts at conv-output row hp*PS - PP; offsets outside
the conv output (the pool padding, a ceil-mode overhang) never win, and the running argmax starts at the window's
first real position, as PyTorch's does. With overlapping windows (PS < POOL) a conv output shared by several
windows is computed once per window: (POOL/PS)^2 times the work of the plain pool, the price of never writing the
full-resolution map.

The same kernel with GATHER=True is the ``gather_conv`` primitive: instead of the max it keeps,
per element, the accumulator of the offset recorded in the switch byte.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ..contract import conv_size, pooled_size
from ._common import (
    on_kernel_dtypes,
    OFFSET_MASK,
    device_guard,
    first_inside,
    mma,
    pick_configs,
    store_pooled,
    upcast_dot,
    use_tf32,
    window_update,
)

_CONFIGS = [
    # interpreter uses the first one: few, large programs are what make the interpreter fast
    triton.Config({"BLOCK_P": 64, "BLOCK_CO": 32, "BLOCK_K": 16}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_P": 128, "BLOCK_CO": 64, "BLOCK_K": 32}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_P": 64, "BLOCK_CO": 64, "BLOCK_K": 32}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_P": 128, "BLOCK_CO": 128, "BLOCK_K": 32}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_P": 128, "BLOCK_CO": 32, "BLOCK_K": 32}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_P": 256, "BLOCK_CO": 64, "BLOCK_K": 16}, num_warps=8, num_stages=3),
]


def _prune(configs, named_args, **kwargs):
    """Drop tiles far wider than the layer (C_out = 10 needs no 128-wide channel tile)."""
    c_out = named_args["C_out"]
    keep = [c for c in configs if c.kwargs["BLOCK_CO"] <= max(32, triton.next_power_of_2(c_out))]
    return keep or configs[:1]


@triton.autotune(
    configs=pick_configs(_CONFIGS),
    key=["P", "C_in", "C_out", "Hin", "Win", "KH", "KW", "STRIDE", "POOL", "PS", "PP", "GATHER", "FLAT_K"],
    prune_configs_by={"early_config_prune": _prune},
)
@triton.jit
def _conv_pool_kernel(
    x_ptr,
    w_ptr,
    scale_ptr,
    shift_ptr,
    sw_ptr,
    y_ptr,
    P,
    C_in,
    C_out,
    Hin,
    Win,
    Hp,
    Wp,
    Ho,
    Wo,
    pad,
    slope,
    sxn,
    sxc,
    sxh,
    sxw,
    swo,
    swi,
    swh,
    sww,
    KH: tl.constexpr,
    KW: tl.constexpr,
    STRIDE: tl.constexpr,
    POOL: tl.constexpr,
    PS: tl.constexpr,
    PP: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
    LEAKY: tl.constexpr,
    GATHER: tl.constexpr,
    FLAT_K: tl.constexpr,
    TF32: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_CO: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_p = tl.program_id(0)
    pid_c = tl.program_id(1)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_c = pid_c * BLOCK_CO + tl.arange(0, BLOCK_CO)
    offs_k = tl.arange(0, BLOCK_K)
    mask_p = offs_p < P
    mask_c = offs_c < C_out
    wp = offs_p % Wp
    rest = offs_p // Wp
    hp = rest % Hp
    n = rest // Hp

    # int64 bases: N*C*H*W exceeds 2^31 for the large layers at batch 1024
    x_base = n.to(tl.int64) * sxn
    w_base = offs_c.to(tl.int64) * swo
    out_offs = (n.to(tl.int64)[:, None] * C_out + offs_c[None, :]) * (Hp * Wp) + (hp * Wp + wp)[:, None]
    out_mask = mask_p[:, None] & mask_c[None, :]

    if GATHER:
        code = tl.load(sw_ptr + out_offs, mask=out_mask, other=0).to(tl.int32) & OFFSET_MASK
        res = tl.zeros((BLOCK_P, BLOCK_CO), dtype=tl.float32)
    else:
        if HAS_SCALE:
            scale = tl.load(scale_ptr + offs_c, mask=mask_c, other=1.0).to(tl.float32)
        if HAS_SHIFT:
            shift = tl.load(shift_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
        m = tl.full((BLOCK_P, BLOCK_CO), float("-inf"), dtype=tl.float32)
        arg = tl.zeros((BLOCK_P, BLOCK_CO), dtype=tl.int32) + first_inside(hp, wp, POOL, PS, PP)[:, None]

    for t in range(POOL * POOL):
        oh = hp * PS - PP + t // POOL
        ow = wp * PS - PP + t % POOL
        inside = (oh >= 0) & (oh < Ho) & (ow >= 0) & (ow < Wo)  # always true for a plain pool
        ih0 = oh * STRIDE - pad
        iw0 = ow * STRIDE - pad
        acc = tl.zeros((BLOCK_P, BLOCK_CO), dtype=tl.float32)
        if FLAT_K:
            # Small C_in (e.g. 1 for MNIST): one K axis over (kh, kw, ci), masked up to BLOCK_K >= 16,
            # instead of padding every tap's channel block to 16.
            K = C_in * KH * KW
            for k0 in range(0, K, BLOCK_K):
                kk = k0 + offs_k
                mask_k = kk < K
                ci = kk % C_in
                tap = kk // C_in
                kh = tap // KW
                kw = tap % KW
                ih = ih0[:, None] + kh[None, :]
                iw = iw0[:, None] + kw[None, :]
                a_mask = mask_p[:, None] & mask_k[None, :] & (ih >= 0) & (ih < Hin) & (iw >= 0) & (iw < Win)
                a = tl.load(x_ptr + x_base[:, None] + ci[None, :] * sxc + ih * sxh + iw * sxw, mask=a_mask, other=0.0)
                b_offs = w_base[None, :] + (ci * swi + kh * swh + kw * sww)[:, None]
                b = tl.load(w_ptr + b_offs, mask=mask_k[:, None] & mask_c[None, :], other=0.0)
                acc = mma(a, b, acc, TF32, UPCAST)
        else:
            # (kh, kw, ci-block) flattened into one loop so the software pipeliner sees all of K
            # (with C_in = 32 and BLOCK_K = 32 an innermost ci loop would have a single iteration)
            n_cb = tl.cdiv(C_in, BLOCK_K)
            for it in range(KH * KW * n_cb):
                tap = it // n_cb
                c0 = (it - tap * n_cb) * BLOCK_K
                kh = tap // KW
                kw = tap - kh * KW
                ih = ih0 + kh
                iw = iw0 + kw
                mask_a = mask_p & (ih >= 0) & (ih < Hin) & (iw >= 0) & (iw < Win)
                a_row = x_base + ih * sxh + iw * sxw
                ci = c0 + offs_k
                mask_k = ci < C_in
                a = tl.load(
                    x_ptr + a_row[:, None] + ci[None, :] * sxc, mask=mask_a[:, None] & mask_k[None, :], other=0.0
                )
                b = tl.load(
                    w_ptr + (w_base + kh * swh + kw * sww)[None, :] + ci[:, None] * swi,
                    mask=mask_k[:, None] & mask_c[None, :],
                    other=0.0,
                )
                acc = mma(a, b, acc, TF32, UPCAST)
        if GATHER:
            res = tl.where(code == t, acc, res)
        else:
            v = acc
            if HAS_SCALE:
                v = v * scale[None, :]
            if HAS_SHIFT:
                v = v + shift[None, :]
            m, arg = window_update(v, m, arg, t, inside[:, None])

    if GATHER:
        tl.store(y_ptr + out_offs, res.to(y_ptr.dtype.element_ty), mask=out_mask)
    else:
        store_pooled(y_ptr, sw_ptr, out_offs, out_mask, m, arg, slope, LEAKY)


def _launch(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale,
    shift,
    switches,
    out,
    stride: int,
    padding: int,
    window: dict,
    negative_slope: float,
    gather: bool,
) -> None:
    n, c_in, h, w = x.shape
    c_out, _, kh, kw = weight.shape
    hp, wp = out.shape[-2:]
    ho, wo = conv_size((h, w), (kh, kw), stride, padding)
    p = n * hp * wp
    if p == 0 or c_out == 0:
        return
    grid = lambda meta: (triton.cdiv(p, meta["BLOCK_P"]), triton.cdiv(c_out, meta["BLOCK_CO"]))  # noqa: E731
    dummy = out  # never read: HAS_SCALE/HAS_SHIFT are False
    with device_guard(x):
        _conv_pool_kernel[grid](
            x,
            weight,
            scale if scale is not None else dummy,
            shift if shift is not None else dummy,
            switches,
            out,
            p,
            c_in,
            c_out,
            h,
            w,
            hp,
            wp,
            ho,
            wo,
            padding,
            float(negative_slope),
            *x.stride(),
            *weight.stride(),
            KH=kh,
            KW=kw,
            STRIDE=stride,
            POOL=window["pool"],
            PS=window["pool_stride"],
            PP=window["pool_padding"],
            HAS_SCALE=scale is not None,
            HAS_SHIFT=shift is not None,
            LEAKY=negative_slope > 0,
            GATHER=gather,
            FLAT_K=c_in < 16,
            TF32=use_tf32(x.dtype),
            UPCAST=upcast_dot(x.dtype),
        )


def _pooled_shape(x, weight, stride, padding, window):
    hp, wp = pooled_size(conv_size(tuple(x.shape[-2:]), tuple(weight.shape[-2:]), stride, padding), **window)
    return (x.shape[0], weight.shape[0], hp, wp)


@on_kernel_dtypes
def conv_relu_pool(
    *,
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: Optional[torch.Tensor],
    shift: Optional[torch.Tensor],
    stride: int,
    padding: int,
    pool: int,
    pool_stride: int,
    pool_padding: int,
    ceil_mode: bool,
    negative_slope: float,
) -> Tuple[torch.Tensor, torch.Tensor]:
    window = dict(pool=pool, pool_stride=pool_stride, pool_padding=pool_padding, ceil_mode=ceil_mode)
    shape = _pooled_shape(x, weight, stride, padding, window)
    y = torch.empty(shape, dtype=x.dtype, device=x.device)
    sw = torch.empty(shape, dtype=torch.uint8, device=x.device)
    _launch(x, weight, scale, shift, sw, y, stride, padding, window, negative_slope, gather=False)
    return y, sw


@on_kernel_dtypes
def gather_conv(
    *,
    src: torch.Tensor,
    weight: torch.Tensor,
    switches: torch.Tensor,
    stride: int,
    padding: int,
    pool: int,
    pool_stride: int,
    pool_padding: int,
    ceil_mode: bool,
) -> torch.Tensor:
    out = torch.empty(switches.shape, dtype=src.dtype, device=src.device)
    window = dict(pool=pool, pool_stride=pool_stride, pool_padding=pool_padding, ceil_mode=ceil_mode)
    _launch(src, weight, None, None, switches.contiguous(), out, stride, padding, window, 0.0, gather=True)
    return out
