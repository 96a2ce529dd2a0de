"""EG trainer: one step lowers the loss, every mode runs, checkpoints are atomic, resume is exact; config loading."""

import csv
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from drmm import train as T
from drmm.config import load_config
from drmm.losses import ObjectiveConfig
from drmm.model import build_model
from drmm.plan import DataPlan, epoch_batches, load_data, steps_in_epoch
from drmm.run_dir import atomic_save, rng_state, set_rng_state

from drmm_cases import needs_mnist, tiny_config


def test_one_eg_step_decreases_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    model = build_model("drmm2", 1, (28, 28))
    cfg = tiny_config(model="drmm2")
    objective = ObjectiveConfig(rc_weight=1.0, kl_weight=0.5, nn_weight=0.5)
    x = torch.rand(16, 1, 28, 28)
    y = torch.randint(0, 10, (16,))
    labeled = torch.arange(16) < 8
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss0, logs0, _ = T.train_step(model, cfg, objective, x, y, labeled)
    optimizer.zero_grad()
    loss0.backward()
    optimizer.step()
    loss1, logs1, _ = T.train_step(model, cfg, objective, x, y, labeled)
    assert loss1.item() < loss0.item() - 1e-4, (logs0, logs1)
    assert logs0["rc"].item() > 0 and logs0["ce"].item() > 0


def test_backprop_trainer_uses_ce_only():
    torch.manual_seed(0)
    model = build_model("rfm", 1, (28, 28))
    cfg = tiny_config(trainer="backprop")
    x, y = torch.rand(6, 1, 28, 28), torch.randint(0, 10, (6,))
    labeled = torch.tensor([True, True, True, False, False, False])
    loss, logs, logits = T.train_step(model, cfg, cfg.objective(), x, y, labeled)
    assert loss.item() == pytest.approx(torch.nn.functional.cross_entropy(logits[:3], y[:3]).item())
    assert set(logs) == {"loss", "ce"}


def test_epoch_batches_semisupervised_are_half_labeled_deterministic_and_disjoint():
    cfg = tiny_config(batch_size=10, seed=5)
    plan = DataPlan(labeled=torch.arange(0, 20), unlabeled=torch.arange(20, 200), all_train=torch.arange(200))
    batches = epoch_batches(cfg, plan, epoch=1)
    assert len(batches) == steps_in_epoch(cfg, plan, 1) == 36
    assert all(len(l) == 5 and len(u) == 5 for l, u in batches)
    assert all((l < 20).all() and (u >= 20).all() for l, u in batches)
    unl = torch.cat([u for _, u in batches])
    assert sorted(unl.tolist()) == list(range(20, 200))  # one pass over the unlabeled pool
    lab = torch.cat([l for l, _ in batches])
    assert torch.bincount(lab, minlength=20)[:20].tolist() == [9] * 20  # labeled set cycled 9 times
    again = epoch_batches(cfg, plan, epoch=1)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(batches, again))
    other = epoch_batches(cfg, plan, epoch=2)
    assert not torch.equal(batches[0][1], other[0][1])


def test_lr_schedule_decays_exponentially_from_init_to_final():
    cfg = tiny_config(lr_init=1e-3, lr_final=1e-5)
    f = T.lr_lambda_for(cfg, total_steps=100)
    assert f(0) == 1.0 and f(100) == pytest.approx(1e-2) and f(50) == pytest.approx(1e-1)
    g = T.lr_lambda_for(cfg, total_steps=100, pretrain_steps=40)  # fine-tuning restarts the decay
    assert g(20) == pytest.approx(1e-1) and g(40) == 1.0 and g(70) == pytest.approx(1e-1)


@needs_mnist
@pytest.mark.parametrize(
    "mode,trainer",
    [("supervised", "eg"), ("unsupervised", "eg"), ("pretrain_finetune", "eg"), ("semisupervised", "backprop")],
)
def test_modes_run(tmp_path, mode, trainer):
    # supervised epochs are one pass over the 20 labels (1 step); unsupervised/semi-supervised over 180-200 images
    cfg = tiny_config(mode=mode, trainer=trainer, pretrain_epochs=1, max_steps=4, epochs=4)
    summary = T.train(cfg, tmp_path / "run")
    assert summary["steps"] == 4 and 0 <= summary["test_error"] <= 100
    rows = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("epoch,step,phase") and len(rows) >= 2


@needs_mnist
def test_checkpoint_resume_is_exact(tmp_path):
    # straight: 24 steps (crosses the epoch boundary at 18); split: 10 steps, stop, resume to 24
    cfg = tiny_config(epochs=2, max_steps=24, ckpt_every_steps=3)
    T.train(cfg, tmp_path / "straight")
    half = tiny_config(epochs=2, max_steps=10, ckpt_every_steps=3)
    T.train(half, tmp_path / "split")
    ck = torch.load(tmp_path / "split" / "last.pt", weights_only=True)
    assert ck["step"] == 10 and ck["step_in_epoch"] == 10 and ck["epoch"] == 0
    with pytest.raises(FileExistsError, match="--resume"):
        T.train(cfg, tmp_path / "split")
    T.train(cfg, tmp_path / "split", resume=True)
    a = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "split" / "last.pt", weights_only=True)
    assert a["step"] == b["step"] == 24 and a["epoch"] == b["epoch"] == 1
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert all(torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"]) for i in sa)
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"] == 24
    # atomic writes leave no temp files behind; the run dir holds what the docs promise
    files = {p.name for p in (tmp_path / "split").iterdir()}
    assert not [f for f in files if ".tmp" in f]
    assert {"last.pt", "best.pt", "config.yaml", "metrics.csv", "labeled_indices.npy", "learning_curve.png"} <= files
    steps = [int(line.split(",")[1]) for line in (tmp_path / "split" / "metrics.csv").read_text().splitlines()[1:]]
    assert steps == sorted(steps) and steps[-1] == 24
    assert np.array_equal(
        np.load(tmp_path / "split" / "labeled_indices.npy"), np.load(tmp_path / "straight" / "labeled_indices.npy")
    )


@needs_mnist
def test_validation_split_selects_best_checkpoint_without_the_test_set(tmp_path, monkeypatch):
    cfg = tiny_config(epochs=1, max_steps=6, eval_every_steps=2, val_samples=40)
    splits = []
    evaluate = T.evaluate

    def spy(model, data, num=0, batch_size=1000, split="test"):
        splits.append(split)
        return evaluate(model, data, num, batch_size, split)

    monkeypatch.setattr(T, "evaluate", spy)
    summary = T.train(cfg, tmp_path / "run")
    assert summary["best_on"] == "validation"
    # the test set is looked at once, after the last step, on the final weights
    assert splits == ["val", "val", "val", "test"]
    rows = list(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))
    val = [float(r["val_error"]) for r in rows]
    assert [r["test_error"] for r in rows] == ["", "", ""]
    assert len(rows) == 3 and all(0 <= v <= 100 for v in val)
    best = torch.load(tmp_path / "run" / "best.pt", weights_only=True)
    k = max(i for i, v in enumerate(val) if v == min(val))  # ties: the later checkpoint wins (<=)
    assert best["best_error"] == min(val) and best["step"] == int(rows[k]["step"])
    last = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    model = T.model_from_config(cfg, (1, 28, 28), 10)
    model.load_state_dict(last["model"])
    assert summary["test_error"] == pytest.approx(evaluate(model, load_data(cfg, torch.device("cpu")), 100), abs=1e-3)
    # the held-out images are neither labeled nor unlabeled training data
    labeled = np.load(tmp_path / "run" / "labeled_indices.npy")
    assert labeled.max() < 200 - 40
    data = load_data(cfg, torch.device("cpu"))
    assert len(data.train_labels) == 160 and len(data.val_labels) == 40
    with pytest.raises(ValueError, match="val_samples"):
        load_data(tiny_config(val_samples=200), torch.device("cpu"))
    # resuming with another split would mix validation- and test-selected checkpoints: refused, naming the key
    with pytest.raises(ValueError, match="val_samples"):
        T.train(tiny_config(epochs=1, max_steps=8, eval_every_steps=2, val_samples=20), tmp_path / "run", resume=True)
    # a saved labeled subset that reaches into images no longer in the training set is refused too
    np.save(tmp_path / "far.npy", np.arange(150, 170))
    from drmm.data import labeled_subset

    with pytest.raises(ValueError, match="outside the 160 training images"):
        labeled_subset(np.zeros(160, dtype=np.int64), 20, 10, 0, tmp_path / "far.npy")


def test_atomic_save_replaces_in_place(tmp_path):
    path = tmp_path / "x.pt"
    atomic_save({"a": 1}, path)
    atomic_save({"a": 2}, path)
    assert torch.load(path)["a"] == 2 and [p.name for p in tmp_path.iterdir()] == ["x.pt"]


def _draws():
    return (
        torch.rand(3).tolist(),
        np.random.rand(3).tolist(),
        np.random.randn(),
        [random.random() for _ in range(3)],
        random.gauss(0, 1),
    )


def test_rng_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    from drmm.run_dir import load_checkpoint

    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    np.random.randn(), random.gauss(0, 1)  # leave cached Gaussians behind: they are part of the state too
    atomic_save({"model": {}, "step": 0, "rng": rng_state()}, tmp_path / "last.pt")
    expected = _draws()
    assert torch.serialization.get_unsafe_globals_in_checkpoint(tmp_path / "last.pt") == []
    set_rng_state(load_checkpoint(tmp_path / "last.pt")["rng"])
    assert _draws() == expected


def test_checkpoint_with_the_old_numpy_rng_tuple_still_loads(tmp_path):
    # before RNG states were stored as tensors, checkpoints held np.random.get_state() and random.getstate()
    from drmm.run_dir import load_checkpoint

    np.random.seed(5)
    random.seed(6)
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    torch.save({"model": {}, "step": 3, "rng": state}, tmp_path / "last.pt")
    expected = _draws()
    ckpt = load_checkpoint(tmp_path / "last.pt")
    assert ckpt["rng"]["numpy"][1].dtype == np.uint32
    set_rng_state(ckpt["rng"])
    assert _draws() == expected


def test_load_config_with_overrides_and_errors(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model: drmm2\nrc_weight: 1\nnum_labeled: 100\n")
    cfg = load_config(str(p), ["kl_sign=1", "lr_init=0.01", "norm=none", "tensorboard=false"])
    assert cfg.name == "c" and cfg.model == "drmm2" and cfg.kl_sign == 1 and cfg.lr_init == 0.01
    assert isinstance(cfg.rc_weight, float) and cfg.norm == "none" and cfg.tensorboard is False
    with pytest.raises(ValueError, match="unknown config key"):
        load_config(str(p), ["learning_rate=0.1"])
    with pytest.raises(ValueError, match="num_labeled"):
        load_config(str(p), ["num_labeled=lots"])
    with pytest.raises(ValueError, match="mode must be one of"):
        load_config(str(p), ["mode=selfsupervised"])
    with pytest.raises(ValueError, match="key=value"):
        load_config(str(p), ["kl_sign"])


def test_shipped_configs_load():
    configs = sorted(Path(__file__).resolve().parents[2].glob("configs/**/*.yaml"))  # configs/archive/ too
    assert any(c.name == "demo.yaml" for c in configs)
    for c in configs:
        load_config(str(c))


@needs_mnist
def test_killed_run_resumes_from_last_checkpoint_to_identical_weights(tmp_path, monkeypatch):
    # The run dies during step 14, between checkpoints (every 4 steps and at each eval, every 5): last.pt holds
    # step 12, and resuming from there to step 16 matches a run that never died.
    cfg = tiny_config(model="drmm2", epochs=1, max_steps=16, ckpt_every_steps=4, eval_every_steps=5)
    T.train(cfg, tmp_path / "straight")
    real_step, calls = T.train_step, {"n": 0}

    def dying_step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 14:
            raise KeyboardInterrupt("simulated kill")
        return real_step(*args, **kwargs)

    monkeypatch.setattr(T, "train_step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        T.train(cfg, tmp_path / "killed")
    assert torch.load(tmp_path / "killed" / "last.pt", weights_only=True)["step"] == 12
    monkeypatch.setattr(T, "train_step", real_step)
    T.train(cfg, tmp_path / "killed", resume=True)
    a = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "killed" / "last.pt", weights_only=True)
    assert a["step"] == b["step"] == 16
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    steps = [int(r.split(",")[1]) for r in (tmp_path / "killed" / "metrics.csv").read_text().splitlines()[1:]]
    assert steps == [5, 10, 15, 16]
