"""Weight gradient over the recorded positions (``render_wgrad``).

dW[co, ci, kh, kw] = sum over pooled (n, hp, wp) and window offsets t of
    g[n, co, hp, wp] * [offset(n, co, hp, wp) == t] * src[n, ci, (hp*pool+dy_t)*s - pad + kh, ...]
with g = mu * act'(switch) * scale[co]. For a fixed tap and t this is a GEMM
(C_out x pixels) @ (pixels x C_in) whose A operand is built in the loader from mu and the switch
byte, so the unpooled gradient map is never written.

M = C_out and N = C_in are small while K = N*Hp*Wp*pool^2 is huge, so K is split over the third grid
axis; each split writes its own fp32 slice and the slices are summed on the host. That keeps the
result deterministic (no atomics) and autotune reruns harmless.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import (
    on_kernel_dtypes,
    OFFSET_MASK,
    ON_BIT,
    device_guard,
    is_interpreting,
    mma,
    num_sms,
    pick_configs,
    upcast_dot,
    use_tf32,
)

_CONFIGS = [
    triton.Config({"BLOCK_CO": 32, "BLOCK_CI": 32, "BLOCK_P": 32}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_CO": 64, "BLOCK_CI": 64, "BLOCK_P": 32}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_CO": 64, "BLOCK_CI": 64, "BLOCK_P": 64}, num_warps=4, num_stages=2),  # fp32: smem
    triton.Config({"BLOCK_CO": 128, "BLOCK_CI": 64, "BLOCK_P": 32}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_CO": 32, "BLOCK_CI": 32, "BLOCK_P": 64}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_CO": 64, "BLOCK_CI": 16, "BLOCK_P": 64}, num_warps=4, num_stages=4),
]


def _prune(configs, named_args, **kwargs):
    c_in, c_out = named_args["C_in"], named_args["C_out"]
    keep = [
        c
        for c in configs
        if c.kwargs["BLOCK_CI"] <= max(16, triton.next_power_of_2(c_in))
        and c.kwargs["BLOCK_CO"] <= max(32, triton.next_power_of_2(c_out))
    ]
    return keep or configs[:1]


@triton.autotune(
    configs=pick_configs(_CONFIGS),
    key=["P", "C_in", "C_out", "Hin", "Win", "KH", "KW", "STRIDE", "POOL", "PS", "PP"],
    prune_configs_by={"early_config_prune": _prune},
)
@triton.jit
def _wgrad_kernel(
    src_ptr,
    mu_ptr,
    sw_ptr,
    scale_ptr,
    part_ptr,
    P,
    C_in,
    C_out,
    Hin,
    Win,
    Hp,
    Wp,
    pad,
    slope,
    chunk,
    sxn,
    sxc,
    sxh,
    sxw,
    smn,
    smc,
    smh,
    smw,
    ssn,
    ssc,
    ssh,
    ssw,
    KH: tl.constexpr,
    KW: tl.constexpr,
    STRIDE: tl.constexpr,
    POOL: tl.constexpr,
    PS: tl.constexpr,
    PP: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    TF32: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_CO: tl.constexpr,
    BLOCK_CI: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    pid = tl.program_id(0)
    tap = tl.program_id(1)
    split = tl.program_id(2)
    n_ci = tl.cdiv(C_in, BLOCK_CI)
    pid_co = pid // n_ci
    pid_ci = pid % n_ci
    kh = tap // KW
    kw = tap % KW
    offs_co = pid_co * BLOCK_CO + tl.arange(0, BLOCK_CO)
    offs_ci = pid_ci * BLOCK_CI + tl.arange(0, BLOCK_CI)
    mask_co = offs_co < C_out
    mask_ci = offs_ci < C_in
    if HAS_SCALE:
        scale = tl.load(scale_ptr + offs_co, mask=mask_co, other=0.0).to(tl.float32)

    acc = tl.zeros((BLOCK_CO, BLOCK_CI), dtype=tl.float32)
    p_start = split * chunk
    p_end = tl.minimum(p_start + chunk, P)
    for p0 in range(p_start, p_end, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        mask_p = offs_p < p_end
        wp = offs_p % Wp
        rest = offs_p // Wp
        hp = rest % Hp
        n = (rest // Hp).to(tl.int64)
        # A operand source: the pooled gradient and its switch byte, [BLOCK_CO, BLOCK_P]
        gmask = mask_co[:, None] & mask_p[None, :]
        mu_offs = (n * smn + hp * smh + wp * smw)[None, :] + offs_co.to(tl.int64)[:, None] * smc
        sw_offs = (n * ssn + hp * ssh + wp * ssw)[None, :] + offs_co.to(tl.int64)[:, None] * ssc
        g = tl.load(mu_ptr + mu_offs, mask=gmask, other=0.0).to(tl.float32)
        code = tl.load(sw_ptr + sw_offs, mask=gmask, other=0).to(tl.int32)
        g = tl.where((code & ON_BIT) != 0, g, tl.where(slope != 0.0, g * slope, 0.0))  # a select, as in render
        if HAS_SCALE:
            g = g * scale[:, None]
        code = code & OFFSET_MASK
        src_n = n * sxn
        # unrolled, so the p-block loop is the innermost runtime loop and gets software-pipelined
        for t in tl.static_range(POOL * POOL):
            # window (hp, wp) starts at conv-output row hp * PS - PP (any max_pool2d window)
            ih = (hp * PS - PP + t // POOL) * STRIDE - pad + kh
            iw = (wp * PS - PP + t % POOL) * STRIDE - pad + kw
            ok = mask_p & (ih >= 0) & (ih < Hin) & (iw >= 0) & (iw < Win)
            b = tl.load(
                src_ptr + (src_n + ih * sxh + iw * sxw)[:, None] + offs_ci[None, :] * sxc,
                mask=ok[:, None] & mask_ci[None, :],
                other=0.0,
            )
            a = tl.where(gmask & (code == t), g, 0.0).to(b.dtype)
            acc = mma(a, b, acc, TF32, UPCAST)

    out = (split * C_out + offs_co[:, None]).to(tl.int64) * (C_in * KH * KW) + offs_ci[None, :] * (KH * KW) + tap
    tl.store(part_ptr + out, acc, mask=mask_co[:, None] & mask_ci[None, :])


@on_kernel_dtypes
def render_wgrad(
    *,
    src: torch.Tensor,
    mu: torch.Tensor,
    switches: torch.Tensor,
    scale: Optional[torch.Tensor],
    stride: int,
    padding: int,
    pool: int,
    pool_stride: int,
    pool_padding: int,
    ceil_mode: bool,
    negative_slope: float,
    kernel_h: int,
    kernel_w: int,
) -> torch.Tensor:
    n, c_in, h, w = src.shape
    c_out, hp, wp = mu.shape[1], mu.shape[2], mu.shape[3]
    kh, kw = kernel_h, kernel_w
    p = n * hp * wp
    if p == 0:
        return torch.zeros((c_out, c_in, kh, kw), dtype=src.dtype, device=src.device)
    # Enough K-splits to give every SM a few programs (tiles of 64x64 assumed for the estimate); on the
    # interpreter, two splits so the split path is exercised without multiplying the program count.
    base = triton.cdiv(c_out, 64) * triton.cdiv(c_in, 64) * kh * kw
    if is_interpreting():
        split = min(2, triton.cdiv(p, 32))
    else:
        split = max(1, min(triton.cdiv(4 * num_sms(src.device), base), triton.cdiv(p, 256), 64))
    chunk = triton.cdiv(triton.cdiv(p, split), 64) * 64
    split = triton.cdiv(p, chunk)
    part = torch.empty((split, c_out, c_in, kh, kw), dtype=torch.float32, device=src.device)
    grid = lambda meta: (  # noqa: E731
        triton.cdiv(c_out, meta["BLOCK_CO"]) * triton.cdiv(c_in, meta["BLOCK_CI"]),
        kh * kw,
        split,
    )
    with device_guard(src):
        _wgrad_kernel[grid](
            src,
            mu,
            switches,
            scale if scale is not None else mu,
            part,
            p,
            c_in,
            c_out,
            h,
            w,
            hp,
            wp,
            padding,
            float(negative_slope),
            chunk,
            *src.stride(),
            *mu.stride(),
            *switches.stride(),
            KH=kh,
            KW=kw,
            STRIDE=stride,
            POOL=pool,
            PS=pool_stride,
            PP=pool_padding,
            HAS_SCALE=scale is not None,
            TF32=use_tf32(src.dtype),
            UPCAST=upcast_dot(src.dtype),
        )
    return part.sum(0).to(src.dtype)
