"""The EG objective of the DRMM (model-spec §4): CE + a_RC*RC + a_KL*KL + a_NN*NN.

All terms are computed per example and then averaged over the examples they apply to, so which half of a
semi-supervised batch carries the unsupervised terms (``unsup_terms_on``) is a mask, not a second code path.
Every disagreement between the paper and the authors' code is an option here, default = the code (spec §10).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class ObjectiveConfig:
    ce_weight: float = 1.0
    rc_weight: float = 0.5        # a_RC; [TF] leaves it unset (0.0), NRM notebooks use 0.2-1.0 (spec §4.3)
    kl_weight: float = 0.5        # a_KL; [TF] main.py --kl 0.5
    nn_weight: float = 0.5        # a_NN; [TF] main.py --cw 0.5
    kl_sign: int = -1             # -1 = code: minimise -KL(q||U) = entropy minimisation; +1 = paper's KL to uniform
    td_nonneg: str = "penalty"    # penalty ([TF]) | relu ([P16] §3.2) | both | none
    rc_reduction: str = "mean_all"        # mean_all ([TF]) | half_mean_per_sample ([DGM] L2Loss)
    unsup_terms_on: str = "unlabeled"     # unlabeled ([TF] 'unsup') | labeled | both_avg | both_sum ([DGM])
    nonneg_term: str = "penalty"  # penalty | moment_matching (NRM with BN; not implemented)
    rpn_weight: float = 0.0       # NRM's rendering-path normalisation; not implemented (must stay 0)

    def __post_init__(self):
        choices = {"td_nonneg": ("penalty", "relu", "both", "none"),
                   "rc_reduction": ("mean_all", "half_mean_per_sample"),
                   "unsup_terms_on": ("unlabeled", "labeled", "both_avg", "both_sum"),
                   "nonneg_term": ("penalty", "moment_matching")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.kl_sign not in (-1, 1):
            raise ValueError(f"kl_sign must be -1 or +1, got {self.kl_sign!r}")
        if self.nonneg_term == "moment_matching":
            raise NotImplementedError("nonneg_term='moment_matching' (NRM's KL between BN moments, spec §4.1) is "
                                      "not implemented; use nonneg_term='penalty'")
        if self.rpn_weight != 0:
            raise NotImplementedError("rpn_weight != 0: the rendering-path normalisation (NRM, spec §4.1) is not "
                                      "implemented; set rpn_weight: 0")

    @property
    def nn_penalty_on(self) -> bool:
        return self.td_nonneg in ("penalty", "both")

    @property
    def td_relu(self) -> bool:
        return self.td_nonneg in ("relu", "both")


# ---------------------------------------------------------------- per-example terms


def reconstruction_per_example(x: Tensor, x_hat: Tensor, reduction: str = "mean_all") -> Tensor:
    """Squared error per example: mean over (C,H,W) ([TF] mean over all, once batch-averaged) or half that ([DGM])."""
    err = (x_hat - x).pow(2).flatten(1).mean(1)
    return 0.5 * err if reduction == "half_mean_per_sample" else err


def kl_to_uniform_per_example(logits: Tensor, eps: float = 1e-8) -> Tensor:
    """KL(q || uniform) = sum_c q_c log(C q_c) = log C - H(q), with the code's 1e-8 inside the log."""
    q = F.softmax(logits, dim=1)
    return (q * torch.log(logits.shape[1] * q + eps)).sum(1)


def nonneg_penalty_per_example(signals: Sequence[Tensor]) -> Tensor:
    """Squared hinge on negative top-down values, mean over each signal's elements, summed over layers.

    Zero exactly when every rendered signal is nonnegative (the NN-DRMM constraint z >= 0, spec §3.2, §9.9).
    """
    total = 0.0
    for z in signals:
        total = total + F.relu(-z).pow(2).flatten(1).mean(1)
    return total


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    n = mask.sum()
    return (values * mask).sum() / n.clamp(min=1)


def unsup_weights(labeled: Tensor, unsup_terms_on: str) -> Tensor:
    """Per-example weights for the unsupervised terms (RC, KL, NN); each half is averaged over itself.

    ``unlabeled``: mean over the unlabeled examples ([TF] cost_mode 'unsup'); with no unlabeled example in the
    batch (supervised EG) the labeled ones carry the terms instead, else the generative part would vanish.
    ``labeled``: mean over labeled ones. ``both_avg``: 0.5*mean(labeled) + 0.5*mean(unlabeled) ([TF] 'both').
    ``both_sum``: mean(labeled) + mean(unlabeled) (the NRM notebooks apply the terms to both halves).
    Written with torch.where, not Python branches on tensor values, so a GPU step never waits for the host.
    """
    lab = labeled.float()
    unl = 1.0 - lab
    n_lab, n_unl = lab.sum(), unl.sum()
    mean_lab, mean_unl = lab / n_lab.clamp(min=1), unl / n_unl.clamp(min=1)
    if unsup_terms_on == "unlabeled":
        return torch.where(n_unl > 0, mean_unl, mean_lab)
    if unsup_terms_on == "labeled":
        return torch.where(n_lab > 0, mean_lab, mean_unl)
    scale = 0.5 if unsup_terms_on == "both_avg" else 1.0
    one_stream = (n_lab == 0) | (n_unl == 0)  # only one stream present: both options reduce to its mean
    return torch.where(one_stream, torch.full_like(lab, 1.0 / len(lab)), scale * (mean_lab + mean_unl))


# ---------------------------------------------------------------- the full objective


def drmm_objective(cfg: ObjectiveConfig, logits: Tensor, labels: Tensor, labeled: Tensor, x: Tensor,
                   x_hat: Optional[Tensor], signals: Optional[Sequence[Tensor]]) -> Tuple[Tensor, Dict[str, Tensor]]:
    """Total loss and its parts (detached 0-d tensors; ``as_floats`` turns them into numbers for logging).

    ``labeled`` is a bool mask; ``labels`` is ignored where it is False. ``x_hat``/``signals`` may be None
    (a backprop baseline has no top-down pass); then RC and NN are absent.
    """
    parts: Dict[str, Tensor] = {}
    zero = logits.new_zeros(())
    lab = labeled.float()
    ce_each = F.cross_entropy(logits, labels.clamp(min=0), reduction="none")
    parts["ce"] = (ce_each * lab).sum() / lab.sum().clamp(min=1)   # mean over the labeled examples (0 if none)
    w = unsup_weights(labeled, cfg.unsup_terms_on)
    parts["rc"] = (w * reconstruction_per_example(x, x_hat, cfg.rc_reduction)).sum() if x_hat is not None else zero
    # kl_sign * KL(q||U): with -1 (code default) this is H(q) - log C, so minimising it sharpens predictions.
    parts["kl"] = cfg.kl_sign * (w * kl_to_uniform_per_example(logits)).sum() if cfg.kl_weight else zero
    if signals is not None and cfg.nn_penalty_on and cfg.nn_weight:
        parts["nn"] = (w * nonneg_penalty_per_example(signals)).sum()
    else:
        parts["nn"] = zero
    total = (cfg.ce_weight * parts["ce"] + cfg.rc_weight * parts["rc"] + cfg.kl_weight * parts["kl"]
             + cfg.nn_weight * parts["nn"])
    logs = {"loss": total.detach(), **{k: v.detach() for k, v in parts.items()}}
    return total, logs


def as_floats(logs: Dict[str, Tensor]) -> Dict[str, float]:
    """Detached loss parts -> Python floats with a single device sync."""
    values = torch.stack([v.float() for v in logs.values()]).tolist()
    return dict(zip(logs.keys(), values))


def template_classes(logits: Tensor, labels: Tensor, labeled: Tensor, template_class: str = "true_if_labeled"
                     ) -> Tensor:
    """The class whose template is rendered (E-step, a constant): true label where labeled, else the argmax.

    ``template_class='predicted'`` uses the argmax everywhere, as the TF port does (spec §3.1).
    """
    predicted = logits.detach().argmax(1)
    if template_class == "predicted":
        return predicted
    if template_class != "true_if_labeled":
        raise ValueError(f"template_class must be 'true_if_labeled' or 'predicted', got {template_class!r}")
    return torch.where(labeled, labels, predicted)


__all__ = ["ObjectiveConfig", "drmm_objective", "as_floats", "template_classes", "reconstruction_per_example",
           "kl_to_uniform_per_example", "nonneg_penalty_per_example", "unsup_weights"]
