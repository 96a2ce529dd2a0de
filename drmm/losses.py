"""The EG objective of the DRMM (docs/model.md#loss-terms): CE + a_RC*RC + a_KL*KL + a_NN*NN (+ the optional
RPN and KL-marginal terms).

All terms are computed per example and then averaged over the examples they apply to, so which half of a
semi-supervised batch carries the unsupervised terms (``unsup_terms_on``) is a mask, not a second code path.
Every disagreement between the paper and the authors' code is an option here, default = the code
(docs/model.md#paper-vs-code).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class ObjectiveConfig:
    ce_weight: float = 1.0
    rc_weight: float = 0.5  # a_RC; [TF] leaves it unset (0.0), NRM notebooks 0.2-1.0 (docs/model.md#loss-weights)
    kl_weight: float = 0.5  # a_KL; [TF] main.py --kl 0.5
    nn_weight: float = 0.5  # a_NN; [TF] main.py --cw 0.5
    kl_sign: int = -1  # -1 = code: minimise -KL(q||U) = entropy minimisation; +1 = paper's KL to uniform
    kl_marginal_weight: float = 0.0  # > 0: + this * KL(mean q || U), the batch-averaged posterior against the
    # uniform class prior (class balance); 0 = paper/code (no such term)
    td_nonneg: str = "penalty"  # penalty ([TF]) | relu ([P16] §3.2) | both | none
    rc_reduction: str = "mean_all"  # mean_all ([TF]) | half_mean_per_sample ([DGM] L2Loss)
    unsup_terms_on: str = "unlabeled"  # unlabeled ([TF] 'unsup') | labeled | both_avg | both_sum ([DGM])
    nonneg_term: str = "penalty"  # penalty | moment_matching (NRM with BN, replaces NN; docs/model.md#loss-terms)
    rpn_weight: float = 0.0  # a_PN of NRM's rendering-path normalisation (docs/model.md#loss-terms); 0 = off
    rpn_class_prior: bool = False  # RPN: add |ln pi_c - ln pi_c_pn| (ln pi = readout bias), as lenet_ld_opt.py

    def __post_init__(self):
        choices = {
            "td_nonneg": ("penalty", "relu", "both", "none"),
            "rc_reduction": ("mean_all", "half_mean_per_sample"),
            "unsup_terms_on": ("unlabeled", "labeled", "both_avg", "both_sum"),
            "nonneg_term": ("penalty", "moment_matching"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.kl_sign not in (-1, 1):
            raise ValueError(f"kl_sign must be -1 or +1, got {self.kl_sign!r}")
        if not self.kl_marginal_weight >= 0:
            raise ValueError(f"kl_marginal_weight must be >= 0, got {self.kl_marginal_weight!r}")
        if not self.rpn_weight >= 0:
            raise ValueError(f"rpn_weight must be >= 0, got {self.rpn_weight!r}")
        if self.rpn_class_prior and not self.rpn_weight:
            raise ValueError("rpn_class_prior: true needs rpn_weight > 0")

    @property
    def moment_matching(self) -> bool:
        return self.nonneg_term == "moment_matching"

    @property
    def nn_penalty_on(self) -> bool:
        """Whether the NN slot carries a term: the penalty (td_nonneg penalty/both) or, when selected, MM."""
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
    return kl_of_probs_per_example(F.softmax(logits, dim=1), eps)


def kl_of_probs_per_example(q: Tensor, eps: float = 1e-8) -> Tensor:
    """``kl_to_uniform_per_example`` for given class probabilities (Max-Min: the average of two softmaxes)."""
    return (q * torch.log(q.shape[1] * q + eps)).sum(1)


def kl_marginal(q: Tensor, w: Tensor, unsup_terms_on: str = "unlabeled", eps: float = 1e-8) -> Tensor:
    """KL(mean q || uniform): the ``w``-weighted batch mean of the posteriors ``q`` against the uniform class prior.

    Not in the paper or the code (``kl_marginal_weight``): it pushes the predicted classes to be balanced over the
    batch, where the per-example KL term (entropy minimisation) alone may collapse onto few classes. ``w`` are the
    ``unsup_weights``; they sum to 1 except with ``both_sum`` (two means added), where the mean is renormalised.
    """
    mean_q = (w.unsqueeze(1) * q).sum(0, keepdim=True)
    if unsup_terms_on == "both_sum":
        mean_q = mean_q / w.sum()
    return kl_of_probs_per_example(mean_q, eps).squeeze(0)


def nonneg_penalty_per_example(signals: Sequence[Tensor]) -> Tensor:
    """Squared hinge on negative top-down values, mean over each signal's elements, summed over layers.

    Zero exactly when every rendered signal is nonnegative (the NN-DRMM constraint z >= 0,
    docs/model.md#top-down-rendering and #implementation-pitfalls).
    """
    total = 0.0
    for z in signals:
        total = total + F.relu(-z).pow(2).flatten(1).mean(1)
    return total


def moment_matching_per_example(pairs: Sequence[Tuple[Tensor, Tensor]], eps: float = 1e-8) -> Tensor:
    """NRM's moment matching (docs/model.md#loss-terms): sum over (top-down, forward) pairs of the per-sample
    Gaussian KL.

    Each pair holds a top-down signal and the forward pre-BN conv output it is compared with; only per-sample
    scalar moments (mean and biased variance over all of C, H, W) are used, so the two need not share a shape.
    Per pair: 0.5 * [(m_td - m_fw)^2 / v_fw + v_td / v_fw - log(v_td / v_fw) - 1], with +eps guards on both
    variances ([NRMpub] compute_kl_gaussian); zero iff the moments agree.
    """
    total = 0.0
    for td, fw in pairs:
        td, fw = td.flatten(1), fw.flatten(1)
        m_td, v_td = td.mean(1), td.var(1, unbiased=False) + eps
        m_fw, v_fw = fw.mean(1), fw.var(1, unbiased=False) + eps
        ratio = v_td / v_fw
        total = total + 0.5 * ((m_td - m_fw).pow(2) / v_fw + ratio - torch.log(ratio) - 1.0)
    return total


def moment_pairs(levels: Sequence[Tensor], forward_convs: Sequence[Tensor]) -> List[Tuple[Tensor, Tensor]]:
    """The MM pairing (docs/model.md#loss-terms, reversed-list): ``levels[j]`` (top first, image excluded) with the
    forward conv output of layer L-1-j, i.e. the top template with the last conv, the signal rendered into layer l's
    input with layer l-1's conv. A pair whose signals hold fewer than 2 values per example (no variance) is skipped."""
    n_layers = len(forward_convs)
    pairs = []
    for j, td in enumerate(levels[:n_layers]):
        fw = forward_convs[n_layers - 1 - j]
        if td[0].numel() >= 2 and fw[0].numel() >= 2:
            pairs.append((td, fw))
    return pairs


def rpn_per_example(
    model, latents, levels: Sequence[Tensor], pn_latents, pn_levels: Sequence[Tensor], classes: Optional[Tensor] = None
) -> Tensor:
    """Rendering-path normalisation (docs/model.md#loss-terms):
    sum_l mean_{C,H,W} |b_l * (mu_l * a_l - mu_pn_l * a_pn_l)|.

    ``levels``/``pn_levels`` are ``model.render(..., return_levels=True)`` levels of the inferred and the prior path
    (top first): ``levels[L-1-l]`` is the signal in layer l's (pooled) output space, where b_l (BN beta or conv
    bias) is added bottom-up. a_l is the layer's a-mask (1 on, the activation slope off) from the switches. Both
    paths share the t-switches, so the mean over the unpooled map is the pooled-space sum over the conv-map size.
    With ``classes`` given, adds |ln pi_c - ln pi_c_pn| with ln pi = the readout bias and c_pn = its argmax (the
    prior's most probable class). Layers without a bias contribute nothing.
    """
    n_layers = len(model.specs)
    total = 0.0
    for l in range(n_layers):
        b = model.layer_bias(l)
        if b is None:
            continue
        mu, mu_pn = levels[n_layers - 1 - l], pn_levels[n_layers - 1 - l]
        if model.specs[l].pool == "mean":
            mu, mu_pn = model.mean_unpool(mu, latents.map_sizes[l]), model.mean_unpool(mu_pn, latents.map_sizes[l])
        a = model.switch_mask(l, latents.switches[l], mu.dtype)
        a_pn = model.switch_mask(l, pn_latents.switches[l], mu.dtype)
        diff = (b.view(1, -1, 1, 1) * (mu * a - mu_pn * a_pn)).abs().flatten(1)
        h, w = latents.map_sizes[l]
        total = total + diff.sum(1) / (diff.shape[1] // (mu.shape[-2] * mu.shape[-1]) * h * w)
    if classes is not None:
        log_pi = model.readout.bias
        total = total + (log_pi[classes] - log_pi.max()).abs()
    return total


@dataclass
class MinBranch:
    """What the Max-Min model's min branch contributes (docs/model.md#loss-terms, Max-Min CE): its logits and its
    own rendering.

    ``drmm_objective`` then weighs each branch 0.5: CE = 0.5 CE(z_max) + 0.5 CE(z_min), RC and the NN/MM term
    averaged over the two reconstructions, the KL taken on the average of the two softmaxes ([DGM] nrm_maxmin.py).
    """

    logits: Tensor
    x_hat: Optional[Tensor] = None
    signals: Optional[Sequence[Tensor]] = None
    moments: Optional[Sequence[Tuple[Tensor, Tensor]]] = None


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


def drmm_objective(
    cfg: ObjectiveConfig,
    logits: Tensor,
    labels: Tensor,
    labeled: Tensor,
    x: Tensor,
    x_hat: Optional[Tensor],
    signals: Optional[Sequence[Tensor]],
    moments: Optional[Sequence[Tuple[Tensor, Tensor]]] = None,
    rpn: Optional[Tensor] = None,
    min_branch: Optional[MinBranch] = None,
) -> Tuple[Tensor, Dict[str, Tensor]]:
    """Total loss and its parts (detached 0-d tensors; ``as_floats`` turns them into numbers for logging).

    ``labeled`` is a bool mask; ``labels`` is ignored where it is False. ``x_hat``/``signals`` may be None
    (a backprop baseline has no top-down pass); then RC and NN are absent. With ``nonneg_term='moment_matching'``
    the NN slot (logged as ``nn``, weighted by ``nn_weight``) holds MM over ``moments`` (``moment_pairs``) instead
    of the penalty. ``rpn`` is the per-example RPN (``rpn_per_example``), logged as ``rpn`` when rpn_weight > 0.
    With kl_marginal_weight > 0, KL(batch-mean q || U) (``kl_marginal``) is added and logged as ``klm``.
    With ``min_branch`` (Max-Min model) ``logits``/``x_hat``/``signals``/``moments`` are the max branch's and every
    term is the 0.5/0.5 average of the two branches (see ``MinBranch``); the RPN stays the max branch's.
    """
    parts: Dict[str, Tensor] = {}
    zero = logits.new_zeros(())
    lab = labeled.float()
    branches = [MinBranch(logits, x_hat, signals, moments)] + ([min_branch] if min_branch is not None else [])
    share = 1.0 / len(branches)
    w = unsup_weights(labeled, cfg.unsup_terms_on)
    parts.update(ce=zero, rc=zero, kl=zero, nn=zero)
    for b in branches:
        ce_each = F.cross_entropy(b.logits, labels.clamp(min=0), reduction="none")
        parts["ce"] = parts["ce"] + share * (ce_each * lab).sum() / lab.sum().clamp(min=1)  # mean over labeled
        if b.x_hat is not None:
            parts["rc"] = parts["rc"] + share * (w * reconstruction_per_example(x, b.x_hat, cfg.rc_reduction)).sum()
        if cfg.moment_matching:
            if b.moments and cfg.nn_weight:
                parts["nn"] = parts["nn"] + share * (w * moment_matching_per_example(b.moments)).sum()
        elif b.signals is not None and cfg.nn_penalty_on and cfg.nn_weight:
            parts["nn"] = parts["nn"] + share * (w * nonneg_penalty_per_example(b.signals)).sum()
    # kl_sign * KL(q||U): with -1 (code default) this is H(q) - log C, so minimising it sharpens predictions.
    if cfg.kl_weight or cfg.kl_marginal_weight:
        q = sum(share * F.softmax(b.logits, dim=1) for b in branches)
    if cfg.kl_weight:
        parts["kl"] = cfg.kl_sign * (w * kl_of_probs_per_example(q)).sum()
    else:
        parts["kl"] = zero
    total = (
        cfg.ce_weight * parts["ce"]
        + cfg.rc_weight * parts["rc"]
        + cfg.kl_weight * parts["kl"]
        + cfg.nn_weight * parts["nn"]
    )
    if cfg.kl_marginal_weight:
        parts["klm"] = kl_marginal(q, w, cfg.unsup_terms_on)
        total = total + cfg.kl_marginal_weight * parts["klm"]
    if cfg.rpn_weight:
        parts["rpn"] = (w * rpn).sum() if rpn is not None else zero
        total = total + cfg.rpn_weight * parts["rpn"]
    logs = {"loss": total.detach(), **{k: v.detach() for k, v in parts.items()}}
    return total, logs


def as_floats(logs: Dict[str, Tensor]) -> Dict[str, float]:
    """Detached loss parts -> Python floats with a single device sync."""
    values = torch.stack([v.float() for v in logs.values()]).tolist()
    return dict(zip(logs.keys(), values))


def template_classes(
    logits: Tensor, labels: Tensor, labeled: Tensor, template_class: str = "true_if_labeled"
) -> Tensor:
    """The class whose template is rendered (E-step, a constant): true label where labeled, else the argmax.

    ``template_class='predicted'`` uses the argmax everywhere, as the TF port does (docs/model.md#class-templates).
    """
    predicted = logits.detach().argmax(1)
    if template_class == "predicted":
        return predicted
    if template_class != "true_if_labeled":
        raise ValueError(f"template_class must be 'true_if_labeled' or 'predicted', got {template_class!r}")
    return torch.where(labeled, labels, predicted)


__all__ = [
    "ObjectiveConfig",
    "drmm_objective",
    "as_floats",
    "template_classes",
    "reconstruction_per_example",
    "kl_to_uniform_per_example",
    "nonneg_penalty_per_example",
    "unsup_weights",
    "moment_matching_per_example",
    "moment_pairs",
    "rpn_per_example",
    "MinBranch",
    "kl_of_probs_per_example",
    "kl_marginal",
]
