"""The ``cuda`` backend (CUDA C++ in drmm_kernels._C) against ``reference`` on a GPU.

Every primitive is compared with the reference primitive on the same inputs; gather_conv, render and
render_wgrad take the *same* switch bytes on both sides, so tie-breaking never enters their comparison.
Forward switches are compared only where the window is not near-tied. Every gradient is checked through
the public ops under ``drmm_kernels.backend("cuda")``. fp32 runs twice: exact (TF32 off: CUDA-core
kernels, tight tolerance) and TF32 (the cuDNN default: tensor-core kernels, loose tolerance).
All tests carry the ``gpu`` marker (skipped without a CUDA device by conftest.py).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from typing import Optional

import pytest
import torch

import drmm_kernels as dk
from drmm_kernels import reference

import eager

pytestmark = pytest.mark.gpu


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
        return (f"n{self.n}c{self.cin}-{self.cout}_{self.h}x{self.w}_k{self.k}p{self.pad}s{self.stride}"
                f"q{self.pool}_sl{self.slope}_{'sc' if self.scale else ''}{'sh' if self.shift else ''}_{dt}"
                f"_{self.layout}")


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
DTYPES = [dict(dtype=torch.float64), dict(dtype=torch.float32), dict(dtype=torch.float32, tf32=True),
          dict(dtype=torch.bfloat16), dict(dtype=torch.float16)]
CASES = [replace(c, **d) for c in BASE for d in DTYPES]
TOL = {torch.float64: 1e-9, torch.float32: 1e-4, "tf32": 5e-3, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def _tol(case: Case) -> float:
    return TOL["tf32"] if case.tf32 else TOL[case.dtype]


@contextlib.contextmanager
def _tf32(on: bool):
    """Set the cuDNN conv TF32 switch (read by both the CUDA kernels and the cuDNN reference)."""
    before = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = on
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = before


def _layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "noncontig":
        big = torch.zeros(*t.shape[:-1], t.shape[-1] * 2, dtype=t.dtype, device=t.device)
        big[..., ::2] = t
        return big[..., ::2]
    return t


def _inputs(case: Case, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    kw = dict(device="cuda", generator=g)
    x = torch.randn(case.n, case.cin, case.h, case.w, dtype=torch.float64, **kw)
    w = torch.randn(case.cout, case.cin, case.k, case.k, dtype=torch.float64, **kw) / (case.k * case.cin ** 0.5)
    scale = torch.randn(case.cout, dtype=torch.float64, **kw) if case.scale else None  # negative entries too
    shift = 0.3 * torch.randn(case.cout, dtype=torch.float64, **kw) if case.shift else None
    cast = (lambda t: None if t is None else t.to(case.dtype))
    return _layout(cast(x), case.layout), cast(w), cast(scale), cast(shift)


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-6)).item() if b.numel() else 0.0


def _d(t: Optional[torch.Tensor]):
    return None if t is None else t.detach().double()


def _clear_windows(x, w, scale, shift, case: Case, rel: float):
    """Pre-activation in float64 and the windows whose top-2 gap exceeds `rel` of its magnitude."""
    v = eager.pre_activation(_d(x), _d(w), _d(scale), _d(shift), case.stride, case.pad)
    gap = eager.window_gap(v, case.pool)
    return v, gap > rel * v.abs().max().clamp_min(1e-12)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_forward_primitives(case: Case):
    x, w, scale, shift = _inputs(case)
    tol = _tol(case)
    with _tf32(case.tf32), dk.backend("cuda"):
        from drmm_kernels import cuda_backend as cb

        y, sw = cb.conv_relu_pool(x, w, scale, shift, case.stride, case.pad, case.pool, case.slope)
    assert y.dtype == case.dtype and sw.dtype == torch.uint8 and y.is_contiguous()
    v, clear = _clear_windows(x, w, scale, shift, case, 4 * tol)
    y_ref, sw_ref = reference.pool_switches(v, case.pool, case.slope)
    assert y.shape == y_ref.shape
    assert _rel_err(y, y_ref) < tol
    assert ((sw & 0x70) == 0).all(), "bits 4-6 must be zero"
    assert ((sw & 0x0F) < case.pool ** 2).all()
    assert torch.equal((sw & 0x0F)[clear], (sw_ref & 0x0F)[clear]), "window argmax offsets differ"
    # bit 7 = window max > 0, where the sign is not decided by rounding
    vmax = torch.nn.functional.max_pool2d(v, case.pool, case.pool)
    decided = vmax.abs() > 4 * tol * v.abs().max()
    assert torch.equal((sw & 0x80)[decided & clear], (sw_ref & 0x80)[decided & clear])

    # bn_pool: the same epilogue on a precomputed conv output, scale and shift both given
    z = eager.pre_activation(x, w, None, None, case.stride, case.pad)
    sc = scale if scale is not None else torch.ones(case.cout, dtype=case.dtype, device="cuda")
    sh = shift if shift is not None else torch.zeros(case.cout, dtype=case.dtype, device="cuda")
    with dk.backend("cuda"):
        yb, swb = cb.bn_pool(_layout(z, case.layout), sc, sh, case.pool, case.slope)
    yb_ref, swb_ref = reference.bn_pool(z.double(), sc.double(), sh.double(), case.pool, case.slope)
    assert _rel_err(yb, yb_ref) < TOL[case.dtype]  # no conv inside: TF32 plays no part
    gap = eager.window_gap(reference.scale_shift(z.double(), sc.double(), sh.double()), case.pool)
    ok = gap > 4 * TOL[case.dtype]
    assert torch.equal((swb & 0x0F)[ok], (swb_ref & 0x0F)[ok])


@pytest.mark.parametrize("case", CASES, ids=str)
def test_backward_primitives(case: Case):
    """gather_conv, render (with and without scale), render_wgrad on shared switches."""
    x, w, scale, _ = _inputs(case)
    tol = _tol(case)
    _, sw = reference.conv_relu_pool(_d(x), _d(w), _d(scale), None, case.stride, case.pad, case.pool, case.slope)
    g = torch.Generator(device="cuda").manual_seed(1)
    mu = torch.randn(sw.shape, dtype=torch.float64, device="cuda", generator=g)
    mu_t = _layout(mu.to(case.dtype), case.layout)
    sw_t = _layout(sw, case.layout)
    from drmm_kernels import cuda_backend as cb

    with _tf32(case.tf32), dk.backend("cuda"):
        gc = cb.gather_conv(x, w, sw_t, case.stride, case.pad, case.pool)
        r_raw = cb.render(mu_t, sw_t, w, None, case.stride, case.pad, case.pool, (case.h, case.w), case.slope)
        r_sc = cb.render(mu_t, sw_t, w, scale, case.stride, case.pad, case.pool, (case.h, case.w), case.slope)
        dw = cb.render_wgrad(x, mu_t, sw_t, scale, case.stride, case.pad, case.pool, case.slope, (case.k, case.k))
    gc_ref = reference.gather_conv(_d(x), _d(w), sw, case.stride, case.pad, case.pool)
    r_raw_ref = reference.render(mu, sw, _d(w), None, case.stride, case.pad, case.pool, (case.h, case.w), case.slope)
    r_sc_ref = reference.render(mu, sw, _d(w), _d(scale), case.stride, case.pad, case.pool, (case.h, case.w),
                                case.slope)
    dw_ref = reference.render_wgrad(_d(x), mu, sw, _d(scale), case.stride, case.pad, case.pool, case.slope,
                                    (case.k, case.k))
    for name, got, exp in (("gather_conv", gc, gc_ref), ("render", r_raw, r_raw_ref), ("render+scale", r_sc, r_sc_ref),
                           ("render_wgrad", dw, dw_ref)):
        assert got.shape == exp.shape and got.dtype == case.dtype, name
        assert got.is_contiguous(), name
        err = _rel_err(got, exp)
        assert err < tol, f"{name}: relative error {err:.3g} >= {tol}"


GRAD_CASES = [replace(c, dtype=dt) for c in BASE for dt in (torch.float64, torch.float32)]


@pytest.mark.parametrize("case", GRAD_CASES, ids=str)
def test_public_op_gradients(case: Case):
    """Every gradient of conv_relu_pool and render through the public ops, cuda vs reference backend."""
    tol = TOL[case.dtype]

    def run(backend):
        x, w, scale, shift = _inputs(case)
        leaves = [t.requires_grad_() for t in (x, w, scale, shift) if t is not None]
        with _tf32(False), dk.backend(backend):
            y, sw = dk.conv_relu_pool(x, w, scale, shift, stride=case.stride, padding=case.pad, pool=case.pool,
                                      negative_slope=case.slope)
            gy = torch.randn(y.shape, dtype=y.dtype, device="cuda", generator=torch.Generator("cuda").manual_seed(2))
            (y * gy).sum().backward()
            mu = torch.randn(y.shape, dtype=y.dtype, device="cuda",
                             generator=torch.Generator("cuda").manual_seed(3)).requires_grad_()
            sc = None if scale is None else scale.detach().clone().requires_grad_()
            wr = w.detach().clone().requires_grad_()
            xh = dk.render(mu, sw, wr, sc, stride=case.stride, padding=case.pad, pool=case.pool,
                           out_size=(case.h, case.w), negative_slope=case.slope)
            go = torch.randn(xh.shape, dtype=xh.dtype, device="cuda", generator=torch.Generator("cuda").manual_seed(4))
            (xh * go).sum().backward()
        grads = [t.grad for t in leaves] + [mu.grad, wr.grad] + ([sc.grad] if sc is not None else [])
        return y, sw, xh, grads

    y, sw, xh, grads = run("cuda")
    y_r, sw_r, xh_r, grads_r = run("reference")
    assert _rel_err(y, y_r) < tol
    # Ties are measure-zero for these continuous inputs; a flipped switch would show in every gradient.
    assert torch.equal(sw, sw_r), f"{(sw != sw_r).sum().item()} switch bytes differ"
    assert _rel_err(xh, xh_r) < tol
    for i, (a, b) in enumerate(zip(grads, grads_r)):
        assert a is not None and b is not None, i
        assert _rel_err(a, b) < tol, f"gradient {i}: {_rel_err(a, b):.3g}"


REALISTIC = [
    Case(n=256, cin=32, cout=64, h=28, w=28, dtype=torch.bfloat16),
    Case(n=256, cin=32, cout=64, h=28, w=28, dtype=torch.float32, tf32=True, layout="channels_last"),
    Case(n=256, cin=32, cout=64, h=28, w=28, dtype=torch.float32, scale=False, shift=False),
    Case(n=256, cin=1, cout=32, h=28, w=28, k=5, pad=2, dtype=torch.bfloat16, scale=False),
    Case(n=64, cin=64, cout=128, h=16, w=16, stride=2, slope=0.1, dtype=torch.float16),
]


@pytest.mark.parametrize("case", REALISTIC, ids=str)
def test_realistic_shapes(case: Case):
    test_forward_primitives(case)
    test_backward_primitives(case)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nan_propagates_like_max_pool(dtype):
    case = Case(dtype=dtype, scale=False, shift=False)
    x, w, _, _ = _inputs(case)
    x[0, 1, 4, 4] = float("nan")
    with _tf32(False), dk.backend("cuda"):
        y, sw = dk.conv_relu_pool(x, w, padding=1)
    y_ref, sw_ref = reference.conv_relu_pool(x, w, None, None, 1, 1, 2, 0.0)
    assert torch.equal(torch.isnan(y), torch.isnan(y_ref)) and torch.isnan(y).any()
    nan = torch.isnan(y_ref)
    assert torch.equal(sw[nan], sw_ref[nan])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_render_and_wgrad_select_like_relu_backward(dtype):
    """An infinite pooled gradient where the a bit is off (ReLU) contributes 0, not inf * 0 = NaN."""
    from drmm_kernels import cuda_backend as cb
    case = Case(dtype=dtype, scale=False, shift=False)
    x, w, _, _ = _inputs(case)
    with _tf32(False):
        y, sw = cb.conv_relu_pool(x, w, None, None, 1, 1, 2, 0.0)
        mu = torch.randn_like(y)
        off = (sw & 0x80) == 0
        assert off.any() and (~off).any()
        mu[off] = float("inf")
        got_r = cb.render(mu, sw, w, None, 1, 1, 2, tuple(x.shape[-2:]), 0.0)
        got_w = cb.render_wgrad(x, mu, sw, None, 1, 1, 2, 0.0, tuple(w.shape[-2:]))
    assert torch.isfinite(got_r).all() and torch.isfinite(got_w).all()
    exp_r = reference.render(mu, sw, w, None, 1, 1, 2, tuple(x.shape[-2:]), 0.0)
    torch.testing.assert_close(got_r, exp_r, rtol=1e-4, atol=1e-4)


def test_all_negative_and_tied_windows():
    """Exact ties (all-zero input): first window position, a-bit off, as max_pool2d on all-equal windows."""
    x = torch.zeros(2, 3, 8, 8, device="cuda", dtype=torch.float32)
    w = torch.randn(4, 3, 3, 3, device="cuda")
    for dt, tf32 in ((torch.float32, False), (torch.float32, True), (torch.bfloat16, False)):
        with _tf32(tf32), dk.backend("cuda"):
            y, sw = dk.conv_relu_pool(x.to(dt), w.to(dt), None, -torch.ones(4, device="cuda", dtype=dt), padding=1)
        assert (y == 0).all() and (sw == 0).all(), dt


def test_empty_batch():
    x = torch.randn(0, 3, 8, 8, device="cuda")
    w = torch.randn(4, 3, 3, 3, device="cuda")
    with dk.backend("cuda"):
        y, sw = dk.conv_relu_pool(x, w, padding=1)
    assert y.shape == (0, 4, 4, 4) and sw.shape == (0, 4, 4, 4)


def test_compiled_fullgraph():
    case = REALISTIC[0]
    x, w, scale, shift = _inputs(case)
    x.requires_grad_()

    def f(x):
        y, sw = dk.conv_relu_pool(x, w, scale, shift, padding=1)
        return dk.render(y, sw, w, padding=1, out_size=x.shape[-2:])

    with dk.backend("cuda"):
        out = torch.compile(f, fullgraph=True)(x)
        out.float().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad.float()).all()
