"""Which code runs an op: the compiled extension, the backend registry and selection, and the custom-op wrapper.

A backend is a module exposing some of the primitives below as functions with keyword-only parameters, named
and ordered as in their schemas (drmm_kernels/schema.py, the one list of each primitive's arguments), called
with keyword arguments already validated by the public op; outputs are contiguous NCHW:

- ``conv_relu_pool -> (y, switches)``: the fused forward;
- ``render -> x_hat``: the top-down pass;
- ``gather_conv -> conv2d(src, weight)`` read at the recorded offsets;
- ``render_wgrad -> dW``: the weight gradient over the recorded offsets;
- ``bn_pool -> (y, switches)``: the batch-norm epilogue on a precomputed conv output;
- ``masked_values -> mu * a'(switches) * scale`` (dense; the pool=1 backward);
- ``unpool ->`` the values at their recorded offsets of a zero (out_h, out_w) map (training-mode batch-norm
  backward);
- ``batch_stats -> (mean, biased var)`` per channel (training-mode batch-norm forward);

plus ``status() -> (usable, reason)`` and ``supports(device) -> bool``. A primitive a backend does not provide
is computed by ``reference``; ``primitive_source`` says which. The ``cpu`` and ``cuda`` backends need the
compiled extension ``drmm_kernels._C`` (csrc/), which this module loads once; when the install has none, its CPU
kernels are built on that first use (drmm_kernels/jit.py).

This module imports no op: the ops (drmm_kernels/ops/) import it.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
from dataclasses import dataclass
from types import ModuleType
from typing import Callable, Dict, Iterator, Optional, Sequence

import torch
import torch.fx
from torch import Tensor
from torch.utils import _python_dispatch

from . import reference
from .schema import PRIMITIVES, SCHEMAS, Schema  # noqa: F401  (PRIMITIVES: re-exported, defined with the schemas)

NAMES = ("reference", "cpu", "cuda", "triton")

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


# Preference order of `auto` per device type. On GPUs it is a default until a device check measures the two
# GPU backends against each other (bench/kernels.py).
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


def resolve_backend(device) -> str:
    """The backend that runs an op on ``device`` (a ``torch.device`` or a string such as ``"cpu"``) under the
    current selection, with ``auto`` resolved (``"cpu"`` on CPU tensors where the C++ kernels are built).

    >>> import drmm_kernels as dk
    >>> with dk.backend("reference"):
    ...     dk.resolve_backend("cpu")
    'reference'
    """
    return resolve(torch.device(device))


def primitive(name: str, op: str):
    """The function implementing primitive ``op`` in backend ``name`` (the reference's when it has none)."""
    mod = reference if name == "reference" else backend_module(name)
    return getattr(mod, op, None) or getattr(reference, op)


def primitive_source(name: str, op: str) -> str:
    """Which backend actually computes primitive ``op`` when ``name`` is selected."""
    mod = reference if name == "reference" else backend_module(name)
    return name if mod is not None and hasattr(mod, op) else "reference"


def native_or_reference(native: Callable[[Tensor], bool]):
    """Decorates a backend primitive so that it runs only when ``native(t)`` holds for every floating-point tensor
    argument (its dtypes); otherwise the reference primitive of the same name computes the call. One rule per
    backend, instead of each primitive re-listing its arguments for the fallback call. (Every backend takes every
    max_pool2d window, docs/ops.md#pooling, so the pool plays no part.)"""

    def wrap(fn):
        op = fn.__name__
        tensors = SCHEMAS[op].tensors

        @functools.wraps(fn)
        def run(**arguments):
            for name in tensors:
                t = arguments[name]
                if t is not None and t.is_floating_point() and not native(t):
                    # the reference looked up per call, so a test can replace it to see which calls fall back
                    return getattr(reference, op)(**arguments)
            return fn(**arguments)

        return run

    return wrap


def implementation(device: torch.device, op: str):
    """The function that runs primitive ``op`` for tensors on ``device`` under the current selection."""
    return primitive(resolve(device), op)


# --------------------------------------------------------------------------- custom ops with an eager fast path


def fx_proxies(*values) -> bool:
    """Whether a ``torch.fx`` tracer is recording this call: a tool that traces a model ``fuse`` returned
    (torchvision's ``create_feature_extractor``, ``fx.symbolic_trace``) passes Proxies, which have no shape to
    check. The wrapper then records the op as one graph node, and the traced module runs it on real tensors."""
    return any(isinstance(v, torch.fx.Proxy) for v in values)


def y_last(out):
    """``(y, switches)`` of a traced op's output, indexed so that ``y``'s node comes last: torchvision's feature
    extractor takes the last node a module's forward records as that module's output."""
    switches = out[1]
    return out[0], switches


def _plain_eager(tensors: Sequence[Tensor]) -> bool:
    """Whether a call may skip the torch.library dispatcher: not tracing or compiling, no functorch transform
    (``torch.func.grad``, ``vmap``, ...), no torch function or dispatch mode active (fake tensors,
    ``with torch.device(...)``, ...), only plain dense tensors (``nn.Parameter`` included: it disables
    ``__torch_function__``, so it is a plain tensor to every op)."""
    if (
        torch.compiler.is_compiling()
        or torch._C._is_torch_function_mode_enabled()
        or _python_dispatch.is_in_torch_dispatch_mode()
        or torch._C._are_functorch_transforms_active()
    ):
        return False
    return all(
        (type(t) is Tensor or type(t) is torch.nn.Parameter)
        and not t.is_meta
        and not torch._C._functorch.is_functorch_wrapped_tensor(t)
        for t in tensors
    )


#: Every ``drmm::`` custom op built by ``CustomOp``, by name.
CUSTOM_OPS: Dict[str, "CustomOp"] = {}


class CustomOp:
    """A ``drmm::`` custom op (fake implementation, autograd) plus an eager fast path to the same code.

    Built from the op's ``Schema`` (drmm_kernels/schema.py): the custom op's schema string comes from it, and
    ``impl(a)``, ``fake(a)`` and ``setup(ctx, a, output)`` receive the arguments as a dict by name
    (``a["stride"]``; ``f(**a)`` passes them on as keywords). ``backward(ctx, *grads)`` returns a dict of
    gradients by argument name (a name that is not a tensor argument of the schema is an error; a missing one
    has no gradient) and reads which inputs need one from the dict ``ctx.needs_grad``. Callers pass keywords
    only, ``op(mu=..., ...)``; a missing or unknown one is a ``TypeError`` naming the op.

    The custom op is what ``torch.compile``, fake tensors, functorch and ``opcheck`` see. In plain eager mode
    its round trip (C++ dispatcher -> Python autograd wrapper -> Python implementation) costs tens of
    microseconds per call, a noticeable share of the small unpooled layers of the 5-layer MNIST net on a CPU
    (bench/results/cpu_ops.md). So eager calls run the same implementation directly -- through an
    ``autograd.Function`` built from the same setup and backward when an input needs a gradient. Both paths
    compute the same thing with the same code.
    """

    def __init__(self, schema: Schema, impl, fake, setup, backward):
        self.schema = schema
        self.name = schema.name
        names = self.names = schema.names
        self._names = frozenset(names)
        self._values = lambda kwargs: tuple(map(kwargs.__getitem__, names))  # in schema order
        self.impl = impl
        grads_for = frozenset(schema.tensors)

        def ordered(grads):
            if not isinstance(grads, dict):
                raise TypeError(
                    f"drmm::{schema.name}: backward must return a dict of gradients by argument name, "
                    f"got {type(grads).__name__}"
                )
            if not grads.keys() <= grads_for:
                raise TypeError(
                    f"drmm::{schema.name}: backward returned gradients for "
                    f"{sorted(grads.keys() - grads_for)}, not tensor arguments of {schema}"
                )
            return tuple(map(grads.get, names))

        def op_backward(ctx, *grads):
            ctx.needs_grad = dict(zip(names, ctx.needs_input_grad))
            return ordered(backward(ctx, *grads))

        # The dispatcher and autograd.Function.apply pass the arguments positionally, in schema order.
        def op_impl(*values):
            return impl(dict(zip(names, values)))

        def op_fake(*values):
            return fake(dict(zip(names, values)))

        def op_setup(ctx, inputs, output):
            setup(ctx, dict(zip(names, inputs)), output)

        self.op = torch.library.custom_op(
            f"drmm::{schema.name}", op_impl, mutates_args=(), schema=schema.torch_library()
        )
        self.op.register_fake(op_fake)
        self.op.register_autograd(op_backward, setup_context=op_setup)

        # Old-style forward(ctx, *args): with a separate setup_context, every apply() binds the arguments through
        # inspect.signature, which costs as much as the rest of the call.
        def forward(ctx, *values):
            a = dict(zip(names, values))
            output = impl(a)
            setup(ctx, a, output)
            return output

        self.function = type(
            f"{schema.name}_function",
            (torch.autograd.Function,),
            {"forward": staticmethod(forward), "backward": staticmethod(op_backward)},
        )
        CUSTOM_OPS[schema.name] = self

    #: The op in standard ATen ops (drmm_kernels/export.py), or None: what ``torch.jit.trace`` and
    #: ``torch.onnx.export`` record in its place, so the saved program needs no drmm op.
    composite = None

    def __call__(self, **kwargs):
        if kwargs.keys() != self._names:
            raise self._call_error(kwargs)
        if fx_proxies(*kwargs.values()):
            return self.op(*self._values(kwargs))
        if self.composite is not None and torch.jit.is_tracing():
            return self.composite(**kwargs)
        tensors = [v for v in kwargs.values() if isinstance(v, Tensor)]
        if not _plain_eager(tensors):
            if self.composite is not None and torch.onnx.is_in_onnx_export():  # (fake tensors: never plain eager)
                return self.composite(**kwargs)
            return self.op(*self._values(kwargs))
        if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            return self.function.apply(*self._values(kwargs))
        return self.impl(kwargs)

    def _call_error(self, kwargs) -> TypeError:
        missing = [n for n in self.names if n not in kwargs]
        unknown = [n for n in kwargs if n not in self._names]
        why = "; ".join(
            f"{what} {', '.join(names)}" for what, names in (("missing", missing), ("unknown", unknown)) if names
        )
        return TypeError(f"drmm::{self.name}: {why} (takes keywords {self.schema})")
