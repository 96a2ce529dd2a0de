"""Drop-in ``nn.Module``s built on the fused ops.

``FusedConvReLUPool2d`` replaces ``nn.Sequential(nn.Conv2d, nn.ReLU, nn.MaxPool2d(2))`` and keeps
``Conv2d``'s parameter names, so a ``Conv2d`` state_dict loads into it unchanged.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch
from torch import Tensor, nn

from . import dispatch, ops
from .fusion_rules import Match, Refusal, SequentialView, match, reason

_IntPair = Union[int, Tuple[int, int]]


def _single(name: str, v: _IntPair, where: str) -> int:
    if isinstance(v, (tuple, list)):
        if len(set(v)) != 1:
            raise ValueError(f"{where}: {name}={tuple(v)} is not square; the fused ops take one value for both axes")
        v = v[0]
    return int(v)


class _PoolWindow:
    """The max-pool of a fused block: ``pool`` (kernel size, 1 = no pooling), ``pool_stride`` (default ``pool``),
    ``pool_padding`` and ``ceil_mode``, as ``nn.MaxPool2d`` takes them (docs/ops.md#pooling)."""

    def _set_window(self, pool: int, pool_stride: Optional[int] = None, pool_padding: int = 0, ceil_mode=False):
        self.pool, self.pool_padding, self.ceil_mode = pool, pool_padding, bool(ceil_mode)
        self.pool_stride = pool if pool_stride is None else pool_stride

    @property
    def pool_window(self) -> dict:
        """The pool arguments of the ops (blocks saved before they existed pool in non-overlapping windows)."""
        return dict(
            pool=self.pool,
            pool_stride=getattr(self, "pool_stride", self.pool),
            pool_padding=getattr(self, "pool_padding", 0),
            ceil_mode=getattr(self, "ceil_mode", False),
        )

    def _window_repr(self) -> str:
        w = self.pool_window
        extra = "" if w["pool_stride"] == w["pool"] else f", pool_stride={w['pool_stride']}"
        extra += f", pool_padding={w['pool_padding']}" if w["pool_padding"] else ""
        extra += ", ceil_mode=True" if w["ceil_mode"] else ""
        return f"pool={w['pool']}{extra}"


class FusedConvReLUPool2d(_PoolWindow, nn.Module):
    """``MaxPool2d(pool, pool_stride, pool_padding, ceil_mode)(act(Conv2d(x)))`` in one op, optionally returning
    the switches.

    Args mirror ``nn.Conv2d`` (square kernel/stride/padding, no groups or dilation) plus the pool (``pool``:
    kernel size, 1 = no pooling; ``pool_stride``, default ``pool``; ``pool_padding``; ``ceil_mode``), ``negative_slope``
    (0 = ReLU) and ``return_switches`` (default for ``forward``).

    >>> layer = FusedConvReLUPool2d(3, 8, 3, padding=1)
    >>> y, switches = layer(torch.randn(2, 3, 16, 16), return_switches=True)
    >>> y.shape, switches.shape
    (torch.Size([2, 8, 8, 8]), torch.Size([2, 8, 8, 8]))
    """

    attribution_block = True  # drmm_kernels.attribution applies its rule to this block's ReLU
    drmm_kernels_fused = True  # never a member of a chain drmm_kernels.fusion_rules matches

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: _IntPair,
        stride: _IntPair = 1,
        padding: _IntPair = 0,
        bias: bool = True,
        pool: int = 2,
        negative_slope: float = 0.0,
        return_switches: bool = False,
        device=None,
        dtype=None,
        pool_stride: Optional[int] = None,
        pool_padding: int = 0,
        ceil_mode: bool = False,
    ) -> None:
        super().__init__()
        k = _single("kernel_size", kernel_size, type(self).__name__)
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, k
        self.stride = _single("stride", stride, type(self).__name__)
        self.padding = _single("padding", padding, type(self).__name__)
        self._set_window(pool, pool_stride, pool_padding, ceil_mode)
        self.negative_slope, self.return_switches = float(negative_slope), return_switches
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, k, k, **factory))
        self.bias = nn.Parameter(torch.empty(out_channels, **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Same initialisation as nn.Conv2d, so swapping modules does not change a fresh model's statistics.
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.weight[0].numel())
            nn.init.uniform_(self.bias, -bound, bound)

    @classmethod
    def from_modules(
        cls, conv: nn.Conv2d, act: nn.Module, pool: Optional[nn.Module], where: str = ""
    ) -> "FusedConvReLUPool2d":
        """Build a fused layer holding ``conv``'s parameters (shared, not copied) for ``conv → act → [pool]``;
        ``ValueError`` with the reason where the fused ops cannot compute that chain (``drmm_kernels.fusion_rules``)."""
        where = where or "from_modules"
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"{where}: expected nn.Conv2d, got {type(conv).__name__}")
        mods = [(n, m) for n, m in (("conv", conv), ("act", act), ("pool", pool)) if m is not None]
        view = SequentialView(where, mods)
        found = match(view, 0)
        if isinstance(found, Match) and found.left_out is not None:
            found = found.left_out
        if isinstance(found, Refusal):
            raise ValueError(f"{where}: {found.reason}")
        if len(found.elems) != len(mods) or found.bn is not None:
            chain = " -> ".join(view.member(i).desc for i in range(len(mods)))
            raise ValueError(f"{where}: {reason('not_one_chain', chain=chain)}")
        kh, kw = conv.kernel_size
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.in_channels, layer.out_channels = conv.in_channels, conv.out_channels
        layer.kernel_size = kh if kh == kw else (kh, kw)
        layer.stride, layer.padding = conv.stride[0], found.padding
        layer._set_window(**found.pool_window)
        layer.negative_slope, layer.return_switches = found.slope, False
        layer.weight = conv.weight
        layer.bias = conv.bias
        return layer

    def forward(self, x: Tensor, return_switches: Optional[bool] = None):
        y, switches = ops.conv_relu_pool(
            x,
            self.weight,
            None,
            self.bias,
            stride=self.stride,
            padding=self.padding,
            negative_slope=self.negative_slope,
            **self.pool_window,
        )
        want = self.return_switches if return_switches is None else return_switches
        return (y, switches) if want else y

    def render(self, mu: Tensor, switches: Tensor, out_size) -> Tensor:
        """Top-down pass through this layer's raw weight (no bias, no scale)."""
        return ops.render(
            mu,
            switches,
            self.weight,
            stride=self.stride,
            padding=self.padding,
            out_size=out_size,
            negative_slope=self.negative_slope,
            **self.pool_window,
        )

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, bias={self.bias is not None}, {self._window_repr()}, "
            f"negative_slope={self.negative_slope}"
        )


class FusedConvBNReLUPool2d(_PoolWindow, nn.Module):
    """``Conv2d(bias=False) → BatchNorm2d → act → MaxPool2d(pool, pool_stride, pool_padding, ceil_mode)`` in one op,
    with switches.

    Parameter and buffer names follow ``conv.weight`` / ``bn.*`` so the two source modules'
    state_dicts map onto it directly.

    >>> block = FusedConvBNReLUPool2d(3, 8, 3, padding=1)
    >>> y, switches = block(torch.randn(4, 3, 16, 16), return_switches=True)   # training mode: batch statistics
    >>> y.shape, int(block.bn.num_batches_tracked)
    (torch.Size([4, 8, 8, 8]), 1)
    >>> block.render(y, switches, out_size=(16, 16)).shape
    torch.Size([4, 3, 16, 16])
    """

    attribution_block = True  # drmm_kernels.attribution applies its rule to this block's ReLU
    drmm_kernels_fused = True  # never a member of a chain drmm_kernels.fusion_rules matches

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        pool: int = 2,
        negative_slope: float = 0.0,
        momentum: float = 0.1,
        eps: float = 1e-5,
        return_switches: bool = False,
        device=None,
        dtype=None,
        pool_stride: Optional[int] = None,
        pool_padding: int = 0,
        ceil_mode: bool = False,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, bias=False, **factory)
        self.bn = nn.BatchNorm2d(out_channels, eps=eps, momentum=momentum, **factory)
        self._set_window(pool, pool_stride, pool_padding, ceil_mode)
        self.negative_slope, self.return_switches = float(negative_slope), return_switches

    def forward(self, x: Tensor, return_switches: Optional[bool] = None, shift: Optional[Tensor] = None):
        """``shift`` (per channel, optional) is added after the normalisation, on top of the BN bias: an extra
        learned bias such as NRM's BiasAdder; gradients reach it like the BN bias."""
        bn = self.bn
        if bn.training and bn.track_running_stats and dispatch.fx_proxies(x):
            raise TypeError(  # before num_batches_tracked.add_, which a tracer would run on the real buffer
                "drmm_kernels.FusedConvBNReLUPool2d cannot be traced by torch.fx in training mode: its running "
                "statistics would be updated once while tracing instead of at every call; trace it in eval mode"
            )
        bias = bn.bias
        if shift is not None:
            if shift.dim() != 1 or shift.shape[0] != bn.num_features:
                raise ValueError(f"shift must have shape ({bn.num_features},), got {tuple(shift.shape)}")
            bias = shift if bias is None else bias + shift
        training = bn.training or bn.running_mean is None
        momentum = bn.momentum if bn.momentum is not None else 0.0  # unused unless running stats update
        if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
            bn.num_batches_tracked.add_(1)
            if bn.momentum is None:  # cumulative moving average, as nn.BatchNorm2d does
                momentum = 1.0 / float(bn.num_batches_tracked)
        y, switches = ops.conv_bn_relu_pool(
            x,
            self.conv.weight,
            bn.weight,
            bias,
            bn.running_mean if bn.track_running_stats else None,
            bn.running_var if bn.track_running_stats else None,
            training=training,
            momentum=momentum,
            eps=bn.eps,
            stride=self.conv.stride[0],
            padding=self.conv.padding[0],
            negative_slope=self.negative_slope,
            **self.pool_window,
        )
        want = self.return_switches if return_switches is None else return_switches
        return (y, switches) if want else y

    def render(self, mu: Tensor, switches: Tensor, out_size) -> Tensor:
        """Top-down pass through the raw conv weight (the BN is not inverted)."""
        return ops.render(
            mu,
            switches,
            self.conv.weight,
            stride=self.conv.stride[0],
            padding=self.conv.padding[0],
            out_size=out_size,
            negative_slope=self.negative_slope,
            **self.pool_window,
        )


class Render2d(nn.Module):
    """Renders top-down through a fused layer's weight (tied; the weight is not copied or registered twice).

    >>> layer = FusedConvReLUPool2d(3, 8, 3, padding=1)
    >>> x = torch.randn(2, 3, 16, 16)
    >>> y, sw = layer(x, return_switches=True)
    >>> Render2d(layer)(y, sw, out_size=x.shape[-2:]).shape
    torch.Size([2, 3, 16, 16])
    """

    def __init__(self, layer: Union[FusedConvReLUPool2d, FusedConvBNReLUPool2d]) -> None:
        super().__init__()
        if not isinstance(layer, (FusedConvReLUPool2d, FusedConvBNReLUPool2d)):
            raise TypeError(f"layer must be a FusedConvReLUPool2d or FusedConvBNReLUPool2d, got {type(layer).__name__}")
        object.__setattr__(self, "layer", layer)  # not a submodule: its parameters belong to the bottom-up model

    def forward(self, mu: Tensor, switches: Tensor, out_size) -> Tensor:
        return self.layer.render(mu, switches, out_size)
