"""Hard EM with a closed-form M-step: the DRMM paper's Algorithm 1, a derivative-free alternative to backprop.

E-step (as in EG, docs/model.md#eg-training): the bottom-up pass records the switches, the class is chosen (true
label if labeled, argmax otherwise), and the class template is rendered top-down through the switches.

M-step, per layer l (docs/model.md#top-down-rendering): with the switches and the top-down signal ``mu`` entering
layer l fixed, the layer's rendering ``x_hat = conv_transpose2d(unpool(mu) * a, W)`` is linear in W, and it is
regressed onto the layer's actual (bottom-up) input ``x``:

    min_W  sum_data |x - x_hat(W)|^2 + lam |W|^2,   lam = ridge * mean(diag(G))   (ridge relative to the data)

Input channel ci of ``x_hat`` depends only on the slice ``W[:, ci]``, through the same design matrix ``A`` (the
unfold of the masked unpooled signal, rows = input positions, columns = (out-channel, ky, kx)), so the problem
splits into Cin ridge regressions sharing one normal matrix ``G = A^T A`` (Cout*k*k square). ``G`` and
``R = A^T X`` are sums over the data, accumulated batch by batch (and over ranks with all_reduce), and the M-step
solves ``(G + lam I) W = R`` by Cholesky (lstsq if that fails).

Class templates (the top of the rendering): ``mu_c`` = ridge mean of the top features of the examples assigned to
c; class priors ``pi_c`` = assignment frequencies; the readout becomes ``logit_c = mu_c^T h - |mu_c|^2 / 2 +
s2 ln pi_c`` (the DRMM's max-sum readout, docs/model.md#the-generative-model, times the top noise variance s2, which
leaves the argmax unchanged and keeps ``mu_c`` the readout weight). For a DRFM the top regression is per class onto
``[1, z]``: ``h ~ mu_c + Lambda_c z``, with z the E-step's MAP factor.

All statistics of one M-step come from the same parameters (those of the E-steps since the last M-step);
``window`` batches are accumulated per M-step. BatchNorm parameters are not touched (the batch statistics still
normalise bottom-up; their running averages are updated by the E-step forwards, in training mode).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from drmm_kernels import reference as kref

from .drfm import DRFM
from .losses import reconstruction_per_example, template_classes
from .model import DRMM, Latents
from drmm_kernels.contract import plain_pool  # noqa: E402


# ---------------------------------------------------------------- the pieces of one layer's regression


def masked_unpooled(model: DRMM, i: int, mu: Tensor, switches: Tensor) -> Tensor:
    """The signal layer ``i``'s transposed conv sees: ``mu`` (layer i's output space) unpooled and masked.

    Exactly what ``drmm_kernels.render`` convolves (reference op contract), including the top-down ReLU and the
    mean-pool inverse of ``DRMM.render``; returns the full conv-map size (N, Cout, Hc, Wc).
    """
    spec = model.specs[i]
    if model.td_relu:
        mu = F.relu(mu)
    if spec.pool == "mean":
        mu = model.mean_unpool(mu, model.map_sizes[i])
    masked = kref.masked_values(mu=mu, switches=switches, scale=None, negative_slope=spec.negative_slope)
    if spec.fused_pool == 1:
        return masked
    out_h, out_w = model.map_sizes[i]
    return kref.unpool(values=masked, switches=switches, **plain_pool(spec.fused_pool), out_h=out_h, out_w=out_w)


def design_rows(model: DRMM, i: int, mu_tilde: Tensor) -> Tensor:
    """Design matrix of layer ``i``'s rendering, (N * H_in * W_in, Cout * k * k).

    ``conv_transpose2d(m, W, padding=p)`` = ``conv2d(m, flip(W)^T, padding=k-1-p)``, whose unfold has columns
    (cout, ky', kx') with ky' = k-1-ky; ``flat_to_weight`` undoes the flip.
    """
    k, pad = model.specs[i].kernel, model.specs[i].pad
    cols = F.unfold(mu_tilde, k, padding=k - 1 - pad)  # (N, Cout*k*k, H_in*W_in)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def targets_rows(x_in: Tensor) -> Tensor:
    """The layer input as regression targets, (N * H_in * W_in, Cin): one column per input channel."""
    return x_in.flatten(2).transpose(1, 2).reshape(-1, x_in.shape[1])


def flat_to_weight(solution: Tensor, cout: int, k: int) -> Tensor:
    """(Cout*k*k, Cin) regression solution -> conv weight (Cout, Cin, k, k)."""
    return solution.view(cout, k, k, -1).flip(1, 2).permute(0, 3, 1, 2).contiguous()


def weight_to_flat(weight: Tensor) -> Tensor:
    return weight.flip(2, 3).permute(0, 2, 3, 1).reshape(-1, weight.shape[1])


def solve_ridge(gram: Tensor, rhs: Tensor, ridge: float) -> Tuple[Tensor, float]:
    """argmin_W |A W - X|^2 + lam |W|^2 from G = A^T A and R = A^T X; lam = ridge * mean(diag(G)).

    Returns (W, lam). Cholesky first (G + lam I is positive definite for lam > 0); lstsq if it fails.
    """
    lam = float(ridge * gram.diagonal().mean())
    system = gram + lam * torch.eye(len(gram), dtype=gram.dtype, device=gram.device)
    chol, info = torch.linalg.cholesky_ex(system)
    if int(info) == 0:
        return torch.cholesky_solve(rhs, chol), lam
    return torch.linalg.lstsq(system, rhs).solution, lam


def layer_inputs_bottom_up(model: DRMM, x: Tensor, forward=None) -> Tuple[Tensor, Latents, List[Tensor]]:
    """``model(x)`` plus every layer's input (the regression targets of the M-step), via forward pre-hooks."""
    inputs: List[Tensor] = []
    handles = [layer.register_forward_pre_hook(lambda mod, args: inputs.append(args[0])) for layer in model.convs]
    try:
        logits, latents = (forward or model)(x)
    finally:
        for h in handles:
            h.remove()
    return logits, latents, inputs


def dist_ready() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


# ---------------------------------------------------------------- the trainer


@dataclass
class HardEMConfig:
    ridge: float = 1e-4  # relative ridge: lam = ridge * mean diagonal of the normal matrix
    window: int = 10  # batches whose statistics one M-step solves
    template_class: str = "true_if_labeled"
    row_fraction: float = 1.0  # < 1: regress on this random fraction of each layer's input positions (cheaper)


class HardEM:
    """Accumulates the E-step statistics of a DRMM/DRFM and solves the closed-form M-step.

    ``step(x, y, labeled)`` = one E-step on a batch (statistics added), and an M-step every ``window`` batches.
    ``accumulate`` and ``m_step`` are the two halves, for tests and custom loops.
    """

    def __init__(self, model: DRMM, cfg: HardEMConfig = HardEMConfig(), seed: int = 0):
        if cfg.ridge <= 0:
            raise ValueError(f"hard EM ridge must be > 0 (the normal matrix can be singular), got {cfg.ridge}")
        if cfg.window < 1:
            raise ValueError(f"hard EM window must be >= 1 batch, got {cfg.window}")
        if not 0 < cfg.row_fraction <= 1:
            raise ValueError(f"hard EM row_fraction must be in (0, 1], got {cfg.row_fraction}")
        self.model, self.cfg = model, cfg
        self.generator = torch.Generator().manual_seed(seed)
        self.batches = 0
        self.stats: Dict[str, Tensor] = {}
        self.window_data: List[Tuple[Tensor, Tensor]] = []  # (x, E-step classes) of the window's batches

    # -- statistics

    def _add_top_statistics(self, h: Tensor, classes: Tensor) -> None:
        model = self.model
        one_hot = F.one_hot(classes, model.num_classes).to(h.dtype)
        self._add("count", one_hot.sum(0))
        self._add("sq", one_hot.t() @ h.pow(2).sum(1, keepdim=True))  # per class sum |h|^2
        if isinstance(model, DRFM):
            z = model.infer_factors(h)[torch.arange(len(h), device=h.device), classes]  # (N, d)
            design = torch.cat([torch.ones_like(z[:, :1]), z], 1)  # [1, z]
            # per class: sum [1,z][1,z]^T and sum [1,z] h^T
            self._add("top_gram", torch.einsum("nc,ni,nj->cij", one_hot, design, design))
            self._add("top_rhs", torch.einsum("nc,ni,nd->cid", one_hot, design, h))
        else:
            self._add("sum_h", one_hot.t() @ h)

    def _add(self, name: str, value: Tensor) -> None:
        value = value.double()
        if name in self.stats:
            self.stats[name] += value
        else:
            self.stats[name] = value.clone()

    @torch.no_grad()
    def accumulate(self, x: Tensor, y: Tensor, labeled: Tensor, forward=None) -> Tuple[Dict[str, Tensor], Tensor]:
        """E-step on a batch; adds its normal equations. Returns (detached loss parts, logits)."""
        model = self.model
        logits, latents, inputs = layer_inputs_bottom_up(model, x, forward)
        classes = template_classes(logits, y, labeled, self.cfg.template_class)
        x_hat, levels = model.render(latents, classes, return_levels=True)
        num_layers = len(model.specs)
        for i in range(num_layers):
            mu = levels[num_layers - 1 - i]  # the signal entering layer i from above (its output space)
            a = design_rows(model, i, masked_unpooled(model, i, mu, latents.switches[i]))
            t = targets_rows(inputs[i])
            if self.cfg.row_fraction < 1:
                keep = torch.rand(len(a), generator=self.generator).to(a.device) < self.cfg.row_fraction
                a, t = a[keep], t[keep]
            self._add(f"gram_{i}", a.t() @ a)
            self._add(f"rhs_{i}", a.t() @ t)
        self.window_data.append((x, classes))  # for the top refit and the BN re-estimate after the M-step
        self.batches += 1
        rc = reconstruction_per_example(x, x_hat).mean()
        return {"loss": rc, "rc": rc}, logits

    def reduce_across_ranks(self) -> None:
        """Data parallelism: the normal equations are sums over the data, so summing over ranks is exact."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            for name in sorted(self.stats):
                dist.all_reduce(self.stats[name])

    @torch.no_grad()
    def refit_pass(self) -> None:
        """Bottom-up again over the window with the new conv weights: BN running statistics and top statistics.

        An M-step can move the conv weights far, which leaves the BN running averages (used at evaluation) and the
        top features the templates were fit on stale. So the top is solved after the layers (an ECM ordering,
        the E-step's class choices kept), on the features of the new weights, and the running statistics are
        re-estimated as the exact average over the window (momentum None), as one pass of BN recalibration.
        """
        model = self.model
        bns = [layer.bn for layer in model.convs if hasattr(layer, "bn")]
        momenta = [bn.momentum for bn in bns]
        prior_momentum = getattr(model, "switch_prior_momentum", None)
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None
        if prior_momentum is not None:
            model.switch_prior_momentum = 0.0  # the E-step forwards already counted these switches
        try:
            for x, classes in self.window_data:
                _, latents = model(x)
                self._add_top_statistics(latents.features.flatten(1), classes)
        finally:
            for bn, m in zip(bns, momenta):
                bn.momentum = m
            if prior_momentum is not None:
                model.switch_prior_momentum = prior_momentum

    # -- M-step

    @torch.no_grad()
    def m_step(self) -> Dict[str, float]:
        """Solve every layer's regression and the templates from the accumulated statistics, then reset them."""
        if not self.stats:
            raise RuntimeError("HardEM.m_step: no statistics accumulated (call accumulate first)")
        self.reduce_across_ranks()  # the layers' normal equations (the top ones are added by refit_pass)
        model, ridge = self.model, self.cfg.ridge
        info = {}
        for i, layer in enumerate(model.convs):
            gram, rhs = self.stats[f"gram_{i}"], self.stats[f"rhs_{i}"]
            if not gram.diagonal().sum() > 0:  # nothing rendered into this layer: keep its weight
                continue
            solution, lam = solve_ridge(gram, rhs, ridge)
            weight = model.conv_weight(layer)
            weight.copy_(flat_to_weight(solution, weight.shape[0], weight.shape[-1]).to(weight))
            info[f"lam_{i}"] = lam
        self.refit_pass()
        top_names = [n for n in self.stats if not n.startswith(("gram_", "rhs_"))]
        if dist_ready():
            import torch.distributed as dist

            for name in sorted(top_names):
                dist.all_reduce(self.stats[name])
        self._solve_top()
        self.stats, self.batches, self.window_data = {}, 0, []
        return info

    def _solve_top(self) -> None:
        model, ridge = self.model, self.cfg.ridge
        count, sq = self.stats["count"], self.stats["sq"][:, 0]
        seen = count > 0
        mu = model.readout.weight.detach().double().clone()
        if isinstance(model, DRFM):
            gram, rhs = self.stats["top_gram"], self.stats["top_rhs"]  # (C, 1+d, 1+d), (C, 1+d, D)
            lam = ridge * gram.diagonal(dim1=1, dim2=2).mean(1).clamp(min=1e-12)
            eye = torch.eye(gram.shape[1], dtype=gram.dtype, device=gram.device)
            coef = torch.linalg.solve(gram + lam.view(-1, 1, 1) * eye, rhs)  # rows: mu_c, Lambda_c^T
            mu[seen] = coef[seen, 0]
            loadings = model.factor_loadings.detach().double().clone()
            loadings[seen] = coef[seen, 1:].transpose(1, 2)
            model.factor_loadings.copy_(loadings.to(model.factor_loadings))
        else:
            # ridge mean: argmin sum_{n in c} |h_n - mu|^2 + lam |mu|^2, lam = ridge * N_c (diag of the design)
            mu[seen] = self.stats["sum_h"][seen] / (count[seen] * (1 + ridge)).unsqueeze(1)
            # top noise variance s2: mean squared residual per feature, over all assigned examples
            resid = sq - 2 * (mu * self.stats["sum_h"]).sum(1) + count * mu.pow(2).sum(1)
            s2 = float(resid.sum() / (count.sum() * mu.shape[1]).clamp(min=1)) or 1.0
        log_prior = torch.log((count + 1.0) / (count.sum() + len(count)))  # add-one smoothing: no -inf
        model.readout.weight.copy_(mu.to(model.readout.weight))
        if isinstance(model, DRFM):
            model.readout.bias.copy_(log_prior.to(model.readout.bias))  # DRFM logits: ... + ln pi_c
        else:
            model.readout.bias.copy_((-0.5 * mu.pow(2).sum(1) + s2 * log_prior).to(model.readout.bias))

    def step(self, x: Tensor, y: Tensor, labeled: Tensor, forward=None) -> Tuple[Dict[str, Tensor], Tensor]:
        logs, logits = self.accumulate(x, y, labeled, forward)
        if self.batches >= self.cfg.window:
            self.m_step()
        return logs, logits

    # -- checkpointing of a half-accumulated window

    def state_dict(self) -> Dict:
        return {
            "batches": self.batches,
            "stats": dict(self.stats),
            "generator": self.generator.get_state(),
            "window_data": list(self.window_data),
        }

    def load_state_dict(self, state: Dict) -> None:
        self.batches, self.stats = state["batches"], dict(state["stats"])
        self.window_data = list(state["window_data"])
        self.generator.set_state(state["generator"])


def layer_objective(
    model: DRMM, i: int, mu: Tensor, switches: Tensor, x_in: Tensor, weight: Tensor, lam: float
) -> Tensor:
    """The ridge least-squares objective layer ``i``'s M-step minimises, evaluated with the real render op."""
    import drmm_kernels as dk

    spec = model.specs[i]
    if model.td_relu:
        mu = F.relu(mu)
    if spec.pool == "mean":
        mu = model.mean_unpool(mu, model.map_sizes[i])
    x_hat = dk.render(
        mu,
        switches,
        weight,
        None,
        padding=spec.pad,
        pool=spec.fused_pool,
        out_size=tuple(x_in.shape[-2:]),
        negative_slope=spec.negative_slope,
        check_switches=False,  # switches recorded by the model's forward: skip the per-call byte check
    )
    return (x_in - x_hat).pow(2).sum() + lam * weight.pow(2).sum()


__all__ = [
    "HardEM",
    "HardEMConfig",
    "masked_unpooled",
    "design_rows",
    "targets_rows",
    "flat_to_weight",
    "weight_to_flat",
    "solve_ridge",
    "layer_inputs_bottom_up",
    "layer_objective",
]
