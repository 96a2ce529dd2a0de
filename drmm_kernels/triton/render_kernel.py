"""Top-down render = dgrad of conv_relu_pool: masked unpool fused into the operand loader + transposed conv.

Gather formulation (no atomics, no zero-filled unpooled map): one program owns BLOCK_M pixels of
x_hat (flattened over N*H*W) x BLOCK_CI input channels. For each tap (kh, kw) a pixel (ih, iw) reads
the conv-output position it feeds, oh = (ih + pad - kh) / stride (only when divisible), and for a
block of output channels the A operand is built while loading: mu at the pooled position, kept only
where the switch offset equals this position inside its window, times the activation factor (1 if
bit 7 else negative_slope) and scale[c]. Positions no window reaches (the dropped trailing rows / columns)
get nothing, as in the contract. B is the weight tap W[c, ci, kh, kw].

Overlapping windows (pool stride PS < POOL): a conv-output position lies in at most ceil(POOL/PS)^2 windows; the
loader adds, in a fixed order, what each of them routes to it, so the sum the contract asks for is formed without
atomics and is the same bit for bit run to run. With PS = POOL (and no pool padding) that is one window, the
plain pool's loader.

On GPU 3/4 of the A tile is zero (pool 2); the dense tensor-core dot is still the cheapest way
to consume it, which bench/kernels.py checks against eager max_unpool2d + conv_transpose2d.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import OFFSET_MASK, ON_BIT, device_guard, mma, pick_configs, upcast_dot, use_tf32, on_kernel_dtypes

_CONFIGS = [
    triton.Config({"BLOCK_M": 64, "BLOCK_CI": 32, "BLOCK_K": 16}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_CI": 64, "BLOCK_K": 32}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_CI": 64, "BLOCK_K": 32}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_CI": 128, "BLOCK_K": 32}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_CI": 16, "BLOCK_K": 32}, num_warps=4, num_stages=4),
]


def _prune(configs, named_args, **kwargs):
    c_in = named_args["C_in"]
    keep = [c for c in configs if c.kwargs["BLOCK_CI"] <= max(16, triton.next_power_of_2(c_in))]
    return keep or configs[:1]


@triton.autotune(
    configs=pick_configs(_CONFIGS),
    key=["M", "C_in", "C_out", "H", "W", "KH", "KW", "STRIDE", "POOL", "PS", "PP"],
    prune_configs_by={"early_config_prune": _prune},
)
@triton.jit
def _render_kernel(
    mu_ptr,
    sw_ptr,
    w_ptr,
    scale_ptr,
    out_ptr,
    M,
    C_in,
    C_out,
    H,
    W,
    Hp,
    Wp,
    pad,
    slope,
    smn,
    smc,
    smh,
    smw,
    ssn,
    ssc,
    ssh,
    ssw,
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
    NWIN: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    TF32: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_CI: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_ci = pid_c * BLOCK_CI + tl.arange(0, BLOCK_CI)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_ci = offs_ci < C_in
    iw = offs_m % W
    rest = offs_m // W
    ih = rest % H
    n = (rest // H).to(tl.int64)
    mu_n = n * smn
    sw_n = n * ssn
    w_ci = offs_ci.to(tl.int64) * swi

    acc = tl.zeros((BLOCK_M, BLOCK_CI), dtype=tl.float32)
    # (kh, kw, co-block) in one loop, so the software pipeliner sees the whole reduction
    n_cb = tl.cdiv(C_out, BLOCK_K)
    for it in range(KH * KW * n_cb):
        tap = it // n_cb
        c0 = (it - tap * n_cb) * BLOCK_K
        kh = tap // KW
        kw = tap - kh * KW
        # conv-output position this input pixel feeds through tap (kh, kw); clamp before // and %
        # (signed division), require divisibility by the stride, and stay inside whole windows
        oh_s = ih + pad - kh
        ow_s = iw + pad - kw
        ok = mask_m & (oh_s >= 0) & (ow_s >= 0)
        oh_s = tl.where(ok, oh_s, 0)
        ow_s = tl.where(ok, ow_s, 0)
        if STRIDE > 1:
            ok = ok & (oh_s % STRIDE == 0) & (ow_s % STRIDE == 0)
        oh = oh_s // STRIDE
        ow = ow_s // STRIDE
        co = c0 + offs_k
        mask_k = co < C_out
        g = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        # the windows that cover (oh, ow): the last one starting at or before it, and up to NWIN - 1 earlier ones
        for j in tl.static_range(NWIN * NWIN):
            hp = (oh + PP) // PS - j // NWIN
            wp = (ow + PP) // PS - j % NWIN
            dy = oh + PP - hp * PS
            dx = ow + PP - wp * PS
            inw = ok & (hp >= 0) & (wp >= 0) & (hp < Hp) & (wp < Wp) & (dy < POOL) & (dx < POOL)
            want = dy * POOL + dx  # offset of this position inside window (hp, wp)
            lmask = inw[:, None] & mask_k[None, :]
            sw_offs = (sw_n + hp * ssh + wp * ssw)[:, None] + co[None, :] * ssc
            mu_offs = (mu_n + hp * smh + wp * smw)[:, None] + co[None, :] * smc
            code = tl.load(sw_ptr + sw_offs, mask=lmask, other=0).to(tl.int32)
            g_w = tl.load(mu_ptr + mu_offs, mask=lmask, other=0.0).to(tl.float32)
            keep = lmask & ((code & OFFSET_MASK) == want[:, None])
            # a select, like ReLU's backward: 0 where the a bit is off under ReLU even for an inf / NaN g
            g += tl.where(keep & ((code & ON_BIT) != 0), g_w, tl.where(keep & (slope != 0.0), g_w * slope, 0.0))
        if HAS_SCALE:
            s = tl.load(scale_ptr + co, mask=mask_k, other=0.0).to(tl.float32)
            g = g * s[None, :]
        b = tl.load(
            w_ptr + (w_ci + kh * swh + kw * sww)[None, :] + co.to(tl.int64)[:, None] * swo,
            mask=mask_k[:, None] & mask_ci[None, :],
            other=0.0,
        )
        acc = mma(g.to(b.dtype), b, acc, TF32, UPCAST)

    out_offs = (n[:, None] * C_in + offs_ci[None, :]) * (H * W) + (ih * W + iw)[:, None]
    tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_ci[None, :])


@on_kernel_dtypes
def render(
    *,
    mu: torch.Tensor,
    switches: torch.Tensor,
    weight: torch.Tensor,
    scale: Optional[torch.Tensor],
    stride: int,
    padding: int,
    pool: int,
    pool_stride: int,
    pool_padding: int,
    ceil_mode: bool,
    out_h: int,
    out_w: int,
    negative_slope: float,
) -> torch.Tensor:
    n, c_out, hp, wp = mu.shape
    c_in, kh, kw = weight.shape[1], weight.shape[2], weight.shape[3]
    h, w = out_h, out_w
    out = torch.empty((n, c_in, h, w), dtype=mu.dtype, device=mu.device)
    m = n * h * w
    if m == 0 or c_in == 0:
        return out
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(c_in, meta["BLOCK_CI"]))  # noqa: E731
    with device_guard(mu):
        _render_kernel[grid](
            mu,
            switches,
            weight,
            scale if scale is not None else mu,
            out,
            m,
            c_in,
            c_out,
            h,
            w,
            hp,
            wp,
            padding,
            float(negative_slope),
            *mu.stride(),
            *switches.stride(),
            *weight.stride(),
            KH=kh,
            KW=kw,
            STRIDE=stride,
            POOL=pool,
            PS=pool_stride,
            PP=pool_padding,
            NWIN=triton.cdiv(pool, pool_stride),
            HAS_SCALE=scale is not None,
            TF32=use_tf32(mu.dtype),
            UPCAST=upcast_dot(mu.dtype),
        )
    return out
