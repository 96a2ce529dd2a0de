"""Switch priors (drmm/priors.py) and sampling / class appearance models (drmm/sample.py, `drmm sample`)."""

import pytest
import torch

from drmm import train as T
from drmm.config import config_from_dict
from drmm.cli import main
from drmm.priors import prior_buffers, switch_frequencies
from drmm.sample import class_appearance, draw_switches, sample_images
from drmm_cases import DATA_DIR, needs_mnist


def _model(momentum=0.5, name="drmm2"):
    torch.manual_seed(0)
    return T.model_from_config(config_from_dict(dict(model=name, switch_prior_momentum=momentum)), (1, 28, 28), 10)


def test_priors_are_distributions_tracked_in_training_mode_only_and_checkpointed():
    model = _model(momentum=1.0)  # momentum 1: the priors are exactly the last batch's frequencies
    x = torch.rand(6, 1, 28, 28)
    _, latents = model(x)
    for i, (spec, sw) in enumerate(zip(model.specs, latents.switches)):
        pi_t, pi_a = prior_buffers(model, i)
        freq_t, freq_a = switch_frequencies(sw, spec.fused_pool)
        torch.testing.assert_close(pi_t, freq_t)
        torch.testing.assert_close(pi_a, freq_a)
        torch.testing.assert_close(pi_t.sum(-1), torch.ones_like(pi_a))
        assert pi_t.min() >= 0 and pi_a.min() >= 0 and pi_a.max() <= 1
        # offsets are sample frequencies: one-hot means over 6 examples
        assert torch.allclose(pi_t * 6, (pi_t * 6).round(), atol=1e-5)
    before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("switch_prior_")}
    assert len(before) == 2 * len(model.specs)
    model.eval()
    model(torch.rand(6, 1, 28, 28))
    assert all(torch.equal(before[k], model.state_dict()[k]) for k in before)  # eval forwards do not count


def test_ema_mixes_batches():
    model = _model(momentum=0.25)
    x1, x2 = torch.rand(4, 1, 28, 28), torch.rand(4, 1, 28, 28)
    _, l1 = model(x1)
    _, l2 = model(x2)
    f1, _ = switch_frequencies(l1.switches[0], 2)
    f2, _ = switch_frequencies(l2.switches[0], 2)
    expected = 0.75 * (0.75 * 0.25 + 0.25 * f1) + 0.25 * f2
    torch.testing.assert_close(prior_buffers(model, 0)[0], expected)


def test_sampler_shapes_and_draws_follow_the_priors():
    model = _model()
    model(torch.rand(4, 1, 28, 28))
    model.eval()
    images = sample_images(model, torch.tensor([0, 3, 3, 9]), torch.Generator().manual_seed(0))
    assert images.shape == (4, 1, 28, 28) and torch.isfinite(images).all() and images.abs().sum() > 0
    app = class_appearance(model)
    assert app.shape == (10, 1, 28, 28) and torch.isfinite(app).all()
    # the sampled switches follow the priors: set one window's priors and count
    pi_t, pi_a = prior_buffers(model, 1)
    pi_t[0, 0, 0] = torch.tensor([0.1, 0.2, 0.3, 0.4])
    pi_a[0, 0, 0] = 0.8
    sw = draw_switches(model, 4000, torch.Generator().manual_seed(1))[1][:, 0, 0, 0]
    freq_t, freq_a = switch_frequencies(sw.view(-1, 1), 2)
    torch.testing.assert_close(freq_t[0], torch.tensor([0.1, 0.2, 0.3, 0.4]), atol=0.03, rtol=0)
    assert abs(freq_a.item() - 0.8) < 0.03
    mode = draw_switches(model, 2, most_probable=True)[1][:, 0, 0, 0]
    assert mode.tolist() == [0x83, 0x83]  # argmax offset 3, a on


@needs_mnist
def test_cli_sample_and_eval_clustering(tmp_path, capsys):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(
        "dataset: mnist\nmodel: drmm2\nmode: unsupervised\nnum_labeled: 0\nmax_train_samples: 100\neval_samples: 100\n"
        "batch_size: 20\nepochs: 1\nmax_steps: 3\nprogress: false\ntensorboard: false\n"
    )
    run = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--run-dir", str(run), "--data-dir", DATA_DIR]) == 0
    ck = torch.load(run / "last.pt", weights_only=True)
    assert ck["model"]["switch_prior_a_0"].shape == (32, 16, 16)
    assert not torch.all(ck["model"]["switch_prior_a_0"] == 0.5)  # trained, not the initial value
    assert main(["sample", str(run), "--class", "3", "--num", "4", "--data-dir", DATA_DIR]) == 0
    assert (run / "samples_class3.png").stat().st_size > 1000
    assert (run / "class_appearance.png").stat().st_size > 1000
    with pytest.raises(SystemExit, match="--class"):
        main(["sample", str(run), "--class", "10", "--data-dir", DATA_DIR])
    capsys.readouterr()
    assert main(["eval", str(run), "--checkpoint", "last", "--data-dir", DATA_DIR]) == 0
    out = capsys.readouterr().out
    assert "clustering: accuracy" in out and "NMI" in out and "ARI" in out
