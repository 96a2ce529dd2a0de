"""``fuse(model)``: put the fused ops into any model, wherever they compute exactly what the model did.

A chain ``conv2d → [batch_norm] → relu / leaky_relu → [max_pool2d]`` (or with the pool before the
activation: for a monotone activation ``act(max(v)) == max(act(v))``, so both orders are one function)
becomes one fused module. The model is traced with ``torch.fx``, so chains written as functional calls in
``forward`` (``F.relu(F.max_pool2d(self.conv1(x), 2))``) are found as well as ``nn.Sequential`` ones; a
model fx cannot trace (data-dependent control flow) falls back to the chains inside ``nn.Sequential``
containers. What may be fused, and every refusal's wording, is ``drmm_kernels.fusion_rules`` (shared with
``fuse_conv_relu_pool``); this module rewrites the model where it says so.

Names are kept: the fused module takes the conv's path and holds the conv's ``weight``/``bias``; a
fused BatchNorm2d stays registered at its own path (the fused module reads its parameters and running
statistics from there, so ``train()``/``eval()``, ``.to()`` and ``load_state_dict`` reach it as before).
The fused model's ``state_dict`` therefore has the original model's keys, and either loads into the other.
Every other module path of the model is kept too: a module registered under several names holds the same
(fused) module at each, and the ReLU / pool modules a block replaced stay at their paths.

Both modes: fx freezes ``self.training`` where ``forward`` reads it (``F.dropout(x, p, training=self.training)``,
torchvision's ``StochasticDepth``, ``if self.training:``), so ``fuse`` traces both modes and, where the traces
differ, keeps a graph per mode and runs the one of the fused model's own ``training`` flag at every call.

Hooks: while a module a block replaced carries a hook (Captum's ``GuidedBackprop`` / ``Deconvolution`` hook
every ``nn.ReLU``; its layer methods hook the layer named), the block runs its chain unfused through those
modules, so the hooks see what they see in the original; a forward or backward hook on a fused block itself
raises, as it would see the chain's output where the original's conv gave the conv's.
``drmm_kernels.attribution`` gives guided backprop and deconvnet through the fused ops themselves.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import io
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

import drmm_kernels as _dk  # the public ops are looked up at call time (the package is still importing here)

from .attribution import block_rule
from .fusion_rules import FxView, Match, Refusal, is_member_module, match, reason, sequential_matches
from .layers import FusedConvBNReLUPool2d, FusedConvReLUPool2d

__all__ = [
    "fuse",
    "fuse_conv_relu_pool",
    "FuseReport",
    "FusedBlock",
    "RefusedBlock",
    "FusedConvActPool2d",
    "FusedConvBNActPool2d",
]

# --------------------------------------------------------------------------- report


@dataclass
class FusedBlock:
    """One fused module: its path, the chain it replaced, and how many call sites use it."""

    name: str
    chain: str
    module: str
    sites: int = 1

    def __str__(self) -> str:
        sites = f"  ({self.sites} call sites)" if self.sites > 1 else ""
        return f"fused    {self.name}: {self.chain}  ->  {self.module}{sites}"


@dataclass
class RefusedBlock:
    """A conv (or the pool after it) left unfused, and why."""

    name: str
    chain: str
    reason: str

    def __str__(self) -> str:
        return f"refused  {self.name}: {self.chain}  --  {self.reason}"


@dataclass
class FuseReport:
    """What ``fuse`` did: ``mode`` is ``"fx"`` (traced) or ``"modules"`` (nn.Sequential fallback)."""

    model: str
    mode: str
    fused: List[FusedBlock] = field(default_factory=list)
    refused: List[RefusedBlock] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)

    def __str__(self) -> str:
        how = "torch.fx trace" if self.mode == "fx" else "nn.Sequential chains only"
        lines = [f"fuse({self.model}) [{how}]: {len(self.fused)} fused, {len(self.refused)} refused"]
        lines += [f"  {b}" for b in self.fused] + [f"  {b}" for b in self.refused]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


# --------------------------------------------------------------------------- fused modules


def _act_name(slope: float) -> str:
    return "relu" if slope == 0.0 else f"leaky_relu({slope:g})"


def _hooked(m: nn.Module) -> bool:
    return bool(m._forward_pre_hooks or m._forward_hooks or m._backward_hooks or m._backward_pre_hooks)


class _BuiltByFuse:
    """What the blocks ``fuse`` builds do around the fused op, so that code which hooks modules (Captum's
    GuidedBackprop / Deconvolution / layer methods, feature extractors) sees what it sees on the original.

    - The modules a block replaced (its ``nn.ReLU`` / ``nn.LeakyReLU`` / ``nn.MaxPool2d`` / ``BatchNorm2d``)
      stay in the fused model, at their own paths (or, after the ``nn.Sequential`` fallback, as the block's
      ``unfused_act`` / ``unfused_pool`` children). While any of them carries a hook, the block runs the chain
      unfused through those very modules, so the hooks fire on the same tensors as in the original.
    - A forward or backward hook on the block itself would see the whole chain's output where the original
      module at that path (the conv) gave the conv's output: the block raises instead of computing something
      else silently (forward pre-hooks see the conv's input and are fine). Set
      ``hooks_see_block_output = True`` on a block to hook its output knowingly.
    - Under another tool's ``torch.fx`` tracer (torchvision's ``create_feature_extractor``, ``fx.symbolic_trace``
      of the fused model) the block records its unfused chain: the graph then has the original model's nodes at
      the original paths (the conv's output at the block's path, the ReLU's and pool's at theirs), and
      BatchNorm2d is one module call that keeps its running statistics at every call. The traced module runs
      unfused.
    """

    hooks_see_block_output = False
    fused_path = ""
    chain = ""

    def _setup(
        self,
        path: str,
        chain: str,
        act_module: Optional[nn.Module],
        pool_module: Optional[nn.Module],
        as_children: bool = False,
    ) -> None:
        self.fused_path, self.chain = path, chain
        object.__setattr__(self, "_act_module", act_module)  # not children: they keep their own paths
        object.__setattr__(self, "_pool_module", pool_module)
        if as_children:  # nn.Sequential fallback: their slots hold a FusedAwaySlot, so Captum finds them here
            if act_module is not None:
                self.add_module("unfused_act", act_module)
            if pool_module is not None:
                self.add_module("unfused_pool", pool_module)

    def _replaced(self) -> List[nn.Module]:
        d = self.__dict__
        # a FusedAwayBatchNorm2d slot is not one: it raises on hooks of its own
        return [
            m
            for m in (d.get("_bn_module"), d.get("_act_module"), d.get("_pool_module"))
            if m is not None and not isinstance(m, FusedAwayBatchNorm2d)
        ]

    def _route(self, want_switches: bool, x) -> bool:
        """True where the chain must run unfused (a replaced module is hooked, or ``x`` is another tool's fx
        Proxy); raises for hooks on the block."""
        if (
            self._forward_hooks or self._backward_hooks or self._backward_pre_hooks
        ) and not self.hooks_see_block_output:
            where = self.fused_path or type(self).__name__
            kept = [p for p in self._replaced_paths() if p]
            raise RuntimeError(
                f"drmm_kernels.fuse: a forward/backward hook is registered on the fused block {where!r} "
                f"({self.chain or 'conv -> activation -> pool'}); the block outputs the whole chain, where the "
                f"original module at {where!r} output the conv alone, so the hook (e.g. a Captum layer method such "
                f"as LayerGradCam) would see another tensor than on the unfused model. Hook "
                + (
                    f"the activation or pool module ({', '.join(repr(p) for p in kept)}: the block then runs "
                    f"unfused through it) "
                    if kept
                    else "a module of the unfused model "
                )
                + "instead, or use the unfused model; for input attributions use "
                "`with drmm_kernels.attribution(mode):` (or Captum's GuidedBackprop / Deconvolution / Saliency, "
                "which work on the fused model). Set hooks_see_block_output = True on the block to hook its "
                "output knowingly."
            )
        return not want_switches and (
            any(_hooked(m) for m in self._replaced()) or self._rule_after_the_sum() or _dk.dispatch.fx_proxies(x)
        )

    def _rule_after_the_sum(self) -> bool:
        """Under a guided / deconvnet ``drmm_kernels.attribution`` rule, a block whose ReLU came before an
        overlapping pool runs unfused: the rule clamps the gradient at the ReLU, after the windows' contributions
        to a position are summed, which the fused op's pooled-level rule cannot reproduce."""
        w = self.pool_window
        if w["pool_stride"] >= w["pool"] or self.__dict__.get("_act_module") is None:
            return False
        rule = block_rule(self)
        return rule is not None and rule[1] == "act-pool"

    def _replaced_paths(self) -> List[str]:
        return list(getattr(self, "replaced_paths", ()))

    def _unfused(self, x: Tensor) -> Tensor:
        """The original chain, op for op, through the replaced modules (their hooks fire as in the original)."""
        z = F.conv2d(x, self.weight, self.bias, self.stride, self.padding)
        bn = self.__dict__.get("_bn_module")
        if bn is not None:  # a FusedAwayBatchNorm2d passes through: run BatchNorm2d's own forward on it
            z = nn.BatchNorm2d.forward(bn, z) if isinstance(bn, FusedAwayBatchNorm2d) else bn(z)
        act, pool = self.__dict__.get("_act_module"), self.__dict__.get("_pool_module")

        def activate(v):
            if act is not None:
                return act(v)
            return F.relu(v) if self.negative_slope == 0.0 else F.leaky_relu(v, self.negative_slope)

        def max_pool(v):
            if pool is not None:
                return pool(v)
            w = self.pool_window
            return (
                F.max_pool2d(v, w["pool"], w["pool_stride"], w["pool_padding"], ceil_mode=w["ceil_mode"])
                if w["pool"] > 1
                else v
            )

        return max_pool(activate(z)) if self.order == "act-pool" else activate(max_pool(z))


class FusedConvActPool2d(_BuiltByFuse, FusedConvReLUPool2d):
    """A ``FusedConvReLUPool2d`` built by ``fuse`` around a model's ``Conv2d`` parameters (shared, not copied).

    ``order`` records where the original model applied the activation (``"act-pool"`` or ``"pool-act"``);
    both give the same values and gradients. ``relu_module`` records whether the activation was an
    ``nn.ReLU`` module (not ``F.relu`` or a leaky ReLU): the ReLUs whose backward ``drmm_kernels.attribution``
    rewrites; with ``order`` it decides how the block's backward routes in deconvnet mode. ``fused_path``,
    ``chain`` and ``replaced_paths`` say where the block sits, what it replaced and where the replaced modules
    still are; hooks on those modules make the block run unfused (see ``_BuiltByFuse``).
    """

    @classmethod
    def _build(
        cls,
        conv: nn.Conv2d,
        padding: int,
        slope: float,
        window: dict,
        order: str,
        relu_module: bool,
        path: str = "",
        chain: str = "",
        act_module: Optional[nn.Module] = None,
        pool_module: Optional[nn.Module] = None,
        replaced_paths: Sequence[str] = (),
        as_children: bool = False,
    ) -> "FusedConvActPool2d":
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        kh, kw = conv.kernel_size
        layer.in_channels, layer.out_channels = conv.in_channels, conv.out_channels
        layer.kernel_size = kh if kh == kw else (kh, kw)
        layer.stride, layer.padding = conv.stride[0], padding
        layer._set_window(**window)
        layer.negative_slope, layer.return_switches, layer.order = float(slope), False, order
        layer.relu_module = bool(relu_module)
        layer.replaced_paths = tuple(replaced_paths)
        layer.weight = conv.weight
        layer.bias = conv.bias
        layer._setup(path, chain, act_module, pool_module, as_children)
        return layer

    def forward(self, x: Tensor, return_switches: Optional[bool] = None):
        want = self.return_switches if return_switches is None else return_switches
        if self._route(bool(want), x):
            return self._unfused(x)
        return FusedConvReLUPool2d.forward(self, x, return_switches)

    # render is FusedConvReLUPool2d's: same weight, bias and geometry attributes.

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, bias={self.bias is not None}, {self._window_repr()}, "
            f"act={_act_name(self.negative_slope)}, order={self.order}"
        )


class FusedConvBNActPool2d(_BuiltByFuse, FusedConvBNReLUPool2d):
    """A ``FusedConvBNReLUPool2d`` built by ``fuse``: holds the conv's ``weight``/``bias`` under the conv's
    path and reads the model's ``BatchNorm2d`` (which stays registered at its own path, not as a child
    of this module) at every call, following its ``training`` flag as the original did.

    Training mode (or a BN without running statistics) runs ``conv_bn_relu_pool`` with the batch
    statistics and updates ``running_mean``/``running_var``/``num_batches_tracked`` as ``BatchNorm2d``
    does; eval mode folds the running statistics. A conv bias cancels in training-mode BN except in
    ``running_mean``, which gets it added back (times the momentum), and its gradient is zero as in the
    original; in eval mode it joins the BN shift. ``order``, ``relu_module`` and the hook rules as for
    ``FusedConvActPool2d`` (a hooked BatchNorm2d also makes the block run unfused).
    """

    @classmethod
    def _build(
        cls,
        conv: nn.Conv2d,
        bn: nn.BatchNorm2d,
        bn_path: str,
        padding: int,
        slope: float,
        window: dict,
        order: str,
        relu_module: bool,
        path: str = "",
        chain: str = "",
        act_module: Optional[nn.Module] = None,
        pool_module: Optional[nn.Module] = None,
        replaced_paths: Sequence[str] = (),
        as_children: bool = False,
    ) -> "FusedConvBNActPool2d":
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        kh, kw = conv.kernel_size
        layer.in_channels, layer.out_channels = conv.in_channels, conv.out_channels
        layer.kernel_size = kh if kh == kw else (kh, kw)
        layer.stride, layer.padding = conv.stride[0], padding
        layer._set_window(**window)
        layer.negative_slope, layer.return_switches, layer.order = float(slope), False, order
        layer.relu_module = bool(relu_module)
        layer.replaced_paths = tuple(replaced_paths)
        layer.weight = conv.weight
        layer.bias = conv.bias
        layer.bn_path = bn_path
        object.__setattr__(layer, "_bn_module", bn)  # not a child: its state_dict keys stay at bn_path
        layer._setup(path, chain, act_module, pool_module, as_children)
        return layer

    @property
    def bn(self) -> nn.BatchNorm2d:  # the parent class's attribute, here the model's own module
        return self.__dict__["_bn_module"]

    def forward(self, x: Tensor, return_switches: Optional[bool] = None):
        want = self.return_switches if return_switches is None else return_switches
        if self._route(bool(want), x):
            return self._unfused(x)
        bn, b = self.bn, self.bias
        # BatchNorm2d.forward's bookkeeping, step for step.
        momentum = 0.0 if bn.momentum is None else bn.momentum
        if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
            bn.num_batches_tracked.add_(1)
            momentum = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
        batch_stats = bn.training or (bn.running_mean is None and bn.running_var is None)
        keep = not bn.training or bn.track_running_stats
        mean, var = (bn.running_mean, bn.running_var) if keep else (None, None)
        shift = bn.bias
        if b is not None:
            if batch_stats:
                extra = b * 0.0  # cancels in the normalisation; keeps b in the graph, so b.grad is 0 as in eager
            else:
                extra = b * torch.rsqrt(var + bn.eps)
                extra = extra if bn.weight is None else extra * bn.weight
            shift = extra if shift is None else shift + extra
        y, switches = _dk.conv_bn_relu_pool(
            x,
            self.weight,
            bn.weight,
            shift,
            mean,
            var,
            training=bool(batch_stats),
            momentum=float(momentum),
            eps=bn.eps,
            stride=self.stride,
            padding=self.padding,
            negative_slope=self.negative_slope,
            **self.pool_window,
        )
        if b is not None and batch_stats and mean is not None:
            with torch.no_grad():  # the op averaged the conv output without the bias
                mean.add_(b.detach().to(mean.dtype), alpha=float(momentum))
        return (y, switches) if want else y

    def render(self, mu: Tensor, switches: Tensor, out_size) -> Tensor:
        """Top-down pass through the raw conv weight (the BN is not inverted)."""
        return _dk.render(
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
            f"padding={self.padding}, bias={self.bias is not None}, bn={self.bn_path}, {self._window_repr()}, "
            f"act={_act_name(self.negative_slope)}, order={self.order}"
        )


class FusedAwayBatchNorm2d(nn.BatchNorm2d):
    """Placeholder left in an ``nn.Sequential`` slot whose BatchNorm2d was fused into the conv before it:
    holds the same parameters and buffers under the same names (so state_dicts keep their keys) and
    passes its input through."""

    fused_into: str = ""
    drmm_kernels_fused = True  # not a BatchNorm2d the fusion rules may fuse again

    @classmethod
    def _from(cls, bn: nn.BatchNorm2d, fused_into: str) -> "FusedAwayBatchNorm2d":
        slot = cls.__new__(cls)
        nn.Module.__init__(slot)
        for attr in ("num_features", "eps", "momentum", "affine", "track_running_stats"):
            setattr(slot, attr, getattr(bn, attr))
        for name, p in bn._parameters.items():
            slot.register_parameter(name, p)
        for name, t in bn._buffers.items():
            slot.register_buffer(name, t, persistent=name not in bn._non_persistent_buffers_set)
        slot.training, slot.fused_into = bn.training, fused_into
        return slot

    def forward(self, x: Tensor) -> Tensor:
        if _hooked(self):  # the slot sees the fused block's output, not this BatchNorm's input and output
            raise RuntimeError(
                f"drmm_kernels.fuse: a hook is registered on a BatchNorm2d that fuse folded into "
                f"{self.fused_into!r} (this slot passes the fused block's output through); hook "
                f"the unfused model, or fuse after registering nothing on it"
            )
        return x

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, fused into {self.fused_into}"


class FusedAwaySlot(nn.Identity):
    """Placeholder left in an ``nn.Sequential`` slot whose activation or pool module a fused block took over (the
    module itself lives on as the block's ``unfused_act`` / ``unfused_pool`` child): passes its input, the fused
    block's output, through. A hook on the slot would see that output where the original module saw its own input
    and output (a Captum layer method at the ReLU's path, say), so it raises and names the path to hook instead."""

    fused_into: str = ""
    moved_to: str = ""
    replaced: str = ""
    drmm_kernels_fused = True

    @classmethod
    def _from(cls, module: nn.Module, fused_into: str, moved_to: str) -> "FusedAwaySlot":
        slot = cls()
        slot.fused_into, slot.moved_to, slot.replaced = fused_into, moved_to, type(module).__name__
        slot.training = module.training
        return slot

    def forward(self, x: Tensor) -> Tensor:
        if _hooked(self):
            raise RuntimeError(
                f"drmm_kernels.fuse: a hook is registered on the slot of the {self.replaced} that fuse folded into "
                f"{self.fused_into!r}; the slot passes the fused block's output through, so the hook (e.g. a Captum "
                f"layer method) would see another tensor than on the unfused model. Hook {self.moved_to!r} instead "
                f"(the {self.replaced} itself: the block then runs unfused through it), or the unfused model; for "
                f"input attributions use `with drmm_kernels.attribution(mode):`"
            )
        return x

    def extra_repr(self) -> str:
        return f"{self.replaced} fused into {self.fused_into}, now at {self.moved_to}"


_FUSED_TYPES = (FusedConvReLUPool2d, FusedConvBNReLUPool2d, FusedAwayBatchNorm2d, FusedAwaySlot)


# --------------------------------------------------------------------------- torch.fx path


def _site_key(ch: Match):
    """What must agree between the calls of one conv for one fused block to serve them all: relu_module too (a
    conv shared by an nn.ReLU chain and an F.relu chain attributes differently), and the activation and pool
    modules (the block runs unfused through them while they are hooked)."""
    return (
        ch.bn.target if ch.bn is not None else None,
        ch.slope,
        tuple(ch.pool_window.values()),
        ch.order,
        ch.relu_module,
        _module_target(ch.act),
        _module_target(ch.pool),
    )


def _replaced_paths(ch: Match) -> List[str]:
    return [n.target for n in (ch.bn, ch.act, ch.pool) if n is not None and n.op == "call_module"]


def _module_target(n: Optional[fx.Node]) -> Optional[str]:
    return n.target if n is not None and n.op == "call_module" else None


class _Tracer(fx.Tracer):
    # already-fused modules are leaves (their ops take no proxies); so are the modules the rules judge (subclasses
    # of Conv2d, BatchNorm2d, ReLU, LeakyReLU, MaxPool2d included), as the nn.Sequential path sees them
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, _FUSED_TYPES) or is_member_module(m) or super().is_leaf_module(m, qualname)


def _refused(view, r: Refusal) -> RefusedBlock:
    return RefusedBlock(view.name(r.at), r.chain, r.report_reason)


def _example_ranks(gm: fx.GraphModule, example_inputs, notes: List[str]) -> Dict[fx.Node, Tuple[int, torch.dtype]]:
    """Rank and dtype of each conv's input, from a run on fake tensors (no compute, no state changes)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.passes.shape_prop import ShapeProp

    if isinstance(example_inputs, Tensor):
        example_inputs = (example_inputs,)
    try:
        # ShapeProp prints the traceback of a failing node itself; the note below says what failed
        with contextlib.redirect_stderr(io.StringIO()):
            ShapeProp(gm, fake_mode=FakeTensorMode(allow_non_fake_inputs=True)).propagate(*example_inputs)
    except Exception as e:  # shapes are a check, not a requirement
        cause = e.__cause__ or e
        notes.append(
            f"example_inputs: shape propagation failed ({type(cause).__name__}: {_first_line(cause)}); "
            f"conv input ranks not checked"
        )
        return {}
    out = {}
    for n in gm.graph.nodes:
        if n.op == "call_module" and isinstance(n.args[0] if n.args else None, fx.Node):
            meta = n.args[0].meta.get("tensor_meta")
            if meta is not None and hasattr(meta, "shape"):
                out[n] = (len(meta.shape), meta.dtype)
    notes.append("example_inputs: conv input ranks and dtypes checked")
    return out


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else ""


def _mode_name(training: bool) -> str:
    return "training" if training else "eval"


def _fuse_fx(
    model: nn.Module, graphs: Dict[bool, fx.Graph], report: FuseReport, example_inputs, name: str
) -> fx.GraphModule:
    """Fuse the chains of ``graphs`` (one trace, or one per mode where the traces differ) consistently: a
    module is fused only where every call of it, in every graph, is the same chain."""
    primary = bool(model.training)
    gms = {mode: fx.GraphModule(model, g, name) for mode, g in graphs.items()}
    two = len(gms) > 1
    mode_of = {id(gm.graph): mode for mode, gm in gms.items()}
    notes: List[str] = []
    ranks: Dict[fx.Node, Tuple[int, torch.dtype]] = {}
    if example_inputs is not None:
        for gm in gms.values():
            ranks.update(_example_ranks(gm, example_inputs, notes))
    refused: List[RefusedBlock] = []
    chains: Dict[fx.Node, Match] = {}
    for gm in gms.values():
        view = FxView(gm, ranks)
        for c in gm.graph.nodes:
            if view.member(c).role != "conv":
                continue
            found = match(view, c)
            if isinstance(found, Refusal):
                refused.append(_refused(view, found))
                continue
            chains[c] = found
            if found.left_out is not None:
                refused.append(_refused(view, found.left_out))

    def sites(target):
        return [n for gm in gms.values() for n in gm.graph.nodes if n.op == "call_module" and n.target == target]

    paths: Dict[int, List[str]] = {}
    for path, m in model.named_modules(remove_duplicate=False):
        paths.setdefault(id(m), []).append(path)
    first = {ps[0]: ps[1:] for ps in paths.values() if ps}

    def module(target: str) -> str:  # fx names a module by its first path; say where else it is registered
        also = first.get(target, [])
        return f"module {target}" + (f" (also registered as {', '.join(also)})" if also else "")

    def names(nodes) -> str:
        seen = []
        for n in nodes:
            text = "the model's output" if n.op == "output" else n.name
            if two and not all(any(m.name == n.name for m in g.graph.nodes) for g in gms.values()):
                text += f" in {_mode_name(mode_of[id(n.graph)])} mode"
            if text not in seen:
                seen.append(text)
        return ", ".join(seen)

    # Shared modules: fuse a conv only if every call of it (in both modes' graphs) is an identical chain, and
    # a BN only if every call of it sits in a fused chain; refusing one chain can break another's condition,
    # so repeat.
    changed = True
    while changed:
        changed = False
        for target in {ch.conv.target for ch in chains.values()}:
            calls = sites(target)
            group = [chains[n] for n in calls if n in chains]
            why = None
            if len(group) < len(calls):
                why = reason("called_unfused", module=module(target), sites=names(n for n in calls if n not in chains))
            elif len({_site_key(ch) for ch in group}) > 1:
                per_mode = {}
                for ch in group:
                    per_mode.setdefault(mode_of[id(ch.conv.graph)], set()).add(_site_key(ch))
                n_sites = max(sum(1 for ch in group if mode_of[id(ch.conv.graph)] == m) for m in per_mode)
                if two and all(len(k) == 1 for k in per_mode.values()):
                    why = reason("chain_per_mode", module=module(target))
                elif len({_site_key(ch)[:5] for ch in group}) == 1:
                    through = sorted({p for ch in group for p in _site_key(ch)[5:] if p is not None})
                    why = reason("through_other_modules", module=module(target), n=n_sites, through=", ".join(through))
                else:
                    why = reason("different_chains", module=module(target), n=n_sites)
            if why:
                for ch in group:
                    refused.append(RefusedBlock(target, ch.desc, why))
                    del chains[ch.conv]
                changed = True
        for target in {ch.bn.target for ch in chains.values() if ch.bn is not None}:
            calls = sites(target)
            inside = [ch for ch in chains.values() if ch.bn is not None and ch.bn.target == target]
            if len(inside) < len(calls):
                others = [n for n in calls if not any(ch.bn is n for ch in inside)]
                for ch in inside:
                    why = reason("bn_called_unfused", module=module(target), sites=names(others))
                    refused.append(RefusedBlock(ch.conv.target, ch.desc, why))
                    del chains[ch.conv]
                changed = True

    done: Dict[str, FusedBlock] = {}
    built: Dict[str, nn.Module] = {}
    site_names: Dict[str, set] = {}
    for ch in chains.values():
        target = ch.conv.target
        gm = gms[mode_of[id(ch.conv.graph)]]
        if target not in built:
            conv = gm.get_submodule(target)
            extra = dict(
                path=target,
                chain=ch.desc,
                replaced_paths=_replaced_paths(ch),
                act_module=ch.module("act"),
                pool_module=ch.module("pool"),
            )
            if ch.bn is None:
                fused = FusedConvActPool2d._build(
                    conv, ch.padding, ch.slope, ch.pool_window, ch.order, ch.relu_module, **extra
                )
            else:
                fused = FusedConvBNActPool2d._build(
                    conv,
                    ch.module("bn"),
                    ch.bn.target,
                    ch.padding,
                    ch.slope,
                    ch.pool_window,
                    ch.order,
                    ch.relu_module,
                    **extra,
                )
            built[target] = fused
            done[target] = FusedBlock(target, ch.desc, type(fused).__name__)
        if not _has_module(gm, target) or gm.get_submodule(target) is not built[target]:
            _set_submodule(gm, target, built[target])
        site_names.setdefault(target, set()).add(ch.conv.name)
        last = ch.act if ch.order == "pool-act" or ch.pool is None else ch.pool
        last.replace_all_uses_with(ch.conv)
        for n in reversed(ch.elems[1:]):
            ch.conv.graph.erase_node(n)
    for target, block in done.items():
        block.sites = len(site_names[target])
    report.fused.extend(done.values())
    # The ReLU / MaxPool / BatchNorm modules a block replaced stay in the model at their paths (restored below
    # where the graph no longer calls them): Captum and other hooks find them there, and the block follows.
    for gm in gms.values():
        gm.graph.lint()
    if two:
        fused_gm = _TwoModeGraphModule(gms[primary], gms[primary].graph, name)
        other = gms[not primary]
        for n in other.graph.nodes:
            if n.op in ("call_module", "get_attr") and not _has_path(fused_gm, n.target):
                _copy_attr(other, fused_gm, n.target)
        fused_gm._set_other(other.graph, primary)
    else:
        fused_gm = gms[primary]
        fused_gm.recompile()
    _restore_unused_state(model, fused_gm, notes)
    if two:
        notes.append(
            f"forward traces differently in training and eval mode (it reads self.training): the fused "
            f"model keeps one graph per mode and runs the one of its own training flag at every call, "
            f"as {name} reads its flag"
        )
    for n in notes:
        if n not in report.notes:
            report.notes.append(n)
    for r in refused:
        if not any((r.name, r.chain, r.reason) == (q.name, q.chain, q.reason) for q in report.refused):
            report.refused.append(r)
    return fused_gm


def _has_module(root: nn.Module, target: str) -> bool:
    try:
        root.get_submodule(target)
    except AttributeError:
        return False
    return True


def _has_path(root: nn.Module, target: str) -> bool:
    obj = root
    for item in target.split("."):
        if not hasattr(obj, item):
            return False
        obj = getattr(obj, item)
    return True


def _copy_attr(src: nn.Module, dst: nn.Module, target: str) -> None:
    """Put ``src``'s attribute at ``target`` (a module, parameter or buffer) at the same path of ``dst``,
    creating plain containers on the way, as ``fx.GraphModule`` does for the nodes of its own graph."""
    *prefix, leaf = target.split(".")
    for item in prefix:
        f, t = getattr(src, item), getattr(dst, item, None)
        if t is None:
            t = nn.Module()
            t.training = f.training
            setattr(dst, item, t)
        src, dst = f, t
    value = getattr(src, leaf)
    if isinstance(value, Tensor) and not isinstance(value, nn.Parameter):
        dst.register_buffer(leaf, value, persistent=leaf not in src._non_persistent_buffers_set)
    else:
        setattr(dst, leaf, value)


def _set_submodule(root: nn.Module, target: str, module: nn.Module) -> None:
    parent, _, name = target.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def _restore_unused_state(model: nn.Module, gm: fx.GraphModule, notes: List[str]) -> None:
    """fx copies only the modules the trace called, each at the first of its paths; put every other path of
    ``model`` back, so the fused model has the original's module tree and ``state_dict`` keys. A module
    registered under several names (or used from two containers) holds the same object at each of them -- the
    fused block where it was fused -- and modules the graph no longer calls (unused ones, and the ReLU / pool
    modules a block replaced) are the original objects."""
    mapped: Dict[int, nn.Module] = {}  # id of a module of ``model`` -> what stands for it in ``gm``
    have = dict(gm.named_modules(remove_duplicate=False))
    everything = list(model.named_modules(remove_duplicate=False))
    for path, m in everything:
        if path and path in have:
            mapped.setdefault(id(m), have[path])
    kept, aliased = [], []
    for path, m in everything:
        if not path or path in have:
            continue
        if id(m) in mapped:
            stand_in = mapped[id(m)]
            aliased.append(path)
        elif any(id(d) in mapped for d in m.modules()):
            # a container not called, holding a module that is called (elsewhere): a plain container of its own,
            # so the modules below it are the fused model's (fused blocks included), not the originals
            stand_in = nn.Module()
            stand_in.training = m.training
            for k, p in m._parameters.items():
                stand_in.register_parameter(k, p)
            for k, t in m._buffers.items():
                stand_in.register_buffer(k, t, persistent=k not in m._non_persistent_buffers_set)
        else:
            stand_in = m
            if next(m.parameters(), None) is not None or next(m.buffers(), None) is not None:
                kept.append(path)
        parent, _, leaf = path.rpartition(".")
        (gm.get_submodule(parent) if parent else gm).add_module(leaf, stand_in)
        mapped.setdefault(id(m), stand_in)
        for sub, s in stand_in.named_modules(prefix=path, remove_duplicate=False):
            have.setdefault(sub, s)
    # parameters and buffers held directly by a container fx created (not referenced by the graph)
    own = set(gm.state_dict().keys())
    for k in [k for k in model.state_dict().keys() if k not in own]:
        path, _, attr = k.rpartition(".")
        src, dst = model.get_submodule(path) if path else model, gm.get_submodule(path) if path else gm
        if attr in src._parameters:
            dst.register_parameter(attr, src._parameters[attr])
        elif attr in src._buffers:
            dst.register_buffer(attr, src._buffers[attr], persistent=attr not in src._non_persistent_buffers_set)
    if kept:
        notes.append(f"modules not called by forward kept for the state_dict: {', '.join(kept)}")
    if aliased:
        notes.append(f"modules registered under several names hold the same module at each: {', '.join(aliased)}")


# --------------------------------------------------------------------------- one graph per mode


class _TwoModeGraphModule(fx.GraphModule):
    """The ``GraphModule`` ``fuse`` returns when ``forward`` traces differently in training and eval mode
    (``F.dropout(x, p, training=self.training)``, torchvision's ``StochasticDepth``, ``if self.training:``):
    the trace freezes the flag, so it holds one graph per mode and runs the one of its own ``training`` flag
    at every call, as the original reads its flag at every call. ``graph`` and ``code`` are those of the mode
    ``fuse`` ran in; ``mode_graphs`` has both. Copies, deep copies and pickles keep both graphs."""

    def _set_other(self, graph: fx.Graph, graph_training: bool) -> None:
        self.__dict__["_graph_training"] = bool(graph_training)  # the mode of self.graph
        self.__dict__["_other_graph"] = graph
        self.recompile()

    @property
    def mode_graphs(self) -> Dict[bool, fx.Graph]:
        """``{True: training-mode graph, False: eval-mode graph}``."""
        t = self.__dict__["_graph_training"]
        return {t: self.graph, not t: self.__dict__["_other_graph"]}

    def recompile(self):
        python_code = super().recompile()
        other = self.__dict__.get("_other_graph")
        if other is not None:  # None while GraphModule.__init__ compiles the first graph
            cls = type(self)
            this = cls.forward
            pc = other.python_code(root_module="self")
            that = fx.graph_module._forward_from_src(pc.src, pc.globals)
            t = self.__dict__["_graph_training"]
            cls.forward = _dispatcher(this, this if t else that, that if t else this)
        return python_code

    def __deepcopy__(self, memo):
        res = super().__deepcopy__(memo)
        for k in ("fuse_report",):
            if k in self.__dict__:
                res.__dict__[k] = copy.deepcopy(self.__dict__[k], memo)
        res._set_other(copy.deepcopy(self.__dict__["_other_graph"]), self.__dict__["_graph_training"])
        return res

    def __copy__(self):
        res = _TwoModeGraphModule(self, self.graph, type(self).__name__)
        res._modules.update(self._modules)  # the whole tree, shared as a shallow copy shares it
        res._parameters.update(self._parameters)
        res._buffers.update(self._buffers)
        res._non_persistent_buffers_set |= self._non_persistent_buffers_set
        res.meta = getattr(self, "meta", {})
        if "fuse_report" in self.__dict__:
            res.__dict__["fuse_report"] = self.__dict__["fuse_report"]
        res._set_other(self.__dict__["_other_graph"], self.__dict__["_graph_training"])
        return res

    def __reduce__(self):
        fn, (body, imports) = super().__reduce__()
        body = dict(body)
        other, t = body.pop("_other_graph"), body.pop("_graph_training")
        pc = other.python_code(root_module="self")
        other_imports = fx.graph_module._format_import_block(pc.globals, fx.graph_module.sys_importer)
        return _rebuild_two_mode, (body, imports, pc.src, other_imports, t)

    def __reduce_package__(self, exporter):
        raise NotImplementedError(
            "drmm_kernels.fuse: torch.package cannot keep the fused model's second graph "
            "(one per training/eval mode); save its state_dict and fuse again on load"
        )


def _rebuild_two_mode(body, imports, other_src, other_imports, graph_training):
    """Unpickle a ``_TwoModeGraphModule``: each graph re-traced from its code, as fx does for one."""
    primary = fx.graph_module.reduce_graph_module(dict(body), imports)
    other = fx.graph_module.reduce_graph_module({**body, "_code": other_src}, other_imports)
    res = _TwoModeGraphModule(
        fx.graph_module._CodeOnlyModule(dict(body)),
        primary.graph,
        body.get("_graphmodule_cls_name", type(primary).__name__),
    )
    for k, v in body.items():
        if not hasattr(res, k):
            setattr(res, k, v)
    res._set_other(other.graph, graph_training)
    return res


def _dispatcher(like, train_forward, eval_forward):
    """A ``forward`` with the signature of ``like`` (the traced forward, so fx can trace the fused model in
    turn) that calls ``train_forward`` or ``eval_forward`` by ``self.training``."""
    sig = inspect.signature(like)
    glb: Dict[str, Any] = {"_drmm_train_forward": train_forward, "_drmm_eval_forward": eval_forward}
    params, call, star = [], [], False
    ps = list(sig.parameters.values())
    me = ps[0].name
    for i, p in enumerate(ps[1:]):
        if p.kind is p.VAR_POSITIONAL:
            params.append(f"*{p.name}"), call.append(f"*{p.name}")
            star = True
            continue
        if p.kind is p.VAR_KEYWORD:
            params.append(f"**{p.name}"), call.append(f"**{p.name}")
            continue
        if p.kind is p.KEYWORD_ONLY and not star:
            params.append("*")
            star = True
        text = p.name
        if p.default is not p.empty:
            glb[f"_drmm_default_{i}"] = p.default
            text += f"=_drmm_default_{i}"
        params.append(text)
        call.append(f"{p.name}={p.name}" if p.kind is p.KEYWORD_ONLY else p.name)
    src = (
        f"def forward({', '.join([me] + params)}):\n"
        f"    return (_drmm_train_forward if {me}.training else _drmm_eval_forward)({', '.join([me] + call)})\n"
    )
    exec(compile(src, "<drmm_kernels.fuse: forward by training flag>", "exec"), glb)
    return glb["forward"]


def _trace(model: nn.Module, training: Optional[bool]) -> fx.Graph:
    """The fx graph of ``model.forward`` with every module's ``training`` flag set to ``training`` (None: as
    they are); the flags are set directly (no ``train()`` override runs) and restored afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    try:
        if training is not None:
            for m, _ in flags:
                m.training = training
        return _Tracer().trace(model)
    finally:
        for m, f in flags:
            m.training = f


def _code(graph: fx.Graph) -> str:
    return graph.python_code(root_module="self").src


def _trace_modes(model: nn.Module, name: str, report_notes: List[str]) -> Dict[bool, fx.Graph]:
    """One graph if ``forward`` traces the same in both modes, else one per mode (``True``: training)."""
    mode = bool(model.training)
    graphs = {mode: _trace(model, mode)}
    other = _trace(model, not mode)
    if _code(other) != _code(graphs[mode]):
        graphs[not mode] = other
    leaf = _Tracer().is_leaf_module  # modules called as a whole read their own flag at run time
    mixed = sorted({p for p, m in model.named_modules() if p and m.training != mode and not leaf(m, p)})
    if mixed and _code(_trace(model, None)) != _code(graphs[mode]):
        # the graph of a mode is what model.train(mode) makes: modules fx traces through follow the model's flag
        msg = (
            f"{name} is in {_mode_name(mode)} mode but {len(mixed)} of its modules are not "
            f"({', '.join(mixed[:4])}{', ...' if len(mixed) > 4 else ''}), and forward traces differently for "
            f"that: the fused model reproduces {name} after {'.train()' if mode else '.eval()'}, where every "
            f"module has the model's flag (modules called as a whole, such as BatchNorm or Dropout, keep their "
            f"own)"
        )
        warnings.warn("drmm_kernels.fuse: " + msg, stacklevel=3)
        report_notes.append(msg)
    return graphs


# --------------------------------------------------------------------------- nn.Sequential fallback


def _fuse_sequential(model: nn.Module, report: FuseReport, strict: Optional[str] = None) -> nn.Module:
    """Fuse, in place, the chains inside the plain ``nn.Sequential`` containers of ``model``; the activation and
    pool modules a block replaced become its ``unfused_act`` / ``unfused_pool`` children (their slots hold
    ``FusedAwaySlot``), a fused BatchNorm2d's slot a ``FusedAwayBatchNorm2d``. ``strict`` (the caller's name): raise
    ``ValueError`` listing every chain a rule refuses, before changing anything, instead of reporting it."""
    found, refused = sequential_matches(model)
    if strict:
        bad = [f"{r.chain}: {r.reason}" for _, r in refused if r.found]
        if bad:
            raise ValueError(
                f"drmm_kernels.{strict}: nothing fused, the fused ops cannot compute "
                + ("; ".join(bad) if len(bad) == 1 else "\n  " + "\n  ".join(bad))
            )
    for view, r in refused:
        report.refused.append(_refused(view, r))
    for seq, view, ch in found:
        where = view.path(ch.conv)
        replaced = [f"{where}.unfused_act"] + ([f"{where}.unfused_pool"] if ch.pool is not None else [])
        extra = dict(
            path=where,
            chain=ch.desc,
            act_module=ch.module("act"),
            pool_module=ch.module("pool"),
            replaced_paths=replaced,
            as_children=True,
        )
        conv, bn = ch.module("conv"), ch.module("bn")
        if bn is None:
            fused = FusedConvActPool2d._build(
                conv, ch.padding, ch.slope, ch.pool_window, ch.order, ch.relu_module, **extra
            )
        else:
            slot = FusedAwayBatchNorm2d._from(bn, where)
            setattr(seq, view.children[ch.bn][0], slot)
            fused = FusedConvBNActPool2d._build(
                conv, slot, view.path(ch.bn), ch.padding, ch.slope, ch.pool_window, ch.order, ch.relu_module, **extra
            )
        setattr(seq, view.children[ch.conv][0], fused)
        for i, child in ((ch.act, "unfused_act"), (ch.pool, "unfused_pool")):
            if i is not None:
                setattr(seq, view.children[i][0], FusedAwaySlot._from(view.children[i][1], where, f"{where}.{child}"))
        report.fused.append(FusedBlock(where, ch.desc, type(fused).__name__))
    return model


# --------------------------------------------------------------------------- entry point


def fuse(model: nn.Module, example_inputs: Union[Tensor, Sequence[Any], None] = None) -> nn.Module:
    """Replace every ``conv2d → [batch_norm] → relu/leaky_relu → [max_pool2d]`` chain of ``model`` that the
    fused ops compute exactly; returns the fused model, with ``fused.fuse_report`` saying what was
    fused and what was refused, and why.

    The model is traced with ``torch.fx`` (chains in ``nn.Sequential`` or written as calls in
    ``forward``, activation before or after the pool); the result is then a ``torch.fx.GraphModule``
    that shares ``model``'s parameters and buffers. If fx cannot trace ``model``, the chains inside
    ``nn.Sequential`` containers are fused in ``model`` itself, which is returned. Use the returned model.
    Where ``forward`` traces differently in training and eval mode, the fused model holds a graph per mode
    (``fused.mode_graphs``) and runs the one of its ``training`` flag, so it matches ``model`` in both modes
    after any ``.train()`` / ``.eval()``; a module is fused only where both modes' graphs fuse it alike.

    Each fused chain is one ``FusedConvActPool2d`` (a ``FusedConvReLUPool2d``) or, with a BatchNorm2d,
    one ``FusedConvBNActPool2d`` (a ``FusedConvBNReLUPool2d``), registered at the conv's path with the
    conv's parameters; the BatchNorm2d keeps its path, so the original ``state_dict`` loads unchanged.
    A BN in training mode runs ``conv_bn_relu_pool`` on the batch statistics and updates the running
    statistics like ``BatchNorm2d``; in eval mode its running statistics are folded.

    Chains are refused (and reported) where fusing would change the result or lose a value, or the op
    contract does not cover them (``drmm_kernels.fusion_rules``): a pool stride above its kernel size (gapped windows),
    pool padding above kernel // 2, pool dilation, pool > 4, non-square pools, ``return_indices=True``, conv
    dilation or groups, a padding mode other than zeros, non-square stride or padding (``padding="same"`` is ``(k -
    1) // 2`` for an odd kernel and refused for an even one), a leaky_relu slope outside [0, 1), a subclass of
    Conv2d / BatchNorm2d / ReLU / LeakyReLU / MaxPool2d that overrides its class's forward (one that keeps it is
    fused as the class), an intermediate used elsewhere, a conv or BN module also called outside a fusable chain (or
    in another chain, or in another mode). A conv → activation whose pool is refused is fused with ``pool=1``. A module
    registered under several names is fused at all of them alike. Inside ``drmm_kernels.attribution("guided")`` or
    ``("deconvnet")`` a block whose ReLU comes before an overlapping pool runs unfused, because the rule acts on the
    sum the overlapping windows route to a position.

    Hooks on the modules a block replaced (the ``nn.ReLU``, ``nn.MaxPool2d``, ``BatchNorm2d``, kept at their
    paths) make the block run unfused through them, so Captum's ``GuidedBackprop``, ``Deconvolution``,
    ``Saliency`` and layer methods on those modules give the original's attributions; a forward or backward
    hook on the block itself raises ``RuntimeError`` (use ``drmm_kernels.attribution`` for the fused path).

    ``example_inputs`` (a tensor or a tuple of the forward's arguments) lets ``fuse`` check each conv's
    input rank and dtype on fake tensors (nothing is computed and no statistics change).

    >>> import torch.nn.functional as F
    >>> class Net(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.conv1, self.conv2 = nn.Conv2d(1, 4, 5), nn.Conv2d(4, 8, 5)
    ...         self.fc = nn.Linear(8 * 3 * 3, 10)
    ...     def forward(self, x):
    ...         x = F.relu(F.max_pool2d(self.conv1(x), 3, stride=2, padding=1))  # overlapping windows: fused
    ...         x = F.max_pool2d(F.relu(self.conv2(x)), 2, stride=3)  # gapped windows: refused
    ...         return self.fc(x.flatten(1))
    >>> net = Net()
    >>> fused = fuse(net)
    >>> type(fused.conv1).__name__, fused.conv1.pool_window, fused.conv2.pool
    ('FusedConvActPool2d', {'pool': 3, 'pool_stride': 2, 'pool_padding': 1, 'ceil_mode': False}, 1)
    >>> print(fused.fuse_report)  # doctest: +NORMALIZE_WHITESPACE
    fuse(Net) [torch.fx trace]: 2 fused, 1 refused
      fused    conv1: conv1 (Conv2d) -> max_pool2d(3) -> relu  ->  FusedConvActPool2d
      fused    conv2: conv2 (Conv2d) -> relu  ->  FusedConvActPool2d
      refused  max_pool2d_1: conv2 (Conv2d) -> relu -> max_pool2d(2)  --  pool stride (3, 3) for kernel (2, 2)
               (the fused ops take one stride from 1 to the kernel size: no gapped windows); the conv -> activation
               before it is fused with pool=1
    >>> x = torch.randn(2, 1, 28, 28)
    >>> torch.allclose(fused(x), net(x), atol=1e-5)
    True
    >>> sorted(fused.state_dict()) == sorted(net.state_dict())
    True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"drmm_kernels.fuse: model must be an nn.Module, got {type(model).__name__}")
    name = type(model).__name__
    notes: List[str] = []
    try:
        graphs = _trace_modes(model, name, notes)
    except Exception as e:  # data-dependent control flow, untraceable calls, ...
        report = FuseReport(name, "modules")
        report.notes.append(
            f"torch.fx could not trace {name} ({type(e).__name__}: {_first_line(e)}); "
            f"fused the chains inside nn.Sequential containers only, assuming nothing else "
            f"calls their modules"
        )
        if example_inputs is not None:
            report.notes.append("example_inputs not used (no trace)")
        fused = _fuse_sequential(model, report)
    else:
        report = FuseReport(name, "fx", notes=notes)
        fused = _fuse_fx(model, graphs, report, example_inputs, name)
    fused.fuse_report = report
    return fused


def fuse_conv_relu_pool(model: nn.Module) -> List[str]:
    """Fuse, in place, the chains inside ``model``'s ``nn.Sequential`` containers that ``drmm_kernels.fuse``
    fuses there (``Conv2d → [BatchNorm2d] → ReLU/LeakyReLU → [MaxPool2d]``, or the pool before the activation;
    the rules are ``drmm_kernels.fusion_rules``). Returns the paths of the fused blocks.

    Each block takes its conv's slot and parameters, so ``state_dict`` keys are unchanged; the activation and
    the pool become the block's ``unfused_act`` / ``unfused_pool`` children and their slots a ``FusedAwaySlot``
    (an ``nn.Identity`` that raises ``RuntimeError`` if hooked, naming the child to hook instead). A hook on one of
    those children (Captum's ``GuidedBackprop`` / ``Deconvolution`` hook every ``nn.ReLU``) makes the block
    run the original chain through them, so attributions match the unfused model's; a forward or backward hook
    on the block itself raises ``RuntimeError`` (``drmm_kernels.attribution`` gives those methods through the
    fused ops). Where a rule refuses a chain (the conv, batch norm, activation or pool is outside what the ops
    compute), ``ValueError`` names every such chain and nothing is changed; ``fuse(model)`` instead reports
    them and fuses the rest.

    >>> net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten())
    >>> fuse_conv_relu_pool(net)
    ['0']
    >>> type(net[0]).__name__, net[0].pool, type(net[1]).__name__
    ('FusedConvActPool2d', 2, 'FusedAwaySlot')
    """
    report = FuseReport(type(model).__name__, "modules")
    _fuse_sequential(model, report, strict="fuse_conv_relu_pool")
    return [b.name for b in report.fused]
