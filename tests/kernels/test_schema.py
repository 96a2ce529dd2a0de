"""One schema per op (drmm_kernels/schema.py): every backend primitive's signature, the C++ ``drmm_C`` op schemas,
the ``drmm::`` custom ops and their backward functions agree with it."""

import ast
import importlib
import inspect
from pathlib import Path

import pytest
import torch

import drmm_kernels as dk
from drmm_kernels import dispatch
from drmm_kernels.schema import PRIMITIVES, SCHEMAS, parse

import op_cases as oc
from drmm_kernels.contract import plain_pool  # noqa: E402

BACKEND_MODULES = {
    "reference": "drmm_kernels.reference",
    "cpu": "drmm_kernels.cpu",
    "cuda": "drmm_kernels.cuda",
    "triton": "drmm_kernels.triton",
}


def _backend(name):
    if name in ("cpu", "cuda") and not dispatch.load_extension():
        pytest.skip(f"{name}: {dispatch.extension_error()}")
    try:
        return importlib.import_module(BACKEND_MODULES[name])
    except ImportError as exc:
        pytest.skip(f"{name} backend not importable: {exc}")


def _functions(name):
    """(op, function) for every primitive the backend defines; the triton backend's lazily imported kernels
    are loaded (under TRITON_INTERPRET=1 on CPU, tests/conftest.py)."""
    mod = _backend(name)
    ops = PRIMITIVES + (("conv_bn_relu_pool",) if name == "reference" else ())
    for op in ops:
        fn = getattr(mod, op, None)
        if fn is not None and hasattr(fn, "load"):
            try:
                fn = fn.load()
            except ImportError as exc:
                pytest.skip(f"{name} kernels not importable: {exc}")
        if fn is not None:
            yield op, fn


def test_schema_is_parsed_and_printed_alike():
    text = (
        "render(Tensor mu, Tensor switches, Tensor weight, Tensor? scale, int stride, int padding, int pool, "
        "int pool_stride, int pool_padding, bool ceil_mode, int out_h, int out_w, float negative_slope) -> Tensor"
    )
    assert str(parse(text)) == text == str(SCHEMAS["render"])
    assert SCHEMAS["render"].tensors == ("mu", "switches", "weight", "scale")
    with pytest.raises(ValueError, match="type 'int\\[\\]'"):
        parse("f(int[] size) -> Tensor")
    assert dispatch.PRIMITIVES is PRIMITIVES and set(PRIMITIVES) < set(SCHEMAS)


@pytest.mark.parametrize("backend", list(BACKEND_MODULES))
def test_backend_signatures_match_the_schema(backend):
    found = dict(_functions(backend))
    if backend == "reference":
        assert set(found) == set(PRIMITIVES) | {"conv_bn_relu_pool"}, "the reference implements every primitive"
    for op, fn in found.items():
        params = inspect.signature(fn).parameters.values()
        names = tuple(p.name for p in params)
        assert names == SCHEMAS[op].names, f"{backend}.{op}{names} is not {SCHEMAS[op]}"
        for p in params:
            assert p.kind is p.KEYWORD_ONLY and p.default is p.empty, (
                f"{backend}.{op}: parameter {p.name} must be keyword-only without a default (callers name every one)"
            )


def test_cpp_op_schemas_match_the_python_ones():
    if not dispatch.load_extension():
        pytest.skip(dispatch.extension_error())
    cpp = {n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("drmm_C::")}
    assert cpp - {"built_with_cuda"} == set(PRIMITIVES)
    for op in PRIMITIVES:
        got = getattr(torch.ops.drmm_C, op).default._schema
        py = SCHEMAS[op]
        assert [a.name for a in got.arguments] == list(py.names), op
        assert str(got) == f"drmm_C::{py}", f"csrc/schema.cpp and drmm_kernels/schema.py disagree on {op}"


def _argument_name(node):
    """``x`` for an argument written ``x``, ``int(x)`` or ``float(x)``."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("int", "float"):
        node = node.args[0]
    return node.id if isinstance(node, ast.Name) else ast.unparse(node)


@pytest.mark.parametrize("backend", ["cpu", "cuda"])
def test_cpp_ops_are_called_in_schema_order(backend):
    """cpu.py and cuda.py call the drmm_C ops positionally (cheaper than keywords): each primitive must pass its
    own parameters, in schema order, to the C++ op of the same name."""
    tree = ast.parse((Path(dispatch.__file__).parent / f"{backend}.py").read_text())
    checked = set()
    for fn in tree.body:
        if not isinstance(fn, ast.FunctionDef):
            continue
        for node in ast.walk(fn):
            if isinstance(node, ast.Call) and ast.unparse(node.func).startswith("torch.ops.drmm_C."):
                op = ast.unparse(node.func).split(".")[3]
                if op == "built_with_cuda":
                    continue
                where = f"{backend}.{fn.name}, line {node.lineno}"
                assert op == fn.name and not node.keywords, where
                assert [_argument_name(a) for a in node.args] == list(SCHEMAS[op].names), where
                checked.add(op)
    assert checked, f"no drmm_C call found in {backend}.py"


def test_custom_ops_take_their_schema():
    assert set(dispatch.CUSTOM_OPS) == set(_SAMPLES)
    for name, op in dispatch.CUSTOM_OPS.items():
        assert op.schema is SCHEMAS[name]
        assert str(getattr(torch.ops.drmm, name).default._schema) == f"drmm::{name}{SCHEMAS[name].torch_library()}"


def _samples():
    x, w, scale, shift = oc.small(torch.float64)
    y, sw = dk.conv_relu_pool(x, w, scale, shift, padding=1)
    mu = torch.randn_like(y)
    geo = dict(stride=1, padding=1, **plain_pool(2))
    c = w.shape[0]
    bn = dict(x=x, weight=w, bn_weight=scale, bn_bias=shift, eps=1e-5, negative_slope=0.1, **geo)
    return {
        "conv_relu_pool": [
            dict(x=x, weight=w, scale=scale, shift=shift, negative_slope=0.1, **geo),
            dict(x=x, weight=w, scale=scale, shift=shift, stride=1, padding=0, **plain_pool(1), negative_slope=0.0),
        ],
        "conv_bn_relu_pool": [
            dict(running_mean=None, running_var=None, training=True, **bn),
            dict(
                running_mean=torch.zeros(c, dtype=x.dtype),
                running_var=torch.ones(c, dtype=x.dtype),
                training=False,
                **bn,
            ),
        ],
        "render": [dict(mu=mu, switches=sw, weight=w, scale=scale, out_h=7, out_w=6, negative_slope=0.1, **geo)],
        "gather_conv": [dict(src=x, weight=w, switches=sw, **geo)],
        "render_wgrad": [
            dict(src=x, mu=mu, switches=sw, scale=scale, negative_slope=0.1, kernel_h=3, kernel_w=3, **geo)
        ],
        "masked_values": [dict(mu=mu, switches=sw, scale=scale, negative_slope=0.1)],
        "unpool": [dict(values=mu, switches=sw, **plain_pool(2), out_h=7, out_w=6)],
    }


_SAMPLES = _samples()


@pytest.mark.parametrize("via", ["eager", "custom_op"])
@pytest.mark.parametrize("name", sorted(_SAMPLES))
def test_every_backward_names_only_its_arguments(name, via):
    """Every floating input requires a gradient, so each backward returns all it can: CustomOp refuses a name
    that is not a tensor argument of the op's schema, through the eager path and the torch.library one."""
    op = dispatch.CUSTOM_OPS[name]
    for sample in _SAMPLES[name]:
        kwargs = {
            k: v.detach().clone().requires_grad_() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
            for k, v in sample.items()
        }
        out = op(**kwargs) if via == "eager" else getattr(torch.ops.drmm, name)(**kwargs)
        out = out[0] if isinstance(out, tuple) else out
        leaves = [v for v in kwargs.values() if isinstance(v, torch.Tensor) and v.requires_grad]
        grads = torch.autograd.grad(out.pow(2).sum(), leaves, allow_unused=True)
        assert any(g is not None for g in grads), name


def test_backward_by_name_is_checked():
    def impl(a):
        return a["x"] * a["factor"]

    def setup(ctx, a, output):
        ctx.factor = a["factor"]

    def backward(ctx, g):
        return {"x": g * ctx.factor, "y": g}

    op = dispatch.CustomOp(
        parse("schema_test_scale(Tensor x, float factor) -> Tensor"),
        impl,
        lambda a: torch.empty_like(a["x"]),
        setup,
        backward,
    )
    x = torch.ones(3, requires_grad=True)
    with pytest.raises(TypeError, match="drmm::schema_test_scale: backward returned gradients for \\['y'\\]"):
        op(x=x, factor=2.0).sum().backward()
    with pytest.raises(TypeError, match="missing factor; unknown scale"):
        op(x=x, scale=2.0)
    with pytest.raises(TypeError):
        op(x, 2.0)  # keywords only


def test_backward_must_return_a_dict():
    op = dispatch.CustomOp(
        parse("schema_test_tuple(Tensor x) -> Tensor"),
        lambda a: a["x"].clone(),
        lambda a: torch.empty_like(a["x"]),
        lambda ctx, a, out: None,
        lambda ctx, g: (g,),
    )
    with pytest.raises(TypeError, match="backward must return a dict of gradients by argument name, got tuple"):
        op(x=torch.ones(2, requires_grad=True)).sum().backward()
