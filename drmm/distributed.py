"""Multi-process data parallelism: ``torchrun --nproc-per-node N -m drmm train ...``.

Each rank takes an equal contiguous slice of every global batch (labeled and unlabeled parts separately), so the
mean of the per-rank losses is the single-process loss of the global batch. EG/backprop gradients are averaged by
DistributedDataParallel; the hard-EM normal equations are summed with all_reduce (hard_em.py). Rank 0 alone
writes metrics and checkpoints.

BatchNorm: ``nn.SyncBatchNorm`` cannot wrap drmm_kernels' fused conv+BN+ReLU+pool op (the statistics are computed
inside it), so with more than one rank every fused BN layer is switched to ``SyncFusedConvBNReLUPool2d``: conv,
then the global batch mean and variance from a *differentiable* all_reduce (whose backward sums the statistics'
gradients over ranks, as SyncBatchNorm does), then normalise, activation, and max-pool with switches by the
reference op contract (drmm_kernels.reference.pool_switches: same switch bytes, first max on ties). The running
statistics are updated from the global statistics with the global count, as one process would.
"""

from __future__ import annotations

import os
import warnings
from typing import Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

import drmm_kernels as dk
from drmm_kernels import reference as kref

from .config import resolve_device


def rank_and_world() -> Tuple[int, int, int]:
    """(rank, world size, local rank) from the torchrun environment; (0, 1, 0) without it."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0)))


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def setup(device_name: str) -> Tuple[torch.device, bool]:
    """Join the process group if torchrun started several ranks. Returns (this rank's device, whether we joined).

    NCCL with one GPU per rank (``cuda:LOCAL_RANK``) when CUDA is used, gloo on CPU.
    """
    _, world, local_rank = rank_and_world()
    device = resolve_device(device_name)
    if world <= 1:
        return device, False
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if dist.is_initialized():
        return device, False
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return device, True


def shard(indices: Tensor, rank: int, world: int, what: str) -> Tensor:
    """This rank's equal contiguous slice of a batch's indices."""
    if len(indices) % world:
        raise ValueError(
            f"{what} has {len(indices)} examples, not divisible by the {world} ranks; choose "
            f"batch_size (and num_labeled) so every rank gets an equal share"
        )
    per = len(indices) // world
    return indices[rank * per : (rank + 1) * per]


class SyncFusedConvBNReLUPool2d(dk.FusedConvBNReLUPool2d):
    """FusedConvBNReLUPool2d whose training-mode batch statistics are those of the global batch (all ranks)."""

    def forward(self, x: Tensor, return_switches=None, shift: Optional[Tensor] = None):
        bn = self.bn
        if not (bn.training and is_distributed()):
            return super().forward(x, return_switches, shift)
        import torch.distributed.nn.functional as dist_nn  # the differentiable all_reduce (backward = all_reduce)

        warnings.filterwarnings("ignore", message=".*all_reduce is deprecated", category=FutureWarning)
        z = F.conv2d(x, self.conv.weight, None, self.conv.stride, self.conv.padding)
        count = dist_nn.all_reduce(z.new_tensor([float(z.numel() // z.shape[1])]))
        mean = dist_nn.all_reduce(z.sum((0, 2, 3))) / count
        centered = z - mean.view(1, -1, 1, 1)
        var = dist_nn.all_reduce(centered.pow(2).sum((0, 2, 3))) / count  # biased, two-pass like var_mean
        v = centered * torch.rsqrt(var + bn.eps).view(1, -1, 1, 1)
        v = v * bn.weight.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1)
        if shift is not None:  # an extra bias after the BN (BiasAdder)
            v = v + shift.view(1, -1, 1, 1)
        y, switches = kref.pool_switches(v, self.pool, self.negative_slope)
        if bn.track_running_stats and bn.running_mean is not None:
            bn.num_batches_tracked.add_(1)
            m = float(count)
            momentum = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
            with torch.no_grad():
                bn.running_mean.mul_(1 - momentum).add_(mean.detach(), alpha=momentum)
                bn.running_var.mul_(1 - momentum).add_(var.detach() * (m / (m - 1)), alpha=momentum)
        want = self.return_switches if return_switches is None else return_switches
        return (y, switches) if want else y


def convert_sync_fused_bn(model: nn.Module) -> int:
    """Switch every fused conv+BN layer of ``model`` to the synchronised forward (parameters untouched)."""
    n = 0
    for module in model.modules():
        if type(module) is dk.FusedConvBNReLUPool2d:
            module.__class__ = SyncFusedConvBNReLUPool2d  # same state, only the forward changes
            n += 1
    return n
