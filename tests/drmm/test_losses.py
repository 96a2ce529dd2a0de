"""The EG objective: KL sign, NN penalty, reductions, which examples carry which term, template classes."""

import math

import pytest
import torch

from drmm.losses import (
    ObjectiveConfig,
    as_floats,
    drmm_objective,
    kl_to_uniform_per_example,
    nonneg_penalty_per_example,
    reconstruction_per_example,
    template_classes,
    unsup_weights,
)


def test_kl_to_uniform_values():
    uniform = torch.zeros(3, 10)
    assert torch.allclose(kl_to_uniform_per_example(uniform), torch.zeros(3), atol=1e-6)
    confident = torch.full((1, 10), -30.0)
    confident[0, 4] = 30.0
    assert kl_to_uniform_per_example(confident).item() == pytest.approx(math.log(10), abs=1e-4)


@pytest.mark.parametrize("kl_sign", [-1, 1])
def test_kl_sign_decides_whether_descent_sharpens_or_flattens(kl_sign):
    torch.manual_seed(0)
    logits = torch.randn(8, 10, requires_grad=True)
    cfg = ObjectiveConfig(ce_weight=0, rc_weight=0, nn_weight=0, kl_weight=1.0, kl_sign=kl_sign)
    labeled = torch.zeros(8, dtype=torch.bool)
    labels = torch.zeros(8, dtype=torch.long)

    def entropy(z):
        q = torch.softmax(z, 1)
        return -(q * q.log()).sum(1).mean()

    before = entropy(logits.detach())
    for _ in range(20):
        loss, _ = drmm_objective(cfg, logits, labels, labeled, torch.zeros(8, 1), None, None)
        (g,) = torch.autograd.grad(loss, logits)
        logits = (logits - 0.5 * g).detach().requires_grad_(True)
    after = entropy(logits.detach())
    if kl_sign == -1:  # the authors' code: -KL(q||U) = H(q) - log C, so descent minimises the entropy
        assert after < before - 0.1
    else:  # the paper's reading: KL toward the uniform prior, descent raises the entropy
        assert after > before + 0.1


def test_kl_term_value_matches_code_formula():
    torch.manual_seed(1)
    logits = torch.randn(5, 10)
    cfg = ObjectiveConfig(ce_weight=0, rc_weight=0, nn_weight=0, kl_weight=1.0)
    _, logs = drmm_objective(
        cfg, logits, torch.zeros(5, dtype=torch.long), torch.zeros(5, dtype=torch.bool), torch.zeros(5, 1), None, None
    )
    logs = as_floats(logs)
    q = torch.softmax(logits, 1)
    code = -(q * torch.log(10 * q + 1e-8)).sum(1).mean()  # [TF] model.py / DGM notebooks
    assert logs["kl"] == pytest.approx(code.item(), rel=1e-5)


def test_nn_penalty_zero_for_nonnegative_and_squared_hinge_otherwise():
    pos = [torch.rand(2, 3, 4, 4), torch.rand(2, 5, 1, 1)]
    assert torch.equal(nonneg_penalty_per_example(pos), torch.zeros(2))
    z = torch.tensor([[-1.0, 2.0, -3.0, 0.0]]).view(1, 1, 2, 2)
    assert nonneg_penalty_per_example([z]).item() == pytest.approx((1 + 9) / 4)
    assert nonneg_penalty_per_example([z, z]).item() == pytest.approx(2 * (1 + 9) / 4)  # summed over layers


def test_rc_reductions():
    x, x_hat = torch.zeros(2, 1, 2, 2), torch.ones(2, 1, 2, 2) * 2
    assert torch.allclose(reconstruction_per_example(x, x_hat, "mean_all"), torch.full((2,), 4.0))
    assert torch.allclose(reconstruction_per_example(x, x_hat, "half_mean_per_sample"), torch.full((2,), 2.0))


def test_unsup_weights_select_the_right_examples():
    labeled = torch.tensor([True, True, False, False, False, False])
    w = unsup_weights(labeled, "unlabeled")
    assert torch.allclose(w, torch.tensor([0, 0, 0.25, 0.25, 0.25, 0.25]))
    assert torch.allclose(unsup_weights(labeled, "labeled"), torch.tensor([0.5, 0.5, 0, 0, 0, 0]))
    assert unsup_weights(labeled, "both_avg").sum().item() == pytest.approx(1.0)
    assert unsup_weights(labeled, "both_sum").sum().item() == pytest.approx(2.0)
    # supervised EG (no unlabeled example): the labeled ones carry the generative terms
    all_lab = torch.ones(4, dtype=torch.bool)
    for mode in ("unlabeled", "labeled", "both_avg", "both_sum"):
        assert torch.allclose(unsup_weights(all_lab, mode), torch.full((4,), 0.25)), mode
        assert torch.allclose(unsup_weights(~all_lab, mode), torch.full((4,), 0.25)), mode


def test_objective_combines_weighted_terms():
    torch.manual_seed(2)
    logits = torch.randn(4, 10)
    labels = torch.tensor([1, 2, 0, 0])
    labeled = torch.tensor([True, True, False, False])
    x, x_hat = torch.rand(4, 1, 3, 3), torch.rand(4, 1, 3, 3)
    signals = [torch.randn(4, 2, 2, 2)]
    cfg = ObjectiveConfig(ce_weight=1.0, rc_weight=0.3, kl_weight=0.2, nn_weight=0.7)
    total, logs = drmm_objective(cfg, logits, labels, labeled, x, x_hat, signals)
    logs = as_floats(logs)
    ce = torch.nn.functional.cross_entropy(logits[:2], labels[:2])
    rc = ((x - x_hat) ** 2).flatten(1).mean(1)[2:].mean()
    assert logs["ce"] == pytest.approx(ce.item(), rel=1e-5)
    assert logs["rc"] == pytest.approx(rc.item(), rel=1e-5)
    expected = logs["ce"] + 0.3 * logs["rc"] + 0.2 * logs["kl"] + 0.7 * logs["nn"]
    assert total.item() == pytest.approx(expected, rel=1e-5)
    assert logs["nn"] > 0


def test_ce_without_labeled_examples_is_zero():
    logits = torch.randn(3, 10, requires_grad=True)
    total, logs = drmm_objective(
        ObjectiveConfig(rc_weight=0, kl_weight=0, nn_weight=0),
        logits,
        torch.tensor([1, 2, 3]),
        torch.zeros(3, dtype=torch.bool),
        torch.zeros(3, 1),
        None,
        None,
    )
    assert total.item() == 0.0 and as_floats(logs)["ce"] == 0.0


def test_template_classes():
    logits = torch.tensor([[0.0, 5.0], [5.0, 0.0], [0.0, 5.0]])
    labels = torch.tensor([0, 1, 0])
    labeled = torch.tensor([True, True, False])
    assert template_classes(logits, labels, labeled).tolist() == [0, 1, 1]
    assert template_classes(logits, labels, labeled, "predicted").tolist() == [1, 0, 1]


def test_config_errors():
    with pytest.raises(ValueError, match="kl_sign"):
        ObjectiveConfig(kl_sign=0)
    with pytest.raises(ValueError, match="td_nonneg"):
        ObjectiveConfig(td_nonneg="clip")
    with pytest.raises(ValueError, match="nonneg_term"):
        ObjectiveConfig(nonneg_term="kl")
    with pytest.raises(ValueError, match="rpn_weight"):
        ObjectiveConfig(rpn_weight=-1.0)
    with pytest.raises(ValueError, match="rpn_class_prior"):
        ObjectiveConfig(rpn_class_prior=True)
    assert ObjectiveConfig(nonneg_term="moment_matching", rpn_weight=1.0).moment_matching
    assert ObjectiveConfig(td_nonneg="both").td_relu and ObjectiveConfig(td_nonneg="both").nn_penalty_on
    assert not ObjectiveConfig(td_nonneg="relu").nn_penalty_on
