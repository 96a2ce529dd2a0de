"""Shared by the trainer tests: where MNIST is, the skip mark when it is not, and a tiny training config."""

import os
from pathlib import Path

import pytest

from drmm.config import TrainConfig, config_from_dict

DATA_DIR = os.environ.get("DRMM_DATA_DIR")
needs_mnist = pytest.mark.skipif(
    not DATA_DIR or not (Path(DATA_DIR) / "mnist").is_dir(), reason="DRMM_DATA_DIR with mnist/ not set"
)


def tiny_config(**overrides) -> TrainConfig:
    """An rfm run on 200 training images (20 labeled), batch 20, 2 epochs; ``overrides`` win."""
    base = dict(
        name="tiny",
        dataset="mnist",
        data_dir=DATA_DIR,
        download=False,
        model="rfm",
        num_labeled=20,
        max_train_samples=200,
        eval_samples=100,
        batch_size=20,
        epochs=2,
        progress=False,
        tensorboard=False,
        lr_init=2e-3,
        lr_final=1e-4,
    )
    base.update(overrides)
    return config_from_dict(base)
