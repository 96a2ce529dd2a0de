"""Shared pieces of the Triton backend's tests: its primitives (``kernels``), small cases and their inputs.

On CPU the kernels run under TRITON_INTERPRET=1 (set by tests/conftest.py), so every small case is tiny: the
interpreter executes programs one after another in numpy. The ``gpu`` cases run the compiled kernels at
realistic shapes. Expected values are computed in float64 from the same inputs; switches are compared only
where rounding cannot decide them (eager.assert_switches_agree), and gradients given the switches the kernel
recorded (the switches are constants of the op), so near-ties cannot make a correct kernel fail.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from drmm_kernels import dispatch, reference
from drmm_kernels import testing as eager

# The triton backend module; its kernels are imported on first use (dispatch never imports triton itself).
kernels = dispatch.backend_module("triton")

DEV = "cuda" if torch.cuda.is_available() else "cpu"

TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}


@dataclass(frozen=True)
class Case:
    n: int
    cin: int
    cout: int
    h: int
    w: int
    k: int
    pad: int
    stride: int = 1
    pool: int = 2
    slope: float = 0.0
    scale: bool = True  # scale with negative entries + shift
    channels_last: bool = False
    dtype: torch.dtype = torch.float32

    def __str__(self):
        dt = str(self.dtype).split(".")[-1]
        return (
            f"n{self.n}c{self.cin}-{self.cout}_{self.h}x{self.w}_k{self.k}p{self.pad}s{self.stride}"
            f"pool{self.pool}{'_leaky' if self.slope else ''}{'_cl' if self.channels_last else ''}"
            f"{'' if self.scale else '_noscale'}_{dt}"
        )


CASES = [
    Case(2, 3, 8, 9, 10, 3, 1),  # small C_in (flattened K), odd width
    Case(2, 1, 16, 7, 8, 5, 4),  # MNIST layer 1: C_in = 1, 5x5, full padding
    Case(2, 18, 20, 9, 9, 3, 2, stride=2),  # channel blocks with a masked tail, stride 2
    Case(2, 16, 12, 8, 7, 3, 0, slope=0.1, channels_last=True),  # valid conv, leaky, channels_last
    Case(1, 20, 10, 5, 6, 1, 0, pool=1, scale=False),  # 1x1, no pooling, C_out = 10
    Case(2, 4, 6, 11, 10, 3, 1, stride=2, pool=3, slope=0.2),  # pool 3 with dropped trailing rows
    Case(2, 16, 16, 6, 7, 3, 1, dtype=torch.bfloat16),
    Case(2, 3, 16, 7, 6, 5, 2, dtype=torch.float16, channels_last=True),
]


def inputs(c: Case, seed: int = 0, device: str = DEV):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(c.n, c.cin, c.h, c.w, generator=g)
    w = torch.randn(c.cout, c.cin, c.k, c.k, generator=g) / (c.cin * c.k * c.k) ** 0.5
    scale = shift = None
    if c.scale:
        scale = torch.randn(c.cout, generator=g)  # about half negative
        shift = 0.3 * torch.randn(c.cout, generator=g)
    cast = lambda t: None if t is None else t.to(device=device, dtype=c.dtype)  # noqa: E731
    x, w, scale, shift = cast(x), cast(w), cast(scale), cast(shift)
    if c.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, w, scale, shift


def d(t):
    return None if t is None else t.detach().double().cpu()


def close(actual, expected, dtype, what):
    tol = TOL[dtype]
    actual = actual.detach().double().cpu()
    expected = expected.detach().double().cpu()
    # absolute part scaled by the magnitude of the result: long fp32 sums round relative to their size
    atol = tol * max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual, expected, rtol=tol, atol=atol, msg=lambda m: f"{what}: {m}")


def expected_forward(c: Case, x, w, scale, shift):
    v = eager.pre_activation(d(x), d(w), d(scale), d(shift), c.stride, c.pad)
    y, sw = reference.pool_switches(v, c.pool, c.slope)
    return v, y, sw


def switch_tol(v, dtype):
    """Top-two gap below which rounding may decide a window (compiled Triton fuses scale/shift into an FMA)."""
    return (1e-3 if dtype == torch.float32 else 1e-2) * max(1.0, v.abs().max().item())


def check_switches(sw, sw_ref, v, pool, dtype):
    clear = eager.assert_switches_agree(sw, sw_ref, v, pool, switch_tol(v, dtype))
    assert clear.float().mean() > 0.5, "test data has too many near-ties to check switches"


def at(v, sw, pool):
    """v read at the kernel's recorded offsets (differentiable in v)."""
    n, c = sw.shape[:2]
    idx = reference.switches_to_indices(sw.cpu(), pool, v.shape[-2:]).reshape(n, c, -1)
    return v.reshape(n, c, -1).gather(2, idx).view(sw.shape)


def selected(v, sw, pool, slope):
    return eager.act(at(v, sw, pool), slope)


GPU_CASES = [
    # MNIST conv_small layer 2-like at 28x28, and layer 1 (C_in = 1, 5x5 full)
    Case(256, 32, 64, 28, 28, 3, 1),
    Case(256, 32, 64, 28, 28, 3, 1, dtype=torch.bfloat16),
    Case(256, 1, 32, 28, 28, 5, 4),
    # CIFAR-10 9-layer: layer 3 (96ch, full, pool) and layer 6 (192ch, valid, pool)
    Case(256, 96, 96, 34, 34, 3, 2, scale=False, dtype=torch.bfloat16),
    Case(256, 192, 192, 18, 18, 3, 0, scale=False, channels_last=True),
    Case(256, 96, 192, 16, 16, 3, 1, stride=2, slope=0.1),
]


def rel_err(a, b):
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-6)).item()


def dc(t):
    return None if t is None else t.detach().double()
