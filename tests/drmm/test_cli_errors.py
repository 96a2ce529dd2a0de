"""The `drmm` CLI on bad input: one line `drmm <command>: error: ...` on stderr, exit status 2, no traceback
(``--debug`` re-raises). Everything here runs on tiny fake files and untrained models: no data set, no training."""

import dataclasses
import gzip
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import drmm.cli as cli
from drmm import data as D
from drmm.cli import main
from drmm.config import TrainConfig
from drmm.run_dir import CheckpointError
from drmm.train import model_from_config

REPO = Path(__file__).resolve().parents[2]
STEMS = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def fails(argv, capsys, command="train"):
    """Run the CLI in-process; it must exit 2 with one error line and no traceback. Returns that line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"drmm {command}: error: "), lines[0]
    return lines[0]


# ---------------------------------------------------------------- data files


def idx_bytes(arr: np.ndarray, magic=(0, 0, 8)) -> bytes:
    return bytes([*magic, arr.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in arr.shape) + arr.tobytes()


def write_gz(path: Path, payload: bytes) -> None:
    with gzip.open(path, "wb") as f:
        f.write(payload)


def fake_mnist(root: Path, first: bytes) -> Path:
    """A data root whose mnist/ has the four files; train-images (read first) holds ``first`` as written."""
    folder = root / "mnist"
    folder.mkdir(parents=True)
    (folder / f"{STEMS[0]}.gz").write_bytes(first)
    for stem in STEMS[1:]:
        write_gz(folder / f"{stem}.gz", idx_bytes(np.zeros(3, np.uint8)))
    return root


@pytest.fixture
def config(tmp_path):
    p = tmp_path / "tiny.yaml"
    p.write_text(
        "dataset: mnist\nmodel: drmm2\nmax_train_samples: 40\nnum_labeled: 20\nbatch_size: 20\n"
        "epochs: 1\nmax_steps: 1\nprogress: false\ntensorboard: false\ndownload: false\n"
    )
    return p


def good_images_gz(n=3) -> bytes:
    """A well-formed IDX image file of ``n`` random images (random: incompressible, so a cut truncates data)."""
    import io

    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb") as f:
        f.write(idx_bytes(np.random.RandomState(0).randint(0, 256, (n, 28, 28)).astype(np.uint8)))
    return buf.getvalue()


@pytest.mark.parametrize(
    "case, first, words",
    [
        ("truncated gzip", good_images_gz()[:1000], ["truncated or corrupt gzip", "end-of-stream"]),
        ("not gzip", b"this is not a gzip file at all", ["truncated or corrupt gzip"]),
        ("bad magic", None, ["bad magic 12345678"]),
        ("size", None, ["does not match its header"]),
        ("count", good_images_gz(), ["holds 3 items, expected 60000"]),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_corrupt_idx_file_names_it_and_says_redownload(tmp_path, capsys, config, case, first, words):
    if case == "bad magic":
        gz = tmp_path / "x.gz"
        write_gz(gz, b"\x12\x34\x56\x78" + bytes(16))
        first = gz.read_bytes()
    if case == "size":  # the header says 3 images, 2 are there
        gz = tmp_path / "x.gz"
        write_gz(gz, idx_bytes(np.zeros((3, 28, 28), np.uint8))[:-784])
        first = gz.read_bytes()
    root = fake_mnist(tmp_path / "data", first)
    line = fails(
        ["train", "--config", str(config), "--run-dir", str(tmp_path / "run"), "--data-dir", str(root)], capsys
    )
    assert f"{STEMS[0]}.gz" in line and "download it again" in line and "md5 f68b3c2d" in line
    for w in words:
        assert w in line
    assert not (tmp_path / "run").exists()  # a bad data set leaves no run folder behind


def test_missing_data_without_download_names_files_folder_and_both_ways(tmp_path, capsys, config):
    (tmp_path / "empty").mkdir()
    line = fails(
        ["train", "--config", str(config), "--run-dir", str(tmp_path / "run"), "--data-dir", str(tmp_path / "empty")],
        capsys,
    )
    assert "download is off" in line and str(tmp_path / "empty") in line
    for stem in STEMS:
        assert stem in line
    assert "--data-dir" in line and "DRMM_DATA_DIR" in line and "download: true" in line


def test_download_that_cannot_connect_fails_fast(tmp_path, capsys, config, monkeypatch):
    import socket
    import time

    server = socket.socket()  # listens, never answers: the read must time out
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    try:
        monkeypatch.setitem(
            D._DOWNLOADS, "mnist", (f"http://127.0.0.1:{server.getsockname()[1]}/", D._DOWNLOADS["mnist"][1])
        )
        monkeypatch.setattr(D, "DOWNLOAD_TIMEOUT_S", 0.5)
        t0 = time.perf_counter()
        line = fails(
            [
                "train",
                "--config",
                str(config),
                "--set",
                "download=true",
                "--run-dir",
                str(tmp_path / "run"),
                "--data-dir",
                str(tmp_path / "empty"),
            ],
            capsys,
        )
        assert time.perf_counter() - t0 < 10
    finally:
        server.close()
    assert "download failed" in line and "timed out" in line
    assert "train-images-idx3-ubyte" in line and "--data-dir" in line and "DRMM_DATA_DIR" in line


# ---------------------------------------------------------------- run folders and checkpoints


TINY_CFG = TrainConfig(dataset="mnist", model="drmm2", max_train_samples=40, progress=False, tensorboard=False)


def make_run(folder: Path, val_samples=0, checkpoints=("last", "best"), model="drmm2") -> Path:
    """A run folder as `drmm train` leaves it (config.yaml, last.pt, best.pt) with an untrained model."""
    folder.mkdir(parents=True)
    cfg = dataclasses.replace(TINY_CFG, val_samples=val_samples)
    with open(folder / "config.yaml", "w") as f:
        yaml.safe_dump(dataclasses.asdict(cfg), f, sort_keys=False)
    net = model_from_config(dataclasses.replace(cfg, model=model), (1, 28, 28), 10)
    for name, step in (("last", 7), ("best", 5)):
        if name in checkpoints:
            torch.save({"model": net.state_dict(), "step": step}, folder / f"{name}.pt")
    return folder


@pytest.fixture
def tiny_data(monkeypatch):
    """load_data of the CLI returns 20 random MNIST-shaped images; scoring is stubbed (the choice is tested)."""
    g = torch.Generator().manual_seed(0)
    imgs = torch.randint(0, 256, (20, 1, 28, 28), generator=g, dtype=torch.uint8)
    labels = torch.arange(20) % 10
    monkeypatch.setattr(cli, "load_data", lambda cfg, dev: D.ImageData("mnist", imgs, labels, imgs, labels))
    monkeypatch.setattr(cli, "evaluate", lambda *a, **k: 12.5)


def test_truncated_checkpoint(tmp_path, capsys):
    run = make_run(tmp_path / "run")
    data = (run / "last.pt").read_bytes()
    (run / "last.pt").write_bytes(data[: len(data) // 3])
    line = fails(["eval", str(run), "--checkpoint", "last"], capsys, "eval")
    assert str(run / "last.pt") in line and "truncated or corrupt" in line and "--checkpoint" in line


def test_foreign_checkpoint(tmp_path, capsys):
    run = make_run(tmp_path / "run", checkpoints=())
    torch.save({"state_dict": {}, "epoch": 3}, run / "last.pt")  # some other program's checkpoint
    line = fails(["eval", str(run)], capsys, "eval")
    assert str(run / "last.pt") in line and "not a drmm checkpoint" in line and "'epoch'" in line


class _RunsCode:
    """Unpickling this writes a marker file: what a malicious checkpoint could do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


def test_checkpoint_that_would_run_code_is_refused(tmp_path, capsys):
    run = make_run(tmp_path / "run", checkpoints=())
    marker = tmp_path / "code-ran"
    torch.save(
        {"model": model_from_config(TINY_CFG, (1, 28, 28), 10).state_dict(), "step": 7, "extra": _RunsCode(marker)},
        run / "last.pt",
    )
    for argv, command in (
        (["eval", str(run)], "eval"),
        (["render", str(run)], "render"),
        (["sample", str(run)], "sample"),
    ):
        line = fails(argv, capsys, command)
        assert str(run / "last.pt") in line and "refused" in line and "exec" in line, line
    from drmm.paper import resume_point

    with pytest.raises(CheckpointError, match="could run arbitrary code"):
        resume_point(run)
    assert not marker.exists()
    torch.load(run / "last.pt", weights_only=False)  # the file really does run code when fully unpickled
    assert marker.exists()


def test_checkpoint_of_another_model(tmp_path, capsys, tiny_data):
    run = make_run(tmp_path / "run", model="rfm")
    line = fails(["render", str(run)], capsys, "render")
    assert "last.pt" in line and "do not fit the model" in line and "drmm2" in line


def test_run_without_checkpoints_and_folders_that_are_not_runs(tmp_path, capsys):
    run = make_run(tmp_path / "run", checkpoints=())
    line = fails(["eval", str(run)], capsys, "eval")
    assert str(run / "last.pt") in line and "no checkpoint yet" in line
    make_run(tmp_path / "half", checkpoints=("last",))
    line = fails(["eval", str(tmp_path / "half"), "--checkpoint", "best"], capsys, "eval")
    assert "best.pt not found" in line and "--checkpoint last" in line
    line = fails(["render", str(tmp_path)], capsys, "render")
    assert "not a drmm run directory (no config.yaml)" in line
    line = fails(["sample", str(tmp_path / "nowhere")], capsys, "sample")
    assert "no such folder" in line


# ---------------------------------------------------------------- config keys and values


@pytest.mark.parametrize("where", ["yaml", "set"])
def test_unknown_config_key_suggests_the_close_one(tmp_path, capsys, config, where):
    if where == "yaml":
        config.write_text(config.read_text() + "lr_intt: 0.01\n")
        argv = ["train", "--config", str(config)]
    else:
        argv = ["train", "--config", str(config), "--set", "lr_intt=0.01"]
    line = fails(argv, capsys)
    assert "unknown config key 'lr_intt' (did you mean 'lr_init'?)" in line
    assert (str(config) if where == "yaml" else "--set lr_intt=0.01") in line
    assert "num_labeled" not in line  # no list of every key


@pytest.mark.parametrize(
    "override, words",
    [
        ("epochs=ten", ["--set epochs=ten", "'epochs' must be an integer"]),
        ("tensorboard=maybe", ["'tensorboard' must be true or false"]),
        ("lr_init=fast", ["'lr_init' must be a number"]),
        ("epochs=0", ["epochs must be >= 1"]),
        ("dropout=1.5", ["dropout must be a probability"]),
        ("val_samples=-3", ["val_samples must be >= 0"]),
        ("mode=semisupervise", ["mode must be one of", "(did you mean 'semisupervised'?)"]),
        ("model=conv_smal", ["model must be one of", "(did you mean 'conv_small'?)"]),
        ("dataset=fashion", ["dataset must be one of", "fashion_mnist"]),
        ("norm=layer", ["norm must be one of"]),
        ("td_nonneg=never", ["td_nonneg must be one of"]),
        ("epochs", ["--set expects key=value"]),
    ],
)
def test_invalid_values(tmp_path, capsys, config, override, words):
    line = fails(["train", "--config", str(config), "--set", override], capsys)
    for w in words:
        assert w in line, line


def test_malformed_yaml_and_missing_config(tmp_path, capsys, config):
    config.write_text("model: [drmm2\n")
    line = fails(["train", "--config", str(config)], capsys)
    assert str(config) in line and "not valid YAML at line 2" in line
    line = fails(["train", "--config", str(tmp_path / "nope.yaml")], capsys)
    assert "nope.yaml not found" in line


def test_bad_arguments_are_one_line_too(tmp_path, capsys):
    line = fails(["eval", str(tmp_path), "--checkpoint", "middle"], capsys, "eval")
    assert "invalid choice: 'middle'" in line and "drmm eval --help" in line
    run = make_run(tmp_path / "run")
    if not torch.cuda.is_available():
        line = fails(["eval", str(run), "--device", "cuda"], capsys, "eval")
        assert "sees no CUDA GPU" in line and "--device cpu" in line
    line = fails(["eval", str(run), "--device", "gpu0"], capsys, "eval")
    assert "'gpu0' is not a torch device" in line


def test_debug_reraises(tmp_path):
    run = make_run(tmp_path / "run", checkpoints=())
    torch.save(torch.zeros(2), run / "last.pt")
    with pytest.raises(CheckpointError, match="not a drmm checkpoint"):
        main(["--debug", "eval", str(run)])
    with pytest.raises(CheckpointError):
        main(["eval", str(run), "--debug"])


def test_subprocess_exit_status_and_stderr(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "drmm", "eval", str(tmp_path / "nowhere")]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip().splitlines() == [
        f"drmm eval: error: {tmp_path / 'nowhere'}: no such folder; pass a run "
        f"directory made by `drmm train` (runs/<name>-<time>)"
    ]
    r = subprocess.run(cmd[:3] + ["--debug"] + cmd[3:], capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert r.returncode == 1 and "Traceback" in r.stderr and "RunDirError" in r.stderr


# ---------------------------------------------------------------- which checkpoint eval scores


@pytest.mark.parametrize(
    "val_samples, asked, scored, how",
    [
        (0, None, "last", "final weights, step 7; the run has no validation split"),
        (10, None, "best", "lowest validation error, step 5"),
        (
            0,
            "best",
            "best",
            "lowest test error, step 5: the run has no validation split, so best.pt was chosen on the test set",
        ),
        (10, "last", "last", "final weights, step 7)"),
    ],
)
def test_eval_says_which_checkpoint_and_why(tmp_path, capsys, tiny_data, val_samples, asked, scored, how):
    run = make_run(tmp_path / "run", val_samples=val_samples)
    argv = ["eval", str(run)] + (["--checkpoint", asked] if asked else [])
    assert main(argv) == 0
    out = capsys.readouterr().out
    first = out.splitlines()[0]
    assert first.startswith(f"[drmm] scored {scored}.pt (") and how in first, first
    assert f"({scored}.pt, step {7 if scored == 'last' else 5}): test error 12.50 %" in out
