"""Loads the compiled extension ``drmm_kernels._C`` once and remembers why it failed, if it did."""

from __future__ import annotations

from typing import Optional

_loaded: Optional[bool] = None
_error = ""


def load() -> bool:
    """Import ``drmm_kernels._C`` (which registers the ``drmm_C::*`` ops); False if it is not built."""
    global _loaded, _error
    if _loaded is None:
        try:
            from . import _C  # noqa: F401
            _loaded = True
        except Exception as exc:
            _loaded, _error = False, f"compiled extension drmm_kernels._C not loadable ({type(exc).__name__}: {exc})"
    return _loaded


def error() -> str:
    load()
    return _error


def has_cuda_kernels() -> bool:
    """True when the extension was built with its CUDA sources."""
    if not load():
        return False
    import torch
    return bool(torch.ops.drmm_C.built_with_cuda())
