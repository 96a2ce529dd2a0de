"""Drawing images top-down from a trained DRMM/DRFM, and class appearance models
(docs/model.md#sampling-and-generation).

Sampler (the derived sampler of docs/model.md#sampling-and-generation; the authors' code keeps the priors but has no
sampler): choose the class c; start from the template mu_c (DRFM: mu_c + Lambda_c z with z ~ N(0, I)); for each
layer from the top: draw each pooling window's offset t ~ Cat(pi_t) and its render switch a ~ Bern(pi_a) from the
layer's switch priors (drmm/priors.py), unpool at t, mask by a, transposed conv with the layer's filters, and ReLU
between layers (NN-DRMM: rendered templates are nonnegative, [P16] §3.2).

Class appearance model ([P16] §3.4): mu_c rendered with the most probable switch configuration (the argmax offset
of pi_t and a = [pi_a > 0.5] at every window), i.e. the template under the prior's most likely rendering path.

    drmm sample RUN_DIR [--class c] [--num N] [--checkpoint last|best]   -> samples_class<c>.png, class_appearance.png

(the command is in cli.py, the PNG grids in figures.py).
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

import drmm_kernels as dk

from .drfm import DRFM
from .model import DRMM
from .priors import ON_BIT, pooled_sizes, prior_buffers


def input_sizes(model: DRMM) -> List[tuple]:
    sizes, hw = [], tuple(model.image_size)
    for spec, pooled in zip(model.specs, pooled_sizes(model)):
        sizes.append(hw)
        hw = pooled
    return sizes


@torch.no_grad()
def draw_switches(
    model: DRMM, num: int, generator: Optional[torch.Generator] = None, most_probable: bool = False
) -> List[Tensor]:
    """Per layer, (num, C, H, W) uint8 switch maps drawn from the priors (or their mode)."""
    switches = []
    for i, spec in enumerate(model.specs):
        pi_t, pi_a = prior_buffers(model, i)
        if most_probable:
            offsets = pi_t.argmax(-1).expand(num, *pi_a.shape)
            on = (pi_a > 0.5).expand(num, *pi_a.shape)
        else:
            flat = pi_t.reshape(-1, pi_t.shape[-1]).float().cpu()
            offsets = torch.multinomial(flat, num, replacement=True, generator=generator)  # (C*H*W, num)
            offsets = offsets.t().reshape(num, *pi_a.shape)
            on = torch.rand(num, *pi_a.shape, generator=generator) < pi_a.float().cpu()
        sw = offsets.to(torch.uint8) | (on.to(torch.uint8) * ON_BIT)
        switches.append(sw.to(pi_t.device))
    return switches


@torch.no_grad()
def render_with_switches(
    model: DRMM, templates: Tensor, switches: Sequence[Tensor], relu_between: bool = True
) -> Tensor:
    """Render top signals (N, *top_shape) through the given switches, ReLU between layers (NN-DRMM).

    A model with top-down BNs (``td_batchnorm``) renders through them with their running statistics. Max-Min
    models are sampled through their max branch (the priors count its switches).
    """
    sizes = input_sizes(model)
    mu = model.top_down_norm(0, templates, frozen=True)
    for j, i in enumerate(reversed(range(len(model.specs))), start=1):
        spec, layer = model.specs[i], model.convs[i]
        if relu_between:
            mu = F.relu(mu)
        if spec.pool == "mean":
            mu = model.mean_unpool(mu, model.map_sizes[i])
        mu = dk.render(
            mu,
            switches[i],
            model.conv_weight(layer),
            None,
            padding=spec.pad,
            pool=spec.fused_pool,
            out_size=sizes[i],
            negative_slope=spec.negative_slope,
            check_switches=False,  # switches from a forward pass or draw_switches: skip the per-call byte check
        )
        mu = model.top_down_norm(j, mu, frozen=True)
    return mu


@torch.no_grad()
def sample_images(model: DRMM, classes: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
    """Images drawn top-down from the switch priors for each entry of ``classes`` (N,)."""
    if isinstance(model, DRFM):
        templates = model.sample_templates(classes.cpu(), generator).to(model.readout.weight)
    else:
        templates = model.class_templates(classes)
    return render_with_switches(model, templates, draw_switches(model, len(classes), generator))


@torch.no_grad()
def class_appearance(model: DRMM) -> Tensor:
    """mu_c of every class rendered with the prior's most probable switches, (C, *image)."""
    classes = torch.arange(model.num_classes, device=model.readout.weight.device)
    switches = draw_switches(model, len(classes), most_probable=True)
    return render_with_switches(model, model.class_templates(classes), switches)
