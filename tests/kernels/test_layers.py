"""Drop-in modules: state_dict compatibility, model surgery, refusals, rendering."""

import copy
import re

import pytest
import torch
from torch import nn

import drmm_kernels as dk
from drmm_kernels import FusedConvBNReLUPool2d, FusedConvReLUPool2d, Render2d, fuse_conv_relu_pool


def _vgg_block():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.LeakyReLU(0.1),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 10),
    ).double()


def test_fused_layer_loads_conv_state_dict_and_matches():
    conv = nn.Conv2d(3, 8, 3, padding=1).double()
    layer = FusedConvReLUPool2d(3, 8, 3, padding=1).double()
    layer.load_state_dict(conv.state_dict())
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    ref = nn.Sequential(conv, nn.ReLU(), nn.MaxPool2d(2))
    torch.testing.assert_close(layer(x), ref(x))
    y, sw = layer(x, return_switches=True)
    assert sw.dtype == torch.uint8 and sw.shape == y.shape


def test_fuse_swaps_every_triple_and_keeps_outputs_and_gradients():
    model = _vgg_block()
    fused = _vgg_block()
    keys_before = set(fused.state_dict())
    names = fuse_conv_relu_pool(fused)
    assert names == ["0", "3"]
    assert isinstance(fused[0], FusedConvReLUPool2d) and isinstance(fused[1], nn.Identity)
    assert fused[3].negative_slope == pytest.approx(0.1)
    assert set(fused.state_dict()) == keys_before  # checkpoints load unchanged
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    torch.testing.assert_close(fused(x), model(x))
    model(x).square().sum().backward()
    fused(x).square().sum().backward()
    for (n, p), (_, q) in zip(model.named_parameters(), fused.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=n)


def test_fuse_walks_nested_containers():
    model = nn.Module()
    model.features = nn.Sequential(nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.MaxPool2d(2)))
    assert fuse_conv_relu_pool(model) == ["features.0.0"]


@pytest.mark.parametrize(
    "pool, words",
    [
        (
            nn.MaxPool2d(2, 3),
            [
                "features.0 (Conv2d) -> features.1 (ReLU) -> features.2 (MaxPool2d 2)",
                "pool stride (3, 3) for kernel (2, 2) (the fused ops take one stride from 1 to the kernel size: no "
                "gapped windows)",
            ],
        ),
        (
            nn.MaxPool2d(3, padding=(1, 0)),
            ["pool padding (1, 0) (the fused ops take one padding from 0 to kernel // 2)"],
        ),
        (nn.MaxPool2d(5), ["pool kernel 5 > 4"]),
        (nn.MaxPool2d(2, return_indices=True), ["return_indices=True"]),
    ],
)
def test_fuse_refuses_poolings_it_cannot_express(pool, words):
    """The reasons are fuse()'s (one table, drmm_kernels.fusion_rules); the helper raises before changing anything."""
    model = nn.Module()
    model.features = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), pool)
    with pytest.raises(ValueError) as info:
        fuse_conv_relu_pool(model)
    for w in words:
        assert w in str(info.value), (w, str(info.value))
    assert isinstance(model.features[0], nn.Conv2d) and isinstance(model.features[1], nn.ReLU)  # nothing half-swapped


class ClippedReLU(nn.ReLU):
    """Overrides ReLU's forward: no longer what the fused ops compute."""

    def forward(self, x):
        return super().forward(x).clamp(max=1.0)


@pytest.mark.parametrize(
    "conv, act, word",
    [
        (nn.Conv2d(2, 2, 3, groups=2), nn.ReLU(), "grouped convolution (groups=2, depthwise)"),
        (nn.Conv2d(1, 2, 3, dilation=2), nn.ReLU(), "dilated convolution"),
        (nn.Conv2d(1, 2, 3, stride=(1, 2)), nn.ReLU(), "non-square conv stride (1, 2)"),
        (nn.Conv2d(1, 2, 3, padding_mode="reflect"), nn.ReLU(), "padding_mode='reflect'"),
        (
            nn.Conv2d(1, 2, 2, padding="same"),
            nn.ReLU(),
            "padding='same' with an even kernel (2, 2) pads asymmetrically",
        ),
        (nn.Conv2d(1, 2, 3), nn.LeakyReLU(1.5), "negative_slope=1.5 outside [0, 1)"),
        (nn.Conv2d(1, 2, 3), ClippedReLU(), "ClippedReLU overrides ReLU's forward"),
    ],
)
def test_fuse_refuses_convs_and_activations_it_cannot_express(conv, act, word):
    model = nn.Sequential(conv, act, nn.MaxPool2d(2))
    with pytest.raises(ValueError, match=re.escape(word)):
        fuse_conv_relu_pool(model)
    assert model[0] is conv


class PlainReLU(nn.ReLU):
    """A ReLU subclass that keeps ReLU's forward: it computes ReLU, so it fuses."""


@pytest.mark.parametrize(
    "layers, pools",
    [
        # what fuse() fuses in nn.Sequential containers, the helper fuses too
        (lambda: [nn.Conv2d(3, 4, 3, padding="same"), nn.ReLU(), nn.MaxPool2d(2)], [2]),
        (lambda: [nn.Conv2d(3, 4, 5, padding="same"), nn.LeakyReLU(0.2), nn.MaxPool2d(2)], [2]),
        (lambda: [nn.Conv2d(3, 4, 3, padding="valid"), PlainReLU(), nn.MaxPool2d(2)], [2]),
        (lambda: [nn.Conv2d(3, 4, (3, 1), padding=1), nn.ReLU(), nn.MaxPool2d(2)], [2]),  # non-square kernel
        (lambda: [nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2)], [1]),  # the avg-pool stays
        (lambda: [nn.Conv2d(3, 4, 3, padding=1), nn.MaxPool2d(2), nn.ReLU(inplace=True)], [2]),  # pool first
        (lambda: [nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2)], [2]),
        (
            lambda: [
                nn.Conv2d(3, 4, 3, padding=1),
                nn.ReLU(),
                nn.Conv2d(4, 4, 3, padding=1),
                nn.ReLU(),
                nn.MaxPool2d(2),
            ],
            [1, 2],
        ),
    ],
)
def test_fuse_fuses_what_fuse_fuses(layers, pools):
    torch.manual_seed(3)
    model = nn.Sequential(*layers(), nn.Flatten()).double().train()
    fused = copy.deepcopy(model)
    names = fuse_conv_relu_pool(fused)
    assert [fused.get_submodule(n).pool for n in names] == pools
    assert set(fused.state_dict()) == set(model.state_dict())
    report = dk.fuse(copy.deepcopy(model)).fuse_report  # the fx trace decides alike
    assert [b.name for b in report.fused] == names and not report.refused, str(report)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    for _ in range(2):  # batch-norm running statistics too
        torch.testing.assert_close(fused(x), model(x))
    torch.testing.assert_close(fused.state_dict(), model.state_dict())


def test_render2d_uses_the_layer_weight_and_matches_op():
    layer = FusedConvReLUPool2d(3, 4, 3, padding=1, bias=False).double()
    r = Render2d(layer)
    assert list(r.parameters()) == []  # tied, not registered twice
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    y, sw = layer(x, return_switches=True)
    out = r(y, sw, out_size=x.shape[-2:])
    torch.testing.assert_close(out, dk.render(y, sw, layer.weight, padding=1, out_size=(8, 8)))
    out.sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0


def test_bn_layer_matches_conv_bn_relu_pool_modules_in_train_and_eval():
    torch.manual_seed(1)
    layer = FusedConvBNReLUPool2d(3, 4, 3, padding=1).double()
    ref = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2)
    ).double()
    ref[0].load_state_dict(layer.conv.state_dict())
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    for _ in range(2):
        torch.testing.assert_close(layer(x), ref(x))
    torch.testing.assert_close(layer.bn.running_mean, ref[1].running_mean)
    torch.testing.assert_close(layer.bn.running_var, ref[1].running_var)
    assert int(layer.bn.num_batches_tracked) == int(ref[1].num_batches_tracked) == 2
    layer.eval(), ref.eval()
    torch.testing.assert_close(layer(x), ref(x))


def test_render2d_rejects_other_modules():
    with pytest.raises(TypeError, match="FusedConvReLUPool2d"):
        Render2d(nn.Conv2d(1, 1, 1))


def test_bn_layer_cumulative_average_momentum_none():
    torch.manual_seed(2)
    layer = FusedConvBNReLUPool2d(2, 3, 3, padding=1).double()
    layer.bn.momentum = None
    ref = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1, bias=False), nn.BatchNorm2d(3, momentum=None), nn.ReLU(), nn.MaxPool2d(2)
    ).double()
    ref[0].load_state_dict(layer.conv.state_dict())
    for seed in range(3):
        x = torch.randn(4, 2, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        torch.testing.assert_close(layer(x), ref(x))
    torch.testing.assert_close(layer.bn.running_var, ref[1].running_var)
    layer.eval(), ref.eval()
    torch.testing.assert_close(layer(x), ref(x))


def test_bn_layer_shift_is_an_extra_bias_after_the_norm():
    torch.manual_seed(7)
    layer = FusedConvBNReLUPool2d(3, 4, 3, padding=1, negative_slope=0.1)
    twin = FusedConvBNReLUPool2d(3, 4, 3, padding=1, negative_slope=0.1)
    twin.load_state_dict(layer.state_dict())
    shift = torch.randn(4, requires_grad=True)
    with torch.no_grad():
        twin.bn.bias += shift
    x = torch.randn(2, 3, 8, 8)
    y, sw = layer(x, return_switches=True, shift=shift)
    y2, sw2 = twin(x, return_switches=True)
    torch.testing.assert_close(y, y2)
    assert torch.equal(sw, sw2)
    y.sum().backward()
    assert shift.grad is not None and shift.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="shift must have shape"):
        layer(x, shift=torch.zeros(3))


def _small_net():
    torch.manual_seed(6)
    model = (
        nn.Sequential(
            nn.Conv2d(2, 4, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(4, 6, 3, padding=1),
            nn.BatchNorm2d(6),
            nn.MaxPool2d(2),
            nn.ReLU(inplace=True),
            nn.Flatten(),
            nn.Linear(6 * 2 * 2, 3),
        )
        .double()
        .eval()
    )
    with torch.no_grad():
        model[0].bias.fill_(-0.5)  # negative pre-activations: guided backprop and the plain gradient differ
        model[4].running_mean.normal_(), model[4].running_var.uniform_(0.5, 2.0)
    return model


@pytest.mark.parametrize("method", ["GuidedBackprop", "Deconvolution"])
def test_captum_on_a_model_fused_in_place(method):
    """Captum hooks every nn.ReLU module: the helper keeps them (as the blocks' unfused_act children), and a hooked
    one makes its block run the original chain through it, so the attributions are the unfused model's."""
    captum_attr = pytest.importorskip("captum.attr")
    model = _small_net()
    fused = copy.deepcopy(model)
    assert fuse_conv_relu_pool(fused) == ["0", "3"]
    assert sum(isinstance(m, nn.ReLU) for m in fused.modules()) == 2
    x = torch.randn(2, 2, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    def attribute(m):
        return getattr(captum_attr, method)(m).attribute(x.clone().requires_grad_(), target=1)

    want = attribute(model)
    xg = x.clone().requires_grad_()
    model(xg)[:, 1].sum().backward()
    assert not torch.allclose(xg.grad, want)  # what a block that ignored the hooks would give
    got = attribute(fused)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    assert not any(m._forward_hooks or m._backward_hooks or m._forward_pre_hooks for m in fused.modules())
    torch.testing.assert_close(fused(x), model(x))  # unhooked: the fused ops again


def test_a_hook_on_a_block_fused_in_place_raises():
    captum_attr = pytest.importorskip("captum.attr")
    fused = _small_net()
    fuse_conv_relu_pool(fused)
    with pytest.raises(RuntimeError, match=r"fused block '0'.*drmm_kernels\.attribution"):
        captum_attr.LayerGradCam(fused, fused[0]).attribute(torch.randn(1, 2, 8, 8, dtype=torch.float64), target=0)
