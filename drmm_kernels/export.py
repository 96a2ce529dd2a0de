"""Export of fused models: ``torch.onnx.export``, ``torch.export`` and ``torch.jit.trace``.

The ``drmm::`` forward ops ``conv_relu_pool`` and ``conv_bn_relu_pool`` have a composite here: the same function
in standard ATen ops, ``conv2d`` [→ ``batch_norm``] → ``max_pool2d`` → ``relu`` / ``leaky_relu``, the switches
from ``max_pool2d_with_indices``. While ``torch.onnx.export`` or ``torch.jit.trace`` records a model, the ops run
their composite (drmm_kernels/dispatch.py ``CustomOp.composite``), so

- ``torch.onnx.export(fused, (x,), dynamo=True)`` writes ``Conv`` / ``BatchNormalization`` (folded into the
  ``Conv`` by the exporter's optimizer) / ``MaxPool`` / ``Relu`` or ``LeakyRelu`` nodes, and ONNX Runtime needs
  nothing from this package;
- ``torch.jit.trace`` records ATen ops: ``torch.jit.save`` works and the saved module runs without
  ``drmm_kernels``.

The switches are computed on a separate path, which the exporter drops as dead code when nothing reads them;
a model that returns or uses them exports them too (a ``MaxPool`` with indices and integer arithmetic).

``torch.export.export`` keeps the ``drmm::`` ops in its graph (the program runs where ``drmm_kernels`` is
imported); ``ep.run_decompositions(decompositions())`` replaces them by the composites, which is also what
``torch.onnx.export`` needs when handed such an ``ExportedProgram``.

>>> import torch, drmm_kernels as dk
>>> _ = torch.manual_seed(0)
>>> x, w = torch.randn(1, 3, 8, 8), torch.randn(4, 3, 3, 3)
>>> y, sw = conv_relu_pool(x, w, None, None, 1, 1, 2, 2, 0, False, 0.0)       # the arguments in schema order
>>> y_op, sw_op = dk.conv_relu_pool(x, w, padding=1)
>>> torch.allclose(y, y_op, atol=1e-5), torch.equal(sw, sw_op)
(True, True)
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .ops.conv_bn_relu_pool import conv_bn_relu_pool_op
from .ops.conv_relu_pool import conv_relu_pool_op
from .reference import pool_switches

__all__ = ["conv_relu_pool", "conv_bn_relu_pool", "decompositions"]


def _act_pool(
    v: Tensor, pool: int, pool_stride: int, pool_padding: int, ceil_mode: bool, negative_slope: float
) -> Tuple[Tensor, Tensor]:
    """``act(max_pool(v))`` and the switches of ``v``, on two paths: when nothing reads the switches, export's
    dead-code elimination leaves a plain ``MaxPool`` (no indices) before the activation."""
    pooled = F.max_pool2d(v, pool, pool_stride, pool_padding, ceil_mode=ceil_mode) if pool > 1 else v
    y = F.relu(pooled) if negative_slope == 0.0 else F.leaky_relu(pooled, negative_slope)
    _, switches = pool_switches(v, pool, negative_slope, pool_stride, pool_padding, ceil_mode)
    return y, switches


def conv_relu_pool(
    x: Tensor,
    weight: Tensor,
    scale: Optional[Tensor],
    shift: Optional[Tensor],
    stride: int,
    padding: int,
    pool: int,
    pool_stride: int,
    pool_padding: int,
    ceil_mode: bool,
    negative_slope: float,
) -> Tuple[Tensor, Tensor]:
    """``drmm::conv_relu_pool`` in ATen ops (arguments in schema order)."""
    if scale is None:  # the shift is the conv's bias: one Conv node
        v = F.conv2d(x, weight, shift, stride, padding)
    else:
        v = F.conv2d(x, weight, None, stride, padding) * scale.view(1, -1, 1, 1)
        if shift is not None:
            v = v + shift.view(1, -1, 1, 1)
    return _act_pool(v, pool, pool_stride, pool_padding, ceil_mode, negative_slope)


def conv_bn_relu_pool(
    x: Tensor,
    weight: Tensor,
    bn_weight: Optional[Tensor],
    bn_bias: Optional[Tensor],
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    training: bool,
    eps: float,
    stride: int,
    padding: int,
    pool: int,
    pool_stride: int,
    pool_padding: int,
    ceil_mode: bool,
    negative_slope: float,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``drmm::conv_bn_relu_pool`` in ATen ops: ``(y, switches, mean, var, z)`` as the op returns them (the
    statistics used, biased variance; z the conv output in training mode, empty in eval mode)."""
    z = F.conv2d(x, weight, None, stride, padding)
    if training:
        v = F.batch_norm(z, None, None, bn_weight, bn_bias, True, 0.0, eps)
        var, mean = torch.var_mean(z, dim=(0, 2, 3), unbiased=False)
        z_out = z.contiguous()
    else:
        v = F.batch_norm(z, running_mean, running_var, bn_weight, bn_bias, False, 0.0, eps)
        mean, var = running_mean.clone(), running_var.clone()  # outputs must not alias the inputs
        z_out = z.new_empty(0)
    y, switches = _act_pool(v, pool, pool_stride, pool_padding, ceil_mode, negative_slope)
    return y, switches, mean.to(x.dtype), var.to(x.dtype), z_out


def decompositions() -> Dict[torch._ops.OpOverload, Callable]:
    """``{op: decomposition}`` for the ``drmm::`` forward ops, for ``ExportedProgram.run_decompositions``.

    >>> sorted(op.name() for op in decompositions())
    ['drmm::conv_bn_relu_pool', 'drmm::conv_relu_pool']
    """
    return {
        torch.ops.drmm.conv_relu_pool.default: conv_relu_pool,
        torch.ops.drmm.conv_bn_relu_pool.default: conv_bn_relu_pool,
    }


# The ops run their composite while a model is traced for export (drmm_kernels/dispatch.py CustomOp.__call__).
conv_relu_pool_op.composite = conv_relu_pool
conv_bn_relu_pool_op.composite = conv_bn_relu_pool
