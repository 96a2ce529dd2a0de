"""Eager PyTorch equivalents of the fused ops: the baseline the tests and the benchmarks compare against.

Everything here is built from ``torch.nn.functional`` alone, never from this package's own kernels, so it can
serve as ground truth (``tests/``) and as the eager baseline that ``bench/`` times (and hands to
``torch.compile``). One definition each:

- :func:`conv_relu_pool`: ``conv2d`` [* scale + shift] -> ReLU / LeakyReLU -> ``max_pool2d(return_indices=True)``;
- :func:`conv_bn_relu_pool`: ``conv2d`` -> ``batch_norm`` -> ReLU / LeakyReLU -> ``max_pool2d(return_indices=True)``;
- :func:`render`: activation factor [* scale] -> ``max_unpool2d`` -> ``conv_transpose2d``;

and the comparisons that know what may legitimately differ between implementations (:data:`TOL`,
:func:`window_gap`, :func:`assert_switches_agree`). ``pool=1`` means no pooling: no ``max_pool2d`` /
``max_unpool2d`` is run and the indices are ``None`` (what a benchmark of an unpooled layer should time).

>>> from drmm_kernels import testing
>>> x, w = torch.randn(2, 3, 8, 8), torch.randn(4, 3, 3, 3)
>>> y, idx = testing.conv_relu_pool(x, w, padding=1, pool=2)
>>> y.shape, idx.dtype
(torch.Size([2, 4, 4, 4]), torch.int64)
>>> testing.render(y, idx, w, out_size=(8, 8), a_factor=(y > 0).to(y.dtype), padding=1).shape
torch.Size([2, 3, 8, 8])
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

__all__ = [
    "TOL",
    "act",
    "assert_switches_agree",
    "conv_bn_relu_pool",
    "conv_relu_pool",
    "max_pool",
    "pre_activation",
    "render",
    "window_gap",
]

# Tolerances of a fused op against its eager equivalent, by dtype (torch.testing.assert_close keywords).
TOL = {
    torch.float64: dict(rtol=1e-9, atol=1e-9),
    torch.float32: dict(rtol=1e-4, atol=1e-4),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
    torch.float16: dict(rtol=5e-3, atol=5e-3),
}


def pre_activation(x, weight, scale=None, shift=None, stride=1, padding=0, *, bias=None) -> torch.Tensor:
    """``conv2d(x, weight, bias)`` [* scale] [+ shift], per output channel."""
    v = F.conv2d(x, weight, bias, stride, padding)
    if scale is not None:
        v = v * scale.view(1, -1, 1, 1)
    if shift is not None:
        v = v + shift.view(1, -1, 1, 1)
    return v


def act(v: torch.Tensor, negative_slope: float) -> torch.Tensor:
    """ReLU, or LeakyReLU for a positive slope."""
    return F.leaky_relu(v, negative_slope) if negative_slope > 0 else F.relu(v)


def max_pool(
    z: torch.Tensor, pool: int, pool_stride: Optional[int] = None, pool_padding: int = 0, ceil_mode: bool = False
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``max_pool2d(z, pool, pool_stride, pool_padding, ceil_mode, return_indices=True)`` (``pool_stride`` None:
    ``pool``); for ``pool=1`` nothing is pooled: ``(z, None)``."""
    if pool == 1:
        return z, None
    s = pool if pool_stride is None else pool_stride
    return F.max_pool2d(z, pool, s, pool_padding, ceil_mode=ceil_mode, return_indices=True)


def conv_relu_pool(
    x,
    weight,
    scale=None,
    shift=None,
    stride=1,
    padding=0,
    pool=2,
    negative_slope=0.0,
    *,
    bias=None,
    pool_stride=None,
    pool_padding=0,
    ceil_mode=False,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(y, int64 indices)`` of ``max_pool2d(act(conv2d(x, weight, bias) * scale + shift), return_indices=True)``
    (indices ``None`` for ``pool=1``). ``bias`` is added inside ``conv2d``, ``shift`` after the scale."""
    v = pre_activation(x, weight, scale, shift, stride, padding, bias=bias)
    return max_pool(act(v, negative_slope), pool, pool_stride, pool_padding, ceil_mode)


def conv_bn_relu_pool(
    x,
    weight,
    bn_weight,
    bn_bias,
    running_mean,
    running_var,
    training: bool,
    momentum: float = 0.1,
    eps: float = 1e-5,
    stride=1,
    padding=0,
    pool=2,
    negative_slope=0.0,
    *,
    pool_stride=None,
    pool_padding=0,
    ceil_mode=False,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(y, int64 indices)`` of ``max_pool2d(act(batch_norm(conv2d(x, weight))), return_indices=True)``; in
    training mode the batch statistics normalize and the running statistics are updated in place."""
    v = F.conv2d(x, weight, None, stride, padding)
    v = F.batch_norm(v, running_mean, running_var, bn_weight, bn_bias, training, momentum, eps)
    return max_pool(act(v, negative_slope), pool, pool_stride, pool_padding, ceil_mode)


def render(
    mu,
    indices,
    weight,
    out_size: Sequence[int],
    a_factor,
    scale=None,
    stride=1,
    padding=0,
    pool=2,
    conv_size: Optional[Sequence[int]] = None,
    *,
    pool_stride=None,
    pool_padding=0,
    ceil_mode=False,
) -> torch.Tensor:
    """The top-down pass: ``conv_transpose2d(max_unpool2d(mu * a_factor [* scale], indices), weight)`` to
    ``out_size``. With overlapping windows (``pool_stride < pool``) the unpool is ``max_pool2d``'s backward,
    which sums what several windows route to one position (``max_unpool2d`` would keep one).

    ``a_factor`` is the activation's slope at each pooled element (the ``y > 0`` mask for ReLU), ``indices`` the
    int64 ``max_pool2d`` indices into the convolution output of size ``conv_size`` (by default the size a
    convolution of ``out_size`` gives; ignored for ``pool=1``, where nothing is unpooled).
    """
    k_h, k_w = weight.shape[-2:]
    if conv_size is None:
        conv_size = [(o + 2 * padding - k) // stride + 1 for o, k in zip(out_size, (k_h, k_w))]
    g = mu * a_factor
    if scale is not None:
        g = g * scale.view(1, -1, 1, 1)
    s = pool if pool_stride is None else pool_stride
    if pool == 1:
        up = g
    elif s == pool:
        up = F.max_unpool2d(g, indices, pool, pool, output_size=conv_size)
    else:
        shape = g.new_empty(1).expand(*g.shape[:2], *conv_size)  # max_pool2d's input: only its size is read
        up = torch.ops.aten.max_pool2d_with_indices_backward(
            g, shape, [pool] * 2, [s] * 2, [pool_padding] * 2, [1, 1], ceil_mode, indices
        )
    out_pad = [o - ((c - 1) * stride - 2 * padding + k) for o, c, k in zip(out_size, conv_size, (k_h, k_w))]
    return F.conv_transpose2d(up, weight, None, stride, padding, out_pad)


def window_gap(v: torch.Tensor, pool: int) -> torch.Tensor:
    """Per pooled element: gap between the largest and second-largest pre-activation in the window (inf for
    pool 1), on v's device.

    Switch offsets are only comparable across implementations where this gap exceeds rounding noise.
    """
    n, c, h, w = v.shape
    hp, wp = h // pool, w // pool
    if pool == 1:
        return torch.full((n, c, hp, wp), float("inf"), dtype=v.dtype, device=v.device)
    win = v[..., : hp * pool, : wp * pool].reshape(n, c, hp, pool, wp, pool).permute(0, 1, 2, 4, 3, 5)
    win = win.reshape(n, c, hp, wp, pool * pool)
    top2 = win.topk(2, dim=-1).values
    return top2[..., 0] - top2[..., 1]


def assert_switches_agree(sw, sw_ref, v, pool, tol, what="switches"):
    """Switch bytes of two implementations agree wherever rounding cannot decide them.

    Bitwise agreement between backends is not expected: they sum the convolution in different orders, and
    compiled Triton fuses ``acc * scale + shift`` into one FMA where the others round twice. So the window
    offsets (bits 0-3) are compared only where the window's top two pre-activations ``v`` differ by more than
    ``tol``, and the ``a`` bit (bit 7) only where the window maximum is also farther than ``tol`` from 0. Bits
    4-6 must be zero everywhere. ``tol`` is absolute (a float or a tensor broadcastable to the pooled shape).
    Returns the mask of windows whose offsets were compared.
    """
    sw, sw_ref, v = sw.detach().cpu(), sw_ref.detach().cpu(), v.detach().cpu()
    tol = tol.detach().cpu() if isinstance(tol, torch.Tensor) else tol
    assert sw.dtype == torch.uint8 and sw.shape == sw_ref.shape, (what, sw.dtype, sw.shape, sw_ref.shape)
    assert ((sw & 0x70) == 0).all(), f"{what}: bits 4-6 must be zero"
    clear = window_gap(v, pool) > tol
    bad = ((sw & 0x0F) != (sw_ref & 0x0F)) & clear
    assert not bad.any(), f"{what}: {int(bad.sum())} window offsets differ where the top two values are > {tol} apart"
    vmax = F.max_pool2d(v, pool, pool)
    decided = clear & (vmax.abs() > tol)
    bad = ((sw & 0x80) != (sw_ref & 0x80)) & decided
    assert not bad.any(), f"{what}: {int(bad.sum())} a bits differ where the window max is > {tol} from 0"
    return clear
