"""What the pytest-benchmark suite times: layer shapes, implementations, inputs and the eager baselines.

Only the public API of ``drmm_kernels`` is used; the eager baselines are ``drmm_kernels.testing``'s, wrapped per
layer. The layer table is the one of ``bench/kernels.py`` (loaded by file path, since ``bench/`` is not a
package), restricted to the 5-layer MNIST net ``conv_small``; what a timed call waits for is
``bench/timing.py``'s.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from typing import Callable, Dict, List, NamedTuple, Tuple

import torch

import drmm_kernels as dk
from drmm_kernels import testing as eager

BENCH_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if BENCH_DIR not in sys.path:  # bench/timing.py, imported here and by bench/kernels.py
    sys.path.insert(0, BENCH_DIR)
from timing import synchronized  # noqa: E402,F401  (the suite's tests import it from here)

COMPILE_MODE = "max-autotune-no-cudagraphs"
BASELINES = ("eager", "compiled")
GPU_BACKENDS = ("cuda", "triton")


def _load_layer_table():
    name = "drmm_bench_kernels"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, os.path.join(BENCH_DIR, "kernels.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look the defining module up while the class is built
        spec.loader.exec_module(module)
    return sys.modules[name].LAYERS


# conv_small's layers (L5's global mean pool is not part of the fused op, so L5 runs with pool=1).
LAYERS = [L for L in _load_layer_table() if L.name.startswith("mnist.")]
LAYER_IDS = [L.name.split(".", 1)[1] for L in LAYERS]


class Impl(NamedTuple):
    name: str  # "eager", "compiled" or a drmm_kernels backend
    device: str  # where its tensors live

    @property
    def id(self) -> str:
        gpu_baseline = self.device != "cpu" and self.name in BASELINES
        return f"{self.name}-{self.device}" if gpu_baseline else self.name


def backends() -> List[str]:
    """The available backends; Triton only on a GPU (its interpreter is a debugging tool, far too slow to time)."""
    names = [n for n, status in dk.available_backends().items() if status.available]
    if os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available():
        names = [n for n in names if n != "triton"]
    return names


def implementations() -> List[Impl]:
    found = backends()
    impls = [Impl(b, "cpu") for b in BASELINES] + [Impl(n, "cpu") for n in found if n not in GPU_BACKENDS]
    if torch.cuda.is_available():
        impls += [Impl(b, "cuda") for b in BASELINES] + [Impl(n, "cuda") for n in found if n in GPU_BACKENDS]
    return impls


IMPLS = implementations()
IMPL_IDS = [i.id for i in IMPLS]


def group(op: str, layer, impl: Impl, batch: int) -> str:
    """One pytest-benchmark table per op, layer and device: eager, compiled and every backend side by side."""
    short = layer.name.split(".", 1)[1]
    shape = f"{layer.cin}->{layer.cout} k{layer.k} p{layer.pad} {layer.hw}x{layer.hw} pool{layer.pool}"
    return f"{op} {short} ({shape}) batch {batch} {impl.device}"


# ---------------------------------------------------------------------------------------------- inputs


def conv_inputs(layer, batch: int, device: str, seed: int = 0) -> Dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, layer.cin, layer.hw, layer.hw, generator=g)
    w = torch.randn(layer.cout, layer.cin, layer.k, layer.k, generator=g) * (2.0 / (layer.cin * layer.k**2)) ** 0.5
    b = torch.randn(layer.cout, generator=g) * 0.1
    gy = torch.randn(batch, layer.cout, layer.pooled_hw, layer.pooled_hw, generator=g)
    mu = torch.randn(batch, layer.cout, layer.pooled_hw, layer.pooled_hw, generator=g)
    gamma = torch.rand(layer.cout, generator=g) + 0.5
    beta = torch.randn(layer.cout, generator=g) * 0.1
    out = dict(x=x, w=w, b=b, gy=gy, mu=mu, gamma=gamma, beta=beta)
    return {k: v.to(device) for k, v in out.items()}


def with_grad(*tensors: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    return tuple(t.detach().clone().requires_grad_(True) for t in tensors)


# ----------------------------------------------------------------------------------- eager compositions


def eager_forward(layer) -> Callable:
    """``conv2d -> relu -> max_pool2d(return_indices=True)``; without pooling ``relu(conv2d)`` and no indices."""
    pad, pool = layer.pad, layer.pool

    def forward(x, w, b):
        return eager.conv_relu_pool(x, w, stride=1, padding=pad, pool=pool, bias=b)

    return forward


def eager_render(layer) -> Callable:
    """The top-down pass from eager's saved state: mask by ``y > 0``, ``max_unpool2d`` by the int64 indices,
    ``conv_transpose2d`` with the forward's weight."""
    pad, pool, hw, conv_hw = layer.pad, layer.pool, (layer.hw, layer.hw), (layer.conv_hw, layer.conv_hw)

    def render(mu, mask, idx, w):
        return eager.render(mu, idx, w, hw, mask, None, 1, pad, pool, conv_hw)

    return render


def eager_bn_forward(layer) -> Callable:
    """Training-mode ``conv2d -> batch_norm -> relu -> max_pool2d(return_indices=True)`` (running stats updated)."""
    pad, pool = layer.pad, layer.pool

    def forward(x, w, gamma, beta, running_mean, running_var):
        return eager.conv_bn_relu_pool(
            x, w, gamma, beta, running_mean, running_var, True, 0.1, 1e-5, stride=1, padding=pad, pool=pool
        )

    return forward


EAGER = {
    "forward": eager_forward,
    "forward_backward": eager_forward,
    "render": eager_render,
    "bn_forward_backward": eager_bn_forward,
}

# One compiled function per (op, layer, device), shared by every test that needs it, dynamic=False: a graph
# specialised to each layer, the fair baseline. (dynamic=True was tried to share graphs between layers of the same
# padding and pool: dynamo still recompiled per layer, and each dynamic graph took longer to build.)
# The closures of one op share a code object and dynamo counts recompilations per code object: five layers
# (twice, for the forward alone and with backward) exceed the default limit of 8, after which it would silently
# run eager. Raise the limit and make hitting it an error.
_COMPILED: Dict[Tuple[str, str, str], Callable] = {}
torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
torch._dynamo.config.fail_on_recompile_limit_hit = True


def compiled(op: str, layer, device: str) -> Callable:
    key = (op, layer.name, device)
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(EAGER[op](layer), mode=COMPILE_MODE, dynamic=False)
    return _COMPILED[key]


def baseline(op: str, layer, impl: Impl) -> Callable:
    return compiled(op, layer, impl.device) if impl.name == "compiled" else EAGER[op](layer)


# -------------------------------------------------------------------------------------------- checks


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str, tol: float = 1e-4) -> None:
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, (
        f"{what}: {actual.dtype} {tuple(actual.shape)} vs expected {expected.dtype} {tuple(expected.shape)}"
    )
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol, msg=lambda m: f"{what}: {m}")


def assert_close_norm(actual: torch.Tensor, expected: torch.Tensor, what: str, tol: float = 1e-4) -> None:
    """Relative Frobenius error, for gradients: a window whose top two values tie within rounding may pick a
    different argmax in another implementation, which moves one gradient entry (a legitimate difference that
    an elementwise check would flag) but not the norm of the difference."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} vs {tuple(expected.shape)}"
    err = float((actual - expected).norm() / expected.norm().clamp_min(1e-30))
    assert err <= tol, f"{what}: relative error {err:.2e} > {tol:.0e}"


def assert_switches(y: torch.Tensor, sw: torch.Tensor, what: str) -> None:
    """Switch bytes: uint8, the shape of ``y``, bit 7 exactly where the ReLU output is positive."""
    assert sw.dtype == torch.uint8 and sw.shape == y.shape, f"{what}: switches {sw.dtype} {tuple(sw.shape)}"
    assert torch.equal(sw >= 128, y > 0), f"{what}: the a bit (bit 7) differs from y > 0"
