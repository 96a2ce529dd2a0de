"""Which code runs an op: the compiled extension, the backend registry and selection, and the custom-op wrapper.

A backend is a module exposing some of the primitives below (all arguments already validated by the public
op, outputs contiguous NCHW):

- ``conv_relu_pool(x, weight, scale, shift, stride, padding, pool, negative_slope) -> (y, switches)``
- ``render(mu, switches, weight, scale, stride, padding, pool, out_hw, negative_slope) -> x_hat``
- ``gather_conv(src, weight, switches, stride, padding, pool) -> conv2d(src, weight) at the recorded offsets``
- ``render_wgrad(src, mu, switches, scale, stride, padding, pool, negative_slope, kernel_hw) -> dW``
- ``bn_pool(z, scale, shift, pool, negative_slope) -> (y, switches)`` (epilogue on a precomputed conv output)
- ``masked_values(mu, switches, scale, negative_slope) -> mu * a'(switches) * scale`` (dense; pool=1 backward)
- ``unpool(values, switches, pool, conv_hw) -> values at their recorded offsets of a zero conv_hw map``
  (the training-mode batch-norm backward)
- ``batch_stats(z) -> (mean, biased var)`` per channel (the training-mode batch-norm forward)

plus ``status() -> (usable, reason)`` and ``supports(device) -> bool``. A primitive a backend does not provide
is computed by ``reference``; ``primitive_source`` says which. The ``cpu`` and ``cuda`` backends need the
compiled extension ``drmm_kernels._C`` (csrc/), which this module loads once; when the install has none, its CPU
kernels are built on that first use (drmm_kernels/jit.py).

This module imports no op: the ops (drmm_kernels/ops/) import it.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from dataclasses import dataclass
from types import ModuleType
from typing import Dict, Iterator, Optional, Sequence

import torch
from torch import Tensor
from torch.utils import _python_dispatch

from . import reference

NAMES = ("reference", "cpu", "cuda", "triton")
PRIMITIVES = ("conv_relu_pool", "render", "gather_conv", "render_wgrad", "bn_pool", "masked_values", "unpool",
              "batch_stats")

_MODULES = {
    "cpu": "drmm_kernels.cpu",
    "cuda": "drmm_kernels.cuda",
    "triton": "drmm_kernels.triton",
}
_NEEDS_EXTENSION = ("cpu", "cuda")


# --------------------------------------------------------------------------- the compiled extension

_ext_loaded: Optional[bool] = None
_ext_error = ""


def load_extension() -> bool:
    """Import ``drmm_kernels._C`` (which registers the ``drmm_C::*`` ops) once; when the install has none, build
    its CPU kernels on this first use (drmm_kernels/jit.py); False if neither works."""
    global _ext_loaded, _ext_error
    if _ext_loaded is None:
        try:
            from . import _C  # noqa: F401
            _ext_loaded = True
        except Exception as exc:
            missing = f"compiled extension drmm_kernels._C not loadable ({type(exc).__name__}: {exc})"
            from . import jit
            try:
                jit.load()
                _ext_loaded = True
            except jit.Unavailable as why:
                _ext_loaded = False
                _ext_error = f"{missing}, and {why}"
                jit.warn_once(_ext_error)
    return _ext_loaded


def extension_error() -> str:
    """Why the extension did not load ('' when it did)."""
    load_extension()
    return _ext_error


# --------------------------------------------------------------------------- registry and selection


@dataclass(frozen=True)
class BackendStatus:
    available: bool
    reason: str

    def __bool__(self) -> bool:
        return self.available


def _env_backend() -> str:
    name = os.environ.get("DRMM_KERNELS_BACKEND", "auto").strip().lower() or "auto"
    if name != "auto" and name not in NAMES:
        raise ValueError(f"drmm_kernels: DRMM_KERNELS_BACKEND={name!r} is not one of {('auto',) + NAMES}")
    return name


class _Selection:
    # Process-wide, not thread-local: autograd runs the backward of CUDA tensors on its own worker
    # thread, which must see the backend that the forward was selected with.
    def __init__(self) -> None:
        self.name = _env_backend()


_selection = _Selection()
_loaded: Dict[str, ModuleType] = {}
_load_errors: Dict[str, str] = {}


def backend_module(name: str):
    """The backend module, or None with the reason recorded."""
    if name == "reference":
        return reference
    if name in _loaded:
        return _loaded[name]
    if name in _load_errors:
        return None
    if name in _NEEDS_EXTENSION and not load_extension():
        _load_errors[name] = extension_error()
        return None
    try:
        mod = importlib.import_module(_MODULES[name])
    except Exception as exc:  # an optional backend must never break `import drmm_kernels`
        _load_errors[name] = f"import failed: {type(exc).__name__}: {exc}"
        return None
    _loaded[name] = mod
    return mod


def status(name: str) -> BackendStatus:
    if name not in NAMES:
        raise ValueError(f"drmm_kernels: unknown backend {name!r}; choose one of {('auto',) + NAMES}")
    if name == "reference":
        return BackendStatus(True, "pure PyTorch, always available")
    mod = backend_module(name)
    if mod is None:
        return BackendStatus(False, _load_errors[name])
    ok, reason = mod.status()
    return BackendStatus(ok, reason)


def available_backends() -> Dict[str, BackendStatus]:
    """For each backend: whether it is usable here and, if not, why."""
    return {name: status(name) for name in NAMES}


def get_backend() -> str:
    return _selection.name


def set_backend(name: str) -> None:
    """Choose the backend for subsequent calls (process-wide): 'auto' or one of NAMES."""
    name = name.strip().lower()
    if name != "auto":
        st = status(name)
        if not st.available:
            raise RuntimeError(f"drmm_kernels: backend {name!r} is not available: {st.reason}")
    _selection.name = name


@contextlib.contextmanager
def backend(name: str) -> Iterator[None]:
    """``with drmm_kernels.backend("cpu"): ...`` selects a backend for the block."""
    previous = _selection.name
    set_backend(name)
    try:
        yield
    finally:
        _selection.name = previous


# Preference order of `auto` per device type. The cuda/triton order on GPUs is
# decided by bench/kernels.py (see `auto_table.json` when it exists).
_AUTO_ORDER = {"cpu": ("cpu", "reference"), "cuda": ("triton", "cuda", "reference")}


def resolve(device: torch.device) -> str:
    """Name of the backend that runs an op on ``device`` under the current selection."""
    name = _selection.name
    if name == "auto":
        for cand in _AUTO_ORDER.get(device.type, ("reference",)):
            if cand == "reference":
                return cand
            mod = backend_module(cand)
            if mod is not None and mod.status()[0] and mod.supports(device):
                return cand
        return "reference"
    if name == "reference":
        return name
    mod = backend_module(name)
    if mod is None or not mod.status()[0]:
        raise RuntimeError(f"drmm_kernels: backend {name!r} is not available: {status(name).reason}")
    if not mod.supports(device):
        raise RuntimeError(f"drmm_kernels: backend {name!r} cannot run on {device.type} tensors")
    return name


def primitive(name: str, op: str):
    """The function implementing primitive ``op`` in backend ``name`` (the reference's when it has none)."""
    mod = reference if name == "reference" else backend_module(name)
    return getattr(mod, op, None) or getattr(reference, op)


def primitive_source(name: str, op: str) -> str:
    """Which backend actually computes primitive ``op`` when ``name`` is selected."""
    mod = reference if name == "reference" else backend_module(name)
    return name if mod is not None and hasattr(mod, op) else "reference"


def implementation(device: torch.device, op: str):
    """The function that runs primitive ``op`` for tensors on ``device`` under the current selection."""
    return primitive(resolve(device), op)


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


class CustomOp:
    """A ``drmm::`` custom op (fake implementation, autograd) plus an eager fast path to the same code.

    The custom op is what ``torch.compile``, fake tensors, functorch and ``opcheck`` see. In plain eager mode
    its round trip (C++ dispatcher -> Python autograd wrapper -> Python implementation) costs tens of
    microseconds per call, a noticeable share of the small unpooled layers of the 5-layer MNIST net on a CPU
    (bench/results/cpu_ops.md). So eager calls run the same implementation directly -- through an
    ``autograd.Function`` built from the same setup and backward when an input needs a gradient. Both paths
    compute the same thing with the same code.
    """

    def __init__(self, name: str, impl, fake, setup, backward):
        self.impl = impl
        self.op = torch.library.custom_op(f"drmm::{name}", impl, mutates_args=())
        self.op.register_fake(fake)
        self.op.register_autograd(backward, setup_context=setup)

        # Old-style forward(ctx, *args): with a separate setup_context, every apply() binds the arguments through
        # inspect.signature, which costs as much as the rest of the call.
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
