"""The conv_bn_relu_pool op: ``conv2d`` -> ``batch_norm`` (as ``F.batch_norm`` computes it) -> activation ->
max-pool with switches, in training mode (batch statistics, gradients through them) and eval mode (running
statistics folded into a per-channel scale and shift).

No backend fuses the whole op: training-mode statistics need the whole batch's conv output before any window
maximum can be decided (a negative gamma * invstd flips which element wins), so the conv output z is
materialized once, its statistics taken (``batch_stats``), and the normalize-activate-pool-switch epilogue
(``bn_pool``) runs on it.
"""

from __future__ import annotations

import numbers
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import dispatch, reference
from ..attribution import capture, input_only, rewrite
from ..contract import Checker, conv_size, pooled_size, shape_str, window_of
from ..schema import SCHEMAS
from .conv_relu_pool import conv_backward, is_pointwise
from .render import gather_conv, switch_backward
from .switches import channel_sum, masked_values, unpool


def _bn_pointwise(x: Tensor, weight: Tensor, stride: int, padding: int) -> bool:
    """Whether the batch-norm op runs its conv and the conv's backward as batched matrix products (1x1 on CPU)."""
    return x.device.type == "cpu" and is_pointwise(x, weight, stride, padding)


def _bn_conv(x: Tensor, weight: Tensor, stride: int, padding: int) -> Tensor:
    """The batch-norm op's materialized conv output (see _bn_pointwise)."""
    if _bn_pointwise(x, weight, stride, padding):
        n, ci, h, w = x.shape
        co = weight.shape[0]
        return torch.bmm(weight.reshape(co, ci).expand(n, co, ci), x.reshape(n, ci, h * w)).view(n, co, h, w)
    return F.conv2d(x, weight, None, stride, padding)


def _bn_forward_generic(a, bn_pool, batch_stats):
    """Materialized conv output, batch statistics, then the fused normalize-act-pool-switch epilogue."""
    x = a["x"]
    z = _bn_conv(x, a["weight"], a["stride"], a["padding"])
    if a["training"]:
        mean, var = batch_stats(z=z)
    else:
        acc = torch.promote_types(z.dtype, torch.float32)
        mean, var = a["running_mean"].to(acc, copy=True), a["running_var"].to(acc, copy=True)
    scale = torch.rsqrt(var + a["eps"])
    if a["bn_weight"] is not None:
        scale = scale * a["bn_weight"]
    shift = -mean * scale
    if a["bn_bias"] is not None:
        shift = shift + a["bn_bias"]
    y, sw = bn_pool(
        z=z, scale=scale.to(z.dtype), shift=shift.to(z.dtype), negative_slope=a["negative_slope"], **window_of(a)
    )
    return y, sw, mean.to(x.dtype), var.to(x.dtype), z.contiguous() if a["training"] else z.new_empty(0)


def _conv_bn_relu_pool_impl(a) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    name = dispatch.resolve(a["x"].device)
    if name == "reference":
        return reference.conv_bn_relu_pool(**a)
    return _bn_forward_generic(a, dispatch.primitive(name, "bn_pool"), dispatch.primitive(name, "batch_stats"))


def _conv_bn_relu_pool_fake(a):
    x, weight = a["x"], a["weight"]
    chw = conv_size(tuple(x.shape[-2:]), tuple(weight.shape[-2:]), a["stride"], a["padding"])
    shape = (
        x.shape[0],
        weight.shape[0],
        *pooled_size(chw, **window_of(a)),
    )
    c = weight.shape[0]
    z_shape = (x.shape[0], c, *chw) if a["training"] else (0,)
    return (
        x.new_empty(shape),
        x.new_empty(shape, dtype=torch.uint8),
        x.new_empty((c,)),
        x.new_empty((c,)),
        x.new_empty(z_shape),
    )


def _bn_setup(ctx, a, output):
    ctx.conf = (a["training"], a["eps"], a["stride"], a["padding"], a["negative_slope"])
    ctx.window = window_of(a)
    ctx.has_bias = a["bn_bias"] is not None
    ctx.save_for_backward(a["x"], a["weight"], a["bn_weight"], output[1], output[2], output[3], output[4])
    ctx.mark_non_differentiable(output[1], output[2], output[3], output[4])
    ctx.attribution = capture()  # a drmm_kernels.attribution rule for this call, None for the plain gradient
    ctx.input_only = input_only()  # inside drmm_kernels.attribution: no parameter gradients
    # Only y's gradient is used; materializing the others would fill a zero z (full conv size) per backward.
    ctx.set_materialize_grads(False)


def _bn_backward(ctx, gy, _gsw, _gmean, _gvar, _gz):
    if gy is None:
        return {}
    x, weight, bn_weight, switches, mean, var, z = ctx.saved_tensors
    training, eps, stride, padding, slope = ctx.conf
    window = ctx.window
    need = ctx.needs_grad
    if ctx.input_only:
        need = {k: v and k == "x" for k, v in need.items()}
    need_x, need_w = need["x"], need["weight"]
    gy, switches = rewrite(gy.contiguous(), switches, ctx.attribution, ctx.window)
    acc = torch.promote_types(x.dtype, torch.float32)
    invstd = torch.rsqrt(var.to(acc) + eps)
    gamma = bn_weight.to(acc) if bn_weight is not None else torch.ones_like(invstd)
    gact = masked_values(mu=gy.to(acc), switches=switches, scale=None, negative_slope=slope)  # dL/dv at window maxima
    gx = gw = ggamma = gbeta = None
    if training:
        # The batch statistics couple every position, so this backward is dense: scatter dL/dv to the recorded
        # offsets and let ATen's fused batch-norm and convolution backward kernels finish. z is saved by the
        # forward (training only): recomputing it costs a whole convolution per backward (the BN rows of
        # bench/results/cpu_ops.md), and saving it still keeps less than half of eager's saved activations
        # (eager keeps z, the ReLU output and int64 indices).
        if torch.is_grad_enabled():
            # A double backward: the saved z is detached, so recompute it from x and the weight for the graph to
            # reach them (batch norm's own double backward treats the statistics as functions of z).
            z = _bn_conv(x, weight, stride, padding)
        dv = gact.to(z.dtype)
        if window["pool"] > 1:  # (without pooling every position is a window max: nothing to scatter)
            dv = unpool(values=dv, switches=switches, out_h=z.shape[-2], out_w=z.shape[-1], **window)
        # The weight in the statistics' dtype: ATen's mixed-precision path (half z, float statistics) needs them alike.
        dz, ggamma_, gbeta_ = torch.ops.aten.native_batch_norm_backward(
            dv,
            z,
            bn_weight.to(acc) if bn_weight is not None else None,
            None,
            None,
            mean.to(acc),
            invstd,
            True,
            eps,
            [need_x or need_w, True, True],
        )
        s1, s2 = gbeta_, ggamma_  # = sum of dL/dv, and of dL/dv * xhat, per channel
        if need_x or need_w:
            gx, gw, _ = conv_backward(
                dz,
                x,
                weight,
                stride=stride,
                padding=padding,
                need_x=need_x,
                need_w=need_w,
                need_b=False,
                pointwise=_bn_pointwise(x, weight, stride, padding),
            )
    else:
        s1 = channel_sum(gact)  # = d beta
        scale = (gamma * invstd).to(x.dtype)
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
            need_x=need_x,
            need_w=need_w,
        )
        if need["bn_weight"] and bn_weight is not None:
            z_at = gather_conv(src=x, weight=weight, switches=switches, stride=stride, padding=padding, **window).to(
                acc
            )
            s2 = channel_sum(gact * (z_at - mean.to(acc).view(1, -1, 1, 1)) * invstd.view(1, -1, 1, 1))
    if need["bn_weight"] and bn_weight is not None:
        ggamma = s2.to(bn_weight.dtype)
    if need["bn_bias"] and ctx.has_bias:
        gbeta = s1.to(x.dtype)
    return {"x": gx, "weight": gw, "bn_weight": ggamma, "bn_bias": gbeta}


conv_bn_relu_pool_op = dispatch.CustomOp(
    SCHEMAS["conv_bn_relu_pool"], _conv_bn_relu_pool_impl, _conv_bn_relu_pool_fake, _bn_setup, _bn_backward
)


def conv_bn_relu_pool(
    x: Tensor,
    weight: Tensor,
    bn_weight: Optional[Tensor],
    bn_bias: Optional[Tensor],
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    *,
    training: bool,
    momentum: float = 0.1,
    eps: float = 1e-5,
    stride: int = 1,
    padding: int = 0,
    pool: int = 2,
    negative_slope: float = 0.0,
    pool_stride: Optional[int] = None,
    pool_padding: int = 0,
    ceil_mode: bool = False,
) -> Tuple[Tensor, Tensor]:
    """``conv2d`` → ``batch_norm`` (as ``F.batch_norm`` computes it) → activation → max-pool with switches.

    In training mode the batch statistics are used, gradients flow through them, and
    ``running_mean``/``running_var`` (when given) are updated in place like ``F.batch_norm``.
    In eval mode the running statistics are folded into a per-channel scale and shift. The pool arguments are
    those of :func:`conv_relu_pool`.
    """
    check = Checker("conv_bn_relu_pool")
    # Under a torch.fx tracer (dispatch.fx_proxies) the op is one graph node, its tensors unchecked. The running
    # statistics' update below is Python on the buffers, which fx (passing buffers as plain tensors) would run once
    # while tracing instead of recording it: training mode with running statistics is refused there.
    traced = dispatch.fx_proxies(x, weight, bn_weight, bn_bias, running_mean, running_var)
    if traced and training and running_mean is not None:
        raise check.type_error(
            "cannot be traced by torch.fx in training mode with running statistics: their in-place update "
            "would run once while tracing instead of at every call; trace in eval mode (fuse()'s blocks run "
            "their unfused chain under an fx tracer)"
        )
    if not traced:
        check.conv_input("x", x, weight)
    stride, padding, pool, negative_slope = check.layer(stride, padding, pool, negative_slope)
    window = check.window(pool, pool_stride, pool_padding, ceil_mode)
    if not traced:
        c = weight.shape[0]
        for name, t in (
            ("bn_weight", bn_weight),
            ("bn_bias", bn_bias),
            ("running_mean", running_mean),
            ("running_var", running_var),
        ):
            check.channel_vector(name, t, c, "x", x)
    if not isinstance(training, bool):
        raise check.type_error(f"training must be a bool, got {type(training).__name__}")
    if not training and (running_mean is None or running_var is None):
        raise check.value_error("running_mean and running_var are required when training=False")
    if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real) or not 0.0 <= momentum <= 1.0:
        raise check.value_error(f"momentum must be a float in [0, 1], got {momentum!r}")
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or eps < 0:
        raise check.value_error(f"eps must be a non-negative float, got {eps!r}")
    if not traced:
        chw, phw = check.geometry("x", x.shape[-2:], weight, stride, padding, **window)
        if training and x.shape[0] == 0:
            # As F.batch_norm: an empty batch gives an empty output and leaves the running statistics alone. The
            # zero-weighted sum keeps the output in the graph of every input, so backward gives zero gradients.
            anchor = sum(t.sum() * 0 for t in (x, weight, bn_weight, bn_bias) if t is not None)
            y = x.new_zeros((0, c, *phw)) + anchor
            return y, torch.zeros(y.shape, dtype=torch.uint8, device=x.device)
        if training and x.shape[0] * chw[0] * chw[1] < 2:
            raise check.value_error(
                f"training-mode batch norm needs more than one value per channel, got x of "
                f"shape ({shape_str(x)}) with conv output {chw}"
            )
    out = conv_bn_relu_pool_op(
        x=x,
        weight=weight,
        bn_weight=bn_weight,
        bn_bias=bn_bias,
        running_mean=running_mean,
        running_var=running_var,
        training=training,
        eps=float(eps),
        stride=stride,
        padding=padding,
        negative_slope=negative_slope,
        **window,
    )
    if traced:
        return dispatch.y_last(out)
    y, sw, mean, var, _ = out
    if training and running_mean is not None and running_var is not None:
        m = x.shape[0] * chw[0] * chw[1]
        with torch.no_grad():
            running_mean.mul_(1 - momentum).add_(mean.detach(), alpha=momentum)
            running_var.mul_(1 - momentum).add_(var.detach() * (m / (m - 1)), alpha=momentum)
    return y, sw
