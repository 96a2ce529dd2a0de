"""Benchmark: blocks with overlapping / padded max-pools (ResNet's stem, AlexNet's first block), forward + backward
and render, eager against the ``cpu`` backend. The paired ratios for docs/benchmarks.md come from
``bench/pool_windows.py``, whose workloads these are; here each side is timed alone, for comparisons between runs.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

import drmm_kernels as dk
from drmm_kernels import testing as eager_ops

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from pool_windows import BLOCKS  # noqa: E402

CASES = [BLOCKS["resnet-stem"], BLOCKS["alexnet-1"]]
SIDES = ["eager", "cpu"]


@pytest.fixture
def block_batch(request):
    # the blocks' own batch when timing; 2 when --benchmark-disable only checks that every function runs
    return 2 if request.config.getoption("benchmark_disable") else None


def _inputs(b, batch):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, b.cin, b.size, b.size, generator=g)
    w = torch.randn(b.cout, b.cin, b.k, b.k, generator=g) * (2.0 / (b.cin * b.k * b.k)) ** 0.5
    aux = [torch.rand(b.cout, generator=g) + 0.5, torch.randn(b.cout, generator=g) * 0.1]
    return x, [w, *aux] if b.bn else [w, aux[1]]


def _forward(b, side):
    def run(x, ps):
        if side == "eager":
            if b.bn:
                return eager_ops.conv_bn_relu_pool(
                    x, ps[0], ps[1], ps[2], None, None, True, stride=b.stride, padding=b.padding, **b.window
                )[0]
            return eager_ops.conv_relu_pool(x, ps[0], stride=b.stride, padding=b.padding, bias=ps[1], **b.window)[0]
        with dk.backend(side):
            if b.bn:
                return dk.conv_bn_relu_pool(
                    x, ps[0], ps[1], ps[2], None, None, training=True, stride=b.stride, padding=b.padding, **b.window
                )[0]
            return dk.conv_relu_pool(x, ps[0], None, ps[1], stride=b.stride, padding=b.padding, **b.window)[0]

    return run


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("b", CASES, ids=[c.name for c in CASES])
def test_pool_window_forward_backward(benchmark, b, side, block_batch):
    x, ps = _inputs(b, block_batch or b.batch)
    xg, pg = x.clone().requires_grad_(), [p.clone().requires_grad_() for p in ps]
    fwd = _forward(b, side)
    with torch.no_grad():
        torch.testing.assert_close(fwd(x, ps), _forward(b, "eager")(x, ps), rtol=1e-4, atol=1e-4)
    gy = torch.randn(_forward(b, "eager")(x, ps).shape)

    def run():
        for t in (xg, *pg):
            t.grad = None
        fwd(xg, pg).backward(gy)

    benchmark.group = f"pool window fwd+bwd {b.name} batch {block_batch or b.batch} cpu"
    benchmark(run)


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("b", CASES, ids=[c.name for c in CASES])
def test_pool_window_render(benchmark, b, side, block_batch):
    x, ps = _inputs(b, block_batch or b.batch)
    w = ps[0]
    with torch.no_grad():
        pooled, idx = eager_ops.conv_relu_pool(x, w, stride=b.stride, padding=b.padding, **b.window)
        _, sw = dk.conv_relu_pool(x, w, stride=b.stride, padding=b.padding, **b.window)
    mu = torch.randn(pooled.shape)
    mask = (pooled > 0).to(mu.dtype)

    def eager():
        return eager_ops.render(mu, idx, w, (b.size, b.size), mask, None, b.stride, b.padding, **b.window)

    def fused():
        with dk.backend(side):
            return dk.render(mu, sw, w, stride=b.stride, padding=b.padding, out_size=(b.size, b.size), **b.window)

    run = eager if side == "eager" else fused
    with torch.no_grad():
        torch.testing.assert_close(run(), eager(), rtol=1e-3, atol=1e-3)
        benchmark.group = f"pool window render {b.name} batch {block_batch or b.batch} cpu"
        benchmark(run)
