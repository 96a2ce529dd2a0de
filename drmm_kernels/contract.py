"""The op contract's shared definitions (docs/ops.md): the switch byte, the layer geometry, and the argument
checks of the public ops. The only Python definition of each; the C++/CUDA ones are csrc/common/*.h.

Every check raises one line in the package's style, ``drmm_kernels.<op>: <argument> ...``, with ``TypeError``
for a wrong type or dtype and ``ValueError`` for a wrong value or shape.
"""

from __future__ import annotations

import numbers
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

# --------------------------------------------------------------------------- the switch byte

#: Bit 7: the ``a`` switch, set where the window's maximum (after scale and shift) is > 0.
ON_BIT = 0x80
#: Bits 0-3: the row-major offset ``dy * pool + dx`` of the window's maximum, counted from the window's first row
#: and column (which lie in the padding for a padded pool's border windows). Bits 4-6 are zero.
OFFSET_MASK = 0x0F
#: Largest pooling window the byte can encode (offsets 0..15).
MAX_POOL = 4

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# --------------------------------------------------------------------------- geometry


def conv_size(in_size: Sequence[int], kernel: Sequence[int], stride: int, padding: int) -> Tuple[int, int]:
    """Spatial size of ``conv2d``'s output for the given input size (< 1 when the kernel does not fit)."""
    return tuple((s + 2 * padding - k) // stride + 1 for s, k in zip(in_size, kernel))  # type: ignore[return-value]


def pooled_size(
    conv_hw: Sequence[int], pool: int, pool_stride: Optional[int] = None, pool_padding: int = 0, ceil_mode: bool = False
) -> Tuple[int, int]:
    """``max_pool2d``'s output size: ``pool x pool`` windows every ``pool_stride`` (default ``pool``: non-overlapping)
    over the map padded by ``pool_padding``; in floor mode trailing rows and columns that do not fill a window are
    dropped, in ceil mode a last partial window is kept unless it would start in the right / bottom padding."""
    s = pool if pool_stride is None else pool_stride
    return tuple(_pooled_len(n, pool, s, pool_padding, ceil_mode) for n in conv_hw)  # type: ignore[return-value]


def _pooled_len(n: int, k: int, s: int, p: int, ceil_mode: bool) -> int:
    # PyTorch's pooling_output_shape (floor division, as its div_rtn); a ceil-mode window may overhang the map
    out = (n + 2 * p - k + (s - 1 if ceil_mode else 0)) // s + 1
    if ceil_mode and (out - 1) * s >= n + p:
        out -= 1
    return max(out, 0)


def plain_pool(pool: int) -> dict:
    """The pool arguments of non-overlapping ``pool x pool`` windows (the default of every op)."""
    return dict(pool=pool, pool_stride=pool, pool_padding=0, ceil_mode=False)


#: The arguments that describe a pool window, in schema order.
WINDOW = ("pool", "pool_stride", "pool_padding", "ceil_mode")


def window_of(arguments: dict) -> dict:
    """The pool-window arguments of an op's argument dict (to pass on with ``**``)."""
    return {k: arguments[k] for k in WINDOW}


# --------------------------------------------------------------------------- checks


class Checker:
    """Argument checks of one op; every message starts with ``drmm_kernels.<op>: ``."""

    def __init__(self, op: str):
        self.op = op

    def type_error(self, msg: str) -> TypeError:
        return TypeError(f"drmm_kernels.{self.op}: {msg}")

    def value_error(self, msg: str) -> ValueError:
        return ValueError(f"drmm_kernels.{self.op}: {msg}")

    def tensor(self, name: str, t, dim: Optional[int] = None) -> None:
        if not isinstance(t, Tensor):
            raise self.type_error(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if dim is not None and t.dim() != dim:
            raise self.value_error(f"{name} must be {dim}-D, got shape ({shape_str(t)})")

    def floating(self, name: str, t: Tensor) -> None:
        if t.dtype not in FLOAT_DTYPES:
            raise self.type_error(
                f"{name} must be a floating tensor ({', '.join(map(str, FLOAT_DTYPES))}), got {t.dtype}"
            )

    def integer(self, name: str, v, lo: int, hi: Optional[int] = None) -> int:
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise self.type_error(f"{name} must be an int, got {type(v).__name__}")
        v = int(v)
        if v < lo or (hi is not None and v > hi):
            rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
            raise self.value_error(f"{name} must be {rng}, got {v}")
        return v

    def slope(self, negative_slope) -> float:
        if isinstance(negative_slope, bool) or not isinstance(negative_slope, numbers.Real):
            raise self.type_error(f"negative_slope must be a float, got {type(negative_slope).__name__}")
        s = float(negative_slope)
        if not 0.0 <= s < 1.0:
            raise self.value_error(f"negative_slope must be in [0, 1), got {s}")
        return s

    def like(self, name: str, t: Tensor, ref_name: str, ref: Tensor) -> None:
        if t.dtype != ref.dtype:
            raise self.type_error(f"{name} has dtype {t.dtype} but {ref_name} has dtype {ref.dtype}")
        if t.device != ref.device:
            raise self.value_error(f"{name} is on {t.device} but {ref_name} is on {ref.device}")

    def channel_vector(self, name: str, t: Optional[Tensor], channels: int, ref_name: str, ref: Tensor) -> None:
        if t is None:
            return
        self.tensor(name, t, 1)
        if t.shape[0] != channels:
            raise self.value_error(
                f"{name} must have {channels} elements (one per output channel of weight), got shape ({shape_str(t)})"
            )
        self.like(name, t, ref_name, ref)

    def layer(self, stride, padding, pool, negative_slope) -> Tuple[int, int, int, float]:
        """The hyper-parameters every op takes, as (int, int, int, float)."""
        return (
            self.integer("stride", stride, 1),
            self.integer("padding", padding, 0),
            self.integer("pool", pool, 1, MAX_POOL),
            self.slope(negative_slope),
        )

    def window(self, pool: int, pool_stride, pool_padding, ceil_mode) -> dict:
        """The pool-window arguments (``WINDOW``) checked against the (already checked) ``pool``, as ``max_pool2d``
        takes them (``pool_stride`` None means ``pool``), as a dict to pass on with ``**``."""
        pool_stride = pool if pool_stride is None else self.integer("pool_stride", pool_stride, 1, pool)
        pool_padding = self.integer("pool_padding", pool_padding, 0)
        if pool_padding > pool // 2:
            raise self.value_error(
                f"pool_padding must be at most pool // 2 = {pool // 2} (pool={pool}), got {pool_padding}"
            )
        if not isinstance(ceil_mode, bool):
            raise self.type_error(f"ceil_mode must be a bool, got {type(ceil_mode).__name__}")
        return dict(pool=pool, pool_stride=pool_stride, pool_padding=pool_padding, ceil_mode=ceil_mode)

    def conv_input(self, x_name: str, x, weight) -> None:
        """A 4-D floating input and a weight of its dtype, device and channel count."""
        self.tensor(x_name, x, 4)
        self.tensor("weight", weight, 4)
        self.floating(x_name, x)
        self.like("weight", weight, x_name, x)
        if weight.shape[1] != x.shape[1]:
            raise self.value_error(
                f"weight expects {weight.shape[1]} input channels (shape ({shape_str(weight)})) "
                f"but {x_name} has {x.shape[1]} (shape ({shape_str(x)}))"
            )
        if x.shape[1] == 0:
            # conv2d with no input channels returns no output channels either (not C_out maps of the bias):
            # refused rather than reproduced, so the declared output shape is always (N, C_out, ...)
            raise self.value_error(f"{x_name} has no channels (shape ({shape_str(x)})); a conv needs at least one")

    def geometry(
        self,
        what: str,
        in_hw: Sequence[int],
        weight: Tensor,
        stride: int,
        padding: int,
        pool: int,
        pool_stride: Optional[int] = None,
        pool_padding: int = 0,
        ceil_mode: bool = False,
    ) -> Tuple[Tuple[int, int], Tuple[int, int]]:
        """(conv size, pooled size) of an input of spatial size ``in_hw``; both must be non-empty."""
        in_hw = tuple(int(s) for s in in_hw)
        kernel = tuple(weight.shape[-2:])
        chw = conv_size(in_hw, kernel, stride, padding)
        if min(chw) < 1:
            raise self.value_error(
                f"{what} of spatial size {in_hw} with padding {padding} is smaller than the kernel {kernel}"
            )
        phw = pooled_size(chw, pool, pool_stride, pool_padding, ceil_mode)
        if min(phw) < 1:
            raise self.value_error(
                f"pooled size is zero: conv output {chw} is smaller than pool={pool} (pool_padding {pool_padding}) "
                f"({what} spatial size {in_hw}, kernel {kernel}, stride {stride}, "
                f"padding {padding})"
            )
        return chw, phw

    def switches(self, switches, ref_name: str, ref: Tensor) -> None:
        """uint8 switches of the shape and device of the pooled tensor they belong to."""
        self.tensor("switches", switches, ref.dim())
        self.uint8_switches(switches)
        if switches.shape != ref.shape:
            raise self.value_error(
                f"switches shape ({shape_str(switches)}) does not match {ref_name} shape ({shape_str(ref)})"
            )
        if switches.device != ref.device:
            raise self.value_error(f"switches is on {switches.device} but {ref_name} is on {ref.device}")

    def uint8_switches(self, switches: Tensor) -> None:
        if switches.dtype != torch.uint8:
            raise self.type_error(f"switches must be torch.uint8, got {switches.dtype}")

    def size_pair(self, name: str, size, what: str) -> Tuple[int, int]:
        """``(H, W)``; a full ``(N, C, H, W)`` shape is accepted too."""
        if isinstance(size, (torch.Size, tuple, list)):
            if len(size) == 4:
                size = tuple(size)[-2:]
            if len(size) == 2:
                return self.integer(f"{name}[0]", size[0], 1), self.integer(f"{name}[1]", size[1], 1)
        raise self.value_error(f"{name} must be {what}, got {size!r}")


def shape_str(t: Tensor) -> str:
    return "x".join(str(s) for s in t.shape) if t.dim() else "scalar"
