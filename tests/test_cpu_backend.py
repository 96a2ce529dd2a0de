"""The C++ ``cpu`` backend primitives against ``drmm_kernels.reference`` (the oracle), one by one.

Values are compared to floating-point tolerance; switch offsets exactly wherever the window is not
near-tied (the fused kernel rounds ``z * scale + shift`` with one FMA, the reference with two), and
exactly everywhere in the tie / NaN / all-negative cases, whose values are exact. Small random shapes go
through hypothesis; fixed larger shapes reach the vectorized code paths (16 float / 8 double lanes).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given
from hypothesis import strategies as st

import drmm_kernels as dk
from drmm_kernels import reference as R

if os.environ.get("DRMM_REQUIRE_EXTENSION") != "1" and not dk.available_backends()["cpu"]:
    pytest.skip("drmm_kernels._C is not built (outside make test)", allow_module_level=True)

from drmm_kernels import cpu_backend as cb  # noqa: E402

TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.float64: dict(rtol=1e-10, atol=1e-10)}
GAP = {torch.float32: 1e-4, torch.float64: 1e-9}  # windows with a smaller top-2 gap count as tied
LAYOUTS = ("contiguous", "channels_last", "noncontig")


def layout(t: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if kind == "noncontig":  # same values, every other element of a wider buffer
        big = torch.zeros(*t.shape[:-1], t.shape[-1] * 2, dtype=t.dtype)
        big[..., ::2] = t
        return big[..., ::2]
    return t.contiguous()


def window_gap(v: torch.Tensor, pool: int) -> torch.Tensor:
    """Top-1 minus top-2 value of each pool window (inf for pool 1)."""
    n, c, h, w = v.shape
    hp, wp = h // pool, w // pool
    if pool == 1:
        return torch.full((n, c, hp, wp), float("inf"), dtype=v.dtype)
    win = v[..., :hp * pool, :wp * pool].reshape(n, c, hp, pool, wp, pool).permute(0, 1, 2, 4, 3, 5)
    top2 = win.reshape(n, c, hp, wp, pool * pool).topk(2, dim=-1).values
    return top2[..., 0] - top2[..., 1]


def assert_switches(sw: torch.Tensor, ref: torch.Tensor, v: torch.Tensor, pool: int, dtype) -> None:
    """Offsets equal where the window is not near-tied; bit 7 equal where the max is not near 0."""
    assert sw.dtype == torch.uint8 and sw.shape == ref.shape and sw.is_contiguous()
    assert ((sw & 0x70) == 0).all(), "bits 4-6 must be zero"
    gap = window_gap(v, pool)
    clear = gap > GAP[dtype] * (1 + gap.abs())
    assert torch.equal(sw[clear] & 0x0F, ref[clear] & 0x0F), "offsets differ in windows that are not near-tied"
    vmax = F.max_pool2d(v, pool, pool)
    away = vmax.abs() > GAP[dtype] * (1 + vmax.abs())
    assert torch.equal(sw[away] & 0x80, ref[away] & 0x80), "a-switch differs"


def random_switches(shape, pool: int, gen: torch.Generator) -> torch.Tensor:
    off = torch.randint(0, pool * pool, shape, generator=gen)
    on = torch.randint(0, 2, shape, generator=gen) << 7
    return (off | on).to(torch.uint8)


@st.composite
def geometry(draw):
    """A small conv/pool geometry with a non-empty pooled output."""
    k = draw(st.sampled_from([1, 3, 5]))
    pad = draw(st.sampled_from([0, 1, 2, 4]))
    stride = draw(st.sampled_from([1, 2]))
    pool = draw(st.sampled_from([1, 2, 3]))
    h = draw(st.integers(1, 13))
    w = draw(st.integers(1, 13))
    hc, wc = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
    assume(h + 2 * pad >= k and w + 2 * pad >= k and hc >= pool and wc >= pool)
    return dict(n=draw(st.integers(1, 3)), cin=draw(st.integers(1, 6)), cout=draw(st.integers(1, 6)), k=k,
                pad=pad, stride=stride, pool=pool, h=h, w=w, hc=hc, wc=wc,
                slope=draw(st.sampled_from([0.0, 0.1])), dtype=draw(st.sampled_from([torch.float32, torch.float64])),
                layout=draw(st.sampled_from(LAYOUTS)), seed=draw(st.integers(0, 2**31 - 1)))


def make_inputs(g):
    gen = torch.Generator().manual_seed(g["seed"])
    dt = g["dtype"]
    x = torch.randn(g["n"], g["cin"], g["h"], g["w"], generator=gen, dtype=dt)
    wt = torch.randn(g["cout"], g["cin"], g["k"], g["k"], generator=gen, dtype=dt)
    scale = torch.randn(g["cout"], generator=gen, dtype=dt)  # includes negative scales
    shift = torch.randn(g["cout"], generator=gen, dtype=dt)
    return gen, x, wt, scale, shift


# ------------------------------------------------------------------------------------------ forward


@given(geometry(), st.booleans(), st.booleans())
def test_conv_relu_pool_matches_reference(g, use_scale, use_shift):
    gen, x, wt, scale, shift = make_inputs(g)
    scale = scale if use_scale else None
    shift = shift if use_shift else None
    args = (g["stride"], g["pad"], g["pool"], g["slope"])
    y, sw = cb.conv_relu_pool(layout(x, g["layout"]), wt, scale, shift, *args)
    yr, swr = R.conv_relu_pool(x, wt, scale, shift, *args)
    assert y.is_contiguous() and y.dtype == x.dtype
    torch.testing.assert_close(y, yr, **TOL[x.dtype])
    v = R.scale_shift(F.conv2d(x, wt, None, g["stride"], g["pad"]), scale, shift)
    assert_switches(sw, swr, v, g["pool"], x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
@pytest.mark.parametrize("pool", [1, 2, 3, 4])
@pytest.mark.parametrize("slope", [0.0, 0.1])
def test_bn_pool_vector_paths(dtype, fmt, pool, slope):
    # 37x38 planes and 20 channels: full vectors plus scalar tails on both layouts, dropped trailing rows/cols.
    gen = torch.Generator().manual_seed(pool)
    z = torch.randn(2, 20, 37, 38, generator=gen, dtype=dtype)
    scale = torch.randn(20, generator=gen, dtype=dtype)
    shift = torch.randn(20, generator=gen, dtype=dtype)
    y, sw = cb.bn_pool(layout(z, fmt), scale, shift, pool, slope)
    yr, swr = R.bn_pool(z, scale, shift, pool, slope)
    torch.testing.assert_close(y, yr, **TOL[dtype])
    assert_switches(sw, swr, R.scale_shift(z, scale, shift), pool, dtype)


def _exact_cases(dtype):
    """Maps whose scaled values are exact: ties, NaNs, infinities, all-negative windows."""
    gen = torch.Generator().manual_seed(7)
    ties = torch.randint(-2, 3, (2, 18, 36, 40), generator=gen).to(dtype)  # many equal values per window
    nans = torch.randn(2, 18, 36, 40, generator=gen, dtype=dtype)
    nans[torch.rand(nans.shape, generator=gen) < 0.15] = float("nan")  # often 2+ NaNs in one window
    nans[0, 0, :4, :4] = float("nan")
    negative = -torch.rand(2, 18, 36, 40, generator=gen, dtype=dtype) - 0.5
    negative[1, 3, :8, :8] = float("-inf")  # all -inf windows: offset 0, y = 0 under ReLU
    negative[1, 4, :, :] = 0.0
    return {"ties": ties, "nans": nans, "negative": negative}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
@pytest.mark.parametrize("case", ["ties", "nans", "negative"])
def test_bn_pool_ties_nan_negative_exact(dtype, fmt, case):
    z = _exact_cases(dtype)[case]
    ones, zeros = torch.ones(z.shape[1], dtype=dtype), torch.zeros(z.shape[1], dtype=dtype)
    neg_int = -torch.ones(z.shape[1], dtype=dtype)  # exact negative scale flips which value wins
    for pool in (1, 2, 3, 4):
        for slope in (0.0, 0.1):
            for scale in (ones, neg_int):
                y, sw = cb.bn_pool(layout(z, fmt), scale, zeros, pool, slope)
                yr, swr = R.bn_pool(z, scale, zeros, pool, slope)
                torch.testing.assert_close(y, yr, rtol=0, atol=0, equal_nan=True)
                assert torch.equal(sw, swr), (case, pool, slope)


def test_conv_relu_pool_nan_in_window():
    x = torch.randn(2, 3, 10, 11, dtype=torch.float64)
    x[0, 1, 4, 5] = float("nan")
    wt = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    y, sw = cb.conv_relu_pool(x, wt, None, None, 1, 1, 2, 0.0)
    yr, swr = R.conv_relu_pool(x, wt, None, None, 1, 1, 2, 0.0)
    torch.testing.assert_close(y, yr, equal_nan=True)
    assert torch.isnan(y).any()
    assert torch.equal(sw, swr)


# ------------------------------------------------------------------------------ render / backward


@given(geometry(), st.booleans())
def test_render_matches_reference(g, use_scale):
    gen, _, wt, scale, _ = make_inputs(g)
    hp, wp = g["hc"] // g["pool"], g["wc"] // g["pool"]
    mu = torch.randn(g["n"], g["cout"], hp, wp, generator=gen, dtype=g["dtype"])
    sw = random_switches(mu.shape, g["pool"], gen)
    scale = scale if use_scale else None
    # Any output size that maps back to this conv size (output_padding up to stride - 1).
    args = (g["stride"], g["pad"], g["pool"], (g["h"], g["w"]), g["slope"])
    out = cb.render(layout(mu, g["layout"]), layout(sw, g["layout"]), layout(wt, g["layout"]), scale, *args)
    ref = R.render(mu, sw, wt, scale, *args)
    assert out.shape == (g["n"], g["cin"], g["h"], g["w"]) and out.is_contiguous()
    torch.testing.assert_close(out, ref, **TOL[g["dtype"]])


@given(geometry())
def test_gather_conv_matches_reference(g):
    gen, x, wt, _, _ = make_inputs(g)
    hp, wp = g["hc"] // g["pool"], g["wc"] // g["pool"]
    sw = random_switches((g["n"], g["cout"], hp, wp), g["pool"], gen)
    args = (g["stride"], g["pad"], g["pool"])
    out = cb.gather_conv(layout(x, g["layout"]), wt, sw, *args)
    torch.testing.assert_close(out, R.gather_conv(x, wt, sw, *args), **TOL[g["dtype"]])


@given(geometry(), st.booleans())
def test_render_wgrad_matches_reference(g, use_scale):
    gen, x, wt, scale, _ = make_inputs(g)
    hp, wp = g["hc"] // g["pool"], g["wc"] // g["pool"]
    mu = torch.randn(g["n"], g["cout"], hp, wp, generator=gen, dtype=g["dtype"])
    sw = random_switches(mu.shape, g["pool"], gen)
    scale = scale if use_scale else None
    args = (g["stride"], g["pad"], g["pool"], g["slope"], (g["k"], g["k"]))
    out = cb.render_wgrad(layout(x, g["layout"]), layout(mu, g["layout"]), sw, scale, *args)
    ref = R.render_wgrad(x, mu, sw, scale, *args)
    assert out.shape == wt.shape and out.is_contiguous()
    torch.testing.assert_close(out, ref, rtol=TOL[g["dtype"]]["rtol"], atol=10 * TOL[g["dtype"]]["atol"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("cin,k,pool,stride,pad", [(20, 3, 2, 1, 1), (64, 3, 2, 1, 2), (33, 5, 3, 2, 2),
                                                   (40, 1, 2, 1, 0), (17, 3, 1, 1, 1)])
def test_sparse_kernels_vector_paths(dtype, cin, k, pool, stride, pad):
    # Rows of k*C_in values long enough for the 16/8/4/2/1-vector blocks and their scalar tails.
    gen = torch.Generator().manual_seed(cin)
    n, cout, h, w = 3, 12, 11, 10
    hc, wc = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
    x = torch.randn(n, cin, h, w, generator=gen, dtype=dtype)
    wt = torch.randn(cout, cin, k, k, generator=gen, dtype=dtype)
    scale = torch.randn(cout, generator=gen, dtype=dtype)
    mu = torch.randn(n, cout, hc // pool, wc // pool, generator=gen, dtype=dtype)
    sw = random_switches(mu.shape, pool, gen)
    tol = dict(rtol=1e-4, atol=1e-3) if dtype == torch.float32 else TOL[dtype]
    for slope in (0.0, 0.1):
        torch.testing.assert_close(cb.render(mu, sw, wt, scale, stride, pad, pool, (h, w), slope),
                                   R.render(mu, sw, wt, scale, stride, pad, pool, (h, w), slope), **tol)
        torch.testing.assert_close(cb.render_wgrad(x, mu, sw, scale, stride, pad, pool, slope, (k, k)),
                                   R.render_wgrad(x, mu, sw, scale, stride, pad, pool, slope, (k, k)), **tol)
    torch.testing.assert_close(cb.gather_conv(x, wt, sw, stride, pad, pool),
                               R.gather_conv(x, wt, sw, stride, pad, pool), **tol)


def test_render_of_forward_switches_is_input_gradient():
    # With scale, render(g, switches) is d/dx of conv_relu_pool; check against autograd of the reference.
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 12, 12, generator=gen, dtype=torch.float64, requires_grad=True)
    wt = torch.randn(6, 5, 3, 3, generator=gen, dtype=torch.float64)
    scale, shift = torch.randn(6, generator=gen, dtype=torch.float64), torch.randn(6, generator=gen, dtype=torch.float64)
    y, sw = cb.conv_relu_pool(x.detach(), wt, scale, shift, 1, 1, 2, 0.1)
    gy = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    yr, _ = R.conv_relu_pool(x, wt, scale, shift, 1, 1, 2, 0.1)
    (gx,) = torch.autograd.grad(yr, x, gy)
    torch.testing.assert_close(cb.render(gy, sw, wt, scale, 1, 1, 2, (12, 12), 0.1), gx)


# ------------------------------------------------------------------------------- dtypes / errors


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_other_dtypes_fall_back_to_reference(dtype):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 8, 8, generator=gen).to(dtype)
    wt = torch.randn(4, 3, 3, 3, generator=gen).to(dtype)
    y, sw = cb.conv_relu_pool(x, wt, None, None, 1, 1, 2, 0.0)
    yr, swr = R.conv_relu_pool(x, wt, None, None, 1, 1, 2, 0.0)
    assert y.dtype == dtype and torch.equal(y, yr) and torch.equal(sw, swr)
    mu = torch.randn(y.shape, generator=gen).to(dtype)
    assert torch.equal(cb.render(mu, sw, wt, None, 1, 1, 2, (8, 8), 0.0), R.render(mu, sw, wt, None, 1, 1, 2, (8, 8), 0.0))
    assert torch.equal(cb.gather_conv(x, wt, sw, 1, 1, 2), R.gather_conv(x, wt, sw, 1, 1, 2))
    assert torch.equal(cb.render_wgrad(x, mu, sw, None, 1, 1, 2, 0.0, (3, 3)),
                       R.render_wgrad(x, mu, sw, None, 1, 1, 2, 0.0, (3, 3)))


def test_invalid_switch_offset_is_an_error():
    mu = torch.randn(1, 2, 3, 3)
    sw = torch.full((1, 2, 3, 3), 0x85, dtype=torch.uint8)  # offset 5 >= pool*pool = 4
    wt = torch.randn(2, 3, 3, 3)
    with pytest.raises(RuntimeError, match="offset"):
        cb.render(mu, sw, wt, None, 1, 1, 2, (6, 6), 0.0)
    with pytest.raises(RuntimeError, match="offset"):
        cb.gather_conv(torch.randn(1, 3, 6, 6), wt, sw, 1, 1, 2)


def test_shape_errors_name_the_argument():
    x, wt = torch.randn(1, 3, 8, 8), torch.randn(4, 3, 3, 3)
    with pytest.raises(RuntimeError, match="scale"):
        torch.ops.drmm_C.conv_relu_pool(x, wt, torch.ones(3), None, 1, 1, 2, 0.0)
    with pytest.raises(RuntimeError, match="switches"):
        torch.ops.drmm_C.render(torch.randn(1, 4, 4, 4), torch.zeros(1, 4, 4, 4), wt, None, 1, 1, 2, 8, 8, 0.0)
    with pytest.raises(RuntimeError, match="mu/switches must have shape"):
        torch.ops.drmm_C.render(torch.randn(1, 4, 3, 4), torch.zeros(1, 4, 3, 4, dtype=torch.uint8), wt, None, 1, 1,
                                2, 8, 8, 0.0)


def test_backend_is_used_by_public_ops():
    x, wt = torch.randn(2, 3, 9, 9), torch.randn(4, 3, 3, 3)
    with dk.backend("cpu"):
        y, sw = dk.conv_relu_pool(x, wt, padding=1)
        xh = dk.render(y, sw, wt, padding=1, out_size=(9, 9))
    yr, swr = R.conv_relu_pool(x, wt, None, None, 1, 1, 2, 0.0)
    torch.testing.assert_close(y, yr)
    torch.testing.assert_close(xh, R.render(y, sw, wt, None, 1, 1, 2, (9, 9), 0.0))


@pytest.mark.parametrize("kernel", [(1, 3), (3, 5), (2, 2)])
def test_non_square_and_even_kernels(kernel):
    gen = torch.Generator().manual_seed(kernel[0] * 10 + kernel[1])
    x = torch.randn(2, 9, 10, 11, generator=gen, dtype=torch.float64)
    wt = torch.randn(5, 9, *kernel, generator=gen, dtype=torch.float64)
    y, sw = cb.conv_relu_pool(x, wt, None, None, 1, 1, 2, 0.1)
    yr, swr = R.conv_relu_pool(x, wt, None, None, 1, 1, 2, 0.1)
    torch.testing.assert_close(y, yr)
    mu = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(cb.render(mu, sw, wt, None, 1, 1, 2, (10, 11), 0.1),
                               R.render(mu, sw, wt, None, 1, 1, 2, (10, 11), 0.1))
    torch.testing.assert_close(cb.render_wgrad(x, mu, sw, None, 1, 1, 2, 0.1, kernel),
                               R.render_wgrad(x, mu, sw, None, 1, 1, 2, 0.1, kernel))
    torch.testing.assert_close(cb.gather_conv(x, wt, sw, 1, 1, 2), R.gather_conv(x, wt, sw, 1, 1, 2))


def test_results_are_bitwise_independent_of_threads_and_scheduling():
    # Workers take samples (render) or sample chunks (wgrad) from a shared queue; exact training resume
    # needs every result bitwise identical whatever the thread count or which worker was free.
    gen = torch.Generator().manual_seed(11)
    for dtype, kernel in ((torch.float64, (3, 3)), (torch.float32, (3, 3)), (torch.float32, (2, 3))):
        x = torch.randn(19, 16, 9, 9, generator=gen, dtype=dtype)
        wt = torch.randn(8, 16, *kernel, generator=gen, dtype=dtype)
        y, sw = cb.conv_relu_pool(x, wt, None, None, 1, 1, 2, 0.0)
        mu = torch.randn(y.shape, generator=gen, dtype=dtype)
        before = torch.get_num_threads()
        outs = []
        try:
            for threads in (1, 2, 2, 2):
                torch.set_num_threads(threads)
                outs.append((cb.render(mu, sw, wt, None, 1, 1, 2, (9, 9), 0.0),
                             cb.render_wgrad(x, mu, sw, None, 1, 1, 2, 0.0, kernel)))
        finally:
            torch.set_num_threads(before)
        for other in outs[1:]:
            assert torch.equal(outs[0][0], other[0]) and torch.equal(outs[0][1], other[1]), (dtype, kernel)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("use_scale", [False, True])
@pytest.mark.parametrize("pool", [1, 2])
def test_pointwise_conv_path(dtype, use_scale, pool):
    # 1x1, stride 1, no padding, NCHW: the cpu backend computes the conv (and for pool=1 the render and the
    # gather) as batched matrix products instead of oneDNN; every primitive against the reference.
    g = torch.Generator().manual_seed(5)
    n, ci, co, h, w = 3, 37, 11, 6, 8
    x = torch.randn(n, ci, h, w, generator=g, dtype=dtype)
    wt = torch.randn(co, ci, 1, 1, generator=g, dtype=dtype)
    scale = torch.randn(co, generator=g, dtype=dtype) if use_scale else None
    shift = torch.randn(co, generator=g, dtype=dtype)
    y, sw = cb.conv_relu_pool(x, wt, scale, shift, 1, 0, pool, 0.1)
    y_ref, sw_ref = R.conv_relu_pool(x, wt, scale, shift, 1, 0, pool, 0.1)
    torch.testing.assert_close(y, y_ref, **TOL[dtype])
    assert torch.equal(sw, sw_ref)
    mu = torch.randn(y.shape, generator=g, dtype=dtype)
    torch.testing.assert_close(cb.render(mu, sw, wt, scale, 1, 0, pool, (h, w), 0.1),
                               R.render(mu, sw, wt, scale, 1, 0, pool, (h, w), 0.1), **TOL[dtype])
    torch.testing.assert_close(cb.gather_conv(x, wt, sw, 1, 0, pool), R.gather_conv(x, wt, sw, 1, 0, pool),
                               **TOL[dtype])
    torch.testing.assert_close(cb.render_wgrad(x, mu, sw, scale, 1, 0, pool, 0.1, (1, 1)),
                               R.render_wgrad(x, mu, sw, scale, 1, 0, pool, 0.1, (1, 1)), **TOL[dtype])


def test_dense_render_when_fresh_temporaries_page_fault():
    """pool=1 render under an allocator that maps every large block anew (so each fresh temporary faults in):
    the kernel then keeps its temporary across calls, and successive calls with new data must still agree with
    the reference -- and must not hand out the kept buffer."""
    import subprocess
    import sys

    script = r"""
import torch
import drmm_kernels as dk
from drmm_kernels import reference as R
torch.manual_seed(0)
outs = []
for it in range(4):
    n, co, ci, h = 8, 32, 16, 18                 # temporary of 8*32*16*16 floats = 512 KiB (128 pages) ...
    n = 64                                       # ... times 8: 1024 pages, past the 256-page floor
    mu = torch.randn(n, co, h - 2, h - 2)
    sw = (torch.rand(n, co, h - 2, h - 2) < 0.5).to(torch.uint8) * 0x80
    w = torch.randn(co, ci, 3, 3)
    got = torch.ops.drmm_C.render(mu, sw, w, None, 1, 0, 1, h, h, 0.0)
    want = R.render(mu, sw, w, None, 1, 0, 1, (h, h), 0.0)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    outs.append(got)
assert len({o.untyped_storage().data_ptr() for o in outs}) == len(outs)
print("ok")
"""
    env = dict(os.environ, GLIBC_TUNABLES="glibc.malloc.mmap_threshold=65536:glibc.malloc.trim_threshold=65536")
    res = subprocess.run([sys.executable, "-c", "import drmm_kernels.cpu_backend\n" + script], env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stdout + res.stderr


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("pool,conv_hw", [(1, (5, 4)), (2, (7, 6)), (3, (9, 11)), (4, (8, 9))])
def test_unpool_matches_reference(dtype, pool, conv_hw):
    torch.manual_seed(pool)
    hp, wp = conv_hw[0] // pool, conv_hw[1] // pool
    values = torch.randn(3, 5, hp, wp, dtype=dtype)
    offsets = torch.randint(0, pool * pool, (3, 5, hp, wp), dtype=torch.uint8)
    switches = offsets | ((torch.rand(3, 5, hp, wp) < 0.5).to(torch.uint8) << 7)  # the a bit does not matter
    got = cb.unpool(values, switches, pool, conv_hw)
    want = R.unpool(values, switches, pool, conv_hw)
    assert got.shape == (3, 5, *conv_hw) and got.is_contiguous()
    assert torch.equal(got, want)  # a pure relocation: exact, rows / columns past the last window stay zero
    # non-contiguous inputs are read correctly
    assert torch.equal(cb.unpool(values.transpose(2, 3).contiguous().transpose(2, 3), switches, pool, conv_hw), want)


def test_unpool_errors_name_the_problem():
    v = torch.randn(1, 2, 3, 3)
    with pytest.raises(RuntimeError, match="window offset"):
        cb.unpool(v, torch.full((1, 2, 3, 3), 4, dtype=torch.uint8), 2, (6, 6))
    with pytest.raises(RuntimeError, match="output size"):
        cb.unpool(v, torch.zeros(1, 2, 3, 3, dtype=torch.uint8), 2, (8, 6))
    with pytest.raises(RuntimeError, match="switches shape"):
        cb.unpool(v, torch.zeros(1, 2, 3, 2, dtype=torch.uint8), 2, (6, 6))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("slope", [0.0, 0.1])
def test_masked_values_selects_like_relu_backward(dtype, slope):
    # Where the a bit is off under ReLU the gradient is 0 even for an infinite or NaN upstream value (ReLU's
    # backward selects; a multiply by 0 would make NaN). Long enough for the vector loop, with a scalar tail.
    n = 1000
    mu = torch.randn(1, 1, 1, n, dtype=dtype)
    mu[..., ::7] = float("inf")
    mu[..., 3::11] = float("nan")
    on = torch.rand(1, 1, 1, n) < 0.5
    sw = on.to(torch.uint8) << 7
    want = torch.where(on, mu, mu * slope) if slope else torch.where(on, mu, torch.zeros((), dtype=dtype))
    for got in (cb.masked_values(mu, sw, None, slope), R.masked_values(mu, sw, None, slope)):
        torch.testing.assert_close(got, want, equal_nan=True, rtol=0, atol=0)
    scale = torch.full((1,), 2.0, dtype=dtype)
    torch.testing.assert_close(cb.masked_values(mu, sw, scale, slope), want * 2, equal_nan=True, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape,offset", [((5, 3, 7, 9), 0.0), ((17, 4, 6, 5), 1000.0), ((2, 40, 33, 31), -3.0)])
def test_batch_stats_matches_float64(dtype, shape, offset):
    # A large common offset (|mean| >> std) is where one-pass sums of squares lose everything without the shift.
    torch.manual_seed(0)
    z = (torch.randn(*shape, dtype=torch.float64) * 0.5 + offset + torch.arange(shape[1]).view(1, -1, 1, 1))
    var_ref, mean_ref = torch.var_mean(z, dim=(0, 2, 3), unbiased=False)
    z = z.to(dtype)
    mean, var = cb.batch_stats(z)
    assert mean.dtype == dtype and var.dtype == dtype and mean.shape == (shape[1],)
    rel = 1e-4 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(mean.double(), mean_ref, rtol=rel, atol=rel)
    torch.testing.assert_close(var.double(), var_ref, rtol=rel * (1 + abs(offset)), atol=rel)
    # independent of the thread count (fixed chunks summed in order)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cb.batch_stats(z)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0], mean) and torch.equal(one[1], var)
    # channels_last input goes to the reference (ATen) path with the same result
    cl = cb.batch_stats(z.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(cl[1].double(), var_ref, rtol=rel * (1 + abs(offset)), atol=rel)
