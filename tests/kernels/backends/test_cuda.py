"""Quirks of the CUDA backend (GPU only): every gradient of the public ops against the reference backend,
realistic shapes, an empty batch, torch.compile.
"""

import pytest
import torch

import drmm_kernels as dk
from drmm_kernels import testing as eager

import cuda_cases as cuda


@pytest.mark.gpu
@pytest.mark.cuda
@pytest.mark.parametrize("case", cuda.GRAD_CASES, ids=str)
def test_cuda_public_op_gradients(case: cuda.Case):
    """Every gradient of conv_relu_pool and render through the public ops, cuda vs reference backend."""
    tol = cuda.TOL[case.dtype]

    def run(backend, render_switches):
        x, w, scale, shift = cuda.inputs(case)
        leaves = [t.requires_grad_() for t in (x, w, scale, shift) if t is not None]
        with cuda.tf32(False), dk.backend(backend):
            y, sw = dk.conv_relu_pool(
                x, w, scale, shift, stride=case.stride, padding=case.pad, pool=case.pool, negative_slope=case.slope
            )
            gy = torch.randn(y.shape, dtype=y.dtype, device="cuda", generator=torch.Generator("cuda").manual_seed(2))
            (y * gy).sum().backward()
            mu = torch.randn(
                y.shape, dtype=y.dtype, device="cuda", generator=torch.Generator("cuda").manual_seed(3)
            ).requires_grad_()
            sc = None if scale is None else scale.detach().clone().requires_grad_()
            wr = w.detach().clone().requires_grad_()
            xh = dk.render(
                mu,
                sw if render_switches is None else render_switches,
                wr,
                sc,
                stride=case.stride,
                padding=case.pad,
                pool=case.pool,
                out_size=(case.h, case.w),
                negative_slope=case.slope,
            )
            go = torch.randn(xh.shape, dtype=xh.dtype, device="cuda", generator=torch.Generator("cuda").manual_seed(4))
            (xh * go).sum().backward()
        grads = [t.grad for t in leaves] + [mu.grad, wr.grad] + ([sc.grad] if sc is not None else [])
        return y, sw, xh, grads

    y, sw, xh, grads = run("cuda", None)
    y_r, sw_r, xh_r, grads_r = run("reference", sw)  # render through the same switches on both sides
    assert cuda.rel_err(y, y_r) < tol
    x, w, scale, shift = cuda.inputs(case)
    v = eager.pre_activation(cuda.d(x), cuda.d(w), cuda.d(scale), cuda.d(shift), case.stride, case.pad)
    eager.assert_switches_agree(sw, sw_r, v, case.pool, 4 * tol * v.abs().max().item(), "conv_relu_pool")
    # A switch flipped at a near-tie moves that window's gradient: the forward op's gradients (x, weight, scale,
    # shift come first) are compared only when every switch agrees; render's always (same switches).
    n_forward = len(grads) - (3 if scale is not None else 2)
    same = torch.equal(sw, sw_r)
    assert cuda.rel_err(xh, xh_r) < tol
    for i, (a, b) in enumerate(zip(grads, grads_r)):
        assert a is not None and b is not None, i
        if i < n_forward and not same:
            continue
        assert cuda.rel_err(a, b) < tol, f"gradient {i}: {cuda.rel_err(a, b):.3g}"


@pytest.mark.gpu
@pytest.mark.cuda
@pytest.mark.parametrize("case", cuda.REALISTIC, ids=str)
def test_cuda_realistic_shapes(case):
    cuda.check_forward_primitives(case)
    cuda.check_backward_primitives(case)


@pytest.mark.gpu
@pytest.mark.cuda
def test_cuda_empty_batch():
    x = torch.randn(0, 3, 8, 8, device="cuda")
    w = torch.randn(4, 3, 3, 3, device="cuda")
    with dk.backend("cuda"):
        y, sw = dk.conv_relu_pool(x, w, padding=1)
    assert y.shape == (0, 4, 4, 4) and sw.shape == (0, 4, 4, 4)


@pytest.mark.gpu
@pytest.mark.cuda
def test_cuda_compiled_fullgraph():
    case = cuda.REALISTIC[0]
    x, w, scale, shift = cuda.inputs(case)
    x.requires_grad_()

    def f(x):
        y, sw = dk.conv_relu_pool(x, w, scale, shift, padding=1)
        return dk.render(y, sw, w, padding=1, out_size=x.shape[-2:])

    with dk.backend("cuda"):
        out = torch.compile(f, fullgraph=True)(x)
        out.float().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad.float()).all()
