"""The render op: the top-down pass (unpool at the recorded offsets, mask by ``a``, scale, transposed conv),
plus its two adjoints, which are themselves differentiable ops so every backward formula of the package is
made of ops (``torch.compile(fullgraph=True)`` traces both directions without looking inside a kernel):

- ``gather_conv(src, W, switches)``: ``conv2d(src, W)`` read at the recorded offsets (render's adjoint in mu);
- ``render_wgrad(src, mu, switches, scale)``: the weight gradient over the recorded offsets.

With ``scale`` given, render is the input gradient of conv_relu_pool, render_wgrad its weight gradient.
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from .. import dispatch
from ..contract import Checker, shape_str, window_of
from ..schema import SCHEMAS
from .switches import all_on, channel_sum, check_switch_bytes, masked_values


# --------------------------------------------------------------------------- render (internal op)


def _render_impl(a) -> Tensor:
    return dispatch.implementation(a["mu"].device, "render")(**a)


def _render_fake(a):
    return a["mu"].new_empty((a["mu"].shape[0], a["weight"].shape[1], a["out_h"], a["out_w"]))


def _render_setup(ctx, a, output):
    ctx.conf = (a["stride"], a["padding"], a["negative_slope"])
    ctx.window = window_of(a)
    ctx.save_for_backward(a["mu"], a["switches"], a["weight"], a["scale"])


def _render_backward(ctx, gout):
    mu, switches, weight, scale = ctx.saved_tensors
    stride, padding, slope = ctx.conf
    window = ctx.window
    need = ctx.needs_grad
    gout = gout.contiguous()
    grads = {}
    if need["mu"] or need["scale"]:
        grads["mu"], grads["scale"] = mu_scale_grads(
            gout, weight, mu, switches, scale, stride, padding, window, slope, need["mu"], need["scale"]
        )
    if need["weight"]:
        grads["weight"] = render_wgrad(
            src=gout,
            mu=mu,
            switches=switches,
            scale=scale,
            stride=stride,
            padding=padding,
            **window,
            negative_slope=slope,
            kernel_h=weight.shape[-2],
            kernel_w=weight.shape[-1],
        )
    return grads


#: render with validated arguments, by keyword (drmm_kernels/schema.py).
render_op = dispatch.CustomOp(SCHEMAS["render"], _render_impl, _render_fake, _render_setup, _render_backward)


# --------------------------------------------------------------------------- gather_conv


def _gather_conv_impl(a) -> Tensor:
    return dispatch.implementation(a["src"].device, "gather_conv")(**a)


def _gather_conv_fake(a):
    return a["switches"].new_empty(a["switches"].shape, dtype=a["src"].dtype)


def _gather_setup(ctx, a, output):
    ctx.conf = (a["stride"], a["padding"], a["src"].shape[-2], a["src"].shape[-1])
    ctx.window = window_of(a)
    ctx.save_for_backward(a["src"], a["weight"], a["switches"])


def _gather_backward(ctx, g):
    # gather_conv is bilinear in (src, weight): its adjoints are the unmasked render and render_wgrad.
    src, weight, switches = ctx.saved_tensors
    stride, padding, h, w = ctx.conf
    window = ctx.window
    on = all_on(switches)
    g = g.contiguous()
    grads = {}
    if ctx.needs_grad["src"]:
        grads["src"] = render_op(
            mu=g,
            switches=on,
            weight=weight,
            scale=None,
            stride=stride,
            padding=padding,
            **window,
            out_h=h,
            out_w=w,
            negative_slope=0.0,
        )
    if ctx.needs_grad["weight"]:
        grads["weight"] = render_wgrad(
            src=src,
            mu=g,
            switches=on,
            scale=None,
            stride=stride,
            padding=padding,
            **window,
            negative_slope=0.0,
            kernel_h=weight.shape[-2],
            kernel_w=weight.shape[-1],
        )
    return grads


gather_conv = dispatch.CustomOp(
    SCHEMAS["gather_conv"], _gather_conv_impl, _gather_conv_fake, _gather_setup, _gather_backward
)


def mu_scale_grads(src, weight, mu, switches, scale, stride, padding, window, slope, need_mu, need_scale):
    """Gradients of <conv2d(src, weight), render-map of mu> in mu and scale: the conv read at the recorded
    offsets (gather_conv), times the activation derivative, times scale for mu / mu for scale."""
    at = masked_values(
        mu=gather_conv(src=src, weight=weight, switches=switches, stride=stride, padding=padding, **window),
        switches=switches,
        scale=None,
        negative_slope=slope,
    )
    gmu = gscale = None
    if need_mu:
        gmu = at if scale is None else at * scale.view(1, -1, 1, 1)
    if need_scale and scale is not None:
        gscale = channel_sum(at * mu)
    return gmu, gscale


# --------------------------------------------------------------------------- render_wgrad


def _render_wgrad_impl(a) -> Tensor:
    return dispatch.implementation(a["src"].device, "render_wgrad")(**a)


def _render_wgrad_fake(a):
    return a["src"].new_empty((a["mu"].shape[1], a["src"].shape[1], a["kernel_h"], a["kernel_w"]))


def _wgrad_setup(ctx, a, output):
    ctx.conf = (a["stride"], a["padding"], a["negative_slope"], a["src"].shape[-2], a["src"].shape[-1])
    ctx.window = window_of(a)
    ctx.save_for_backward(a["src"], a["mu"], a["switches"], a["scale"])


def _wgrad_backward(ctx, gw):
    # render_wgrad is linear in src and in mu * a' * scale: d src renders mu through gw, d mu gathers.
    src, mu, switches, scale = ctx.saved_tensors
    stride, padding, slope, h, w = ctx.conf
    window = ctx.window
    need = ctx.needs_grad
    gw = gw.contiguous()
    grads = {}
    if need["src"]:
        grads["src"] = render_op(
            mu=mu,
            switches=switches,
            weight=gw,
            scale=scale,
            stride=stride,
            padding=padding,
            **window,
            out_h=h,
            out_w=w,
            negative_slope=slope,
        )
    if need["mu"] or need["scale"]:
        grads["mu"], grads["scale"] = mu_scale_grads(
            src, gw, mu, switches, scale, stride, padding, window, slope, need["mu"], need["scale"]
        )
    return grads


render_wgrad = dispatch.CustomOp(
    SCHEMAS["render_wgrad"], _render_wgrad_impl, _render_wgrad_fake, _wgrad_setup, _wgrad_backward
)


# --------------------------------------------------------------------------- the public op


def render(
    mu: Tensor,
    switches: Tensor,
    weight: Tensor,
    scale: Optional[Tensor] = None,
    *,
    stride: int = 1,
    padding: int = 0,
    pool: int = 2,
    out_size,
    negative_slope: float = 0.0,
    pool_stride: Optional[int] = None,
    pool_padding: int = 0,
    ceil_mode: bool = False,
    check_switches: bool = True,
) -> Tensor:
    """Top-down pass: unpool ``mu`` at the recorded offsets, mask by ``a``, scale, transposed conv.

    ``out_size`` is the (H, W) of the bottom-up layer's input; the pool arguments are those the switches were
    recorded with. Where overlapping windows recorded the same position, it receives the sum of what they route
    to it (as max_pool2d's gradient does). With ``scale`` given this is the input gradient of
    :func:`conv_relu_pool` for upstream gradient ``mu``.

    A switch byte whose offset lies outside its window (or in the pool padding) is a ``ValueError`` on every
    backend, found by one pass over the bytes (a host sync on a GPU). ``check_switches=False`` skips that pass
    for switches this package recorded or drew itself (a malformed byte then gives an unspecified result, or an
    error on the C++ CPU backend).

    >>> from drmm_kernels import conv_relu_pool
    >>> x, w = torch.randn(2, 3, 8, 8), torch.randn(4, 3, 3, 3)
    >>> y, sw = conv_relu_pool(x, w, padding=1)
    >>> render(y, sw, w, padding=1, out_size=(8, 8)).shape
    torch.Size([2, 3, 8, 8])
    """
    check = Checker("render")
    check.tensor("mu", mu, 4)
    check.floating("mu", mu)
    check.tensor("weight", weight, 4)
    check.like("weight", weight, "mu", mu)
    if weight.shape[0] != mu.shape[1]:
        raise check.value_error(
            f"weight has {weight.shape[0]} output channels (shape ({shape_str(weight)})) but "
            f"mu has {mu.shape[1]} channels (shape ({shape_str(mu)}))"
        )
    check.switches(switches, "mu", mu)
    stride, padding, pool, negative_slope = check.layer(stride, padding, pool, negative_slope)
    window = check.window(pool, pool_stride, pool_padding, ceil_mode)
    check.channel_vector("scale", scale, weight.shape[0], "mu", mu)
    out_hw = check.size_pair("out_size", out_size, "(H, W) of the layer's input")
    chw, phw = check.geometry("out_size", out_hw, weight, stride, padding, **window)
    if phw != tuple(mu.shape[-2:]):
        raise check.value_error(
            f"out_size {out_hw} gives pooled size {phw} with kernel "
            f"{tuple(weight.shape[-2:])}, stride {stride}, padding {padding}, {_window_str(window)}, but "
            f"mu has spatial size {tuple(mu.shape[-2:])} (shape ({shape_str(mu)}))"
        )
    if check_switches:
        # Checked on every backend: Triton and CUDA would drop a malformed byte's value and the reference would
        # route it to another window's position (the C++ CPU kernels also refuse it as they read).
        check_switch_bytes(check, switches, window, chw)
    return render_op(
        mu=mu,
        switches=switches,
        weight=weight,
        scale=scale,
        stride=stride,
        padding=padding,
        out_h=out_hw[0],
        out_w=out_hw[1],
        negative_slope=negative_slope,
        **window,
    )


def switch_backward(gy, switches, x, weight, scale, *, stride, padding, window, negative_slope, need_x, need_w):
    """``(dx, dW)`` of a conv (times ``scale``) -> activation -> max-pool layer whose pooled output has gradient
    ``gy``, over the recorded offsets only: render for the input, render_wgrad for the weight (None where not
    needed). The one place the fused ops' sparse backward spells out the geometry."""
    geometry = dict(switches=switches, scale=scale, stride=stride, padding=padding, negative_slope=negative_slope)
    geometry.update(window)
    gx = gw = None
    if need_x:
        gx = render_op(mu=gy, weight=weight, out_h=x.shape[-2], out_w=x.shape[-1], **geometry)
    if need_w:
        gw = render_wgrad(src=x, mu=gy, kernel_h=weight.shape[-2], kernel_w=weight.shape[-1], **geometry)
    return gx, gw


def _window_str(window: dict) -> str:
    """``pool 3`` or ``pool 3 (stride 2, padding 1, ceil_mode)`` for messages."""
    extra = [f"stride {window['pool_stride']}"] if window["pool_stride"] != window["pool"] else []
    extra += [f"padding {window['pool_padding']}"] if window["pool_padding"] else []
    extra += ["ceil_mode"] if window["ceil_mode"] else []
    return f"pool {window['pool']}" + (f" ({', '.join(extra)})" if extra else "")
