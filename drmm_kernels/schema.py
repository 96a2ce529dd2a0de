"""The argument lists of the ops, one definition each (the Python counterpart of csrc/schema.cpp).

Each entry is written in the syntax of a ``torch.library`` schema, with the names, types and order of the C++
``drmm_C`` op of the same name (tests/kernels/test_schema.py compares them). Everything else follows from it or is
checked against it:

- the ``drmm::`` custom ops (drmm_kernels/dispatch.py ``CustomOp``) take their schema from here, are called with
  keywords only, hand their implementation the arguments as a dict by name, and order the gradients their
  backward returns (a dict by name) from here;
- every backend primitive (reference.py, cpu.py, cuda.py, triton/) takes keyword-only parameters with these
  names and is called with keywords; cpu.py and cuda.py pass them on to the C++ op in this order
  (tests/kernels/test_schema.py checks both).

So moving, adding or renaming an argument changes the entry here and the one in csrc/schema.cpp, and a call
site that does not follow fails with a ``TypeError`` naming the argument instead of binding a value to the
wrong parameter.

>>> SCHEMAS["unpool"].names
('values', 'switches', 'pool', 'pool_stride', 'pool_padding', 'ceil_mode', 'out_h', 'out_w')
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, Tuple

# Argument types a schema may use, and their ``torch.library`` spelling in a Python custom op (``int`` is
# ``SymInt`` there, as torch.library infers it for an ``int`` annotation, so sizes may be symbolic under
# torch.compile; the C++ ops take plain ``int``).
TYPES = {"Tensor": "Tensor", "Tensor?": "Tensor?", "int": "SymInt", "float": "float", "bool": "bool"}


@dataclass(frozen=True)
class Schema:
    """One op's arguments ``(name, type)`` in order, and its return types."""

    name: str
    arguments: Tuple[Tuple[str, str], ...]
    returns: Tuple[str, ...]

    @property
    def names(self) -> Tuple[str, ...]:
        return tuple(n for n, _ in self.arguments)

    @property
    def tensors(self) -> Tuple[str, ...]:
        """The arguments that can have a gradient."""
        return tuple(n for n, t in self.arguments if t.startswith("Tensor"))

    def torch_library(self) -> str:
        """The schema string (without the name) of this op as a Python ``torch.library`` custom op."""
        args = ", ".join(f"{TYPES[t]} {n}" for n, t in self.arguments)
        rets = self.returns[0] if len(self.returns) == 1 else f"({', '.join(self.returns)})"
        return f"({args}) -> {rets}"

    def __str__(self) -> str:
        args = ", ".join(f"{t} {n}" for n, t in self.arguments)
        rets = self.returns[0] if len(self.returns) == 1 else f"({', '.join(self.returns)})"
        return f"{self.name}({args}) -> {rets}"


_SCHEMA = re.compile(r"^(\w+)\((.*)\) -> (.+)$")


def parse(text: str) -> Schema:
    """A ``Schema`` from ``"name(Type arg, ...) -> Ret"`` or ``"... -> (Ret, Ret)"``."""
    m = _SCHEMA.match(" ".join(text.split()))
    if not m:
        raise ValueError(f"not an op schema: {text!r}")
    name, arg_text, ret_text = m.groups()
    arguments = []
    for item in filter(None, (a.strip() for a in arg_text.split(","))):
        typ, arg = item.rsplit(" ", 1)
        if typ not in TYPES:
            raise ValueError(f"{name}: argument {arg!r} has type {typ!r}, not one of {tuple(TYPES)}")
        arguments.append((arg, typ))
    returns = tuple(r.strip() for r in ret_text.strip("()").split(","))
    return Schema(name, tuple(arguments), returns)


# Argument meanings: drmm_kernels/dispatch.py (the primitives) and docs/ops.md (the public ops).
SCHEMAS: Dict[str, Schema] = {
    s.name: s
    for s in map(
        parse,
        (
            # the backend primitives, as in csrc/schema.cpp. A pool is PyTorch's max_pool2d window: kernel_size pool,
            # stride pool_stride, padding pool_padding, ceil_mode (docs/ops.md#pooling).
            "conv_relu_pool(Tensor x, Tensor weight, Tensor? scale, Tensor? shift, int stride, int padding, int pool, "
            "int pool_stride, int pool_padding, bool ceil_mode, float negative_slope) -> (Tensor, Tensor)",
            "bn_pool(Tensor z, Tensor scale, Tensor shift, int pool, int pool_stride, int pool_padding, "
            "bool ceil_mode, float negative_slope) -> (Tensor, Tensor)",
            "render(Tensor mu, Tensor switches, Tensor weight, Tensor? scale, int stride, int padding, int pool, "
            "int pool_stride, int pool_padding, bool ceil_mode, int out_h, int out_w, float negative_slope) -> Tensor",
            "gather_conv(Tensor src, Tensor weight, Tensor switches, int stride, int padding, int pool, "
            "int pool_stride, int pool_padding, bool ceil_mode) -> Tensor",
            "masked_values(Tensor mu, Tensor switches, Tensor? scale, float negative_slope) -> Tensor",
            "unpool(Tensor values, Tensor switches, int pool, int pool_stride, int pool_padding, bool ceil_mode, "
            "int out_h, int out_w) -> Tensor",
            "batch_stats(Tensor z) -> (Tensor, Tensor)",
            "render_wgrad(Tensor src, Tensor mu, Tensor switches, Tensor? scale, int stride, int padding, int pool, "
            "int pool_stride, int pool_padding, bool ceil_mode, float negative_slope, int kernel_h, int kernel_w) "
            "-> Tensor",
            # a custom op and the reference backend's whole-op function, no C++ op: the fast backends compose it from
            # batch_stats and bn_pool (drmm_kernels/ops/conv_bn_relu_pool.py); returns y, switches, mean, var, z
            "conv_bn_relu_pool(Tensor x, Tensor weight, Tensor? bn_weight, Tensor? bn_bias, Tensor? running_mean, "
            "Tensor? running_var, bool training, float eps, int stride, int padding, int pool, int pool_stride, "
            "int pool_padding, bool ceil_mode, float negative_slope) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
        ),
    )
}

#: The primitives a backend may implement (the rest come from the reference); each is a ``drmm_C`` op in C++.
PRIMITIVES = (
    "conv_relu_pool",
    "render",
    "gather_conv",
    "render_wgrad",
    "bn_pool",
    "masked_values",
    "unpool",
    "batch_stats",
)
