"""The reference backend: the op contract written as a composition of PyTorch ops.

This module *defines* the semantics every other backend is tested against (docs/ops.md, the op
contract). It is written for clarity, not speed: it materializes the full-resolution pre-pool map
and the dense unpooled map.

Every function here takes already-validated arguments (the public ops in ``drmm_kernels/ops/``
check them) and returns plain tensors; autograd lives in ``drmm_kernels/ops/``. The primitives take keyword
arguments only, named as in drmm_kernels/schema.py.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .contract import OFFSET_MASK, ON_BIT, conv_size  # noqa: F401  (the switch byte and geometry, one definition)

# A pool is max_pool2d's window (docs/ops.md#pooling): ``pool x pool`` every ``pool_stride`` over the conv map padded by
# ``pool_padding``, ``ceil_mode`` as in PyTorch. The internal helpers here default to non-overlapping windows; the
# primitives take every argument.


def activation_factor(switches: Tensor, negative_slope: float, dtype: torch.dtype) -> Tensor:
    """Derivative of the activation at each window maximum: 1 where the ``a`` bit is on, else the slope."""
    on = (switches & ON_BIT) != 0
    return torch.where(
        on,
        torch.ones((), dtype=dtype, device=switches.device),
        torch.full((), negative_slope, dtype=dtype, device=switches.device),
    )


def window_origins(hp: int, wp: int, pool_stride: int, pool_padding: int, device) -> Tuple[Tensor, Tensor]:
    """The conv-map row (column) of each pooled row (column)'s window's first element: ``i * stride - padding``."""
    rows = torch.arange(hp, device=device).view(hp, 1) * pool_stride - pool_padding
    cols = torch.arange(wp, device=device).view(1, wp) * pool_stride - pool_padding
    return rows, cols


def switch_positions(
    switches: Tensor, pool: int, pool_stride: Optional[int] = None, pool_padding: int = 0
) -> Tuple[Tensor, Tensor]:
    """The conv-map row and column (int64) each switch byte points at."""
    s = pool if pool_stride is None else pool_stride
    off = (switches & OFFSET_MASK).long()
    dy = torch.div(off, pool, rounding_mode="floor")
    rows, cols = window_origins(switches.shape[-2], switches.shape[-1], s, pool_padding, switches.device)
    return rows + dy, cols + (off - dy * pool)


def switches_to_indices(
    switches: Tensor,
    pool: int,
    conv_hw: Tuple[int, int],
    pool_stride: Optional[int] = None,
    pool_padding: int = 0,
) -> Tensor:
    """PyTorch's flat ``max_pool2d`` indices (int64, into the ``conv_hw`` plane) from switch bytes."""
    h, w = switch_positions(switches, pool, pool_stride, pool_padding)
    return h * conv_hw[1] + w


def pool_switches(
    v: Tensor,
    pool: int,
    negative_slope: float,
    pool_stride: Optional[int] = None,
    pool_padding: int = 0,
    ceil_mode: bool = False,
) -> Tuple[Tensor, Tensor]:
    """Activation + max-pool + switch byte for a pre-activation map ``v`` (N, C, H, W)."""
    s = pool if pool_stride is None else pool_stride
    v = v.contiguous()  # NCHW kernel: first maximum on ties, NaN propagates; padding never wins
    pooled, idx = F.max_pool2d(v, pool, s, pool_padding, ceil_mode=ceil_mode, return_indices=True)
    wc = v.shape[-1]
    h, w = torch.div(idx, wc, rounding_mode="floor"), idx % wc
    rows, cols = window_origins(pooled.shape[-2], pooled.shape[-1], s, pool_padding, v.device)
    offset = (h - rows) * pool + (w - cols)
    switches = (offset | torch.where(pooled > 0, ON_BIT, 0)).to(torch.uint8)
    if negative_slope > 0:
        y = F.leaky_relu(pooled, negative_slope)
    else:
        y = F.relu(pooled)
    return y, switches


def scale_shift(z: Tensor, scale: Optional[Tensor], shift: Optional[Tensor]) -> Tensor:
    if scale is not None:
        z = z * scale.view(1, -1, 1, 1)
    if shift is not None:
        z = z + shift.view(1, -1, 1, 1)
    return z


def conv_relu_pool(
    *,
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
    z = F.conv2d(x, weight, None, stride, padding)
    return pool_switches(scale_shift(z, scale, shift), pool, negative_slope, pool_stride, pool_padding, ceil_mode)


def unpool(
    *,
    values: Tensor,
    switches: Tensor,
    pool: int,
    pool_stride: int,
    pool_padding: int,
    ceil_mode: bool,
    out_h: int,
    out_w: int,
) -> Tensor:
    """Each pooled value added at its recorded offset of a zero (out_h, out_w) map: where overlapping windows share
    a maximum, the position receives the sum, as in max_pool2d's gradient (max_unpool2d would keep one)."""
    n, c = values.shape[:2]
    if pool_stride == pool:  # disjoint windows: every position gets at most one value
        idx = switches_to_indices(switches, pool, (out_h, out_w), pool_stride, pool_padding).reshape(n, c, -1)
        flat = values.new_zeros(n, c, out_h * out_w)
        flat.scatter_(2, idx, values.reshape(n, c, -1))
        return flat.view(n, c, out_h, out_w)
    # Overlapping windows: one pass per window offset o. Within a pass every window adds (its value where its switch
    # holds o, else 0) at its own position (row, col) + o, and those positions are distinct, so no two additions meet
    # (an atomic scatter on a GPU would add shared maxima in a varying order); the passes run in a fixed order, so
    # the sums are bitwise the same run to run on every device. Positions in the padding go to a spare slot.
    hp, wp = switches.shape[-2:]
    rows, cols = window_origins(hp, wp, pool_stride, pool_padding, switches.device)
    off = (switches & OFFSET_MASK).reshape(n, c, -1)
    vals = values.reshape(n, c, -1)
    spare = out_h * out_w
    flat = values.new_zeros(n, c, spare + 1)
    zero = vals.new_zeros(())
    for o in range(pool * pool):
        h, w = rows + o // pool, cols + o % pool
        idx = torch.where((h >= 0) & (h < out_h) & (w >= 0) & (w < out_w), h * out_w + w, spare).reshape(1, 1, -1)
        flat.scatter_add_(2, idx.expand(n, c, -1), torch.where(off == o, vals, zero))
    return flat[..., :spare].reshape(n, c, out_h, out_w)


def masked_values(*, mu: Tensor, switches: Tensor, scale: Optional[Tensor], negative_slope: float) -> Tensor:
    """``mu`` times the activation derivative at the window max, times ``scale[c]``: the pooled gradient.

    A select, as ReLU's backward is: where the ``a`` bit is off under ReLU the result is 0 even for an infinite or
    NaN ``mu`` (a multiply by 0 would give NaN).
    """
    on = (switches & ON_BIT) != 0
    g = torch.where(on, mu, mu * negative_slope) if negative_slope != 0.0 else mu.masked_fill(~on, 0)
    if scale is not None:
        g = g * scale.view(1, -1, 1, 1).to(mu.dtype)
    return g


def _unpooled_gradient(
    mu: Tensor, switches: Tensor, scale: Optional[Tensor], negative_slope: float, window: dict, conv_hw: Tuple[int, int]
) -> Tensor:
    """The masked, scaled ``mu`` at its recorded offsets of a zero ``conv_hw`` map: what render convolves."""
    masked = masked_values(mu=mu, switches=switches, scale=scale, negative_slope=negative_slope)
    return unpool(values=masked, switches=switches, out_h=conv_hw[0], out_w=conv_hw[1], **window)


def render(
    *,
    mu: Tensor,
    switches: Tensor,
    weight: Tensor,
    scale: Optional[Tensor],
    stride: int,
    padding: int,
    pool: int,
    pool_stride: int,
    pool_padding: int,
    ceil_mode: bool,
    out_h: int,
    out_w: int,
    negative_slope: float,
) -> Tensor:
    kh, kw = weight.shape[-2:]
    chw = conv_size((out_h, out_w), (kh, kw), stride, padding)
    window = dict(pool=pool, pool_stride=pool_stride, pool_padding=pool_padding, ceil_mode=ceil_mode)
    g = _unpooled_gradient(mu, switches, scale, negative_slope, window, chw)
    return transposed_conv(g, weight, stride, padding, (out_h, out_w))


def transposed_conv(g: Tensor, weight: Tensor, stride: int, padding: int, out_hw: Tuple[int, int]) -> Tensor:
    """``conv_transpose2d`` of a conv-output-size map ``g`` with the conv's weight, to the conv input size."""
    kh, kw = weight.shape[-2:]
    out_pad = tuple(o - ((c - 1) * stride - 2 * padding + k) for o, c, k in zip(out_hw, g.shape[-2:], (kh, kw)))
    return F.conv_transpose2d(g, weight, None, stride, padding, out_pad)


def gather_conv(
    *,
    src: Tensor,
    weight: Tensor,
    switches: Tensor,
    stride: int,
    padding: int,
    pool: int,
    pool_stride: int,
    pool_padding: int,
    ceil_mode: bool,
) -> Tensor:
    """``conv2d(src, weight)`` read at each window's recorded offset (pooled shape)."""
    z = F.conv2d(src, weight, None, stride, padding)
    n, c = switches.shape[:2]
    idx = switches_to_indices(switches, pool, z.shape[-2:], pool_stride, pool_padding).reshape(n, c, -1)
    return z.reshape(n, c, -1).gather(2, idx).view(switches.shape)


def render_wgrad(
    *,
    src: Tensor,
    mu: Tensor,
    switches: Tensor,
    scale: Optional[Tensor],
    stride: int,
    padding: int,
    pool: int,
    pool_stride: int,
    pool_padding: int,
    ceil_mode: bool,
    negative_slope: float,
    kernel_h: int,
    kernel_w: int,
) -> Tensor:
    """Weight gradient of ``conv2d(src, W)`` for the unpooled, masked, scaled gradient built from ``mu``."""
    chw = conv_size(src.shape[-2:], (kernel_h, kernel_w), stride, padding)
    window = dict(pool=pool, pool_stride=pool_stride, pool_padding=pool_padding, ceil_mode=ceil_mode)
    g = _unpooled_gradient(mu, switches, scale, negative_slope, window, chw)
    w_shape = (mu.shape[1], src.shape[1], kernel_h, kernel_w)
    return torch.nn.grad.conv2d_weight(src, w_shape, g, stride, padding)


def batch_stats(*, z: Tensor) -> Tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance of ``z`` (training-mode batch norm), in float32 or wider."""
    if z.dtype in (torch.float32, torch.float64):
        # ATen's one-pass (Welford) per-channel statistics, much faster than var_mean on CPU.
        return torch.batch_norm_update_stats(z, None, None, 0.0)
    var, mean = torch.var_mean(z.float(), dim=(0, 2, 3), unbiased=False)
    return mean, var


def bn_pool(
    *,
    z: Tensor,
    scale: Tensor,
    shift: Tensor,
    pool: int,
    pool_stride: int,
    pool_padding: int,
    ceil_mode: bool,
    negative_slope: float,
) -> Tuple[Tensor, Tensor]:
    """Per-channel affine + activation + pool + switches on a precomputed conv output ``z``."""
    return pool_switches(scale_shift(z, scale, shift), pool, negative_slope, pool_stride, pool_padding, ceil_mode)


def conv_bn_relu_pool(
    *,
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
    """Returns ``(y, switches, mean, var, z)``: the statistics used (batch or running, biased variance) and,
    in training mode, the conv output z the backward needs (empty in eval mode).

    Running statistics are *not* updated here; the public wrapper does that from ``mean``/``var``.
    """
    z = F.conv2d(x, weight, None, stride, padding)
    if training:
        v = F.batch_norm(z, None, None, bn_weight, bn_bias, True, 0.0, eps)
        var, mean = torch.var_mean(z, dim=(0, 2, 3), unbiased=False)
    else:
        v = F.batch_norm(z, running_mean, running_var, bn_weight, bn_bias, False, 0.0, eps)
        mean, var = running_mean.clone(), running_var.clone()
    y, switches = pool_switches(v, pool, negative_slope, pool_stride, pool_padding, ceil_mode)
    return y, switches, mean.to(x.dtype), var.to(x.dtype), z.contiguous() if training else z.new_empty(0)
