"""Quirks of the Triton backend: the float64 fallback, the ahead-of-time compile for sm_90 (no GPU needed),
and the GPU-only checks at realistic shapes and under torch.compile.
"""

import pytest
import torch

import drmm_kernels as dk
from drmm_kernels import reference
from drmm_kernels import testing as eager

import triton_cases as trt
from drmm_kernels.contract import plain_pool  # noqa: E402


@pytest.mark.triton
def test_triton_float64_falls_back_to_reference():
    x = torch.randn(1, 2, 5, 5, dtype=torch.float64, device=trt.DEV)
    w = torch.randn(3, 2, 3, 3, dtype=torch.float64, device=trt.DEV)
    args = dict(x=x, weight=w, scale=None, shift=None, stride=1, padding=1, **plain_pool(2), negative_slope=0.0)
    y, sw = trt.kernels.conv_relu_pool(**args)
    y_ref, sw_ref = reference.conv_relu_pool(**args)
    assert torch.equal(y, y_ref) and torch.equal(sw, sw_ref)


@pytest.mark.triton
def test_triton_kernels_compile_for_sm90():
    """The interpreter never runs the compiler; build PTX/cubin for sm_90 (first config of each kernel
    variant) in a subprocess without TRITON_INTERPRET, with triton's bundled ptxas."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["DRMM_TRITON_AUTOTUNE"] = "0"
    proc = subprocess.run(
        [sys.executable, "-m", "drmm_kernels.triton._aot"], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]


@pytest.mark.triton
@pytest.mark.gpu
@pytest.mark.parametrize("case", trt.GPU_CASES, ids=str)
def test_triton_gpu_realistic(case: trt.Case):
    x, w, scale, shift = trt.inputs(case, device="cuda")
    tol = 2e-2 if case.dtype != torch.float32 else 5e-3  # TF32 (cudnn default) on both sides
    leaves = [t.requires_grad_() for t in (x, w, scale, shift) if t is not None]
    with dk.backend("triton"):
        y, sw = dk.conv_relu_pool(
            x, w, scale, shift, stride=case.stride, padding=case.pad, pool=case.pool, negative_slope=case.slope
        )
    v = eager.pre_activation(
        x.detach().double(), w.detach().double(), trt.dc(scale), trt.dc(shift), case.stride, case.pad
    )
    y_ref, sw_ref = reference.pool_switches(v, case.pool, case.slope)
    assert trt.rel_err(y, y_ref) < tol
    eager.assert_switches_agree(sw, sw_ref, v, case.pool, 2e-2 * v.abs().max().item(), "conv_relu_pool")

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
        assert trt.rel_err(got.grad, exp.grad) < tol, name

    # the top-down pass (raw weight), against max_unpool2d + mask + conv_transpose2d in float64
    mu = torch.randn_like(y).detach()
    with dk.backend("triton"):
        xh = dk.render(
            mu,
            sw,
            w.detach(),
            stride=case.stride,
            padding=case.pad,
            pool=case.pool,
            out_size=(case.h, case.w),
            negative_slope=case.slope,
        )
    xh_ref = reference.render(
        mu=mu.double(),
        switches=sw,
        weight=w.detach().double(),
        scale=None,
        stride=case.stride,
        padding=case.pad,
        **plain_pool(case.pool),
        out_h=case.h,
        out_w=case.w,
        negative_slope=case.slope,
    )
    assert trt.rel_err(xh, xh_ref) < tol


@pytest.mark.triton
@pytest.mark.gpu
def test_triton_gpu_compiled_fullgraph():
    case = trt.GPU_CASES[0]
    x, w, scale, shift = trt.inputs(case, device="cuda")
    x.requires_grad_()

    def f(x):
        y, sw = dk.conv_relu_pool(x, w, scale, shift, padding=1)
        return dk.render(y, sw, w, padding=1, out_size=x.shape[-2:])

    with dk.backend("triton"):
        out = torch.compile(f, fullgraph=True)(x)
        out.sum().backward()
        ref = f(x.detach())
    assert trt.rel_err(out, ref) < 1e-5
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.triton
def test_autotune_can_be_switched_off():
    """DRMM_TRITON_AUTOTUNE=0 leaves every kernel its first config (one compile per shape: GPU correctness runs
    over many shapes stay fast); by default compiled kernels autotune over several. Read at import, no GPU."""
    import os
    import subprocess
    import sys

    code = (
        "from drmm_kernels.triton import conv_bn_relu_pool_kernel as b, conv_relu_pool_kernel as c, "
        "render_kernel as r, render_wgrad_kernel as w\n"
        "print(*(len(k.configs) for k in (c._conv_pool_kernel, r._render_kernel, w._wgrad_kernel, "
        "b._bn_pool_kernel)))"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "DRMM_TRITON_AUTOTUNE")}

    def counts(**extra):
        out = subprocess.run(
            [sys.executable, "-c", code], env=dict(env, **extra), capture_output=True, text=True, timeout=300
        )
        assert out.returncode == 0, out.stderr[-3000:]
        return [int(n) for n in out.stdout.split()]

    assert counts(DRMM_TRITON_AUTOTUNE="0") == [1, 1, 1, 1]
    assert all(n > 1 for n in counts()[:3])
    assert counts(TRITON_INTERPRET="1") == [1, 1, 1, 1]  # the interpreter cannot benchmark configs
