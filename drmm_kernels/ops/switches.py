"""Ops on switch maps: ``switches_to_indices`` (public) and the two differentiable primitives that place or mask
pooled values at the recorded offsets, ``unpool`` and ``masked_values`` (used by the other ops' backward)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import dispatch, reference
from ..contract import ON_BIT, Checker, shape_str


def channel_sum(t: Tensor) -> Tensor:
    return t.sum(dim=(0, 2, 3))


def all_on(switches: Tensor) -> Tensor:
    """The same offsets with every ``a`` bit set, so an op applies no activation mask."""
    return switches | ON_BIT


# --------------------------------------------------------------------------- masked_values


def _masked_values_impl(mu: Tensor, switches: Tensor, scale: Optional[Tensor], negative_slope: float) -> Tensor:
    return dispatch.implementation(mu.device, "masked_values")(mu, switches, scale, negative_slope)


def _masked_values_fake(mu, switches, scale, negative_slope):
    return torch.empty_like(mu, memory_format=torch.contiguous_format)


def _masked_values_setup(ctx, inputs, output):
    mu, switches, scale, negative_slope = inputs
    ctx.slope = negative_slope
    ctx.save_for_backward(mu, switches, scale)


def _masked_values_backward(ctx, g):
    mu, switches, scale = ctx.saved_tensors
    g = g.contiguous()
    gmu = masked_values(g, switches, scale, ctx.slope) if ctx.needs_input_grad[0] else None
    gscale = None
    if ctx.needs_input_grad[2] and scale is not None:
        gscale = channel_sum(g * masked_values(mu, switches, None, ctx.slope))
    return gmu, None, gscale, None


#: ``mu * a'(switches) * scale``: the pooled gradient through the activation (internal, validated arguments).
masked_values = dispatch.CustomOp("masked_values", _masked_values_impl, _masked_values_fake, _masked_values_setup,
                                  _masked_values_backward)


# --------------------------------------------------------------------------- unpool


def _unpool_impl(values: Tensor, switches: Tensor, pool: int, out_h: int, out_w: int) -> Tensor:
    return dispatch.implementation(values.device, "unpool")(values, switches, pool, (out_h, out_w))


def _unpool_fake(values, switches, pool, out_h, out_w):
    return values.new_empty((values.shape[0], values.shape[1], out_h, out_w))


def _unpool_setup(ctx, inputs, output):
    ctx.pool = inputs[2]
    ctx.save_for_backward(inputs[1])


def _unpool_backward(ctx, g):
    # The adjoint of placing each value at its recorded offset is reading the map there.
    (switches,) = ctx.saved_tensors
    n, c = switches.shape[:2]
    idx = reference.switches_to_indices(switches, ctx.pool, tuple(g.shape[-2:])).reshape(n, c, -1)
    return g.reshape(n, c, -1).gather(2, idx).view(switches.shape), None, None, None, None


#: Each pooled value at its recorded offset of a zero (out_h, out_w) map (internal, validated arguments).
unpool = dispatch.CustomOp("unpool", _unpool_impl, _unpool_fake, _unpool_setup, _unpool_backward)


# --------------------------------------------------------------------------- switches_to_indices


def switches_to_indices(switches: Tensor, *, pool: int, conv_size) -> Tensor:
    """PyTorch ``max_pool2d`` flat indices (int64) into the ``conv_size`` = (H_conv, W_conv) map.

    >>> sw = torch.tensor([[[[0x83]]]], dtype=torch.uint8)  # offset 3 = (1, 1), on
    >>> switches_to_indices(sw, pool=2, conv_size=(2, 2)).item()
    3
    """
    check = Checker("switches_to_indices")
    check.tensor("switches", switches)
    check.uint8_switches(switches)
    if switches.dim() < 2:
        raise check.value_error(f"switches must have at least 2 dims (..., H, W), got shape ({shape_str(switches)})")
    pool = check.integer("pool", pool, 1, 4)
    hc, wc = check.size_pair("conv_size", conv_size, "(H_conv, W_conv)")
    if hc // pool != switches.shape[-2] or wc // pool != switches.shape[-1]:
        raise check.value_error(f"conv_size {(hc, wc)} with pool {pool} gives pooled size "
                                f"{(hc // pool, wc // pool)}, but switches has shape ({shape_str(switches)})")
    return reference.switches_to_indices(switches, pool, (hc, wc))
