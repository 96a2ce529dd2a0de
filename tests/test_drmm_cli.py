"""The `drmm` CLI end to end on a tiny config: train, eval, render, resume; `python -m drmm` works."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from drmm.cli import main

DATA_DIR = os.environ.get("DRMM_DATA_DIR")
REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(not DATA_DIR or not (Path(DATA_DIR) / "mnist").is_dir(),
                                reason="DRMM_DATA_DIR with mnist/ not set")

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


def test_cli_train_eval_render(tmp_path, capsys):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(TINY)
    run = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--run-dir", str(run), "--set", "kl_sign=1",
                 "--data-dir", DATA_DIR]) == 0
    out = capsys.readouterr().out
    assert "final test error" in out
    for name in ("config.yaml", "metrics.csv", "last.pt", "best.pt", "learning_curve.png", "labeled_indices.npy"):
        assert (run / name).exists(), name
    assert "kl_sign: 1" in (run / "config.yaml").read_text()

    assert main(["eval", str(run), "--data-dir", DATA_DIR]) == 0
    out = capsys.readouterr().out
    assert "test error" in out and "10000 test images" in out

    assert main(["render", str(run), "--num", "4", "--data-dir", DATA_DIR]) == 0
    for name in ("reconstructions.png", "rendered_levels.png"):
        assert (run / name).stat().st_size > 1000

    # continue the same run for more steps
    assert main(["train", "--config", str(cfg), "--run-dir", str(run), "--resume", "--set", "kl_sign=1",
                 "--set", "max_steps=8", "--data-dir", DATA_DIR]) == 0
    assert "after 8 steps" in capsys.readouterr().out


def test_cli_errors(tmp_path):
    with pytest.raises(SystemExit, match="not found"):
        main(["eval", str(tmp_path / "nothing")])
    with pytest.raises(SystemExit, match="config file"):
        main(["train", "--config", str(tmp_path / "x.yaml")])
    (tmp_path / "x.yaml").write_text("model: rfm\n")
    with pytest.raises(SystemExit, match="--run-dir"):
        main(["train", "--config", str(tmp_path / "x.yaml"), "--resume"])


def test_python_dash_m_entry_point():
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-m", "drmm", "train", "--help"], capture_output=True, text=True, env=env,
                       cwd=REPO, timeout=120)
    assert r.returncode == 0 and "--resume" in r.stdout and "--set" in r.stdout
