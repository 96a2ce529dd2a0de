"""drmm_kernels.fuse: chains found by torch.fx or in nn.Sequential, refusals with their reasons, and the
fused model against the original (outputs, parameter gradients, BN running statistics, state_dict keys)."""

import copy
import doctest
import importlib
import pickle
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import drmm_kernels as dk
from drmm_kernels import FusedConvBNReLUPool2d, FusedConvReLUPool2d

torchvision = pytest.importorskip("torchvision")
fuse_module = importlib.import_module("drmm_kernels.fuse")


def _vgg11(bn: bool, make=None) -> nn.Module:
    """torchvision's VGG11(-BN) (or ``make``) with random features and a small head (the 25088x4096 classifier
    would take seconds to initialise and has nothing to fuse)."""
    with torch.device("meta"):
        model = (make or (torchvision.models.vgg11_bn if bn else torchvision.models.vgg11))()
    model.classifier = nn.Sequential(nn.Linear(512 * 7 * 7, 16), nn.ReLU(inplace=True), nn.Dropout(), nn.Linear(16, 10))
    model.features.to_empty(device="cpu")
    for m in model.features:
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
        if isinstance(m, nn.BatchNorm2d):
            _randomize_bn(m)
    return model


def _randomize_bn(m: nn.BatchNorm2d) -> None:
    with torch.no_grad():
        m.weight.uniform_(0.5, 1.5)
        m.bias.normal_()
        m.running_mean.normal_()
        m.running_var.uniform_(0.5, 2.0)


def _run(model, x, seed=0):
    torch.manual_seed(seed)  # same dropout masks for both models
    y = model(x)
    y = y[0] if isinstance(y, tuple) else y
    y.square().sum().backward()
    return y.detach()


def _assert_same(ref: nn.Module, fused: nn.Module, x: torch.Tensor, steps: int = 1) -> None:
    """Outputs, parameter gradients (by name) and the whole state_dict agree after ``steps`` forward/backward."""
    for step in range(steps):
        ref.zero_grad(), fused.zero_grad()
        torch.testing.assert_close(_run(fused, x, step), _run(ref, x, step), atol=1e-5, rtol=1e-4)
    g_ref, g_fused = dict(ref.named_parameters()), dict(fused.named_parameters())
    assert g_fused.keys() == g_ref.keys()
    # float32 roundoff relative to the largest gradient: a conv bias before a training-mode BN has an exact
    # gradient of 0, which the fused op gives and eager misses by roundoff of the BN's sums
    scale = max(p.grad.abs().max().item() for p in g_ref.values() if p.grad is not None)
    for k, p in g_ref.items():
        assert (p.grad is None) == (g_fused[k].grad is None), k
        if p.grad is not None:
            torch.testing.assert_close(
                g_fused[k].grad, p.grad, atol=1e-5 * scale, rtol=1e-4, msg=lambda m, k=k: f"{k}: {m}"
            )
    s_ref, s_fused = ref.state_dict(), fused.state_dict()
    assert list(s_fused.keys()) == list(s_ref.keys()) or sorted(s_fused) == sorted(s_ref)
    for k in s_ref:
        torch.testing.assert_close(s_fused[k], s_ref[k], atol=1e-6, rtol=1e-5, msg=k)


def _fused(model, example_inputs=None):
    """(original, fused) with separate parameters and statistics."""
    return model, dk.fuse(copy.deepcopy(model), example_inputs)


def _reasons(report):
    return [(r.name, r.reason) for r in report.refused]


# --------------------------------------------------------------------------- torchvision VGG11 / VGG11-BN


VGG11_FUSED = [
    ("features.0", 2),
    ("features.3", 2),
    ("features.6", 1),
    ("features.8", 2),
    ("features.11", 1),
    ("features.13", 2),
    ("features.16", 1),
    ("features.18", 2),
]
VGG11_BN_FUSED = [
    ("features.0", 2),
    ("features.4", 2),
    ("features.8", 1),
    ("features.11", 2),
    ("features.15", 1),
    ("features.18", 2),
    ("features.22", 1),
    ("features.25", 2),
]


def test_vgg11():
    ref, fused = _fused(_vgg11(False).eval())
    report = fused.fuse_report
    assert isinstance(fused, nn.Module) and report.mode == "fx" and not report.refused
    assert [(b.name, fused.get_submodule(b.name).pool) for b in report.fused] == VGG11_FUSED
    assert all(type(fused.get_submodule(n)) is fuse_module.FusedConvActPool2d for n, _ in VGG11_FUSED)
    assert isinstance(fused.get_submodule("features.0"), FusedConvReLUPool2d)
    assert "features.0: features.0 (Conv2d) -> features.1 (ReLU) -> features.2 (MaxPool2d 2)" in str(report)
    _assert_same(ref, fused, torch.randn(2, 3, 32, 32))


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_vgg11_bn(mode):
    ref, fused = _fused(getattr(_vgg11(True), mode)())
    report = fused.fuse_report
    assert report.mode == "fx" and not report.refused
    assert [(b.name, fused.get_submodule(b.name).pool) for b in report.fused] == VGG11_BN_FUSED
    assert all(isinstance(fused.get_submodule(n), FusedConvBNReLUPool2d) for n, _ in VGG11_BN_FUSED)
    assert fused.get_submodule("features.0").bn is fused.get_submodule("features.1")  # the BN stays at its own path
    _assert_same(ref, fused, torch.randn(2, 3, 32, 32), steps=2)  # running stats, num_batches_tracked included
    if mode == "train":
        assert int(fused.get_submodule("features.1").num_batches_tracked) == 2
        ref.eval(), fused.eval()  # the fused module follows the BN's mode switch
        with torch.no_grad():
            x = torch.randn(2, 3, 32, 32)
            torch.testing.assert_close(fused(x), ref(x), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("bn", [False, True])
def test_vgg11_state_dict_loads_both_ways(bn):
    original = _vgg11(bn).eval()
    fused = dk.fuse(_vgg11(bn)).eval()  # different random weights
    fused.load_state_dict(original.state_dict())
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), original(x), atol=1e-5, rtol=1e-4)
    other = _vgg11(bn).eval()
    other.load_state_dict(fused.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(other(x), original(x), atol=1e-5, rtol=1e-4)


def test_fused_model_converts_and_copies():
    model = Chain(bn=True).train()
    _randomize_bn(model.bn)
    ref, fused = _fused(model)
    fused, ref = fused.double(), ref.double()  # the BN's new buffers are the ones the fused module reads
    _assert_same(ref, fused, torch.randn(2, 3, 8, 8, dtype=torch.float64))
    twin = copy.deepcopy(fused)
    assert twin.conv.bn is twin.bn and twin.bn is not fused.bn
    before = fused.bn.running_mean.clone()
    twin(torch.randn(2, 3, 8, 8, dtype=torch.float64))
    torch.testing.assert_close(fused.bn.running_mean, before, atol=0, rtol=0)
    assert not torch.equal(twin.bn.running_mean, before)


# --------------------------------------------------------------------------- functional-style MNIST nets


class LeNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 6, 5, padding=2), nn.Conv2d(6, 16, 5)
        self.fc1, self.fc2 = nn.Linear(16 * 5 * 5, 32), nn.Linear(32, 10)

    def forward(self, x):
        x = F.relu(F.max_pool2d(self.conv1(x), 2))
        x = F.max_pool2d(F.relu(self.conv2(x)), kernel_size=2, stride=2)
        return self.fc2(F.relu(self.fc1(torch.flatten(x, 1))))


class ExampleNet(nn.Module):
    """The PyTorch MNIST example's layout: conv1 → relu → conv2 → relu → max_pool2d → dropout → fc."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 8, 3, 1), nn.Conv2d(8, 16, 3, 1)
        self.dropout = nn.Dropout(0.25)
        self.fc = nn.Linear(16 * 12 * 12, 10)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = self.conv2(x)
        x = F.relu(x)
        x = F.max_pool2d(x, 2)
        return F.log_softmax(self.fc(torch.flatten(self.dropout(x), 1)), dim=1)


def test_functional_lenet():
    ref, fused = _fused(LeNet())
    report = fused.fuse_report
    assert [(b.name, b.chain) for b in report.fused] == [
        ("conv1", "conv1 (Conv2d) -> max_pool2d(2) -> relu"),
        ("conv2", "conv2 (Conv2d) -> relu -> max_pool2d(2)"),
    ]
    assert fused.conv1.order == "pool-act" and fused.conv2.order == "act-pool" and not report.refused
    _assert_same(ref, fused, torch.randn(3, 1, 28, 28))


def test_functional_example_net():
    ref, fused = _fused(ExampleNet().train())
    assert [(b.name, fused.get_submodule(b.name).pool) for b in fused.fuse_report.fused] == [("conv1", 1), ("conv2", 2)]
    _assert_same(ref, fused, torch.randn(2, 1, 28, 28))


# --------------------------------------------------------------------------- refusals


class Chain(nn.Module):
    """conv → [bn] → act → pool (or pool → act) in forward, with pieces replaceable per case."""

    def __init__(self, conv=None, act=None, pool=None, bn=False, order="act-pool"):
        super().__init__()
        self.conv = conv or nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(self.conv.out_channels) if bn else None
        self.act = act or nn.ReLU()
        self.pool = pool or nn.MaxPool2d(2)
        self.order = order

    def forward(self, x):
        z = self.conv(x)
        if self.bn is not None:
            z = self.bn(z)
        if self.order == "act-pool":
            return self.pool(self.act(z))
        return self.act(self.pool(z))


class Functional(nn.Module):
    def __init__(self, body, bn=False):
        super().__init__()
        self.conv, self.conv2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4) if bn else None
        self.body = body

    def forward(self, x):
        return self.body(self, x)


# name: (model, refused block name, reason fragment, blocks still fused)
REFUSALS = {
    "pool stride": (lambda: Chain(pool=nn.MaxPool2d(2, stride=3)), "pool", "stride (3, 3) for kernel (2, 2)", 1),
    "pool padding": (lambda: Chain(pool=nn.MaxPool2d(3, padding=(1, 0))), "pool", "pool padding (1, 0)", 1),
    "pool > 4": (lambda: Chain(pool=nn.MaxPool2d(5)), "pool", "pool kernel 5 > 4", 1),
    "pool dilation": (lambda: Chain(pool=nn.MaxPool2d(2, dilation=2)), "pool", "pool dilation", 1),
    "return_indices module": (lambda: Chain(pool=nn.MaxPool2d(2, return_indices=True)), "pool", "return_indices", 1),
    "return_indices functional": (
        lambda: Functional(lambda s, x: F.max_pool2d(F.relu(s.conv(x)), 2, return_indices=True)),
        "max_pool2d_with_indices",
        "return_indices",
        1,
    ),
    "pool stride, pool first": (
        lambda: Chain(pool=nn.MaxPool2d(2, stride=3), order="pool-act"),
        "conv",
        "stride (3, 3) for kernel (2, 2)",
        0,
    ),
    "dilation": (lambda: Chain(nn.Conv2d(3, 4, 3, dilation=2)), "conv", "dilated convolution", 0),
    "groups": (lambda: Chain(nn.Conv2d(4, 4, 3, groups=2)), "conv", "grouped convolution", 0),
    "padding mode": (
        lambda: Chain(nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect")),
        "conv",
        "padding_mode='reflect'",
        0,
    ),
    "non-square stride": (lambda: Chain(nn.Conv2d(3, 4, 3, stride=(1, 2))), "conv", "non-square conv stride", 0),
    "non-square padding": (lambda: Chain(nn.Conv2d(3, 4, 3, padding=(1, 0))), "conv", "non-square conv padding", 0),
    "leaky slope": (lambda: Chain(act=nn.LeakyReLU(-0.1)), "conv", "outside [0, 1)", 0),
    "conv output used": (
        lambda: Functional(lambda s, x: (lambda z: (F.max_pool2d(F.relu(z), 2), z.mean()))(s.conv(x))),
        "conv",
        "conv output is also used by mean",
        0,
    ),
    "bn output used": (
        lambda: Functional(lambda s, x: (lambda v: (F.max_pool2d(F.relu(v), 2), v.sum()))(s.bn(s.conv(x))), bn=True),
        "conv",
        "batch_norm output is also used by sum",
        0,
    ),
    "relu output used": (
        lambda: Functional(lambda s, x: (lambda r: F.max_pool2d(r, 2).sum() + r.mean())(F.relu(s.conv(x)))),
        "max_pool2d",
        "activation output is also used by mean",
        1,
    ),
    "pool output used": (
        lambda: Functional(lambda s, x: (lambda p: (F.relu(p), p))(F.max_pool2d(s.conv(x), 2))),
        "conv",
        "max_pool2d output (before the activation) is also used",
        0,
    ),
    "conv shared with unfused use": (
        lambda: Functional(lambda s, x: (F.max_pool2d(F.relu(s.conv(x)), 2), s.conv(x))),
        "conv",
        "also called unfused",
        0,
    ),
    "conv in two different chains": (
        lambda: Functional(lambda s, x: (F.max_pool2d(F.relu(s.conv(x)), 2), F.relu(s.conv(x)))),
        "conv",
        "called in 2 different chains",
        0,
    ),
    "bn shared with unfused use": (
        lambda: Functional(lambda s, x: (F.max_pool2d(F.relu(s.bn(s.conv(x))), 2), s.bn(s.conv2(x))), bn=True),
        "conv",
        "batch norm module bn is also called unfused",
        0,
    ),
}


# what the refusal names: the activation the ops lack, or the conv's groups before what follows it
# case: (model, reason in the fx trace, reason in the nn.Sequential fallback or None for functional ones)
LACKS = "an activation the fused ops do not compute (ReLU / LeakyReLU only)"
NAMED = {
    "ReLU6 module": (
        lambda: Chain(act=nn.ReLU6()),
        f"the conv is followed by act (ReLU6), {LACKS}",
        f"the conv is followed by ReLU6, {LACKS}",
    ),
    "SiLU after BN": (
        lambda: Chain(act=nn.SiLU(), bn=True),
        f"the batch_norm is followed by act (SiLU), {LACKS}",
        f"the batch_norm is followed by SiLU, {LACKS}",
    ),
    "F.silu": (lambda: Functional(lambda s, x: F.silu(s.conv(x))), f"the conv is followed by silu, {LACKS}", None),
    "F.relu6 after pool": (
        lambda: Functional(lambda s, x: F.relu6(F.max_pool2d(s.conv(x), 2))),
        f"the max_pool2d is followed by relu6, {LACKS}",
        None,
    ),
    "depthwise -> BN -> ReLU6": (
        lambda: Chain(nn.Conv2d(4, 4, 3, groups=4), act=nn.ReLU6(), bn=True),
        "grouped convolution (groups=4, depthwise) is outside the op contract",
        "grouped convolution (groups=4, depthwise) is outside the op contract",
    ),
}


@pytest.mark.parametrize("traced", [True, False], ids=["fx", "sequential"])
@pytest.mark.parametrize("case", list(NAMED))
def test_refusal_names_the_activation_or_groups(case, traced):
    make, reason, seq_reason = NAMED[case]
    model = make().eval()
    if not traced:
        if seq_reason is None:
            pytest.skip("functional: no nn.Sequential")
        model, reason = Untraceable(False), seq_reason
        model.features = nn.Sequential(*[m for m in make().children() if m is not None])
    report = dk.fuse(model).fuse_report
    assert (report.mode == "fx") == traced
    assert report.refused and report.refused[0].reason == reason, str(report)


def test_bad_example_inputs_print_nothing(capfd):
    fused = dk.fuse(Chain(), example_inputs=torch.randn(1, 5, 8, 8))  # 5 channels for a 3-channel conv
    assert capfd.readouterr().err == ""
    assert (
        "example_inputs: shape propagation failed (RuntimeError: Given groups=1, weight of size [4, 3, 3, 3], "
        "expected input[1, 5, 8, 8] to have 3 channels" in str(fused.fuse_report)
    )


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refusals(case):
    make, name, reason, n_fused = REFUSALS[case]
    torch.manual_seed(0)
    ref, fused = _fused(make().eval())
    report = fused.fuse_report
    hits = [r for r in report.refused if r.name == name and reason in r.reason]
    assert hits, f"{case}: expected {name!r}: ...{reason}... in\n{report}"
    assert len(report.fused) == n_fused, str(report)
    assert reason in str(report)
    in_ch = 4 if case == "groups" else 3
    _assert_same(ref, fused, torch.randn(2, in_ch, 8, 8))


def test_shared_conv_fused_at_two_sites():
    ref, fused = _fused(
        Functional(lambda s, x: F.max_pool2d(F.relu(s.conv(x)), 2) + F.max_pool2d(F.relu(s.conv(2 * x)), 2))
    )
    (block,) = fused.fuse_report.fused
    assert block.name == "conv" and block.sites == 2 and not fused.fuse_report.refused
    _assert_same(ref, fused, torch.randn(2, 3, 8, 8))


def test_conv_without_activation_is_listed():
    ref, fused = _fused(Functional(lambda s, x: s.conv(x) + 1))
    assert _reasons(fused.fuse_report) == [
        ("conv", "no batch_norm/activation/max_pool2d follows (its output goes to add)")
    ]


@pytest.mark.parametrize(
    "make",
    [
        lambda: Chain(act=nn.LeakyReLU(0.2), order="pool-act"),
        lambda: Chain(nn.Conv2d(3, 4, (3, 1), padding=1)),  # non-square kernel, square padding
        lambda: Chain(nn.Conv2d(3, 4, 3, padding="same"), pool=nn.MaxPool2d(4)),
        lambda: Functional(lambda s, x: F.leaky_relu(F.max_pool2d(s.conv(x), 2), 0.1)),
        lambda: Functional(lambda s, x: torch.max_pool2d(s.conv(x).relu(), 2)),
    ],
)
def test_more_chains_fuse(make):
    torch.manual_seed(0)
    ref, fused = _fused(make())
    assert len(fused.fuse_report.fused) == 1 and not fused.fuse_report.refused, str(fused.fuse_report)
    _assert_same(ref, fused, torch.randn(2, 3, 8, 8))


def test_bn_momentum_none_and_conv_bias():
    model = Chain(nn.Conv2d(3, 4, 3, padding=1, bias=True), bn=True).train()
    model.bn.momentum = None  # cumulative average: 1 / num_batches_tracked
    _randomize_bn(model.bn)
    with torch.no_grad():
        model.conv.bias.normal_(0, 3)  # a large bias shows in running_mean if it is dropped
    ref, fused = _fused(model)
    assert type(fused.conv).__name__ == "FusedConvBNActPool2d"
    _assert_same(ref, fused, torch.randn(4, 3, 8, 8), steps=3)
    assert int(fused.bn.num_batches_tracked) == 3


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_bn_without_running_stats(mode):
    model = Chain(bn=True)
    model.bn = nn.BatchNorm2d(4, track_running_stats=False)  # batch statistics in both modes
    ref, fused = _fused(getattr(model, mode)())
    assert len(fused.fuse_report.fused) == 1
    _assert_same(ref, fused, torch.randn(2, 3, 8, 8), steps=2)


# --------------------------------------------------------------------------- shared modules


class Aliased(nn.Module):
    """A conv and a BN each registered under two names, called through the second."""

    def __init__(self):
        super().__init__()
        self.a, self.bn, self.relu = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()
        self.b, self.bn2 = self.a, self.bn

    def forward(self, x):
        return F.max_pool2d(self.relu(self.bn2(self.b(x))), 2)


def test_module_registered_under_two_names():
    model = Aliased().train()
    _randomize_bn(model.bn)
    ref, fused = _fused(model)
    assert [b.name for b in fused.fuse_report.fused] == ["a"] and not fused.fuse_report.refused
    assert isinstance(fused.b, fuse_module.FusedConvBNActPool2d) and fused.b is fused.a and fused.bn2 is fused.bn
    assert "hold the same module at each: b, bn2" in str(fused.fuse_report)
    _assert_same(ref, fused, torch.randn(2, 3, 8, 8), steps=2)
    other = Aliased()
    other.load_state_dict(fused.state_dict())
    fused.load_state_dict(other.state_dict())


class TwoSequentials(nn.Module):
    """One conv in two nn.Sequentials: with the same ReLU and pool modules, with modules of their own, or in
    another chain."""

    def __init__(self, kind):
        super().__init__()
        conv, relu, pool = nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)
        self.s1 = nn.Sequential(conv, relu, pool)
        self.s2 = {
            "shared": lambda: nn.Sequential(conv, relu, pool),
            "own modules": lambda: nn.Sequential(conv, nn.ReLU(), nn.MaxPool2d(2)),
            "other chain": lambda: nn.Sequential(conv, relu),
        }[kind]()

    def forward(self, x):
        return self.s1(x).sum((2, 3)) + self.s2(2 * x).sum((2, 3))


class TwoSequentialsUntraceable(TwoSequentials):
    def forward(self, x):
        if x.sum() > 0:
            x = -x
        return super().forward(x)


@pytest.mark.parametrize(
    "kind, reason",
    [
        ("shared", None),
        (
            "own modules",
            "module s1.0 (also registered as s2.0) is called in 2 chains through different activation / "
            "pool modules (s1.1, s1.2, s2.1, s2.2)",
        ),
        ("other chain", "module s1.0 (also registered as s2.0) is called in 2 different chains"),
    ],
)
def test_conv_in_two_sequentials(kind, reason):
    """Fused alike at both paths (one block, two call sites), or refused with the reason; never a crash."""
    torch.manual_seed(0)
    ref, fused = _fused(TwoSequentials(kind))
    report = fused.fuse_report
    if reason is None:
        assert [(b.name, b.sites) for b in report.fused] == [("s1.0", 2)] and not report.refused
        assert isinstance(fused.get_submodule("s2.0"), fuse_module.FusedConvActPool2d)
        assert fused.get_submodule("s2.0") is fused.get_submodule("s1.0")
    else:
        assert not report.fused and {r.name for r in report.refused} == {"s1.0"}
        assert all(r.reason.startswith(reason) for r in report.refused), str(report)
        assert type(fused.get_submodule("s2.0")) is nn.Conv2d
    _assert_same(ref, fused, torch.randn(2, 3, 8, 8))


def test_conv_in_two_sequentials_untraceable():
    torch.manual_seed(0)
    ref, fused = _fused(TwoSequentialsUntraceable("shared"))
    assert fused.fuse_report.mode == "modules" and not fused.fuse_report.fused
    assert _reasons(fused.fuse_report) == [
        ("s1.0", "module also registered at s2.0 (its other uses cannot be seen)"),
        ("s2.0", "module also registered at s1.0 (its other uses cannot be seen)"),
    ]
    _assert_same(ref, fused, torch.randn(2, 3, 8, 8))


# --------------------------------------------------------------------------- training and eval mode


def _same_in_modes(ref, fused, x, modes=("train", "eval", "train", "eval")):
    """Outputs agree after each switch of both models to each mode; train mode with the same seed (dropout)."""
    for mode in modes:
        ref.train(mode == "train"), fused.train(mode == "train")
        with torch.no_grad():
            torch.manual_seed(0)
            want = ref(x)
            torch.manual_seed(0)
            got = fused(x)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4, msg=lambda m: f"{mode} mode: {m}")


class DropoutNet(nn.Module):
    """The issue's net: functional dropout reading self.training, which a trace freezes."""

    def __init__(self):
        super().__init__()
        self.c, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(128, 10)

    def forward(self, x):
        return self.fc(F.dropout(F.max_pool2d(F.relu(self.c(x)), 2), 0.5, training=self.training).flatten(1))


@pytest.mark.parametrize("fused_in", ["train", "eval"])
def test_functional_dropout_follows_the_mode(fused_in):
    torch.manual_seed(0)
    ref, fused = _fused(getattr(DropoutNet(), fused_in)())
    assert [b.name for b in fused.fuse_report.fused] == ["c"] and "one graph per mode" in str(fused.fuse_report)
    assert sorted(fused.mode_graphs) == [False, True] and fused.training == (fused_in == "train")
    x = torch.randn(2, 3, 8, 8)
    _same_in_modes(ref, fused, x)
    fused.train()
    assert not torch.allclose(fused(x), fused.eval()(x))  # the two modes differ, so the check above sees them
    # copies, deep copies and pickles keep a graph per mode (and a fused model fuses again to the same)
    for twin in (copy.deepcopy(fused), copy.copy(fused), pickle.loads(pickle.dumps(fused)), dk.fuse(fused)):
        _same_in_modes(ref, twin, x)
        assert sorted(twin.state_dict()) == sorted(ref.state_dict())
    assert copy.deepcopy(fused).fuse_report.fused[0].name == "c"


@pytest.mark.parametrize("fused_in", ["train", "eval"])
def test_efficientnet_stochastic_depth_follows_the_mode(fused_in):
    """torchvision's StochasticDepth calls stochastic_depth(x, p, mode, self.training) inside the trace."""
    torch.manual_seed(0)
    ref, fused = _fused(torchvision.models.efficientnet_b0().train(fused_in == "train"))
    code = {mode: g.python_code("self").src for mode, g in fused.mode_graphs.items()}
    assert "'row', True)" in code[True] and "'row', True)" not in code[False]
    _same_in_modes(ref, fused, torch.randn(1, 3, 64, 64), modes=("train", "eval", "train"))


@pytest.mark.parametrize("fused_in", ["train", "eval"])
def test_vgg16_bn_dropout_and_batch_norm_follow_the_mode(fused_in):
    ref, fused = _fused(_vgg11(True, torchvision.models.vgg16_bn).train(fused_in == "train"))
    assert len(fused.fuse_report.fused) == 13 and not fused.fuse_report.refused
    assert any(isinstance(m, nn.Dropout) for m in fused.modules())
    _same_in_modes(ref, fused, torch.randn(2, 3, 32, 32), modes=("eval", "train", "eval"))


class TrainingBranch(nn.Module):
    """``if self.training`` branches: noise in training only (both modes fuse c1 alike), and a conv pooled in
    training mode only (different chains: c2 stays unfused, the rest still fuses)."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.c1(x)), 2)
        if self.training:
            x = x + 0.1 * torch.randn_like(x)
        y = self.c2(x)
        return (F.max_pool2d(F.relu(y), 2) if self.training else F.relu(y)).flatten(1)


@pytest.mark.parametrize("fused_in", ["train", "eval"])
def test_training_branches(fused_in):
    torch.manual_seed(0)
    ref, fused = _fused(getattr(TrainingBranch(), fused_in)())
    assert [b.name for b in fused.fuse_report.fused] == ["c1"]
    assert {(r.name, r.reason) for r in fused.fuse_report.refused} == {
        ("c2", "module c2 is in a different chain in training and in eval mode")
    }
    _same_in_modes(ref, fused, torch.randn(2, 3, 8, 8))


class Inner(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        return F.dropout(F.max_pool2d(F.relu(self.c(x)), 2), 0.5, training=self.training)


def test_mixed_training_flags_warn():
    """A traced-through submodule whose flag differs from the model's: the fused model follows its own flag,
    as the original does after .train() / .eval(); fuse says so loudly."""
    model = nn.Sequential(Inner(), nn.Flatten()).train()
    model[0].eval()
    ref = copy.deepcopy(model)
    with pytest.warns(UserWarning, match=r"1 of its modules are not \(0\)"):
        fused = dk.fuse(model)
    assert "1 of its modules are not" in str(fused.fuse_report)
    _same_in_modes(ref, fused, torch.randn(2, 3, 8, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # leaf modules (BatchNorm, Dropout) with their own flags: no warning
        model = Chain(bn=True).train()
        model.bn.eval()
        dk.fuse(model)


# --------------------------------------------------------------------------- one set of rules


class PlainReLU(nn.ReLU):
    """Keeps ReLU's forward: computes ReLU exactly, so every path fuses it (and Captum hooks it as a ReLU)."""


class PlainLeakyReLU(nn.LeakyReLU):
    pass


class ClippedReLU(nn.ReLU):
    """Overrides ReLU's forward: every path refuses it, naming it."""

    def forward(self, x):
        return super().forward(x).clamp(max=1.0)


class Features(nn.Module):
    def __init__(self, *layers):
        super().__init__()
        self.features = nn.Sequential(*layers, nn.Flatten())

    def forward(self, x):
        return self.features(x)


class FeaturesUntraceable(Features):
    def forward(self, x):
        if x.sum() > 1e9:
            x = x / 2
        return self.features(x)


# case: (layers, pool of the fused block at features.0, or the reason every path refuses it for)
RULE_CASES = {
    "padding same, 3x3": (lambda: [nn.Conv2d(3, 4, 3, padding="same"), nn.ReLU(), nn.MaxPool2d(2)], 2),
    "padding same, 5x3, leaky": (
        lambda: [nn.Conv2d(3, 4, (5, 3), padding="same"), nn.LeakyReLU(0.2), nn.MaxPool2d(2)],
        "non-square conv padding (2, 1)",
    ),
    "padding same, 5x5, pool first": (lambda: [nn.Conv2d(3, 4, 5, padding="same"), nn.MaxPool2d(2), nn.ReLU()], 2),
    "padding valid": (lambda: [nn.Conv2d(3, 4, 3, padding="valid"), nn.ReLU(), nn.MaxPool2d(2)], 2),
    "padding same, even kernel": (
        lambda: [nn.Conv2d(3, 4, 2, padding="same"), nn.ReLU(), nn.MaxPool2d(2)],
        "padding='same' with an even kernel (2, 2) pads asymmetrically",
    ),
    "ReLU subclass": (lambda: [nn.Conv2d(3, 4, 3, padding=1), PlainReLU(), nn.MaxPool2d(2)], 2),
    "LeakyReLU subclass, batch norm": (
        lambda: [nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), PlainLeakyReLU(0.1), nn.MaxPool2d(2)],
        2,
    ),
    "ReLU subclass overriding forward": (
        lambda: [nn.Conv2d(3, 4, 3, padding=1), ClippedReLU(), nn.MaxPool2d(2)],
        "ClippedReLU overrides ReLU's forward",
    ),
    "non-square kernel": (lambda: [nn.Conv2d(3, 4, (3, 1), padding=1), nn.ReLU(), nn.MaxPool2d(2)], 2),
    "avg-pool after": (lambda: [nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2)], 1),
}


@pytest.mark.parametrize("way", ["fx", "sequential", "fuse_conv_relu_pool"])
@pytest.mark.parametrize("case", list(RULE_CASES))
def test_every_path_follows_the_same_rules(case, way):
    """fuse()'s trace, its nn.Sequential fallback and the in-place helper fuse the same chains, and refuse the
    others with the same reason (drmm_kernels.fusion_rules): padding='same' is padding (k - 1) // 2 for odd
    kernels and refused for even ones; a ReLU / LeakyReLU subclass fuses unless it overrides forward."""
    layers, want = RULE_CASES[case]
    torch.manual_seed(0)
    model = (FeaturesUntraceable if way == "sequential" else Features)(*layers()).double().train()
    ref, fused = model, copy.deepcopy(model)
    if way == "fuse_conv_relu_pool":
        if isinstance(want, str):
            with pytest.raises(ValueError, match=re.escape(want)):
                dk.fuse_conv_relu_pool(fused)
            return
        assert dk.fuse_conv_relu_pool(fused) == ["features.0"]
    else:
        fused = dk.fuse(fused)
        report = fused.fuse_report
        assert report.mode == ("fx" if way == "fx" else "modules")
        if isinstance(want, str):
            assert not report.fused and _reasons(report) == [("features.0", want)], str(report)
            return
        assert [b.name for b in report.fused] == ["features.0"] and not report.refused, str(report)
    block = fused.get_submodule("features.0")
    conv = model.features[0]
    assert block.pool == want
    if isinstance(conv.padding, str):  # the int the block pads by gives the very values of the string padding
        assert block.padding == (conv.kernel_size[0] - 1) // 2 if conv.padding == "same" else block.padding == 0
        x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
        assert torch.equal(
            F.conv2d(x, conv.weight, conv.bias, padding=conv.padding),
            F.conv2d(x, conv.weight, conv.bias, padding=block.padding),
        )
    _assert_same(ref, fused, torch.randn(2, 3, 8, 8, dtype=torch.float64), steps=2)


def test_relu_subclass_is_hooked_as_a_relu():
    """A ReLU subclass is called as a module by the trace (not traced through), so Captum's GuidedBackprop, which
    hooks every nn.ReLU, reaches it in the fused model as in the original."""
    captum_attr = pytest.importorskip("captum.attr")
    torch.manual_seed(4)
    model = (
        nn.Sequential(
            nn.Conv2d(2, 4, 3, padding=1), PlainReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 4 * 4, 6)
        )
        .double()
        .eval()
    )
    with torch.no_grad():
        model[0].bias.fill_(-0.3)
    fused = dk.fuse(copy.deepcopy(model))
    assert fused.get_submodule("0").relu_module and fused.fuse_report.mode == "fx"
    x = torch.randn(2, 2, 8, 8, dtype=torch.float64)

    def guided(m):
        return captum_attr.GuidedBackprop(m).attribute(x.clone().requires_grad_(), target=5)

    want = guided(model)
    xg = x.clone().requires_grad_()
    model(xg)[:, 5].sum().backward()
    assert not torch.allclose(xg.grad, want)  # the plain gradient, which a missed hook would give, differs
    torch.testing.assert_close(guided(fused), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


# --------------------------------------------------------------------------- fallback, example_inputs, misc


class Untraceable(nn.Module):
    def __init__(self, bn: bool):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1),
            *([nn.BatchNorm2d(4)] if bn else []),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(4, 4, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(3, stride=4),
        )

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: fx cannot trace this
            x = -x
        return self.features(x)


@pytest.mark.parametrize("bn", [False, True])
def test_untraceable_falls_back_to_sequential(bn):
    model = Untraceable(bn).train()
    if bn:
        _randomize_bn(model.get_submodule("features.1"))
    ref = copy.deepcopy(model)
    fused = dk.fuse(model)
    report = fused.fuse_report
    assert fused is model and report.mode == "modules"
    assert "torch.fx could not trace Untraceable" in report.notes[0]
    conv2 = "features.4" if bn else "features.3"
    assert [b.name for b in report.fused] == ["features.0", conv2]
    assert _reasons(report) == [
        (
            f"features.{6 if bn else 5}",
            "pool stride (4, 4) for kernel (3, 3) (the fused ops take one stride from 1 to the kernel size: no "
            "gapped windows); the conv -> activation before it is fused with pool=1",
        )
    ]
    assert (fused.get_submodule("features.0").pool, fused.get_submodule(conv2).pool) == (2, 1)
    _assert_same(ref, fused, torch.randn(2, 3, 8, 8), steps=2)
    assert "nn.Sequential chains only" in str(report)


def test_example_inputs_check_conv_input_rank():
    model = Chain()
    fused = dk.fuse(copy.deepcopy(model), example_inputs=(torch.randn(3, 8, 8),))  # unbatched
    assert _reasons(fused.fuse_report) == [
        ("conv", "the conv input is 3-D in example_inputs (the fused ops take NCHW batches)")
    ]
    fused = dk.fuse(copy.deepcopy(model), example_inputs=torch.randn(1, 3, 8, 8))
    assert len(fused.fuse_report.fused) == 1 and "checked" in fused.fuse_report.notes[0]


def test_fuse_twice_is_a_no_op():
    ref, fused = _fused(_vgg11(True).eval())
    again = dk.fuse(fused)
    assert not again.fuse_report.fused and not [r for r in again.fuse_report.refused if "features" in r.name]
    _assert_same(ref, again, torch.randn(1, 3, 32, 32))


def test_bad_argument():
    with pytest.raises(TypeError, match="drmm_kernels.fuse: model must be an nn.Module"):
        dk.fuse(lambda x: x)


def test_docstring_examples():
    result = doctest.testmod(fuse_module, extraglobs={"torch": torch, "nn": nn})
    assert result.attempted > 0 and result.failed == 0


# --------------------------------------------------------------------------- every max-pool PyTorch has

# name -> (input size, the pools fuse must take: (kernel, stride, padding, ceil_mode) of each fused block's pool)
OVERLAPPING = {
    "resnet18": (32, [(3, 2, 1, False)]),
    "alexnet": (64, [(3, 2, 0, False)] * 3),
    "googlenet": (64, [(3, 2, 0, True)] * 2),
    # its two other pools follow a Fire module's torch.cat of two ReLU branches: no conv chain ends there
    "squeezenet1_0": (64, [(3, 2, 0, True)]),
}


def _torchvision(name):
    kwargs = dict(aux_logits=False, init_weights=False) if name == "googlenet" else {}
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(**kwargs)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            _randomize_bn(m)
    return model


@pytest.mark.parametrize("name", list(OVERLAPPING))
def test_torchvision_overlapping_pools_are_fused_and_exact_in_both_modes(name):
    size, pools = OVERLAPPING[name]
    ref, fused = _fused(_torchvision(name).eval())
    report = fused.fuse_report
    fused_pools = [
        tuple(fused.get_submodule(b.name).pool_window.values())
        for b in report.fused
        if fused.get_submodule(b.name).pool > 1
    ]
    assert fused_pools == pools, str(report)
    assert not [r for r in report.refused if r.reason.startswith("pool")], str(report)
    # float64: fused and eager differ only by roundoff, which 60 float32 layers would amplify past any tight bound
    ref.double(), fused.double()
    x = torch.randn(2, 3, size, size, dtype=torch.float64, requires_grad=True)
    for mode in ("eval", "train", "eval"):
        getattr(ref, mode)(), getattr(fused, mode)()
        torch.manual_seed(1)
        y_ref = ref(x)
        (gx_ref,) = torch.autograd.grad(y_ref.square().sum(), x)
        torch.manual_seed(1)
        y = fused(x)
        (gx,) = torch.autograd.grad(y.square().sum(), x)
        torch.testing.assert_close(
            y, y_ref, atol=1e-9 * y_ref.abs().max().item(), rtol=1e-7, msg=lambda m: f"{name} {mode}: {m}"
        )
        scale = gx_ref.abs().max().item()
        torch.testing.assert_close(gx, gx_ref, atol=1e-9 * scale, rtol=1e-7, msg=lambda m: f"{name} {mode} dx: {m}")


def test_resnet50_stem_pool_is_fused():
    ref, fused = _fused(_torchvision("resnet50").eval())
    assert tuple(fused.get_submodule("conv1").pool_window.values()) == (3, 2, 1, False), str(fused.fuse_report)
    ref.double(), fused.double()
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    torch.testing.assert_close(fused(x), ref(x), atol=1e-9, rtol=1e-7)


@pytest.mark.parametrize("bn", [False, True])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_torchvision_feature_extractor_sees_the_original_nodes(bn, mode):
    """Another tool's fx tracer (torchvision's create_feature_extractor) records each block's original chain:
    every node name of the original model (the conv's output at the block's path) gives the same value on the
    fused one, and BatchNorm keeps its running statistics."""
    from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

    ref, fused = _fused(getattr(_vgg11(bn), mode)())
    nodes = [n for n in get_graph_node_names(ref)[mode == "eval"] if n.startswith(("features.", "classifier."))]
    assert "features.0" in nodes and "features.2" in nodes
    extract_ref, extract_fused = create_feature_extractor(ref, nodes), create_feature_extractor(fused, nodes)
    x = torch.randn(2, 3, 32, 32)
    torch.manual_seed(0)  # same dropout masks
    out_ref = extract_ref(x)
    torch.manual_seed(0)
    out_fused = extract_fused(x)
    for n in nodes:
        torch.testing.assert_close(out_fused[n], out_ref[n], atol=1e-5, rtol=1e-4, msg=n)
    s_ref, s_fused = ref.state_dict(), fused.state_dict()
    assert sorted(s_fused) == sorted(s_ref)
    for k in s_ref:
        torch.testing.assert_close(s_fused[k], s_ref[k], atol=1e-6, rtol=1e-5, msg=k)
    if bn and mode == "train":
        assert int(fused.get_submodule("features.1").num_batches_tracked) == 1  # once per call, none while tracing


def test_fx_symbolic_trace_records_the_fused_ops():
    """A model that calls the ops itself traces to one graph node per op, which runs them on real tensors."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            y, _ = dk.conv_relu_pool(x, self.conv.weight, None, self.conv.bias, padding=1)
            z, _ = dk.conv_bn_relu_pool(
                x,
                self.conv.weight,
                self.bn.weight,
                self.bn.bias,
                self.bn.running_mean,
                self.bn.running_var,
                training=False,
                padding=1,
            )
            return y + z

    net = Net().eval()
    _randomize_bn(net.bn)
    traced = torch.fx.symbolic_trace(net)
    targets = [str(n.target) for n in traced.graph.nodes if n.op == "call_function"]
    assert "drmm.conv_relu_pool.default" in targets and "drmm.conv_bn_relu_pool.default" in targets
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(traced(x), net(x))
    with torch.no_grad():
        net.bn.running_var.mul_(2.0)  # the buffers are graph inputs, not constants taken while tracing
    torch.testing.assert_close(traced(x), net(x))

    class TrainingBN(Net):
        def forward(self, x):
            return dk.conv_bn_relu_pool(
                x,
                self.conv.weight,
                self.bn.weight,
                self.bn.bias,
                self.bn.running_mean,
                self.bn.running_var,
                training=True,
            )[0]

    with pytest.raises(TypeError, match="cannot be traced by torch.fx in training mode"):
        torch.fx.symbolic_trace(TrainingBN())
    layer = FusedConvBNReLUPool2d(3, 4, 3, padding=1).train()
    before = layer.bn.num_batches_tracked.clone()
    with pytest.raises(TypeError, match="cannot be traced by torch.fx in training mode"):
        torch.fx.symbolic_trace(layer)
    assert torch.equal(layer.bn.num_batches_tracked, before)
