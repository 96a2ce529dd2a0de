"""The Deep Rendering Factor Model (DRFM, docs/model.md#variants): a Gaussian top latent instead of a bare class
template.

Generative model: class ``c ~ Cat(pi)``, factor ``z ~ N(0, I_d)``, top rendered template
``z^(L) = mu_c + Lambda_c z``, then the same rendering through the switches as the DRMM. With ``factor_dim = 0`` it
is the DRMM. The paper writes ``z^(L) = Lambda_c z^(L+1)`` with the affine bias suppressed; we keep that bias as
the class mean ``mu_c`` (the readout weight column, as in the DRMM), so a DRFM is a mixture of factor analysers on
the top features.

Bottom-up is unchanged. At the top, the MAP factor of class c is the ridge projection
``z_c = (Lambda_c^T Lambda_c + s2 I)^-1 Lambda_c^T (h - mu_c)`` (``s2`` = ``noise_var``, the pixel-noise variance
of the factor analyser), and the class is read out as docs/model.md#variants suggests (the paper defers it to its
appendix): the class with the highest joint log posterior at its MAP factor,
``logit_c = -(|h - mu_c - Lambda_c z_c|^2 + s2 |z_c|^2) / (2 s2) + b_c``, with ``b_c`` the readout bias
(``ln pi_c`` relaxed to a free parameter, as the DRMM's).

The shallow rendering models of the paper's experiments: ``rfm`` preset + ``top_model: factor`` = the RFM (one
conv layer with switches and a factor top); ``rfm`` + ``top_model: class`` = the shallow RMM (templates ``mu_c``
rendered through one layer of translation/render switches, [P16] eqs. 1-3 with the max over g factorised into
ReLU + 2x2 max-pool). See docs/drmm.md, "Rendering factor models".
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .model import DRMM, LayerSpec, Latents, preset_layers


class DRFM(DRMM):
    """A DRMM whose top is a per-class factor analyser: ``z^(L) = mu_c + Lambda_c z``, ``z ~ N(0, I)``."""

    def __init__(
        self,
        layers: Sequence[LayerSpec],
        in_channels: int,
        image_size: Tuple[int, int],
        num_classes: int = 10,
        factor_dim: int = 8,
        noise_var: float = 1.0,
        **drmm_kwargs,
    ):
        super().__init__(layers, in_channels, image_size, num_classes, **drmm_kwargs)
        if factor_dim < 0:
            raise ValueError(f"factor_dim must be >= 0, got {factor_dim}")
        if not noise_var > 0:
            raise ValueError(f"noise_var must be > 0, got {noise_var}")
        self.factor_dim, self.noise_var = int(factor_dim), float(noise_var)
        top_dim = self.readout.in_features
        # Lambda_c: (C, D, d). Small init so the model starts close to the DRMM it extends.
        self.factor_loadings = nn.Parameter(0.01 * torch.randn(num_classes, top_dim, self.factor_dim))

    def _factor_solve(self, h: Tensor) -> Tuple[Tensor, Tensor]:
        """(MAP factors z (N, C, d), projections Lambda_c^T (h - mu_c) (N, C, d)), never forming (N, C, D)."""
        lam, mu = self.factor_loadings, self.readout.weight  # (C, D, d), (C, D)
        eye = torch.eye(self.factor_dim, dtype=lam.dtype, device=lam.device)
        gram = lam.transpose(1, 2) @ lam + self.noise_var * eye  # (C, d, d), positive definite
        proj = torch.einsum("cdk,nd->nck", lam, h) - torch.einsum("cdk,cd->ck", lam, mu)
        chol = torch.linalg.cholesky(gram)
        z = torch.cholesky_solve(proj.permute(1, 2, 0), chol).permute(2, 0, 1)
        return z, proj

    def infer_factors(self, h: Tensor) -> Tensor:
        """MAP factors of every class, (N, C, d), for flat top features ``h`` (N, D)."""
        return self._factor_solve(h)[0]

    def factor_logits(self, h: Tensor) -> Tuple[Tensor, Tensor]:
        """(logits (N, C), MAP factors (N, C, d)) for flat top features ``h``."""
        z, proj = self._factor_solve(h)
        mu = self.readout.weight
        dist = h.pow(2).sum(1, keepdim=True) - 2 * h @ mu.t() + mu.pow(2).sum(1)  # |h - mu_c|^2
        # min_z |h - mu_c - Lambda_c z|^2 + s2 |z|^2 = |h - mu_c|^2 - z^T proj, since (Lambda^T Lambda + s2) z = proj
        err = dist - (z * proj).sum(-1)
        return -err / (2 * self.noise_var) + self.readout.bias, z

    def forward(self, x: Tensor) -> Tuple[Tensor, Latents]:
        _, latents = super().forward(x)  # the DRMM's dense logits are discarded: the factor model reads out
        logits, _ = self.factor_logits(latents.features.flatten(1))
        return logits, latents

    def top_templates(self, latents: Latents, classes: Tensor) -> Tensor:
        """mu_c + Lambda_c z_c per example, with z_c the example's MAP factor for its class (an E-step constant)."""
        h = latents.features.flatten(1)
        with torch.no_grad():
            z = self.infer_factors(h)[torch.arange(len(classes), device=h.device), classes]  # (N, d)
        mu = self.readout.weight[classes] + torch.einsum("ndk,nk->nd", self.factor_loadings[classes], z)
        return mu.view(len(classes), *self.top_shape)

    def sample_templates(self, classes: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        """Top templates for sampling: mu_c + Lambda_c z with z ~ N(0, I)."""
        lam = self.factor_loadings[classes]
        z = torch.randn(len(classes), self.factor_dim, generator=generator).to(lam)
        mu = self.readout.weight[classes] + torch.einsum("ndk,nk->nd", lam, z)
        return mu.view(len(classes), *self.top_shape)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", factor_dim={self.factor_dim}, noise_var={self.noise_var}"


def build_drfm(
    name: str,
    in_channels: int,
    image_size: Tuple[int, int],
    num_classes: int = 10,
    *,
    factor_dim: int = 8,
    noise_var: float = 1.0,
    norm: Optional[str] = None,
    activation: Optional[str] = None,
    tail_kernel: Optional[int] = None,
    **drmm_kwargs,
) -> DRFM:
    """A DRFM from DRMM preset ``name`` (``rfm`` + factor top = the paper's RFM)."""
    return DRFM(
        preset_layers(name, norm, activation, tail_kernel),
        in_channels,
        image_size,
        num_classes,
        factor_dim=factor_dim,
        noise_var=noise_var,
        **drmm_kwargs,
    )
