"""The `drmm` CLI end to end on a tiny config: train, eval, render, resume; `python -m drmm` works; the level grid
of `drmm render` shows every column. (Bad input: tests/drmm/test_cli_errors.py.)"""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from drmm.cli import main
from drmm.figures import level_panels, save_level_grid
from drmm.model import build_model
from drmm_cases import DATA_DIR, needs_mnist

REPO = Path(__file__).resolve().parents[2]

TINY = """\
dataset: mnist
model: drmm2
mode: semisupervised
num_labeled: 20
max_train_samples: 200
eval_samples: 100
batch_size: 20
epochs: 1
max_steps: 6
progress: false
"""


@needs_mnist
def test_cli_train_eval_render(tmp_path, capsys):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(TINY)
    run = tmp_path / "run"
    assert (
        main(["train", "--config", str(cfg), "--run-dir", str(run), "--set", "kl_sign=1", "--data-dir", DATA_DIR]) == 0
    )
    out = capsys.readouterr().out
    assert "final test error" in out
    for name in ("config.yaml", "metrics.csv", "last.pt", "best.pt", "learning_curve.png", "labeled_indices.npy"):
        assert (run / name).exists(), name
    assert "kl_sign: 1" in (run / "config.yaml").read_text()

    assert main(["eval", str(run), "--data-dir", DATA_DIR]) == 0
    out = capsys.readouterr().out
    assert "test error" in out and "10000 test images" in out
    assert "scored last.pt (final weights, step 6; the run has no validation split)" in out

    assert main(["render", str(run), "--num", "4", "--data-dir", DATA_DIR]) == 0
    for name in ("reconstructions.png", "rendered_levels.png"):
        assert (run / name).stat().st_size > 1000

    # continue the same run for more steps
    assert (
        main(
            [
                "train",
                "--config",
                str(cfg),
                "--run-dir",
                str(run),
                "--resume",
                "--set",
                "kl_sign=1",
                "--set",
                "max_steps=8",
                "--data-dir",
                DATA_DIR,
            ]
        )
        == 0
    )
    assert "after 8 steps" in capsys.readouterr().out


def test_cli_errors(tmp_path):
    with pytest.raises(SystemExit, match="no such folder"):
        main(["eval", str(tmp_path / "nothing")])
    with pytest.raises(SystemExit, match="config file"):
        main(["train", "--config", str(tmp_path / "x.yaml")])
    (tmp_path / "x.yaml").write_text("model: rfm\n")
    with pytest.raises(SystemExit, match="--run-dir"):
        main(["train", "--config", str(tmp_path / "x.yaml"), "--resume"])


def test_python_dash_m_entry_point():
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run(
        [sys.executable, "-m", "drmm", "train", "--help"],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=120,
    )
    assert r.returncode == 0 and "--resume" in r.stdout and "--set" in r.stdout


@pytest.mark.parametrize("model", ["conv_small", "drmm2"])
def test_level_grid_template_column_is_visible(tmp_path, model):
    """conv_small's template mu_c is (10, 1, 1): drawn as the channel mean of one pixel it was a black square.
    Every panel of the grid, the template column included, must vary."""
    torch.manual_seed(0)
    net = build_model(model, 1, (28, 28), 10).eval()
    with torch.no_grad():
        logits, latents = net(torch.rand(3, 1, 28, 28))
        _, levels = net.render(latents, logits.argmax(1), return_levels=True)
    titles, rows = level_panels(levels)
    assert len(rows) == 3 and titles[0].startswith("template") and titles[-1] == "image"
    for row in rows:
        for title, panel in zip(titles, row):
            assert panel.ndim == 2 and np.nanstd(panel) > 0.05, title
            assert np.nanmin(panel) == 0.0 and np.nanmax(panel) == 1.0
    if model == "conv_small":
        assert titles[0] == "template\n(10 channels)" and rows[0][0].shape == (3, 4)  # 10 values, 4 per row
    assert save_level_grid(levels, tmp_path / "levels.png").stat().st_size > 1000
