"""NRM-flavour model options (docs/model.md#nrm-flavour): top-down BN, BiasAdder, dropout, Max-Min, AllConv13 tail;
and the whole-network consistency of rendering with inference (render = gradient of the class logit)."""

import pytest
import torch
import torch.nn.functional as F

import drmm_kernels as dk
from drmm import train as T
from drmm.config import config_from_dict
from drmm.losses import MinBranch, ObjectiveConfig, drmm_objective
from drmm.model import DRMM, LayerSpec, build_model

# A small net with every kind of layer: max-pooled, unpooled, mean-pooled, BN and leaky.
SMALL = [
    LayerSpec(6, 3, "same", "max", activation="leaky"),
    LayerSpec(8, 3, "valid"),
    LayerSpec(5, 1, "valid", "mean", activation="leaky"),
]


def _small(**kw):
    return DRMM(SMALL, 1, (10, 10), num_classes=5, **kw)


# ---------------------------------------------------------------- render is the transpose of inference


@pytest.mark.parametrize("name,activation", [("conv_small", "relu"), ("conv_small", "leaky"), ("drmm2", "relu")])
@pytest.mark.parametrize("branch", ["max", "min"])
def test_render_equals_gradient_of_the_class_logit(name, activation, branch):
    # Without normalisation and with the adjoint mean-pool inverse, max-sum inference is piecewise linear in the
    # image and rendering class c through the image's own switches is the transpose of that map: render = the
    # gradient of the class-c logit (before softmax; the readout bias drops out) with respect to the image.
    torch.manual_seed(0)
    model = build_model(
        name, 1, (28, 28), norm="none", activation=activation, mean_unpool_scale="inv_area", maxmin=branch == "min"
    ).double()
    for layer in model.convs:  # nonzero biases: the gradient is still the linear part, which render computes
        torch.nn.init.normal_(layer.bias, std=0.1)
    x = torch.rand(3, 1, 28, 28, dtype=torch.float64, requires_grad=True)
    logits, latents = model(x)
    if branch == "min":
        logits, latents = latents.branch_logits[1], latents.min_branch
    classes = torch.tensor([2, 5, 7])
    (grad,) = torch.autograd.grad(logits.gather(1, classes[:, None]).sum(), x)
    rendered = model.render(latents, classes)
    assert rendered.abs().max() > 0
    torch.testing.assert_close(rendered, grad, rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------- top-down BatchNorm


def test_td_batchnorm_follows_the_template_and_every_transposed_conv():
    torch.manual_seed(1)
    model = _small(td_batchnorm=True)
    assert [bn.num_features for bn in model.td_norms] == [5, 8, 6, 1]  # template, inputs of layers 2, 1, 0
    for bn in model.td_norms:  # non-trivial affine parameters and running statistics
        torch.nn.init.normal_(bn.weight, 1.0, 0.3), torch.nn.init.normal_(bn.bias, 0.0, 0.3)
        bn.running_mean.normal_(), bn.running_var.uniform_(0.5, 2.0)
    model.eval()
    x = torch.rand(4, 1, 10, 10)
    _, latents = model(x)
    classes = torch.tensor([0, 1, 3, 4])
    x_hat, levels = model.render(latents, classes, return_levels=True)
    mu = model.td_norms[0](model.readout.weight[classes].view(4, 5, 1, 1))
    expected = [mu]
    for j, i in enumerate(reversed(range(3)), start=1):
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
        mu = model.td_norms[j](mu)
        expected.append(mu)
    for got, want in zip(levels, expected):
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(x_hat, expected[-1])


def test_sampling_renders_through_the_top_down_bns():
    from drmm.sample import render_with_switches

    torch.manual_seed(13)
    model = _small(td_batchnorm=True)
    for bn in model.td_norms:
        torch.nn.init.normal_(bn.bias, 0.0, 0.5)
    model.eval()
    x = torch.rand(3, 1, 10, 10)
    _, latents = model(x)
    classes = torch.tensor([1, 2, 3])
    templates = model.class_templates(classes)
    got = render_with_switches(model, templates, latents.switches, relu_between=False)
    torch.testing.assert_close(got, model.render(latents, classes))


def test_td_batchnorm_trains_its_own_statistics_and_parameters():
    torch.manual_seed(2)
    model = _small(td_batchnorm=True).train()
    x = torch.rand(6, 1, 10, 10)
    logits, latents = model(x)
    before = [bn.running_mean.clone() for bn in model.td_norms]
    x_hat = model.render(latents, logits.argmax(1))
    ((x_hat - x) ** 2).mean().backward()
    for bn, old in zip(model.td_norms, before):
        assert not torch.equal(bn.running_mean, old)
        assert bn.weight.grad is not None and bn.weight.grad.abs().sum() > 0
    assert model.td_norms is not None and all(
        bn not in list(model.td_norms) for bn in [layer.bn for layer in model.convs]
    )


def test_rpn_prior_path_leaves_the_top_down_bn_statistics_alone():
    torch.manual_seed(11)
    cfg = config_from_dict({"model": "drmm2", "td_batchnorm": True, "bias_adder": True, "rpn_weight": 1.0})
    model = T.model_from_config(cfg, (1, 28, 28), 10)
    x, y = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))
    labeled = torch.arange(8) < 4
    model.eval()  # frozen = eval-mode normalisation
    _, latents = model(x)
    classes = torch.arange(8) % 10
    torch.testing.assert_close(model.render(latents, classes, frozen_norms=True), model.render(latents, classes))
    model.train()
    T.train_step(model, cfg, cfg.objective(), x, y, labeled)
    after_rpn = [bn.running_mean.clone() for bn in model.td_norms]
    for bn in model.td_norms:
        bn.reset_running_stats()
    plain = config_from_dict({"model": "drmm2", "td_batchnorm": True, "bias_adder": True})
    T.train_step(model, plain, plain.objective(), x, y, labeled)
    for bn, rm in zip(model.td_norms, after_rpn):  # one update each, from the real path only
        torch.testing.assert_close(bn.running_mean, rm)


# ---------------------------------------------------------------- BiasAdder


def test_bias_adder_is_an_extra_bias_after_the_batch_norm():
    torch.manual_seed(3)
    with_adder = _small(bias_adder=True)
    plain = _small()
    state = {k: v for k, v in with_adder.state_dict().items() if not k.startswith("bias_adders")}
    plain.load_state_dict(state)
    for key, b in with_adder.bias_adders.items():
        b.data.normal_()
        plain.convs[int(key)].bn.bias.data += b.data  # BN beta + BiasAdder = one shift
    assert sorted(with_adder.bias_adders) == ["0", "1", "2"]
    x = torch.rand(4, 1, 10, 10)
    logits_a, lat_a = with_adder(x)
    logits_p, lat_p = plain(x)
    torch.testing.assert_close(logits_a, logits_p)
    for sa, sp in zip(lat_a.switches, lat_p.switches):
        assert torch.equal(sa, sp)
    assert with_adder.layer_bias(1) is with_adder.bias_adders["1"]  # the RPN's b is the BiasAdder
    for sa, sp in zip(with_adder.prior_path_latents(lat_a).switches, plain.prior_path_latents(lat_p).switches):
        assert torch.equal(sa, sp)
    logits_a.sum().backward()
    assert all(b.grad is not None and b.grad.abs().sum() > 0 for b in with_adder.bias_adders.values())


def test_bias_adder_needs_batch_norm_layers():
    with pytest.raises(ValueError, match="bias_adder"):
        build_model("drmm2", 1, (28, 28), norm="none", bias_adder=True)


# ---------------------------------------------------------------- dropout


def test_dropout_and_td_dropout_act_in_training_only():
    torch.manual_seed(4)
    plain = _small()
    dropped = _small(dropout=0.5, td_dropout=0.5)
    dropped.load_state_dict(plain.state_dict())
    x = torch.rand(4, 1, 10, 10)
    classes = torch.tensor([0, 1, 2, 3])
    plain.eval(), dropped.eval()
    logits_p, lat_p = plain(x)
    logits_d, lat_d = dropped(x)
    torch.testing.assert_close(logits_d, logits_p)
    torch.testing.assert_close(dropped.render(lat_d, classes), plain.render(lat_p, classes))
    plain.train(), dropped.train()
    _, lat_p = plain(x)
    torch.manual_seed(5)
    _, lat_d = dropped(x)
    assert torch.equal(lat_d.switches[0], lat_p.switches[0])  # dropout comes after the first pool ...
    assert not torch.equal(lat_d.switches[1], lat_p.switches[1])  # ... and changes what the next layer sees
    torch.manual_seed(6)
    a = dropped.render(lat_p, classes)
    torch.manual_seed(6)
    b = dropped.render(lat_p, classes)
    torch.testing.assert_close(a, b)  # seeded: reproducible
    assert not torch.allclose(a, plain.render(lat_p, classes))
    with pytest.raises(ValueError, match="td_dropout"):
        _small(td_dropout=1.0)


# ---------------------------------------------------------------- Max-Min


def _eager_min_branch(model, x):
    """The min branch written out in eager PyTorch: v = BN_min(conv(h)) + b, act = min(v,0) + s*max(v,0),
    min-pool; returns its logits and per layer (v, indices of the window argmin) for the switch checks.

    The min BN's bias parameter stores -beta_min (the branch runs on the negated signal, model._layer_forward), so
    the eager BN here uses bias = -bn.bias."""
    h, record = x, []
    for i, spec in enumerate(model.specs):
        layer, twin = model.convs[i], model.min_convs[str(i)]
        z = F.conv2d(h, layer.conv.weight, padding=spec.pad)
        v = F.batch_norm(z, None, None, twin.bn.weight, -twin.bn.bias, training=True, eps=twin.bn.eps)
        if model.bias_adders is not None:
            v = v + model.bias_adders[str(i)].view(1, -1, 1, 1)
        act = torch.minimum(v, torch.zeros(())) + spec.negative_slope * torch.clamp(v, min=0)
        if spec.pool == "max":
            neg, idx = F.max_pool2d(-act, 2, return_indices=True)
            h = -neg
        else:
            idx = None
            h = act.mean(dim=(2, 3), keepdim=True) if spec.pool == "mean" else act
        record.append((v, idx))
    return model.readout(h.flatten(1)), record


def test_maxmin_min_branch_matches_eager_min_pooling():
    torch.manual_seed(7)
    model = _small(maxmin=True, bias_adder=True).double()
    for twin in model.min_convs.values():  # the min branch has its own, here distinct, BN parameters
        torch.nn.init.normal_(twin.bn.weight, 1.0, 0.3), torch.nn.init.normal_(twin.bn.bias, 0.0, 0.3)
    for b in model.bias_adders.values():
        b.data.normal_(0, 0.3)
    x = torch.rand(4, 1, 10, 10, dtype=torch.float64)
    logits, latents = model(x)
    z_max, z_min = latents.branch_logits
    want_min, record = _eager_min_branch(model, x)
    torch.testing.assert_close(z_min, want_min)
    torch.testing.assert_close(logits, 0.5 * (z_max + z_min))
    max_only = _small(bias_adder=True).double()
    max_only.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("min_")})
    torch.testing.assert_close(z_max, max_only(x)[0])  # the max branch is the plain model
    for i, (v, idx) in enumerate(record):
        sw = latents.min_branch.switches[i]
        if idx is not None:  # offsets = window argmin of the min activation, on-bit = v < 0 there
            assert torch.equal(dk.switches_to_indices(sw, pool=2, conv_size=v.shape[-2:]), idx)
            on = v.flatten(2).gather(2, idx.flatten(2)).view_as(idx) < 0
        else:
            on = v < 0
        assert torch.equal((sw & 0x80) != 0, on)
    # the two branches share the conv weights (one parameter) but not the BNs
    assert model.min_convs["0"].conv.weight is model.convs[0].conv.weight
    assert model.min_convs["0"].bn is not model.convs[0].bn


def test_maxmin_state_dict_round_trip_keeps_weights_tied():
    torch.manual_seed(8)
    a, b = _small(maxmin=True), _small(maxmin=True)
    b.load_state_dict(a.state_dict())
    x = torch.rand(3, 1, 10, 10)
    torch.testing.assert_close(a.eval()(x)[0], b.eval()(x)[0])
    assert b.min_convs["1"].conv.weight is b.convs[1].conv.weight
    # the state_dict names each shared conv weight twice, the optimizer steps it once
    listed = [p for _, p in b.named_parameters(remove_duplicate=False)]
    assert len(listed) == len(list(b.parameters())) + len(b.min_convs)
    opt = torch.optim.SGD(b.parameters(), lr=0.1)
    assert sum(p is b.convs[1].conv.weight for p in opt.param_groups[0]["params"]) == 1


def test_maxmin_min_branch_in_eval_mode_uses_its_own_running_statistics():
    # The min BN runs on the negated signal, so its running_mean holds -mean of the min branch's conv output
    # and its bias -beta_min: eager eval = BN with mean -running_mean, same variance, bias -bias.
    torch.manual_seed(12)
    model = _small(maxmin=True).double()
    x = torch.rand(6, 1, 10, 10, dtype=torch.float64)
    for _ in range(3):
        model(x)  # training-mode passes fill the running statistics
    model.eval()
    _, latents = model(x)
    h = x
    for i, spec in enumerate(model.specs):
        twin = model.min_convs[str(i)]
        z = F.conv2d(h, model.convs[i].conv.weight, padding=spec.pad)
        v = F.batch_norm(
            z,
            -twin.bn.running_mean,
            twin.bn.running_var,
            twin.bn.weight,
            -twin.bn.bias,
            training=False,
            eps=twin.bn.eps,
        )
        act = torch.minimum(v, torch.zeros(())) + spec.negative_slope * torch.clamp(v, min=0)
        h = -F.max_pool2d(-act, 2) if spec.pool == "max" else act
    torch.testing.assert_close(latents.branch_logits[1], model.readout(h.mean(dim=(2, 3)).flatten(1)))


def test_maxmin_objective_averages_the_two_branches():
    torch.manual_seed(9)
    n = 6
    labels, labeled = torch.randint(0, 5, (n,)), torch.arange(n) < 3
    x = torch.rand(n, 1, 4, 4)
    z1, z2 = torch.randn(n, 5), torch.randn(n, 5)
    xh1, xh2 = torch.rand(n, 1, 4, 4), torch.rand(n, 1, 4, 4)
    s1, s2 = [torch.randn(n, 3, 2, 2)], [torch.randn(n, 3, 2, 2)]
    cfg = ObjectiveConfig()
    one, logs1 = drmm_objective(cfg, z1, labels, labeled, x, xh1, s1)
    two, logs2 = drmm_objective(cfg, z2, labels, labeled, x, xh2, s2)
    both, logs = drmm_objective(cfg, z1, labels, labeled, x, xh1, s1, min_branch=MinBranch(z2, xh2, s2))
    for key in ("ce", "rc", "nn"):
        torch.testing.assert_close(logs[key], 0.5 * (logs1[key] + logs2[key]))
    # KL is taken on the average of the two softmaxes, not averaged per branch
    q = 0.5 * (torch.softmax(z1, 1) + torch.softmax(z2, 1))
    kl = (q * torch.log(5 * q + 1e-8)).sum(1)[~labeled].mean()
    torch.testing.assert_close(logs["kl"], cfg.kl_sign * kl)
    same, _ = drmm_objective(cfg, z1, labels, labeled, x, xh1, s1, min_branch=MinBranch(z1, xh1, s1))
    torch.testing.assert_close(same, one)


@pytest.mark.parametrize("extra", [{}, {"nonneg_term": "moment_matching", "td_batchnorm": True}])
def test_maxmin_train_step_reaches_both_branches(extra):
    torch.manual_seed(10)
    cfg = config_from_dict({"model": "drmm2", "maxmin": True, "bias_adder": True, **extra})
    cfg.validate()
    model = T.model_from_config(cfg, (1, 28, 28), 10)
    x, y = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))
    loss, logs, logits = T.train_step(model, cfg, cfg.objective(), x, y, torch.arange(8) < 4)
    assert torch.isfinite(loss) and logs["rc"] > 0 and logs["nn"] > 0
    loss.backward()
    for twin in model.min_convs.values():
        assert twin.bn.weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in model.parameters())


# ---------------------------------------------------------------- AllConv13 tail and config validation


def test_allconv13_tail_kernel():
    code = build_model("allconv13", 3, (32, 32))
    standard = build_model("allconv13", 3, (32, 32), tail_kernel=1)
    assert [s.kernel for s in code.specs[-2:]] == [3, 3]
    assert [(s.kernel, s.pad) for s in standard.specs[-2:]] == [(1, 0), (1, 0)]
    assert standard.map_sizes == code.map_sizes and standard.top_shape == code.top_shape == (128, 1, 1)
    with pytest.raises(ValueError, match="tail_kernel"):
        build_model("conv_small", 1, (28, 28), tail_kernel=1)
    with pytest.raises(ValueError, match="tail_kernel"):
        build_model("allconv13", 3, (32, 32), tail_kernel=5)


@pytest.mark.parametrize(
    "bad,match",
    [
        ({"allconv13_tail_kernel": 1}, "allconv13_tail_kernel"),  # model conv_small
        ({"model": "allconv13", "allconv13_tail_kernel": 2}, "allconv13_tail_kernel"),
        ({"dropout": 1.0}, "dropout"),
        ({"td_dropout": -0.1}, "td_dropout"),
        ({"trainer": "hard_em", "maxmin": True}, "maxmin"),
        ({"trainer": "hard_em", "td_batchnorm": True}, "td_batchnorm"),
        ({"top_model": "factor", "maxmin": True}, "maxmin"),
        ({"trainer": "hard_em", "dropout": 0.5}, "dropout"),
        ({"trainer": "backprop", "td_batchnorm": True}, "td_batchnorm"),
        ({"td_batchnorm": "yes"}, "td_batchnorm"),
    ],
)
def test_nrm_option_values_are_checked(bad, match):
    with pytest.raises(ValueError, match=match):
        config_from_dict(bad).validate()
