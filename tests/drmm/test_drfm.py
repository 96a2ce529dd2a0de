"""DRFM (drmm/drfm.py): factor readout = regularised least squares per class; rendering uses mu_c + Lambda_c z."""

import pytest
import torch

from drmm import train as T
from drmm.config import config_from_dict
from drmm.drfm import DRFM, build_drfm
from drmm.losses import ObjectiveConfig


def _model(d=2):
    torch.manual_seed(0)
    return build_drfm("drmm2", 1, (28, 28), num_classes=4, factor_dim=d, noise_var=0.5).double()


def test_factor_logits_are_the_map_joint_log_posterior_per_class():
    model = _model()
    with torch.no_grad():
        model.factor_loadings.normal_()  # far from the near-zero init, so the factors matter
    logits, latents = model(torch.rand(3, 1, 28, 28, dtype=torch.float64))
    h = latents.features.flatten(1)
    for c in range(4):
        lam, mu = model.factor_loadings[c], model.readout.weight[c]
        # brute force: min over z of |h - mu - lam z|^2 + s2 |z|^2 by a direct solve
        z = torch.linalg.solve(lam.T @ lam + 0.5 * torch.eye(2, dtype=h.dtype), lam.T @ (h - mu).T).T
        err = ((h - mu - z @ lam.T) ** 2).sum(1) + 0.5 * (z**2).sum(1)
        torch.testing.assert_close(logits[:, c], -err / (2 * 0.5) + model.readout.bias[c])
        torch.testing.assert_close(model.infer_factors(h)[:, c], z)


def test_zero_factors_reduce_to_a_nearest_template_readout():
    model = _model(d=0)
    logits, latents = model(torch.rand(3, 1, 28, 28, dtype=torch.float64))
    h = latents.features.flatten(1)
    dist = ((h[:, None] - model.readout.weight[None]) ** 2).sum(-1)
    torch.testing.assert_close(logits, -dist / (2 * 0.5) + model.readout.bias)


def test_render_starts_from_the_class_template_plus_the_inferred_factor():
    model = _model()
    with torch.no_grad():
        model.factor_loadings.normal_()
    logits, latents = model(torch.rand(2, 1, 28, 28, dtype=torch.float64))
    classes = torch.tensor([1, 3])
    _, levels = model.render(latents, classes, return_levels=True)
    z = model.infer_factors(latents.features.flatten(1))[torch.arange(2), classes]
    expected = model.readout.weight[classes] + torch.einsum("ndk,nk->nd", model.factor_loadings[classes], z)
    torch.testing.assert_close(levels[0].flatten(1), expected)


def test_eg_step_trains_the_factor_loadings_and_lowers_the_loss():
    torch.manual_seed(0)
    model = build_drfm("rfm", 1, (28, 28), factor_dim=3)
    cfg = config_from_dict(dict(model="rfm", top_model="factor", progress=False, tensorboard=False))
    objective = ObjectiveConfig(rc_weight=1.0)
    x, y = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))
    labeled = torch.arange(8) < 4
    # the factor logits are an exact Gaussian posterior over D = 16384 features, so their differences scale with D:
    # an Adam step of 1e-3 on every template element moves them by ~10 (docs/drmm.md); 1e-4 is a stable step
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    loss0, _, _ = T.train_step(model, cfg, objective, x, y, labeled)
    opt.zero_grad()
    loss0.backward()
    assert model.factor_loadings.grad is not None and model.factor_loadings.grad.abs().sum() > 0
    opt.step()
    loss1, _, _ = T.train_step(model, cfg, objective, x, y, labeled)
    assert loss1.item() < loss0.item()


def test_config_builds_a_drfm_and_validates():
    cfg = config_from_dict(dict(model="rfm", top_model="factor", factor_dim=4))
    model = T.model_from_config(cfg, (1, 28, 28), 10)
    assert isinstance(model, DRFM) and model.factor_loadings.shape == (10, 64 * 16 * 16, 4)
    assert not isinstance(T.model_from_config(config_from_dict(dict(model="rfm")), (1, 28, 28), 10), DRFM)
    with pytest.raises(ValueError, match="top_model"):
        config_from_dict(dict(top_model="gaussian")).validate()
    with pytest.raises(ValueError, match="noise_var"):
        build_drfm("rfm", 1, (28, 28), noise_var=0.0)
