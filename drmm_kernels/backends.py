"""Backend registry and selection.

A backend is a module exposing some of the primitives below (all arguments
already validated, outputs contiguous NCHW):

- ``conv_relu_pool(x, weight, scale, shift, stride, padding, pool, negative_slope) -> (y, switches)``
- ``render(mu, switches, weight, scale, stride, padding, pool, out_hw, negative_slope) -> x_hat``
- ``gather_conv(src, weight, switches, stride, padding, pool) -> conv2d(src, weight) at the recorded offsets``
- ``render_wgrad(src, mu, switches, scale, stride, padding, pool, negative_slope, kernel_hw) -> dW``
- ``bn_pool(z, scale, shift, pool, negative_slope) -> (y, switches)`` (epilogue on a precomputed conv output)
- ``masked_values(mu, switches, scale, negative_slope) -> mu * a'(switches) * scale`` (dense; pool=1 backward)
- ``unpool(values, switches, pool, conv_hw) -> values at their recorded offsets of a zero conv_hw map``
  (the training-mode batch-norm backward)
- ``batch_stats(z) -> (mean, biased var)`` per channel (the training-mode batch-norm forward)

plus ``status() -> (usable, reason)`` and ``supports(device) -> bool``. A primitive a
backend does not provide is computed by ``reference``; ``primitive_source`` says which.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from dataclasses import dataclass
from types import ModuleType
from typing import Dict, Iterator

import torch

from . import reference

NAMES = ("reference", "cpu", "cuda", "triton")
PRIMITIVES = ("conv_relu_pool", "render", "gather_conv", "render_wgrad", "bn_pool", "masked_values", "unpool",
              "batch_stats")

_MODULES = {
    "cpu": "drmm_kernels.cpu_backend",
    "cuda": "drmm_kernels.cuda_backend",
    "triton": "drmm_kernels.triton",
}


@dataclass(frozen=True)
class BackendStatus:
    available: bool
    reason: str

    def __bool__(self) -> bool:
        return self.available


def _env_backend() -> str:
    name = os.environ.get("DRMM_KERNELS_BACKEND", "auto").strip().lower() or "auto"
    if name != "auto" and name not in NAMES:
        raise ValueError(f"DRMM_KERNELS_BACKEND={name!r} is not one of {('auto',) + NAMES}")
    return name


class _Selection:
    # Process-wide, not thread-local: autograd runs the backward of CUDA tensors on its own worker
    # thread, which must see the backend that the forward was selected with.
    def __init__(self) -> None:
        self.name = _env_backend()


_selection = _Selection()
_loaded: Dict[str, ModuleType] = {}
_load_errors: Dict[str, str] = {}


def _module(name: str):
    """The backend module, or None with the import error recorded."""
    if name == "reference":
        return reference
    if name in _loaded:
        return _loaded[name]
    if name in _load_errors:
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
        raise ValueError(f"unknown backend {name!r}; choose one of {('auto',) + NAMES}")
    if name == "reference":
        return BackendStatus(True, "pure PyTorch, always available")
    mod = _module(name)
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
            raise RuntimeError(f"backend {name!r} is not available: {st.reason}")
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
            mod = _module(cand)
            if mod is not None and mod.status()[0] and mod.supports(device):
                return cand
        return "reference"
    if name == "reference":
        return name
    mod = _module(name)
    if mod is None or not mod.status()[0]:
        raise RuntimeError(f"backend {name!r} is not available: {status(name).reason}")
    if not mod.supports(device):
        raise RuntimeError(f"backend {name!r} cannot run on {device.type} tensors")
    return name


def primitive(name: str, device: torch.device, op: str):
    """The function implementing primitive ``op`` for tensors on ``device``."""
    mod = reference if name == "reference" else _module(name)
    return getattr(mod, op, None) or getattr(reference, op)


def primitive_source(name: str, op: str) -> str:
    """Which backend actually computes primitive ``op`` when ``name`` is selected."""
    mod = reference if name == "reference" else _module(name)
    return name if mod is not None and hasattr(mod, op) else "reference"
