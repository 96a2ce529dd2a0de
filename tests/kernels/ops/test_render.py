"""The render op, every layer, with its two adjoints (gather_conv, render_wgrad): the public op against eager
PyTorch on every CPU-capable backend, then each backend's kernels against the reference backend.
"""

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

import drmm_kernels as dk
from drmm_kernels import reference
from drmm_kernels import testing as eager

import cpu_cases as cpu
import cuda_cases as cuda
import op_cases as oc
import triton_cases as trt
from drmm_kernels.contract import plain_pool  # noqa: E402


# --------------------------------------------------------------------------- public op vs eager, every backend


@pytest.mark.parametrize("backend", oc.BACKENDS)
@given(case=oc.conv_cases())
def test_render_is_the_eager_input_gradient(backend, case):
    """render(g, switches, w, scale) == d/dx of <g, max_pool2d(act(conv2d(x)*scale+shift))>, eager autograd."""
    x, w, scale, shift = oc.make(case)
    with dk.backend(backend):
        y, sw = dk.conv_relu_pool(
            x.detach(),
            w.detach(),
            None if scale is None else scale.detach(),
            None if shift is None else shift.detach(),
            **oc.kwargs(case),
        )
        g = torch.randn_like(y)
        x_hat = dk.render(
            g,
            sw,
            w.detach(),
            None if scale is None else scale.detach(),
            stride=case["stride"],
            padding=case["padding"],
            pool=case["pool"],
            out_size=x.shape[-2:],
            negative_slope=case["slope"],
        )
    y_e, idx_e = eager.conv_relu_pool(x, w, scale, shift, case["stride"], case["padding"], case["pool"], case["slope"])
    # Only where both implementations picked the same window position is the gradient comparable (pool 1: no
    # window, eager returns no indices).
    if idx_e is not None:
        conv_hw = reference.conv_size(tuple(x.shape[-2:]), (case["k"], case["k"]), case["stride"], case["padding"])
        idx = dk.switches_to_indices(sw, pool=case["pool"], conv_size=conv_hw)
        assume(torch.equal(idx, idx_e))
    (gx_e,) = torch.autograd.grad(y_e, x, g)
    torch.testing.assert_close(x_hat, gx_e, **eager.TOL[case["dtype"]])


@pytest.mark.parametrize("backend", oc.BACKENDS)
@given(case=oc.conv_cases())
def test_render_matches_unpool_mask_conv_transpose(backend, case):
    """The top-down pass (raw weight, no scale) and its gradients against max_unpool2d + mask + conv_transpose2d."""
    x, w, scale, shift = oc.make(case, requires_grad=False)
    with dk.backend(backend):
        y, sw = dk.conv_relu_pool(x, w, scale, shift, **oc.kwargs(case))
    conv_hw = reference.conv_size(tuple(x.shape[-2:]), (case["k"], case["k"]), case["stride"], case["padding"])
    idx = dk.switches_to_indices(sw, pool=case["pool"], conv_size=conv_hw)
    dt = case["dtype"]
    a = torch.where((sw & 0x80) != 0, torch.tensor(1.0, dtype=dt), torch.tensor(case["slope"], dtype=dt))
    mu = torch.randn_like(y).requires_grad_(True)
    w = w.clone().requires_grad_(True)
    s = None if scale is None else scale.clone().requires_grad_(True)
    with dk.backend(backend):
        out = dk.render(
            mu,
            sw,
            w,
            s,
            stride=case["stride"],
            padding=case["padding"],
            pool=case["pool"],
            out_size=x.shape[-2:],
            negative_slope=case["slope"],
        )
    out_e = eager.render(mu, idx, w, x.shape[-2:], a, s, case["stride"], case["padding"], case["pool"], conv_hw)
    tol = eager.TOL[case["dtype"]]
    torch.testing.assert_close(out, out_e, **tol)
    go = torch.randn_like(out_e)
    leaves = [t for t in (mu, w, s) if t is not None]
    for name, a_, b_ in zip(
        ("mu", "weight", "scale"),
        torch.autograd.grad((out * go).sum(), leaves),
        torch.autograd.grad((out_e * go).sum(), leaves),
    ):
        torch.testing.assert_close(a_, b_, **tol, msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("backend", oc.BACKENDS)
@pytest.mark.parametrize("stride", [1, 2])
def test_gradcheck_render(backend, stride):
    x, w, scale, shift = oc.small()
    with dk.backend(backend):
        y, sw = dk.conv_relu_pool(x, w, scale, shift, stride=stride, padding=1, negative_slope=0.1)
        mu = torch.randn_like(y).requires_grad_(True)
        assert torch.autograd.gradcheck(
            lambda m, wt, s: dk.render(
                m, sw, wt, s, stride=stride, padding=1, out_size=x.shape[-2:], negative_slope=0.1
            ),
            (mu, w, scale),
        )


@pytest.mark.parametrize("backend", oc.BACKENDS)
def test_odd_sizes_drop_trailing_rows_and_render_zeros_them(backend):
    x = torch.randn(1, 2, 7, 9, dtype=torch.float64)
    w = torch.randn(3, 2, 1, 1, dtype=torch.float64)
    with dk.backend(backend):
        y, sw = dk.conv_relu_pool(x, w)
        out = dk.render(torch.ones_like(y), sw, torch.eye(3, 2, dtype=torch.float64).view(3, 2, 1, 1), out_size=(7, 9))
    assert y.shape == (1, 3, 3, 4)
    assert out[..., 6, :].abs().sum() == 0 and out[..., :, 8].abs().sum() == 0


def test_render_bad_input():
    x, w = oc.base()
    y, sw = dk.conv_relu_pool(x, w, padding=1)
    cases = [
        (dict(switches=sw.long()), TypeError, ["switches", "uint8", "int64"]),
        (dict(switches=sw[:, :2]), ValueError, ["switches shape", "2x2x4x4", "mu shape", "2x4x4x4"]),
        (dict(weight=w[:3]), ValueError, ["weight", "3 output channels", "mu has 4 channels"]),
        (dict(out_size=(12, 12)), ValueError, ["out_size (12, 12)", "(6, 6)", "(4, 4)"]),
        (dict(out_size=5), ValueError, ["out_size", "(H, W)"]),
        (dict(mu=y[0]), ValueError, ["mu", "4-D"]),
        (dict(scale=torch.ones(2)), ValueError, ["scale", "4 elements"]),
    ]
    for change, exc, words in cases:
        args = dict(mu=y, switches=sw, weight=w, scale=None, out_size=(8, 8))
        args.update(change)
        with pytest.raises(exc) as info:
            dk.render(args["mu"], args["switches"], args["weight"], args["scale"], padding=1, out_size=args["out_size"])
        for word in words:
            assert word in str(info.value), (word, str(info.value))
        assert str(info.value).startswith("drmm_kernels.render: "), str(info.value)


_CHECKED = oc.BACKENDS + (["triton"] if dk.available_backends()["triton"] else [])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", _CHECKED)
def test_render_refuses_a_malformed_switch_byte_on_every_backend(backend, dtype):
    """A byte whose offset lies outside its window, or in the pool padding, is an error on every backend and
    dtype (bfloat16 on the cpu backend falls back to the reference), before any kernel runs (the Triton and CUDA
    kernels would drop its value, the reference route it elsewhere); ``check_switches=False`` skips the pass."""
    x, w = oc.base()
    x, w = x.to(dtype), w.to(dtype)
    cases = [
        (dict(), 0x8F, "outside the 2x2 window"),  # offset 15 with pool 2: index 111 of a 64-element map
        (dict(pool=3, pool_stride=2, pool_padding=1), 0x80, "into the pool padding"),  # window (0, 0), offset 0
    ]
    for window, byte, words in cases:
        with dk.backend(backend):
            y, sw = dk.conv_relu_pool(x, w, padding=1, **window)
            sw = sw.clone()
            sw[0, 0, 0, 0] = byte
            with pytest.raises(ValueError, match=r"^drmm_kernels.render: switches holds byte") as info:
                dk.render(y, sw, w, padding=1, out_size=(8, 8), **window)
            assert words in str(info.value), str(info.value)
    if backend == "reference":
        # unchecked, the reference routes the byte to another window's position instead of raising
        with dk.backend(backend):
            y, sw = dk.conv_relu_pool(x, w, padding=1)
            sw = sw.clone()
            sw[0, 0, 0, 0] = 0x83 + 4  # offset 7: (3, 1) of a 2x2 window, i.e. the next window row's (1, 1)
            out = dk.render(y, sw, w, padding=1, out_size=(8, 8), check_switches=False)
        assert out.shape == x.shape


def test_resolve_backend_names_the_backend_auto_picks():
    with dk.backend("reference"):
        assert dk.resolve_backend("cpu") == "reference"
    with dk.backend("auto"):
        expected = "cpu" if dk.available_backends()["cpu"].available else "reference"
        assert dk.resolve_backend(torch.device("cpu")) == expected


# --------------------------------------------------------------------------- cpu kernels


@pytest.mark.cpu_backend
@given(cpu.geometry(), st.booleans())
def test_cpu_render_matches_reference(g, use_scale):
    gen, _, wt, scale, _ = cpu.make_inputs(g)
    hp, wp = g["hc"] // g["pool"], g["wc"] // g["pool"]
    mu = torch.randn(g["n"], g["cout"], hp, wp, generator=gen, dtype=g["dtype"])
    sw = cpu.random_switches(mu.shape, g["pool"], gen)
    scale = scale if use_scale else None
    # Any output size that maps back to this conv size (output_padding up to stride - 1).
    args = dict(
        stride=g["stride"],
        padding=g["pad"],
        **plain_pool(g["pool"]),
        out_h=g["h"],
        out_w=g["w"],
        negative_slope=g["slope"],
        scale=scale,
    )
    out = cpu.kernels.render(
        mu=cpu.layout(mu, g["layout"]), switches=cpu.layout(sw, g["layout"]), weight=cpu.layout(wt, g["layout"]), **args
    )
    ref = reference.render(mu=mu, switches=sw, weight=wt, **args)
    assert out.shape == (g["n"], g["cin"], g["h"], g["w"]) and out.is_contiguous()
    torch.testing.assert_close(out, ref, **cpu.TOL[g["dtype"]])


@pytest.mark.cpu_backend
@given(cpu.geometry())
def test_cpu_gather_conv_matches_reference(g):
    gen, x, wt, _, _ = cpu.make_inputs(g)
    hp, wp = g["hc"] // g["pool"], g["wc"] // g["pool"]
    sw = cpu.random_switches((g["n"], g["cout"], hp, wp), g["pool"], gen)
    args = dict(weight=wt, switches=sw, stride=g["stride"], padding=g["pad"], **plain_pool(g["pool"]))
    out = cpu.kernels.gather_conv(src=cpu.layout(x, g["layout"]), **args)
    torch.testing.assert_close(out, reference.gather_conv(src=x, **args), **cpu.TOL[g["dtype"]])


@pytest.mark.cpu_backend
@given(cpu.geometry(), st.booleans())
def test_cpu_render_wgrad_matches_reference(g, use_scale):
    gen, x, wt, scale, _ = cpu.make_inputs(g)
    hp, wp = g["hc"] // g["pool"], g["wc"] // g["pool"]
    mu = torch.randn(g["n"], g["cout"], hp, wp, generator=gen, dtype=g["dtype"])
    sw = cpu.random_switches(mu.shape, g["pool"], gen)
    scale = scale if use_scale else None
    args = dict(
        switches=sw,
        scale=scale,
        stride=g["stride"],
        padding=g["pad"],
        **plain_pool(g["pool"]),
        negative_slope=g["slope"],
        kernel_h=g["k"],
        kernel_w=g["k"],
    )
    out = cpu.kernels.render_wgrad(src=cpu.layout(x, g["layout"]), mu=cpu.layout(mu, g["layout"]), **args)
    ref = reference.render_wgrad(src=x, mu=mu, **args)
    assert out.shape == wt.shape and out.is_contiguous()
    torch.testing.assert_close(out, ref, rtol=cpu.TOL[g["dtype"]]["rtol"], atol=10 * cpu.TOL[g["dtype"]]["atol"])


@pytest.mark.cpu_backend
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "cin,k,pool,stride,pad",
    [
        (20, 3, 2, 1, 1),
        (64, 3, 2, 1, 2),
        (33, 5, 3, 2, 2),
        (40, 1, 2, 1, 0),
        (17, 3, 1, 1, 1),
        (1, 5, 2, 1, 2),
        (3, 5, 2, 2, 1),
    ],
)
def test_cpu_sparse_kernels_vector_paths(dtype, cin, k, pool, stride, pad):
    # Rows of k*C_in values long enough for the 16/8/4/2/1-vector blocks and their scalar tails; the last two are
    # image layers, whose rows are shorter than two vectors: gather_conv takes its dense path there.
    gen = torch.Generator().manual_seed(cin)
    n, cout, h, w = 3, 12, 11, 10
    hc, wc = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
    x = torch.randn(n, cin, h, w, generator=gen, dtype=dtype)
    wt = torch.randn(cout, cin, k, k, generator=gen, dtype=dtype)
    scale = torch.randn(cout, generator=gen, dtype=dtype)
    mu = torch.randn(n, cout, hc // pool, wc // pool, generator=gen, dtype=dtype)
    sw = cpu.random_switches(mu.shape, pool, gen)
    tol = dict(rtol=1e-4, atol=1e-3) if dtype == torch.float32 else cpu.TOL[dtype]
    geo = dict(stride=stride, padding=pad, **plain_pool(pool))
    for slope in (0.0, 0.1):
        render = dict(mu=mu, switches=sw, weight=wt, scale=scale, out_h=h, out_w=w, negative_slope=slope, **geo)
        torch.testing.assert_close(cpu.kernels.render(**render), reference.render(**render), **tol)
        wgrad = dict(src=x, mu=mu, switches=sw, scale=scale, negative_slope=slope, kernel_h=k, kernel_w=k, **geo)
        torch.testing.assert_close(cpu.kernels.render_wgrad(**wgrad), reference.render_wgrad(**wgrad), **tol)
    gather = dict(src=x, weight=wt, switches=sw, **geo)
    torch.testing.assert_close(cpu.kernels.gather_conv(**gather), reference.gather_conv(**gather), **tol)


@pytest.mark.cpu_backend
def test_cpu_render_of_forward_switches_is_input_gradient():
    # With scale, render(g, switches) is d/dx of conv_relu_pool; check against autograd of the reference.
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 12, 12, generator=gen, dtype=torch.float64, requires_grad=True)
    wt = torch.randn(6, 5, 3, 3, generator=gen, dtype=torch.float64)
    scale = torch.randn(6, generator=gen, dtype=torch.float64)
    shift = torch.randn(6, generator=gen, dtype=torch.float64)
    geo = dict(stride=1, padding=1, **plain_pool(2), negative_slope=0.1)
    y, sw = cpu.kernels.conv_relu_pool(x=x.detach(), weight=wt, scale=scale, shift=shift, **geo)
    gy = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    yr, _ = reference.conv_relu_pool(x=x, weight=wt, scale=scale, shift=shift, **geo)
    (gx,) = torch.autograd.grad(yr, x, gy)
    torch.testing.assert_close(
        cpu.kernels.render(mu=gy, switches=sw, weight=wt, scale=scale, out_h=12, out_w=12, **geo), gx
    )


# --------------------------------------------------------------------------- triton kernels


@pytest.mark.triton
@pytest.mark.parametrize("case", [trt.CASES[0], trt.CASES[2], trt.CASES[3], trt.CASES[5], trt.CASES[6]], ids=str)
def test_triton_render_and_gradients(case: trt.Case):
    x, w, scale, _ = trt.inputs(case)
    with dk.backend("triton"):
        y, sw = dk.conv_relu_pool(x, w, stride=case.stride, padding=case.pad, pool=case.pool, negative_slope=case.slope)
    g = torch.Generator().manual_seed(2)
    mu = torch.randn(y.shape, generator=g).to(y).requires_grad_()
    w.requires_grad_()
    if scale is not None:
        scale.requires_grad_()
    out_hw = (case.h, case.w)
    with dk.backend("triton"):
        xh = dk.render(
            mu,
            sw,
            w,
            scale,
            stride=case.stride,
            padding=case.pad,
            pool=case.pool,
            out_size=out_hw,
            negative_slope=case.slope,
        )
    assert xh.shape == (case.n, case.cin, case.h, case.w) and xh.is_contiguous()
    mud, wd = trt.d(mu).requires_grad_(), trt.d(w).requires_grad_()
    sd = trt.d(scale).requires_grad_() if scale is not None else None
    xh_ref = reference.render(
        mu=mud,
        switches=sw.cpu(),
        weight=wd,
        scale=sd,
        stride=case.stride,
        padding=case.pad,
        **plain_pool(case.pool),
        out_h=case.h,
        out_w=case.w,
        negative_slope=case.slope,
    )
    trt.close(xh, xh_ref, case.dtype, "render")

    # against the eager composition as well (max_unpool2d + mask + conv_transpose2d)
    chw = reference.conv_size(out_hw, (case.k, case.k), case.stride, case.pad)
    idx = reference.switches_to_indices(sw.cpu(), case.pool, chw)
    fac = reference.activation_factor(sw.cpu(), case.slope, torch.float64)
    xh_eager = eager.render(trt.d(mu), idx, trt.d(w), out_hw, fac, trt.d(scale), case.stride, case.pad, case.pool, chw)
    trt.close(xh, xh_eager, case.dtype, "render vs eager")

    gout = torch.randn(xh.shape, generator=g).to(xh)
    (xh.float() * gout.float()).sum().backward()
    (xh_ref * trt.d(gout)).sum().backward()
    trt.close(mu.grad, mud.grad, case.dtype, "grad mu")
    trt.close(w.grad, wd.grad, case.dtype, "grad weight")
    if scale is not None:
        trt.close(scale.grad, sd.grad, case.dtype, "grad scale")


@pytest.mark.triton
@pytest.mark.parametrize("case", [trt.CASES[1], trt.CASES[3], trt.CASES[5]], ids=str)
def test_triton_gather_conv_and_wgrad_primitives(case: trt.Case):
    x, w, scale, shift = trt.inputs(case)
    geo = dict(stride=case.stride, padding=case.pad, **plain_pool(case.pool))
    y, sw = trt.kernels.conv_relu_pool(x=x, weight=w, scale=scale, shift=shift, negative_slope=case.slope, **geo)
    got = trt.kernels.gather_conv(src=x, weight=w, switches=sw, **geo)
    exp = reference.gather_conv(src=trt.d(x), weight=trt.d(w), switches=sw.cpu(), **geo)
    trt.close(got, exp, case.dtype, "gather_conv")
    mu = torch.randn(y.shape, generator=torch.Generator().manual_seed(3)).to(y)
    wgrad = dict(negative_slope=case.slope, kernel_h=case.k, kernel_w=case.k, **geo)
    got = trt.kernels.render_wgrad(src=x, mu=mu, switches=sw, scale=scale, **wgrad)
    exp = reference.render_wgrad(src=trt.d(x), mu=trt.d(mu), switches=sw.cpu(), scale=trt.d(scale), **wgrad)
    assert got.shape == w.shape and got.dtype == w.dtype
    trt.close(got, exp, case.dtype, "render_wgrad")


@pytest.mark.triton
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy's inf * 0 in the interpreter
@pytest.mark.parametrize("slope", [0.0, 0.1])
def test_triton_render_and_wgrad_select_like_relu_backward(slope):
    # Where the a bit is off under ReLU the pooled gradient contributes 0 even when it is infinite (a multiply by
    # 0 would make NaN): render and render_wgrad must stay finite; with a leaky slope the inf passes on.
    case = trt.Case(1, 2, 3, 6, 6, 3, 1)
    x, w, _, _ = trt.inputs(case)
    geo = dict(stride=1, padding=1, **plain_pool(2), negative_slope=slope)
    y, sw = trt.kernels.conv_relu_pool(x=x, weight=w, scale=None, shift=None, **geo)
    mu = torch.randn(y.shape, generator=torch.Generator().manual_seed(4)).to(y)
    off = (sw & 0x80) == 0
    assert off.any() and (~off).any()
    mu[off] = float("inf")
    got_r = trt.kernels.render(mu=mu, switches=sw, weight=w, scale=None, out_h=6, out_w=6, **geo)
    got_w = trt.kernels.render_wgrad(src=x, mu=mu, switches=sw, scale=None, kernel_h=3, kernel_w=3, **geo)
    exp_r = reference.render(mu=trt.d(mu), switches=sw.cpu(), weight=trt.d(w), scale=None, out_h=6, out_w=6, **geo)
    if slope == 0.0:
        assert torch.isfinite(got_r).all() and torch.isfinite(got_w).all()
        trt.close(got_r, exp_r, case.dtype, "render")
    else:
        assert torch.isinf(got_r).any() or torch.isnan(got_r).any()


# --------------------------------------------------------------------------- cuda kernels


@pytest.mark.gpu
@pytest.mark.cuda
@pytest.mark.parametrize("case", cuda.CASES, ids=str)
def test_cuda_backward_primitives(case):
    cuda.check_backward_primitives(case)


@pytest.mark.gpu
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_render_and_wgrad_select_like_relu_backward(dtype):
    """An infinite pooled gradient where the a bit is off (ReLU) contributes 0, not inf * 0 = NaN."""
    from drmm_kernels import cuda as cb

    case = cuda.Case(dtype=dtype, scale=False, shift=False)
    x, w, _, _ = cuda.inputs(case)
    geo = dict(stride=1, padding=1, **plain_pool(2), negative_slope=0.0)
    with cuda.tf32(False):
        y, sw = cb.conv_relu_pool(x=x, weight=w, scale=None, shift=None, **geo)
        mu = torch.randn_like(y)
        off = (sw & 0x80) == 0
        assert off.any() and (~off).any()
        mu[off] = float("inf")
        render = dict(mu=mu, switches=sw, weight=w, scale=None, out_h=x.shape[-2], out_w=x.shape[-1], **geo)
        got_r = cb.render(**render)
        got_w = cb.render_wgrad(
            src=x, mu=mu, switches=sw, scale=None, kernel_h=w.shape[-2], kernel_w=w.shape[-1], **geo
        )
    assert torch.isfinite(got_r).all() and torch.isfinite(got_w).all()
    exp_r = reference.render(**render)
    torch.testing.assert_close(got_r, exp_r, rtol=1e-4, atol=1e-4)
