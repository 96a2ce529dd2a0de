"""Quirks of the cpu backend (C++ kernels): dtype fallback, errors raised by the kernels themselves,
determinism across thread counts, and the dense temporaries under a page-faulting allocator.
"""

import os

import pytest
import torch

import drmm_kernels as dk
from drmm_kernels import reference

import cpu_cases as cpu
from drmm_kernels.contract import plain_pool  # noqa: E402


@pytest.mark.cpu_backend
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cpu_other_dtypes_fall_back_to_reference(dtype):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 8, 8, generator=gen).to(dtype)
    wt = torch.randn(4, 3, 3, 3, generator=gen).to(dtype)
    geo = dict(stride=1, padding=1, **plain_pool(2))
    fwd = dict(x=x, weight=wt, scale=None, shift=None, negative_slope=0.0, **geo)
    y, sw = cpu.kernels.conv_relu_pool(**fwd)
    yr, swr = reference.conv_relu_pool(**fwd)
    assert y.dtype == dtype and torch.equal(y, yr) and torch.equal(sw, swr)
    mu = torch.randn(y.shape, generator=gen).to(dtype)
    render = dict(mu=mu, switches=sw, weight=wt, scale=None, out_h=8, out_w=8, negative_slope=0.0, **geo)
    assert torch.equal(cpu.kernels.render(**render), reference.render(**render))
    gather = dict(src=x, weight=wt, switches=sw, **geo)
    assert torch.equal(cpu.kernels.gather_conv(**gather), reference.gather_conv(**gather))
    wgrad = dict(src=x, mu=mu, switches=sw, scale=None, negative_slope=0.0, kernel_h=3, kernel_w=3, **geo)
    assert torch.equal(cpu.kernels.render_wgrad(**wgrad), reference.render_wgrad(**wgrad))


@pytest.mark.cpu_backend
@pytest.mark.parametrize("cin", [3, 16])  # gather_conv's dense path (a 9-long kernel row) and its sparse one (48)
def test_cpu_invalid_switch_offset_is_an_error(cin):
    mu = torch.randn(1, 2, 3, 3)
    sw = torch.full((1, 2, 3, 3), 0x85, dtype=torch.uint8)  # offset 5 >= pool*pool = 4
    wt = torch.randn(2, cin, 3, 3)
    with pytest.raises(RuntimeError, match="drmm_kernels.render: switches hold a window offset"):
        cpu.kernels.render(
            mu=mu,
            switches=sw,
            weight=wt,
            scale=None,
            stride=1,
            padding=1,
            **plain_pool(2),
            out_h=6,
            out_w=6,
            negative_slope=0.0,
        )
    with pytest.raises(RuntimeError, match="drmm_kernels.gather_conv: switches hold a window offset"):
        cpu.kernels.gather_conv(
            src=torch.randn(1, cin, 6, 6), weight=wt, switches=sw, stride=1, padding=1, **plain_pool(2)
        )


@pytest.mark.cpu_backend
@pytest.mark.parametrize("cin", [0, 1])  # no input channel: a conv of nothing, zeros (not the dense path's read)
def test_cpu_gather_conv_of_few_input_channels(cin):
    gen = torch.Generator().manual_seed(cin)
    src, wt = torch.randn(2, cin, 6, 6, generator=gen), torch.randn(3, cin, 3, 3, generator=gen)
    sw = cpu.random_switches((2, 3, 3, 3), 2, gen)
    gather = dict(src=src, weight=wt, switches=sw, stride=1, padding=1, **plain_pool(2))
    out = cpu.kernels.gather_conv(**gather)
    assert out.shape == (2, 3, 3, 3)
    if cin == 0:
        assert torch.equal(out, torch.zeros(2, 3, 3, 3))
    else:
        torch.testing.assert_close(out, reference.gather_conv(**gather))


@pytest.mark.cpu_backend
def test_cpu_shape_errors_name_the_argument():
    x, wt = torch.randn(1, 3, 8, 8), torch.randn(4, 3, 3, 3)
    with pytest.raises(RuntimeError, match="drmm_kernels.conv_relu_pool: scale must have shape"):
        torch.ops.drmm_C.conv_relu_pool(
            x=x, weight=wt, scale=torch.ones(3), shift=None, stride=1, padding=1, **plain_pool(2), negative_slope=0.0
        )
    render = dict(weight=wt, scale=None, stride=1, padding=1, **plain_pool(2), out_h=8, out_w=8, negative_slope=0.0)
    with pytest.raises(RuntimeError, match="drmm_kernels.render: switches must be uint8"):
        torch.ops.drmm_C.render(mu=torch.randn(1, 4, 4, 4), switches=torch.zeros(1, 4, 4, 4), **render)
    with pytest.raises(RuntimeError, match="drmm_kernels.render: mu/switches must have shape"):
        torch.ops.drmm_C.render(
            mu=torch.randn(1, 4, 3, 4), switches=torch.zeros(1, 4, 3, 4, dtype=torch.uint8), **render
        )


@pytest.mark.cpu_backend
def test_cpu_backend_is_used_by_public_ops():
    x, wt = torch.randn(2, 3, 9, 9), torch.randn(4, 3, 3, 3)
    with dk.backend("cpu"):
        y, sw = dk.conv_relu_pool(x, wt, padding=1)
        xh = dk.render(y, sw, wt, padding=1, out_size=(9, 9))
    yr, swr = reference.conv_relu_pool(
        x=x, weight=wt, scale=None, shift=None, stride=1, padding=1, **plain_pool(2), negative_slope=0.0
    )
    torch.testing.assert_close(y, yr)
    torch.testing.assert_close(
        xh,
        reference.render(
            mu=y,
            switches=sw,
            weight=wt,
            scale=None,
            stride=1,
            padding=1,
            **plain_pool(2),
            out_h=9,
            out_w=9,
            negative_slope=0.0,
        ),
    )


@pytest.mark.cpu_backend
def test_cpu_results_are_bitwise_independent_of_threads_and_scheduling():
    # Workers take samples (render) or sample chunks (wgrad) from a shared queue; exact training resume
    # needs every result bitwise identical whatever the thread count or which worker was free.
    gen = torch.Generator().manual_seed(11)
    for dtype, kernel in ((torch.float64, (3, 3)), (torch.float32, (3, 3)), (torch.float32, (2, 3))):
        x = torch.randn(19, 16, 9, 9, generator=gen, dtype=dtype)
        wt = torch.randn(8, 16, *kernel, generator=gen, dtype=dtype)
        geo = dict(stride=1, padding=1, **plain_pool(2), negative_slope=0.0)
        y, sw = cpu.kernels.conv_relu_pool(x=x, weight=wt, scale=None, shift=None, **geo)
        mu = torch.randn(y.shape, generator=gen, dtype=dtype)
        before = torch.get_num_threads()
        outs = []
        try:
            for threads in (1, 2, 2, 2):
                torch.set_num_threads(threads)
                outs.append(
                    (
                        cpu.kernels.render(mu=mu, switches=sw, weight=wt, scale=None, out_h=9, out_w=9, **geo),
                        cpu.kernels.render_wgrad(
                            src=x, mu=mu, switches=sw, scale=None, kernel_h=kernel[0], kernel_w=kernel[1], **geo
                        ),
                    )
                )
        finally:
            torch.set_num_threads(before)
        for other in outs[1:]:
            assert torch.equal(outs[0][0], other[0]) and torch.equal(outs[0][1], other[1]), (dtype, kernel)


@pytest.mark.cpu_backend
def test_cpu_dense_render_when_fresh_temporaries_page_fault():
    """pool=1 render under an allocator that maps every large block anew (so each fresh temporary faults in):
    the kernel then keeps its temporary across calls, and successive calls with new data must still agree with
    the reference -- and must not hand out the kept buffer."""
    import subprocess
    import sys

    script = r"""
import torch
import drmm_kernels as dk
from drmm_kernels import reference
torch.manual_seed(0)
outs = []
for it in range(4):
    n, co, ci, h = 8, 32, 16, 18                 # temporary of 8*32*16*16 floats = 512 KiB (128 pages) ...
    n = 64                                       # ... times 8: 1024 pages, past the 256-page floor
    mu = torch.randn(n, co, h - 2, h - 2)
    sw = (torch.rand(n, co, h - 2, h - 2) < 0.5).to(torch.uint8) * 0x80
    w = torch.randn(co, ci, 3, 3)
    args = dict(mu=mu, switches=sw, weight=w, scale=None, stride=1, padding=0, pool=1, pool_stride=1,
                pool_padding=0, ceil_mode=False, out_h=h, out_w=h,
                negative_slope=0.0)
    got = torch.ops.drmm_C.render(**args)
    want = reference.render(**args)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    outs.append(got)
assert len({o.untyped_storage().data_ptr() for o in outs}) == len(outs)
print("ok")
"""
    env = dict(os.environ, GLIBC_TUNABLES="glibc.malloc.mmap_threshold=65536:glibc.malloc.trim_threshold=65536")
    res = subprocess.run(
        [sys.executable, "-c", "import drmm_kernels.cpu\n" + script],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stdout + res.stderr
