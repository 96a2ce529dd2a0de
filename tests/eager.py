"""Eager PyTorch compositions the fused ops are checked against (never the package's own code)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

TOL = {
    torch.float64: dict(rtol=1e-9, atol=1e-9),
    torch.float32: dict(rtol=1e-4, atol=1e-4),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
    torch.float16: dict(rtol=5e-3, atol=5e-3),
}


def pre_activation(x, w, scale=None, shift=None, stride=1, padding=0):
    v = F.conv2d(x, w, None, stride, padding)
    if scale is not None:
        v = v * scale.view(1, -1, 1, 1)
    if shift is not None:
        v = v + shift.view(1, -1, 1, 1)
    return v


def act(v, negative_slope):
    return F.leaky_relu(v, negative_slope) if negative_slope > 0 else F.relu(v)


def conv_relu_pool(x, w, scale=None, shift=None, stride=1, padding=0, pool=2, negative_slope=0.0):
    """(y, int64 indices, pre-activation v) by eager ops: act → max_pool2d(return_indices)."""
    v = pre_activation(x, w, scale, shift, stride, padding)
    y, idx = F.max_pool2d(act(v, negative_slope), pool, pool, return_indices=True)
    return y, idx, v


def render(mu, idx, w, out_size, a_factor, scale=None, stride=1, padding=0, pool=2, conv_size=None):
    """max_unpool2d + mask + scale + conv_transpose2d, all eager."""
    g = mu * a_factor
    if scale is not None:
        g = g * scale.view(1, -1, 1, 1)
    up = F.max_unpool2d(g, idx, pool, pool, output_size=conv_size)
    k = w.shape[-1]
    out_pad = [o - ((c - 1) * stride - 2 * padding + k) for o, c in zip(out_size, conv_size)]
    return F.conv_transpose2d(up, w, None, stride, padding, out_pad)


def window_gap(v, pool):
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
