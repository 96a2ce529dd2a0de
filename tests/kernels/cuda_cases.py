"""Shared pieces of the CUDA backend's tests (all need a GPU): cases over dtypes and layouts, inputs, the
TF32 switch, and the primitive-level checks against the reference backend in float64.

The backward primitives (gather_conv, render, render_wgrad) take the *same* switch bytes on both sides, so
tie-breaking never enters their comparison.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from typing import Optional

import torch

import drmm_kernels as dk
from drmm_kernels import reference
from drmm_kernels import testing as eager
from drmm_kernels.contract import plain_pool  # noqa: E402


@dataclass(frozen=True)
class Case:
    n: int = 2
    cin: int = 3
    cout: int = 5
    h: int = 11
    w: int = 9
    k: int = 3
    pad: int = 1
    stride: int = 1
    pool: int = 2
    slope: float = 0.0
    scale: bool = True  # scale (with negative entries) + shift
    shift: bool = True
    dtype: torch.dtype = torch.float64
    tf32: bool = False
    layout: str = "contiguous"  # or channels_last, noncontig

    def __str__(self):
        dt = str(self.dtype).replace("torch.", "") + ("-tf32" if self.tf32 else "")
        return (
            f"n{self.n}c{self.cin}-{self.cout}_{self.h}x{self.w}_k{self.k}p{self.pad}s{self.stride}"
            f"q{self.pool}_sl{self.slope}_{'sc' if self.scale else ''}{'sh' if self.shift else ''}_{dt}"
            f"_{self.layout}"
        )


BASE = [
    Case(),
    Case(k=1, pad=0),
    Case(k=5, pad=2, h=13, w=12),
    Case(k=5, pad=4, h=7, w=9),
    Case(k=3, pad=0, h=15, w=10),
    Case(stride=2, h=17, w=15),
    Case(stride=2, k=5, pad=2, h=19, w=16, pool=1),
    Case(pool=1, slope=0.1),
    Case(pool=3, h=16, w=14),
    Case(pool=4, h=18, w=17, k=1, pad=0),
    Case(slope=0.2, layout="channels_last"),
    Case(layout="noncontig", scale=False),
    Case(scale=False, shift=False, cin=1, cout=7, k=5, pad=2, h=28, w=28),  # MNIST first layer: K = 25
    Case(cin=19, cout=70, h=9, w=10),  # K not a multiple of 32, C_out over one 64-wide tile
    Case(cin=40, cout=3, h=7, w=7, k=3, pad=2, stride=2),
    Case(n=3, cin=70, cout=66, h=10, w=9, k=3, pad=1, slope=0.1),  # two N tiles, two K tiles
]

DTYPES = [
    dict(dtype=torch.float64),
    dict(dtype=torch.float32),
    dict(dtype=torch.float32, tf32=True),
    dict(dtype=torch.bfloat16),
    dict(dtype=torch.float16),
]

CASES = [replace(c, **d) for c in BASE for d in DTYPES]

TOL = {torch.float64: 1e-9, torch.float32: 1e-4, "tf32": 5e-3, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def case_tol(case: Case) -> float:
    return TOL["tf32"] if case.tf32 else TOL[case.dtype]


@contextlib.contextmanager
def tf32(on: bool):
    """Set the cuDNN conv TF32 switch (read by both the CUDA kernels and the cuDNN reference)."""
    before = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = on
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = before


def layout(t: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if kind == "noncontig":
        big = torch.zeros(*t.shape[:-1], t.shape[-1] * 2, dtype=t.dtype, device=t.device)
        big[..., ::2] = t
        return big[..., ::2]
    return t


def inputs(case: Case, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    kw = dict(device="cuda", generator=g)
    x = torch.randn(case.n, case.cin, case.h, case.w, dtype=torch.float64, **kw)
    w = torch.randn(case.cout, case.cin, case.k, case.k, dtype=torch.float64, **kw) / (case.k * case.cin**0.5)
    scale = torch.randn(case.cout, dtype=torch.float64, **kw) if case.scale else None  # negative entries too
    shift = 0.3 * torch.randn(case.cout, dtype=torch.float64, **kw) if case.shift else None

    def cast(t):
        return None if t is None else t.to(case.dtype)

    return layout(cast(x), case.layout), cast(w), cast(scale), cast(shift)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-6)).item() if b.numel() else 0.0


def d(t: Optional[torch.Tensor]):
    return None if t is None else t.detach().double()


GRAD_CASES = [replace(c, dtype=dt) for c in BASE for dt in (torch.float64, torch.float32)]

REALISTIC = [
    Case(n=256, cin=32, cout=64, h=28, w=28, dtype=torch.bfloat16),
    Case(n=256, cin=32, cout=64, h=28, w=28, dtype=torch.float32, tf32=True, layout="channels_last"),
    Case(n=256, cin=32, cout=64, h=28, w=28, dtype=torch.float32, scale=False, shift=False),
    Case(n=256, cin=1, cout=32, h=28, w=28, k=5, pad=2, dtype=torch.bfloat16, scale=False),
    Case(n=64, cin=64, cout=128, h=16, w=16, stride=2, slope=0.1, dtype=torch.float16),
]


def geometry(case: Case) -> dict:
    """The case's layer geometry as primitive keyword arguments."""
    return dict(stride=case.stride, padding=case.pad, **plain_pool(case.pool))


def check_forward_primitives(case: Case):
    x, w, scale, shift = inputs(case)
    tol = case_tol(case)
    with tf32(case.tf32), dk.backend("cuda"):
        from drmm_kernels import cuda as cb

        y, sw = cb.conv_relu_pool(x=x, weight=w, scale=scale, shift=shift, negative_slope=case.slope, **geometry(case))
    assert y.dtype == case.dtype and sw.dtype == torch.uint8 and y.is_contiguous()
    v = eager.pre_activation(d(x), d(w), d(scale), d(shift), case.stride, case.pad)
    y_ref, sw_ref = reference.pool_switches(v, case.pool, case.slope)
    assert y.shape == y_ref.shape
    assert rel_err(y, y_ref) < tol
    assert ((sw & 0x0F) < case.pool**2).all()
    eager.assert_switches_agree(sw, sw_ref, v, case.pool, 4 * tol * v.abs().max().item(), "conv_relu_pool")

    # bn_pool: the same epilogue on a precomputed conv output, scale and shift both given
    z = eager.pre_activation(x, w, None, None, case.stride, case.pad)
    sc = scale if scale is not None else torch.ones(case.cout, dtype=case.dtype, device="cuda")
    sh = shift if shift is not None else torch.zeros(case.cout, dtype=case.dtype, device="cuda")
    with dk.backend("cuda"):
        yb, swb = cb.bn_pool(
            z=layout(z, case.layout), scale=sc, shift=sh, **plain_pool(case.pool), negative_slope=case.slope
        )
    yb_ref, swb_ref = reference.bn_pool(
        z=z.double(), scale=sc.double(), shift=sh.double(), **plain_pool(case.pool), negative_slope=case.slope
    )
    assert rel_err(yb, yb_ref) < TOL[case.dtype]  # no conv inside: TF32 plays no part
    vb = reference.scale_shift(z.double(), sc.double(), sh.double())
    eager.assert_switches_agree(
        swb, swb_ref, vb, case.pool, 4 * TOL[case.dtype] * max(1.0, vb.abs().max().item()), "bn_pool"
    )


def check_backward_primitives(case: Case):
    """gather_conv, render (with and without scale), render_wgrad on shared switches."""
    x, w, scale, _ = inputs(case)
    tol = case_tol(case)
    geo = geometry(case)
    _, sw = reference.conv_relu_pool(x=d(x), weight=d(w), scale=d(scale), shift=None, negative_slope=case.slope, **geo)
    g = torch.Generator(device="cuda").manual_seed(1)
    mu = torch.randn(sw.shape, dtype=torch.float64, device="cuda", generator=g)
    mu_t = layout(mu.to(case.dtype), case.layout)
    sw_t = layout(sw, case.layout)
    from drmm_kernels import cuda as cb

    render = dict(out_h=case.h, out_w=case.w, negative_slope=case.slope, **geo)
    wgrad = dict(negative_slope=case.slope, kernel_h=case.k, kernel_w=case.k, **geo)
    with tf32(case.tf32), dk.backend("cuda"):
        gc = cb.gather_conv(src=x, weight=w, switches=sw_t, **geo)
        r_raw = cb.render(mu=mu_t, switches=sw_t, weight=w, scale=None, **render)
        r_sc = cb.render(mu=mu_t, switches=sw_t, weight=w, scale=scale, **render)
        dw = cb.render_wgrad(src=x, mu=mu_t, switches=sw_t, scale=scale, **wgrad)
    gc_ref = reference.gather_conv(src=d(x), weight=d(w), switches=sw, **geo)
    r_raw_ref = reference.render(mu=mu, switches=sw, weight=d(w), scale=None, **render)
    r_sc_ref = reference.render(mu=mu, switches=sw, weight=d(w), scale=d(scale), **render)
    dw_ref = reference.render_wgrad(src=d(x), mu=mu, switches=sw, scale=d(scale), **wgrad)
    for name, got, exp in (
        ("gather_conv", gc, gc_ref),
        ("render", r_raw, r_raw_ref),
        ("render+scale", r_sc, r_sc_ref),
        ("render_wgrad", dw, dw_ref),
    ):
        assert got.shape == exp.shape and got.dtype == case.dtype, name
        assert got.is_contiguous(), name
        err = rel_err(got, exp)
        assert err < tol, f"{name}: relative error {err:.3g} >= {tol}"
