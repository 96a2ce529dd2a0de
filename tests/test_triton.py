"""The Triton backend against the reference semantics.

On CPU these run under TRITON_INTERPRET=1 (set by conftest.py), so every case is tiny: the
interpreter executes programs one after another in numpy. The ``gpu`` tests run the compiled
kernels at realistic shapes (bench/device_check.sh runs them).

Expected values are computed in float64 from the same inputs. Switches are compared only where the
window's top two pre-activations are clearly apart (eager.window_gap); gradients are compared given
the switches the kernel recorded (the switches are constants of the op), so near-ties cannot make a
correct kernel fail.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

import drmm_kernels as dk
from drmm_kernels import reference

import eager

triton_backend = pytest.importorskip("drmm_kernels.triton")
if not triton_backend.status()[0]:
    pytest.skip(f"triton backend unavailable: {triton_backend.status()[1]}", allow_module_level=True)

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}


@pytest.fixture(autouse=True)
def _exact_fp32(request):
    """Tiny-shape tests compare fp32 at 1e-4, so TF32 (which the kernels follow from cuDNN's flag) is
    switched off for them on a GPU; the realistic-shape ``gpu`` tests keep the default and its tolerance."""
    before = torch.backends.cudnn.allow_tf32
    if "gpu" not in request.keywords:
        torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = before


@dataclass(frozen=True)
class Case:
    n: int
    cin: int
    cout: int
    h: int
    w: int
    k: int
    pad: int
    stride: int = 1
    pool: int = 2
    slope: float = 0.0
    scale: bool = True          # scale with negative entries + shift
    channels_last: bool = False
    dtype: torch.dtype = torch.float32

    def __str__(self):
        dt = str(self.dtype).split(".")[-1]
        return (f"n{self.n}c{self.cin}-{self.cout}_{self.h}x{self.w}_k{self.k}p{self.pad}s{self.stride}"
                f"pool{self.pool}{'_leaky' if self.slope else ''}{'_cl' if self.channels_last else ''}"
                f"{'' if self.scale else '_noscale'}_{dt}")


CASES = [
    Case(2, 3, 8, 9, 10, 3, 1),                                    # small C_in (flattened K), odd width
    Case(2, 1, 16, 7, 8, 5, 4),                                    # MNIST layer 1: C_in = 1, 5x5, full padding
    Case(2, 18, 20, 9, 9, 3, 2, stride=2),                         # channel blocks with a masked tail, stride 2
    Case(2, 16, 12, 8, 7, 3, 0, slope=0.1, channels_last=True),   # valid conv, leaky, channels_last
    Case(1, 20, 10, 5, 6, 1, 0, pool=1, scale=False),              # 1x1, no pooling, C_out = 10
    Case(2, 4, 6, 11, 10, 3, 1, stride=2, pool=3, slope=0.2),      # pool 3 with dropped trailing rows
    Case(2, 16, 16, 6, 7, 3, 1, dtype=torch.bfloat16),
    Case(2, 3, 16, 7, 6, 5, 2, dtype=torch.float16, channels_last=True),
]


def _inputs(c: Case, seed: int = 0, device: str = DEV):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(c.n, c.cin, c.h, c.w, generator=g)
    w = torch.randn(c.cout, c.cin, c.k, c.k, generator=g) / (c.cin * c.k * c.k) ** 0.5
    scale = shift = None
    if c.scale:
        scale = torch.randn(c.cout, generator=g)          # about half negative
        shift = 0.3 * torch.randn(c.cout, generator=g)
    cast = lambda t: None if t is None else t.to(device=device, dtype=c.dtype)  # noqa: E731
    x, w, scale, shift = cast(x), cast(w), cast(scale), cast(shift)
    if c.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, w, scale, shift


def _d(t):
    return None if t is None else t.detach().double().cpu()


def _close(actual, expected, dtype, what):
    tol = TOL[dtype]
    actual = actual.detach().double().cpu()
    expected = expected.detach().double().cpu()
    # absolute part scaled by the magnitude of the result: long fp32 sums round relative to their size
    atol = tol * max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual, expected, rtol=tol, atol=atol, msg=lambda m: f"{what}: {m}")


def _expected_forward(c: Case, x, w, scale, shift):
    v = eager.pre_activation(_d(x), _d(w), _d(scale), _d(shift), c.stride, c.pad)
    y, sw = reference.pool_switches(v, c.pool, c.slope)
    return v, y, sw


def _check_switches(sw, sw_ref, v, pool, dtype):
    gap = eager.window_gap(v, pool)
    clear = gap > (1e-3 if dtype == torch.float32 else 1e-2) * max(1.0, v.abs().max().item())
    assert clear.float().mean() > 0.5, "test data has too many near-ties to check switches"
    sw, sw_ref = sw.cpu(), sw_ref.cpu()
    assert torch.equal(sw[clear] & 0x0F, sw_ref[clear] & 0x0F), "window offsets differ"
    assert torch.equal((sw & 0x70), torch.zeros_like(sw)), "bits 4-6 must be zero"


def _at(v, sw, pool):
    """v read at the kernel's recorded offsets (differentiable in v)."""
    n, c = sw.shape[:2]
    idx = reference.switches_to_indices(sw.cpu(), pool, v.shape[-2:]).reshape(n, c, -1)
    return v.reshape(n, c, -1).gather(2, idx).view(sw.shape)


def _selected(v, sw, pool, slope):
    return eager.act(_at(v, sw, pool), slope)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_conv_relu_pool_forward_and_gradients(case: Case):
    x, w, scale, shift = _inputs(case)
    leaves = [t.requires_grad_() for t in (x, w, scale, shift) if t is not None]
    with dk.backend("triton"):
        y, sw = dk.conv_relu_pool(x, w, scale, shift, stride=case.stride, padding=case.pad, pool=case.pool,
                                  negative_slope=case.slope)
    assert y.dtype == case.dtype and sw.dtype == torch.uint8 and y.is_contiguous()
    v, y_ref, sw_ref = _expected_forward(case, x, w, scale, shift)
    assert y.shape == y_ref.shape and sw.shape == y.shape
    _close(y, y_ref, case.dtype, "y")
    _check_switches(sw, sw_ref, v, case.pool, case.dtype)
    # a bit (bit 7) must agree with the sign of the kernel's own window max wherever it is not ~0
    on = (sw.cpu() & 0x80) != 0
    pre = _at(v, sw, case.pool)
    firm = pre.abs() > 1e-2
    assert torch.equal(on[firm], (pre > 0)[firm])

    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y)
    (y.float() * gy.float()).sum().backward()
    # expected gradients given the recorded switches, in float64
    ref_leaves = [_d(t).requires_grad_() for t in leaves]
    it = iter(ref_leaves)
    xd, wd = next(it), next(it)
    sd = next(it) if scale is not None else None
    hd = next(it) if shift is not None else None
    vd = eager.pre_activation(xd, wd, sd, hd, case.stride, case.pad)
    (_selected(vd, sw, case.pool, case.slope) * _d(gy)).sum().backward()
    for name, got, exp in zip(("x", "weight", "scale", "shift"), leaves, ref_leaves):
        _close(got.grad, exp.grad, case.dtype, f"grad {name}")


@pytest.mark.parametrize("case", [CASES[0], CASES[2], CASES[3], CASES[5], CASES[6]], ids=str)
def test_render_and_gradients(case: Case):
    x, w, scale, _ = _inputs(case)
    with dk.backend("triton"):
        y, sw = dk.conv_relu_pool(x, w, stride=case.stride, padding=case.pad, pool=case.pool,
                                  negative_slope=case.slope)
    g = torch.Generator().manual_seed(2)
    mu = torch.randn(y.shape, generator=g).to(y).requires_grad_()
    w.requires_grad_()
    if scale is not None:
        scale.requires_grad_()
    out_hw = (case.h, case.w)
    with dk.backend("triton"):
        xh = dk.render(mu, sw, w, scale, stride=case.stride, padding=case.pad, pool=case.pool, out_size=out_hw,
                       negative_slope=case.slope)
    assert xh.shape == (case.n, case.cin, case.h, case.w) and xh.is_contiguous()
    mud, wd = _d(mu).requires_grad_(), _d(w).requires_grad_()
    sd = _d(scale).requires_grad_() if scale is not None else None
    xh_ref = reference.render(mud, sw.cpu(), wd, sd, case.stride, case.pad, case.pool, out_hw, case.slope)
    _close(xh, xh_ref, case.dtype, "render")

    # against the eager composition as well (max_unpool2d + mask + conv_transpose2d)
    chw = reference.conv_size(out_hw, (case.k, case.k), case.stride, case.pad)
    idx = reference.switches_to_indices(sw.cpu(), case.pool, chw)
    fac = reference.activation_factor(sw.cpu(), case.slope, torch.float64)
    xh_eager = eager.render(_d(mu), idx, _d(w), out_hw, fac, _d(scale), case.stride, case.pad, case.pool, chw)
    _close(xh, xh_eager, case.dtype, "render vs eager")

    gout = torch.randn(xh.shape, generator=g).to(xh)
    (xh.float() * gout.float()).sum().backward()
    (xh_ref * _d(gout)).sum().backward()
    _close(mu.grad, mud.grad, case.dtype, "grad mu")
    _close(w.grad, wd.grad, case.dtype, "grad weight")
    if scale is not None:
        _close(scale.grad, sd.grad, case.dtype, "grad scale")


@pytest.mark.parametrize("case", [CASES[1], CASES[3], CASES[5]], ids=str)
def test_gather_conv_and_wgrad_primitives(case: Case):
    x, w, scale, shift = _inputs(case)
    y, sw = triton_backend.conv_relu_pool(x, w, scale, shift, case.stride, case.pad, case.pool, case.slope)
    got = triton_backend.gather_conv(x, w, sw, case.stride, case.pad, case.pool)
    exp = reference.gather_conv(_d(x), _d(w), sw.cpu(), case.stride, case.pad, case.pool)
    _close(got, exp, case.dtype, "gather_conv")
    mu = torch.randn(y.shape, generator=torch.Generator().manual_seed(3)).to(y)
    got = triton_backend.render_wgrad(x, mu, sw, scale, case.stride, case.pad, case.pool, case.slope,
                                      (case.k, case.k))
    exp = reference.render_wgrad(_d(x), _d(mu), sw.cpu(), _d(scale), case.stride, case.pad, case.pool,
                                 case.slope, (case.k, case.k))
    assert got.shape == w.shape and got.dtype == w.dtype
    _close(got, exp, case.dtype, "render_wgrad")


def test_all_negative_windows_and_nan():
    case = Case(1, 3, 4, 6, 6, 3, 1)
    x, w, _, _ = _inputs(case)
    shift = torch.full((4,), -50.0, device=DEV)  # every window max < 0: y = 0, a bit off, argmax still recorded
    x[0, 1, 2, 3] = float("nan")                  # NaN wins its windows, as in max_pool2d
    y, sw = triton_backend.conv_relu_pool(x, w, None, shift, 1, 1, 2, 0.0)
    v = eager.pre_activation(_d(x), _d(w), None, _d(shift), 1, 1)
    y_ref, sw_ref = reference.pool_switches(v, 2, 0.0)
    nan = torch.isnan(y_ref)
    assert nan.any() and torch.equal(torch.isnan(y.cpu()), nan)
    assert torch.equal(y.cpu()[~nan].double(), y_ref[~nan])
    assert torch.equal(sw.cpu()[nan], sw_ref[nan]), "NaN windows: last NaN offset, a bit off"
    assert ((sw.cpu() & 0x80) == 0).all()
    clear = (eager.window_gap(torch.nan_to_num(v, nan=0.0), 2) > 1e-3) & ~nan
    assert clear.any() and torch.equal(sw.cpu()[clear], sw_ref[clear])


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy's inf * 0 in the interpreter
@pytest.mark.parametrize("slope", [0.0, 0.1])
def test_render_and_wgrad_select_like_relu_backward(slope):
    # Where the a bit is off under ReLU the pooled gradient contributes 0 even when it is infinite (a multiply by
    # 0 would make NaN): render and render_wgrad must stay finite; with a leaky slope the inf passes on.
    case = Case(1, 2, 3, 6, 6, 3, 1)
    x, w, _, _ = _inputs(case)
    y, sw = triton_backend.conv_relu_pool(x, w, None, None, 1, 1, 2, slope)
    mu = torch.randn(y.shape, generator=torch.Generator().manual_seed(4)).to(y)
    off = (sw & 0x80) == 0
    assert off.any() and (~off).any()
    mu[off] = float("inf")
    got_r = triton_backend.render(mu, sw, w, None, 1, 1, 2, (6, 6), slope)
    got_w = triton_backend.render_wgrad(x, mu, sw, None, 1, 1, 2, slope, (3, 3))
    exp_r = reference.render(_d(mu), sw.cpu(), _d(w), None, 1, 1, 2, (6, 6), slope)
    if slope == 0.0:
        assert torch.isfinite(got_r).all() and torch.isfinite(got_w).all()
        _close(got_r, exp_r, case.dtype, "render")
    else:
        assert torch.isinf(got_r).any() or torch.isnan(got_r).any()


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("slope", [0.0, 0.1])
def test_bn_pool_and_conv_bn_relu_pool(channels_last, slope):
    case = Case(2, 5, 6, 7, 9, 3, 1, slope=slope, channels_last=channels_last)
    x, w, scale, shift = _inputs(case)
    z = F.conv2d(x, w, None, 1, 1)
    y, sw = triton_backend.bn_pool(z, scale, shift, 2, slope)
    v = eager.pre_activation(_d(x), _d(w), _d(scale), _d(shift), 1, 1)
    y_ref, sw_ref = reference.pool_switches(v, 2, slope)
    _close(y, y_ref, torch.float32, "bn_pool")
    _check_switches(sw, sw_ref, v, 2, torch.float32)

    for training in (True, False):
        rm, rv = torch.zeros(6, device=DEV), torch.ones(6, device=DEV)
        outs = {}
        for name in ("triton", "reference"):
            leaves = [t.detach().clone().requires_grad_() for t in (x, w, scale, shift)]
            with dk.backend(name):
                yb, swb = dk.conv_bn_relu_pool(*leaves, rm.clone(), rv.clone(), training=training, padding=1,
                                               negative_slope=slope)
            (yb * torch.linspace(-1, 1, yb.numel(), device=DEV).view_as(yb)).sum().backward()
            outs[name] = (yb, swb, [t.grad for t in leaves])
        (yt, swt, gt), (yr, swr, gr) = outs["triton"], outs["reference"]
        assert torch.equal(swt, swr), "random data: no near-ties expected"
        _close(yt, yr, torch.float32, f"conv_bn_relu_pool training={training}")
        for name, a, b in zip(("x", "weight", "bn_weight", "bn_bias"), gt, gr):
            _close(a, b, torch.float32, f"grad {name} training={training}")


def test_float64_falls_back_to_reference():
    x = torch.randn(1, 2, 5, 5, dtype=torch.float64, device=DEV)
    w = torch.randn(3, 2, 3, 3, dtype=torch.float64, device=DEV)
    y, sw = triton_backend.conv_relu_pool(x, w, None, None, 1, 1, 2, 0.0)
    y_ref, sw_ref = reference.conv_relu_pool(x, w, None, None, 1, 1, 2, 0.0)
    assert torch.equal(y, y_ref) and torch.equal(sw, sw_ref)


def test_kernels_compile_for_sm90():
    """The interpreter never runs the compiler; build PTX/cubin for sm_90 (first config of each kernel
    variant) in a subprocess without TRITON_INTERPRET, with triton's bundled ptxas."""
    import os
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["DRMM_TRITON_AUTOTUNE"] = "0"
    proc = subprocess.run([sys.executable, "-m", "drmm_kernels.triton._aot"], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]


# --------------------------------------------------------------------------- GPU, realistic shapes

GPU_CASES = [
    # MNIST conv_small layer 2-like at 28x28, and layer 1 (C_in = 1, 5x5 full)
    Case(256, 32, 64, 28, 28, 3, 1),
    Case(256, 32, 64, 28, 28, 3, 1, dtype=torch.bfloat16),
    Case(256, 1, 32, 28, 28, 5, 4),
    # CIFAR-10 9-layer: layer 3 (96ch, full, pool) and layer 6 (192ch, valid, pool)
    Case(256, 96, 96, 34, 34, 3, 2, scale=False, dtype=torch.bfloat16),
    Case(256, 192, 192, 18, 18, 3, 0, scale=False, channels_last=True),
    Case(256, 96, 192, 16, 16, 3, 1, stride=2, slope=0.1),
]


def _rel_err(a, b):
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-6)).item()


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=str)
def test_gpu_realistic(case: Case):
    x, w, scale, shift = _inputs(case, device="cuda")
    tol = 2e-2 if case.dtype != torch.float32 else 5e-3  # TF32 (cudnn default) on both sides
    leaves = [t.requires_grad_() for t in (x, w, scale, shift) if t is not None]
    with dk.backend("triton"):
        y, sw = dk.conv_relu_pool(x, w, scale, shift, stride=case.stride, padding=case.pad, pool=case.pool,
                                  negative_slope=case.slope)
    v = eager.pre_activation(x.detach().double(), w.detach().double(), _dc(scale), _dc(shift), case.stride,
                             case.pad)
    y_ref, sw_ref = reference.pool_switches(v, case.pool, case.slope)
    assert _rel_err(y, y_ref) < tol
    gap = eager.window_gap(v, case.pool)
    clear = gap > 2e-2 * v.abs().max()
    agree = ((sw & 0x0F) == (sw_ref & 0x0F))[clear].float().mean().item()
    assert agree == 1.0, f"switch offsets agree on {agree:.6f} of clear windows"

    gy = torch.randn_like(y)
    (y.float() * gy.float()).sum().backward()
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    it = iter(ref_leaves)
    xd, wd = next(it), next(it)
    sd = next(it) if scale is not None else None
    hd = next(it) if shift is not None else None
    vd = eager.pre_activation(xd, wd, sd, hd, case.stride, case.pad)
    n, c = sw.shape[:2]
    idx = reference.switches_to_indices(sw, case.pool, vd.shape[-2:]).reshape(n, c, -1)
    sel = eager.act(vd, case.slope).reshape(n, c, -1).gather(2, idx).view(sw.shape)
    (sel * gy.double()).sum().backward()
    for name, got, exp in zip(("x", "weight", "scale", "shift"), leaves, ref_leaves):
        assert _rel_err(got.grad, exp.grad) < tol, name

    # the top-down pass (raw weight), against max_unpool2d + mask + conv_transpose2d in float64
    mu = torch.randn_like(y).detach()
    with dk.backend("triton"):
        xh = dk.render(mu, sw, w.detach(), stride=case.stride, padding=case.pad, pool=case.pool,
                       out_size=(case.h, case.w), negative_slope=case.slope)
    xh_ref = reference.render(mu.double(), sw, w.detach().double(), None, case.stride, case.pad, case.pool,
                              (case.h, case.w), case.slope)
    assert _rel_err(xh, xh_ref) < tol


def _dc(t):
    return None if t is None else t.detach().double()


@pytest.mark.gpu
def test_gpu_compiled_fullgraph():
    case = GPU_CASES[0]
    x, w, scale, shift = _inputs(case, device="cuda")
    x.requires_grad_()

    def f(x):
        y, sw = dk.conv_relu_pool(x, w, scale, shift, padding=1)
        return dk.render(y, sw, w, padding=1, out_size=x.shape[-2:])

    with dk.backend("triton"):
        out = torch.compile(f, fullgraph=True)(x)
        out.sum().backward()
        ref = f(x.detach())
    assert _rel_err(out, ref) < 1e-5
    assert x.grad is not None and torch.isfinite(x.grad).all()
