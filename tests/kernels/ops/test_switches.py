"""Switch maps: switches_to_indices, the unpool and masked_values primitives, and the tests' own switch
comparison (drmm_kernels/testing.py), which every cross-backend switch check goes through.
"""

import pytest
import torch
import torch.nn.functional as F

import drmm_kernels as dk
from drmm_kernels import contract, reference
from drmm_kernels import testing as eager

import cpu_cases as cpu
from drmm_kernels.contract import plain_pool  # noqa: E402


# --------------------------------------------------------------------------- public op


def test_switches_to_indices_are_max_pool2d_indices():
    x = torch.randn(2, 3, 9, 8, dtype=torch.float64)
    for pool in (1, 2, 3):
        _, idx = F.max_pool2d(x, pool, pool, return_indices=True)
        hp, wp = idx.shape[-2:]
        rows = torch.div(idx, 8, rounding_mode="floor") - torch.arange(hp).view(hp, 1) * pool
        cols = idx % 8 - torch.arange(wp).view(1, wp) * pool
        sw = (rows * pool + cols).to(torch.uint8) | contract.ON_BIT  # the a bit plays no part in the index
        assert torch.equal(dk.switches_to_indices(sw, pool=pool, conv_size=(9, 8)), idx)


def test_switches_to_indices_bad_input():
    sw = torch.zeros(1, 1, 2, 2, dtype=torch.uint8)
    with pytest.raises(TypeError, match="^drmm_kernels.switches_to_indices: switches must be torch.uint8"):
        dk.switches_to_indices(sw.int(), pool=2, conv_size=(4, 4))
    with pytest.raises(
        ValueError,
        match=r"^drmm_kernels.switches_to_indices: conv_size \(6, 6\) with pool 2 gives "
        r"pooled size \(3, 3\)",
    ):
        dk.switches_to_indices(sw, pool=2, conv_size=(6, 6))
    with pytest.raises(ValueError, match="^drmm_kernels.switches_to_indices: pool must be in"):
        dk.switches_to_indices(sw, pool=5, conv_size=(4, 4))
    # an offset outside the window would index another window's position (0x8F: offset 15, on, with pool=2)
    for byte in (0x8F, 0x04, 0x90):
        bad = sw.clone()
        bad[0, 0, 1, 0] = byte
        with pytest.raises(ValueError, match=rf"^drmm_kernels.switches_to_indices: switches holds byte {byte:#04x}"):
            dk.switches_to_indices(bad, pool=2, conv_size=(4, 4))
    ok = torch.tensor([[[[0x83, 0x00], [0x01, 0x82]]]], dtype=torch.uint8)
    assert dk.switches_to_indices(ok, pool=2, conv_size=(4, 4)).tolist() == [[[[5, 2], [9, 14]]]]


# --------------------------------------------------------------------------- the tests' switch comparison


@pytest.mark.parametrize("pool", [1, 2])
def test_window_gap_stays_on_the_input_device(pool):
    # A gap built on another device than v (pool=1 once was) cannot be compared with switches on v's device.
    v = torch.empty(2, 3, 4, 4, device="meta")
    gap = eager.window_gap(v, pool)
    assert gap.device == v.device and gap.shape == (2, 3, 4 // pool, 4 // pool)


def test_switch_comparison_ignores_near_ties_only():
    v = torch.tensor([[[[1.0, 1.0 + 1e-7, 5.0, 2.0], [0.0, 0.0, 1.0, -3.0]]]], dtype=torch.float64)
    _, sw = reference.pool_switches(v, 2, 0.0)
    flipped = sw.clone()
    flipped[0, 0, 0, 0] ^= 1  # near-tied window (gap 1e-7): either offset is right
    eager.assert_switches_agree(flipped, sw, v, 2, tol=1e-4)
    flipped[0, 0, 0, 1] ^= 1  # clear window (gap 3): a real difference
    with pytest.raises(AssertionError, match="1 window offsets differ"):
        eager.assert_switches_agree(flipped, sw, v, 2, tol=1e-4)
    on_off = sw.clone()
    on_off[0, 0, 0, 1] ^= contract.ON_BIT  # window max 5, far from 0: the a bit is decided
    with pytest.raises(AssertionError, match="a bits differ"):
        eager.assert_switches_agree(on_off, sw, v, 2, tol=1e-4)


# --------------------------------------------------------------------------- cpu kernels


@pytest.mark.cpu_backend
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("pool,conv_hw", [(1, (5, 4)), (2, (7, 6)), (3, (9, 11)), (4, (8, 9))])
def test_cpu_unpool_matches_reference(dtype, pool, conv_hw):
    torch.manual_seed(pool)
    hp, wp = conv_hw[0] // pool, conv_hw[1] // pool
    values = torch.randn(3, 5, hp, wp, dtype=dtype)
    offsets = torch.randint(0, pool * pool, (3, 5, hp, wp), dtype=torch.uint8)
    switches = offsets | ((torch.rand(3, 5, hp, wp) < 0.5).to(torch.uint8) << 7)  # the a bit does not matter
    args = dict(switches=switches, **plain_pool(pool), out_h=conv_hw[0], out_w=conv_hw[1])
    got = cpu.kernels.unpool(values=values, **args)
    want = reference.unpool(values=values, **args)
    assert got.shape == (3, 5, *conv_hw) and got.is_contiguous()
    assert torch.equal(got, want)  # a pure relocation: exact, rows / columns past the last window stay zero
    # non-contiguous inputs are read correctly
    strided = values.transpose(2, 3).contiguous().transpose(2, 3)
    assert torch.equal(cpu.kernels.unpool(values=strided, **args), want)


@pytest.mark.cpu_backend
def test_cpu_unpool_errors_name_the_problem():
    v = torch.randn(1, 2, 3, 3)
    with pytest.raises(RuntimeError, match="drmm_kernels.unpool: switches hold a window offset"):
        cpu.kernels.unpool(
            values=v, switches=torch.full((1, 2, 3, 3), 4, dtype=torch.uint8), **plain_pool(2), out_h=6, out_w=6
        )
    with pytest.raises(RuntimeError, match="drmm_kernels.unpool: output size"):
        cpu.kernels.unpool(
            values=v, switches=torch.zeros(1, 2, 3, 3, dtype=torch.uint8), **plain_pool(2), out_h=8, out_w=6
        )
    with pytest.raises(RuntimeError, match="drmm_kernels.unpool: switches shape"):
        cpu.kernels.unpool(
            values=v, switches=torch.zeros(1, 2, 3, 2, dtype=torch.uint8), **plain_pool(2), out_h=6, out_w=6
        )


@pytest.mark.cpu_backend
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("slope", [0.0, 0.1])
def test_cpu_masked_values_selects_like_relu_backward(dtype, slope):
    # Where the a bit is off under ReLU the gradient is 0 even for an infinite or NaN upstream value (ReLU's
    # backward selects; a multiply by 0 would make NaN). Long enough for the vector loop, with a scalar tail.
    n = 1000
    mu = torch.randn(1, 1, 1, n, dtype=dtype)
    mu[..., ::7] = float("inf")
    mu[..., 3::11] = float("nan")
    on = torch.rand(1, 1, 1, n) < 0.5
    sw = on.to(torch.uint8) << 7
    want = torch.where(on, mu, mu * slope) if slope else torch.where(on, mu, torch.zeros((), dtype=dtype))
    args = dict(mu=mu, switches=sw, negative_slope=slope)
    for got in (cpu.kernels.masked_values(scale=None, **args), reference.masked_values(scale=None, **args)):
        torch.testing.assert_close(got, want, equal_nan=True, rtol=0, atol=0)
    scale = torch.full((1,), 2.0, dtype=dtype)
    torch.testing.assert_close(cpu.kernels.masked_values(scale=scale, **args), want * 2, equal_nan=True, rtol=0, atol=0)
