"""DRMM model: shapes of every preset, render = composition of drmm_kernels.render, render semantics."""

import pytest
import torch
import drmm_kernels as dk
from drmm_kernels import testing as eager
from drmm.model import DRMM, PRESETS, LayerSpec, build_model

SHAPES = {
    "rfm": (1, 28, 28),
    "drmm2": (1, 28, 28),
    "conv_small": (1, 28, 28),
    "conv_large": (3, 32, 32),
    "allconv13": (3, 32, 32),
}
TOP_SHAPES = {
    "rfm": (64, 16, 16),
    "drmm2": (64, 9, 9),
    "conv_small": (10, 1, 1),
    "conv_large": (10, 1, 1),
    "allconv13": (128, 1, 1),
}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_shapes_and_render_size(name):
    torch.manual_seed(0)
    shape = SHAPES[name]
    model = build_model(name, shape[0], shape[1:], num_classes=10)
    x = torch.rand(2, *shape)
    logits, latents = model(x)
    assert logits.shape == (2, 10)
    assert model.top_shape == TOP_SHAPES[name]
    assert len(latents.switches) == len(PRESETS[name])
    assert all(sw.dtype == torch.uint8 for sw in latents.switches)
    x_hat, levels = model.render(latents, logits.argmax(1), return_levels=True)
    assert x_hat.shape == x.shape
    assert len(levels) == len(PRESETS[name]) + 1
    assert levels[0].shape == (2, *TOP_SHAPES[name])
    # level j is the rendering at the input of layer L-j (channels and size of that input)
    for j, i in enumerate(reversed(range(len(PRESETS[name])))):
        assert levels[j + 1].shape[1] == model.conv_weight(model.convs[i]).shape[1]
        assert tuple(levels[j + 1].shape[-2:]) == latents.input_sizes[i]
    assert torch.isfinite(x_hat).all()


def _manual_render(model, latents, classes):
    mu = model.readout.weight[classes].view(len(classes), *model.top_shape)
    for i in reversed(range(len(model.specs))):
        spec = model.specs[i]
        if spec.pool == "mean":
            mu = mu.expand(-1, -1, *latents.map_sizes[i])
        mu = dk.render(
            mu,
            latents.switches[i],
            model.conv_weight(model.convs[i]),
            padding=spec.pad,
            pool=spec.fused_pool,
            out_size=latents.input_sizes[i],
            negative_slope=spec.negative_slope,
        )
    return mu


@pytest.mark.parametrize("name", ["drmm2", "conv_small"])
def test_render_equals_drmm_kernels_composition(name):
    torch.manual_seed(1)
    model = build_model(name, 1, (28, 28))
    x = torch.rand(3, 1, 28, 28)
    logits, latents = model(x)
    classes = torch.tensor([0, 3, 7])
    assert torch.equal(model.render(latents, classes), _manual_render(model, latents, classes))


def test_render_matches_plain_torch_unpool_and_transposed_conv():
    # Independent of drmm_kernels.render: unpool at the recorded argmax, mask by the a-switch, conv_transpose2d
    # with the same weight (docs/model.md#top-down-rendering; drmm_kernels.testing's eager composition), for a
    # one-layer model without BN.
    torch.manual_seed(2)
    model = DRMM([LayerSpec(6, 3, "same", "max", norm="none")], 1, (8, 8), num_classes=4)
    x = torch.randn(2, 1, 8, 8)
    logits, latents = model(x)
    classes = torch.tensor([1, 2])
    layer = model.convs[0]
    pooled, indices = eager.conv_relu_pool(x, layer.weight, padding=1, pool=2, bias=layer.bias)
    mu = model.readout.weight[classes].view(2, 6, 4, 4)
    expected = eager.render(mu, indices, layer.weight, (8, 8), (pooled > 0).to(mu.dtype), padding=1, pool=2)
    torch.testing.assert_close(model.render(latents, classes), expected)


def test_mean_unpool_scale_inv_area_divides_by_map_area():
    torch.manual_seed(3)
    a = build_model("conv_small", 1, (28, 28), norm="none")
    b = build_model("conv_small", 1, (28, 28), norm="none", mean_unpool_scale="inv_area")
    b.load_state_dict(a.state_dict())
    x = torch.rand(2, 1, 28, 28)
    _, lat = a(x)
    classes = torch.tensor([4, 9])
    # rendering is linear in the template given the switches; the mean-pooled map is 6x6
    torch.testing.assert_close(b.render(lat, classes), a.render(lat, classes) / 36)


def test_td_relu_renders_nonnegative_image_and_gradients_reach_templates_and_filters():
    torch.manual_seed(4)
    model = build_model("drmm2", 1, (28, 28), td_relu=True)
    x = torch.rand(4, 1, 28, 28)
    logits, latents = model(x)
    x_hat = model.render(latents, logits.argmax(1))
    assert (x_hat >= 0).all() and (x_hat > 0).any()
    ((x_hat - x) ** 2).mean().backward()
    assert model.readout.weight.grad is not None and model.readout.weight.grad.abs().sum() > 0
    for layer in model.convs:
        assert model.conv_weight(layer).grad.abs().sum() > 0
    assert all(not sw.requires_grad for sw in latents.switches)


def test_leaky_activation_renders_through_off_switches():
    torch.manual_seed(5)
    relu = build_model("drmm2", 1, (28, 28), activation="relu", norm="none")
    leaky = build_model("drmm2", 1, (28, 28), activation="leaky", norm="none")
    leaky.load_state_dict(relu.state_dict())
    x = torch.rand(2, 1, 28, 28)
    _, lat_r = relu(x)
    _, lat_l = leaky(x)
    # first-layer switches are decisions on the same pre-activation, so they agree; deeper inputs differ
    assert torch.equal(lat_r.switches[0], lat_l.switches[0])
    classes = torch.tensor([0, 1])
    assert not torch.allclose(relu.render(lat_r, classes), leaky.render(lat_l, classes))


def test_bad_arguments_name_the_argument():
    with pytest.raises(ValueError, match="padding"):
        LayerSpec(8, 3, padding="half")
    with pytest.raises(ValueError, match="model preset"):
        build_model("resnet", 1, (28, 28))
    model = build_model("rfm", 1, (28, 28))
    with pytest.raises(ValueError, match="x must have shape"):
        model(torch.rand(2, 3, 28, 28))
    _, lat = model(torch.rand(2, 1, 28, 28))
    with pytest.raises(ValueError, match="classes"):
        model.render(lat, torch.tensor([1, 2, 3]))


def test_bn_momentum_reaches_the_batch_norms():
    model = build_model("drmm2", 1, (28, 28), bn_momentum=0.01)
    assert all(layer.bn.momentum == 0.01 for layer in model.convs)
    with pytest.raises(ValueError, match="bn_momentum"):
        build_model("drmm2", 1, (28, 28), bn_momentum=None)


def test_class_template_gradient_is_deterministic_across_threads():
    # weight[classes]'s backward accumulated repeated classes in a thread-dependent order, so two identical
    # training runs on 2 threads drifted apart; the templates' gradient must be bitwise reproducible.
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        model = build_model("conv_small", 1, (28, 28))
        classes = torch.randint(0, 10, (500,), generator=torch.Generator().manual_seed(0))
        upstream = torch.randn(500, *model.top_shape, generator=torch.Generator().manual_seed(1))

        def grad():
            model.zero_grad(set_to_none=True)
            (model.class_templates(classes) * upstream).sum().backward()
            return model.readout.weight.grad.clone()

        first = grad()
        assert all(torch.equal(first, grad()) for _ in range(20))
        expected = torch.zeros_like(first).index_add_(0, classes, upstream.reshape(500, -1).double().float())
        torch.testing.assert_close(first, expected)
    finally:
        torch.set_num_threads(threads)
