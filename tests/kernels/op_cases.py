"""Shared pieces of the public-op tests (tests/kernels/ops/): the backends they run on, hypothesis cases and inputs.

Eager compositions (drmm_kernels/testing.py) are the ground truth of those tests, never the package's own code.
"""

import os

import torch
import torch.nn.functional as F
from hypothesis import assume
from hypothesis import strategies as st

import drmm_kernels as dk
from drmm_kernels import testing as eager
from drmm_kernels.contract import plain_pool  # noqa: E402


# The backends the public-op tests run on: those that take CPU tensors. (The Triton interpreter is too slow for
# these hypothesis cases; its own tests in tests/kernels/ops/ use small fixed cases. Triton and CUDA on a GPU are
# checked against the reference backend by their own tests there.)
BACKENDS = ["reference", "cpu"]
if os.environ.get("DRMM_REQUIRE_EXTENSION") != "1" and not dk.available_backends()["cpu"]:
    BACKENDS = ["reference"]  # outside `make test` the extension may legitimately be absent


def layout(t, kind):
    if kind == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if kind == "noncontig":  # a strided view with the same values
        big = torch.zeros(*t.shape[:-1], t.shape[-1] * 2, dtype=t.dtype)
        big[..., ::2] = t
        return big[..., ::2]
    return t


@st.composite
def conv_cases(draw, max_size=33):
    n = draw(st.integers(1, 8))
    cin = draw(st.integers(1, 16))
    cout = draw(st.integers(1, 16))
    k = draw(st.sampled_from([1, 3, 5]))
    padding = draw(st.sampled_from([0, 1, 2, 4]))
    stride = draw(st.sampled_from([1, 2]))
    pool = draw(st.sampled_from([1, 2]))
    h = draw(st.integers(5, max_size))
    w = draw(st.integers(5, max_size))
    hc, wc = (h + 2 * padding - k) // stride + 1, (w + 2 * padding - k) // stride + 1
    assume(hc >= pool and wc >= pool)
    return dict(
        n=n,
        cin=cin,
        cout=cout,
        k=k,
        padding=padding,
        stride=stride,
        **plain_pool(pool),
        h=h,
        w=w,
        slope=draw(st.sampled_from([0.0, 0.1])),
        dtype=draw(st.sampled_from([torch.float32, torch.float64])),
        layout=draw(st.sampled_from(["contiguous", "channels_last", "noncontig"])),
        affine=draw(st.sampled_from(["none", "shift", "scale_shift"])),
        seed=draw(st.integers(0, 2**16)),
    )


def make(case, requires_grad=True):
    g = torch.Generator().manual_seed(case["seed"])
    dt = case["dtype"]
    x = torch.randn(case["n"], case["cin"], case["h"], case["w"], generator=g, dtype=dt)
    w = torch.randn(case["cout"], case["cin"], case["k"], case["k"], generator=g, dtype=dt) / case["k"]
    scale = shift = None
    if case["affine"] in ("shift", "scale_shift"):
        shift = torch.randn(case["cout"], generator=g, dtype=dt) * 0.5
    if case["affine"] == "scale_shift":
        scale = torch.randn(case["cout"], generator=g, dtype=dt)  # negative entries included
    x = layout(x, case["layout"])
    leaves = [t for t in (x, w, scale, shift) if t is not None]
    for t in leaves:
        t.requires_grad_(requires_grad)
    return x, w, scale, shift


def kwargs(case):
    return dict(
        stride=case["stride"], padding=case["padding"], **plain_pool(case["pool"]), negative_slope=case["slope"]
    )


def check_switches(sw, y_e, idx_e, v, case):
    tol = eager.TOL[case["dtype"]]
    conv_hw = v.shape[-2:]
    idx = dk.switches_to_indices(sw, pool=case["pool"], conv_size=tuple(conv_hw))
    if idx_e is None:  # pool 1: eager pools nothing, so each element's index is its own position
        idx_e = torch.arange(idx.shape[-2] * idx.shape[-1], device=idx.device).view(idx.shape[-2:]).expand_as(idx)
    gap = eager.window_gap(v.detach(), case["pool"])
    clear = gap > 1e3 * tol["atol"]
    # PyTorch's index is comparable wherever the output is > 0 (ReLU) or for any clear window (leaky).
    comparable = clear & ((y_e > 0) if case["slope"] == 0 else torch.ones_like(clear))
    assert torch.equal(idx[comparable], idx_e[comparable])
    # The a bit is the sign of the window max of the pre-activation; bits 4-6 are zero.
    pooled = F.max_pool2d(v.detach(), case["pool"])
    margin = pooled.abs() > tol["atol"]
    assert torch.equal(((sw & 0x80) != 0)[margin], (pooled > 0)[margin])
    assert int((sw & 0x70).max()) == 0
    assert int((sw & 0x0F).max()) < case["pool"] ** 2


def small(dtype=torch.float64, seed=0, cin=2, cout=3, h=7, w=6, n=2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cin, h, w, generator=g, dtype=dtype, requires_grad=True)
    wt = torch.randn(cout, cin, 3, 3, generator=g, dtype=dtype, requires_grad=True)
    scale = torch.randn(cout, generator=g, dtype=dtype, requires_grad=True)
    shift = torch.randn(cout, generator=g, dtype=dtype, requires_grad=True)
    return x, wt, scale, shift


def base():
    return torch.randn(2, 3, 8, 8), torch.randn(4, 3, 3, 3)
