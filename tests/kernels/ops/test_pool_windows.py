"""Every max-pool PyTorch has (docs/ops.md#pooling): overlapping, padded and ceil-mode windows in conv_relu_pool,
conv_bn_relu_pool, render and switches_to_indices, against eager PyTorch (values, switches as PyTorch's indices,
gradients, double backward, torch.compile, opcheck) on every backend that takes CPU tensors."""

from __future__ import annotations

import functools
import re

import pytest
import torch
import torch.nn.functional as F

import drmm_kernels as dk
from drmm_kernels import dispatch

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


def test_defaults_are_non_overlapping_windows():
    x, w = torch.randn(1, 2, 9, 9), torch.randn(3, 2, 3, 3)
    for pool in (1, 2, 3, 4):
        a = dk.conv_relu_pool(x, w, pool=pool)
        b = dk.conv_relu_pool(x, w, pool=pool, pool_stride=pool, pool_padding=0, ceil_mode=False)
        assert all(torch.equal(p, q) for p, q in zip(a, b))


def test_every_window_of_the_grid_is_distinct():
    assert len(set(WINDOWS)) == len(WINDOWS) and {w[0] for w in WINDOWS} == {2, 3, 4}
    assert any(s < k for k, s, _, _ in WINDOWS) and any(c for *_, c in WINDOWS) and any(p for _, _, p, _ in WINDOWS)
