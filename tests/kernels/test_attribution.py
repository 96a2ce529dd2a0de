"""drmm_kernels.attribution: the fused model inside the context against Captum's Saliency, GuidedBackprop and
Deconvolution on the unfused model (torchvision VGG11, random weights), the deconvnet routing of all-negative
windows by block order, which ReLUs the modes reach, and plain gradients once the context has closed."""

import copy
import importlib
import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import drmm_kernels as dk

torchvision = pytest.importorskip("torchvision")
captum_attr = pytest.importorskip("captum.attr")
attribution_module = importlib.import_module("drmm_kernels.attribution")

pytestmark = pytest.mark.filterwarnings("ignore:Setting backward hooks on ReLU activations")

MODES = ("gradient", "guided", "deconvnet")
CAPTUM = {
    "gradient": captum_attr.Saliency,
    "guided": captum_attr.GuidedBackprop,
    "deconvnet": captum_attr.Deconvolution,
}
CPU_BACKENDS = [b for b in ("reference", "cpu") if dk.available_backends()[b].available]


def _captum(model, x, mode, target):
    """Captum's attribution of ``target`` on the (unfused) model; Saliency signed, i.e. the plain gradient."""
    kwargs = {"abs": False} if mode == "gradient" else {}
    return CAPTUM[mode](model).attribute(x.clone().requires_grad_(), target=target, **kwargs)


def _ours(model, x, mode, target, parameter_grads=False):
    x = x.clone().requires_grad_()
    with dk.attribution(mode, parameter_grads=parameter_grads):
        model(x)[:, target].sum().backward()
    return x.grad


def _plain(model, x, target):
    x = x.clone().requires_grad_()
    model(x)[:, target].sum().backward()
    return x.grad


def _assert_close(actual, expected, what=""):
    # float64 throughout: the fused and ATen convolutions round differently, and in float32 a near-tie in a
    # window could pick another argmax and route a whole window elsewhere.
    scale = expected.abs().max().item()
    assert scale > 0, what
    torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-9 * scale, msg=lambda m: f"{what}: {m}")


def _vgg11(bn: bool = False) -> nn.Module:
    """torchvision's VGG11(-BN), random weights, float64, with a small head that keeps two in-place ReLU
    modules (the 25088x4096 classifier would take seconds to initialise)."""
    with torch.device("meta"):
        model = (torchvision.models.vgg11_bn if bn else torchvision.models.vgg11)()
    model.classifier = nn.Sequential(
        nn.Linear(512 * 7 * 7, 16),
        nn.ReLU(inplace=True),
        nn.Dropout(),
        nn.Linear(16, 16),
        nn.ReLU(inplace=True),
        nn.Dropout(),
        nn.Linear(16, 10),
    )
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    for m in model.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.uniform_(-1.5, 1.5)  # negative gammas too: the switch then records a minimum of z
                m.bias.normal_()
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
    return model.double().eval()


@pytest.fixture(scope="module")
def vgg11():
    model = _vgg11()
    fused = dk.fuse(copy.deepcopy(model))
    assert len(fused.fuse_report.fused) == 8 and not fused.fuse_report.refused
    blocks = [m for m in fused.modules() if hasattr(m, "order")]
    assert [(m.order, m.relu_module) for m in blocks] == [("act-pool", True)] * 8
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    return model, fused, x


@pytest.fixture(scope="module")
def vgg11_captum(vgg11):
    """Captum's three maps on the unfused VGG11."""
    model, _, x = vgg11
    return {mode: _captum(model, x, mode, 3) for mode in MODES}


# --------------------------------------------------------------------------- against Captum on VGG11


@pytest.mark.parametrize("mode", MODES)
def test_vgg11_fused_matches_captum(vgg11, vgg11_captum, mode):
    _, fused, x = vgg11
    _assert_close(_ours(fused, x, mode, 3), vgg11_captum[mode], f"fused VGG11, {mode}")


@pytest.mark.parametrize("mode", MODES)
def test_vgg11_unfused_matches_captum(vgg11, vgg11_captum, mode):
    """ReLU modules left unfused (here: all of them) follow the mode through the context's module hooks."""
    model, _, x = vgg11
    _assert_close(_ours(model, x, mode, 3), vgg11_captum[mode], f"unfused VGG11, {mode}")


def test_vgg11_modes_differ(vgg11_captum):
    """The three rules give three different maps here, so the comparisons above can tell them apart."""
    maps = vgg11_captum
    for a, b in (("gradient", "guided"), ("guided", "deconvnet"), ("gradient", "deconvnet")):
        assert not torch.allclose(maps[a], maps[b], rtol=1e-3, atol=0), (a, b)


def _assert_same_parameter_grads(model, fused):
    ref, ours = dict(model.named_parameters()), dict(fused.named_parameters())
    assert ours.keys() == ref.keys()
    # relative to the largest gradient: a conv bias before a training-mode BN has an exact gradient of 0,
    # which the fused op gives and eager misses by the roundoff of the BN's sums
    scale = max(p.grad.abs().max().item() for p in ref.values())
    for k, p in ref.items():
        torch.testing.assert_close(ours[k].grad, p.grad, rtol=1e-9, atol=1e-9 * scale, msg=lambda m: f"{k}: {m}")


def test_parameter_gradients_follow_the_mode(vgg11, mode="deconvnet"):
    """Weights and biases of fused blocks get the gradient of the rewritten signal, as behind ReLU hooks."""
    model, fused, x = vgg11
    model, fused = copy.deepcopy(model), copy.deepcopy(fused)
    for net in (model, fused):
        with dk.attribution(mode, parameter_grads=True):
            net(x)[:, 3].sum().backward()
    _assert_same_parameter_grads(model, fused)


def test_fused_blocks_compute_no_parameter_gradients_by_default(vgg11):
    """An attribution reads the input's gradient: by default the fused blocks leave their parameters' .grad as it
    was (the input's gradient is the same), which saves a weight-gradient pass per block."""
    _, fused, x = vgg11
    fused = copy.deepcopy(fused)
    fused.zero_grad(set_to_none=True)
    blocks = [m for m in fused.modules() if getattr(m, "attribution_block", False)]
    assert blocks
    a = _ours(fused, x, "guided", 3)
    assert all(m.weight.grad is None and (m.bias is None or m.bias.grad is None) for m in blocks)
    assert torch.equal(a, _ours(copy.deepcopy(fused), x, "guided", 3, parameter_grads=True))
    with pytest.raises(TypeError, match="parameter_grads must be a bool"):
        dk.attribution("guided", parameter_grads=1)


class _BNNet(nn.Module):
    """conv -> BN -> ReLU -> pool, conv -> BN -> pool -> ReLU, conv -> BN -> ReLU, as nn.ReLU modules."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.r1, self.p1 = nn.ReLU(), nn.MaxPool2d(2)
        self.c2, self.b2 = nn.Conv2d(6, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.p2, self.r2 = nn.MaxPool2d(2), nn.ReLU()
        self.c3, self.b3, self.r3 = nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8), nn.ReLU(inplace=True)
        self.fc = nn.Linear(8 * 2 * 2, 5)

    def forward(self, x):
        x = self.p1(self.r1(self.b1(self.c1(x))))
        x = self.r2(self.p2(self.b2(self.c2(x))))
        return self.fc(self.r3(self.b3(self.c3(x))).flatten(1))


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("mode", MODES)
def test_batch_norm_blocks_match_captum(mode, training):
    torch.manual_seed(2)
    model = _BNNet().double().train(training)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.uniform_(-1.5, 1.5), m.bias.normal_(), m.running_mean.normal_(), m.running_var.uniform_(0.5, 2)
    fused = dk.fuse(copy.deepcopy(model))
    assert [(m.order, m.relu_module) for m in fused.modules() if hasattr(m, "order")] == [
        ("act-pool", True),
        ("pool-act", True),
        ("act-pool", True),
    ]
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    _assert_close(_ours(fused, x, mode, 1), _captum(model, x, mode, 1), f"{mode}, training={training}")
    # conv weights and biases, BN gammas and betas: the unfused model's (through the ReLU hooks)
    model.zero_grad(), fused.zero_grad()
    _ours(model, x, mode, 1, True), _ours(fused, x, mode, 1, True)
    _assert_same_parameter_grads(model, fused)


# --------------------------------------------------------------------------- deconvnet routing by block order


def _one_block(order: str, act: nn.Module = None) -> nn.Module:
    """conv -> ReLU -> pool or conv -> pool -> ReLU with a negative bias: many windows all <= 0."""
    torch.manual_seed(3)
    conv = nn.Conv2d(2, 4, 3, padding=1)
    with torch.no_grad():
        conv.bias.fill_(-0.6)
    act = nn.ReLU() if act is None else act
    layers = [conv, act, nn.MaxPool2d(2)] if order == "act-pool" else [conv, nn.MaxPool2d(2), act]
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(4 * 4 * 4, 3)).double()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_deconvnet_routes_off_windows_as_the_block_order_does(backend):
    x = torch.randn(2, 2, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    got = {}
    for order in ("act-pool", "pool-act"):
        model = _one_block(order)
        fused = dk.fuse(copy.deepcopy(model))
        assert fused.get_submodule("0").order == order
        with dk.backend(backend):
            _, sw = fused.get_submodule("0")(x, return_switches=True)
            off = (sw < 0x80) & ((sw & 0x0F) != 0)  # off windows whose recorded argmax is not offset 0
            assert off.sum() >= 5, "the case must have off windows whose argmax is not the first element"
            got[order] = _ours(fused, x, "deconvnet", 0)
        _assert_close(got[order], _captum(model, x, "deconvnet", 0), f"deconvnet, {order}, {backend}")
        for mode in ("gradient", "guided"):
            with dk.backend(backend):
                ours = _ours(fused, x, mode, 0)
            _assert_close(ours, _captum(model, x, mode, 0), f"{mode}, {order}, {backend}")
    # same weights, same values: only the routing of the off windows differs
    assert not torch.allclose(got["act-pool"], got["pool-act"], rtol=1e-3, atol=0)


def test_deconvnet_block_is_render_of_the_rectified_signal():
    """Zeiler & Fergus's deconvnet through a conv -> pool -> ReLU block is the package's render: the rectified
    signal unpooled at the recorded switches (every window on) through the transposed conv."""
    model = _one_block("pool-act")
    block = dk.fuse(copy.deepcopy(model)).get_submodule("0")
    x = torch.randn(2, 2, 8, 8, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 4, 4, 4, dtype=torch.float64)
    with dk.attribution("deconvnet"):
        y, sw = block(x, return_switches=True)
        y.backward(g)
    expected = dk.render(g.clamp_min(0), sw | 0x80, block.weight, padding=1, out_size=(8, 8))
    _assert_close(x.grad, expected)


# --------------------------------------------------------------------------- which ReLUs the modes reach


class _Mixed(nn.Module):
    """A functional ReLU, an nn.ReLU module and a LeakyReLU module, each in a fusable chain."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 6, 3, padding=1), nn.Conv2d(6, 6, 3)
        self.relu, self.leaky = nn.ReLU(), nn.LeakyReLU(0.1)
        self.fc = nn.Linear(6 * 2 * 2, 4)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.c1(x)), 2)
        x = F.max_pool2d(self.relu(self.c2(x)), 2)
        return self.fc(self.leaky(self.c3(x)).flatten(1))


@pytest.mark.parametrize("mode", ("guided", "deconvnet"))
def test_functional_and_leaky_relus_keep_the_plain_gradient(mode):
    torch.manual_seed(5)
    model = _Mixed().double()
    fused = dk.fuse(copy.deepcopy(model))
    blocks = {n: (m.relu_module, m.negative_slope) for n, m in fused.named_modules() if hasattr(m, "order")}
    assert blocks == {"c1": (False, 0.0), "c2": (True, 0.0), "c3": (False, 0.1)}
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    _assert_close(_ours(fused, x, mode, 2), _captum(model, x, mode, 2), mode)
    # only c2's ReLU is rewritten: without it the mode would be the plain gradient
    fused.c2.relu_module = False
    _assert_close(_ours(fused, x, mode, 2), _plain(model, x, 2), f"{mode}, no ReLU module")


class _SharedConv(nn.Module):
    """One conv at two call sites, once before an nn.ReLU module and once before F.relu."""

    def __init__(self):
        super().__init__()
        self.conv, self.relu = nn.Conv2d(3, 4, 3, padding=1), nn.ReLU()

    def forward(self, x):
        a = F.max_pool2d(self.relu(self.conv(x)), 2)
        return (a + F.max_pool2d(F.relu(self.conv(x.flip(-1))), 2)).flatten(1)


def test_a_conv_shared_by_a_relu_module_and_f_relu_is_not_fused_as_one():
    """One fused module cannot back-propagate by both rules, so fuse leaves the conv as it is."""
    torch.manual_seed(7)
    model = _SharedConv().double()
    fused = dk.fuse(copy.deepcopy(model))
    assert not fused.fuse_report.fused
    assert {r.reason for r in fused.fuse_report.refused} == {"module conv is called in 2 different chains"}
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    _assert_close(_ours(fused, x, "guided", 5), _captum(model, x, "guided", 5))


def test_hand_built_fused_layer_counts_as_a_relu_module():
    torch.manual_seed(6)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)
    ).double()
    with torch.no_grad():
        model[0].bias.fill_(-0.5)
    layer = dk.FusedConvReLUPool2d(2, 4, 3, padding=1, dtype=torch.float64)
    layer.load_state_dict(model[0].state_dict())
    fused = nn.Sequential(layer, nn.Flatten(), copy.deepcopy(model[4]))
    x = torch.randn(2, 2, 8, 8, dtype=torch.float64)
    for mode in MODES:
        _assert_close(_ours(fused, x, mode, 1), _captum(model, x, mode, 1), mode)


# --------------------------------------------------------------------------- Captum on the fused model


def _assert_rel(actual, expected, what=""):
    """Within 1e-5 of the largest value: Captum on the fused model against Captum on the original."""
    scale = expected.abs().max().item()
    assert scale > 0, what
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * scale, msg=lambda m: f"{what}: {m}")


def _no_hooks_left(model):
    return not any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks for m in model.modules())


@pytest.fixture(scope="module")
def vgg11_64():
    model = _vgg11()
    fused = dk.fuse(copy.deepcopy(model))
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    return model, fused, x


@pytest.mark.parametrize("mode", MODES)
def test_captum_on_the_fused_vgg11(vgg11_64, mode):
    """Saliency through the fused ops; GuidedBackprop / Deconvolution hook the nn.ReLU modules the blocks
    replaced (kept at their paths), and the blocks then run unfused through them."""
    model, fused, x = vgg11_64
    _assert_rel(_captum(fused, x, mode, 3), _captum(model, x, mode, 3), f"Captum {CAPTUM[mode].__name__}")
    assert _no_hooks_left(fused)


@pytest.mark.parametrize("layer", ["features.19", "features.20"])
def test_captum_layer_grad_cam_on_the_fused_vgg11(vgg11_64, layer):
    """The ReLU and the pool a block replaced: the block runs unfused while Captum hooks them."""
    model, fused, x = vgg11_64
    want = captum_attr.LayerGradCam(model, model.get_submodule(layer)).attribute(x, target=3)
    _assert_rel(captum_attr.LayerGradCam(fused, fused.get_submodule(layer)).attribute(x, target=3), want, layer)


def test_captum_layer_method_on_a_fused_block_raises(vgg11_64):
    """The module at the conv's path is the whole block: a hook on its output would see the pooled activation,
    not the conv's output, so it raises, naming the ways out; hooks on its input are the conv's and work."""
    model, fused, x = vgg11_64
    block = fused.get_submodule("features.18")
    with pytest.raises(
        RuntimeError,
        match=r"fused block 'features\.18' .*'features\.19', 'features\.20'.*"
        r"drmm_kernels\.attribution",
    ):
        captum_attr.LayerGradCam(fused, block).attribute(x, target=3)
    assert _no_hooks_left(fused)
    with pytest.raises(RuntimeError, match="hook is registered on the fused block"):
        captum_attr.LayerActivation(fused, block).attribute(x)
    _assert_rel(
        captum_attr.LayerGradCam(fused, block).attribute(x, target=3, attribute_to_layer_input=True),
        captum_attr.LayerGradCam(model, model.get_submodule("features.18")).attribute(
            x, target=3, attribute_to_layer_input=True
        ),
        "layer input",
    )
    block.hooks_see_block_output = True  # knowingly: the block's output is the pool's
    try:
        _assert_rel(
            captum_attr.LayerGradCam(fused, block).attribute(x, target=3),
            captum_attr.LayerGradCam(model, model.get_submodule("features.20")).attribute(x, target=3),
        )
    finally:
        block.hooks_see_block_output = False


class _Untraceable(nn.Module):
    """fx cannot trace it: fuse falls back to the nn.Sequential chains, whose ReLU / pool modules it keeps as the
    blocks' children (their slots pass through)."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1),
            nn.BatchNorm2d(6),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 8, 3, padding=1),
            nn.MaxPool2d(2),
            nn.ReLU(inplace=True),
        )
        self.fc = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x):
        if x.sum() > 1e9:
            x = x / 2
        return self.fc(self.features(x).flatten(1))


class _SharedReLU(nn.Module):
    """One nn.ReLU module in two fused chains (as ResNet blocks reuse self.relu), and functional dropout: a
    graph per mode (run here in eval mode)."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.relu = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 6, 3, padding=1), nn.ReLU()
        self.fc = nn.Linear(6 * 4 * 4, 4)

    def forward(self, x):
        x = F.max_pool2d(self.relu(self.c1(x)), 2)
        x = F.max_pool2d(self.relu(self.c2(x)), 2)
        return self.fc(F.dropout(x, 0.5, training=self.training).flatten(1))


def _bn_net(training):
    def make():
        model = _BNNet().train(training)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                with torch.no_grad():
                    (
                        m.weight.uniform_(-1.5, 1.5),
                        m.bias.normal_(),
                        m.running_mean.normal_(),
                        m.running_var.uniform_(0.5, 2),
                    )
        return model

    return make


CUSTOM_NETS = {  # name: (make, input shape, target)
    "bn eval": (_bn_net(False), (4, 3, 16, 16), 1),
    "bn train": (_bn_net(True), (4, 3, 16, 16), 1),
    "mixed relus": (_Mixed, (2, 3, 16, 16), 2),
    "shared relu, dropout": (lambda: _SharedReLU().eval(), (2, 3, 16, 16), 3),
    "act-pool": (lambda: _one_block("act-pool"), (2, 2, 8, 8), 0),
    "pool-act": (lambda: _one_block("pool-act"), (2, 2, 8, 8), 0),
    "untraceable": (_Untraceable, (2, 3, 16, 16), 4),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("net", list(CUSTOM_NETS))
def test_captum_on_fused_custom_nets(net, mode):
    make, shape, target = CUSTOM_NETS[net]
    torch.manual_seed(9)
    model = make().double()
    fused = dk.fuse(copy.deepcopy(model))
    assert fused.fuse_report.fused and (fused.fuse_report.mode == "modules") == (net == "untraceable")
    assert ("one graph per mode" in str(fused.fuse_report)) == (net == "shared relu, dropout")
    x = torch.randn(*shape, dtype=torch.float64)
    _assert_rel(_captum(fused, x, mode, target), _captum(model, x, mode, target), f"{net}, {mode}")
    assert _no_hooks_left(fused)
    # and drmm_kernels.attribution through the fused ops agrees with both
    _assert_rel(_ours(fused, x, mode, target), _captum(model, x, mode, target), f"{net}, {mode}, fused ops")


def test_captum_layer_methods_on_the_slots_the_sequential_fallback_emptied():
    """After the nn.Sequential fallback the ReLU / pool paths hold pass-through slots: a layer method there raises,
    naming the module's new path, and at that path it gives the original's attribution."""
    torch.manual_seed(9)
    model = _Untraceable().double().eval()
    fused = dk.fuse(copy.deepcopy(model))
    assert fused.fuse_report.mode == "modules"
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    for slot, moved in (("features.2", "features.0.unfused_act"), ("features.5", "features.4.unfused_pool")):
        for method in (
            lambda m: captum_attr.LayerGradCam(fused, m).attribute(x, target=4),
            lambda m: captum_attr.LayerActivation(fused, m).attribute(x),
        ):
            with pytest.raises(RuntimeError, match=rf"Hook '{moved}' instead.*drmm_kernels\.attribution"):
                method(fused.get_submodule(slot))
        assert _no_hooks_left(fused)
        for method in (captum_attr.LayerGradCam, captum_attr.LayerActivation):
            kw = dict(target=4) if method is captum_attr.LayerGradCam else {}
            _assert_rel(
                method(fused, fused.get_submodule(moved)).attribute(x, **kw),
                method(model, model.get_submodule(slot)).attribute(x, **kw),
                f"{method.__name__} at {moved}",
            )


# --------------------------------------------------------------------------- the context


def test_gradients_are_plain_after_the_context_and_on_exception(vgg11, vgg11_captum):
    model, fused, x = vgg11
    plain = vgg11_captum["gradient"]
    with dk.attribution("deconvnet"):
        assert dk.attribution.current_mode() == "deconvnet"
    _assert_close(_plain(fused, x, 3), plain, "after exit")
    _assert_close(_plain(model, x, 3), plain, "after exit, unfused")
    with pytest.raises(RuntimeError, match="boom"):
        with dk.attribution("guided"):
            fused(x)
            raise RuntimeError("boom")
    with pytest.raises(ValueError, match="input channels"):
        with dk.attribution("guided"):
            fused(x[:, :2])  # the forward itself fails inside a fused block
    assert dk.attribution.current_mode() == "gradient"
    assert attribution_module._open == 0 and not attribution_module._handles and not attribution_module._tls.calls
    _assert_close(_plain(fused, x, 3), plain, "after exception")
    _assert_close(_plain(model, x, 3), plain, "after exception, unfused")


def test_the_mode_is_fixed_when_the_forward_runs(vgg11, vgg11_captum):
    """A graph recorded in the context keeps its rule for a backward after exit; one recorded outside is plain."""
    model, fused, x = vgg11
    for net in (fused, model):
        xg = x.clone().requires_grad_()
        with dk.attribution("guided"):
            y = net(xg)[:, 3].sum()
        y.backward()
        _assert_close(xg.grad, vgg11_captum["guided"], "recorded inside")
        xg = x.clone().requires_grad_()
        y = net(xg)[:, 3].sum()
        with dk.attribution("guided"):
            y.backward()
        _assert_close(xg.grad, vgg11_captum["gradient"], "recorded outside")


def test_contexts_nest_and_stay_on_their_thread(vgg11, vgg11_captum):
    _, fused, x = vgg11
    with dk.attribution("guided"):
        with dk.attribution("gradient"):
            assert dk.attribution.current_mode() == "gradient"
            _assert_close(_plain(fused, x, 3), vgg11_captum["gradient"], "inner gradient")
        assert dk.attribution.current_mode() == "guided"
        seen = {}
        worker = threading.Thread(
            target=lambda: seen.update(mode=dk.attribution.current_mode(), grad=_plain(fused, x, 3))
        )
        worker.start()
        worker.join()
    assert seen["mode"] == "gradient"
    _assert_close(seen["grad"], vgg11_captum["gradient"], "other thread")


def test_bad_mode():
    with pytest.raises(
        ValueError,
        match=r"^drmm_kernels.attribution: mode must be one of 'gradient', 'guided', "
        r"'deconvnet', got 'saliency'$",
    ):
        dk.attribution("saliency")
    assert dk.attribution.current_mode() == "gradient"


def test_rewrite():
    """The rule on one switch map: offsets 0-3, on and off windows."""
    sw = torch.tensor([[[[0x83, 0x03, 0x00, 0x81]]]], dtype=torch.uint8)
    g = torch.tensor([[[[1.0, 2.0, -3.0, -4.0]]]])
    rewrite = attribution_module.rewrite
    window = dict(pool=2, pool_stride=2, pool_padding=0, ceil_mode=False)
    assert rewrite(g, sw, None, window) == (g, sw)
    gg, sg = rewrite(g, sw, ("guided", "act-pool"), window)
    assert gg.tolist() == [[[[1.0, 2.0, 0.0, 0.0]]]] and sg is sw
    for order, offsets in (("act-pool", [0x83, 0x80, 0x80, 0x81]), ("pool-act", [0x83, 0x83, 0x80, 0x81])):
        gd, sd = rewrite(g, sw, ("deconvnet", order), window)
        assert gd.tolist() == [[[[1.0, 2.0, 0.0, 0.0]]]] and sd.flatten().tolist() == offsets, order


def test_rewrite_routes_off_windows_of_a_padded_pool_to_their_first_element():
    """pool 2, stride 2, padding 1: window 0 starts at (-1, -1), so its first element inside the map is offset 3
    (1, 1); window 1 starts at row -1, column 1: offset 2 (1, 0). max_pool2d's backward of an all-zero window
    picks that element."""
    sw = torch.zeros(1, 1, 1, 2, dtype=torch.uint8)
    g = torch.ones(1, 1, 1, 2)
    window = dict(pool=2, pool_stride=2, pool_padding=1, ceil_mode=False)
    _, sd = attribution_module.rewrite(g, sw, ("deconvnet", "act-pool"), window)
    assert sd.flatten().tolist() == [0x83, 0x82]


def test_rewrite_refuses_a_relu_before_overlapping_windows():
    """The rule would act per window where the unfused model applies it to the windows' sum: refused (blocks
    built by fuse run unfused instead, tested on resnet18 / alexnet below)."""
    window = dict(pool=3, pool_stride=2, pool_padding=0, ceil_mode=False)
    sw, g = torch.zeros(1, 1, 1, 1, dtype=torch.uint8), torch.ones(1, 1, 1, 1)
    with pytest.raises(RuntimeError, match="applies its ReLU before an overlapping pool"):
        attribution_module.rewrite(g, sw, ("guided", "act-pool"), window)
    assert attribution_module.rewrite(g, sw, ("guided", "pool-act"), window)[1] is sw  # ReLU after the pool: fine


@pytest.mark.parametrize("mode", ["guided", "deconvnet"])
def test_attribution_matches_captum_on_resnet18_and_alexnet(mode):
    """The ResNet stem's padded (3, 2, 1) pool and AlexNet's overlapping (3, 2) pools, fused, against Captum on
    the unfused model (float64: only roundoff could differ)."""
    import torchvision
    from captum.attr import Deconvolution, GuidedBackprop

    method = {"guided": GuidedBackprop, "deconvnet": Deconvolution}[mode]
    for name, size in (("resnet18", 32), ("alexnet", 64)):
        torch.manual_seed(0)
        model = getattr(torchvision.models, name)().double().eval()
        fused = dk.fuse(copy.deepcopy(model))
        assert any(fused.get_submodule(b.name).pool_window["pool_stride"] == 2 for b in fused.fuse_report.fused)
        x = torch.randn(2, 3, size, size, dtype=torch.float64)
        want = method(model).attribute(x, target=3)
        xx = x.clone().requires_grad_()
        with dk.attribution(mode):
            fused(xx)[:, 3].sum().backward()
        scale = want.abs().max().item()
        torch.testing.assert_close(xx.grad, want, atol=1e-9 * scale, rtol=1e-7, msg=lambda m, n=name: f"{n}: {m}")


def test_bench_runs(tmp_path, capsys):
    """bench/attribution.py on the smallest setting: one round, the table and the JSON written."""
    import json
    import pathlib
    import runpy

    bench = runpy.run_path(str(pathlib.Path(__file__).resolve().parents[2] / "bench" / "attribution.py"))
    threads = torch.get_num_threads()
    try:
        assert bench["main"](["--batch", "1", "--repeats", "1", "--warmup", "0", "--results", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)
    assert "| deconvnet (Deconvolution) |" in capsys.readouterr().out
    rows = json.loads((tmp_path / "attribution.json").read_text())["rows"]
    assert [r["mode"] for r in rows] == list(MODES) and all(r["max_rel_diff"] < 1e-4 for r in rows)
