"""Ops on switch maps: ``switches_to_indices`` (public) and the two differentiable primitives that place or mask
pooled values at the recorded offsets, ``unpool`` and ``masked_values`` (used by the other ops' backward)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import dispatch, reference
from ..contract import ON_BIT, Checker, pooled_size, shape_str, window_of
from ..schema import SCHEMAS


def channel_sum(t: Tensor) -> Tensor:
    return t.sum(dim=(0, 2, 3))


def all_on(switches: Tensor) -> Tensor:
    """The same offsets with every ``a`` bit set, so an op applies no activation mask."""
    return switches | ON_BIT


# --------------------------------------------------------------------------- masked_values


def _masked_values_impl(a) -> Tensor:
    return dispatch.implementation(a["mu"].device, "masked_values")(**a)


def _masked_values_fake(a):
    return torch.empty_like(a["mu"], memory_format=torch.contiguous_format)


def _masked_values_setup(ctx, a, output):
    ctx.slope = a["negative_slope"]
    ctx.save_for_backward(a["mu"], a["switches"], a["scale"])


def _masked_values_backward(ctx, g):
    mu, switches, scale = ctx.saved_tensors
    g = g.contiguous()
    grads = {}
    if ctx.needs_grad["mu"]:
        grads["mu"] = masked_values(mu=g, switches=switches, scale=scale, negative_slope=ctx.slope)
    if ctx.needs_grad["scale"] and scale is not None:
        grads["scale"] = channel_sum(g * masked_values(mu=mu, switches=switches, scale=None, negative_slope=ctx.slope))
    return grads


#: ``mu * a'(switches) * scale``: the pooled gradient through the activation (internal, validated arguments).
masked_values = dispatch.CustomOp(
    SCHEMAS["masked_values"], _masked_values_impl, _masked_values_fake, _masked_values_setup, _masked_values_backward
)


# --------------------------------------------------------------------------- unpool


def _unpool_impl(a) -> Tensor:
    return dispatch.implementation(a["values"].device, "unpool")(**a)


def _unpool_fake(a):
    return a["values"].new_empty((a["values"].shape[0], a["values"].shape[1], a["out_h"], a["out_w"]))


def _unpool_setup(ctx, a, output):
    ctx.window = window_of(a)
    ctx.save_for_backward(a["switches"])


def _unpool_backward(ctx, g):
    # The adjoint of placing each value at its recorded offset is reading the map there.
    (switches,) = ctx.saved_tensors
    n, c = switches.shape[:2]
    w = ctx.window
    idx = reference.switches_to_indices(switches, w["pool"], tuple(g.shape[-2:]), w["pool_stride"], w["pool_padding"])
    idx = idx.reshape(n, c, -1)
    return {"values": g.reshape(n, c, -1).gather(2, idx).view(switches.shape)}


#: Each pooled value added at its recorded offset of a zero (out_h, out_w) map (internal, validated arguments).
unpool = dispatch.CustomOp(SCHEMAS["unpool"], _unpool_impl, _unpool_fake, _unpool_setup, _unpool_backward)


# --------------------------------------------------------------------------- switches_to_indices


def check_switch_bytes(check: Checker, switches: Tensor, window: dict, conv_hw) -> None:
    """Every byte's offset inside its ``pool x pool`` window (bits 4-6 clear) and, for a padded or ceil-mode
    pool, on the ``conv_hw`` map rather than in the padding. One pass over the bytes (a host sync on a GPU);
    skipped while compiling, where the values are not known."""
    if torch.compiler.is_compiling() or not switches.numel():
        return
    pool, stride, padding = window["pool"], window["pool_stride"], window["pool_padding"]
    bad = (switches & 0x7F) >= pool * pool
    if bool(bad.any()):
        value = int(switches[bad][0])
        raise check.value_error(
            f"switches holds byte {value:#04x}, whose offset bits (0-6) give {value & 0x7F}, outside the "
            f"{pool}x{pool} window (offsets 0..{pool * pool - 1}); were they recorded with pool={pool}?"
        )
    if padding or window["ceil_mode"]:
        hc, wc = conv_hw
        h, w = reference.switch_positions(switches, pool, stride, padding)
        outside = (h < 0) | (h >= hc) | (w < 0) | (w >= wc)
        if bool(outside.any()):
            value = int(switches[outside][0])
            raise check.value_error(
                f"switches holds byte {value:#04x}, whose offset points outside the {hc}x{wc} map (into the "
                f"pool padding); were they recorded with pool_stride={stride}, pool_padding={padding}?"
            )


def switches_to_indices(
    switches: Tensor,
    *,
    pool: int,
    conv_size,
    pool_stride: Optional[int] = None,
    pool_padding: int = 0,
    ceil_mode: bool = False,
) -> Tensor:
    """PyTorch ``max_pool2d`` flat indices (int64) into the ``conv_size`` = (H_conv, W_conv) map, for switches
    recorded with the given pool (the arguments of :func:`conv_relu_pool`).

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
    window = check.window(pool, pool_stride, pool_padding, ceil_mode)
    hc, wc = check.size_pair("conv_size", conv_size, "(H_conv, W_conv)")
    phw = pooled_size((hc, wc), **window)
    if phw != tuple(switches.shape[-2:]):
        raise check.value_error(
            f"conv_size {(hc, wc)} with pool {pool} gives pooled size {phw}, but switches has shape "
            f"({shape_str(switches)})"
        )
    # The conversion trusts nothing it cannot check: a byte outside the window would index another window's
    # position, one in the padding no position at all.
    check_switch_bytes(check, switches, window, (hc, wc))
    stride, padding = window["pool_stride"], window["pool_padding"]
    return reference.switches_to_indices(switches, pool, (hc, wc), stride, padding)
