"""Per-layer priors of the switches, tracked during training for sampling (docs/model.md#switches and
#sampling-and-generation).

For every layer and every (channel, pooled position): ``pi_t`` = the frequency of each argmax offset inside the
pooling window (4 for 2x2 max-pooling, 1 otherwise) and ``pi_a`` = the frequency of the render switch ``a = 1``.
Both are exponential moving averages of the batch frequencies (``momentum`` in the PyTorch convention: [TF]
keeps an EMA with decay 0.99, i.e. momentum 0.01), updated by a forward hook on every training-mode forward.
They are registered as model buffers (``switch_prior_t_<i>``, ``switch_prior_a_<i>``), so checkpoints carry them.
Under data parallelism the batch frequencies are averaged across ranks first, so every rank holds the same priors.
"""

from __future__ import annotations

from typing import Dict, List, Tuple

import torch
from torch import Tensor

# The switch byte (docs/ops.md): bit 7 = the a switch, bits 0-3 = the row-major argmax offset in the window.
from drmm_kernels.contract import OFFSET_MASK, ON_BIT

from .model import DRMM, Latents

PRIOR_PREFIX = "switch_prior_"


def pooled_sizes(model: DRMM) -> List[Tuple[int, int]]:
    """The (H, W) of each layer's switch map (the fused op's pooled output; mean pooling happens after it)."""
    return [tuple(s // spec.fused_pool for s in conv) for spec, conv in zip(model.specs, model.map_sizes)]


def prior_buffers(model: DRMM, i: int) -> Tuple[Tensor, Tensor]:
    """(pi_t (C, H, W, pool*pool), pi_a (C, H, W)) of layer ``i``."""
    return getattr(model, f"{PRIOR_PREFIX}t_{i}"), getattr(model, f"{PRIOR_PREFIX}a_{i}")


def switch_frequencies(switches: Tensor, pool: int) -> Tuple[Tensor, Tensor]:
    """Batch frequencies of the offsets (C, H, W, pool*pool) and of a = 1 (C, H, W) in a uint8 switch map.

    Counted one offset at a time on the uint8 map: a one-hot of int64 offsets would allocate a (N, C, H, W,
    pool*pool) int64 tensor, 32x the switch map's bytes for 2x2 pooling (52 MB for conv_small's first layer at
    batch 200), on every training forward.
    """
    n = switches.shape[0]
    offsets = switches & OFFSET_MASK
    counts = [(offsets == k).sum(0, dtype=torch.float32) for k in range(pool * pool - 1)]
    # The last offset also takes any larger value (none come from the kernels; as clamp(max=pool*pool - 1) did).
    counts.append(n - sum(counts) if counts else torch.full(switches.shape[1:], float(n), device=switches.device))
    freq_t = torch.stack(counts, dim=-1) / n
    freq_a = (switches >= ON_BIT).sum(0, dtype=torch.float32) / n
    return freq_t, freq_a


def attach_switch_priors(model: DRMM, momentum: float = 0.01) -> DRMM:
    """Register the prior buffers (uniform offsets, P(a=1) = 0.5) and the hook that updates them; idempotent."""
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"switch_prior_momentum must be in [0, 1], got {momentum!r}")
    model.switch_prior_momentum = float(momentum)
    if getattr(model, "_switch_prior_hook", None) is not None:
        return model
    ref = model.readout.weight
    for i, (spec, (h, w)) in enumerate(zip(model.specs, pooled_sizes(model))):
        p2 = spec.fused_pool**2
        model.register_buffer(f"{PRIOR_PREFIX}t_{i}", torch.full((spec.channels, h, w, p2), 1.0 / p2).to(ref))
        model.register_buffer(f"{PRIOR_PREFIX}a_{i}", torch.full((spec.channels, h, w), 0.5).to(ref))
    model._switch_prior_hook = model.register_forward_hook(_update_priors_hook)
    return model


@torch.no_grad()
def update_switch_priors(model: DRMM, latents: Latents) -> None:
    import torch.distributed as dist

    m = model.switch_prior_momentum
    for i, (spec, sw) in enumerate(zip(model.specs, latents.switches)):
        freq_t, freq_a = switch_frequencies(sw, spec.fused_pool)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            both = torch.cat([freq_t.flatten(), freq_a.flatten()])
            dist.all_reduce(both)
            both /= dist.get_world_size()
            freq_t, freq_a = both[: freq_t.numel()].view_as(freq_t), both[freq_t.numel() :].view_as(freq_a)
        pi_t, pi_a = prior_buffers(model, i)
        pi_t.mul_(1 - m).add_(freq_t.to(pi_t), alpha=m)
        pi_a.mul_(1 - m).add_(freq_a.to(pi_a), alpha=m)


def _update_priors_hook(module: DRMM, inputs, output) -> None:
    if module.training and module.switch_prior_momentum > 0:
        update_switch_priors(module, output[1])


def load_model_state(model: torch.nn.Module, state: Dict[str, Tensor]) -> None:
    """``load_state_dict`` that accepts checkpoints written before the switch priors existed (priors stay uniform)."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith(PRIOR_PREFIX)]
    if missing or unexpected:
        raise RuntimeError(f"checkpoint does not match the model: missing keys {missing}, unexpected {unexpected}")
