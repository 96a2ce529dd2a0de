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
from ..contract import Checker, shape_str
from .switches import all_on, channel_sum, masked_values


# --------------------------------------------------------------------------- render (internal op)


def _render_impl(mu: Tensor, switches: Tensor, weight: Tensor, scale: Optional[Tensor], stride: int, padding: int,
                 pool: int, out_h: int, out_w: int, negative_slope: float) -> Tensor:
    return dispatch.implementation(mu.device, "render")(mu, switches, weight, scale, stride, padding, pool,
                                                        (out_h, out_w), negative_slope)


def _render_fake(mu, switches, weight, scale, stride, padding, pool, out_h, out_w, negative_slope):
    return mu.new_empty((mu.shape[0], weight.shape[1], out_h, out_w))


def _render_setup(ctx, inputs, output):
    mu, switches, weight, scale, stride, padding, pool, out_h, out_w, negative_slope = inputs
    ctx.conf = (stride, padding, pool, negative_slope)
    ctx.save_for_backward(mu, switches, weight, scale)


def _render_backward(ctx, gout):
    mu, switches, weight, scale = ctx.saved_tensors
    stride, padding, pool, slope = ctx.conf
    need_mu, _, need_w, need_scale = ctx.needs_input_grad[:4]
    gmu = gw = gscale = None
    gout = gout.contiguous()
    if need_mu or need_scale:
        gmu, gscale = mu_scale_grads(gout, weight, mu, switches, scale, stride, padding, pool, slope, need_mu,
                                     need_scale)
    if need_w:
        gw = render_wgrad(gout, mu, switches, scale, stride, padding, pool, slope, weight.shape[-2],
                          weight.shape[-1])
    return gmu, None, gw, gscale, None, None, None, None, None, None


#: render with validated arguments: ``(mu, switches, weight, scale, stride, padding, pool, out_h, out_w, slope)``.
render_op = dispatch.CustomOp("render", _render_impl, _render_fake, _render_setup, _render_backward)


# --------------------------------------------------------------------------- gather_conv


def _gather_conv_impl(src: Tensor, weight: Tensor, switches: Tensor, stride: int, padding: int, pool: int) -> Tensor:
    return dispatch.implementation(src.device, "gather_conv")(src, weight, switches, stride, padding, pool)


def _gather_conv_fake(src, weight, switches, stride, padding, pool):
    return switches.new_empty(switches.shape, dtype=src.dtype)


def _gather_setup(ctx, inputs, output):
    src, weight, switches, stride, padding, pool = inputs
    ctx.conf = (stride, padding, pool, src.shape[-2], src.shape[-1])
    ctx.save_for_backward(src, weight, switches)


def _gather_backward(ctx, g):
    # gather_conv is bilinear in (src, weight): its adjoints are the unmasked render and render_wgrad.
    src, weight, switches = ctx.saved_tensors
    stride, padding, pool, h, w = ctx.conf
    on = all_on(switches)
    g = g.contiguous()
    gsrc = gw = None
    if ctx.needs_input_grad[0]:
        gsrc = render_op(g, on, weight, None, stride, padding, pool, h, w, 0.0)
    if ctx.needs_input_grad[1]:
        gw = render_wgrad(src, g, on, None, stride, padding, pool, 0.0, weight.shape[-2], weight.shape[-1])
    return gsrc, gw, None, None, None, None


gather_conv = dispatch.CustomOp("gather_conv", _gather_conv_impl, _gather_conv_fake, _gather_setup,
                                _gather_backward)


def mu_scale_grads(src, weight, mu, switches, scale, stride, padding, pool, slope, need_mu, need_scale):
    """Gradients of <conv2d(src, weight), render-map of mu> in mu and scale: the conv read at the recorded
    offsets (gather_conv), times the activation derivative, times scale for mu / mu for scale."""
    at = masked_values(gather_conv(src, weight, switches, stride, padding, pool), switches, None, slope)
    gmu = gscale = None
    if need_mu:
        gmu = at if scale is None else at * scale.view(1, -1, 1, 1)
    if need_scale and scale is not None:
        gscale = channel_sum(at * mu)
    return gmu, gscale


# --------------------------------------------------------------------------- render_wgrad


def _render_wgrad_impl(src: Tensor, mu: Tensor, switches: Tensor, scale: Optional[Tensor], stride: int,
                       padding: int, pool: int, negative_slope: float, kernel_h: int, kernel_w: int) -> Tensor:
    return dispatch.implementation(src.device, "render_wgrad")(src, mu, switches, scale, stride, padding, pool,
                                                               negative_slope, (kernel_h, kernel_w))


def _render_wgrad_fake(src, mu, switches, scale, stride, padding, pool, negative_slope, kernel_h, kernel_w):
    return src.new_empty((mu.shape[1], src.shape[1], kernel_h, kernel_w))


def _wgrad_setup(ctx, inputs, output):
    src, mu, switches, scale, stride, padding, pool, negative_slope, kernel_h, kernel_w = inputs
    ctx.conf = (stride, padding, pool, negative_slope, src.shape[-2], src.shape[-1])
    ctx.save_for_backward(src, mu, switches, scale)


def _wgrad_backward(ctx, gw):
    # render_wgrad is linear in src and in mu * a' * scale: d src renders mu through gw, d mu gathers.
    src, mu, switches, scale = ctx.saved_tensors
    stride, padding, pool, slope, h, w = ctx.conf
    need_src, need_mu, _, need_scale = ctx.needs_input_grad[:4]
    gw = gw.contiguous()
    gsrc = gmu = gscale = None
    if need_src:
        gsrc = render_op(mu, switches, gw, scale, stride, padding, pool, h, w, slope)
    if need_mu or need_scale:
        gmu, gscale = mu_scale_grads(src, gw, mu, switches, scale, stride, padding, pool, slope, need_mu,
                                     need_scale)
    return gsrc, gmu, None, gscale, None, None, None, None, None, None


render_wgrad = dispatch.CustomOp("render_wgrad", _render_wgrad_impl, _render_wgrad_fake, _wgrad_setup,
                                 _wgrad_backward)


# --------------------------------------------------------------------------- the public op


def render(mu: Tensor, switches: Tensor, weight: Tensor, scale: Optional[Tensor] = None, *, stride: int = 1,
           padding: int = 0, pool: int = 2, out_size, negative_slope: float = 0.0) -> Tensor:
    """Top-down pass: unpool ``mu`` at the recorded offsets, mask by ``a``, scale, transposed conv.

    ``out_size`` is the (H, W) of the bottom-up layer's input. With ``scale`` given this is the
    input gradient of :func:`conv_relu_pool` for upstream gradient ``mu``.

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
        raise check.value_error(f"weight has {weight.shape[0]} output channels (shape ({shape_str(weight)})) but "
                                f"mu has {mu.shape[1]} channels (shape ({shape_str(mu)}))")
    check.switches(switches, "mu", mu)
    stride, padding, pool, negative_slope = check.layer(stride, padding, pool, negative_slope)
    check.channel_vector("scale", scale, weight.shape[0], "mu", mu)
    out_hw = check.size_pair("out_size", out_size, "(H, W) of the layer's input")
    _, phw = check.geometry("out_size", out_hw, weight, stride, padding, pool)
    if phw != tuple(mu.shape[-2:]):
        raise check.value_error(f"out_size {out_hw} gives pooled size {phw} with kernel "
                                f"{tuple(weight.shape[-2:])}, stride {stride}, padding {padding}, pool {pool}, but "
                                f"mu has spatial size {tuple(mu.shape[-2:])} (shape ({shape_str(mu)}))")
    return render_op(mu, switches, weight, scale, stride, padding, pool, out_hw[0], out_hw[1], negative_slope)
