"""Benchmark: training-mode ``conv_bn_relu_pool`` forward + backward (batch statistics, gradients for x, weight,
BN weight and bias through them, running statistics updated), against eager
``max_pool2d(relu(batch_norm(conv2d)), return_indices=True)`` and its ``torch.compile``."""

from __future__ import annotations

import pytest
import torch

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
    eager_bn_forward,
    group,
    synchronized,
    with_grad,
)


def _stats(layer, device):
    return torch.zeros(layer.cout, device=device), torch.ones(layer.cout, device=device)


def _step(forward, params, stats, gy):
    def step():
        for p in params:
            p.grad = None
        y, _ = forward(*params, *stats)
        y.backward(gy)
        return y

    return step


@pytest.mark.parametrize("impl", IMPLS, ids=IMPL_IDS)
@pytest.mark.parametrize("layer", LAYERS, ids=LAYER_IDS)
def test_conv_bn_relu_pool_forward_backward(benchmark, layer, impl, batch):
    t = conv_inputs(layer, batch, impl.device)
    if impl.name in BASELINES:
        forward = baseline("bn_forward_backward", layer, impl)
    else:

        def forward(x, w, gamma, beta, running_mean, running_var):
            with dk.backend(impl.name):
                return dk.conv_bn_relu_pool(
                    x,
                    w,
                    gamma,
                    beta,
                    running_mean,
                    running_var,
                    training=True,
                    momentum=0.1,
                    eps=1e-5,
                    stride=1,
                    padding=layer.pad,
                    pool=layer.pool,
                )

    params = with_grad(t["x"], t["w"], t["gamma"], t["beta"])
    stats = _stats(layer, impl.device)
    step = _step(forward, params, stats, t["gy"])

    # First call outside the timing: compiles the baseline, and checks the output, the four gradients and the
    # running statistics after one step once against eager.
    ref, ref_stats = with_grad(t["x"], t["w"], t["gamma"], t["beta"]), _stats(layer, impl.device)
    y_ref = _step(eager_bn_forward(layer), ref, ref_stats, t["gy"])()
    y = step()
    assert_close(y.detach(), y_ref.detach(), f"{impl.id} forward")
    for name, p, r in zip(("x", "weight", "bn_weight", "bn_bias"), params, ref):
        assert p.grad is not None, f"{impl.id}: no gradient for {name}"
        # Looser than for conv_relu_pool: the gradient through the batch statistics subtracts two means
        # (cancellation), and compiled code reduces in another order (1.3e-3 seen for x at batch 16).
        assert_close_norm(p.grad, r.grad, f"{impl.id} grad {name}", tol=1e-2)
    for name, s, r in zip(("running_mean", "running_var"), stats, ref_stats):
        assert_close(s, r, f"{impl.id} {name}")

    benchmark.group = group("conv_bn_relu_pool training forward+backward", layer, impl, batch)
    benchmark(synchronized(step, impl.device))
