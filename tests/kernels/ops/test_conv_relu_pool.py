"""The conv_relu_pool op, every layer: the public op against eager PyTorch on every CPU-capable backend, then
each backend's kernels against the reference backend (cpu: C++ kernels; triton: interpreter on CPU, compiled on
a GPU; cuda: GPU only).
"""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
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
def test_conv_relu_pool_matches_eager(backend, case):
    x, w, scale, shift = oc.make(case)
    with dk.backend(backend):
        y, sw = dk.conv_relu_pool(x, w, scale, shift, **oc.kwargs(case))
    y_e, idx_e = eager.conv_relu_pool(x, w, scale, shift, case["stride"], case["padding"], case["pool"], case["slope"])
    v = eager.pre_activation(x, w, scale, shift, case["stride"], case["padding"])
    tol = eager.TOL[case["dtype"]]
    assert y.shape == y_e.shape and sw.shape == y.shape and sw.dtype == torch.uint8
    torch.testing.assert_close(y, y_e, **tol)
    oc.check_switches(sw, y_e, idx_e, v, case)

    # Every gradient against autograd through the eager composition.
    gy = torch.randn_like(y_e)
    leaves = [t for t in (x, w, scale, shift) if t is not None]
    grads = torch.autograd.grad((y * gy).sum(), leaves)
    grads_e = torch.autograd.grad((y_e * gy).sum(), leaves)
    for name, a, b in zip(("x", "weight", "scale", "shift"), grads, grads_e):
        torch.testing.assert_close(a, b, **tol, msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("backend", oc.BACKENDS)
@pytest.mark.parametrize("slope", [0.0, 0.1])
def test_gradcheck_conv_relu_pool(backend, slope):
    x, w, scale, shift = oc.small()
    with dk.backend(backend):
        assert torch.autograd.gradcheck(
            lambda *a: dk.conv_relu_pool(*a, padding=1, negative_slope=slope)[0], (x, w, scale, shift)
        )


@pytest.mark.parametrize("backend", oc.BACKENDS)
@pytest.mark.parametrize("use_scale", [False, True])
def test_gradcheck_pointwise_unpooled(backend, use_scale):
    # 1x1 / stride 1 / no padding / pool 1: the backward is written as batched matrix products there
    torch.manual_seed(3)
    x = torch.randn(3, 5, 4, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 5, 1, 1, dtype=torch.float64, requires_grad=True)
    scale = torch.randn(4, dtype=torch.float64, requires_grad=True) if use_scale else None
    shift = torch.randn(4, dtype=torch.float64, requires_grad=True)
    args = (x, w, scale, shift) if use_scale else (x, w, shift)

    def f(*a):
        if not use_scale:
            a = (a[0], a[1], None, a[2])
        return dk.conv_relu_pool(*a, pool=1, negative_slope=0.1)[0]

    with dk.backend(backend):
        assert torch.autograd.gradcheck(f, args)
        assert torch.autograd.gradgradcheck(f, args)


@pytest.mark.parametrize("backend", oc.BACKENDS)
def test_gradgradcheck(backend):
    x, w, scale, shift = oc.small(cin=1, cout=2, h=5, w=4, n=1)
    with dk.backend(backend):
        y, sw = dk.conv_relu_pool(x, w, scale, shift, padding=1, negative_slope=0.1)
        assert torch.autograd.gradgradcheck(
            lambda *a: dk.conv_relu_pool(*a, padding=1, negative_slope=0.1)[0], (x, w, scale, shift)
        )
        mu = torch.randn_like(y).requires_grad_(True)
        assert torch.autograd.gradgradcheck(
            lambda m, wt, s: dk.render(m, sw, wt, s, padding=1, out_size=x.shape[-2:], negative_slope=0.1),
            (mu, w, scale),
        )


@pytest.mark.parametrize("backend", oc.BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ties_pick_first_maximum(backend, dtype):
    # A 1x1 identity conv makes v = x exactly; ties inside windows must resolve to the first (row-major).
    x = torch.tensor(
        [[[[1.0, 1.0, 2.0, 0.5], [1.0, 0.0, 2.0, 2.0], [-1.0, -1.0, 0.0, 0.0], [-1.0, -1.0, 0.0, 0.0]]]], dtype=dtype
    )
    w = torch.ones(1, 1, 1, 1, dtype=dtype)
    with dk.backend(backend):
        y, sw = dk.conv_relu_pool(x, w)
    _, idx_e = F.max_pool2d(x, 2, return_indices=True)
    assert torch.equal(dk.switches_to_indices(sw, pool=2, conv_size=(4, 4)), idx_e)
    assert sw.flatten().tolist() == [0x80, 0x80 | 0, 0, 0]
    assert y.flatten().tolist() == [1.0, 2.0, 0.0, 0.0]


@pytest.mark.parametrize("backend", oc.BACKENDS)
def test_all_negative_windows_record_offset_and_off_bit(backend):
    x = torch.tensor([[[[-3.0, -1.0], [-2.0, -5.0]]]])
    w = torch.ones(1, 1, 1, 1)
    with dk.backend(backend):
        y, sw = dk.conv_relu_pool(x, w)
        y_l, sw_l = dk.conv_relu_pool(x, w, negative_slope=0.1)
    assert sw.item() == 1 and y.item() == 0.0  # offset of the max (-1.0), a bit off
    assert sw_l.item() == 1 and y_l.item() == pytest.approx(-0.1)
    assert F.max_pool2d(x, 2, return_indices=True)[1].item() == 1


@pytest.mark.parametrize("backend", oc.BACKENDS)
def test_nan_propagates_like_max_pool2d(backend):
    x = torch.tensor([[[[1.0, float("nan"), 5.0, 2.0], [3.0, 4.0, 1.0, 0.0]]]])
    w = torch.ones(1, 1, 1, 1)
    with dk.backend(backend):
        y, sw = dk.conv_relu_pool(x, w)
    y_e, idx_e = F.max_pool2d(x, 2, return_indices=True)
    assert torch.isnan(y[0, 0, 0, 0]) and torch.isnan(y_e[0, 0, 0, 0])
    assert torch.equal(dk.switches_to_indices(sw, pool=2, conv_size=(2, 4)), idx_e)
    assert (sw[0, 0, 0, 0] & 0x80) == 0 and y[0, 0, 0, 1] == 5.0


@pytest.mark.parametrize(
    "mutate, exc, words",
    [
        (lambda x, w: (x[0], w, {}), ValueError, ["x", "4-D", "3x8x8"]),
        (lambda x, w: (x, w[:, :2], {}), ValueError, ["weight", "input channels", "4x2x3x3", "2x3x8x8"]),
        (lambda x, w: (x, w.double(), {}), TypeError, ["weight", "float64", "float32"]),
        (lambda x, w: (x.int(), w, {}), TypeError, ["x", "floating", "int32"]),
        (lambda x, w: (x, w, {"pool": 5}), ValueError, ["pool", "[1, 4]", "5"]),
        (lambda x, w: (x, w, {"pool": 0}), ValueError, ["pool"]),
        (lambda x, w: (x, w, {"negative_slope": 1.5}), ValueError, ["negative_slope", "[0, 1)"]),
        (lambda x, w: (x, w, {"stride": 0}), ValueError, ["stride"]),
        (lambda x, w: (x, w, {"padding": -1}), ValueError, ["padding"]),
        (lambda x, w: (x, w, {"stride": 1.5}), TypeError, ["stride", "int"]),
        (lambda x, w: (x[..., :2, :2], w, {"padding": 0}), ValueError, ["smaller than the kernel"]),
        (lambda x, w: (x[..., :4, :4], w, {"pool": 4}), ValueError, ["pooled size is zero", "pool=4"]),
        (lambda x, w: (x, w, {"scale": torch.ones(3)}), ValueError, ["scale", "4 elements", "(3)"]),
        (lambda x, w: (x, w, {"shift": torch.ones(4, dtype=torch.float64)}), TypeError, ["shift", "float64"]),
    ],
)
def test_conv_relu_pool_bad_input(mutate, exc, words):
    x, w, kw = mutate(*oc.base())
    scale, shift = kw.pop("scale", None), kw.pop("shift", None)
    with pytest.raises(exc) as info:
        dk.conv_relu_pool(x, w, scale, shift, **kw)
    for word in words:
        assert word in str(info.value), (word, str(info.value))
    assert str(info.value).startswith("drmm_kernels.conv_relu_pool: "), str(info.value)


# --------------------------------------------------------------------------- cpu kernels


@pytest.mark.cpu_backend
@given(cpu.geometry(), st.booleans(), st.booleans())
def test_cpu_conv_relu_pool_matches_reference(g, use_scale, use_shift):
    gen, x, wt, scale, shift = cpu.make_inputs(g)
    scale = scale if use_scale else None
    shift = shift if use_shift else None
    args = dict(
        weight=wt,
        scale=scale,
        shift=shift,
        stride=g["stride"],
        padding=g["pad"],
        **plain_pool(g["pool"]),
        negative_slope=g["slope"],
    )
    y, sw = cpu.kernels.conv_relu_pool(x=cpu.layout(x, g["layout"]), **args)
    yr, swr = reference.conv_relu_pool(x=x, **args)
    assert y.is_contiguous() and y.dtype == x.dtype
    torch.testing.assert_close(y, yr, **cpu.TOL[x.dtype])
    v = reference.scale_shift(F.conv2d(x, wt, None, g["stride"], g["pad"]), scale, shift)
    cpu.assert_switches(sw, swr, v, g["pool"], x.dtype)


@pytest.mark.cpu_backend
def test_cpu_conv_relu_pool_nan_in_window():
    x = torch.randn(2, 3, 10, 11, dtype=torch.float64)
    x[0, 1, 4, 5] = float("nan")
    wt = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    args = dict(x=x, weight=wt, scale=None, shift=None, stride=1, padding=1, **plain_pool(2), negative_slope=0.0)
    y, sw = cpu.kernels.conv_relu_pool(**args)
    yr, swr = reference.conv_relu_pool(**args)
    torch.testing.assert_close(y, yr, equal_nan=True)
    nan = torch.isnan(yr)
    assert nan.any() and torch.equal(sw[nan], swr[nan]), "NaN windows: the last NaN's offset, a bit off"
    v = F.conv2d(x, wt, None, 1, 1)
    cpu.assert_switches(sw, swr, torch.nan_to_num(v, nan=0.0), 2, x.dtype)


@pytest.mark.cpu_backend
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("use_scale", [False, True])
@pytest.mark.parametrize("pool", [1, 2])
def test_cpu_pointwise_conv_path(dtype, use_scale, pool):
    # 1x1, stride 1, no padding, NCHW: the cpu backend computes the conv (and for pool=1 the render and the
    # gather) as batched matrix products instead of oneDNN; every primitive against the reference.
    g = torch.Generator().manual_seed(5)
    n, ci, co, h, w = 3, 37, 11, 6, 8
    x = torch.randn(n, ci, h, w, generator=g, dtype=dtype)
    wt = torch.randn(co, ci, 1, 1, generator=g, dtype=dtype)
    scale = torch.randn(co, generator=g, dtype=dtype) if use_scale else None
    shift = torch.randn(co, generator=g, dtype=dtype)
    geo = dict(stride=1, padding=0, **plain_pool(pool))
    fwd = dict(x=x, weight=wt, scale=scale, shift=shift, negative_slope=0.1, **geo)
    y, sw = cpu.kernels.conv_relu_pool(**fwd)
    y_ref, sw_ref = reference.conv_relu_pool(**fwd)
    torch.testing.assert_close(y, y_ref, **cpu.TOL[dtype])
    cpu.assert_switches(sw, sw_ref, reference.scale_shift(F.conv2d(x, wt), scale, shift), pool, dtype)
    mu = torch.randn(y.shape, generator=g, dtype=dtype)
    render = dict(mu=mu, switches=sw, weight=wt, scale=scale, out_h=h, out_w=w, negative_slope=0.1, **geo)
    torch.testing.assert_close(cpu.kernels.render(**render), reference.render(**render), **cpu.TOL[dtype])
    gather = dict(src=x, weight=wt, switches=sw, **geo)
    torch.testing.assert_close(cpu.kernels.gather_conv(**gather), reference.gather_conv(**gather), **cpu.TOL[dtype])
    wgrad = dict(src=x, mu=mu, switches=sw, scale=scale, negative_slope=0.1, kernel_h=1, kernel_w=1, **geo)
    torch.testing.assert_close(cpu.kernels.render_wgrad(**wgrad), reference.render_wgrad(**wgrad), **cpu.TOL[dtype])


@pytest.mark.cpu_backend
@pytest.mark.parametrize("kernel", [(1, 3), (3, 5), (2, 2)])
def test_cpu_non_square_and_even_kernels(kernel):
    gen = torch.Generator().manual_seed(kernel[0] * 10 + kernel[1])
    x = torch.randn(2, 9, 10, 11, generator=gen, dtype=torch.float64)
    wt = torch.randn(5, 9, *kernel, generator=gen, dtype=torch.float64)
    geo = dict(stride=1, padding=1, **plain_pool(2))
    fwd = dict(x=x, weight=wt, scale=None, shift=None, negative_slope=0.1, **geo)
    y, sw = cpu.kernels.conv_relu_pool(**fwd)
    yr, swr = reference.conv_relu_pool(**fwd)
    torch.testing.assert_close(y, yr)
    mu = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    render = dict(mu=mu, switches=sw, weight=wt, scale=None, out_h=10, out_w=11, negative_slope=0.1, **geo)
    torch.testing.assert_close(cpu.kernels.render(**render), reference.render(**render))
    wgrad = dict(
        src=x, mu=mu, switches=sw, scale=None, negative_slope=0.1, kernel_h=kernel[0], kernel_w=kernel[1], **geo
    )
    torch.testing.assert_close(cpu.kernels.render_wgrad(**wgrad), reference.render_wgrad(**wgrad))
    gather = dict(src=x, weight=wt, switches=sw, **geo)
    torch.testing.assert_close(cpu.kernels.gather_conv(**gather), reference.gather_conv(**gather))


# --------------------------------------------------------------------------- triton kernels


@pytest.mark.triton
@pytest.mark.parametrize("case", trt.CASES, ids=str)
def test_triton_conv_relu_pool_forward_and_gradients(case: trt.Case):
    x, w, scale, shift = trt.inputs(case)
    leaves = [t.requires_grad_() for t in (x, w, scale, shift) if t is not None]
    with dk.backend("triton"):
        y, sw = dk.conv_relu_pool(
            x, w, scale, shift, stride=case.stride, padding=case.pad, pool=case.pool, negative_slope=case.slope
        )
    assert y.dtype == case.dtype and sw.dtype == torch.uint8 and y.is_contiguous()
    v, y_ref, sw_ref = trt.expected_forward(case, x, w, scale, shift)
    assert y.shape == y_ref.shape and sw.shape == y.shape
    trt.close(y, y_ref, case.dtype, "y")
    trt.check_switches(sw, sw_ref, v, case.pool, case.dtype)
    # a bit (bit 7) must agree with the sign of the kernel's own window max wherever it is not ~0
    on = (sw.cpu() & 0x80) != 0
    pre = trt.at(v, sw, case.pool)
    firm = pre.abs() > 1e-2
    assert torch.equal(on[firm], (pre > 0)[firm])

    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y)
    (y.float() * gy.float()).sum().backward()
    # expected gradients given the recorded switches, in float64
    ref_leaves = [trt.d(t).requires_grad_() for t in leaves]
    it = iter(ref_leaves)
    xd, wd = next(it), next(it)
    sd = next(it) if scale is not None else None
    hd = next(it) if shift is not None else None
    vd = eager.pre_activation(xd, wd, sd, hd, case.stride, case.pad)
    (trt.selected(vd, sw, case.pool, case.slope) * trt.d(gy)).sum().backward()
    for name, got, exp in zip(("x", "weight", "scale", "shift"), leaves, ref_leaves):
        trt.close(got.grad, exp.grad, case.dtype, f"grad {name}")


@pytest.mark.triton
def test_triton_all_negative_windows_and_nan():
    case = trt.Case(1, 3, 4, 6, 6, 3, 1)
    x, w, _, _ = trt.inputs(case)
    shift = torch.full((4,), -50.0, device=trt.DEV)  # every window max < 0: y = 0, a bit off, argmax still recorded
    x[0, 1, 2, 3] = float("nan")  # NaN wins its windows, as in max_pool2d
    y, sw = trt.kernels.conv_relu_pool(
        x=x, weight=w, scale=None, shift=shift, stride=1, padding=1, **plain_pool(2), negative_slope=0.0
    )
    v = eager.pre_activation(trt.d(x), trt.d(w), None, trt.d(shift), 1, 1)
    y_ref, sw_ref = reference.pool_switches(v, 2, 0.0)
    nan = torch.isnan(y_ref)
    assert nan.any() and torch.equal(torch.isnan(y.cpu()), nan)
    assert torch.equal(y.cpu()[~nan].double(), y_ref[~nan])
    assert torch.equal(sw.cpu()[nan], sw_ref[nan]), "NaN windows: last NaN offset, a bit off"
    assert ((sw.cpu() & 0x80) == 0).all()
    clear = (eager.window_gap(torch.nan_to_num(v, nan=0.0), 2) > 1e-3) & ~nan
    assert clear.any() and torch.equal(sw.cpu()[clear], sw_ref[clear])


# --------------------------------------------------------------------------- cuda kernels


@pytest.mark.gpu
@pytest.mark.cuda
@pytest.mark.parametrize("case", cuda.CASES, ids=str)
def test_cuda_forward_primitives(case):
    cuda.check_forward_primitives(case)


@pytest.mark.gpu
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_nan_propagates_like_max_pool(dtype):
    case = cuda.Case(dtype=dtype, scale=False, shift=False)
    x, w, _, _ = cuda.inputs(case)
    x[0, 1, 4, 4] = float("nan")
    with cuda.tf32(False), dk.backend("cuda"):
        y, sw = dk.conv_relu_pool(x, w, padding=1)
    y_ref, sw_ref = reference.conv_relu_pool(
        x=x, weight=w, scale=None, shift=None, stride=1, padding=1, **plain_pool(2), negative_slope=0.0
    )
    assert torch.equal(torch.isnan(y), torch.isnan(y_ref)) and torch.isnan(y).any()
    nan = torch.isnan(y_ref)
    assert torch.equal(sw[nan], sw_ref[nan])


@pytest.mark.gpu
@pytest.mark.cuda
def test_cuda_all_negative_and_tied_windows():
    """Exact ties (all-zero input): first window position, a-bit off, as max_pool2d on all-equal windows."""
    x = torch.zeros(2, 3, 8, 8, device="cuda", dtype=torch.float32)
    w = torch.randn(4, 3, 3, 3, device="cuda")
    for dt, tf32 in ((torch.float32, False), (torch.float32, True), (torch.bfloat16, False)):
        with cuda.tf32(tf32), dk.backend("cuda"):
            y, sw = dk.conv_relu_pool(x.to(dt), w.to(dt), None, -torch.ones(4, device="cuda", dtype=dt), padding=1)
        assert (y == 0).all() and (sw == 0).all(), dt


def test_zero_input_channels_are_refused_in_eager_and_fake_mode():
    # conv2d with no input channels returns no output channels; the op refuses the input rather than declare a
    # (N, C_out, ...) shape its kernels would not produce
    from torch._subclasses.fake_tensor import FakeTensorMode

    x, w = torch.randn(2, 0, 8, 8), torch.randn(4, 0, 3, 3)
    with pytest.raises(ValueError, match=r"^drmm_kernels.conv_relu_pool: x has no channels \(shape \(2x0x8x8\)\)"):
        dk.conv_relu_pool(x, w, padding=1)
    with FakeTensorMode() as mode, pytest.raises(ValueError, match="x has no channels"):
        dk.conv_relu_pool(mode.from_tensor(x), mode.from_tensor(w), padding=1)
