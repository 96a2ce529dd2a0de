"""The public, differentiable ops (namespace ``drmm``), their checks, fakes and autograd.

Each public op is a ``torch.library.custom_op`` whose implementation asks
``backends.resolve`` which backend runs it; backward formulas are written in
terms of other custom ops so ``torch.compile(fullgraph=True)`` traces both
directions without looking inside a kernel.

Gradient structure (why the fast backends only need four primitives): with
``g_hat = g * a'(switches) * scale`` placed at the recorded offsets,

- d x      = render(g, switches, W, scale)           (transposed conv of a sparse map)
- d W      = render_wgrad(x, g, switches, scale)      (weight grad over the recorded offsets)
- d scale  = sum g * a' * conv(x, W)[offsets]         (gather_conv)
- d shift  = sum g * a'
"""

from __future__ import annotations

import numbers
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils import _python_dispatch

from . import backends, reference

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# --------------------------------------------------------------------------- checks


def _shape(t: Tensor) -> str:
    return "x".join(str(s) for s in t.shape) if t.dim() else "scalar"


def _check_tensor(name: str, t, dim: Optional[int] = None) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D, got shape ({_shape(t)})")


def _check_int(name: str, v, lo: int, hi: Optional[int] = None) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    v = int(v)
    if v < lo or (hi is not None and v > hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"{name} must be {rng}, got {v}")
    return v


def _check_slope(negative_slope) -> float:
    if isinstance(negative_slope, bool) or not isinstance(negative_slope, numbers.Real):
        raise TypeError(f"negative_slope must be a float, got {type(negative_slope).__name__}")
    s = float(negative_slope)
    if not 0.0 <= s < 1.0:
        raise ValueError(f"negative_slope must be in [0, 1), got {s}")
    return s


def _check_like(name: str, t: Tensor, ref_name: str, ref: Tensor) -> None:
    if t.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but {ref_name} has dtype {ref.dtype}")
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")


def _check_channel_vector(name: str, t: Optional[Tensor], channels: int, ref: Tensor) -> None:
    if t is None:
        return
    _check_tensor(name, t, 1)
    if t.shape[0] != channels:
        raise ValueError(f"{name} must have {channels} elements (one per output channel of weight), "
                         f"got shape ({_shape(t)})")
    _check_like(name, t, "x", ref)


def _check_conv(x, weight, stride, padding, pool, negative_slope, *, x_name: str = "x"):
    _check_tensor(x_name, x, 4)
    _check_tensor("weight", weight, 4)
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{x_name} must be a floating tensor ({', '.join(map(str, _FLOAT_DTYPES))}), got {x.dtype}")
    _check_like("weight", weight, x_name, x)
    if weight.shape[1] != x.shape[1]:
        raise ValueError(f"weight expects {weight.shape[1]} input channels (shape ({_shape(weight)})) "
                         f"but {x_name} has {x.shape[1]} (shape ({_shape(x)}))")
    stride = _check_int("stride", stride, 1)
    padding = _check_int("padding", padding, 0)
    pool = _check_int("pool", pool, 1, 4)
    negative_slope = _check_slope(negative_slope)
    return stride, padding, pool, negative_slope


def _pooled_size(in_hw: Sequence[int], weight: Tensor, stride: int, padding: int, pool: int,
                 what: str) -> Tuple[Tuple[int, int], Tuple[int, int]]:
    chw = reference.conv_size(tuple(in_hw), tuple(weight.shape[-2:]), stride, padding)
    if min(chw) < 1:
        raise ValueError(f"{what} of spatial size {tuple(in_hw)} with padding {padding} is smaller than the "
                         f"kernel {tuple(weight.shape[-2:])}")
    phw = (chw[0] // pool, chw[1] // pool)
    if min(phw) < 1:
        raise ValueError(f"pooled size is zero: conv output {chw} is smaller than pool={pool} "
                         f"({what} spatial size {tuple(in_hw)}, kernel {tuple(weight.shape[-2:])}, "
                         f"stride {stride}, padding {padding})")
    return chw, phw


def _impl(device: torch.device, op: str):
    return backends.primitive(backends.resolve(device), device, op)


def _channel_sum(t: Tensor) -> Tensor:
    return t.sum(dim=(0, 2, 3))


# --------------------------------------------------------------------------- custom ops with an eager fast path


def _plain_eager(tensors: Sequence[Tensor]) -> bool:
    """Whether a call may skip the torch.library dispatcher: not tracing or compiling, no functorch transform
    (``torch.func.grad``, ``vmap``, ...), no torch function or dispatch mode active (fake tensors,
    ``with torch.device(...)``, ...), only plain dense tensors (``nn.Parameter`` included: it disables
    ``__torch_function__``, so it is a plain tensor to every op)."""
    if torch.compiler.is_compiling() or torch._C._is_torch_function_mode_enabled() or \
            _python_dispatch.is_in_torch_dispatch_mode() or torch._C._are_functorch_transforms_active():
        return False
    return all((type(t) is Tensor or type(t) is torch.nn.Parameter) and not t.is_meta
               and not torch._C._functorch.is_functorch_wrapped_tensor(t) for t in tensors)


class _CustomOp:
    """A ``drmm::`` custom op (fake implementation, autograd) plus an eager fast path to the same code.

    The custom op is what ``torch.compile``, fake tensors, functorch and ``opcheck`` see. In plain eager mode
    its round trip (C++ dispatcher -> Python autograd wrapper -> Python implementation) costs 40-100 us per call,
    which is 5-15 % of the 5-layer MNIST net's small unpooled layers on a CPU (0.6-5 ms ops at batch 256). So
    eager calls run the same implementation directly -- through an ``autograd.Function`` built from the same
    setup and backward when an input needs a gradient. Both paths compute the same thing with the same code.
    """

    def __init__(self, name: str, impl, fake, setup, backward):
        self.impl = impl
        self.op = torch.library.custom_op(f"drmm::{name}", impl, mutates_args=())
        self.op.register_fake(fake)
        self.op.register_autograd(backward, setup_context=setup)

        # Old-style forward(ctx, *args): with a separate setup_context, every apply() binds the arguments through
        # inspect.signature, ~50 us per call.
        def forward(ctx, *args):
            output = impl(*args)
            setup(ctx, args, output)
            return output

        self.function = type(f"{name}_function", (torch.autograd.Function,), {
            "forward": staticmethod(forward), "backward": staticmethod(backward)})

    def __call__(self, *args):
        tensors = [a for a in args if isinstance(a, Tensor)]
        if not _plain_eager(tensors):
            return self.op(*args)
        if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            return self.function.apply(*args)
        return self.impl(*args)


# --------------------------------------------------------------------------- internal ops


def _gather_conv_impl(src: Tensor, weight: Tensor, switches: Tensor, stride: int, padding: int, pool: int) -> Tensor:
    return _impl(src.device, "gather_conv")(src, weight, switches, stride, padding, pool)


def _gather_conv_fake(src, weight, switches, stride, padding, pool):
    return switches.new_empty(switches.shape, dtype=src.dtype)


def _render_wgrad_impl(src: Tensor, mu: Tensor, switches: Tensor, scale: Optional[Tensor], stride: int, padding: int,
                  pool: int, negative_slope: float, kernel_h: int, kernel_w: int) -> Tensor:
    return _impl(src.device, "render_wgrad")(src, mu, switches, scale, stride, padding, pool, negative_slope,
                                             (kernel_h, kernel_w))


def _render_wgrad_fake(src, mu, switches, scale, stride, padding, pool, negative_slope, kernel_h, kernel_w):
    return src.new_empty((mu.shape[1], src.shape[1], kernel_h, kernel_w))


def _all_on(switches: Tensor) -> Tensor:
    """The same offsets with every ``a`` bit set, so an op applies no activation mask."""
    return switches | 0x80


def _gather_setup(ctx, inputs, output):
    src, weight, switches, stride, padding, pool = inputs
    ctx.conf = (stride, padding, pool, src.shape[-2], src.shape[-1])
    ctx.save_for_backward(src, weight, switches)


def _gather_backward(ctx, g):
    # gather_conv is bilinear in (src, weight): its adjoints are the unmasked render and render_wgrad.
    src, weight, switches = ctx.saved_tensors
    stride, padding, pool, h, w = ctx.conf
    on = _all_on(switches)
    g = g.contiguous()
    gsrc = gw = None
    if ctx.needs_input_grad[0]:
        gsrc = _render(g, on, weight, None, stride, padding, pool, h, w, 0.0)
    if ctx.needs_input_grad[1]:
        gw = _render_wgrad(src, g, on, None, stride, padding, pool, 0.0, weight.shape[-2], weight.shape[-1])
    return gsrc, gw, None, None, None, None


_gather_conv = _CustomOp("gather_conv", _gather_conv_impl, _gather_conv_fake, _gather_setup, _gather_backward)


def _mu_scale_grads(src, weight, mu, switches, scale, stride, padding, pool, slope, need_mu, need_scale):
    """Gradients of <conv2d(src, weight), render-map of mu> in mu and scale: the conv read at the recorded
    offsets (gather_conv), times the activation derivative, times scale for mu / mu for scale."""
    at = _masked_values(_gather_conv(src, weight, switches, stride, padding, pool), switches, None, slope)
    gmu = gscale = None
    if need_mu:
        gmu = at if scale is None else at * scale.view(1, -1, 1, 1)
    if need_scale and scale is not None:
        gscale = _channel_sum(at * mu)
    return gmu, gscale


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
        gsrc = _render(mu, switches, gw, scale, stride, padding, pool, h, w, slope)
    if need_mu or need_scale:
        gmu, gscale = _mu_scale_grads(src, gw, mu, switches, scale, stride, padding, pool, slope, need_mu,
                                      need_scale)
    return gsrc, gmu, None, gscale, None, None, None, None, None, None


_render_wgrad = _CustomOp("render_wgrad", _render_wgrad_impl, _render_wgrad_fake, _wgrad_setup, _wgrad_backward)


def _masked_values_impl(mu: Tensor, switches: Tensor, scale: Optional[Tensor], negative_slope: float) -> Tensor:
    return _impl(mu.device, "masked_values")(mu, switches, scale, negative_slope)


def _masked_values_fake(mu, switches, scale, negative_slope):
    return torch.empty_like(mu, memory_format=torch.contiguous_format)


def _masked_values_setup(ctx, inputs, output):
    mu, switches, scale, negative_slope = inputs
    ctx.slope = negative_slope
    ctx.save_for_backward(mu, switches, scale)


def _masked_values_backward(ctx, g):
    mu, switches, scale = ctx.saved_tensors
    g = g.contiguous()
    gmu = _masked_values(g, switches, scale, ctx.slope) if ctx.needs_input_grad[0] else None
    gscale = None
    if ctx.needs_input_grad[2] and scale is not None:
        gscale = _channel_sum(g * _masked_values(mu, switches, None, ctx.slope))
    return gmu, None, gscale, None


_masked_values = _CustomOp("masked_values", _masked_values_impl, _masked_values_fake, _masked_values_setup,
                           _masked_values_backward)


def _unpool_impl(values: Tensor, switches: Tensor, pool: int, out_h: int, out_w: int) -> Tensor:
    return _impl(values.device, "unpool")(values, switches, pool, (out_h, out_w))


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


_unpool = _CustomOp("unpool", _unpool_impl, _unpool_fake, _unpool_setup, _unpool_backward)


# --------------------------------------------------------------------------- conv_relu_pool


def _conv_relu_pool_impl(x: Tensor, weight: Tensor, scale: Optional[Tensor], shift: Optional[Tensor], stride: int,
                    padding: int, pool: int, negative_slope: float) -> Tuple[Tensor, Tensor]:
    return _impl(x.device, "conv_relu_pool")(x, weight, scale, shift, stride, padding, pool, negative_slope)


def _conv_relu_pool_fake(x, weight, scale, shift, stride, padding, pool, negative_slope):
    chw = reference.conv_size(tuple(x.shape[-2:]), tuple(weight.shape[-2:]), stride, padding)
    shape = (x.shape[0], weight.shape[0], chw[0] // pool, chw[1] // pool)
    return x.new_empty(shape), x.new_empty(shape, dtype=torch.uint8)


def _is_pointwise(x: Tensor, weight: Tensor, stride: int, padding: int) -> bool:
    return tuple(weight.shape[-2:]) == (1, 1) and stride == 1 and padding == 0 and x.is_contiguous()


def _pointwise_conv_backward(gz: Tensor, x: Tensor, weight: Tensor, need_x: bool, need_w: bool, need_b: bool):
    """``convolution_backward`` of a 1x1, stride-1, unpadded conv of NCHW ``x`` as batched matrix products.

    oneDNN's conv backward reorders NCHW into its blocked layout first; the products skip that, like the cpu
    backend's forward (csrc/cpu/cpu_ops.h, is_pointwise). The weight gradient sums per-sample products when
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


def _bn_pointwise(x: Tensor, weight: Tensor, stride: int, padding: int) -> bool:
    """Whether the batch-norm op runs its conv and the conv's backward as batched matrix products (1x1 on CPU)."""
    return x.device.type == "cpu" and _is_pointwise(x, weight, stride, padding)


def _bn_conv(x: Tensor, weight: Tensor, stride: int, padding: int) -> Tensor:
    """The batch-norm op's materialized conv output (see _bn_pointwise)."""
    if _bn_pointwise(x, weight, stride, padding):
        n, ci, h, w = x.shape
        co = weight.shape[0]
        return torch.bmm(weight.reshape(co, ci).expand(n, co, ci), x.reshape(n, ci, h * w)).view(n, co, h, w)
    return F.conv2d(x, weight, None, stride, padding)


def _crp_setup(ctx, inputs, output):
    x, weight, scale, shift, stride, padding, pool, negative_slope = inputs
    ctx.conf = (stride, padding, pool, negative_slope)
    ctx.has_shift = shift is not None
    ctx.save_for_backward(x, weight, scale, output[1])
    ctx.mark_non_differentiable(output[1])
    # The switches' gradient is ignored: autograd need not build a zero tensor for it on every backward.
    ctx.set_materialize_grads(False)


def _crp_backward(ctx, gy, _gsw):
    if gy is None:
        return None, None, None, None, None, None, None, None
    x, weight, scale, switches = ctx.saved_tensors
    stride, padding, pool, slope = ctx.conf
    need_x, need_w, need_scale, need_shift = ctx.needs_input_grad[:4]
    gx = gw = gscale = gshift = None
    gy = gy.contiguous()
    gact = None
    if pool == 1 and (need_x or need_w):
        # No pooling, no sparsity to exploit: mask once (one pass over the uint8 switches), then one dense
        # convolution backward for dx, dW and -- without a scale -- the shift gradient, which is its bias
        # gradient: the same work eager autograd does after its ReLU backward.
        gact = _masked_values(gy, switches, None, slope)
        gz = gact if scale is None else gact * scale.view(1, -1, 1, 1)
        bias_grad = bool(need_shift and ctx.has_shift and scale is None)
        if _is_pointwise(x, weight, stride, padding):
            gx, gw, gb = _pointwise_conv_backward(gz, x, weight, need_x, need_w, bias_grad)
        else:
            gx, gw, gb = torch.ops.aten.convolution_backward(
                gz, x, weight, [weight.shape[0]] if bias_grad else None, [stride, stride], [padding, padding],
                [1, 1], False, [0, 0], 1, [need_x, need_w, bias_grad])
        if bias_grad:
            gshift, need_shift = gb, False
    else:
        if need_x:
            gx = _render(gy, switches, weight, scale, stride, padding, pool, x.shape[-2], x.shape[-1], slope)
        if need_w:
            gw = _render_wgrad(x, gy, switches, scale, stride, padding, pool, slope, weight.shape[-2],
                               weight.shape[-1])
    if need_scale or need_shift:
        if gact is None:
            gact = _masked_values(gy, switches, None, slope)
        if need_shift and ctx.has_shift:
            gshift = _channel_sum(gact)
        if need_scale and scale is not None:
            gscale = _channel_sum(gact * _gather_conv(x, weight, switches, stride, padding, pool))
    return gx, gw, gscale, gshift, None, None, None, None


_conv_relu_pool = _CustomOp("conv_relu_pool", _conv_relu_pool_impl, _conv_relu_pool_fake, _crp_setup, _crp_backward)


def conv_relu_pool(x: Tensor, weight: Tensor, scale: Optional[Tensor] = None, shift: Optional[Tensor] = None, *,
                   stride: int = 1, padding: int = 0, pool: int = 2,
                   negative_slope: float = 0.0) -> Tuple[Tensor, Tensor]:
    """Fused ``act(max_pool(conv2d(x, weight) * scale + shift))`` that also records the switches.

    Returns ``(y, switches)``: ``y`` has shape ``(N, C_out, H_conv // pool, W_conv // pool)``;
    ``switches`` is ``uint8`` of the same shape, bits 0-3 the row-major offset of the window
    argmax (first maximum on ties, NaN wins) and bit 7 the ``a`` switch (window max > 0).

    >>> x, w = torch.randn(2, 3, 8, 8), torch.randn(4, 3, 3, 3)
    >>> y, sw = conv_relu_pool(x, w, padding=1)
    >>> y.shape, sw.dtype
    (torch.Size([2, 4, 4, 4]), torch.uint8)
    """
    stride, padding, pool, negative_slope = _check_conv(x, weight, stride, padding, pool, negative_slope)
    _check_channel_vector("scale", scale, weight.shape[0], x)
    _check_channel_vector("shift", shift, weight.shape[0], x)
    _pooled_size(x.shape[-2:], weight, stride, padding, pool, "x")
    return _conv_relu_pool(x, weight, scale, shift, stride, padding, pool, negative_slope)


# --------------------------------------------------------------------------- render


def _render_impl(mu: Tensor, switches: Tensor, weight: Tensor, scale: Optional[Tensor], stride: int, padding: int,
            pool: int, out_h: int, out_w: int, negative_slope: float) -> Tensor:
    return _impl(mu.device, "render")(mu, switches, weight, scale, stride, padding, pool, (out_h, out_w),
                                      negative_slope)


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
        gmu, gscale = _mu_scale_grads(gout, weight, mu, switches, scale, stride, padding, pool, slope, need_mu,
                                      need_scale)
    if need_w:
        gw = _render_wgrad(gout, mu, switches, scale, stride, padding, pool, slope, weight.shape[-2],
                           weight.shape[-1])
    return gmu, None, gw, gscale, None, None, None, None, None, None


_render = _CustomOp("render", _render_impl, _render_fake, _render_setup, _render_backward)


def _check_switches(switches, mu: Tensor) -> None:
    _check_tensor("switches", switches, 4)
    if switches.dtype != torch.uint8:
        raise TypeError(f"switches must be torch.uint8, got {switches.dtype}")
    if switches.shape != mu.shape:
        raise ValueError(f"switches shape ({_shape(switches)}) does not match mu shape ({_shape(mu)})")
    if switches.device != mu.device:
        raise ValueError(f"switches is on {switches.device} but mu is on {mu.device}")


def _check_out_size(out_size) -> Tuple[int, int]:
    if isinstance(out_size, torch.Size) or isinstance(out_size, (tuple, list)):
        if len(out_size) == 4:  # a full shape (N, C, H, W) is accepted too
            out_size = tuple(out_size)[-2:]
        if len(out_size) == 2:
            return (_check_int("out_size[0]", out_size[0], 1), _check_int("out_size[1]", out_size[1], 1))
    raise ValueError(f"out_size must be (H, W) of the layer's input, got {out_size!r}")


def render(mu: Tensor, switches: Tensor, weight: Tensor, scale: Optional[Tensor] = None, *, stride: int = 1,
           padding: int = 0, pool: int = 2, out_size, negative_slope: float = 0.0) -> Tensor:
    """Top-down pass: unpool ``mu`` at the recorded offsets, mask by ``a``, scale, transposed conv.

    ``out_size`` is the (H, W) of the bottom-up layer's input. With ``scale`` given this is the
    input gradient of :func:`conv_relu_pool` for upstream gradient ``mu``.

    >>> x, w = torch.randn(2, 3, 8, 8), torch.randn(4, 3, 3, 3)
    >>> y, sw = conv_relu_pool(x, w, padding=1)
    >>> render(y, sw, w, padding=1, out_size=(8, 8)).shape
    torch.Size([2, 3, 8, 8])
    """
    _check_tensor("mu", mu, 4)
    if mu.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"mu must be a floating tensor, got {mu.dtype}")
    _check_tensor("weight", weight, 4)
    _check_like("weight", weight, "mu", mu)
    if weight.shape[0] != mu.shape[1]:
        raise ValueError(f"weight has {weight.shape[0]} output channels (shape ({_shape(weight)})) but mu has "
                         f"{mu.shape[1]} channels (shape ({_shape(mu)}))")
    _check_switches(switches, mu)
    stride = _check_int("stride", stride, 1)
    padding = _check_int("padding", padding, 0)
    pool = _check_int("pool", pool, 1, 4)
    negative_slope = _check_slope(negative_slope)
    if scale is not None:
        _check_channel_vector("scale", scale, weight.shape[0], mu)
    out_hw = _check_out_size(out_size)
    _, phw = _pooled_size(out_hw, weight, stride, padding, pool, "out_size")
    if phw != tuple(mu.shape[-2:]):
        raise ValueError(f"out_size {out_hw} gives pooled size {phw} with kernel {tuple(weight.shape[-2:])}, "
                         f"stride {stride}, padding {padding}, pool {pool}, but mu has spatial size "
                         f"{tuple(mu.shape[-2:])} (shape ({_shape(mu)}))")
    return _render(mu, switches, weight, scale, stride, padding, pool, out_hw[0], out_hw[1], negative_slope)


# --------------------------------------------------------------------------- conv_bn_relu_pool


def _bn_forward_generic(x, weight, bn_weight, bn_bias, running_mean, running_var, training, eps, stride, padding,
                        pool, slope, bn_pool, batch_stats):
    """Materialized conv output, batch statistics, then the fused normalize-act-pool-switch epilogue."""
    z = _bn_conv(x, weight, stride, padding)
    if training:
        mean, var = batch_stats(z)
    else:
        acc = torch.promote_types(z.dtype, torch.float32)
        mean, var = running_mean.to(acc, copy=True), running_var.to(acc, copy=True)
    scale = torch.rsqrt(var + eps)
    if bn_weight is not None:
        scale = scale * bn_weight
    shift = -mean * scale
    if bn_bias is not None:
        shift = shift + bn_bias
    y, sw = bn_pool(z, scale.to(z.dtype), shift.to(z.dtype), pool, slope)
    return y, sw, mean.to(x.dtype), var.to(x.dtype), z.contiguous() if training else z.new_empty(0)


def _conv_bn_relu_pool_impl(x: Tensor, weight: Tensor, bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
                       running_mean: Optional[Tensor], running_var: Optional[Tensor], training: bool, eps: float,
                       stride: int, padding: int, pool: int,
                       negative_slope: float) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    name = backends.resolve(x.device)
    if name == "reference":
        return reference.conv_bn_relu_pool(x, weight, bn_weight, bn_bias, running_mean, running_var, training,
                                           eps, stride, padding, pool, negative_slope)
    return _bn_forward_generic(x, weight, bn_weight, bn_bias, running_mean, running_var, training, eps, stride,
                               padding, pool, negative_slope, backends.primitive(name, x.device, "bn_pool"),
                               backends.primitive(name, x.device, "batch_stats"))


def _conv_bn_relu_pool_fake(x, weight, bn_weight, bn_bias, running_mean, running_var, training, eps, stride, padding,
                            pool, negative_slope):
    chw = reference.conv_size(tuple(x.shape[-2:]), tuple(weight.shape[-2:]), stride, padding)
    shape = (x.shape[0], weight.shape[0], chw[0] // pool, chw[1] // pool)
    c = weight.shape[0]
    z_shape = (x.shape[0], c, *chw) if training else (0,)
    return (x.new_empty(shape), x.new_empty(shape, dtype=torch.uint8), x.new_empty((c,)), x.new_empty((c,)),
            x.new_empty(z_shape))


def _bn_setup(ctx, inputs, output):
    x, weight, bn_weight, bn_bias, running_mean, running_var, training, eps, stride, padding, pool, slope = inputs
    ctx.conf = (training, eps, stride, padding, pool, slope)
    ctx.has_bias = bn_bias is not None
    ctx.save_for_backward(x, weight, bn_weight, output[1], output[2], output[3], output[4])
    ctx.mark_non_differentiable(output[1], output[2], output[3], output[4])
    # Only y's gradient is used; materializing the others would fill a zero z (full conv size) per backward.
    ctx.set_materialize_grads(False)


def _bn_backward(ctx, gy, _gsw, _gmean, _gvar, _gz):
    if gy is None:
        return (None,) * 12
    x, weight, bn_weight, switches, mean, var, z = ctx.saved_tensors
    training, eps, stride, padding, pool, slope = ctx.conf
    need_x, need_w, need_gamma, need_beta = ctx.needs_input_grad[:4]
    gy = gy.contiguous()
    acc = torch.promote_types(x.dtype, torch.float32)
    invstd = torch.rsqrt(var.to(acc) + eps)
    gamma = bn_weight.to(acc) if bn_weight is not None else torch.ones_like(invstd)
    gact = _masked_values(gy.to(acc), switches, None, slope)         # dL/dv at each window max
    gx = gw = ggamma = gbeta = None
    if training:
        # The batch statistics couple every position, so this backward is dense: scatter dL/dv to the recorded
        # offsets and let ATen's fused batch-norm and convolution backward kernels finish. z is saved by the
        # forward (training only): recomputing it cost a whole convolution, ~25% of the layer's training step on
        # a 2-core CPU (measured, conv_small layer 2, batch 64), and saving it still keeps less than half of eager's
        # saved activations (eager keeps z, the ReLU output and int64 indices).
        if torch.is_grad_enabled():
            # A double backward: the saved z is detached, so recompute it from x and the weight for the graph to
            # reach them (batch norm's own double backward treats the statistics as functions of z).
            z = _bn_conv(x, weight, stride, padding)
        dv = gact.to(z.dtype)
        if pool > 1:  # (without pooling every position is a window max: nothing to scatter)
            dv = _unpool(dv, switches, pool, z.shape[-2], z.shape[-1])
        # The weight in the statistics' dtype: ATen's mixed-precision path (half z, float statistics) needs them alike.
        dz, ggamma_, gbeta_ = torch.ops.aten.native_batch_norm_backward(
            dv, z, bn_weight.to(acc) if bn_weight is not None else None, None, None, mean.to(acc), invstd, True, eps,
            [need_x or need_w, True, True])
        s1, s2 = gbeta_, ggamma_  # = sum of dL/dv, and of dL/dv * xhat, per channel
        if (need_x or need_w) and _bn_pointwise(x, weight, stride, padding):
            gx, gw, _ = _pointwise_conv_backward(dz, x, weight, need_x, need_w, False)
        elif need_x or need_w:
            gx, gw, _ = torch.ops.aten.convolution_backward(
                dz, x, weight, None, [stride, stride], [padding, padding], [1, 1], False, [0, 0], 1,
                [need_x, need_w, False])
    else:
        s1 = _channel_sum(gact)                                      # = d beta
        scale = (gamma * invstd).to(x.dtype)
        if need_x:
            gx = _render(gy, switches, weight, scale, stride, padding, pool, x.shape[-2], x.shape[-1], slope)
        if need_w:
            gw = _render_wgrad(x, gy, switches, scale, stride, padding, pool, slope, weight.shape[-2],
                               weight.shape[-1])
        if need_gamma and bn_weight is not None:
            z_at = _gather_conv(x, weight, switches, stride, padding, pool).to(acc)
            s2 = _channel_sum(gact * (z_at - mean.to(acc).view(1, -1, 1, 1)) * invstd.view(1, -1, 1, 1))
    if need_gamma and bn_weight is not None:
        ggamma = s2.to(bn_weight.dtype)
    if need_beta and ctx.has_bias:
        gbeta = s1.to(x.dtype)
    return gx, gw, ggamma, gbeta, None, None, None, None, None, None, None, None


_conv_bn_relu_pool = _CustomOp("conv_bn_relu_pool", _conv_bn_relu_pool_impl, _conv_bn_relu_pool_fake, _bn_setup,
                               _bn_backward)


def conv_bn_relu_pool(x: Tensor, weight: Tensor, bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
                      running_mean: Optional[Tensor], running_var: Optional[Tensor], *, training: bool,
                      momentum: float = 0.1, eps: float = 1e-5, stride: int = 1, padding: int = 0, pool: int = 2,
                      negative_slope: float = 0.0) -> Tuple[Tensor, Tensor]:
    """``conv2d`` → ``batch_norm`` (as ``F.batch_norm`` computes it) → activation → max-pool with switches.

    In training mode the batch statistics are used, gradients flow through them, and
    ``running_mean``/``running_var`` (when given) are updated in place like ``F.batch_norm``.
    In eval mode the running statistics are folded into a per-channel scale and shift.
    """
    stride, padding, pool, negative_slope = _check_conv(x, weight, stride, padding, pool, negative_slope)
    c = weight.shape[0]
    for name, t in (("bn_weight", bn_weight), ("bn_bias", bn_bias), ("running_mean", running_mean),
                    ("running_var", running_var)):
        _check_channel_vector(name, t, c, x)
    if not isinstance(training, bool):
        raise TypeError(f"training must be a bool, got {type(training).__name__}")
    if not training and (running_mean is None or running_var is None):
        raise ValueError("running_mean and running_var are required when training=False")
    if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real) or not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be a float in [0, 1], got {momentum!r}")
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or eps < 0:
        raise ValueError(f"eps must be a non-negative float, got {eps!r}")
    chw, _ = _pooled_size(x.shape[-2:], weight, stride, padding, pool, "x")
    if training and x.shape[0] * chw[0] * chw[1] < 2:
        raise ValueError(f"training-mode batch norm needs more than one value per channel, got x of shape "
                         f"({_shape(x)}) with conv output {chw}")
    y, sw, mean, var, _ = _conv_bn_relu_pool(x, weight, bn_weight, bn_bias, running_mean, running_var, training,
                                          float(eps), stride, padding, pool, negative_slope)
    if training and running_mean is not None and running_var is not None:
        m = x.shape[0] * chw[0] * chw[1]
        with torch.no_grad():
            running_mean.mul_(1 - momentum).add_(mean.detach(), alpha=momentum)
            running_var.mul_(1 - momentum).add_(var.detach() * (m / (m - 1)), alpha=momentum)
    return y, sw


# --------------------------------------------------------------------------- switches_to_indices


def switches_to_indices(switches: Tensor, *, pool: int, conv_size) -> Tensor:
    """PyTorch ``max_pool2d`` flat indices (int64) into the ``conv_size`` = (H_conv, W_conv) map.

    >>> sw = torch.tensor([[[[0x83]]]], dtype=torch.uint8)  # offset 3 = (1, 1), on
    >>> switches_to_indices(sw, pool=2, conv_size=(2, 2)).item()
    3
    """
    _check_tensor("switches", switches)
    if switches.dtype != torch.uint8:
        raise TypeError(f"switches must be torch.uint8, got {switches.dtype}")
    if switches.dim() < 2:
        raise ValueError(f"switches must have at least 2 dims (..., H, W), got shape ({_shape(switches)})")
    pool = _check_int("pool", pool, 1, 4)
    if not isinstance(conv_size, (tuple, list, torch.Size)) or len(conv_size) != 2:
        raise ValueError(f"conv_size must be (H_conv, W_conv), got {conv_size!r}")
    hc = _check_int("conv_size[0]", conv_size[0], 1)
    wc = _check_int("conv_size[1]", conv_size[1], 1)
    if hc // pool != switches.shape[-2] or wc // pool != switches.shape[-1]:
        raise ValueError(f"conv_size {(hc, wc)} with pool {pool} gives pooled size {(hc // pool, wc // pool)}, "
                         f"but switches has shape ({_shape(switches)})")
    return reference.switches_to_indices(switches, pool, (hc, wc))
