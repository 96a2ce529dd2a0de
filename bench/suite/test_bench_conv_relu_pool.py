"""Benchmark: ``conv_relu_pool`` forward, against eager ``max_pool2d(relu(conv2d), return_indices=True)`` and its
``torch.compile``. The backends also write the uint8 switches; eager writes int64 indices."""

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
    assert_switches,
    baseline,
    conv_inputs,
    eager_forward,
    group,
    synchronized,
)


@pytest.mark.parametrize("impl", IMPLS, ids=IMPL_IDS)
@pytest.mark.parametrize("layer", LAYERS, ids=LAYER_IDS)
def test_conv_relu_pool_forward(benchmark, layer, impl, batch):
    t = conv_inputs(layer, batch, impl.device)
    x, w, b = t["x"], t["w"], t["b"]
    if impl.name in BASELINES:
        fn = baseline("forward", layer, impl)

        def run():
            return fn(x, w, b)
    else:

        def run():
            with dk.backend(impl.name):
                return dk.conv_relu_pool(x, w, None, b, stride=1, padding=layer.pad, pool=layer.pool)

    with torch.no_grad():
        # First call outside the timing: compiles the baseline, and checks the result once.
        y_ref, _ = eager_forward(layer)(x, w, b)
        y, extra = run()
        assert_close(y, y_ref, f"{impl.id} forward")
        if impl.name in BASELINES:
            assert layer.pool == 1 or (extra.dtype == torch.int64 and extra.shape == y.shape)
        else:
            assert_switches(y, extra, f"{impl.id} forward")

        benchmark.group = group("conv_relu_pool forward", layer, impl, batch)
        benchmark(synchronized(run, impl.device))
