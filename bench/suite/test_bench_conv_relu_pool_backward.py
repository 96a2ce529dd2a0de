"""Benchmark: ``conv_relu_pool`` forward + backward (gradients for x, weight and bias), against eager
``max_pool2d(relu(conv2d), return_indices=True)`` and its ``torch.compile``."""

from __future__ import annotations

import pytest

import drmm_kernels as dk
from workloads import (
    BASELINES,
    IMPL_IDS,
    IMPLS,
    LAYER_IDS,
    LAYERS,
    assert_close,
    assert_close_norm,
    baseline,
    conv_inputs,
    eager_forward,
    group,
    synchronized,
    with_grad,
)


def _step(forward, params, gy):
    def step():
        for p in params:
            p.grad = None
        y, _ = forward(*params)
        y.backward(gy)
        return y

    return step


@pytest.mark.parametrize("impl", IMPLS, ids=IMPL_IDS)
@pytest.mark.parametrize("layer", LAYERS, ids=LAYER_IDS)
def test_conv_relu_pool_forward_backward(benchmark, layer, impl, batch):
    t = conv_inputs(layer, batch, impl.device)
    if impl.name in BASELINES:
        forward = baseline("forward_backward", layer, impl)
    else:

        def forward(x, w, b):
            with dk.backend(impl.name):
                return dk.conv_relu_pool(x, w, None, b, stride=1, padding=layer.pad, pool=layer.pool)

    params = with_grad(t["x"], t["w"], t["b"])
    step = _step(forward, params, t["gy"])

    # First call outside the timing: compiles the baseline (forward and backward graphs), and checks the
    # output and the three gradients once against eager.
    ref = with_grad(t["x"], t["w"], t["b"])
    y_ref = _step(eager_forward(layer), ref, t["gy"])()
    y = step()
    assert_close(y.detach(), y_ref.detach(), f"{impl.id} forward")
    for name, p, r in zip(("x", "weight", "bias"), params, ref):
        assert p.grad is not None, f"{impl.id}: no gradient for {name}"
        assert_close_norm(p.grad, r.grad, f"{impl.id} grad {name}", tol=1e-3)

    benchmark.group = group("conv_relu_pool forward+backward", layer, impl, batch)
    benchmark(synchronized(step, impl.device))
