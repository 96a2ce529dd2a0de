"""What may be fused: the one pattern list, rule table and matcher behind ``drmm_kernels.fuse`` (its torch.fx
trace and its ``nn.Sequential`` fallback) and ``fuse_conv_relu_pool``.

- ``PATTERNS``: the chains the fused ops compute, as sequences of *roles*; a member after a complete chain (the
  pool after ``conv -> act``) is taken where it can be fused and left out, with the reason, where not.
- ``ROLES``: which modules, functions and tensor methods fill each role. A subclass of a role's module class
  counts as that class while it keeps the class's ``forward``; one that overrides it is refused, naming it.
- ``_conv_reason`` / ``_bn_reason`` / ``_act_slope`` / ``_pool_reason``: the op contract's limits on each member.
- ``REASONS``: every refusal text, as a template; ``reason(key, **fields)`` fills one.
- ``match(view, head)``: walks one chain from a conv. A *view* says what follows what: ``FxView`` over a traced
  graph (a member's consumers are its node's users), ``SequentialView`` over an ``nn.Sequential``'s children
  (the next child). Both classify members with ``member_of_module`` and the same rules, so the trace, the
  fallback and the in-place helper fuse the same chains and give the same reasons.

The padding rules follow what the ops compute exactly: they pad with zeros, by one int on every side, so
``padding="valid"`` is 0 and ``padding="same"`` is ``(k - 1) // 2`` for an odd kernel (``F.conv2d`` gives the same
values either way); an even kernel's ``"same"`` pads one more row and column at the bottom and right, which no
int padding reproduces. Activations: ``relu`` and ``leaky_relu`` with a slope in [0, 1) (``negative_slope``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .contract import MAX_POOL, plain_pool

# --------------------------------------------------------------------------- patterns and roles

#: The chains the fused ops compute, by role, in the order the model applies them. For a monotone activation
#: ``act(max(v)) == max(act(v))``, so the pool may come before or after it.
PATTERNS: Tuple[Tuple[str, ...], ...] = (
    ("conv", "act"),
    ("conv", "act", "pool"),
    ("conv", "pool", "act"),
    ("conv", "bn", "act"),
    ("conv", "bn", "act", "pool"),
    ("conv", "bn", "pool", "act"),
)


@dataclass(frozen=True)
class Role:
    """What fills one role of a chain: module classes, and (in a traced graph) functions and tensor methods."""

    name: str  # as refusals name it
    modules: Tuple[type, ...]
    functions: Tuple[Callable, ...] = ()
    methods: Tuple[str, ...] = ()


ROLES: Dict[str, Role] = {
    "conv": Role("conv", (nn.Conv2d,)),  # a module: the fused block takes over its parameters and path
    "bn": Role("batch_norm", (nn.BatchNorm2d,)),  # a module: the block reads its statistics from it
    "act": Role(
        "activation",
        (nn.ReLU, nn.LeakyReLU),
        (F.relu, torch.relu, torch.relu_, F.relu_, F.leaky_relu, F.leaky_relu_),
        ("relu", "relu_"),
    ),
    "pool": Role("max_pool2d", (nn.MaxPool2d,), (F.max_pool2d, F.max_pool2d_with_indices, torch.max_pool2d)),
}

_LEAKY_FUNCS = (F.leaky_relu, F.leaky_relu_)
_POOL_ARGS = ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
_FORWARDS = {nn.Conv2d: ("forward", "_conv_forward")}  # Conv2d.forward calls _conv_forward: both must be Conv2d's

# activations the fused ops do not compute, named in refusals instead of "no activation follows"
OTHER_ACTIVATIONS = frozenset(
    {
        "relu6",
        "silu",
        "gelu",
        "hardswish",
        "hardtanh",
        "hardsigmoid",
        "elu",
        "selu",
        "celu",
        "prelu",
        "rrelu",
        "mish",
        "softplus",
        "sigmoid",
        "tanh",
        "logsigmoid",
        "softsign",
        "tanhshrink",
        "threshold",
        "glu",
        "softmax",
        "log_softmax",
    }
)

# --------------------------------------------------------------------------- refusal reasons

REASONS: Dict[str, str] = {
    # a member the ops cannot compute as the model does
    "overrides_forward": "{cls} overrides {base}'s forward",
    "lazy_conv": "lazy conv not initialised yet (run one forward first)",
    "groups": "grouped convolution (groups={groups}{kind}) is outside the op contract",
    "dilation": "dilated convolution (dilation={dilation}) is outside the op contract",
    "padding_mode": "padding_mode={mode!r} (the fused ops pad with zeros only)",
    "conv_stride": "non-square conv stride {stride}",
    "same_even_kernel": "padding='same' with an even kernel {kernel} pads asymmetrically",
    "conv_padding": "non-square conv padding {padding}",
    "bn_channels": "BatchNorm2d({features}) after a conv with {channels} channels",
    "bn_momentum": "BatchNorm2d momentum {momentum} outside [0, 1]",
    "slope_at_run_time": "negative_slope computed at run time",
    "slope_range": "leaky_relu negative_slope={slope:g} outside [0, 1) (the fused ops' range)",
    "pool_args_at_run_time": "max_pool2d arguments computed at run time",
    "return_indices": "return_indices=True: the indices would be lost (the fused ops record switches instead)",
    "pool_window": "non-square pool window {window}",
    "pool_stride": "pool stride {stride} for kernel {window} (the fused ops take one stride from 1 to the kernel size: "
    "no gapped windows)",
    "pool_padding": "pool padding {padding} (the fused ops take one padding from 0 to kernel // 2)",
    "pool_dilation": "pool dilation {dilation}",
    "pool_size": "pool kernel {size} > {max_pool} (the fused ops pool 1..{max_pool})",
    # the chain's shape
    "not_followed": "no {expected} follows{subject} ({where})",
    "other_activation": "the {subject} is followed by {named}, an activation the fused ops do not compute "
    "(ReLU / LeakyReLU only)",
    "also_used": "the {subject} output{before} is also used by {users}",
    "pool_left_out": "{reason}; the conv -> activation before it is fused with pool=1",
    "not_one_chain": "{chain} is not one conv -> activation [-> max_pool2d] chain",
    # where the chain is used (a view's own checks)
    "input_rank": "the conv input is {rank}-D in example_inputs (the fused ops take NCHW batches)",
    "input_dtype": "the conv input is {dtype} in example_inputs",
    "registered_elsewhere": "module also registered at {paths} (its other uses cannot be seen)",
    # a module called at several sites of a trace (drmm_kernels.fuse)
    "called_unfused": "{module} is also called unfused ({sites})",
    "chain_per_mode": "{module} is in a different chain in training and in eval mode",
    "through_other_modules": "{module} is called in {n} chains through different activation / pool modules "
    "({through}): one fused block runs unfused through one set of them when they are hooked",
    "different_chains": "{module} is called in {n} different chains",
    "bn_called_unfused": "batch norm {module} is also called unfused ({sites})",
}


def reason(key: str, **fields: Any) -> str:
    """The refusal text ``key`` of ``REASONS`` with its fields filled in."""
    return REASONS[key].format(**fields)


# --------------------------------------------------------------------------- members


@dataclass(frozen=True)
class Member:
    """One element of a model as the rules see it."""

    role: Optional[str]  # a key of ROLES, or None: no member of any chain
    desc: str  # as chain descriptions show it
    reason: Optional[str] = None  # why the ops cannot compute it (None: they can)
    value: Any = None  # conv: padding (int); act: negative slope; pool: the ops' pool arguments (dict)
    module: Optional[nn.Module] = None  # the module called, if it is one
    other_activation: Optional[str] = None  # role None: the name of an activation the ops do not compute


def _pair(v) -> Tuple[Any, Any]:
    if isinstance(v, (tuple, list)):
        return (v[0], v[0]) if len(v) == 1 else tuple(v)
    return (v, v)


def module_desc(path: str, m: nn.Module) -> str:
    kind = type(m).__name__
    if isinstance(m, nn.LeakyReLU):
        kind += f" {m.negative_slope:g}"
    elif isinstance(m, nn.MaxPool2d):
        kind += f" {m.kernel_size}"
    return f"{path} ({kind})"


def is_fused(m: nn.Module) -> bool:
    """Built by drmm_kernels (a fused block or the slot of a fused-away BatchNorm2d): never a chain member."""
    return bool(getattr(type(m), "drmm_kernels_fused", False))


def is_member_module(m: nn.Module) -> bool:
    """An instance of a role's module class: called as a whole (a torch.fx leaf), so that every path judges the
    module itself by the rules below and hooks on it keep firing."""
    return any(isinstance(m, role.modules) for role in ROLES.values())


def _overridden(m: nn.Module, base: type) -> Optional[str]:
    for attr in _FORWARDS.get(base, ("forward",)):
        if getattr(type(m), attr) is not getattr(base, attr):
            return reason("overrides_forward", cls=type(m).__name__, base=base.__name__)
    return None


def member_of_module(m: nn.Module, path: str) -> Member:
    """The member ``m`` (registered at ``path``) is, with the reason the ops cannot compute it, if any."""
    desc = module_desc(path, m)
    if is_fused(m):
        return Member(None, desc)
    for key, role in ROLES.items():
        base = next((b for b in role.modules if isinstance(m, b)), None)
        if base is None:
            continue
        why = _overridden(m, base)
        value = None
        if why is None and key == "conv":
            why, value = _conv_reason(m)
        elif why is None and key == "act":
            why, value = _act_slope(m.negative_slope if base is nn.LeakyReLU else 0.0)
        elif why is None and key == "pool":
            why, value = _pool_reason(
                dict(
                    kernel_size=m.kernel_size,
                    stride=m.stride,
                    padding=m.padding,
                    dilation=m.dilation,
                    ceil_mode=m.ceil_mode,
                    return_indices=m.return_indices,
                )
            )
        return Member(key, desc, why, value, m)
    if type(m).__module__ == "torch.nn.modules.activation":
        return Member(None, desc, module=m, other_activation=type(m).__name__)
    return Member(None, desc, module=m)


def _conv_reason(conv: nn.Conv2d) -> Tuple[Optional[str], int]:
    """(why the ops cannot compute ``conv``, or None; its padding as one int)."""
    if isinstance(conv.weight, nn.parameter.UninitializedParameter):
        return reason("lazy_conv"), 0
    if conv.groups != 1:
        kind = ", depthwise" if conv.groups == conv.in_channels else ""
        return reason("groups", groups=conv.groups, kind=kind), 0
    if tuple(conv.dilation) != (1, 1):
        return reason("dilation", dilation=tuple(conv.dilation)), 0
    if conv.padding_mode != "zeros":
        return reason("padding_mode", mode=conv.padding_mode), 0
    if conv.stride[0] != conv.stride[1]:
        return reason("conv_stride", stride=tuple(conv.stride)), 0
    pad = conv.padding
    if pad == "valid":
        pad = (0, 0)
    elif pad == "same":  # Conv2d allows it with stride 1 only; odd kernels pad (k - 1) // 2 on both sides
        kh, kw = conv.kernel_size
        if kh % 2 == 0 or kw % 2 == 0:
            return reason("same_even_kernel", kernel=tuple(conv.kernel_size)), 0
        pad = ((kh - 1) // 2, (kw - 1) // 2)
    if pad[0] != pad[1]:
        return reason("conv_padding", padding=tuple(pad)), 0
    return None, int(pad[0])


def _bn_reason(bn: nn.BatchNorm2d, conv: Optional[nn.Module]) -> Optional[str]:
    if conv is not None and bn.num_features != conv.out_channels:
        return reason("bn_channels", features=bn.num_features, channels=conv.out_channels)
    if bn.momentum is not None and not 0.0 <= bn.momentum <= 1.0:
        return reason("bn_momentum", momentum=bn.momentum)
    return None


def _act_slope(slope) -> Tuple[Optional[str], Optional[float]]:
    if not isinstance(slope, (int, float)) or isinstance(slope, bool):
        return reason("slope_at_run_time"), None
    slope = float(slope)
    if not 0.0 <= slope < 1.0:
        return reason("slope_range", slope=slope), None
    return None, slope


def _pool_reason(a: Dict[str, Any]) -> Tuple[Optional[str], Optional[Dict[str, Any]]]:
    """(why the ops cannot compute this max-pool, or None; the ops' pool arguments) from ``max_pool2d``'s
    arguments."""
    if a["return_indices"]:
        return reason("return_indices"), None
    kh, kw = _pair(a["kernel_size"])
    stride = a["stride"]
    empty = stride is None or (isinstance(stride, (tuple, list)) and len(stride) == 0)
    sh, sw = (kh, kw) if empty else _pair(stride)
    if kh != kw:
        return reason("pool_window", window=(kh, kw)), None
    if not 1 <= kh <= MAX_POOL:
        return reason("pool_size", size=kh, max_pool=MAX_POOL), None
    if sh != sw or not 1 <= sh <= kh:
        return reason("pool_stride", stride=(sh, sw), window=(kh, kw)), None
    ph, pw = _pair(a["padding"])
    if ph != pw or not 0 <= ph <= kh // 2:
        return reason("pool_padding", padding=a["padding"]), None
    if _pair(a["dilation"]) != (1, 1):
        return reason("pool_dilation", dilation=a["dilation"]), None
    return None, dict(pool=int(kh), pool_stride=int(sh), pool_padding=int(ph), ceil_mode=bool(a["ceil_mode"]))


def _member_of_call(n: fx.Node) -> Member:
    """The member a ``call_function`` / ``call_method`` node is (functions fill the activation and pool roles)."""
    act, pool = ROLES["act"], ROLES["pool"]
    if n.op == "call_method":
        if n.target in act.methods:
            return Member("act", f".{n.target}()", None, 0.0)
        name = n.target.rstrip("_") if isinstance(n.target, str) else ""
        return Member(None, f".{n.target}()", other_activation=name if name in OTHER_ACTIVATIONS else None)
    if n.target in act.functions:
        if n.target not in _LEAKY_FUNCS:
            return Member("act", "relu", None, 0.0)
        slope = n.args[1] if len(n.args) > 1 else n.kwargs.get("negative_slope", 0.01)
        why, value = _act_slope(slope)
        desc = "leaky_relu" if isinstance(slope, fx.Node) else f"leaky_relu({slope:g})"
        return Member("act", desc, why, value)
    if n.target in pool.functions:
        a = dict(zip(_POOL_ARGS, n.args))
        a.update(n.kwargs)
        for k, v in (("stride", None), ("padding", 0), ("dilation", 1), ("ceil_mode", False)):
            a.setdefault(k, v)
        if n.target is F.max_pool2d_with_indices:
            a["return_indices"] = True
        else:
            a.setdefault("return_indices", False)
        desc = f"max_pool2d({a.get('kernel_size')})"
        if any(isinstance(v, fx.Node) for k, v in a.items() if k != "input"):
            return Member("pool", desc, reason("pool_args_at_run_time"))
        why, value = _pool_reason(a)
        return Member("pool", desc, why, value)
    name = getattr(n.target, "__name__", "")
    name = name.rstrip("_") if isinstance(name, str) else ""
    return Member(None, n.name, other_activation=name if name in OTHER_ACTIVATIONS else None)


# --------------------------------------------------------------------------- views


class FxView:
    """A traced graph: a member's consumers are its node's users. ``ranks`` (conv node -> (rank, dtype) of its
    input, from ``example_inputs``) adds the input check."""

    def __init__(self, gm: fx.GraphModule, ranks: Optional[Dict[fx.Node, Tuple[int, torch.dtype]]] = None):
        self.gm, self.ranks = gm, ranks or {}
        self._members: Dict[fx.Node, Member] = {}

    def member(self, n: fx.Node) -> Member:
        if n not in self._members:
            if n.op == "call_module":
                self._members[n] = member_of_module(self.gm.get_submodule(n.target), n.target)
            elif n.op in ("call_function", "call_method"):
                self._members[n] = _member_of_call(n)
            else:
                self._members[n] = Member(None, n.name)
        return self._members[n]

    def users(self, n: fx.Node) -> List[fx.Node]:
        return list(n.users)

    def name(self, n: fx.Node) -> str:
        """The name a refused block is listed under."""
        return n.target if n.op == "call_module" else n.name

    def names(self, nodes: Sequence[fx.Node]) -> str:
        return ", ".join("the model's output" if n.op == "output" else n.name for n in nodes)

    def where(self, users: Sequence[fx.Node]) -> str:
        return f"its output goes to {self.names(users)}" if users else "its output is unused"

    def other_named(self, n: fx.Node) -> str:
        m = self.member(n)
        return f"{n.target} ({m.other_activation})" if n.op == "call_module" else m.other_activation

    def chain_reason(self, elems: Sequence[fx.Node]) -> Optional[str]:
        if elems[0] not in self.ranks:
            return None
        rank, dtype = self.ranks[elems[0]]
        if rank != 4:
            return reason("input_rank", rank=rank)
        if dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            return reason("input_dtype", dtype=dtype)
        return None


class SequentialView:
    """The children of one ``nn.Sequential`` (elements are their indices): each child's output goes to the next
    child. ``paths`` (id of a module -> every path it is registered at) refuses chains whose conv or batch norm is
    registered elsewhere too, since other calls of it cannot be seen."""

    def __init__(
        self, prefix: str, children: Sequence[Tuple[str, nn.Module]], paths: Optional[Dict[int, List[str]]] = None
    ):
        self.prefix, self.children, self.paths = prefix, list(children), paths
        self._members: Dict[int, Member] = {}

    def path(self, i: int) -> str:
        return f"{self.prefix}.{self.children[i][0]}" if self.prefix else self.children[i][0]

    def member(self, i: int) -> Member:
        if i not in self._members:
            self._members[i] = member_of_module(self.children[i][1], self.path(i))
        return self._members[i]

    def users(self, i: int) -> List[int]:
        return [i + 1] if i + 1 < len(self.children) else []

    def name(self, i: int) -> str:
        return self.path(i)

    def names(self, items: Sequence[int]) -> str:
        return ", ".join(self.path(i) for i in items)

    def where(self, users: Sequence[int]) -> str:
        return (
            f"its output goes to {self.names(users)}"
            if users
            else f"it is the last module of {self.prefix or 'the model'}"
        )

    def other_named(self, i: int) -> str:
        return self.member(i).other_activation

    def chain_reason(self, elems: Sequence[int]) -> Optional[str]:
        if self.paths is None:
            return None
        here = {self.path(i) for i in elems}
        shared = [
            p
            for i in elems
            if self.member(i).role in ("conv", "bn")
            for p in self.paths[id(self.children[i][1])]
            if p not in here
        ]
        return reason("registered_elsewhere", paths=", ".join(shared)) if shared else None


View = Union[FxView, SequentialView]

# --------------------------------------------------------------------------- the matcher


@dataclass(frozen=True)
class Refusal:
    """A chain (or the pool after one) left unfused. ``found``: its members form a chain of ``PATTERNS`` that a
    rule refused (``fuse_conv_relu_pool`` raises for these), as against a conv that nothing fusable follows."""

    at: Any  # the element the refusal is listed under: the conv, or the pool left out
    chain: str
    reason: str
    found: bool
    pool_left_out: bool = False  # the conv -> activation before it is fused with pool=1

    @property
    def report_reason(self) -> str:
        return reason("pool_left_out", reason=self.reason) if self.pool_left_out else self.reason


@dataclass
class Match:
    """A chain the fused ops compute exactly: its elements in the order the model applies them, by role."""

    elems: List[Any]
    roles: Tuple[str, ...]
    members: List[Member]
    desc: str
    left_out: Optional[Refusal] = None  # a pool after the activation that could not come along

    def elem(self, role: str) -> Any:
        return self.elems[self.roles.index(role)] if role in self.roles else None

    def module(self, role: str) -> Optional[nn.Module]:
        return self.members[self.roles.index(role)].module if role in self.roles else None

    @property
    def conv(self):
        return self.elems[0]

    @property
    def bn(self):
        return self.elem("bn")

    @property
    def act(self):
        return self.elem("act")

    @property
    def pool(self):
        return self.elem("pool")

    @property
    def padding(self) -> int:
        return self.members[0].value

    @property
    def slope(self) -> float:
        return self.members[self.roles.index("act")].value

    @property
    def pool_window(self) -> Dict[str, Any]:
        """The ops' pool arguments (``pool=1``: no pool in the chain)."""
        return self.members[self.roles.index("pool")].value if "pool" in self.roles else plain_pool(1)

    @property
    def pool_size(self) -> int:
        return self.pool_window["pool"]

    @property
    def order(self) -> str:
        """Where the model applies the activation: ``"act-pool"`` or ``"pool-act"``."""
        return "pool-act" if "pool" in self.roles and self.roles.index("pool") < self.roles.index("act") else "act-pool"

    @property
    def relu_module(self) -> bool:
        """The activation is an ``nn.ReLU`` module (the ReLUs Captum and ``drmm_kernels.attribution`` rewrite)."""
        return isinstance(self.module("act"), nn.ReLU)


def _next_roles(roles: Tuple[str, ...]) -> List[str]:
    """The roles that may follow ``roles`` in a chain of ``PATTERNS``, in the order of ``ROLES``."""
    n = len(roles)
    nxt = {p[n] for p in PATTERNS if len(p) > n and p[:n] == roles}
    return [r for r in ROLES if r in nxt]


def _followers(view: View, elem, roles: Tuple[str, ...]):
    """(consumers of ``elem``'s output, the first of them that can extend ``roles`` or None)."""
    users = view.users(elem)
    allowed = _next_roles(roles)
    return users, next((u for u in users if view.member(u).role in allowed), None)


def match(view: View, head) -> Union[Match, Refusal]:
    """The chain starting at the conv ``head`` (``view.member(head).role == "conv"``), or why there is none.

    The members' shape is walked first (what follows what, and whether an intermediate is used elsewhere), then
    the rules: a conv the ops cannot compute is refused for that whenever a member or an activation follows it;
    otherwise a shape that is no chain is refused for that, and a chain for the first member (batch norm,
    activation, pool), or view check, that fails. A member after a complete chain comes along where it can."""
    elems, roles = [head], ("conv",)
    members = [view.member(head)]

    def desc(items) -> str:
        return " -> ".join(view.member(e).desc for e in items)

    shape = None  # why the members are no chain
    while roles not in PATTERNS:
        users, nxt = _followers(view, elems[-1], roles)
        subject = ROLES[roles[-1]].name
        if nxt is None:
            lacking = [u for u in users if view.member(u).other_activation]
            if lacking:
                named = ", ".join(view.other_named(u) for u in lacking)
                text = reason("other_activation", subject=subject, named=named)
            else:
                text = reason(
                    "not_followed",
                    expected="/".join(ROLES[r].name for r in _next_roles(roles)),
                    subject="" if len(roles) == 1 else f" the {subject}",
                    where=view.where(users),
                )
            shape = (desc(elems), text)
            break
        if len(users) > 1:
            before = " (before the activation)" if roles[-1] == "pool" else ""
            shape = (
                desc(elems + [nxt]),
                reason(
                    "also_used", subject=subject, before=before, users=view.names([u for u in users if u is not nxt])
                ),
            )
            break
        elems.append(nxt)
        members.append(view.member(nxt))
        roles += (members[-1].role,)

    conv = members[0]
    if conv.reason is not None:
        first = view.users(head)
        if any(view.member(u).role not in (None, "conv") or view.member(u).other_activation for u in first):
            return Refusal(head, desc([head] + first[:1]), conv.reason, found=shape is None)
    if shape is not None:
        return Refusal(head, shape[0], shape[1], found=False)
    why = None
    for role, m in zip(roles[1:], members[1:]):
        why = m.reason or (_bn_reason(m.module, conv.module) if role == "bn" else None)
        if why:
            break
    why = why or view.chain_reason(elems)
    if why is not None:
        return Refusal(head, desc(elems), why, found=True)

    left_out = None
    while _next_roles(roles):  # the optional member after a complete chain: the pool after the activation
        users, nxt = _followers(view, elems[-1], roles)
        if nxt is None:
            break
        why = view.member(nxt).reason
        if why is None and len(users) > 1:
            why = reason(
                "also_used",
                subject=ROLES[roles[-1]].name,
                before="",
                users=view.names([u for u in users if u is not nxt]),
            )
        if why is not None:
            left_out = Refusal(nxt, desc(elems + [nxt]), why, found=True, pool_left_out=True)
            break
        elems.append(nxt)
        members.append(view.member(nxt))
        roles += (members[-1].role,)
    return Match(elems, roles, members, desc(elems), left_out)


def sequential_matches(
    model: nn.Module,
) -> Tuple[List[Tuple[nn.Sequential, SequentialView, Match]], List[Tuple[SequentialView, Refusal]]]:
    """Every chain inside the plain ``nn.Sequential`` containers of ``model`` (walked in order; a chain's
    members are not heads of another), and every refusal, each with its view. Changes nothing."""
    paths: Dict[int, List[str]] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        paths.setdefault(id(m), []).append(name)
    found, refused = [], []
    for prefix, seq in list(model.named_modules()):
        if not isinstance(seq, nn.Sequential) or type(seq).forward is not nn.Sequential.forward:
            continue
        view = SequentialView(prefix, list(seq.named_children()), paths)
        i = 0
        while i < len(view.children):
            if view.member(i).role != "conv":
                i += 1
                continue
            result = match(view, i)
            if isinstance(result, Refusal):
                refused.append((view, result))
                i += 1
                continue
            found.append((seq, view, result))
            if result.left_out is not None:
                refused.append((view, result.left_out))
            i = result.elems[-1] + 1
    return found, refused
