"""Every max-pool PyTorch has (docs/ops.md#pooling): overlapping, padded and ceil-mode windows in conv_relu_pool,
conv_bn_relu_pool, render and switches_to_indices, against eager PyTorch (values, switches as PyTorch's indices,
gradients, double backward, torch.compile, opcheck) on every backend that takes CPU tensors."""

from __future__ import annotations

import functools
import os
import re

import pytest
import torch
import torch.nn.functional as F

import drmm_kernels as dk
from drmm_kernels import dispatch
from drmm_kernels.contract import conv_size

BACKENDS = ["reference", "cpu"]

# k in {2, 3, 4}, stride in {1, 2, k}, padding in {0, 1}, both ceil modes
WINDOWS = [
    (k, s, p, c)
    for k in (2, 3, 4)
    for s in sorted({1, 2, k})
    for p in (0, 1)
    for c in (False, True)
    if s <= k and p <= k // 2
]


def _ids(w):
    k, s, p, c = w
    return f"k{k}s{s}p{p}{'c' if c else 'f'}"


def _pool_args(w):
    k, s, p, c = w
    return dict(pool=k, pool_stride=s, pool_padding=p, ceil_mode=c)


def _eager_pool(v, w):
    k, s, p, c = w
    return F.max_pool2d(v, k, s, p, ceil_mode=c, return_indices=True)


def _backend(name):
    if name == "cpu" and not dk.available_backends()["cpu"]:
        pytest.skip(dk.available_backends()["cpu"].reason)
    return dk.backend(name)


@pytest.mark.parametrize("window", WINDOWS, ids=_ids)
@pytest.mark.parametrize("backend", BACKENDS)
def test_conv_relu_pool_matches_eager(backend, window):
    gen = torch.Generator().manual_seed(sum(window[:3]) + 7 * window[3])
    # odd sizes, a leaky slope and a scale/shift, float64: no near-ties, exact switches
    x = torch.randn(2, 3, 9, 11, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    scale = torch.rand(4, generator=gen, dtype=torch.float64).add(0.5).requires_grad_()
    shift = torch.randn(4, generator=gen, dtype=torch.float64, requires_grad=True)
    with _backend(backend):
        y, sw = dk.conv_relu_pool(x, w, scale, shift, padding=1, negative_slope=0.1, **_pool_args(window))
    v = F.conv2d(x, w, padding=1) * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
    pooled, idx = _eager_pool(v, window)
    ye = F.leaky_relu(pooled, 0.1)
    torch.testing.assert_close(y, ye)
    assert sw.shape == y.shape and sw.dtype == torch.uint8
    got = dk.switches_to_indices(sw, conv_size=v.shape[-2:], **_pool_args(window))
    assert torch.equal(got, idx), "switches do not point where max_pool2d's indices do"
    assert torch.equal((sw & 0x80) != 0, pooled > 0)
    g = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    grads = torch.autograd.grad(y, (x, w, scale, shift), g)
    want = torch.autograd.grad(ye, (x, w, scale, shift), g)
    for name, a, b in zip(("x", "weight", "scale", "shift"), grads, want):
        torch.testing.assert_close(a, b, msg=lambda m, n=name: f"d{n}: {m}")


@pytest.mark.parametrize("window", WINDOWS, ids=_ids)
@pytest.mark.parametrize("backend", BACKENDS)
def test_render_is_the_input_gradient_and_sums_overlaps(backend, window):
    gen = torch.Generator().manual_seed(3 + sum(window[:3]))
    x = torch.randn(2, 3, 10, 9, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, generator=gen, dtype=torch.float64)
    with _backend(backend):
        y, sw = dk.conv_relu_pool(x, w, padding=1, **_pool_args(window))
        mu = torch.randn(y.shape, generator=gen, dtype=torch.float64)
        r = dk.render(mu, sw, w, padding=1, out_size=(10, 9), **_pool_args(window))
    # eager: the gradient of relu(max_pool2d(conv)) at mu is the top-down pass with the conv's weight
    (want,) = torch.autograd.grad(_eager_pool(F.relu(F.conv2d(x, w, padding=1)), window)[0], x, mu)
    on = (sw & 0x80) != 0  # where relu(max) > 0 eager agrees with the switches; elsewhere its gradient is 0 too
    assert on.any()
    torch.testing.assert_close(r, want)
    # the same map twice: bitwise equal (the sums over overlapping windows are reduced in a fixed order)
    with _backend(backend):
        again = dk.render(mu, sw, w, padding=1, out_size=(10, 9), **_pool_args(window))
    assert torch.equal(r, again)


def test_overlapping_windows_that_share_a_maximum_sum_what_they_route():
    # one 1x1 identity conv on a map whose centre is the maximum of all four 2x2 windows around it (stride 1)
    x = torch.tensor([[[[0.0, 0.0, 0.0], [0.0, 5.0, 0.0], [0.0, 0.0, 0.0]]]], dtype=torch.float64)
    w = torch.ones(1, 1, 1, 1, dtype=torch.float64)
    y, sw = dk.conv_relu_pool(x, w, pool=2, pool_stride=1)
    assert y.shape == (1, 1, 2, 2) and torch.all(y == 5.0)
    mu = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]], dtype=torch.float64)
    r = dk.render(mu, sw, w, pool=2, pool_stride=1, out_size=(3, 3))
    assert r[0, 0, 1, 1] == 10.0 and r.sum() == 10.0  # max_unpool2d would keep one of the four


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_padding_and_nan_follow_max_pool2d(backend):
    # integer-valued maps through an identity 1x1 conv: exact ties everywhere; all-negative windows at the padded
    # border (the padding must not win), and a NaN
    gen = torch.Generator().manual_seed(0)
    z = torch.randint(-3, 2, (2, 2, 7, 8), generator=gen).double()
    z[0, 0, 3, 3] = float("nan")
    w = torch.eye(2, dtype=torch.float64).view(2, 2, 1, 1)
    v = F.conv2d(z, w)  # = z, but for the NaN, which 0 * NaN spreads to the other channel
    for window in [(3, 2, 1, False), (3, 2, 1, True), (2, 1, 1, True), (4, 3, 2, True)]:
        with _backend(backend):
            y, sw = dk.conv_relu_pool(z, w, **_pool_args(window))
        pooled, idx = _eager_pool(v, window)
        assert torch.equal(dk.switches_to_indices(sw, conv_size=(7, 8), **_pool_args(window)), idx), window
        torch.testing.assert_close(y, F.relu(pooled), equal_nan=True)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("backend", BACKENDS)
def test_conv_bn_relu_pool_resnet_stem_pool(backend, training):
    # the ResNet stem's pool (3, 2, 1) and GoogLeNet's (3, 2, ceil_mode=True)
    gen = torch.Generator().manual_seed(1)
    for window in [(3, 2, 1, False), (3, 2, 0, True)]:
        x = torch.randn(3, 3, 13, 12, generator=gen, dtype=torch.float64, requires_grad=True)
        w = torch.randn(5, 3, 3, 3, generator=gen, dtype=torch.float64, requires_grad=True)
        gamma = torch.rand(5, generator=gen, dtype=torch.float64).add(0.5).requires_grad_()
        beta = torch.randn(5, generator=gen, dtype=torch.float64, requires_grad=True)
        rm, rv = torch.randn(5, dtype=torch.float64), torch.rand(5, dtype=torch.float64) + 0.5
        rm_e, rv_e = rm.clone(), rv.clone()
        with _backend(backend):
            y, sw = dk.conv_bn_relu_pool(
                x, w, gamma, beta, rm, rv, training=training, stride=2, padding=1, **_pool_args(window)
            )
        v = F.batch_norm(F.conv2d(x, w, stride=2, padding=1), rm_e, rv_e, gamma, beta, training)
        pooled, idx = _eager_pool(v, window)
        ye = F.relu(pooled)
        torch.testing.assert_close(y, ye)
        torch.testing.assert_close(rm, rm_e)
        torch.testing.assert_close(rv, rv_e)
        assert torch.equal(dk.switches_to_indices(sw, conv_size=v.shape[-2:], **_pool_args(window)), idx)
        g = torch.randn(y.shape, generator=gen, dtype=torch.float64)
        for a, b in zip(
            torch.autograd.grad(y, (x, w, gamma, beta), g), torch.autograd.grad(ye, (x, w, gamma, beta), g)
        ):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_double_backward_with_overlapping_windows(backend):
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(1, 2, 7, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 2, 3, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    args = _pool_args((3, 2, 1, True))
    with _backend(backend):
        assert torch.autograd.gradgradcheck(lambda a, b: dk.conv_relu_pool(a, b, padding=1, **args)[0], (x, w))
        y, sw = dk.conv_relu_pool(x.detach(), w.detach(), padding=1, **args)
        mu = torch.randn(y.shape, generator=gen, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradgradcheck(
            lambda m, b: dk.render(m, sw, b, padding=1, out_size=(7, 7), **args), (mu, w)
        )


def test_compile_fullgraph_and_opcheck_with_a_padded_ceil_mode_pool():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 9, 9, generator=gen)
    w = torch.randn(4, 3, 3, 3, generator=gen)
    args = _pool_args((3, 2, 1, True))

    def f(x, w):
        y, sw = dk.conv_relu_pool(x, w, padding=1, **args)
        return y, dk.render(y, sw, w, padding=1, out_size=(9, 9), **args)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    for a, b in zip(compiled(x, w), f(x, w)):
        torch.testing.assert_close(a, b)
    y, sw = dk.conv_relu_pool(x, w, padding=1, **args)
    geo = dict(stride=1, padding=1, **args)
    torch.library.opcheck(
        torch.ops.drmm.conv_relu_pool.default,
        (),
        dict(x=x, weight=w, scale=None, shift=None, negative_slope=0.0, **geo),
    )
    torch.library.opcheck(
        torch.ops.drmm.render.default,
        (),
        dict(mu=y, switches=sw, weight=w, scale=None, out_h=9, out_w=9, negative_slope=0.0, **geo),
    )


@pytest.mark.parametrize(
    "kwargs, error, fragment",
    [
        (dict(pool=2, pool_stride=3), ValueError, "pool_stride must be in [1, 2], got 3"),
        (dict(pool=3, pool_stride=0), ValueError, "pool_stride must be in [1, 3], got 0"),
        (dict(pool=3, pool_padding=2), ValueError, "pool_padding must be at most pool // 2 = 1 (pool=3), got 2"),
        (dict(pool=2, ceil_mode=1), TypeError, "ceil_mode must be a bool, got int"),
        (dict(pool=2, pool_stride=1.5), TypeError, "pool_stride must be an int, got float"),
    ],
)
def test_bad_pool_arguments_name_the_argument(kwargs, error, fragment):
    x, w = torch.randn(1, 2, 8, 8), torch.randn(3, 2, 3, 3)
    with pytest.raises(error, match="^" + re.escape(f"drmm_kernels.conv_relu_pool: {fragment}") + "$"):
        dk.conv_relu_pool(x, w, **kwargs)


def test_switches_to_indices_refuses_an_offset_in_the_padding():
    # pool 3, padding 1: the first window starts at row/column -1, so offset 0 points into the padding
    sw = torch.zeros(1, 1, 2, 2, dtype=torch.uint8)
    with pytest.raises(ValueError, match="into the pool padding"):
        dk.switches_to_indices(sw, pool=3, pool_stride=2, pool_padding=1, conv_size=(4, 4))
    ok = torch.full((1, 1, 2, 2), 4, dtype=torch.uint8)  # the window centres: rows/columns 0 and 2
    assert dk.switches_to_indices(ok, pool=3, pool_stride=2, pool_padding=1, conv_size=(4, 4)).flatten().tolist() == [
        0,
        2,
        8,
        10,
    ]


def test_the_compiled_cpu_kernels_take_every_window():
    """Every C++ CPU kernel takes any max_pool2d window, bitwise as the reference where it has the reference's
    arithmetic (the forward epilogue), and refuses an offset in the pool padding."""
    if not dispatch.load_extension():
        pytest.skip(dispatch.extension_error())
    gen = torch.Generator().manual_seed(6)
    x, w = torch.randn(2, 2, 9, 8, generator=gen), torch.randn(3, 2, 3, 3, generator=gen)
    geo = dict(stride=1, padding=1, pool=3, pool_stride=2, pool_padding=1, ceil_mode=True)
    ref = functools.partial(dispatch.primitive, "reference")
    y, sw = torch.ops.drmm_C.conv_relu_pool(x, w, None, None, *geo.values(), 0.0)
    yr, swr = ref("conv_relu_pool")(x=x, weight=w, scale=None, shift=None, negative_slope=0.0, **geo)
    assert torch.equal(y, yr) and torch.equal(sw, swr)
    window = {k: geo[k] for k in ("pool", "pool_stride", "pool_padding", "ceil_mode")}
    mu = torch.randn(y.shape, generator=gen)
    up = torch.ops.drmm_C.unpool(mu, sw, *window.values(), 9, 8)
    # (the same sums, added in another order: the reference adds one window offset at a time)
    torch.testing.assert_close(up, ref("unpool")(values=mu, switches=sw, out_h=9, out_w=8, **window))
    r = torch.ops.drmm_C.render(mu, sw, w, None, *geo.values(), 9, 8, 0.0)
    torch.testing.assert_close(
        r, ref("render")(mu=mu, switches=sw, weight=w, scale=None, out_h=9, out_w=8, negative_slope=0.0, **geo)
    )
    gc = torch.ops.drmm_C.gather_conv(x, w, sw, *geo.values())
    torch.testing.assert_close(gc, ref("gather_conv")(src=x, weight=w, switches=sw, **geo))
    dw = torch.ops.drmm_C.render_wgrad(x, mu, sw, None, *geo.values(), 0.0, 3, 3)
    torch.testing.assert_close(
        dw,
        ref("render_wgrad")(src=x, mu=mu, switches=sw, scale=None, negative_slope=0.0, kernel_h=3, kernel_w=3, **geo),
    )
    padded = torch.zeros_like(sw)  # offset 0 of window (0, 0) lies in the padding
    with pytest.raises(RuntimeError, match="in the pool padding"):
        torch.ops.drmm_C.unpool(mu, padded, *window.values(), 9, 8)
    with pytest.raises(RuntimeError, match="or one in the pool padding"):
        torch.ops.drmm_C.render(mu, padded | 0x80, w, None, *geo.values(), 9, 8, 0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("window", WINDOWS, ids=_ids)
def test_the_cpu_epilogue_equals_max_pool2d_on_wide_maps(window, dtype):
    """The CPU epilogue pools whole vectors of windows at once where the windows lie inside the map (16 float / 8
    double lanes): maps wide enough for that path, with exact ties (integers), a NaN, and rows and columns of -inf
    (where max_pool2d keeps the window's first position inside the map), equal max_pool2d bit for bit."""
    if not dispatch.load_extension():
        pytest.skip(dispatch.extension_error())
    gen = torch.Generator().manual_seed(7)
    z = torch.randint(-3, 3, (2, 3, 11, 83), generator=gen).to(dtype)
    z[0, 1, 4, 40] = float("nan")
    z[1, 0, 2:5, :] = float("-inf")
    z[1, 2, :, 30:37] = float("-inf")
    c = z.shape[1]
    y, sw = torch.ops.drmm_C.bn_pool(z, torch.ones(c, dtype=dtype), torch.zeros(c, dtype=dtype), *window, 0.0)
    pooled, idx = _eager_pool(z, window)
    assert torch.equal(dk.switches_to_indices(sw, conv_size=z.shape[-2:], **_pool_args(window)), idx)
    torch.testing.assert_close(y, F.relu(pooled), equal_nan=True, rtol=0, atol=0)
    assert torch.equal((sw >= 0x80), pooled > 0)


def test_an_empty_map_has_no_window_even_with_pool_padding():
    """max_pool2d refuses a map with no rows, although its output-size formula gives one window with padding."""
    if not dispatch.load_extension():
        pytest.skip(dispatch.extension_error())
    z, ones = torch.zeros(1, 2, 0, 4), torch.ones(2)
    with pytest.raises(RuntimeError):
        F.max_pool2d(z, 2, 2, 1)
    with pytest.raises(RuntimeError, match="larger than the conv output"):
        torch.ops.drmm_C.bn_pool(z, ones, ones, 2, 2, 1, False, 0.0)


def test_defaults_are_non_overlapping_windows():
    x, w = torch.randn(1, 2, 9, 9), torch.randn(3, 2, 3, 3)
    for pool in (1, 2, 3, 4):
        a = dk.conv_relu_pool(x, w, pool=pool)
        b = dk.conv_relu_pool(x, w, pool=pool, pool_stride=pool, pool_padding=0, ceil_mode=False)
        assert all(torch.equal(p, q) for p, q in zip(a, b))


def test_every_window_of_the_grid_is_distinct():
    assert len(set(WINDOWS)) == len(WINDOWS) and {w[0] for w in WINDOWS} == {2, 3, 4}
    assert any(s < k for k, s, _, _ in WINDOWS) and any(c for *_, c in WINDOWS) and any(p for _, _, p, _ in WINDOWS)


# The Triton and CUDA kernels take every window too; under the interpreter the shapes stay tiny. Integer-valued
# inputs and power-of-two scales keep every sum exact in float32 (and in TF32 on a GPU), so the kernels must equal
# the reference (float64, CPU) bit for bit: values, switches (ties included: the first maximum) and overlap sums.
COMPILED_WINDOWS = [(3, 2, 1, False), (3, 2, 0, True), (2, 1, 1, True), (4, 2, 2, False), (3, 3, 1, True)]
KERNEL_OPS = ("conv_relu_pool", "render", "render_wgrad", "gather_conv", "bn_pool")
SMALL = dict(x_shape=(2, 3, 7, 9), w_shape=(4, 3, 3, 3), stride=1, padding=1)
STEM = dict(x_shape=(8, 16, 64, 64), w_shape=(32, 16, 7, 7), stride=2, padding=3)  # a ResNet / GoogLeNet stem


def _ints(gen, *shape, low=-3, high=4):
    return torch.randint(low, high, shape, generator=gen).float()


def _cpu64(v):
    """A tensor on the CPU, floating point in float64; anything else as it is."""
    if not torch.is_tensor(v):
        return v
    return v.cpu().double() if v.is_floating_point() else v.cpu()


# Compiled on a GPU every window is a new kernel variant (seconds of compile each): the device check's budget gets
# the two stem windows, the interpreter (no compile) all five.
TRITON_WINDOWS = COMPILED_WINDOWS if os.environ.get("TRITON_INTERPRET") == "1" else COMPILED_WINDOWS[:2]


@pytest.mark.triton
@pytest.mark.parametrize("window", TRITON_WINDOWS, ids=_ids)
def test_triton_kernels_take_every_window(window, monkeypatch):
    pytest.importorskip("triton")
    _check_kernels_take_every_window("triton", window, monkeypatch, **SMALL)


@pytest.mark.gpu
@pytest.mark.triton
@pytest.mark.parametrize("window", [(3, 2, 1, False)], ids=_ids)  # one: each is a dozen compiles in the budget
def test_triton_kernels_take_every_window_at_a_stem(window, monkeypatch):
    if not torch.cuda.is_available():
        pytest.skip("compiled Triton needs a GPU (the interpreter runs the small case)")
    _check_kernels_take_every_window("triton", window, monkeypatch, **STEM)


@pytest.mark.gpu
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", ["float64", "float32", "tf32", "float16"])
@pytest.mark.parametrize("window", COMPILED_WINDOWS, ids=_ids)
def test_cuda_kernels_take_every_window(window, dtype, monkeypatch):
    """fp64 and fp32 without TF32 run the CUDA-core kernels, tf32 / fp16 the tensor-core ones."""
    if not torch.cuda.is_available() or not dk.available_backends()["cuda"]:
        pytest.skip("needs a GPU and the CUDA extension")
    dt = torch.float32 if dtype == "tf32" else getattr(torch, dtype)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", dtype == "tf32")
    for shape in (SMALL, STEM):
        _check_kernels_take_every_window("cuda", window, monkeypatch, dtype=dt, **shape)


def _check_kernels_take_every_window(backend, window, monkeypatch, x_shape, w_shape, stride, padding, dtype=None):
    from drmm_kernels import reference

    kernels = {op: dispatch.primitive(backend, op) for op in KERNEL_OPS}
    ref = {op: getattr(reference, op) for op in KERNEL_OPS}
    for op in KERNEL_OPS:  # a primitive that handed this window to the reference would fail here

        def refuse(*_, op=op, **__):
            raise AssertionError(f"{backend} {op} fell back to the reference")

        monkeypatch.setattr(reference, op, refuse)
    run = kernels.__getitem__

    def exact(op, **args):  # the reference in float64 on the CPU: exact for these integer-valued inputs
        return ref[op](**{k: _cpu64(v) for k, v in args.items()})

    def same(a, b):  # b exact; rounded once to a's dtype (fp16 holds integers exactly only up to 2048)
        return torch.equal(_cpu64(a), b.to(a.dtype).double() if b.is_floating_point() else b)

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = dtype or torch.float32
    gen = torch.Generator().manual_seed(sum(window[:3]) + 5 * window[3])
    x = _ints(gen, *x_shape).to(dev, dtype)
    w = _ints(gen, *w_shape, low=-1, high=2).to(dev, dtype)
    c_out, kh = w_shape[0], w_shape[2]
    scale = torch.tensor([0.5, -1.0, 2.0, 1.0], device=dev, dtype=dtype).repeat(c_out // 4)
    shift = _ints(gen, c_out).to(dev, dtype)
    geo = dict(stride=stride, padding=padding, **_pool_args(window))
    for s, b, slope in ((scale, shift, 0.0), (None, None, 0.25)):
        args = dict(x=x, weight=w, scale=s, shift=b, negative_slope=slope, **geo)
        (y, sw), (yr, swr) = run("conv_relu_pool")(**args), exact("conv_relu_pool", **args)
        assert same(sw, swr) and same(y, yr), "conv_relu_pool"
        mu = _ints(gen, *y.shape).to(dev, dtype)
        h, wd = x.shape[-2:]
        args = dict(mu=mu, switches=sw, weight=w, scale=s, out_h=h, out_w=wd, negative_slope=slope, **geo)
        assert same(run("render")(**args), exact("render", **args)), "render"
        args = dict(src=x, mu=mu, switches=sw, scale=s, negative_slope=slope, kernel_h=kh, kernel_w=kh, **geo)
        assert same(run("render_wgrad")(**args), exact("render_wgrad", **args)), "render_wgrad"
        args = dict(src=x, weight=w, switches=sw, **geo)
        assert same(run("gather_conv")(**args), exact("gather_conv", **args)), "gather_conv"
    z = _ints(gen, x_shape[0], c_out, *conv_size(x_shape[-2:], w_shape[-2:], stride, padding))
    args = dict(z=z.to(dev, dtype), scale=scale, shift=shift, negative_slope=0.0, **_pool_args(window))
    (y, sw), (yr, swr) = run("bn_pool")(**args), exact("bn_pool", **args)
    assert same(sw, swr) and same(y, yr), "bn_pool"
