"""The data plan: which training images a run uses and which of them each step sees.

``load_data`` applies the config's cut of the data set (a prefix of the training set, a validation split held out
from its end); ``make_plan`` splits the training images into the labeled subset (class-balanced, saved in the run
folder as labeled_indices.npy) and the unlabeled pool; ``epoch_batches`` lists every step's (labeled, unlabeled)
indices of one epoch. Modes: supervised (labeled subset only), semisupervised (each batch = half labeled, half
unlabeled, or ``labeled_per_batch`` labeled and the rest unlabeled; the labeled set is cycled; an epoch is one pass
over the unlabeled pool), unsupervised (all training
images, no labels), pretrain_finetune (unsupervised for ``pretrain_epochs``, then supervised).

Each epoch's order comes from a generator seeded by (seed, epoch), so a resumed run sees the same batches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import List, Tuple

import numpy as np
import torch

from . import data as data_lib
from .config import TrainConfig


def load_data(cfg: TrainConfig, device: torch.device) -> data_lib.ImageData:
    """The data set of ``cfg`` on ``device``: the training prefix it asks for, the validation split held out."""
    data = data_lib.load_dataset(cfg.dataset, cfg.data_dir, download_missing=cfg.download)
    if cfg.max_train_samples and cfg.max_train_samples < len(data.train_labels):
        data.train_images = data.train_images[: cfg.max_train_samples]
        data.train_labels = data.train_labels[: cfg.max_train_samples]
    if cfg.val_samples:
        data.hold_out_validation(cfg.val_samples)
    return data.to(device)


@dataclass
class DataPlan:
    """Index pools (device tensors) the epochs draw from."""

    labeled: torch.Tensor  # indices into the training set
    unlabeled: torch.Tensor
    all_train: torch.Tensor


def make_plan(cfg: TrainConfig, data: data_lib.ImageData, run_dir: Path) -> DataPlan:
    """The labeled subset (saved to / checked against ``run_dir``/labeled_indices.npy) and the unlabeled pool."""
    n = len(data.train_labels)
    dev = data.train_labels.device
    if cfg.num_labeled:
        labeled = data_lib.labeled_subset(
            data.train_labels.cpu().numpy(),
            cfg.num_labeled,
            data.num_classes,
            cfg.labeled_seed,
            run_dir / "labeled_indices.npy",
        )
    else:
        labeled = np.arange(n, dtype=np.int64)
    unlabeled = data_lib.unlabeled_pool(n, labeled, cfg.include_labeled_in_unlabeled or not cfg.num_labeled)
    return DataPlan(torch.from_numpy(labeled).to(dev), torch.from_numpy(unlabeled).to(dev), torch.arange(n, device=dev))


def phase(cfg: TrainConfig, epoch: int) -> str:
    """The training mode of ``epoch``: pretrain_finetune is unsupervised first, supervised after."""
    if cfg.mode == "pretrain_finetune":
        return "unsupervised" if epoch < cfg.pretrain_epochs else "supervised"
    return cfg.mode


def steps_in_epoch(cfg: TrainConfig, plan: DataPlan, epoch: int) -> int:
    """Steps of ``epoch``: one pass over its pool (the unlabeled pool in semisupervised mode), whole batches."""
    mode = phase(cfg, epoch)
    if mode == "semisupervised":
        return max(1, len(plan.unlabeled) // (cfg.batch_size - labeled_per_batch(cfg)))
    pool = plan.all_train if mode == "unsupervised" else plan.labeled
    return max(1, len(pool) // min(cfg.batch_size, len(pool)))


def labeled_per_batch(cfg: TrainConfig) -> int:
    """Labeled images in a semi-supervised batch: ``cfg.labeled_per_batch``, or half the batch ([TF]) when 0."""
    return cfg.labeled_per_batch or cfg.batch_size // 2


def epoch_generator(seed: int, epoch: int, salt: int = 0) -> torch.Generator:
    # A generator per (seed, epoch): the data order of an epoch does not depend on how we got there (resume).
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch) * 7 + salt)


def epoch_batches(cfg: TrainConfig, plan: DataPlan, epoch: int) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """(labeled indices, unlabeled indices) per step of ``epoch``; either may be empty."""
    mode, steps = phase(cfg, epoch), steps_in_epoch(cfg, plan, epoch)
    g = epoch_generator(cfg.seed, epoch)
    dev = plan.labeled.device
    empty = plan.labeled.new_empty(0)
    if mode == "unsupervised":
        b = min(cfg.batch_size, len(plan.all_train))
        order = plan.all_train[torch.randperm(len(plan.all_train), generator=g).to(dev)]
        return [(empty, order[i * b : (i + 1) * b]) for i in range(steps)]
    if mode == "supervised":
        b = min(cfg.batch_size, len(plan.labeled))
        order = plan.labeled[torch.randperm(len(plan.labeled), generator=g).to(dev)]
        return [(order[i * b : (i + 1) * b], empty) for i in range(steps)]
    n_lab = labeled_per_batch(cfg)
    n_unl = cfg.batch_size - n_lab
    unl = plan.unlabeled[torch.randperm(len(plan.unlabeled), generator=g).to(dev)]
    # The labeled set is cycled: as many fresh permutations of it as the epoch needs, back to back.
    cycles = math.ceil(steps * n_lab / len(plan.labeled))
    lab = torch.cat([torch.randperm(len(plan.labeled), generator=g) for _ in range(cycles)]).to(dev)
    lab = plan.labeled[lab]
    return [(lab[i * n_lab : (i + 1) * n_lab], unl[i * n_unl : (i + 1) * n_unl]) for i in range(steps)]


__all__ = [
    "DataPlan",
    "load_data",
    "make_plan",
    "phase",
    "steps_in_epoch",
    "labeled_per_batch",
    "epoch_generator",
    "epoch_batches",
]
