"""Pieces shared by the Triton kernels: dot wrapper, window-max update, pooled store, host helpers.

Only APIs present in Triton 3.6 are used (no block pointers, no tensor descriptors, no libdevice),
because the GPU machine runs triton 3.6 while CI runs the interpreter of a newer one.
"""

from __future__ import annotations

import contextlib
import os
from typing import List

import torch
import triton
import triton.language as tl

from ..contract import OFFSET_MASK as _OFFSET_MASK
from ..contract import ON_BIT as _ON_BIT
from ._status import is_interpreting

from ..dispatch import native_or_reference

# The switch byte of drmm_kernels/contract.py, as compile-time constants the kernels can read.
ON_BIT = tl.constexpr(_ON_BIT)
OFFSET_MASK = tl.constexpr(_OFFSET_MASK)

# Dtypes the kernels handle; anything else (float64) is computed by the reference backend.
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

#: Decorates a primitive: it runs on KERNEL_DTYPES, the reference computes the rest.
on_kernel_dtypes = native_or_reference(lambda t: t.dtype in KERNEL_DTYPES)


def pick_configs(configs: List[triton.Config]) -> List[triton.Config]:
    """Multi-config autotune needs a GPU benchmarker; the interpreter gets the first config only.

    DRMM_TRITON_AUTOTUNE=0 does the same on a GPU (fast compiles for correctness runs of many shapes).
    """
    off = os.environ.get("DRMM_TRITON_AUTOTUNE", "1").strip().lower() in ("0", "false", "no", "off")
    return configs[:1] if (is_interpreting() or off) else configs


def use_tf32(dtype: torch.dtype) -> bool:
    # Follow the flag that governs cuDNN convolutions, so the fused op and eager conv2d agree on rounding.
    return dtype == torch.float32 and bool(torch.backends.cudnn.allow_tf32)


def upcast_dot(dtype: torch.dtype) -> bool:
    # The interpreter multiplies the raw uint16 bits of bf16 operands (docs/kernels.md#triton-interpreter); fp32
    # operands are exact.
    return is_interpreting() and dtype != torch.float32


def device_guard(t: torch.Tensor):
    """Launch on the tensor's GPU, not on whatever device happens to be current."""
    if t.is_cuda:
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2  # interpreter: small, but > 1 so split paths are exercised


@triton.jit
def mma(a, b, acc, TF32: tl.constexpr, UPCAST: tl.constexpr):
    """acc += a @ b with fp32 accumulation; TF32 only when cuDNN would use it."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if TF32:
        acc = tl.dot(a, b, acc, input_precision="tf32")
    else:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    return acc


@triton.jit
def window_update(v, m, arg, t, inside):
    """Running window max with PyTorch pooling semantics: strict '>' keeps the first maximum on ties,
    and a NaN always takes over (tl.max would skip it); offset t counts only where ``inside`` (the pool
    padding and a ceil-mode overhang never win)."""
    upd = inside & ((v > m) | (v != v))
    return tl.where(upd, v, m), tl.where(upd, t, arg)


@triton.jit
def first_inside(hp, wp, POOL: tl.constexpr, PS: tl.constexpr, PP: tl.constexpr):
    """The offset of window (hp, wp)'s first position inside the map (windows start at hp * PS - PP): the
    argmax of a window whose values are all -inf, as in PyTorch."""
    return tl.maximum(PP - hp * PS, 0) * POOL + tl.maximum(PP - wp * PS, 0)


@triton.jit
def store_pooled(y_ptr, sw_ptr, offs, mask, m, arg, slope, LEAKY: tl.constexpr):
    """Activation once on the window max, then y and the switch byte (offset | (max > 0) << 7)."""
    on = m > 0
    if LEAKY:
        y = tl.where(on, m, m * slope)
    else:
        # keep NaN (m != m); avoid -inf * 0 = NaN for all -inf windows
        y = tl.where(on | (m != m), m, 0.0)
    code = arg | tl.where(on, ON_BIT, 0)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(sw_ptr + offs, code.to(tl.uint8), mask=mask)
