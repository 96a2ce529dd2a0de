"""The conv_relu_pool op: ``act(max_pool(conv2d(x, W) * scale + shift))`` that also records the switches.

Gradient structure (why the fast backends only need four primitives): with
``g_hat = g * a'(switches) * scale`` placed at the recorded offsets,

- d x      = render(g, switches, W, scale)           (transposed conv of a sparse map)
- d W      = render_wgrad(x, g, switches, scale)      (weight grad over the recorded offsets)
- d scale  = sum g * a' * conv(x, W)[offsets]         (gather_conv)
- d shift  = sum g * a'
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import dispatch
from ..attribution import capture, input_only, rewrite
from ..contract import Checker, conv_size, pooled_size, window_of
from ..schema import SCHEMAS
from .render import gather_conv, switch_backward
from .switches import channel_sum, masked_values


def is_pointwise(x: Tensor, weight: Tensor, stride: int, padding: int) -> bool:
    return tuple(weight.shape[-2:]) == (1, 1) and stride == 1 and padding == 0 and x.is_contiguous()


def pointwise_conv_backward(gz: Tensor, x: Tensor, weight: Tensor, need_x: bool, need_w: bool, need_b: bool):
    """``convolution_backward`` of a 1x1, stride-1, unpadded conv of NCHW ``x`` as batched matrix products.

    oneDNN's conv backward reorders NCHW into its blocked layout first; the products skip that, like the cpu
    backend's forward (csrc/cpu/pointwise.h). The weight gradient sums per-sample products when
    their (N, C_out, C_in) stack is no larger than x, else contracts over (N, H*W) in one einsum.
    """
    n, co, h, w = gz.shape
    ci = x.shape[1]
    g3, x3 = gz.reshape(n, co, h * w), x.reshape(n, ci, h * w)
    w2 = weight.reshape(co, ci)
    gx = torch.bmm(w2.t().expand(n, ci, co), g3).view(n, ci, h, w) if need_x else None
    gw = None
    if need_w:
        if n * co * ci <= x.numel():
            gw = torch.bmm(g3, x3.transpose(1, 2)).sum(0)
        else:
            gw = torch.einsum("nkp,ncp->kc", g3, x3)
        gw = gw.view(co, ci, 1, 1)
    gb = g3.sum((0, 2)) if need_b else None
    return gx, gw, gb


def conv_backward(gz, x, weight, *, stride, padding, need_x, need_w, need_b, pointwise):
    """``(dx, dW, db)`` of ``conv2d(x, weight, stride=stride, padding=padding)`` for the output gradient ``gz``
    (None where not needed): batched matrix products when ``pointwise`` (see pointwise_conv_backward), else
    ATen's ``convolution_backward``. The dense backward of both fused ops."""
    if pointwise:
        return pointwise_conv_backward(gz, x, weight, need_x, need_w, need_b)
    return torch.ops.aten.convolution_backward(
        gz,
        x,
        weight,
        [weight.shape[0]] if need_b else None,
        [stride, stride],
        [padding, padding],
        [1, 1],
        False,
        [0, 0],
        1,
        [need_x, need_w, need_b],
    )


def _conv_relu_pool_impl(a) -> Tuple[Tensor, Tensor]:
    return dispatch.implementation(a["x"].device, "conv_relu_pool")(**a)


def _conv_relu_pool_fake(a):
    x, weight = a["x"], a["weight"]
    chw = conv_size(tuple(x.shape[-2:]), tuple(weight.shape[-2:]), a["stride"], a["padding"])
    hp, wp = pooled_size(chw, **window_of(a))
    shape = (x.shape[0], weight.shape[0], hp, wp)
    return x.new_empty(shape), x.new_empty(shape, dtype=torch.uint8)


def _crp_setup(ctx, a, output):
    ctx.conf = (a["stride"], a["padding"], a["negative_slope"])
    ctx.window = window_of(a)
    ctx.has_shift = a["shift"] is not None
    ctx.save_for_backward(a["x"], a["weight"], a["scale"], output[1])
    ctx.mark_non_differentiable(output[1])
    ctx.attribution = capture()  # a drmm_kernels.attribution rule for this call, None for the plain gradient
    ctx.input_only = input_only()  # inside drmm_kernels.attribution: no parameter gradients
    # The switches' gradient is ignored: autograd need not build a zero tensor for it on every backward.
    ctx.set_materialize_grads(False)


def _crp_backward(ctx, gy, _gsw):
    if gy is None:
        return {}
    x, weight, scale, switches = ctx.saved_tensors
    stride, padding, slope = ctx.conf
    window = ctx.window
    need = ctx.needs_grad
    if ctx.input_only:
        need = {k: v and k == "x" for k, v in need.items()}
    need_shift = need["shift"]
    gx = gw = gscale = gshift = None
    gy, switches = rewrite(gy.contiguous(), switches, ctx.attribution, ctx.window)
    gact = None
    if window["pool"] == 1 and (need["x"] or need["weight"]):
        # No pooling, no sparsity to exploit: mask once (one pass over the uint8 switches), then one dense
        # convolution backward for dx, dW and -- without a scale -- the shift gradient, which is its bias
        # gradient: the same work eager autograd does after its ReLU backward.
        gact = masked_values(mu=gy, switches=switches, scale=None, negative_slope=slope)
        gz = gact if scale is None else gact * scale.view(1, -1, 1, 1)
        bias_grad = bool(need_shift and ctx.has_shift and scale is None)
        gx, gw, gb = conv_backward(
            gz,
            x,
            weight,
            stride=stride,
            padding=padding,
            need_x=need["x"],
            need_w=need["weight"],
            need_b=bias_grad,
            pointwise=is_pointwise(x, weight, stride, padding),
        )
        if bias_grad:
            gshift, need_shift = gb, False
    else:
        gx, gw = switch_backward(
            gy,
            switches,
            x,
            weight,
            scale,
            stride=stride,
            padding=padding,
            window=window,
            negative_slope=slope,
            need_x=need["x"],
            need_w=need["weight"],
        )
    if need["scale"] or need_shift:
        if gact is None:
            gact = masked_values(mu=gy, switches=switches, scale=None, negative_slope=slope)
        if need_shift and ctx.has_shift:
            gshift = channel_sum(gact)
        if need["scale"] and scale is not None:
            gscale = channel_sum(
                gact * gather_conv(src=x, weight=weight, switches=switches, stride=stride, padding=padding, **window)
            )
    return {"x": gx, "weight": gw, "scale": gscale, "shift": gshift}


conv_relu_pool_op = dispatch.CustomOp(
    SCHEMAS["conv_relu_pool"], _conv_relu_pool_impl, _conv_relu_pool_fake, _crp_setup, _crp_backward
)


def conv_relu_pool(
    x: Tensor,
    weight: Tensor,
    scale: Optional[Tensor] = None,
    shift: Optional[Tensor] = None,
    *,
    stride: int = 1,
    padding: int = 0,
    pool: int = 2,
    negative_slope: float = 0.0,
    pool_stride: Optional[int] = None,
    pool_padding: int = 0,
    ceil_mode: bool = False,
) -> Tuple[Tensor, Tensor]:
    """Fused ``act(max_pool(conv2d(x, weight) * scale + shift))`` that also records the switches.

    The pool is ``max_pool2d(kernel_size=pool, stride=pool_stride, padding=pool_padding, ceil_mode=ceil_mode)``;
    ``pool_stride`` defaults to ``pool`` (non-overlapping windows). Returns ``(y, switches)``: ``y`` has
    max_pool2d's output shape (``(N, C_out, H_conv // pool, W_conv // pool)`` by default); ``switches`` is ``uint8``
    of the same shape, bits 0-3 the row-major offset ``dy * pool + dx`` of the window argmax from the window's
    first row and column (first maximum on ties, NaN wins, padding never) and bit 7 the ``a`` switch (window max
    > 0).

    >>> x, w = torch.randn(2, 3, 8, 8), torch.randn(4, 3, 3, 3)
    >>> y, sw = conv_relu_pool(x, w, padding=1)
    >>> y.shape, sw.dtype
    (torch.Size([2, 4, 4, 4]), torch.uint8)
    """
    check = Checker("conv_relu_pool")
    traced = dispatch.fx_proxies(x, weight, scale, shift)
    if not traced:
        check.conv_input("x", x, weight)
    stride, padding, pool, negative_slope = check.layer(stride, padding, pool, negative_slope)
    window = check.window(pool, pool_stride, pool_padding, ceil_mode)
    if not traced:
        check.channel_vector("scale", scale, weight.shape[0], "x", x)
        check.channel_vector("shift", shift, weight.shape[0], "x", x)
        check.geometry("x", x.shape[-2:], weight, stride, padding, **window)
    out = conv_relu_pool_op(
        x=x,
        weight=weight,
        scale=scale,
        shift=shift,
        stride=stride,
        padding=padding,
        negative_slope=negative_slope,
        **window,
    )
    return dispatch.y_last(out) if traced else out
