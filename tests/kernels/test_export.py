"""Export of fused models (issue 26.4): ``torch.onnx.export(dynamo=True)`` run by ONNX Runtime, ``torch.export``
(save / load, decomposition) and ``torch.jit.trace`` + ``save`` / ``load``, each against PyTorch; and the ATen
composites of the ops (drmm_kernels/export.py) against the ops themselves."""

import collections
import io
import warnings

import pytest
import torch
from torch import nn

import drmm_kernels as dk
from drmm_kernels import export as dk_export
from drmm_kernels.ops.conv_bn_relu_pool import conv_bn_relu_pool_op
from drmm_kernels.ops.conv_relu_pool import conv_relu_pool_op
from drmm_kernels.contract import plain_pool  # noqa: E402

torchvision = pytest.importorskip("torchvision")

# The ops' argument checks compare traced sizes (TracerWarning), and TorchScript is deprecated (FutureWarning):
# neither says anything about the export.
pytestmark = [
    pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning"),
    pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning"),
]

# name -> input size: the smallest square input the model's pools allow (alexnet's stride-4 stem needs 64).
MODELS = {"vgg11": 32, "vgg16_bn": 32, "alexnet": 64, "resnet18": 32}


def _model(name: str) -> nn.Module:
    """torchvision's model with random weights, random BN statistics and a 10-way head (the 4096-wide VGG /
    AlexNet classifiers would make the ONNX file hundreds of MB and have nothing to fuse), in eval mode."""
    torch.manual_seed(0)
    with torch.device("meta"):
        model = getattr(torchvision.models, name)(weights=None)
    if hasattr(model, "classifier"):
        first = next(m for m in model.classifier if isinstance(m, nn.Linear))
        model.classifier = nn.Sequential(nn.Dropout(), nn.Linear(first.in_features, 10))
    model.to_empty(device="cpu")
    for m in model.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_()
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def _fused(name: str):
    model = _model(name)
    fused = dk.fuse(model).eval()
    assert fused.fuse_report.fused, fused.fuse_report
    x = torch.randn(1, 3, MODELS[name], MODELS[name])
    return model, fused, x


def _assert_close(got, want, what: str) -> None:
    """float32 agreement within 1e-4 of the output's magnitude (relative: randomly initialised models' logits can be
    far below 1, where an absolute bound would pass a percent-level error)."""
    got, want = torch.as_tensor(got), torch.as_tensor(want)
    err, scale = (got - want).abs().max().item(), want.abs().max().item()
    assert scale > 0, f"{what}: the reference output is all zeros, nothing to compare"
    assert err <= 1e-4 * scale, f"{what}: max |difference| {err:.3g} at output magnitude {scale:.3g}"


def _ort_run(onnx_program, *inputs):
    ort = pytest.importorskip("onnxruntime")
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(
        onnx_program.model_proto.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    feeds = {i.name: t.numpy() for i, t in zip(session.get_inputs(), inputs)}
    return [torch.from_numpy(o) for o in session.run(None, feeds)]


def _onnx_export(model, x, **kwargs):
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnx")
    with torch.no_grad():
        return torch.onnx.export(model, (x,), dynamo=True, verbose=False, **kwargs)


# --------------------------------------------------------------------------- ONNX


@pytest.mark.parametrize("name", list(MODELS))
def test_onnx_runtime_matches_pytorch(name):
    model, fused, x = _fused(name)
    program = _onnx_export(fused, x)
    nodes = program.model_proto.graph.node
    # Standard ONNX ops only, one Conv per conv of the model: the fused blocks became Conv / Relu / MaxPool.
    assert all(n.domain in ("", "ai.onnx") for n in nodes), {(n.domain, n.op_type) for n in nodes}
    ops = collections.Counter(n.op_type for n in nodes)
    assert ops["Conv"] == sum(isinstance(m, nn.Conv2d) for m in model.modules()), ops
    assert ops["Relu"] >= len(fused.fuse_report.fused), ops
    (got,) = _ort_run(program, x)
    with torch.no_grad():
        want = fused(x)
        _assert_close(want, model(x), f"{name}: fused vs original")
    _assert_close(got, want, f"{name}: ONNX Runtime vs PyTorch")


class _Blocks(nn.Module):
    """The ops' other arguments (a scale, a leaky slope, pool 3, a BN in eval mode), returning the switches."""

    def __init__(self):
        super().__init__()
        self.w1, self.scale = nn.Parameter(torch.randn(6, 3, 3, 3)), nn.Parameter(torch.rand(6) + 0.5)
        self.shift = nn.Parameter(torch.randn(6))
        self.w2 = nn.Parameter(torch.randn(5, 6, 3, 3) * 0.2)
        self.bn = nn.BatchNorm2d(5)
        with torch.no_grad():
            self.bn.running_mean.normal_()
            self.bn.running_var.uniform_(0.5, 2.0)
            self.bn.weight.normal_()

    def forward(self, x):
        y, sw1 = dk.conv_relu_pool(x, self.w1, self.scale, self.shift, padding=1, pool=2, negative_slope=0.1)
        bn = self.bn
        y, sw2 = dk.conv_bn_relu_pool(
            y, self.w2, bn.weight, bn.bias, bn.running_mean, bn.running_var, training=False, padding=1, pool=3
        )
        return y, sw1, sw2


def test_onnx_exports_switches_and_every_argument():
    net = _Blocks().eval()
    x = torch.randn(2, 3, 18, 18)
    program = _onnx_export(net, x, dynamic_shapes=({0: torch.export.Dim("batch")},))
    ops = {n.op_type for n in program.model_proto.graph.node}
    assert {"Conv", "MaxPool", "LeakyRelu", "Relu"} <= ops, ops
    x3 = torch.randn(3, 3, 18, 18)  # another batch size: the batch dimension stays dynamic
    got = _ort_run(program, x3)
    with torch.no_grad(), dk.backend("reference"):  # the composites' conv: switches exactly alike
        want = net(x3)
    _assert_close(got[0], want[0], "y")
    for g, w, what in zip(got[1:], want[1:], ("switches of conv_relu_pool", "switches of conv_bn_relu_pool")):
        assert g.dtype == torch.uint8 and torch.equal(g, w), what


def test_onnx_export_of_an_exported_program_after_decomposition():
    model, fused, x = _fused("vgg11")
    ep = torch.export.export(fused, (x,))
    program = _onnx_export(ep.run_decompositions(dk_export.decompositions()), x)
    (got,) = _ort_run(program, x)
    with torch.no_grad():
        _assert_close(got, model(x), "ONNX Runtime vs PyTorch")


# --------------------------------------------------------------------------- torch.export


def test_torch_export_round_trip(tmp_path):
    model, fused, x = _fused("vgg16_bn")
    ep = torch.export.export(fused, (x,))
    targets = {n.target for n in ep.graph.nodes if n.op == "call_function"}
    assert torch.ops.drmm.conv_bn_relu_pool.default in targets  # the fused ops stay ops in the program
    torch.export.save(ep, tmp_path / "fused.pt2")
    loaded = torch.export.load(tmp_path / "fused.pt2")
    decomposed = ep.run_decompositions(dk_export.decompositions())
    assert not any(str(n.target).startswith("drmm.") for n in decomposed.graph.nodes)
    with torch.no_grad():
        want = model(x)
        _assert_close(loaded.module()(x), want, "torch.export save/load vs original")
        _assert_close(decomposed.module()(x), want, "decomposed program vs original")


# --------------------------------------------------------------------------- torch.jit


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_jit_trace_save_load(grad):
    model, fused, x = _fused("vgg16_bn")
    with torch.set_grad_enabled(grad):
        traced = torch.jit.trace(fused, x)
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    kinds = {n.kind() for n in loaded.inlined_graph.nodes()}
    # ATen ops only: the saved module runs without drmm_kernels (in C++ too)
    assert "aten::max_pool2d" in kinds and not any(k.startswith("drmm") for k in kinds), kinds
    x2 = torch.randn(2, 3, 48, 48)  # the traced ops are not tied to the traced input's size
    with torch.no_grad():
        for inp in (x, x2):
            _assert_close(loaded(inp), model(inp), f"TorchScript vs original at {tuple(inp.shape)}")


# --------------------------------------------------------------------------- the composites


@pytest.mark.parametrize(
    "scale,shift,pool,slope",
    [(False, True, 2, 0.0), (True, True, 3, 0.2), (True, False, 1, 0.0), (False, False, 4, 0.05)],
)
def test_conv_relu_pool_composite_is_the_op(scale, shift, pool, slope):
    torch.manual_seed(1)
    x, w = torch.randn(2, 3, 13, 13), torch.randn(4, 3, 3, 3)
    a = dict(
        x=x,
        weight=w,
        scale=torch.rand(4) + 0.5 if scale else None,
        shift=torch.randn(4) if shift else None,
        stride=1,
        padding=1,
        **plain_pool(pool),
        negative_slope=slope,
    )
    with dk.backend("reference"):
        want = conv_relu_pool_op(**a)
    got = dk_export.conv_relu_pool(**a)
    torch.testing.assert_close(got[0], want[0])
    assert torch.equal(got[1], want[1])


@pytest.mark.parametrize("training", [False, True])
def test_conv_bn_relu_pool_composite_is_the_op(training):
    torch.manual_seed(2)
    x, w = torch.randn(3, 3, 12, 12), torch.randn(5, 3, 3, 3)
    a = dict(
        x=x,
        weight=w,
        bn_weight=torch.randn(5),
        bn_bias=torch.randn(5),
        running_mean=torch.randn(5),
        running_var=torch.rand(5) + 0.5,
        training=training,
        eps=1e-5,
        stride=2,
        padding=1,
        **plain_pool(2),
        negative_slope=0.1,
    )
    with dk.backend("reference"):
        want = conv_bn_relu_pool_op(**a)
    got = dk_export.conv_bn_relu_pool(**a)
    assert len(got) == len(want)
    for g, w_, what in zip(got, want, ("y", "switches", "mean", "var", "z")):
        assert g.shape == w_.shape and g.dtype == w_.dtype, what
        torch.testing.assert_close(g, w_, msg=what)


def test_eager_calls_do_not_use_the_composite():
    """The composite runs only while a model is recorded for export: eager calls keep the fused backends."""
    x, w = torch.randn(1, 3, 8, 8), torch.randn(4, 3, 3, 3)
    seen = []
    original = conv_relu_pool_op.composite
    conv_relu_pool_op.composite = lambda **a: seen.append(1) or original(**a)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dk.conv_relu_pool(x, w, padding=1)
            dk.conv_relu_pool(x.requires_grad_(), w, padding=1)[0].sum().backward()
            assert not seen
            torch.jit.trace(lambda t: dk.conv_relu_pool(t, w, padding=1)[0], x.detach())
            assert seen
    finally:
        conv_relu_pool_op.composite = original
