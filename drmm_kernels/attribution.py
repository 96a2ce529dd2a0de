"""Top-down attribution through the fused ops: ``with drmm_kernels.attribution(mode):``.

Inside the context, the backward pass through every ReLU that is an ``nn.ReLU`` module of the model -- or
was one before ``drmm_kernels.fuse`` folded it into a fused block -- masks the top-down signal ``g`` by
the rule of ``mode``:

============  =======================================  ==============================================
mode          unfused ``nn.ReLU`` (input x)             fused block (pooled signal g, switches)
============  =======================================  ==============================================
gradient      ``g * (x > 0)`` (plain autograd)           by the on/off switch (plain backward)
guided        ``relu(g) * (x > 0)`` (guided backprop)    by the switch and the sign: ``relu(g) * a``
deconvnet     ``relu(g)`` (Zeiler & Fergus)              by the sign only: ``relu(g)`` at every window
============  =======================================  ==============================================

These are the rules of Captum's ``Saliency`` (signed), ``GuidedBackprop`` and ``Deconvolution``, applied
where Captum applies them: ReLUs called as ``nn.ReLU`` modules. Functional ReLUs (``F.relu``,
``torch.relu``, ``x.relu()``), ``LeakyReLU`` and fused blocks made from them keep their plain gradient.

Captum itself also works on a fused model and gives the original's attributions: ``fuse`` keeps the
``nn.ReLU`` modules a block replaced at their paths, Captum hooks them, and a block whose replaced modules are
hooked runs its chain unfused through them (at the unfused model's speed); a Captum layer method on a fused
block itself raises, since the block's output is not the conv's. This context is the fused, fast path to the
same maps.
In deconvnet mode a fused block's backward is exactly the package's ``render``: the signal, rectified,
unpooled at the recorded switches and sent through the transposed conv with the block's weights.

Where the mode is applied:

- fused blocks: the ops' backward (``conv_relu_pool``, ``conv_bn_relu_pool``) rewrites the pooled signal
  and the switches (:func:`rewrite`) before the unchanged kernels run, so every backend (reference, cpu,
  triton, cuda) gets the modes without kernel code of its own; they compute the input's gradient only,
  unless the context has ``parameter_grads=True``, where the gradients of the weights, bias and BN parameters
  follow from the same rewritten signal, as they do behind Captum's hooks; a block whose ReLU precedes an
  overlapping pool runs unfused under "guided" / "deconvnet" (the rule acts on the windows' sum);
- unfused ``nn.ReLU`` modules: module hooks, installed process-wide while a context is open (and removed
  when the last one closes), insert the same rule around each call, as Captum's hooks do per model. (Where
  a ReLU's input also feeds other layers, Captum rewrites that tensor's whole gradient; these hooks rewrite
  only the share that comes through the ReLU.)

The order trap: in a conv -> ReLU -> pool block a window whose pre-activations are all <= 0 is all zeros
after the ReLU, and max-pooling's backward sends its gradient to the window's first element (offset 0),
while the switch byte records the pre-activation's argmax. Where the activation came after the pool
(conv -> pool -> ReLU) the recorded offset is where the gradient goes. The gradient and guided rules zero
such windows, so only deconvnet sees the difference; it routes off windows to offset 0 for blocks whose
``order`` is ``"act-pool"`` and to the recorded offset for ``"pool-act"``.

The mode is read when the forward pass runs: a graph recorded inside the context back-propagates by its
rule even if ``backward()`` is called after the context closed, and a graph recorded outside stays plain.
The mode belongs to the thread that opened the context; other threads keep plain gradients. Under
``torch.compile`` the mode and the block rule are read when the graph is traced.

>>> import torch, drmm_kernels as dk
>>> from torch import nn
>>> net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
...                     nn.Linear(4 * 4 * 4, 2))
>>> fused = dk.fuse(net)
>>> x = torch.randn(1, 3, 8, 8, requires_grad=True)
>>> with dk.attribution("deconvnet"):
...     fused(x)[0, 1].backward()
>>> x.grad.shape, dk.attribution.current_mode()
(torch.Size([1, 3, 8, 8]), 'gradient')
"""

from __future__ import annotations

import threading
from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn

from .contract import ON_BIT
from .reference import window_origins

__all__ = ["attribution", "current_mode", "MODES", "capture", "rewrite", "block_rule"]

#: The modes of :class:`attribution`.
MODES = ("gradient", "guided", "deconvnet")

#: A fused block's rule as the ops' backward receives it: (mode, order), mode "guided" or "deconvnet".
Rule = Tuple[str, str]


class _State(threading.local):
    def __init__(self) -> None:
        self.modes: List[str] = []  # open contexts of this thread, innermost last
        self.parameter_grads: List[bool] = []  # their parameter_grads flags, alike
        # One entry per module call in progress that the hooks act on: (module, fused block rule or ReLU slot).
        self.calls: List[tuple] = []


_tls = _State()
_lock = threading.Lock()
_open = 0  # contexts open in the process (all threads); the hooks are installed while > 0
_handles: list = []


def current_mode() -> str:
    """The mode of the innermost open :class:`attribution` context of this thread, ``"gradient"`` outside."""
    modes = _tls.modes
    return modes[-1] if modes else "gradient"


class attribution:  # noqa: N801 -- a context manager used like torch.no_grad
    """``with drmm_kernels.attribution(mode):`` back-propagates through the model's ReLU modules (fused
    or not) by the rule of ``mode``: ``"gradient"`` (plain), ``"guided"`` (guided backprop) or
    ``"deconvnet"`` (Zeiler & Fergus's deconvnet); see the module docstring for the rules and their
    scope. Contexts nest (the innermost mode wins); on exit, gradients are plain again.

    An attribution reads the input's gradient only, so by default the fused blocks whose forward runs inside the
    context compute that alone: their weights', biases' and batch-norm parameters' ``.grad`` are left as they
    were (as under Captum, which asks ``torch.autograd.grad`` for the input). ``parameter_grads=True`` has them
    computed too, by the same rule (the gradient of the rewritten signal, as behind ReLU hooks). Modules that
    are not fused blocks compute their parameter gradients as usual.

    >>> import torch, drmm_kernels as dk
    >>> with dk.attribution("guided"):
    ...     dk.attribution.current_mode()
    'guided'
    """

    MODES = MODES
    current_mode = staticmethod(current_mode)

    def __init__(self, mode: str, *, parameter_grads: bool = False) -> None:
        if not isinstance(mode, str) or mode not in MODES:
            raise ValueError(
                f"drmm_kernels.attribution: mode must be one of {', '.join(map(repr, MODES))}, got {mode!r}"
            )
        if not isinstance(parameter_grads, bool):
            raise TypeError(
                f"drmm_kernels.attribution: parameter_grads must be a bool, got {type(parameter_grads).__name__}"
            )
        self.mode, self.parameter_grads = mode, parameter_grads

    def __enter__(self) -> "attribution":
        global _open
        with _lock:
            if _open == 0:
                _install_hooks()
            _open += 1
        _tls.modes.append(self.mode)
        _tls.parameter_grads.append(self.parameter_grads)
        return self

    def __exit__(self, *exc) -> None:
        global _open
        _tls.modes.pop()
        _tls.parameter_grads.pop()
        if not _tls.modes:
            _tls.calls.clear()  # entries of calls that raised before their forward hook could run
        with _lock:
            _open -= 1
            if _open == 0:
                _remove_hooks()

    def __repr__(self) -> str:
        return f"drmm_kernels.attribution({self.mode!r})"


# --------------------------------------------------------------------------- fused blocks (the ops' side)


def block_rule(module: nn.Module, mode: Optional[str] = None) -> Optional[Rule]:
    """The rule a fused block's backward follows under ``mode`` (default: the current one), or None for the
    plain gradient.

    The rule applies when the block's ReLU was an ``nn.ReLU`` module: ``drmm_kernels.fuse`` records that
    as ``module.relu_module`` (``fuse_conv_relu_pool`` too); a fused layer without the attribute (built by
    hand) counts as one when its activation is a ReLU (``negative_slope == 0``). ``module.order``
    (``"act-pool"`` or ``"pool-act"``, default ``"act-pool"``) says where the original model applied the
    activation.
    """
    mode = current_mode() if mode is None else mode
    if mode == "gradient" or float(getattr(module, "negative_slope", 0.0)) != 0.0:
        return None
    if not getattr(module, "relu_module", True):
        return None
    order = getattr(module, "order", "act-pool")
    if order not in ("act-pool", "pool-act"):
        raise ValueError(
            f"drmm_kernels.attribution: {type(module).__name__}.order must be 'act-pool' or 'pool-act', got {order!r}"
        )
    return mode, order


def input_only() -> bool:
    """Whether a fused op called now (its forward) runs inside an :class:`attribution` context on this thread
    without ``parameter_grads``. Its backward then computes the gradient of its input alone: an attribution reads
    the input's gradient, and the weight and batch-norm gradients would cost as much again."""
    return _open > 0 and bool(_tls.modes) and not _tls.parameter_grads[-1]


def capture() -> Optional[Rule]:
    """The rule for a fused op being called now, for its ``setup_context`` to keep for the backward: the rule
    of the fused block whose forward is running on this thread, None for a plain gradient (outside any
    context, in gradient mode, or for an op called outside a fused block)."""
    if _open == 0:
        return None
    calls = _tls.calls
    if not calls or not isinstance(calls[-1][1], tuple):
        return None
    return calls[-1][1]


def rewrite(gy: Tensor, switches: Tensor, rule: Optional[Rule], window: dict) -> Tuple[Tensor, Tensor]:
    """The pooled signal and the switches a fused op's backward uses under ``rule``: guided keeps the
    switches and rectifies the signal (the on/off bit still masks); deconvnet also turns every window on,
    with off windows routed to the window's first element (offset 0, or the first one past the padding of a
    padded pool) where the block applied its ReLU before the pool ("act-pool": the pool then saw an all-zero
    window, and max_pool2d's backward picks that element) and to the recorded argmax where after ("pool-act")."""
    if rule is None:
        return gy, switches
    mode, order = rule
    if order == "act-pool" and window["pool_stride"] < window["pool"]:
        # The ReLU came before an overlapping pool: the rule applies at the ReLU, to the sum of what the windows
        # route to a position, not per window. Blocks built by drmm_kernels.fuse run unfused in this case.
        raise RuntimeError(
            "drmm_kernels.attribution: a fused block built by hand applies its ReLU before an overlapping pool "
            f"(pool {window['pool']}, stride {window['pool_stride']}); the guided / deconvnet rule then acts on the "
            "sum over windows, which the fused op cannot reproduce. Fuse the unfused model with drmm_kernels.fuse "
            "instead (its blocks run unfused under this rule), or use a non-overlapping pool."
        )
    gy = gy.clamp_min(0)
    if mode == "guided":
        return gy, switches
    if order == "act-pool":
        first = ON_BIT
        if window["pool_padding"]:
            first = first_offsets(switches.shape[-2], switches.shape[-1], window, switches.device) | ON_BIT
        switches = torch.where(switches < ON_BIT, first, switches)  # off: the first element, on bit set
    else:
        switches = switches | ON_BIT
    return gy, switches


# --------------------------------------------------------------------------- unfused nn.ReLU modules


class _Slot:
    """What one ReLU call's backward needs: the mode, and in deconvnet mode the gradient at its output."""

    __slots__ = ("mode", "grad_out")

    def __init__(self, mode: str) -> None:
        self.mode, self.grad_out = mode, None

    def store(self, g: Tensor) -> None:
        self.grad_out = g


class _ReLUInput(torch.autograd.Function):
    """Placed before an ``nn.ReLU``: identity forward (a copy for an in-place ReLU, so the caller's tensor is
    left as it was, as under Captum's hooks); backward replaces the ReLU's input gradient ``g * (x > 0)``
    by ``relu(g * (x > 0))`` (guided) or by ``relu(g)`` taken at the ReLU's output (deconvnet)."""

    @staticmethod
    def forward(ctx, x: Tensor, slot: _Slot, copy: bool) -> Tensor:
        ctx.slot = slot
        return x.clone() if copy else x.view_as(x)

    @staticmethod
    def backward(ctx, g: Tensor):
        slot = ctx.slot
        if slot.mode == "deconvnet" and slot.grad_out is not None:
            g, slot.grad_out = slot.grad_out, None
        return g.clamp_min(0), None, None


def _is_fused_block(module: nn.Module) -> bool:
    # A class attribute set by the fused conv blocks of layers.py (and their subclasses in fuse.py); checked
    # by name so that this module, which the ops' backward imports, does not import layers (which imports the ops).
    return bool(getattr(type(module), "attribution_block", False))


def _pre_hook(module: nn.Module, args):
    modes = _tls.modes
    if not modes:
        return None
    mode = modes[-1]
    if isinstance(module, nn.ReLU):
        x = args[0] if len(args) == 1 else None
        if mode == "gradient" or not isinstance(x, Tensor) or not (torch.is_grad_enabled() and x.requires_grad):
            _tls.calls.append((module, None))
            return None
        slot = _Slot(mode)
        _tls.calls.append((module, slot))
        return (_ReLUInput.apply(x, slot, bool(module.inplace)),)
    if _is_fused_block(module):
        _tls.calls.append((module, block_rule(module, mode)))
    return None


def _post_hook(module: nn.Module, args, output):
    calls = _tls.calls
    if not calls or calls[-1][0] is not module:
        return None
    _, entry = calls.pop()
    if isinstance(entry, _Slot) and entry.mode == "deconvnet" and isinstance(output, Tensor) and output.requires_grad:
        output.register_hook(entry.store)
    return None


def _install_hooks() -> None:
    from torch.nn.modules import module as module_mod

    _handles.append(module_mod.register_module_forward_pre_hook(_pre_hook))
    _handles.append(module_mod.register_module_forward_hook(_post_hook, always_call=True))


def _remove_hooks() -> None:
    while _handles:
        _handles.pop().remove()


def first_offsets(hp: int, wp: int, window: dict, device) -> Tensor:
    """The offset of each window's first element inside the map (uint8, ``(hp, wp)``): 0 but for the border
    windows of a padded pool, whose first rows / columns lie in the padding."""
    rows, cols = window_origins(hp, wp, window["pool_stride"], window["pool_padding"], device)
    return (rows.clamp_max(0).neg() * window["pool"] + cols.clamp_max(0).neg()).to(torch.uint8)  # padding skipped
