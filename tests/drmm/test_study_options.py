"""Training options outside the paper (kl_marginal_weight, labeled_per_batch, the ramp-ups, adam_beta2): their
values, the batch composition, the KL-marginal term on a hand example, validation, defaults that change nothing,
exact resume."""

import dataclasses
import math

import pytest
import torch

from drmm import train as T
from drmm.config import TrainConfig, load_config
from drmm.errors import UsageError
from drmm.losses import ObjectiveConfig, drmm_objective, kl_marginal
from drmm.plan import DataPlan, epoch_batches, steps_in_epoch

from drmm_cases import needs_mnist, tiny_config


# ---------------------------------------------------------------- ramp-ups


def test_rampup_goes_from_exp_minus_5_to_1_and_stays():
    assert T.rampup(0, 100) == pytest.approx(math.exp(-5.0))
    assert T.rampup(50, 100) == pytest.approx(math.exp(-1.25))
    assert T.rampup(90, 100) == pytest.approx(math.exp(-0.05))
    values = [T.rampup(s, 100) for s in range(101)]
    assert all(a < b for a, b in zip(values, values[1:]))  # strictly increasing up to N
    assert T.rampup(100, 100) == T.rampup(101, 100) == T.rampup(10**6, 100) == 1.0
    assert T.rampup(0, 0) == T.rampup(7, 0) == 1.0  # 0 = no ramp-up


def test_ramped_objective_scales_each_weight_by_its_own_rampup():
    cfg = tiny_config(
        kl_rampup_steps=10,
        rc_rampup_steps=20,
        nn_rampup_steps=0,
        kl_marginal_weight=0.4,
        rc_weight=0.7,
        kl_weight=0.3,
        nn_weight=0.6,
    )
    base = cfg.objective()
    e5 = math.exp(-5.0)
    for step, (kl, rc) in {
        0: (e5, e5),
        5: (math.exp(-1.25), math.exp(-5 * 0.75**2)),
        10: (1.0, math.exp(-1.25)),
        25: (1.0, 1.0),
    }.items():
        o = T.ramped_objective(cfg, base, step)
        assert o.kl_weight == pytest.approx(0.3 * kl) and o.kl_marginal_weight == pytest.approx(0.4 * kl)
        assert o.rc_weight == pytest.approx(0.7 * rc) and o.nn_weight == 0.6
        assert o.ce_weight == base.ce_weight and o.kl_sign == base.kl_sign and o.td_nonneg == base.td_nonneg
    assert base.kl_weight == 0.3 and base.rc_weight == 0.7  # the configured objective is left alone
    only_nn = tiny_config(nn_rampup_steps=4)
    o = T.ramped_objective(only_nn, only_nn.objective(), 2)
    assert o.nn_weight == pytest.approx(0.5 * math.exp(-1.25)) and (o.kl_weight, o.rc_weight) == (0.5, 0.5)


# ---------------------------------------------------------------- batch composition


def test_labeled_per_batch_sets_the_split_of_each_batch_and_the_epoch_length():
    plan = DataPlan(labeled=torch.arange(0, 20), unlabeled=torch.arange(20, 200), all_train=torch.arange(200))
    cfg = tiny_config(batch_size=10, labeled_per_batch=2, seed=5)
    batches = epoch_batches(cfg, plan, epoch=1)
    assert len(batches) == steps_in_epoch(cfg, plan, 1) == 180 // 8 == 22
    assert all(len(l) == 2 and len(u) == 8 for l, u in batches)
    assert all((l < 20).all() and (u >= 20).all() for l, u in batches)
    unl = torch.cat([u for _, u in batches]).tolist()
    assert len(set(unl)) == 176  # no unlabeled image twice in an epoch
    counts = torch.bincount(torch.cat([l for l, _ in batches]), minlength=20)[:20]
    assert counts.sum() == 44 and set(counts.tolist()) <= {2, 3}  # 44 draws from 3 permutations of 20
    many = tiny_config(batch_size=10, labeled_per_batch=9, seed=5)  # 1 unlabeled per batch: 180 steps
    assert steps_in_epoch(many, plan, 1) == 180
    assert all(len(l) == 9 and len(u) == 1 for l, u in epoch_batches(many, plan, 1))


def test_labeled_per_batch_0_is_half_the_batch_bitwise():
    plan = DataPlan(labeled=torch.arange(0, 20), unlabeled=torch.arange(20, 200), all_train=torch.arange(200))
    default, half = tiny_config(batch_size=10, seed=3), tiny_config(batch_size=10, labeled_per_batch=5, seed=3)
    assert steps_in_epoch(default, plan, 0) == steps_in_epoch(half, plan, 0) == 36
    a, b = epoch_batches(default, plan, 0), epoch_batches(half, plan, 0)
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b))
    odd = tiny_config(batch_size=11)  # odd batch: 5 labeled + 6 unlabeled
    assert [(len(l), len(u)) for l, u in epoch_batches(odd, plan, 0)][:2] == [(5, 6), (5, 6)]


# ---------------------------------------------------------------- the KL-marginal term


def test_kl_marginal_is_kl_of_the_mean_posterior_to_uniform_by_hand():
    # q (rows): labeled [0.1, 0.9] (ignored by the default unsup_terms_on), unlabeled [0.8, 0.2] and [0.6, 0.4]
    q = torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.6, 0.4]], dtype=torch.float64)
    logits, labels = q.log(), torch.tensor([1, 0, 0])
    labeled = torch.tensor([True, False, False])
    x = torch.zeros(3, 1, 2, 2, dtype=torch.float64)
    hand = 0.7 * math.log(2 * 0.7) + 0.3 * math.log(2 * 0.3)  # KL([0.7, 0.3] || [0.5, 0.5])
    off = ObjectiveConfig(ce_weight=1.0, rc_weight=0.0, kl_weight=0.5, nn_weight=0.0)
    on = dataclasses.replace(off, kl_marginal_weight=2.0)
    total_off, logs_off = drmm_objective(off, logits, labels, labeled, x, None, None)
    total_on, logs_on = drmm_objective(on, logits, labels, labeled, x, None, None)
    assert "klm" not in logs_off
    assert logs_on["klm"].item() == pytest.approx(hand, rel=1e-6)
    assert (total_on - total_off).item() == pytest.approx(2.0 * hand, rel=1e-6)
    assert logs_on["kl"].item() == logs_off["kl"].item()
    # the weight alone turns it on (no per-example KL needed); both_sum averages over the whole batch
    alone = ObjectiveConfig(kl_weight=0.0, rc_weight=0.0, nn_weight=0.0, kl_marginal_weight=1.0)
    assert drmm_objective(alone, logits, labels, labeled, x, None, None)[1]["klm"].item() == pytest.approx(hand)
    both = dataclasses.replace(alone, unsup_terms_on="both_sum")
    m = (0.5 * q[0] + 0.25 * q[1] + 0.25 * q[2]).tolist()  # mean(labeled) + mean(unlabeled), halved
    assert drmm_objective(both, logits, labels, labeled, x, None, None)[1]["klm"].item() == pytest.approx(
        sum(p * math.log(2 * p) for p in m), rel=1e-6
    )
    uniform = kl_marginal(torch.tensor([[0.9, 0.1], [0.1, 0.9]]), torch.tensor([0.5, 0.5]))
    assert uniform.item() == pytest.approx(0.0, abs=1e-6)  # balanced batch: no pull


# ---------------------------------------------------------------- validation and defaults


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("labeled_per_batch", -1, "labeled_per_batch must be >= 0"),
        ("labeled_per_batch", 20, "labeled_per_batch must be < batch_size (20)"),
        ("labeled_per_batch", 25, "labeled_per_batch must be < batch_size (20)"),
        ("kl_rampup_steps", -1, "kl_rampup_steps must be >= 0"),
        ("rc_rampup_steps", -5, "rc_rampup_steps must be >= 0"),
        ("nn_rampup_steps", -1, "nn_rampup_steps must be >= 0"),
        ("kl_marginal_weight", -0.1, "kl_marginal_weight must be >= 0"),
        ("kl_marginal_weight", float("nan"), "kl_marginal_weight must be >= 0"),
        ("adam_beta2", 1.0, "adam_beta2 must be in [0, 1)"),
        ("adam_beta2", -0.1, "adam_beta2 must be in [0, 1)"),
        ("adam_beta2", float("nan"), "adam_beta2 must be in [0, 1)"),
    ],
)
def test_bad_values_are_refused_in_one_line(key, value, message):
    with pytest.raises(UsageError) as e:
        tiny_config(**{key: value}).validate()
    assert message in str(e.value) and "\n" not in str(e.value)


def test_set_overrides_reach_the_options_and_labeled_per_batch_is_free_outside_semisupervised():
    cfg = load_config(None, ["labeled_per_batch=30", "kl_rampup_steps=500", "kl_marginal_weight=0.1"])
    assert (cfg.labeled_per_batch, cfg.kl_rampup_steps, cfg.kl_marginal_weight) == (30, 500, 0.1)
    with pytest.raises(UsageError, match="labeled_per_batch must be < batch_size"):
        load_config(None, ["labeled_per_batch=200"])
    tiny_config(mode="supervised", labeled_per_batch=50).validate()  # ignored there, as batch_size's halving is


def test_defaults_are_the_paper_code_behaviour():
    cfg, objective = TrainConfig(), ObjectiveConfig()
    assert (
        cfg.kl_marginal_weight,
        cfg.labeled_per_batch,
        cfg.kl_rampup_steps,
        cfg.rc_rampup_steps,
        cfg.nn_rampup_steps,
        cfg.adam_beta2,
    ) == (0.0, 0, 0, 0, 0, 0.999)
    assert objective.kl_marginal_weight == 0.0 and cfg.objective() == objective
    assert T.ramped_objective(cfg, objective, 0) is objective  # no ramp-up: the very same objective
    torch.manual_seed(0)
    logits, x = torch.randn(6, 10), torch.rand(6, 1, 4, 4)
    y, labeled = torch.randint(0, 10, (6,)), torch.arange(6) < 3
    total, logs = drmm_objective(objective, logits, y, labeled, x, x.flip(0), [x - 0.5])
    assert set(logs) == {"loss", "ce", "rc", "kl", "nn"}


# ---------------------------------------------------------------- in the training loop


@needs_mnist
def test_adam_beta2_reaches_the_trainers_optimizer(tmp_path):
    for beta2 in (0.999, 0.9):
        s = T.setup(tiny_config(adam_beta2=beta2), tmp_path / str(beta2), False)
        assert [g["betas"] for g in s.optimizer.param_groups] == [(0.9, beta2)]


@needs_mnist
def test_ramped_weights_follow_the_global_step_across_resume(tmp_path, monkeypatch):
    seen = []
    real_step = T.train_step

    def spy(model, cfg, objective, *args, **kwargs):
        loss, logs, logits = real_step(model, cfg, objective, *args, **kwargs)
        seen.append(
            (objective.kl_weight, objective.rc_weight, objective.nn_weight, objective.kl_marginal_weight, "klm" in logs)
        )
        return loss, logs, logits

    monkeypatch.setattr(T, "train_step", spy)
    # The backward of DRMM.class_templates' readout.weight[classes] is a CPU index_put with accumulate, which adds
    # duplicate classes in a thread-dependent order unless deterministic algorithms are on; with few labeled
    # images per batch (many repeated argmax classes) that shows up within a few steps, resumed or not.
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        _train_straight_and_split(tmp_path, seen)
    finally:
        torch.use_deterministic_algorithms(was)


def _train_straight_and_split(tmp_path, seen):
    # 180 unlabeled / 16 per batch = 11 steps per epoch: the run crosses an epoch boundary while still ramping
    opts = dict(
        kl_rampup_steps=12,
        rc_rampup_steps=16,
        nn_rampup_steps=3,
        kl_marginal_weight=0.2,
        labeled_per_batch=4,
        epochs=2,
        ckpt_every_steps=2,
    )
    T.train(tiny_config(max_steps=14, **opts), tmp_path / "straight")
    straight, seen[:] = list(seen), []
    T.train(tiny_config(max_steps=5, **opts), tmp_path / "split")
    T.train(tiny_config(max_steps=14, **opts), tmp_path / "split", resume=True)
    assert len(seen) == len(straight) == 14
    for step, (kl, rc, nn, klm, logged) in enumerate(straight):
        assert kl == pytest.approx(0.5 * T.rampup(step, 12)) and klm == pytest.approx(0.2 * T.rampup(step, 12))
        assert rc == pytest.approx(0.5 * T.rampup(step, 16)) and nn == pytest.approx(0.5 * T.rampup(step, 3))
        assert logged
    assert seen == straight
    a = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "split" / "last.pt", weights_only=True)
    assert a["step"] == b["step"] == 14 and a["epoch"] == b["epoch"] == 1
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
