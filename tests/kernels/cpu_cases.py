"""Shared pieces of the cpu backend's kernel tests: its primitives (``kernels``, None when the extension is
not built), hypothesis geometries, inputs, tolerances and the switch comparison against the reference.
"""

import torch
from hypothesis import assume
from hypothesis import strategies as st

from drmm_kernels import dispatch
from drmm_kernels import testing as eager
from drmm_kernels.contract import plain_pool  # noqa: E402


# The cpu backend module (the C++ kernels' Python side); None when the extension is not built.
kernels = dispatch.backend_module("cpu")

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


def assert_switches(sw: torch.Tensor, ref: torch.Tensor, v: torch.Tensor, pool: int, dtype) -> None:
    """The switch bytes of the kernel against the reference's, where rounding cannot decide them."""
    assert sw.dtype == torch.uint8 and sw.shape == ref.shape and sw.is_contiguous()
    eager.assert_switches_agree(sw, ref, v, pool, switch_tol(v, dtype))


def switch_tol(v: torch.Tensor, dtype) -> float:
    """Top-two gap (and distance of the window max from 0) below which rounding may decide a switch byte."""
    return GAP[dtype] * max(1.0, v.abs().max().item()) if v.numel() else GAP[dtype]


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
    return dict(
        n=draw(st.integers(1, 3)),
        cin=draw(st.integers(1, 6)),
        cout=draw(st.integers(1, 6)),
        k=k,
        pad=pad,
        stride=stride,
        **plain_pool(pool),
        h=h,
        w=w,
        hc=hc,
        wc=wc,
        slope=draw(st.sampled_from([0.0, 0.1])),
        dtype=draw(st.sampled_from([torch.float32, torch.float64])),
        layout=draw(st.sampled_from(LAYOUTS)),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def make_inputs(g):
    gen = torch.Generator().manual_seed(g["seed"])
    dt = g["dtype"]
    x = torch.randn(g["n"], g["cin"], g["h"], g["w"], generator=gen, dtype=dt)
    wt = torch.randn(g["cout"], g["cin"], g["k"], g["k"], generator=gen, dtype=dt)
    scale = torch.randn(g["cout"], generator=gen, dtype=dt)  # includes negative scales
    shift = torch.randn(g["cout"], generator=gen, dtype=dt)
    return gen, x, wt, scale, shift


def exact_cases(dtype):
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
