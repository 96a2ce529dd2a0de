"""Drop-in modules: state_dict compatibility, model surgery, refusals, rendering."""

import pytest
import torch
from torch import nn

import drmm_kernels as dk
from drmm_kernels import FusedConvBNReLUPool2d, FusedConvReLUPool2d, Render2d, fuse_conv_relu_pool


def _vgg_block():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(8, 16, 3, padding=1), nn.LeakyReLU(0.1), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(16 * 4 * 4, 10)).double()


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
    assert set(fused.state_dict()) == keys_before   # checkpoints load unchanged
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


@pytest.mark.parametrize("pool, words", [
    (nn.MaxPool2d(3, 2), ["features.0", "overlapping", "stride == kernel_size"]),
    (nn.MaxPool2d(2, ceil_mode=True), ["ceil_mode=True"]),
    (nn.MaxPool2d(2, padding=1), ["padding=1"]),
    (nn.AvgPool2d(2), ["AvgPool2d", "MaxPool2d only"]),
    (nn.MaxPool2d(5), ["kernel_size=5"]),
])
def test_fuse_refuses_poolings_it_cannot_express(pool, words):
    model = nn.Module()
    model.features = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), pool)
    with pytest.raises(ValueError) as info:
        fuse_conv_relu_pool(model)
    for w in words:
        assert w in str(info.value), (w, str(info.value))
    assert isinstance(model.features[0], nn.Conv2d)  # nothing half-swapped


def test_fuse_refuses_convs_it_cannot_express():
    for conv, word in [(nn.Conv2d(2, 2, 3, groups=2), "groups=2"), (nn.Conv2d(1, 2, 3, dilation=2), "dilation"),
                       (nn.Conv2d(1, 2, (3, 1)), "not square"), (nn.Conv2d(1, 2, 3, padding_mode="reflect"),
                                                                  "padding_mode")]:
        with pytest.raises(ValueError, match=word):
            fuse_conv_relu_pool(nn.Sequential(conv, nn.ReLU(), nn.MaxPool2d(2)))


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
    ref = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                        nn.MaxPool2d(2)).double()
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
    ref = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, bias=False), nn.BatchNorm2d(3, momentum=None), nn.ReLU(),
                        nn.MaxPool2d(2)).double()
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
