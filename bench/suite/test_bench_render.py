"""Benchmark: ``render`` (the top-down pass from the forward's switches), against eager from the state eager
autograd keeps (the ``y > 0`` mask and the int64 indices): ``max_unpool2d`` + mask + ``conv_transpose2d``, and its
``torch.compile``."""

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
    baseline,
    conv_inputs,
    eager_forward,
    eager_render,
    group,
    synchronized,
)


@pytest.mark.parametrize("impl", IMPLS, ids=IMPL_IDS)
@pytest.mark.parametrize("layer", LAYERS, ids=LAYER_IDS)
def test_render(benchmark, layer, impl, batch):
    t = conv_inputs(layer, batch, impl.device)
    x, w, b, mu = t["x"], t["w"], t["b"], t["mu"]
    conv_size = (layer.conv_hw, layer.conv_hw)
    with torch.no_grad():
        if impl.name in BASELINES:
            y, idx = eager_forward(layer)(x, w, b)
            mask = (y > 0).to(y.dtype)
            fn = baseline("render", layer, impl)

            def run():
                return fn(mu, mask, idx, w)
        else:
            with dk.backend(impl.name):
                _, sw = dk.conv_relu_pool(x, w, None, b, stride=1, padding=layer.pad, pool=layer.pool)
            # Eager from this backend's own switches, so that near-ties decided differently cannot fail the check.
            mask = (sw >= 128).to(x.dtype)
            idx = dk.switches_to_indices(sw, pool=layer.pool, conv_size=conv_size) if layer.pool > 1 else None

            def run():
                with dk.backend(impl.name):
                    return dk.render(
                        mu, sw, w, stride=1, padding=layer.pad, pool=layer.pool, out_size=(layer.hw, layer.hw)
                    )

        # First call outside the timing: compiles the baseline, and checks the result once.
        expected = eager_render(layer)(mu, mask, idx, w)
        assert expected.shape == x.shape
        assert_close(run(), expected, f"{impl.id} render", tol=1e-3)

        benchmark.group = group("render", layer, impl, batch)
        benchmark(synchronized(run, impl.device))
