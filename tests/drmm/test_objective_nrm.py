"""NRM objective options: moment matching (nonneg_term='moment_matching') and rendering-path normalisation."""

import math

import pytest
import torch

from drmm import train as T
from drmm.config import TrainConfig
from drmm.losses import moment_matching_per_example, moment_pairs, rpn_per_example
from drmm.model import build_model


def _with_moments(shape, mean, var, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(shape, generator=g).flatten(1)
    z = (z - z.mean(1, keepdim=True)) / z.std(1, unbiased=False, keepdim=True)
    return (z * var.sqrt().view(-1, 1) + mean.view(-1, 1)).view(shape)


def test_mm_zero_for_equal_moments_positive_otherwise():
    torch.manual_seed(0)
    fw = torch.randn(4, 3, 8, 8) * 2 + 1
    m, v = fw.flatten(1).mean(1), fw.flatten(1).var(1, unbiased=False)
    td = _with_moments((4, 5, 2, 2), m, v)  # other shape, same per-sample moments
    assert torch.allclose(moment_matching_per_example([(td, fw)]), torch.zeros(4), atol=1e-5)
    assert (moment_matching_per_example([(td + 0.3, fw)]) > 1e-3).all()
    assert (moment_matching_per_example([(td * 1.5, fw)]) > 1e-3).all()
    # closed form: the Gaussian KL(N(m_td, v_td) || N(m_fw, v_fw)) per sample, summed over pairs
    td2 = _with_moments((4, 5, 2, 2), m + 1.0, 4 * v)
    expected = 0.5 * (1.0 / v + 4 - math.log(4) - 1)
    got = moment_matching_per_example([(td2, fw), (td, fw)])
    assert torch.allclose(got, expected, rtol=1e-4)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_mm_gradient_pulls_moments_together(sign):
    torch.manual_seed(1)
    fw = torch.randn(3, 2, 6, 6)
    m, v = fw.flatten(1).mean(1), fw.flatten(1).var(1, unbiased=False)
    base = _with_moments((3, 4, 3, 3), m, v)
    shift = torch.tensor(sign * 0.5, requires_grad=True)
    scale = torch.tensor(1.0 + sign * 0.5, requires_grad=True)
    moment_matching_per_example([(base + shift, fw)]).sum().backward()
    assert shift.grad.item() * sign > 0  # descent moves the mean back toward m_fw
    c = base.flatten(1).mean(1).view(-1, 1, 1, 1)
    moment_matching_per_example([((base - c) * scale + c, fw)]).sum().backward()
    assert scale.grad.item() * sign > 0  # and the spread back toward v_fw


def _model(preset="drmm2", activation=None, seed=0):
    torch.manual_seed(seed)
    model = build_model(preset, 1, (28, 28), activation=activation)
    with torch.no_grad():
        for layer in model.convs:
            layer.bn.bias.normal_()
            layer.bn.weight.uniform_(0.5, 1.5)
        model.readout.bias.normal_()
    return model


def test_forward_conv_outputs_pairing_and_recording():
    model = _model()
    x = torch.randn(4, 1, 28, 28)
    _, latents = model(x)
    assert latents.layer_inputs is None  # not recorded (and no extra conv) unless MM asks for it
    model.record_layer_inputs = True
    _, latents = model(x)
    fw = model.forward_conv_outputs(latents)
    assert torch.allclose(fw[0], model.convs[0].conv(x), atol=1e-5)  # the pre-BN conv output
    assert [f.shape[1:] for f in fw] == [(32, 32, 32), (64, 18, 18)]
    _, levels = model.render(latents, torch.zeros(4, dtype=torch.long), return_levels=True)
    pairs = moment_pairs(levels[:-1], fw)
    assert len(pairs) == 2
    assert pairs[0][0] is levels[0] and pairs[0][1] is fw[1]  # top template <-> last conv
    assert pairs[1][0] is levels[1] and pairs[1][1] is fw[0]  # rendered into layer 1's input <-> conv of layer 0


def test_rpn_zero_for_identical_paths_positive_otherwise():
    model = _model("conv_small", "leaky")
    x = torch.randn(4, 1, 28, 28)
    _, latents = model(x)
    classes = torch.tensor([0, 1, 2, 3])
    _, levels = model.render(latents, classes, return_levels=True)
    same = rpn_per_example(model, latents, levels, latents, levels)
    assert torch.equal(same, torch.zeros(4))
    pn_latents = model.prior_path_latents(latents)
    for sw, pn in zip(latents.switches, pn_latents.switches):  # the t-switches are the real input's
        assert torch.equal(sw & 0x0F, pn & 0x0F)
    # layer 0 sees a zero image: with fresh running stats (mean 0, var 1) its a-switch is beta > 0 per channel
    beta_on = (model.convs[0].bn.bias > 0).view(1, -1, 1, 1).expand_as(pn_latents.switches[0])
    assert torch.equal((pn_latents.switches[0] & 0x80) != 0, beta_on)
    templates = model.prior_template().expand(4, *model.top_shape)
    _, pn_levels = model.render(pn_latents, classes, return_levels=True, templates=templates)
    rpn = rpn_per_example(model, latents, levels, pn_latents, pn_levels)
    assert (rpn > 0).all()
    with_prior = rpn_per_example(model, latents, levels, pn_latents, pn_levels, classes)
    log_pi = model.readout.bias.detach()
    assert torch.allclose(with_prior - rpn, (log_pi.max() - log_pi[classes]).abs(), atol=1e-6)


@pytest.mark.parametrize(
    "opts",
    [
        dict(nonneg_term="moment_matching"),
        dict(rpn_weight=1.0),
        dict(rpn_weight=0.5, rpn_class_prior=True, nonneg_term="moment_matching"),
    ],
)
def test_train_step_with_nrm_options_is_finite(opts):
    model = _model("conv_small", "leaky")
    cfg = TrainConfig(**opts)
    x, y = torch.randn(6, 1, 28, 28), torch.randint(0, 10, (6,))
    labeled = torch.arange(6) < 3
    loss, logs, _ = T.train_step(model, cfg, cfg.objective(), x, y, labeled)
    loss.backward()
    assert math.isfinite(loss.item())
    if "rpn_weight" in opts:
        assert logs["rpn"].item() > 0
    else:
        assert "rpn" not in logs and logs["nn"].item() > 0
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    # switching the option off again restores the plain forward (no recorded inputs)
    plain = TrainConfig()
    T.train_step(model, plain, plain.objective(), x, y, labeled)
    assert model.record_layer_inputs is False
