"""The ``triton`` backend (GPU; runs on CPU tensors under TRITON_INTERPRET=1).

Kernels live in one module per op, ``<op>_kernel.py``: ``conv_relu_pool_kernel`` (conv_relu_pool, and
gather_conv: the same GEMM read at the recorded offsets), ``render_kernel`` (render: the top-down pass, which
is also the input gradient), ``render_wgrad_kernel`` (render_wgrad) and ``conv_bn_relu_pool_kernel``
(bn_pool). They are imported on first use, so ``import drmm_kernels`` works without triton, and so
TRITON_INTERPRET is read when the kernels are defined (the interpreter decides at ``@triton.jit`` time).

conv_bn_relu_pool has no primitive of its own here: drmm_kernels/ops/conv_bn_relu_pool.py materializes
z = conv2d(x) and calls ``bn_pool``.
Why not one fused kernel: training-mode BN needs the statistics of the whole batch before any window
max can be decided (a negative gamma*invstd flips which element wins), so a fused kernel would need a
statistics pass that recomputes the convolution, doubling the conv FLOPs, against one write + one read
of z for the materialized version. bench/kernels.py should confirm this choice on the GPU.
"""

from __future__ import annotations

import importlib

from ._status import is_interpreting, status, supports  # noqa: F401


def _lazy(module: str, name: str):
    """Primitive ``name`` of ``<module>.py`` (keyword arguments, drmm_kernels/schema.py), imported on first call;
    ``.load()`` imports and returns it."""
    fn = None

    def load():
        nonlocal fn
        if fn is None:
            fn = getattr(importlib.import_module(f"{__name__}.{module}"), name)
        return fn

    def primitive(**args):
        return (fn or load())(**args)

    primitive.__name__ = primitive.__qualname__ = name
    primitive.load = load
    return primitive


conv_relu_pool = _lazy("conv_relu_pool_kernel", "conv_relu_pool")
gather_conv = _lazy("conv_relu_pool_kernel", "gather_conv")
render = _lazy("render_kernel", "render")
render_wgrad = _lazy("render_wgrad_kernel", "render_wgrad")
bn_pool = _lazy("conv_bn_relu_pool_kernel", "bn_pool")
