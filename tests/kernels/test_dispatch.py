"""Dispatch: backend selection, the custom ops (opcheck, torch.compile), and the eager fast path."""

import os

import pytest
import torch

import drmm_kernels as dk

import op_cases as oc
from drmm_kernels.contract import plain_pool  # noqa: E402


def test_backend_selection():
    status = dk.available_backends()
    assert set(status) == {"reference", "cpu", "cuda", "triton"} and status["reference"].available
    for name, st_ in status.items():
        assert isinstance(st_.reason, str) and st_.reason
    with pytest.raises(ValueError, match="^drmm_kernels: unknown backend 'nope'"):
        dk.set_backend("nope")
    unavailable = [n for n, s in status.items() if not s.available]
    for name in unavailable:
        with pytest.raises(RuntimeError, match=f"backend '{name}' is not available: "):
            dk.set_backend(name)
    with dk.backend("reference"):
        assert dk.get_backend() == "reference"
    assert dk.get_backend() == "auto"


def test_environment_variable_selects_backend(tmp_path):
    import subprocess
    import sys

    code = "import drmm_kernels as dk; print(dk.get_backend())"
    env = dict(os.environ, DRMM_KERNELS_BACKEND="reference")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "reference"
    env["DRMM_KERNELS_BACKEND"] = "bogus"
    bad = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "DRMM_KERNELS_BACKEND='bogus'" in bad.stderr


def _opcheck_samples():
    x, w, scale, shift = oc.small(torch.float32)
    y, sw = dk.conv_relu_pool(x, w, scale, shift, padding=1)
    mu = torch.randn_like(y).requires_grad_(True)
    ops = torch.ops.drmm
    geo = dict(stride=1, padding=1, **plain_pool(2))
    bn = dict(x=x, weight=w, bn_weight=scale, bn_bias=shift, eps=1e-5, negative_slope=0.0, **geo)
    return [
        (ops.conv_relu_pool.default, dict(x=x, weight=w, scale=scale, shift=shift, negative_slope=0.0, **geo)),
        (
            ops.conv_relu_pool.default,
            dict(x=x, weight=w, scale=None, shift=None, stride=2, padding=0, **plain_pool(1), negative_slope=0.1),
        ),
        (
            ops.render.default,
            dict(mu=mu, switches=sw, weight=w, scale=scale, out_h=7, out_w=6, negative_slope=0.1, **geo),
        ),
        (
            ops.render.default,
            dict(mu=mu, switches=sw, weight=w, scale=None, out_h=7, out_w=6, negative_slope=0.0, **geo),
        ),
        (ops.gather_conv.default, dict(src=x, weight=w, switches=sw, **geo)),
        (
            ops.render_wgrad.default,
            dict(src=x, mu=mu, switches=sw, scale=scale, negative_slope=0.0, kernel_h=3, kernel_w=3, **geo),
        ),
        (ops.masked_values.default, dict(mu=mu, switches=sw, scale=scale, negative_slope=0.1)),
        (ops.masked_values.default, dict(mu=mu, switches=sw, scale=None, negative_slope=0.0)),
        (ops.conv_bn_relu_pool.default, dict(running_mean=None, running_var=None, training=True, **bn)),
        (
            ops.conv_bn_relu_pool.default,
            dict(running_mean=torch.zeros(3), running_var=torch.ones(3), training=False, **bn),
        ),
    ]


@pytest.mark.parametrize("backend", oc.BACKENDS)
def test_opcheck(backend):
    with dk.backend(backend):
        for op, kwargs in _opcheck_samples():
            torch.library.opcheck(op, (), kwargs)


def _train_step(x, w, scale, shift, bn_w, bn_b):
    y, sw = dk.conv_relu_pool(x, w, scale, shift, padding=1)
    x_hat = dk.render(y, sw, w, stride=1, padding=1, out_size=x.shape[-2:])
    y2, _ = dk.conv_bn_relu_pool(x, w, bn_w, bn_b, None, None, training=True, padding=1)
    return (x_hat - x).pow(2).mean() + y.sum() + y2.square().sum()


# aot_eager for every backend; Inductor once (on the fastest backend) to keep CI inside its budget.
@pytest.mark.parametrize("backend, compiler", [(b, "aot_eager") for b in oc.BACKENDS] + [(oc.BACKENDS[-1], "inductor")])
def test_torch_compile_fullgraph(backend, compiler):
    x, w, scale, shift = oc.small(torch.float32)
    bn_w, bn_b = scale.detach().clone().requires_grad_(True), shift.detach().clone().requires_grad_(True)
    leaves = (x, w, scale, shift, bn_w, bn_b)
    torch._dynamo.reset()
    with dk.backend(backend):
        expected = torch.autograd.grad(_train_step(*leaves), leaves)
        compiled = torch.compile(_train_step, backend=compiler, fullgraph=True)
        got = torch.autograd.grad(compiled(*leaves), leaves)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_eager_fast_path_matches_the_custom_op(backend):
    """Plain eager calls skip the torch.library round trip (dispatch.CustomOp); the custom op (what compile, fake
    tensors and opcheck use) must give bitwise the same values, switches and gradients, first and second order."""
    if not dk.available_backends()[backend].available:
        pytest.skip(f"{backend} backend not available")
    torch.manual_seed(0)
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    w = torch.randn(5, 3, 3, 3, dtype=torch.float64)
    b = torch.randn(5, dtype=torch.float64)
    results = []
    with dk.backend(backend):
        for via_op in (False, True):
            xx = x.clone().requires_grad_()
            ww, bb = torch.nn.Parameter(w.clone()), torch.nn.Parameter(b.clone())  # as in a model: fast path too
            if via_op:
                y, sw = torch.ops.drmm.conv_relu_pool(
                    x=xx, weight=ww, scale=None, shift=bb, stride=1, padding=1, **plain_pool(2), negative_slope=0.1
                )
                assert "function" not in type(y.grad_fn).__name__
            else:
                y, sw = dk.conv_relu_pool(xx, ww, None, bb, padding=1, pool=2, negative_slope=0.1)
                assert type(y.grad_fn).__name__.startswith("conv_relu_pool_function")
            gx, gw = torch.autograd.grad((y * y).sum(), (xx, ww), create_graph=True)
            (ggw,) = torch.autograd.grad(gx.pow(2).sum(), ww)
            with torch.no_grad():
                r = (
                    dk.render(y, sw, ww, padding=1, pool=2, out_size=(9, 9), negative_slope=0.1)
                    if not via_op
                    else torch.ops.drmm.render(
                        mu=y,
                        switches=sw,
                        weight=ww,
                        scale=None,
                        stride=1,
                        padding=1,
                        **plain_pool(2),
                        out_h=9,
                        out_w=9,
                        negative_slope=0.1,
                    )
                )
            results.append((y, sw, gx, gw, ggw, r))
    for a, b_ in zip(*results):
        assert torch.equal(a, b_)


def test_fast_path_steps_aside_under_functorch_transforms():
    # Inside torch.func transforms even plain tensors and Parameters must go through the custom op: the eager
    # fast path's autograd.Function has no setup_context, which functorch requires.
    w = torch.nn.Parameter(torch.randn(4, 3, 3, 3))
    x = torch.randn(2, 3, 8, 8)
    y_ref = dk.conv_relu_pool(x, w, padding=1)[0].sum()

    def f(s):
        return dk.conv_relu_pool(x, w, padding=1)[0].sum() * s

    torch.testing.assert_close(torch.func.grad(f)(torch.tensor(2.0)), y_ref.detach())
    torch.testing.assert_close(
        torch.func.vmap(f)(torch.tensor([1.0, 2.0])).detach(), torch.stack([y_ref, 2 * y_ref]).detach()
    )
