"""Hard EM (drmm/hard_em.py): the closed-form M-step solves the ridge least-squares problem it claims to solve."""

import copy

import pytest
import torch

import drmm_kernels as dk
from drmm import hard_em as H
from drmm import train as T
from drmm.config import config_from_dict
from drmm.drfm import DRFM
from drmm.model import DRMM, LayerSpec, build_model
from drmm_cases import DATA_DIR, needs_mnist


def tiny_model(leaky=False, cls=DRMM, **kwargs):
    act = "leaky" if leaky else "relu"
    layers = [
        LayerSpec(2, 3, "full", "max", activation=act),
        LayerSpec(3, 3, "same", "none", activation=act),
        LayerSpec(3, 3, "valid", "mean", activation=act),
    ]
    torch.manual_seed(0)
    return cls(layers, 2, (10, 10), num_classes=3, **kwargs).double()


def e_step_snapshot(model, x, y, labeled):
    """What the M-step regresses, recomputed independently of HardEM: signals from above, switches, inputs."""
    logits, latents, inputs = H.layer_inputs_bottom_up(model, x)
    classes = torch.where(labeled, y, logits.argmax(1))
    _, levels = model.render(latents, classes, return_levels=True)
    L = len(model.specs)
    return [(levels[L - 1 - i], latents.switches[i], inputs[i]) for i in range(L)], latents.features, classes


def total_objective(model, i, snaps, weight, lam):
    """Squared error summed over all batches, plus the ridge once."""
    sq = sum(H.layer_objective(model, i, s[i][0], s[i][1], s[i][2], weight, 0.0) for s in snaps)
    return sq + lam * weight.pow(2).sum()


@pytest.mark.parametrize("leaky", [False, True])
def test_design_matrix_reproduces_the_render_op(leaky):
    model = tiny_model(leaky)
    x = torch.rand(3, 2, 10, 10, dtype=torch.float64)
    snaps, _, _ = e_step_snapshot(model, x, torch.tensor([0, 1, 2]), torch.ones(3, dtype=torch.bool))
    for i, (mu, sw, x_in) in enumerate(snaps):
        w = model.conv_weight(model.convs[i])
        a = H.design_rows(model, i, H.masked_unpooled(model, i, mu, sw))
        rendered = (a @ H.weight_to_flat(w)).view(x_in.shape[0], *x_in.shape[2:], -1).permute(0, 3, 1, 2)
        spec = model.specs[i]
        mu_in = model.mean_unpool(mu, model.map_sizes[i]) if spec.pool == "mean" else mu
        ref = dk.render(
            mu_in,
            sw,
            w,
            padding=spec.pad,
            pool=spec.fused_pool,
            out_size=tuple(x_in.shape[-2:]),
            negative_slope=spec.negative_slope,
        )
        torch.testing.assert_close(rendered, ref)
        assert torch.equal(H.flat_to_weight(H.weight_to_flat(w), w.shape[0], w.shape[-1]), w)


def _conjugate_gradient(f, w0, iters):
    """Minimise the quadratic ``f`` from w0 by CG with autograd Hessian-vector products (exact in <= dim steps)."""
    w = w0.clone().requires_grad_(True)
    g = torch.autograd.grad(f(w), w)[0]
    r, d = -g, -g

    def hvp(v):
        w_ = w.detach().requires_grad_(True)
        gw = torch.autograd.grad(f(w_), w_, create_graph=True)[0]
        return torch.autograd.grad((gw * v).sum(), w_)[0]

    x = w.detach().clone()
    for _ in range(iters):
        hd = hvp(d)
        alpha = (r * r).sum() / (d * hd).sum()
        x = x + alpha * d
        r_new = r - alpha * hd
        if r_new.norm() < 1e-12 * g.norm():
            break
        d = r_new + ((r_new * r_new).sum() / (r * r).sum()) * d
        r = r_new
    return x


def test_m_step_decreases_the_objective_and_matches_its_minimiser():
    model = tiny_model()
    em = H.HardEM(model, H.HardEMConfig(ridge=1e-3, window=2))
    g = torch.Generator().manual_seed(1)
    batches = [
        (torch.rand(4, 2, 10, 10, generator=g, dtype=torch.float64), torch.randint(0, 3, (4,), generator=g))
        for _ in range(2)
    ]
    labeled = torch.tensor([True, True, False, False])
    snaps = []
    for x, y in batches:  # the E-step is fixed: snapshot it with the parameters the M-step starts from
        snaps.append(e_step_snapshot(model, x, y, labeled)[0])
        em.accumulate(x, y, labeled)
    old = [model.conv_weight(layer).detach().clone() for layer in model.convs]
    info = em.m_step()
    assert em.stats == {} and em.batches == 0
    for i, layer in enumerate(model.convs):
        new, lam = model.conv_weight(layer).detach(), info[f"lam_{i}"]
        assert lam > 0 and not torch.allclose(new, old[i])
        f_old, f_new = total_objective(model, i, snaps, old[i], lam), total_objective(model, i, snaps, new, lam)
        assert f_new <= f_old + 1e-9, (i, f_old, f_new)
        assert f_new < 0.999 * f_old  # and it is a real improvement over the random init
        minimiser = _conjugate_gradient(lambda w: total_objective(model, i, snaps, w, lam), old[i], old[i].numel())
        torch.testing.assert_close(new, minimiser, rtol=1e-6, atol=1e-8)


def test_m_step_is_first_order_optimal_for_the_rfm_preset_and_matches_lstsq():
    torch.manual_seed(0)
    model = build_model("rfm", 1, (28, 28)).double()
    em = H.HardEM(model, H.HardEMConfig(ridge=1e-4, window=1))
    x, y = torch.rand(2, 1, 28, 28, dtype=torch.float64), torch.tensor([1, 4])
    labeled = torch.ones(2, dtype=torch.bool)
    snaps = [e_step_snapshot(model, x, y, labeled)[0]]
    em.accumulate(x, y, labeled)
    gram, rhs = em.stats["gram_0"].clone(), em.stats["rhs_0"].clone()
    lam = em.m_step()["lam_0"]
    w = model.conv_weight(model.convs[0]).detach().clone().requires_grad_(True)
    grad = torch.autograd.grad(total_objective(model, 0, snaps, w, lam), w)[0]
    w0 = w.detach().clone().normal_()
    grad_scale = torch.autograd.grad(total_objective(model, 0, snaps, w0.requires_grad_(True), lam), w0)[0]
    assert grad.norm() < 1e-8 * grad_scale.norm()
    # same answer from lstsq on the ridge-augmented normal system
    system = gram + lam * torch.eye(len(gram), dtype=gram.dtype)
    via_lstsq = torch.linalg.lstsq(system, rhs).solution
    torch.testing.assert_close(H.weight_to_flat(w.detach()), via_lstsq, rtol=1e-6, atol=1e-9)


def test_templates_are_ridge_class_means_and_readout_is_the_max_sum_rule():
    model = tiny_model()
    em = H.HardEM(model, H.HardEMConfig(ridge=0.01, window=1))
    x, y = torch.rand(6, 2, 10, 10, dtype=torch.float64), torch.tensor([0, 0, 1, 1, 1, 2])
    labeled = torch.ones(6, dtype=torch.bool)
    em.accumulate(x, y, labeled)
    em.m_step()
    # the top is fit after the layers, on the features of the new conv weights (same batch, so same BN stats)
    h = H.layer_inputs_bottom_up(model, x)[1].features.flatten(1).detach()
    for c in range(3):
        torch.testing.assert_close(model.readout.weight[c].detach(), h[y == c].mean(0) / 1.01)
    mu = model.readout.weight.detach()
    # readout = the max-sum rule -|h - mu_c|^2 / 2 + s2 ln pi_c (up to a per-example constant), with s2 the mean
    # squared top residual per feature and pi_c the add-one-smoothed class frequencies
    s2 = ((h - mu[y]) ** 2).sum() / h.numel()
    log_prior = torch.log(torch.tensor([3.0, 4.0, 2.0], dtype=h.dtype) / 9)
    torch.testing.assert_close(model.readout.bias.detach(), -0.5 * (mu**2).sum(1) + s2 * log_prior)


def test_drfm_top_regression_matches_lstsq_per_class():
    model = tiny_model(cls=DRFM, factor_dim=2)  # [1, z] has 3 columns: 4 examples per class overdetermine it
    em = H.HardEM(model, H.HardEMConfig(ridge=1e-3, window=1))
    x, y = torch.rand(12, 2, 10, 10, dtype=torch.float64), torch.arange(3).repeat_interleave(4)
    labeled = torch.ones(12, dtype=torch.bool)
    em.accumulate(x, y, labeled)
    old_model = copy.deepcopy(model)  # the factors are inferred with the old top, the features of the new layers
    em.m_step()
    h = H.layer_inputs_bottom_up(model, x)[1].features.flatten(1).detach()
    z = old_model.infer_factors(h)[torch.arange(12), y].detach()
    for c in range(3):
        design = torch.cat([torch.ones(int((y == c).sum()), 1, dtype=h.dtype), z[y == c]], 1)
        lam = 1e-3 * (design**2).sum(0).mean()  # the relative ridge: ridge * mean diag of design^T design
        augmented = torch.cat([design, lam.sqrt() * torch.eye(3, dtype=h.dtype)])
        target = torch.cat([h[y == c].detach(), torch.zeros(3, h.shape[1], dtype=h.dtype)])
        coef = torch.linalg.lstsq(augmented, target).solution
        torch.testing.assert_close(model.readout.weight[c].detach(), coef[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(model.factor_loadings[c].detach(), coef[1:].t(), rtol=1e-4, atol=1e-5)


def test_hard_em_config_errors():
    model = tiny_model()
    with pytest.raises(ValueError, match="ridge"):
        H.HardEM(model, H.HardEMConfig(ridge=0))
    with pytest.raises(ValueError, match="window"):
        H.HardEM(model, H.HardEMConfig(window=0))
    with pytest.raises(RuntimeError, match="no statistics"):
        H.HardEM(model).m_step()


@needs_mnist
@pytest.mark.parametrize("model_name,top", [("drmm2", "factor")])  # rfm: the M-step tests above (time budget)
def test_hard_em_trainer_learns_and_resumes(tmp_path, model_name, top):
    base = dict(
        name="tiny",
        dataset="mnist",
        data_dir=DATA_DIR,
        download=False,
        model=model_name,
        top_model=top,
        num_labeled=0,
        mode="supervised",
        max_train_samples=240,
        eval_samples=200,
        batch_size=40,
        epochs=1,
        trainer="hard_em",
        em_window=2,
        em_row_fraction=0.25,
        progress=False,
        tensorboard=False,
    )
    summary = T.train(config_from_dict(base), tmp_path / "run")
    assert summary["steps"] == 6
    assert summary["test_error"] < 50, summary  # chance is 90 %; 3 M-steps on 240 images
    # resume from a checkpoint taken mid-window carries the half-accumulated statistics
    half = T.train(config_from_dict({**base, "max_steps": 3, "ckpt_every_steps": 3}), tmp_path / "split")
    ck = torch.load(tmp_path / "split" / "last.pt", weights_only=True)
    assert half["steps"] == 3 and ck["hard_em"]["batches"] == 1
    T.train(config_from_dict(base), tmp_path / "split", resume=True)
    a = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "split" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
